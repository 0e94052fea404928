//! Event handling of the file system device on the device thread.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::warn;

use super::Fs;
use crate::devices::virtio::{register_queue_evts, unregister_queue_evts};

impl Fs {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        self.finish_reset(ops);
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if !self.queue_evts_registered {
            register_queue_evts(ops, &active.queue_evts, "virtio-fs");
            self.queue_evts_registered = true;
            // The driver may have queued requests already.
            for index in 0..self.queue_sizes.len() {
                self.process_queue(index);
            }
        }
    }

    /// Completes a reset on the device thread: old queue eventfds and the FUSE session go.
    fn finish_reset(&mut self, ops: &mut EventOps) {
        if !self.stale_queue_evts.is_empty() {
            let stale = std::mem::take(&mut self.stale_queue_evts);
            unregister_queue_evts(ops, stale, "virtio-fs");
            self.queue_evts_registered = false;
        }
        self.finish_session_reset();
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

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            warn!("virtio-fs: failed to register the activate eventfd: {e:?}");
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
        if let Some(index) = self.queue_of(fd) {
            if let Some(evt) = self.active.as_ref().and_then(|a| a.queue_evts.get(index)) {
                let _ = evt.read();
            }
            self.process_queue(index);
        }
    }
}
