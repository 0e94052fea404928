//! Test helpers shared by the virtio devices: plain guest memory, a dummy device and a minimal
//! guest-side split-queue driver that writes descriptor tables and rings into guest memory the
//! way the Linux driver does.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, IrqTrigger, VirtioDevice};

/// Size of the guest memory of unit tests.
pub const TEST_MEM_SIZE: usize = 0x100_0000;

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;

/// 16 MiB of guest memory at address 0.
pub fn test_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).unwrap()
}

/// A device that records what the transport tells it.
pub struct DummyDevice {
    state: super::VirtioDeviceState,
    queue_sizes: Vec<u16>,
    acked: u64,
    pub activated_queues: Option<Vec<Queue>>,
}

impl DummyDevice {
    pub fn new(queue_sizes: Vec<u16>) -> Self {
        Self {
            state: super::VirtioDeviceState::new("dummy").unwrap(),
            queue_sizes,
            acked: 0,
            activated_queues: None,
        }
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        0x42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn state(&self) -> &super::VirtioDeviceState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut super::VirtioDeviceState {
        &mut self.state
    }
    fn avail_features(&self) -> u64 {
        (1 << 32) | 0b101
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = [1u8, 2, 3, 4, 5, 6, 7, 8];
        for (i, byte) in data.iter_mut().enumerate() {
            if let Some(v) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o))
            {
                *byte = *v;
            }
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap<()>,
        _interrupt: Arc<IrqTrigger>,
        queues: Vec<Queue>,
        _queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.activated_queues = Some(queues);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        !self.is_activated()
    }
    fn is_activated(&self) -> bool {
        self.activated_queues.is_some()
    }
}

/// One raw descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The driver side of one split virtqueue in guest memory: descriptor table at `base`, avail
/// ring at `base + 0x1000`, used ring at `base + 0x2000` (sizes up to 256).
pub struct GuestQueue {
    mem: GuestMemoryMmap<()>,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    pub fn new(mem: &GuestMemoryMmap<()>, base: u64, size: u16) -> Self {
        assert!(size <= 256 && size.is_power_of_two());
        let q = Self {
            mem: mem.clone(),
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        q
    }

    /// The descriptor index the next [`Self::add_chain`] starts at.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    pub fn desc_addr(&self) -> u64 {
        self.base
    }
    pub fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }
    pub fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device-side queue, set up as the driver would through the transport.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc_addr()))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_addr()))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    pub fn write_desc(&self, index: u16, desc: RawDesc) {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&desc.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&desc.next.to_le_bytes());
        self.mem
            .write_slice(&bytes, GuestAddress(self.base + 16 * u64::from(index)))
            .unwrap();
    }

    /// Publishes the chain starting at descriptor `head` in the avail ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Writes a well-formed chain of buffers `(addr, len, device_writable)` into free
    /// descriptor slots and publishes it; returns the head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = (index + 1) % self.size;
            self.write_desc(
                index,
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Writes the avail ring's flags (`VRING_AVAIL_F_NO_INTERRUPT` is 1).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags, GuestAddress(self.avail_addr()))
            .unwrap();
    }

    /// Writes the avail ring's `used_event` (with `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_used_event(&self, index: u16) {
        let addr = self.avail_addr() + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(index, GuestAddress(addr)).unwrap();
    }

    /// The used ring's `avail_event`, as the device last wrote it.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr() + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Used elements `(id, len)` the device added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(self.used_addr() + 2))
            .unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let addr = self.used_addr() + 4 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
