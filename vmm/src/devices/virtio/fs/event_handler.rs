//! Event handling of the file system device on the device thread.

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::api::filesystem::FileSystem;

use super::Fs;
use crate::devices::virtio::device_state::DeviceEvent;

impl Fs {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.finish_reset(ops);
        if self.state.register_active_queue_evts(ops) {
            // The driver may have queued requests already.
            for index in 0..self.queue_sizes.len() {
                self.process_queue(index);
            }
        }
    }

    /// Completes a reset on the device thread: old queue eventfds and the FUSE session go.
    fn finish_reset(&mut self, ops: &mut EventOps) {
        if self.state.finish_reset(ops) {
            // Drop the old session's inodes and open files.
            self.fs.destroy();
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queues before anything else.
        self.finish_reset(ops);
        match self.state.take_event(events.fd()) {
            DeviceEvent::Activate => self.handle_activate_event(ops),
            DeviceEvent::Queue(index) => self.process_queue(index),
            DeviceEvent::Other => {}
        }
    }
}
