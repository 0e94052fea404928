//! Virtio 1.x devices over the MMIO transport.
//!
//! [`mmio::MmioTransport`] implements the virtio-mmio (version 2) register file and the device
//! status state machine; each device (`vsock`, `rng`, `balloon`, `fs`, `net`) implements [`VirtioDevice`] for the
//! transport and `event_manager::MutEventSubscriber` for its queue and backend events on the
//! device thread. The part of both that all devices share lives in one
//! [`device_state::VirtioDeviceState`] each device embeds.

pub mod balloon;
pub mod device_state;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_utils;

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use device_state::{read_config_bytes, ActiveState, VirtioDeviceState};

/// Device ID of a network card (virtio spec 5).
pub const VIRTIO_ID_NET: u32 = 1;
/// Device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;

/// Feature bit: the device complies with virtio 1.x (spec 6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: notifications are suppressed with ring indices rather than flags (spec
/// 2.7.7, 2.7.10): the driver's `used_event` says after which used buffer it wants its next
/// interrupt, the device's `avail_event` after which available one it wants its next
/// notification. A device offers it only if its queue processing re-arms with
/// [`rearm_queue`]: with the feature, a driver notifies once per re-arming, not per buffer.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// The avail ring's flag by which a driver without `VIRTIO_RING_F_EVENT_IDX` asks for no
/// interrupts (while it is taking used buffers anyway, as NAPI and Linux's work-queue
/// handlers do).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Device status: the guest OS has found the device.
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest OS knows how to drive the device.
pub const VIRTIO_CONFIG_S_DRIVER: u32 = 2;
/// Device status: the driver is set up and ready to drive the device.
pub const VIRTIO_CONFIG_S_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is complete.
pub const VIRTIO_CONFIG_S_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error it cannot recover from without a reset.
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u32 = 0x40;
/// Device status: the guest gave up on the device.
pub const VIRTIO_CONFIG_S_FAILED: u32 = 0x80;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Errors of [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver gave a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The device is already active.
    #[error("the device is already activated")]
    AlreadyActivated,
    /// Waking the device thread failed.
    #[error("failed to signal the device thread")]
    ActivateEvent(#[source] io::Error),
}

/// A virtio device as seen by its transport. A device provides its identity, queue sizes and
/// configuration space, and the [`VirtioDeviceState`] it embeds; features, activation and
/// reset are that state's (the defaults below), which a device overrides only to do more.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads from the device configuration space; bytes out of range are left untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The state every device shares.
    fn state(&self) -> &VirtioDeviceState;
    /// The state every device shares, to change.
    fn state_mut(&mut self) -> &mut VirtioDeviceState;

    /// The features the device offers, including `VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64 {
        self.state().avail_features
    }
    /// The features the driver accepted.
    fn acked_features(&self) -> u64 {
        self.state().acked_features
    }
    /// Records the features the driver accepted (a subset of [`Self::avail_features`]).
    fn set_acked_features(&mut self, features: u64) {
        self.state_mut().set_acked_features(features);
    }
    /// Starts the device with the queues the driver set up (one per [`Self::queue_max_sizes`]
    /// entry); the device thread, woken, starts watching them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        interrupt: Arc<IrqTrigger>,
        queues: Vec<virtio_queue::Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_max_sizes().len();
        self.state_mut()
            .activate(expected, mem, interrupt, queues, queue_evts)
    }
    /// Resets the device; returns false if the device cannot be reset in its current state.
    /// The device thread, woken, unregisters the old queue eventfds and drops the device's
    /// session (see [`VirtioDeviceState::finish_reset`]).
    fn reset(&mut self) -> bool {
        self.state_mut().reset()
    }
    /// Whether [`Self::activate`] succeeded.
    fn is_activated(&self) -> bool {
        self.state().is_activated()
    }
}

/// The interrupt line of one virtio-mmio device: an eventfd (registered as a KVM irqfd) plus
/// the InterruptStatus register the guest reads to learn why it was interrupted.
///
/// **Reading InterruptStatus clears it** ([`Self::read_status`]), and the guest's
/// InterruptACK is ignored: the builder registers the ACK register as an ioeventfd nobody
/// reads, so the guest's acknowledgement, one write per interrupt, is absorbed inside KVM
/// instead of costing an exit to `husk-vmm` (in the rig, an exit to user space is on the
/// order of 100 µs; every round trip with the guest takes one interrupt or more). Linux's
/// virtio-mmio driver reads the register once per interrupt and acknowledges exactly what it
/// read, so clearing on the read is what its acknowledgement would do, only earlier: a bit set
/// after the read stays set for the next read, and its event raises the line again. (Clearing
/// on an acknowledgement that arrives after such a bit was set would lose it; the ACK is
/// therefore not honoured even when it does reach `husk-vmm`.)
#[derive(Debug)]
pub struct IrqTrigger {
    irq_evt: EventFd,
    irq_status: AtomicU32,
}

impl IrqTrigger {
    /// Creates an interrupt line with no pending interrupt.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            irq_evt: EventFd::new(EFD_NONBLOCK)?,
            irq_status: AtomicU32::new(0),
        })
    }

    /// The eventfd the builder registers as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Signals that used buffers were added to a queue.
    pub fn trigger_queue(&self) -> io::Result<()> {
        self.trigger(VIRTIO_MMIO_INT_VRING)
    }

    /// Signals that the configuration space (or the device status) changed.
    pub fn trigger_config(&self) -> io::Result<()> {
        self.trigger(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The pending bits, unchanged (for saving the device's state and for tests).
    pub fn irq_status(&self) -> u32 {
        self.irq_status.load(Ordering::SeqCst)
    }

    /// The guest's read of InterruptStatus: the pending bits, which the read clears.
    pub fn read_status(&self) -> u32 {
        self.irq_status.swap(0, Ordering::SeqCst)
    }

    /// Clears all pending bits (device reset).
    pub fn clear(&self) {
        self.irq_status.store(0, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus of a restored device and raises the line again (a restored
    /// guest may not have taken the interrupt; a spurious one costs it a status read).
    pub fn restore(&self, bits: u32) {
        if let Err(e) = self.trigger(bits) {
            tracing::warn!("failed to raise a restored device's interrupt: {e}");
        }
    }

    fn trigger(&self, bits: u32) -> io::Result<()> {
        self.irq_status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }
}

/// Interrupts the guest after used buffers were added to `queue`, unless the driver said it
/// does not want that interrupt: with `VIRTIO_RING_F_EVENT_IDX`, when the buffers added
/// since the last call do not pass its `used_event`; without it, when its avail ring's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag is set (virtio-queue reads only the former). Either
/// way the driver re-checks the used ring after clearing its suppression (Linux's
/// `virtqueue_enable_cb` and `virtqueue_poll`), and the device reads the suppression after
/// publishing the used index (a full fence between), so no buffer is left without an
/// interrupt. A value the guest wrote that cannot be read means an interrupt.
pub fn signal_used_queue(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap<()>,
    irq: &IrqTrigger,
) {
    if wants_interrupt(queue, mem) {
        if let Err(e) = irq.trigger_queue() {
            tracing::debug!("failed to signal a used queue: {e}");
        }
    }
}

/// Whether the driver wants an interrupt for the used buffers added to `queue` since the
/// last call (see [`signal_used_queue`], which interrupts when it does). For a device that
/// completes buffers on several queues in one pass and raises the shared line once: call it
/// for every queue that got used buffers, not only until one says yes (each call starts the
/// next count).
pub fn wants_interrupt(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap<()>) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    if queue.event_idx_enabled() {
        return !matches!(queue.needs_notification(mem), Ok(false));
    }
    // The used index (stored by `add_used`) before the flags' load.
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// The next chain the driver made available in `queue`; when there is none, the queue is
/// re-armed ([`rearm_queue`]) and, if chains came meanwhile, looked at once more. `None`
/// therefore means the device may wait for the driver's notification. A ring whose index
/// says chains are there while none can be taken (an index past the ring's size: a broken or
/// hostile driver) gives `None` too, so that a device's loop ends instead of spinning.
pub fn pop_or_rearm<'a>(
    queue: &mut virtio_queue::Queue,
    mem: &'a GuestMemoryMmap<()>,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap<()>>> {
    use virtio_queue::QueueT;
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    if rearm_queue(queue, mem) {
        queue.pop_descriptor_chain(mem)
    } else {
        None
    }
}

/// After a device took every chain it wanted from `queue`: asks the driver to notify it of
/// the next one (with `VIRTIO_RING_F_EVENT_IDX`, `avail_event` set to the next index the
/// device will take; without it, the used ring's `VRING_USED_F_NO_NOTIFY` is cleared, which
/// husk's devices never set) and says whether chains arrived in the meantime, which the
/// device must take before it waits for a notification: the driver may have checked
/// `avail_event` before it was set. A ring that cannot be read answers `false` (the device
/// waits; a driver that broke its ring is not owed progress).
pub fn rearm_queue(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap<()>) -> bool {
    use virtio_queue::QueueT;
    queue.enable_notification(mem).unwrap_or(false)
}

/// After a device took every chain it wanted from `queue`, with `VIRTIO_RING_F_EVENT_IDX`:
/// asks the driver to notify it only once `count` more chains are available (`avail_event`
/// set `count - 1` past the next index the device will take), for a queue whose chains may
/// wait until the device's next pass for another reason. Says whether `count` or more chains
/// are there already, which the device must then take: the driver may have passed the mark
/// before it was set, and not notified. Without the feature this is [`rearm_queue`], which
/// asks for a notification per chain. A ring that cannot be read answers `false`.
pub fn arm_after(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap<()>, count: u16) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    if !queue.event_idx_enabled() {
        return rearm_queue(queue, mem);
    }
    let count = count.max(1);
    let next = Wrapping(queue.next_avail());
    // The used ring: flags and index (u16 each), `size` elements of 8 bytes, then
    // `avail_event`.
    let Some(at) = queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
    else {
        return false;
    };
    let mark = (next + Wrapping(count - 1)).0;
    if mem
        .store(mark.to_le(), GuestAddress(at), Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    // The mark stored before the driver's index is read (the driver stores its index, then
    // reads the mark).
    std::sync::atomic::fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| (idx - next).0 >= count)
}

/// Registers a device's queue eventfds with the device thread's epoll.
pub fn register_queue_evts(ops: &mut event_manager::EventOps, evts: &[EventFd], device: &str) {
    for evt in evts {
        if let Err(e) = ops.add(event_manager::Events::new(evt, event_manager::EventSet::IN)) {
            tracing::warn!("{device}: failed to register a queue eventfd: {e:?}");
        }
    }
}

/// Unregisters (and closes) queue eventfds of a device that was reset.
pub fn unregister_queue_evts(ops: &mut event_manager::EventOps, evts: Vec<EventFd>, device: &str) {
    for evt in evts {
        if let Err(e) = ops.remove(event_manager::Events::new(
            &evt,
            event_manager::EventSet::IN,
        )) {
            tracing::warn!("{device}: failed to unregister a queue eventfd: {e:?}");
        }
    }
}

/// A log limiter for events the guest controls: the first few are logged, then only every
/// power of two, so a hostile guest cannot flood the host log.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    count: u64,
}

impl RateLimitedLog {
    /// Counts one occurrence and says whether to log it.
    pub fn should_log(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= 10 || self.count.is_power_of_two()
    }

    /// How many occurrences were counted.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn irq_trigger_sets_status_bits_that_the_guest_read_clears() {
        let irq = IrqTrigger::new().unwrap();
        irq.trigger_queue().unwrap();
        irq.trigger_config().unwrap();
        assert_eq!(
            irq.irq_status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        assert_eq!(
            irq.read_status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(irq.irq_status(), 0);
        // What is signalled after the read waits for the next one, with the line raised again.
        irq.trigger_queue().unwrap();
        assert_eq!(irq.irq_evt().read().unwrap(), 1);
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.read_status(), 0);
    }

    /// A device-side queue with event indices on or off, and its test driver, which made
    /// `chains` one-buffer chains available.
    fn queue_with_used(
        mem: &GuestMemoryMmap<()>,
        event_idx: bool,
        chains: u16,
    ) -> (test_utils::GuestQueue, virtio_queue::Queue) {
        use virtio_queue::QueueT;
        let mut guest = test_utils::GuestQueue::new(mem, 0x10000, 16);
        let mut queue = guest.create_queue();
        queue.set_event_idx(event_idx);
        for i in 0..chains {
            guest.add_chain(&[(0x40000 + u64::from(i) * 0x100, 0x100, true)]);
        }
        (guest, queue)
    }

    fn use_one(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap<()>) {
        use virtio_queue::QueueT;
        let head = queue.pop_descriptor_chain(mem).unwrap().head_index();
        queue.add_used(mem, head, 0).unwrap();
    }

    #[test]
    fn a_driver_without_event_idx_that_turns_interrupts_off_gets_none() {
        let mem = test_utils::test_memory();
        let irq = IrqTrigger::new().unwrap();
        let (guest, mut queue) = queue_with_used(&mem, false, 2);
        guest.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        use_one(&mut queue, &mem);
        signal_used_queue(&mut queue, &mem, &irq);
        assert_eq!(irq.read_status(), 0, "the driver asked for no interrupt");
        guest.set_avail_flags(0);
        use_one(&mut queue, &mem);
        signal_used_queue(&mut queue, &mem, &irq);
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn with_event_idx_the_interrupt_comes_when_the_used_index_passes_used_event() {
        let mem = test_utils::test_memory();
        let irq = IrqTrigger::new().unwrap();
        let (guest, mut queue) = queue_with_used(&mem, true, 5);
        // The driver wants an interrupt once the buffer at used index 2 (its third) is used;
        // the flag of drivers without the feature means nothing here.
        guest.set_used_event(2);
        guest.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        for _ in 0..2 {
            use_one(&mut queue, &mem);
            signal_used_queue(&mut queue, &mem, &irq);
            assert_eq!(irq.read_status(), 0);
        }
        use_one(&mut queue, &mem);
        signal_used_queue(&mut queue, &mem, &irq);
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
        // Passed within a batch: one interrupt for the batch that crossed it.
        guest.set_used_event(3);
        use_one(&mut queue, &mem);
        use_one(&mut queue, &mem);
        signal_used_queue(&mut queue, &mem, &irq);
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn rearming_asks_for_the_next_chain_and_reports_chains_that_came_meanwhile() {
        let mem = test_utils::test_memory();
        let (mut guest, mut queue) = queue_with_used(&mem, true, 2);
        use_one(&mut queue, &mem);
        assert!(rearm_queue(&mut queue, &mem), "one chain is still there");
        assert_eq!(guest.avail_event(), 1);
        use_one(&mut queue, &mem);
        assert!(!rearm_queue(&mut queue, &mem));
        assert_eq!(
            guest.avail_event(),
            2,
            "notify me when chain 2 is made available"
        );
        guest.add_chain(&[(0x50000, 0x100, true)]);
        assert!(rearm_queue(&mut queue, &mem));
        // Without the feature it only reports.
        let (mut guest, mut queue) = queue_with_used(&mem, false, 1);
        use_one(&mut queue, &mem);
        assert!(!rearm_queue(&mut queue, &mem));
        assert_eq!(guest.avail_event(), 0);
        guest.add_chain(&[(0x50000, 0x100, true)]);
        assert!(rearm_queue(&mut queue, &mem));
    }

    #[test]
    fn a_ring_index_past_the_ring_ends_the_devices_loop() {
        let mem = test_utils::test_memory();
        let (guest, mut queue) = queue_with_used(&mem, true, 1);
        assert!(pop_or_rearm(&mut queue, &mem).is_some());
        assert!(pop_or_rearm(&mut queue, &mem).is_none());
        // The driver claims 1000 more chains in a 16-entry ring: re-arming sees "more", but
        // none can be taken, and the device is told to wait instead of looking forever.
        vm_memory::Bytes::write_obj(
            &mem,
            1001u16,
            vm_memory::GuestAddress(guest.avail_addr() + 2),
        )
        .unwrap();
        assert!(rearm_queue(&mut queue, &mem));
        assert!(pop_or_rearm(&mut queue, &mem).is_none());
    }

    #[test]
    fn rate_limited_log_logs_first_ten_then_powers_of_two() {
        let mut log = RateLimitedLog::default();
        let logged: Vec<u64> = (1..=40u64).filter(|_| log.should_log()).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32]);
    }
}
