//! [`Rng`]: the `VirtioDevice` side of the entropy device.

use tracing::debug;
use virtio_queue::QueueT;

use super::request::fill_request;
use super::{RngError, QUEUE_SIZE, REQ_QUEUE};
use crate::devices::virtio::{
    signal_used_queue, RateLimitedLog, VirtioDevice, VirtioDeviceState, VIRTIO_ID_RNG,
};

/// The virtio entropy device.
pub struct Rng {
    pub(super) state: VirtioDeviceState,
    pub(super) queue_sizes: [u16; 1],
    pub(super) bad_request_log: RateLimitedLog,
    /// Bytes of randomness handed to the guest.
    pub(super) bytes_served: u64,
}

impl Rng {
    /// Creates an inactive entropy device.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            state: VirtioDeviceState::new("virtio-rng").map_err(RngError::EventFd)?,
            queue_sizes: [QUEUE_SIZE],
            bad_request_log: RateLimitedLog::default(),
            bytes_served: 0,
        })
    }

    /// Bytes of randomness handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// Serves every available request; interrupts the guest if any was completed.
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(REQ_QUEUE) else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let written = match fill_request(&active.mem, chain) {
                Ok(n) => n,
                Err(e) => {
                    if self.bad_request_log.should_log() {
                        debug!(
                            count = self.bad_request_log.count(),
                            "virtio-rng: bad request: {e}"
                        );
                    }
                    0
                }
            };
            self.bytes_served += u64::from(written);
            if let Err(e) = queue.add_used(&active.mem, head, written) {
                debug!("virtio-rng: add_used failed: {e}");
                continue;
            }
            used_any = true;
        }
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.state
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, IrqTrigger};
    use std::sync::Arc;

    use crate::devices::virtio::rng::MAX_REQUEST_BYTES;
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::Mutex;
    use vm_memory::Bytes;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// An activated device, its driver-side queue and the device's event loop.
    struct Harness {
        rng: Arc<Mutex<Rng>>,
        gq: GuestQueue,
        mem: GuestMemoryMmap<()>,
        irq: Arc<IrqTrigger>,
        em: TestEventManager,
        evt: EventFd,
    }

    impl Harness {
        fn new() -> Self {
            let mem = test_memory();
            let gq = GuestQueue::new(&mem, 0x10000, 16);
            let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
            let irq = Arc::new(IrqTrigger::new().unwrap());
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut em = TestEventManager::new().unwrap();
            em.add_subscriber(rng.clone());
            rng.lock()
                .unwrap()
                .activate(
                    mem.clone(),
                    irq.clone(),
                    vec![gq.create_queue()],
                    vec![evt.try_clone().unwrap()],
                )
                .unwrap();
            em.run_with_timeout(100).unwrap();
            Self {
                rng,
                gq,
                mem,
                irq,
                em,
                evt,
            }
        }

        fn notify(&mut self) {
            self.evt.write(1).unwrap();
            self.em.run_with_timeout(100).unwrap();
        }
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mut h = Harness::new();
        h.gq.add_chain(&[(0x20000, 64, true), (0x30000, 64, true)]);
        h.notify();
        assert_eq!(h.gq.take_used(), vec![(0, 128)]);
        let mut a = [0u8; 64];
        h.mem
            .read_slice(&mut a, vm_memory::GuestAddress(0x20000))
            .unwrap();
        assert_ne!(a, [0u8; 64]);
        assert_eq!(h.irq.irq_status(), 1);
        assert_eq!(h.rng.lock().unwrap().bytes_served(), 128);
    }

    #[test]
    fn large_request_is_capped() {
        let mut h = Harness::new();
        h.gq.add_chain(&[(0x20000, 1 << 20, true)]);
        h.notify();
        assert_eq!(h.gq.take_used(), vec![(0, MAX_REQUEST_BYTES as u32)]);
    }

    #[test]
    fn read_only_or_out_of_bounds_request_is_consumed_empty() {
        let mut h = Harness::new();
        h.gq.add_chain(&[(0x20000, 64, false)]);
        h.gq.add_chain(&[(0xffff_ffff_0000, 64, true)]);
        h.notify();
        assert_eq!(h.gq.take_used(), vec![(0, 0), (1, 0)]);
        assert_eq!(h.irq.irq_status(), 1);
        assert_eq!(h.rng.lock().unwrap().bad_request_log.count(), 2);
    }

    #[test]
    fn no_interrupt_without_used_buffers() {
        let mut h = Harness::new();
        h.notify();
        assert_eq!(h.irq.irq_status(), 0);
    }

    #[test]
    fn reset_unwatches_the_queue_and_reactivation_works() {
        let mut h = Harness::new();
        assert!(h.rng.lock().unwrap().reset());
        assert!(!h.rng.lock().unwrap().is_activated());
        h.em.run_with_timeout(100).unwrap();
        h.gq.add_chain(&[(0x20000, 16, true)]);
        h.evt.write(1).unwrap();
        assert_eq!(h.em.run_with_timeout(20).unwrap(), 0);
        assert!(h.gq.take_used().is_empty());
        let gq = GuestQueue::new(&h.mem, 0x40000, 16);
        h.rng
            .lock()
            .unwrap()
            .activate(
                h.mem.clone(),
                h.irq.clone(),
                vec![gq.create_queue()],
                vec![h.evt.try_clone().unwrap()],
            )
            .unwrap();
        h.gq = gq;
        h.em.run_with_timeout(100).unwrap();
        h.gq.add_chain(&[(0x20000, 16, true)]);
        h.notify();
        assert_eq!(h.gq.take_used(), vec![(0, 16)]);
    }

    #[test]
    fn activate_rejects_wrong_queue_count() {
        let mut rng = Rng::new().unwrap();
        let err = rng
            .activate(
                test_memory(),
                Arc::new(IrqTrigger::new().unwrap()),
                vec![],
                vec![],
            )
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
    }
}
