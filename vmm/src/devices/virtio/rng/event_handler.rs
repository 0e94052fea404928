//! Event handling of the entropy device on the device thread.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::warn;

use super::Rng;

impl Rng {
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        let Some(active) = self.active.as_ref() else {
            return;
        };
        for evt in &active.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("virtio-rng: failed to register the queue eventfd: {e:?}");
            }
        }
        if let Err(e) = ops.remove(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("virtio-rng: failed to unregister the activate eventfd: {e:?}");
        }
        self.process_queue();
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("virtio-rng: failed to register the activate eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.activate_evt) {
            self.handle_activate_event(ops);
            return;
        }
        let is_queue_evt = self
            .active
            .as_ref()
            .and_then(|a| a.queue_evts.first())
            .is_some_and(|evt| std::os::fd::AsRawFd::as_raw_fd(evt) == fd);
        if is_queue_evt {
            if let Some(evt) = self.active.as_ref().and_then(|a| a.queue_evts.first()) {
                let _ = evt.read();
            }
            self.process_queue();
        }
    }
}
