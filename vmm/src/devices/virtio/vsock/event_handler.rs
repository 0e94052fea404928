//! Event handling of the socket device on the device thread: activation, queue
//! notifications, and host socket events passed to the backend.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::warn;

use super::device::Vsock;
use super::{VsockBackend, RXQ_INDEX, TXQ_INDEX};

impl<B: VsockBackend> Vsock<B> {
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        let Some(active) = self.active.as_ref() else {
            return;
        };
        for evt in &active.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("vsock: failed to register a queue eventfd: {e:?}");
            }
        }
        if let Err(e) = ops.remove(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("vsock: failed to unregister the activate eventfd: {e:?}");
        }
        self.backend.register(ops);
        // The driver may have queued packets before we listened.
        self.process_tx(ops);
        self.process_rx(ops);
    }

    /// Which queue's eventfd `fd` is.
    fn queue_of(&self, fd: i32) -> Option<usize> {
        self.active
            .as_ref()?
            .queue_evts
            .iter()
            .position(|evt| evt.as_raw_fd() == fd)
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("vsock: failed to register the activate eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.handle_activate_event(ops);
            return;
        }
        if self.active.is_none() {
            return;
        }
        match self.queue_of(fd) {
            Some(index) => {
                if let Some(evt) = self.active.as_ref().and_then(|a| a.queue_evts.get(index)) {
                    let _ = evt.read();
                }
                match index {
                    RXQ_INDEX => self.process_rx(ops),
                    TXQ_INDEX => {
                        self.process_tx(ops);
                        self.process_rx(ops);
                    }
                    // Event queue: we never post events, nothing to do.
                    _ => {}
                }
            }
            None => {
                self.backend.handle_event(events, ops);
                self.process_rx(ops);
            }
        }
    }
}
