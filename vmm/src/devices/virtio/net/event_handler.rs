//! Event handling of the network device on the device thread: activation and reset, queue
//! notifications, and the backend becoming readable.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{Net, NetBackend, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::device_state::DeviceEvent;

impl<B: NetBackend> Net<B> {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.finish_reset(ops);
        if self.state.register_active_queue_evts(ops) {
            self.offloads_for_driver();
            // The driver may have queued frames or buffers before we listened.
            self.process_tx();
            self.process_rx(ops);
        }
    }

    fn finish_reset(&mut self, ops: &mut EventOps) {
        if self.state.finish_reset(ops) {
            self.reset_session(ops);
        }
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queues before anything else.
        self.finish_reset(ops);
        match self.state.take_event(events.fd()) {
            DeviceEvent::Activate => self.handle_activate_event(ops),
            DeviceEvent::Queue(RX_QUEUE) => self.process_rx(ops),
            DeviceEvent::Queue(TX_QUEUE) => self.process_tx(),
            DeviceEvent::Queue(_) => {}
            DeviceEvent::Other => {
                if self.state.is_activated() {
                    self.process_rx(ops);
                } else {
                    // Frames for a device the driver has not activated (or reset) wait.
                    self.watch_backend(ops, false);
                }
            }
        }
    }
}
