//! Event handling of the socket device on the device thread: activation and reset,
//! queue notifications, and host socket events passed to the backend.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Vsock;
use super::{VsockBackend, RXQ_INDEX, TXQ_INDEX};
use crate::devices::virtio::device_state::DeviceEvent;

impl<B: VsockBackend> Vsock<B> {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.finish_reset(ops);
        if self.state.register_active_queue_evts(ops) {
            self.backend.register(ops);
            // The driver may have queued packets before we listened.
            self.process_tx(ops);
            self.process_rx(ops);
        }
    }

    /// Completes a reset on the device thread: old queue eventfds and connections go.
    fn finish_reset(&mut self, ops: &mut EventOps) {
        if self.state.finish_reset(ops) {
            self.backend.reset(ops);
        }
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queues before anything else.
        self.finish_reset(ops);
        match self.state.take_event(events.fd()) {
            DeviceEvent::Activate => self.handle_activate_event(ops),
            DeviceEvent::Queue(RXQ_INDEX) => self.process_rx(ops),
            DeviceEvent::Queue(TXQ_INDEX) => {
                self.process_tx(ops);
                self.process_rx(ops);
            }
            // Event queue: we never post events, nothing to do.
            DeviceEvent::Queue(_) => {}
            DeviceEvent::Other => {
                // Host sockets stay watched while the device is inactive (after a reset), so
                // their events are always handled; packets wait for the next activation.
                self.backend.handle_event(events, ops);
                self.process_rx(ops);
            }
        }
    }
}
