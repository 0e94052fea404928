//! Drives a [`Vsock`] device the way the guest driver does: real split queues in guest
//! memory, notifications through the queue eventfds, and the device's own event loop.

// Helpers not every test uses.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{VsockHeader, VsockPacket, VSOCK_PKT_HDR_SIZE};
use super::{
    Vsock, VsockBackend, VsockUnixBackend, VSOCK_HOST_CID, VSOCK_OP_RW, VSOCK_TYPE_STREAM,
};
use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
use crate::devices::virtio::{IrqTrigger, VirtioDevice};

pub type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

pub const GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 64;
const RXQ_BASE: u64 = 0x1_0000;
const TXQ_BASE: u64 = 0x2_0000;
const EVQ_BASE: u64 = 0x3_0000;
const TX_BUF_BASE: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const RX_BUF_BASE: u64 = 0x80_0000;
const RX_SLOT: u64 = 0x2000;
/// Each rx buffer holds a header and 4 KiB, like Linux's.
pub const RX_BUF_SIZE: u32 = VSOCK_PKT_HDR_SIZE as u32 + 4096;

/// A fake backend: records what the guest sends, hands out queued packets.
pub struct TestBackend {
    pub sent: Vec<VsockPacket>,
    pub to_guest: VecDeque<VsockPacket>,
    pub evt: EventFd,
    pub events: usize,
    pub resets: usize,
}

impl TestBackend {
    pub fn new() -> Self {
        Self {
            sent: Vec::new(),
            to_guest: VecDeque::new(),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            events: 0,
            resets: 0,
        }
    }
}

impl VsockBackend for TestBackend {
    fn register(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
    }
    fn send_pkt(&mut self, pkt: VsockPacket, _ops: &mut EventOps) {
        self.sent.push(pkt);
    }
    fn recv_pkt(&mut self, max_data_len: usize, _ops: &mut EventOps) -> Option<VsockPacket> {
        let pkt = self.to_guest.pop_front()?;
        assert!(pkt.data.len() <= max_data_len);
        Some(pkt)
    }
    fn has_pending_rx(&self) -> bool {
        !self.to_guest.is_empty()
    }
    fn reset(&mut self, _ops: &mut EventOps) {
        self.to_guest.clear();
        self.resets += 1;
    }
    fn handle_event(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.events += 1;
    }
}

/// A header from the guest (src = guest cid) to host port `dst_port`.
pub fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// A device activated on three queues in guest memory, and the driver's side of them.
pub struct VsockTestContext<B: VsockBackend + 'static> {
    pub mem: GuestMemoryMmap<()>,
    pub device: Arc<Mutex<Vsock<B>>>,
    pub em: TestEventManager,
    pub irq: Arc<IrqTrigger>,
    pub rxq: GuestQueue,
    pub txq: GuestQueue,
    pub evq: GuestQueue,
    pub queue_evts: Vec<EventFd>,
}

impl VsockTestContext<VsockUnixBackend> {
    /// A device with the Unix backend listening at `<dir>/vsock.sock`.
    pub fn new_unix(dir: &Path) -> (Self, PathBuf) {
        let path = dir.join("vsock.sock");
        let device = Vsock::new(GUEST_CID, &path).unwrap();
        (Self::with_device(device), path)
    }
}

impl VsockTestContext<TestBackend> {
    pub fn new_test() -> Self {
        Self::with_device(Vsock::with_backend(GUEST_CID, TestBackend::new()).unwrap())
    }
}

impl<B: VsockBackend + 'static> VsockTestContext<B> {
    pub fn with_device(device: Vsock<B>) -> Self {
        let mem = test_memory();
        let device = Arc::new(Mutex::new(device));
        let mut em = TestEventManager::new().unwrap();
        em.add_subscriber(device.clone());
        let rxq = GuestQueue::new(&mem, RXQ_BASE, QUEUE_SIZE);
        let txq = GuestQueue::new(&mem, TXQ_BASE, QUEUE_SIZE);
        let evq = GuestQueue::new(&mem, EVQ_BASE, QUEUE_SIZE);
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let queue_evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        device
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                irq.clone(),
                vec![rxq.create_queue(), txq.create_queue(), evq.create_queue()],
                queue_evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            )
            .unwrap();
        let mut ctx = Self {
            mem,
            device,
            em,
            irq,
            rxq,
            txq,
            evq,
            queue_evts,
        };
        ctx.pump();
        ctx
    }

    /// Resets the device as the transport does when the driver writes 0 to the status.
    pub fn reset(&mut self) {
        assert!(self.device.lock().unwrap().reset());
        self.pump();
    }

    /// Activates the device again on fresh queues, as a driver does after a reset.
    pub fn reactivate(&mut self) {
        self.rxq = GuestQueue::new(&self.mem, RXQ_BASE, QUEUE_SIZE);
        self.txq = GuestQueue::new(&self.mem, TXQ_BASE, QUEUE_SIZE);
        self.evq = GuestQueue::new(&self.mem, EVQ_BASE, QUEUE_SIZE);
        self.device
            .lock()
            .unwrap()
            .activate(
                self.mem.clone(),
                self.irq.clone(),
                vec![
                    self.rxq.create_queue(),
                    self.txq.create_queue(),
                    self.evq.create_queue(),
                ],
                self.queue_evts
                    .iter()
                    .map(|e| e.try_clone().unwrap())
                    .collect(),
            )
            .unwrap();
        self.pump();
    }

    /// Runs the device's event loop until it is idle.
    pub fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
        panic!("the device never went idle");
    }

    /// Runs the device's event loop until `done` holds; panics after `timeout`.
    pub fn pump_until(&mut self, timeout: std::time::Duration, done: impl Fn(&Self) -> bool) {
        let start = std::time::Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < timeout,
                "condition not met in {timeout:?}"
            );
            self.em.run_with_timeout(50).unwrap();
        }
    }

    /// Queues one packet on the tx queue (header and payload in two descriptors) and
    /// notifies the device.
    pub fn guest_send(&mut self, mut hdr: VsockHeader, data: &[u8]) {
        hdr.len = data.len() as u32;
        let slot = TX_BUF_BASE + u64::from(self.txq.next_desc()) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(slot + 0x100))
            .unwrap();
        if data.is_empty() {
            self.txq
                .add_chain(&[(slot, VSOCK_PKT_HDR_SIZE as u32, false)]);
        } else {
            self.txq.add_chain(&[
                (slot, VSOCK_PKT_HDR_SIZE as u32, false),
                (slot + 0x100, data.len() as u32, false),
            ]);
        }
        self.notify(super::TXQ_INDEX);
    }

    /// A guest RW packet on connection (guest port `src_port`, host port `dst_port`).
    pub fn guest_send_data(&mut self, src_port: u32, dst_port: u32, data: &[u8]) {
        self.guest_send(guest_hdr(VSOCK_OP_RW, src_port, dst_port), data);
    }

    pub fn notify(&mut self, queue: usize) {
        self.queue_evts[queue].write(1).unwrap();
        self.pump();
    }

    /// Gives the device `n` rx buffers and notifies it.
    pub fn add_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_BUF_BASE + u64::from(self.rxq.next_desc()) * RX_SLOT;
            self.rxq.add_chain(&[(addr, RX_BUF_SIZE, true)]);
        }
        self.notify(super::RXQ_INDEX);
    }

    /// The packets the device wrote into rx buffers since the last call.
    pub fn take_rx(&mut self) -> Vec<VsockPacket> {
        let mut out = Vec::new();
        for (id, len) in self.rxq.take_used() {
            let addr = RX_BUF_BASE + u64::from(id) * RX_SLOT;
            let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(len as usize, VSOCK_PKT_HDR_SIZE + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + VSOCK_PKT_HDR_SIZE as u64))
                .unwrap();
            out.push(VsockPacket { hdr, data });
        }
        out
    }

    /// Pumps, gives rx buffers and collects packets until the device has nothing more.
    pub fn drain_rx(&mut self) -> Vec<VsockPacket> {
        let mut out = Vec::new();
        loop {
            self.add_rx_buffers(8);
            let got = self.take_rx();
            if got.is_empty() {
                return out;
            }
            out.extend(got);
        }
    }
}
