//! Event handling of the memory balloon on the device thread.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{Balloon, DEFLATE_QUEUE, INFLATE_QUEUE, REPORTING_QUEUE};
use crate::devices::virtio::device_state::DeviceEvent;

impl Balloon {
    /// The transport activated or reset the device.
    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        // The balloon keeps no session: a reset only retires the old queues.
        self.state.finish_reset(ops);
        if self.state.register_active_queue_evts(ops) {
            // The driver may have queued requests already (or before a template was saved).
            for queue in [INFLATE_QUEUE, DEFLATE_QUEUE, REPORTING_QUEUE] {
                self.process_queue(queue);
            }
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // After a reset, stop watching the old queues before anything else.
        self.state.finish_reset(ops);
        match self.state.take_event(events.fd()) {
            DeviceEvent::Activate => self.handle_activate_event(ops),
            DeviceEvent::Queue(index) => self.process_queue(index),
            DeviceEvent::Other => {}
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::balloon::{QUEUE_SIZE, VIRTIO_BALLOON_F_REPORTING};
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use crate::devices::virtio::{IrqTrigger, VirtioDevice, VIRTIO_ID_BALLOON};

    type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// An activated balloon, its three driver-side queues and the device's event loop.
    struct Harness {
        balloon: Arc<Mutex<Balloon>>,
        queues: Vec<GuestQueue>,
        evts: Vec<EventFd>,
        mem: GuestMemoryMmap<()>,
        irq: Arc<IrqTrigger>,
        em: TestEventManager,
    }

    impl Harness {
        fn new() -> Self {
            let mem = test_memory();
            let queues: Vec<GuestQueue> = (0..3u64)
                .map(|i| GuestQueue::new(&mem, 0x10000 * (i + 1), 16))
                .collect();
            let evts: Vec<EventFd> = (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let balloon = Arc::new(Mutex::new(Balloon::new().unwrap()));
            let irq = Arc::new(IrqTrigger::new().unwrap());
            let mut em = TestEventManager::new().unwrap();
            em.add_subscriber(balloon.clone());
            balloon
                .lock()
                .unwrap()
                .activate(
                    mem.clone(),
                    irq.clone(),
                    queues.iter().map(GuestQueue::create_queue).collect(),
                    evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                )
                .unwrap();
            em.run_with_timeout(100).unwrap();
            Self {
                balloon,
                queues,
                evts,
                mem,
                irq,
                em,
            }
        }

        fn notify(&mut self, queue: usize) {
            self.evts[queue].write(1).unwrap();
            self.em.run_with_timeout(100).unwrap();
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .unwrap();
        }

        fn all(&self, addr: u64, len: usize, byte: u8) -> bool {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf.iter().all(|b| *b == byte)
        }

        fn discarded(&self) -> u64 {
            self.balloon.lock().unwrap().bytes_discarded()
        }
    }

    #[test]
    fn identity_features_and_config() {
        let mut balloon = Balloon::new().unwrap();
        assert_eq!(balloon.device_type(), VIRTIO_ID_BALLOON);
        assert_eq!(balloon.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert_eq!(
            balloon.avail_features(),
            (1 << 32) | (1 << VIRTIO_BALLOON_F_REPORTING)
        );
        balloon.write_config(4, &7u32.to_le_bytes());
        // The target stays 0 whatever the driver writes there.
        balloon.write_config(0, &9u32.to_le_bytes());
        let mut config = [0xffu8; 8];
        balloon.read_config(0, &mut config);
        assert_eq!(config, [0, 0, 0, 0, 7, 0, 0, 0]);
    }

    #[test]
    fn reported_ranges_are_handed_back() {
        let mut h = Harness::new();
        h.fill(0x40_0000, 0x60_0000, 0x5a);
        // Two reported ranges; the byte after them is kept.
        h.queues[REPORTING_QUEUE]
            .add_chain(&[(0x40_0000, 0x20_0000, true), (0x80_0000, 0x1000, true)]);
        h.notify(REPORTING_QUEUE);
        assert_eq!(h.queues[REPORTING_QUEUE].take_used(), vec![(0, 0)]);
        assert!(h.all(0x40_0000, 0x20_0000, 0));
        assert!(h.all(0x60_0000, 0x20_0000, 0x5a));
        assert!(h.all(0x80_0000, 0x1000, 0));
        assert!(h.all(0x80_1000, 0x1000, 0x5a));
        assert_eq!(h.discarded(), 0x20_1000);
        assert_eq!(h.irq.irq_status(), 1);
    }

    #[test]
    fn inflated_pages_are_handed_back_and_deflate_only_completes() {
        let mut h = Harness::new();
        h.fill(0x40_0000, 0x4000, 0x77);
        let pfns: Vec<u8> = [0x400u32, 0x402]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        h.mem.write_slice(&pfns, GuestAddress(0x9000)).unwrap();
        h.queues[INFLATE_QUEUE].add_chain(&[(0x9000, 8, false)]);
        h.notify(INFLATE_QUEUE);
        assert_eq!(h.queues[INFLATE_QUEUE].take_used(), vec![(0, 0)]);
        assert!(h.all(0x40_0000, 0x1000, 0));
        assert!(h.all(0x40_1000, 0x1000, 0x77));
        assert!(h.all(0x40_2000, 0x1000, 0));
        assert_eq!(h.discarded(), 0x2000);

        h.fill(0x40_0000, 0x1000, 0x11);
        h.queues[DEFLATE_QUEUE].add_chain(&[(0x9000, 8, false)]);
        h.notify(DEFLATE_QUEUE);
        assert_eq!(h.queues[DEFLATE_QUEUE].take_used(), vec![(0, 0)]);
        assert!(h.all(0x40_0000, 0x1000, 0x11));
        assert_eq!(h.discarded(), 0x2000);
    }

    #[test]
    fn bad_requests_are_consumed_and_touch_nothing() {
        let mut h = Harness::new();
        h.fill(0x40_0000, 0x2000, 0x33);
        // Unaligned, outside guest memory, and a ragged PFN array next to a good range.
        h.queues[REPORTING_QUEUE].add_chain(&[(0x40_0800, 0x1000, true)]);
        h.queues[REPORTING_QUEUE].add_chain(&[(0xffff_0000_0000, 0x20_0000, true)]);
        h.queues[INFLATE_QUEUE].add_chain(&[(0x9000, 6, false)]);
        h.notify(REPORTING_QUEUE);
        h.notify(INFLATE_QUEUE);
        assert_eq!(h.queues[REPORTING_QUEUE].take_used(), vec![(0, 0), (1, 0)]);
        assert_eq!(h.queues[INFLATE_QUEUE].take_used(), vec![(0, 0)]);
        assert!(h.all(0x40_0000, 0x2000, 0x33));
        assert_eq!(h.discarded(), 0);
        assert_eq!(h.balloon.lock().unwrap().bad_request_log.count(), 3);
    }

    #[test]
    fn a_report_queued_before_activation_is_served_on_it() {
        let mem = test_memory();
        let mut gq = GuestQueue::new(&mem, 0x30000, 16);
        mem.write_slice(&[0x44; 0x1000], GuestAddress(0x50_0000))
            .unwrap();
        gq.add_chain(&[(0x50_0000, 0x1000, true)]);
        let queues = vec![
            GuestQueue::new(&mem, 0x10000, 16).create_queue(),
            GuestQueue::new(&mem, 0x20000, 16).create_queue(),
            gq.create_queue(),
        ];
        let balloon = Arc::new(Mutex::new(Balloon::new().unwrap()));
        let mut em = TestEventManager::new().unwrap();
        em.add_subscriber(balloon.clone());
        let evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        balloon
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                Arc::new(IrqTrigger::new().unwrap()),
                queues,
                evts,
            )
            .unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(gq.take_used(), vec![(0, 0)]);
        assert_eq!(balloon.lock().unwrap().bytes_discarded(), 0x1000);
    }
}
