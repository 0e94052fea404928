//! Event handling of the socket device on the device thread: activation and reset,
//! queue notifications, and host socket events passed to the backend.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::warn;

use super::device::Vsock;
use super::{VsockBackend, RXQ_INDEX, TXQ_INDEX};
use crate::devices::virtio::{register_queue_evts, unregister_queue_evts};

impl<B: VsockBackend> Vsock<B> {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        self.finish_reset(ops);
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if !self.queue_evts_registered {
            register_queue_evts(ops, &active.queue_evts, "vsock");
            self.queue_evts_registered = true;
            self.backend.register(ops);
            // The driver may have queued packets before we listened.
            self.process_tx(ops);
            self.process_rx(ops);
        }
    }

    /// Completes a reset on the device thread: old queue eventfds and connections go.
    fn finish_reset(&mut self, ops: &mut EventOps) {
        if !self.stale_queue_evts.is_empty() {
            let stale = std::mem::take(&mut self.stale_queue_evts);
            unregister_queue_evts(ops, stale, "vsock");
            self.queue_evts_registered = false;
        }
        if self.backend_reset_pending {
            self.backend_reset_pending = false;
            self.backend.reset(ops);
        }
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
        // After a reset, stop watching the old queues before anything else.
        self.finish_reset(ops);
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.handle_activate_event(ops);
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
                // Host sockets stay watched while the device is inactive (after a reset), so
                // their events are always handled; packets wait for the next activation.
                self.backend.handle_event(events, ops);
                self.process_rx(ops);
            }
        }
    }
}
