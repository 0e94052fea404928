//! Event handling of the entropy device on the device thread.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::warn;

use super::Rng;
use crate::devices::virtio::{register_queue_evts, unregister_queue_evts};

impl Rng {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        self.retire_stale_queue_evts(ops);
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if !self.queue_evts_registered {
            register_queue_evts(ops, &active.queue_evts, "virtio-rng");
            self.queue_evts_registered = true;
            // The driver may have queued requests already.
            self.process_queue();
        }
    }

    fn retire_stale_queue_evts(&mut self, ops: &mut EventOps) {
        if !self.stale_queue_evts.is_empty() {
            let stale = std::mem::take(&mut self.stale_queue_evts);
            unregister_queue_evts(ops, stale, "virtio-rng");
            self.queue_evts_registered = false;
        }
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("virtio-rng: failed to register the activate eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queue before anything else.
        self.retire_stale_queue_evts(ops);
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.handle_activate_event(ops);
            return;
        }
        let queue_evt = self
            .active
            .as_ref()
            .and_then(|a| a.queue_evts.first())
            .filter(|evt| evt.as_raw_fd() == fd);
        if let Some(evt) = queue_evt {
            let _ = evt.read();
            self.process_queue();
        }
    }
}
