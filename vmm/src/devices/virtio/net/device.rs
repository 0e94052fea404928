//! [`Net`]: the `VirtioDevice` side of the network device, and its queue processing.

use event_manager::{EventOps, EventSet, Events};
use tracing::debug;
use virtio_queue::QueueT;

use super::frame::{gather, scatter};
use super::{
    NetBackend, NetError, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC,
    VNET_HDR_LEN,
};
use crate::devices::virtio::{
    read_config_bytes, signal_used_queue, RateLimitedLog, VirtioDevice, VirtioDeviceState,
    VIRTIO_ID_NET,
};

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
    /// The configuration space: the MAC address.
    config: [u8; 6],
    pub(super) backend: B,
    /// Whether the backend's fd is registered with the device thread.
    pub(super) backend_registered: bool,
    /// A frame read from the backend that waits for a receive buffer (`rx_len` bytes of
    /// `rx_buf`).
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    tx_buf: Vec<u8>,
    stats: NetStats,
    bad_chain_log: RateLimitedLog,
}

impl<B: NetBackend> Net<B> {
    /// An inactive network device with MAC address `mac` over `backend`.
    pub fn new(backend: B, mac: [u8; 6]) -> Result<Self, NetError> {
        let mut state = VirtioDeviceState::new("virtio-net").map_err(NetError::EventFd)?;
        state.avail_features |= 1 << VIRTIO_NET_F_MAC;
        Ok(Self {
            state,
            queue_sizes: [QUEUE_SIZE; 2],
            config: mac,
            backend,
            backend_registered: false,
            rx_buf: vec![0u8; MAX_FRAME_LEN],
            rx_len: None,
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

    /// Sends every frame the guest queued for transmission.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mut used_any = false;
        let mut problems = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
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
                            // virtio 1.x: the header's `num_buffers`; one buffer (chain) per
                            // frame, as no mergeable buffers are offered.
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
                let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
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

    /// Device thread: after a reset, the backend is no longer watched and a frame in hand
    /// is dropped.
    pub(super) fn reset_session(&mut self, ops: &mut EventOps) {
        self.watch_backend(ops, false);
        self.rx_len = None;
    }
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

    /// A datagram socket as the backend: like a TAP, it keeps frame boundaries.
    struct SocketBackend(UnixDatagram);

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
    }

    impl Harness {
        fn new() -> Self {
            let mem = test_memory();
            let rx = GuestQueue::new(&mem, 0x10000, 16);
            let tx = GuestQueue::new(&mem, 0x20000, 16);
            let (ours, peer) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let net = Arc::new(Mutex::new(Net::new(SocketBackend(ours), MAC).unwrap()));
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
    fn offers_the_mac_and_version_1() {
        let net = Net::new(SocketBackend(UnixDatagram::pair().unwrap().0), MAC).unwrap();
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
        assert_ne!(net.avail_features() & (1 << 32), 0);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
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
}
