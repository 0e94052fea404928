//! Event handling of the entropy device on the device thread.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::Rng;
use crate::devices::virtio::device_state::DeviceEvent;

impl Rng {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        // The entropy device keeps no session: a reset only retires the old queue.
        self.state.finish_reset(ops);
        if self.state.register_active_queue_evts(ops) {
            // The driver may have queued requests already.
            self.process_queue();
        }
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queue before anything else.
        self.state.finish_reset(ops);
        match self.state.take_event(events.fd()) {
            DeviceEvent::Activate => self.handle_activate_event(ops),
            DeviceEvent::Queue(_) => self.process_queue(),
            DeviceEvent::Other => {}
        }
    }
}
