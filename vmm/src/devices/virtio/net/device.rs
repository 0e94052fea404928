//! [`Net`]: the `VirtioDevice` side of the network device, and its queue processing.

use event_manager::{EventOps, EventSet, Events};
use tracing::debug;
use virtio_queue::QueueT;

use super::frame::{gather, scatter, FrameError};
use super::{
    tap_offloads, NetBackend, NetError, MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE,
    TX_QUEUE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VNET_HDR_LEN,
};
use crate::devices::virtio::{
    pop_or_rearm, read_config_bytes, signal_used_queue, RateLimitedLog, VirtioDevice,
    VirtioDeviceState, VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Frame counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Transmit chains dropped: malformed, or the backend had no room or failed.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the backend dropped: the guest's receive buffers could not hold them.
    pub rx_dropped: u64,
}

/// The virtio network device over a [`NetBackend`].
pub struct Net<B: NetBackend> {
    pub(super) state: VirtioDeviceState,
    queue_sizes: [u16; 2],
    /// The configuration space (`struct virtio_net_config`): the MAC address, then `status`
    /// and `max_virtqueue_pairs` (zero: neither feature is offered), then the MTU.
    config: [u8; 12],
    pub(super) backend: B,
    /// Whether the backend's fd is registered with the device thread.
    pub(super) backend_registered: bool,
    /// A frame read from the backend that waits for a receive buffer (`rx_len` bytes of
    /// `rx_buf`).
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// [`merge_into_buffers`]'s lists, kept so that receiving allocates nothing per frame.
    merge: MergeScratch,
    tx_buf: Vec<u8>,
    stats: NetStats,
    bad_chain_log: RateLimitedLog,
}

impl<B: NetBackend> Net<B> {
    /// An inactive network device with MAC address `mac` over `backend`, and MTU `mtu` if
    /// given (else the driver's default, 1500).
    pub fn new(backend: B, mac: [u8; 6], mtu: Option<u16>) -> Result<Self, NetError> {
        let mut state = VirtioDeviceState::new("virtio-net").map_err(NetError::EventFd)?;
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            state.avail_features |= 1 << bit;
        }
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        if let Some(mtu) = mtu {
            state.avail_features |= 1 << VIRTIO_NET_F_MTU;
            config[10..12].copy_from_slice(&mtu.to_le_bytes());
        }
        Ok(Self {
            state,
            queue_sizes: [QUEUE_SIZE; 2],
            config,
            backend,
            backend_registered: false,
            rx_buf: vec![0u8; MAX_FRAME_LEN],
            rx_len: None,
            merge: MergeScratch::default(),
            tx_buf: vec![0u8; MAX_FRAME_LEN],
            stats: NetStats::default(),
            bad_chain_log: RateLimitedLog::default(),
        })
    }

    /// The frame counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn log_bad(&mut self, what: &str) {
        if self.bad_chain_log.should_log() {
            debug!(count = self.bad_chain_log.count(), "virtio-net: {what}");
        }
    }

    /// Device thread: watches (or stops watching) the backend for frames to receive. It is not
    /// watched while a received frame waits for buffers, so that an idle driver cannot make
    /// the device thread spin on a readable TAP.
    pub(super) fn watch_backend(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.backend_registered {
            return;
        }
        let events = Events::new(&self.backend, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.backend_registered = on,
            Err(e) => debug!("virtio-net: cannot change the backend's registration: {e:?}"),
        }
    }

    /// Sends every frame the guest queued for transmission, until none is left after the
    /// queue is re-armed.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mut used_any = false;
        let mut problems = Vec::new();
        while let Some(chain) = pop_or_rearm(queue, &active.mem) {
            let head = chain.head_index();
            match gather(&active.mem, chain, &mut self.tx_buf) {
                Ok(len) => match self.backend.send(&self.tx_buf[..len]) {
                    Ok(true) => self.stats.tx_frames += 1,
                    Ok(false) => self.stats.tx_dropped += 1,
                    Err(e) => {
                        self.stats.tx_dropped += 1;
                        problems.push(format!("backend write failed: {e}"));
                    }
                },
                Err(e) => {
                    self.stats.tx_dropped += 1;
                    problems.push(format!("bad transmit chain: {e}"));
                }
            }
            if let Err(e) = queue.add_used(&active.mem, head, 0) {
                problems.push(format!("add_used failed: {e}"));
                continue;
            }
            used_any = true;
        }
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
        for problem in problems {
            self.log_bad(&problem);
        }
    }

    /// Delivers frames from the backend while the guest has receive buffers; when it has
    /// none, the frame in hand waits and the backend is no longer watched until the driver
    /// adds buffers (a receive queue notification).
    pub(super) fn process_rx(&mut self, ops: &mut EventOps) {
        let mut used_any = false;
        let mut problems = Vec::new();
        let mut out_of_buffers = false;
        let mergeable = self.state.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        {
            let Some(active) = self.state.active.as_mut() else {
                return;
            };
            let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
                return;
            };
            loop {
                let len = match self.rx_len {
                    Some(len) => len,
                    None => match self.backend.recv(&mut self.rx_buf) {
                        Ok(Some(len)) if len >= VNET_HDR_LEN => {
                            // virtio 1.x: the header's `num_buffers`, one chain unless
                            // mergeable buffers spread the frame over more.
                            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                            self.rx_len = Some(len);
                            len
                        }
                        Ok(Some(len)) => {
                            problems.push(format!("backend gave a {len}-byte frame"));
                            continue;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            problems.push(format!("backend read failed: {e}"));
                            break;
                        }
                    },
                };
                if mergeable {
                    let merge = &mut self.merge;
                    let frame = &mut self.rx_buf[..len];
                    match merge_into_buffers(queue, &active.mem, frame, merge) {
                        Merged::Wait => {
                            out_of_buffers = true;
                            break;
                        }
                        Merged::Delivered => {
                            self.stats.rx_frames += 1;
                            for &(head, written) in &merge.used {
                                if let Err(e) = queue.add_used(&active.mem, head, written) {
                                    problems.push(format!("add_used failed: {e}"));
                                }
                            }
                        }
                        Merged::Dropped(e) => {
                            self.stats.rx_dropped += 1;
                            problems.push(format!("frame not delivered: {e}"));
                            for &(head, _) in &merge.chains {
                                if let Err(e) = queue.add_used(&active.mem, head, 0) {
                                    problems.push(format!("add_used failed: {e}"));
                                }
                            }
                        }
                    }
                    merge.trim();
                    self.rx_len = None;
                    used_any = true;
                    continue;
                }
                // With none left, the driver is asked for its next buffers.
                let Some(chain) = pop_or_rearm(queue, &active.mem) else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                let written = match scatter(&active.mem, chain, &self.rx_buf[..len]) {
                    Ok(n) => {
                        self.stats.rx_frames += 1;
                        n
                    }
                    Err(e) => {
                        self.stats.rx_dropped += 1;
                        problems.push(format!("frame not delivered: {e}"));
                        0
                    }
                };
                self.rx_len = None;
                if let Err(e) = queue.add_used(&active.mem, head, written) {
                    problems.push(format!("add_used failed: {e}"));
                    continue;
                }
                used_any = true;
            }
            if used_any {
                signal_used_queue(queue, &active.mem, &active.interrupt);
            }
        }
        self.watch_backend(ops, !out_of_buffers);
        for problem in problems {
            self.log_bad(&problem);
        }
    }

    /// Device thread: after a reset, the backend is no longer watched, a frame in hand
    /// is dropped, and the backend gives plain frames again (the next driver may take no
    /// offload).
    pub(super) fn reset_session(&mut self, ops: &mut EventOps) {
        self.watch_backend(ops, false);
        self.rx_len = None;
        self.set_backend_offloads(0);
    }

    /// Device thread: the driver activated the card with the features it acked; the backend
    /// may give frames with the receive offloads among them. If it cannot, it gives plain
    /// frames, which every driver takes.
    pub(super) fn offloads_for_driver(&mut self) {
        self.set_backend_offloads(tap_offloads(self.state.acked_features));
    }

    fn set_backend_offloads(&mut self, flags: u32) {
        if let Err(e) = self.backend.set_offloads(flags) {
            debug!("virtio-net: cannot set the backend's offloads to {flags:#x}: {e}");
            if flags != 0 {
                let _ = self.backend.set_offloads(0);
            }
        }
    }
}

/// What became of a frame offered to mergeable receive buffers.
#[derive(Debug, PartialEq, Eq)]
enum Merged {
    /// Written across the chains in [`MergeScratch::used`].
    Delivered,
    /// The buffers posted cannot hold it yet: none was taken (the queue is where it was).
    Wait,
    /// Dropped: the chains taken ([`MergeScratch::chains`]) go back used and empty.
    Dropped(FrameError),
}

/// [`merge_into_buffers`]'s lists, kept by the device between frames: a 64 KiB frame spans
/// some 18 chains, and lists of its own per frame and per chain would be as many allocations
/// on the receive path. Bounded by the ring (its chains and their descriptors), and given
/// back when a frame made them grow beyond what a frame needs ([`MergeScratch::trim`]).
#[derive(Debug, Default)]
struct MergeScratch {
    /// The chains taken for the frame: each one's head, and the end of its buffers in
    /// `buffers`.
    chains: Vec<(u16, usize)>,
    /// Every taken chain's device-writable buffers, in order: guest address and length.
    buffers: Vec<(GuestAddress, u32)>,
    /// After a delivery: each chain's head and the bytes it got.
    used: Vec<(u16, u32)>,
}

impl MergeScratch {
    /// More entries than a well-formed frame takes (a 64 KiB frame in page-sized buffers
    /// takes 17 chains of one buffer each): what a malformed or hostile ring made the lists
    /// grow to is given back rather than kept for the card's life.
    const KEPT: usize = 256;

    fn clear(&mut self) {
        self.chains.clear();
        self.buffers.clear();
        self.used.clear();
    }

    fn trim(&mut self) {
        self.clear();
        self.chains.shrink_to(Self::KEPT);
        self.buffers.shrink_to(Self::KEPT);
        self.used.shrink_to(Self::KEPT);
    }
}

/// Writes `frame` (its header first) across as many of `queue`'s receive chains as it takes,
/// with their number in the header's `num_buffers` (`VIRTIO_NET_F_MRG_RXBUF`). Each chain is
/// checked as [`scatter`] checks one: device-writable buffers only, at most
/// [`MAX_CHAIN_DESCRIPTORS`], and a chain with no room is malformed. When the chains posted
/// are too few, none is taken and the frame waits (the driver is asked for a notification);
/// a frame that a ring full of chains cannot hold, or a malformed chain, drops the frame.
/// The chains taken and what each got are left in `scratch`.
fn merge_into_buffers(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap<()>,
    frame: &mut [u8],
    scratch: &mut MergeScratch,
) -> Merged {
    scratch.clear();
    let start = queue.next_avail();
    let mut room = 0usize;
    while room < frame.len() {
        if scratch.chains.len() >= usize::from(queue.size()) {
            let len = frame.len();
            return Merged::Dropped(FrameError::TooSmall { room, len });
        }
        let Some(chain) = pop_or_rearm(queue, mem) else {
            queue.set_next_avail(start);
            scratch.clear();
            return Merged::Wait;
        };
        let head = chain.head_index();
        let mut chain_room = 0usize;
        for (count, desc) in chain.enumerate() {
            let bad = if count >= MAX_CHAIN_DESCRIPTORS {
                Some(FrameError::ChainTooLong)
            } else if !desc.is_write_only() {
                Some(FrameError::WrongDirection)
            } else {
                None
            };
            if let Some(e) = bad {
                scratch.chains.push((head, scratch.buffers.len()));
                return Merged::Dropped(e);
            }
            chain_room = chain_room.saturating_add(desc.len() as usize);
            scratch.buffers.push((desc.addr(), desc.len()));
        }
        scratch.chains.push((head, scratch.buffers.len()));
        if chain_room == 0 {
            let len = frame.len();
            return Merged::Dropped(FrameError::TooSmall { room: 0, len });
        }
        room = room.saturating_add(chain_room);
    }
    let count = u16::try_from(scratch.chains.len()).unwrap_or(u16::MAX);
    frame[10..12].copy_from_slice(&count.to_le_bytes());
    let mut done = 0usize;
    let mut first = 0usize;
    for &(head, end) in &scratch.chains {
        let mut written = 0usize;
        for &(addr, len) in &scratch.buffers[first..end] {
            if done == frame.len() {
                break;
            }
            let n = (len as usize).min(frame.len() - done);
            if mem.write_slice(&frame[done..done + n], addr).is_err() {
                return Merged::Dropped(FrameError::GuestMemory);
            }
            done += n;
            written += n;
        }
        first = end;
        // At most MAX_FRAME_LEN, which fits in u32.
        scratch
            .used
            .push((head, u32::try_from(written).unwrap_or(u32::MAX)));
    }
    Merged::Delivered
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR; writes are ignored.
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::IrqTrigger;
    use std::sync::Arc;

    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A datagram socket as the backend: like a TAP, it keeps frame boundaries. The offloads
    /// it was told to give are recorded.
    struct SocketBackend(UnixDatagram, Arc<Mutex<Vec<u32>>>);

    impl AsRawFd for SocketBackend {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl NetBackend for SocketBackend {
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            match self.0.recv(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            }
        }

        fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
            match self.0.send(frame) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e),
            }
        }

        fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
            self.1.lock().unwrap().push(flags);
            Ok(())
        }
    }

    type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    struct Harness {
        net: Arc<Mutex<Net<SocketBackend>>>,
        rx: GuestQueue,
        tx: GuestQueue,
        mem: GuestMemoryMmap<()>,
        em: TestEventManager,
        evts: [EventFd; 2],
        /// The far end of the backend (the "host network").
        peer: UnixDatagram,
        /// The offloads the backend was told to give, in order.
        offloads: Arc<Mutex<Vec<u32>>>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_features(0)
        }

        /// A device the driver activated having acked `features`.
        fn with_features(features: u64) -> Self {
            let mem = test_memory();
            let rx = GuestQueue::new(&mem, 0x10000, 16);
            let tx = GuestQueue::new(&mem, 0x20000, 16);
            let (ours, peer) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let offloads = Arc::new(Mutex::new(Vec::new()));
            let net = Arc::new(Mutex::new(
                Net::new(SocketBackend(ours, offloads.clone()), MAC, None).unwrap(),
            ));
            net.lock().unwrap().set_acked_features(features);
            let irq = Arc::new(IrqTrigger::new().unwrap());
            let evts = [
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ];
            let mut em = TestEventManager::new().unwrap();
            em.add_subscriber(net.clone());
            net.lock()
                .unwrap()
                .activate(
                    mem.clone(),
                    irq,
                    vec![rx.create_queue(), tx.create_queue()],
                    vec![evts[0].try_clone().unwrap(), evts[1].try_clone().unwrap()],
                )
                .unwrap();
            em.run_with_timeout(100).unwrap();
            Self {
                net,
                rx,
                tx,
                mem,
                em,
                evts,
                peer,
                offloads,
            }
        }

        fn notify(&mut self, queue: usize) {
            self.evts[queue].write(1).unwrap();
            self.em.run_with_timeout(100).unwrap();
        }

        fn stats(&self) -> NetStats {
            self.net.lock().unwrap().stats()
        }
    }

    fn frame(payload_len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, payload_len));
        f
    }

    #[test]
    fn offers_the_mac_the_offloads_and_version_1() {
        let backend = SocketBackend(UnixDatagram::pair().unwrap().0, Arc::default());
        let net = Net::new(backend, MAC, None).unwrap();
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            32,
        ] {
            assert_ne!(net.avail_features() & (1 << bit), 0, "feature bit {bit}");
        }
        assert_ne!(net.avail_features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        // Nothing else.
        assert_eq!(net.avail_features().count_ones(), 10);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        assert_eq!(net.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
    }

    #[test]
    fn an_mtu_is_offered_in_the_configuration_space() {
        let backend = SocketBackend(UnixDatagram::pair().unwrap().0, Arc::default());
        let net = Net::new(backend, MAC, Some(1450)).unwrap();
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
        let mut config = [0xffu8; 12];
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &MAC);
        // `status` and `max_virtqueue_pairs` read as zero; the MTU is little-endian.
        assert_eq!(&config[6..10], &[0, 0, 0, 0]);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1450);
    }

    #[test]
    fn the_backend_gives_the_offloads_the_driver_acked_and_no_other() {
        use super::super::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
        let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_CSUM);
        let h = Harness::with_features(all);
        assert_eq!(
            *h.offloads.lock().unwrap(),
            vec![TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
        );
        // A driver that takes no receive offload gets plain frames.
        let h = Harness::with_features(1 << VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(*h.offloads.lock().unwrap(), vec![0]);
    }

    #[test]
    fn a_big_segment_goes_to_the_backend_whole() {
        // A 64 KiB TCP segment the guest left for the host to cut (HOST_TSO4): header and
        // data in 9 buffers (the test queue has 16 entries).
        let mut h = Harness::new();
        let mut f = frame(14 + 65_500, 0x5a);
        f[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        f[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        let mut chain = vec![(0x40000u64, 12u32, false)];
        h.mem.write_slice(&f[..12], GuestAddress(0x40000)).unwrap();
        let mut at = 0x100000u64;
        for part in f[12..].chunks(8192) {
            h.mem.write_slice(part, GuestAddress(at)).unwrap();
            chain.push((at, part.len() as u32, false));
            at += 8192;
        }
        h.tx.add_chain(&chain);
        h.notify(TX_QUEUE);
        let mut got = vec![0u8; MAX_FRAME_LEN + 1];
        let n = h.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(h.stats().tx_frames, 1);
    }

    #[test]
    fn a_big_segment_from_the_host_fills_a_big_receive_buffer() {
        // With GUEST_TSO4 the driver posts 64 KiB chains; the TAP gives whole segments.
        let mut h =
            Harness::with_features((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4));
        let chain: Vec<(u64, u32, bool)> = (0..9u64)
            .map(|i| (0x100000 + i * 8192, 8192, true))
            .collect();
        h.rx.add_chain(&chain);
        h.notify(RX_QUEUE);
        let f = frame(14 + 65_000, 0x3c);
        h.peer.send(&f).unwrap();
        h.em.run_with_timeout(100).unwrap();
        let len = f.len() as u32;
        assert_eq!(h.rx.take_used(), vec![(0, len)]);
        let mut got = vec![0u8; f.len()];
        h.mem.read_slice(&mut got, GuestAddress(0x100000)).unwrap();
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(h.stats().rx_frames, 1);
    }

    #[test]
    fn transmitted_frames_reach_the_backend_whole() {
        let mut h = Harness::new();
        let f = frame(100, 0xab);
        h.mem.write_slice(&f[..12], GuestAddress(0x40000)).unwrap();
        h.mem.write_slice(&f[12..], GuestAddress(0x41000)).unwrap();
        h.tx.add_chain(&[(0x40000, 12, false), (0x41000, 100, false)]);
        h.notify(TX_QUEUE);
        let mut got = vec![0u8; 2000];
        let n = h.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(h.tx.take_used(), vec![(0, 0)]);
        assert_eq!(h.stats().tx_frames, 1);
    }

    #[test]
    fn with_event_idx_the_driver_is_asked_for_its_next_frame_and_buffer() {
        let mut h = Harness::with_features(1 << VIRTIO_RING_F_EVENT_IDX);
        // Transmit: after taking two frames the device wants a notification for the third.
        for i in 0..2u64 {
            let f = frame(60, i as u8);
            h.mem
                .write_slice(&f, GuestAddress(0x40000 + i * 0x100))
                .unwrap();
            h.tx.add_chain(&[(0x40000 + i * 0x100, f.len() as u32, false)]);
        }
        h.notify(TX_QUEUE);
        assert_eq!(h.tx.take_used().len(), 2);
        assert_eq!(h.tx.avail_event(), 2);
        // Receive: a frame with no buffer asks for the driver's next buffer, which takes it.
        h.peer.send(&frame(60, 9)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        assert_eq!(h.rx.avail_event(), 0);
        h.rx.add_chain(&[(0x50000, 1526, true)]);
        h.notify(RX_QUEUE);
        assert_eq!(h.rx.take_used(), vec![(0, 72)]);
        assert_eq!(h.stats().rx_frames, 1);
        assert_eq!(h.stats().tx_frames, 2);
    }

    #[test]
    fn a_malformed_transmit_chain_is_returned_and_counted() {
        let mut h = Harness::new();
        // A device-writable buffer in a transmit chain.
        h.tx.add_chain(&[(0x40000, 64, true)]);
        h.notify(TX_QUEUE);
        assert_eq!(h.tx.take_used(), vec![(0, 0)]);
        assert_eq!(h.stats().tx_dropped, 1);
        let mut got = [0u8; 64];
        assert!(h.peer.recv(&mut got).is_err(), "nothing was sent");
    }

    #[test]
    fn received_frames_wait_for_buffers_and_carry_num_buffers() {
        let mut h = Harness::new();
        let f = frame(60, 0xcd);
        h.peer.send(&f).unwrap();
        h.em.run_with_timeout(100).unwrap();
        // No receive buffers yet: nothing delivered, and the frame is held, not lost.
        assert!(h.rx.take_used().is_empty());
        assert!(!h.net.lock().unwrap().backend_registered);
        h.rx.add_chain(&[(0x50000, 1526, true)]);
        h.notify(RX_QUEUE);
        let used = h.rx.take_used();
        assert_eq!(used, vec![(0, 72)]);
        let mut got = vec![0u8; 72];
        h.mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(&got[10..12], &1u16.to_le_bytes());
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(h.stats().rx_frames, 1);
        // Watching the backend again: the next frame goes straight in.
        assert!(h.net.lock().unwrap().backend_registered);
        h.rx.add_chain(&[(0x60000, 1526, true)]);
        h.notify(RX_QUEUE);
        h.peer.send(&frame(10, 1)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        assert_eq!(h.rx.take_used().len(), 1);
    }

    #[test]
    fn a_frame_too_big_for_the_buffers_is_dropped_and_the_buffer_returned() {
        let mut h = Harness::new();
        h.rx.add_chain(&[(0x50000, 64, true)]);
        h.notify(RX_QUEUE);
        h.peer.send(&frame(1000, 7)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        assert_eq!(h.rx.take_used(), vec![(0, 0)]);
        assert_eq!(h.stats().rx_dropped, 1);
    }

    const MERGEABLE: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

    #[test]
    fn with_mergeable_buffers_a_frame_spans_as_many_as_it_needs() {
        let mut h = Harness::with_features(MERGEABLE);
        for i in 0..3 {
            h.rx.add_chain(&[(0x50000 + i * 0x1000, 1000, true)]);
        }
        h.notify(RX_QUEUE);
        let f = frame(2500, 0x5a);
        h.peer.send(&f).unwrap();
        h.em.run_with_timeout(100).unwrap();
        // Three buffers, in order, the last one in part.
        assert_eq!(h.rx.take_used(), vec![(0, 1000), (1, 1000), (2, 512)]);
        let mut got = Vec::new();
        for (i, len) in [(0u64, 1000usize), (1, 1000), (2, 512)] {
            let mut part = vec![0u8; len];
            h.mem
                .read_slice(&mut part, GuestAddress(0x50000 + i * 0x1000))
                .unwrap();
            got.extend(part);
        }
        assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(h.stats().rx_frames, 1);
        // A small frame takes one buffer.
        h.rx.add_chain(&[(0x58000, 1000, true)]);
        h.notify(RX_QUEUE);
        h.peer.send(&frame(60, 1)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        assert_eq!(h.rx.take_used(), vec![(3, 72)]);
        let mut header = [0u8; 12];
        h.mem
            .read_slice(&mut header, GuestAddress(0x58000))
            .unwrap();
        assert_eq!(&header[10..12], &1u16.to_le_bytes());
    }

    #[test]
    fn with_mergeable_buffers_a_frame_waits_until_enough_are_posted() {
        let mut h = Harness::with_features(MERGEABLE);
        h.rx.add_chain(&[(0x50000, 1000, true)]);
        h.notify(RX_QUEUE);
        h.peer.send(&frame(1500, 3)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        // One buffer cannot hold it: it is not taken, and the frame is held.
        assert!(h.rx.take_used().is_empty());
        assert!(!h.net.lock().unwrap().backend_registered);
        assert_eq!(h.stats(), NetStats::default());
        h.rx.add_chain(&[(0x51000, 1000, true)]);
        h.notify(RX_QUEUE);
        assert_eq!(h.rx.take_used(), vec![(0, 1000), (1, 512)]);
        assert_eq!(h.stats().rx_frames, 1);
        assert!(h.net.lock().unwrap().backend_registered);
    }

    #[test]
    fn with_mergeable_buffers_a_frame_no_ring_can_hold_or_a_bad_chain_is_dropped() {
        let mut h = Harness::with_features(MERGEABLE);
        // The whole ring (16 entries) of 64-byte buffers holds 1 KiB.
        for i in 0..16 {
            h.rx.add_chain(&[(0x50000 + i * 0x100, 64, true)]);
        }
        h.notify(RX_QUEUE);
        h.peer.send(&frame(2000, 9)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        let used = h.rx.take_used();
        assert_eq!(used.len(), 16);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert_eq!(h.stats().rx_dropped, 1);
        // A chain the device may not write: the frame is dropped, the chain returned.
        h.rx.add_chain(&[(0x60000, 2000, false)]);
        h.notify(RX_QUEUE);
        h.peer.send(&frame(100, 9)).unwrap();
        h.em.run_with_timeout(100).unwrap();
        assert_eq!(h.rx.take_used(), vec![(0, 0)]);
        assert_eq!(h.stats().rx_dropped, 2);
        assert_eq!(h.stats().rx_frames, 0);
    }
}
