//! [`VirtioDeviceState`]: the part of every virtio device that is the same for all of them -
//! feature negotiation, activation with its queue-count check, reset, and the hand-over of
//! queue eventfds to the device thread.
//!
//! A device embeds one, delegates its `VirtioDevice` boilerplate to it and calls its
//! device-thread half from its `MutEventSubscriber`. The state is plain data (no locks, no
//! callbacks) so it can be saved for snapshots.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    register_queue_evts, unregister_queue_evts, ActivateError, IrqTrigger, VIRTIO_F_VERSION_1,
};

/// What a device holds once the driver activated it.
pub struct ActiveState {
    /// Guest memory the queues live in.
    pub mem: GuestMemoryMmap<()>,
    /// The device's interrupt line.
    pub interrupt: Arc<IrqTrigger>,
    /// The queues, in device order.
    pub queues: Vec<virtio_queue::Queue>,
    /// The queue notification eventfds, same order.
    pub queue_evts: Vec<EventFd>,
}

/// What an event on the device thread is, as far as [`VirtioDeviceState`] knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The transport activated or reset the device.
    Activate,
    /// The driver notified the queue with this index.
    Queue(usize),
    /// Not one of the common eventfds: a device backend's.
    Other,
}

/// The state every virtio device shares: features, activation and the reset hand-over.
pub struct VirtioDeviceState {
    /// The device's name in log messages (`"vsock"`, `"virtio-rng"`, ...).
    pub name: &'static str,
    /// The features the device offers.
    pub avail_features: u64,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Wakes the device thread after an activation or a reset.
    pub activate_evt: EventFd,
    /// Set while the driver has the device activated.
    pub active: Option<ActiveState>,
    /// Whether the active queue eventfds are registered with the device thread.
    pub queue_evts_registered: bool,
    /// Queue eventfds of a reset activation, still to be unregistered on the device thread.
    pub stale_queue_evts: Vec<EventFd>,
    /// A reset happened: the device's own session state is to be dropped on the device
    /// thread.
    pub reset_pending: bool,
}

impl VirtioDeviceState {
    /// An inactive device named `name` that offers `VIRTIO_F_VERSION_1` only.
    pub fn new(name: &'static str) -> std::io::Result<Self> {
        Ok(Self {
            name,
            avail_features: 1 << VIRTIO_F_VERSION_1,
            acked_features: 0,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            queue_evts_registered: false,
            stale_queue_evts: Vec::new(),
            reset_pending: false,
        })
    }

    /// Records the features the driver accepted, limited to the offered ones.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Takes the driver's `expected` queues and wakes the device thread to watch them.
    pub fn activate(
        &mut self,
        expected: usize,
        mem: GuestMemoryMmap<()>,
        interrupt: Arc<IrqTrigger>,
        mut queues: Vec<virtio_queue::Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        if queues.len() != expected || queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len().min(queue_evts.len()),
            });
        }
        let event_idx = self.acked_features & (1 << super::VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut queues {
            virtio_queue::QueueT::set_event_idx(queue, event_idx);
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues,
            queue_evts,
        });
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)
    }

    /// Deactivates the device and forgets the negotiated features. The device thread, woken,
    /// unregisters the old queue eventfds and finishes the reset (see [`Self::finish_reset`]).
    pub fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            self.stale_queue_evts.extend(active.queue_evts);
            self.reset_pending = true;
            if let Err(e) = self.activate_evt.write(1) {
                tracing::warn!("{}: failed to signal the reset: {e}", self.name);
            }
        }
        self.acked_features = 0;
        true
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Device thread: watches the activate eventfd (`MutEventSubscriber::init`).
    pub fn register_activate_evt(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::warn!(
                "{}: failed to register the activate eventfd: {e:?}",
                self.name
            );
        }
    }

    /// Device thread: stops watching the queue eventfds of a reset activation. Returns
    /// whether the device's own reset work (dropping its session) is due now.
    pub fn finish_reset(&mut self, ops: &mut EventOps) -> bool {
        if !self.stale_queue_evts.is_empty() {
            let stale = std::mem::take(&mut self.stale_queue_evts);
            unregister_queue_evts(ops, stale, self.name);
            self.queue_evts_registered = false;
        }
        std::mem::take(&mut self.reset_pending)
    }

    /// Device thread: which of the device's eventfds `fd` is; the eventfd is read (drained).
    pub fn take_event(&self, fd: RawFd) -> DeviceEvent {
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            return DeviceEvent::Activate;
        }
        let queue_evt = self.active.as_ref().and_then(|active| {
            active
                .queue_evts
                .iter()
                .enumerate()
                .find(|(_, evt)| evt.as_raw_fd() == fd)
        });
        match queue_evt {
            Some((index, evt)) => {
                let _ = evt.read();
                DeviceEvent::Queue(index)
            }
            None => DeviceEvent::Other,
        }
    }

    /// Device thread: watches the queue eventfds of a new activation. Returns true if it did,
    /// i.e. the device is to look at queues the driver may have filled already.
    pub fn register_active_queue_evts(&mut self, ops: &mut EventOps) -> bool {
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        if self.queue_evts_registered {
            return false;
        }
        register_queue_evts(ops, &active.queue_evts, self.name);
        self.queue_evts_registered = true;
        true
    }
}

/// Reads `data.len()` bytes at `offset` of a configuration space `config`; bytes out of range
/// are left untouched.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        if let Some(value) = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o))
        {
            *byte = *value;
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::test_memory;

    #[test]
    fn acked_features_are_limited_to_offered_ones_and_cleared_by_reset() {
        let mut state = VirtioDeviceState::new("test").unwrap();
        state.set_acked_features(u64::MAX);
        assert_eq!(state.acked_features, 1 << 32);
        assert!(state.reset());
        assert_eq!(state.acked_features, 0);
    }

    #[test]
    fn activate_checks_queue_count_then_twice() {
        let mut state = VirtioDeviceState::new("test").unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
        let err = state
            .activate(2, test_memory(), irq.clone(), vec![], vec![evt(), evt()])
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 0
            }
        ));
        state
            .activate(0, test_memory(), irq.clone(), vec![], vec![])
            .unwrap();
        assert!(state.is_activated());
        assert_eq!(state.activate_evt.read().unwrap(), 1);
        let err = state
            .activate(0, test_memory(), irq, vec![], vec![])
            .unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActivated));
    }

    #[test]
    fn reset_hands_queue_evts_to_the_device_thread() {
        let mut state = VirtioDeviceState::new("test").unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let queue = <virtio_queue::Queue as virtio_queue::QueueT>::new(16).unwrap();
        state
            .activate(1, test_memory(), irq, vec![queue], vec![evt])
            .unwrap();
        assert_eq!(state.activate_evt.read().unwrap(), 1);
        assert!(state.reset());
        assert!(!state.is_activated());
        assert_eq!(state.stale_queue_evts.len(), 1);
        assert!(state.reset_pending);
        assert_eq!(state.activate_evt.read().unwrap(), 1);
        // A reset of an inactive device has nothing to hand over.
        assert!(state.reset());
        assert_eq!(state.stale_queue_evts.len(), 1);
        assert!(state.activate_evt.read().is_err());
    }

    #[test]
    fn take_event_tells_activate_queue_and_other_fds_apart_and_drains_them() {
        let mut state = VirtioDeviceState::new("test").unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let queue = || <virtio_queue::Queue as virtio_queue::QueueT>::new(16).unwrap();
        state
            .activate(
                2,
                test_memory(),
                irq,
                vec![queue(), queue()],
                evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            )
            .unwrap();
        assert_eq!(
            state.take_event(state.activate_evt.as_raw_fd()),
            DeviceEvent::Activate
        );
        assert!(state.activate_evt.read().is_err());
        evts[1].write(1).unwrap();
        let queue_fd = state.active.as_ref().unwrap().queue_evts[1].as_raw_fd();
        assert_eq!(state.take_event(queue_fd), DeviceEvent::Queue(1));
        assert!(evts[1].read().is_err());
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(state.take_event(other.as_raw_fd()), DeviceEvent::Other);
    }

    #[test]
    fn config_bytes_out_of_range_are_untouched() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xaau8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0xaa, 0xaa]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [3, 4, 0xaa, 0xaa]);
        read_config_bytes(&[], 0, &mut data);
        assert_eq!(data, [3, 4, 0xaa, 0xaa]);
    }
}
