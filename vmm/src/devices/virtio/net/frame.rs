//! One frame's buffers: a descriptor chain checked against the rules and turned into the host
//! addresses of the guest memory it names, which the backend reads a frame into or writes one
//! from (`readv` / `writev` on the TAP): frames never pass through a buffer of the VMM's.
//! Kept apart from the device so it can be tested (and fuzzed) on its own.
//!
//! Why the host may hand guest memory straight to the kernel: every run of a chain is checked
//! to lie inside a region of guest memory, which stays mapped while the device is active (the
//! device thread, the only user, drops the iovecs before the memory could change). The guest
//! may change a transmitted frame while the kernel copies it, as it may at any other moment:
//! the TAP copies the `virtio_net_hdr` once into its own memory and checks that copy, so a
//! racing guest garbles only its own frame.

use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemory;

use super::{MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, VNET_HDR_LEN};

/// What is wrong with a chain the guest gave.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The chain has more descriptors than allowed.
    #[error("chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A buffer the device may only read is writable, or the reverse.
    #[error("chain has a buffer of the wrong direction")]
    WrongDirection,
    /// A transmitted frame is shorter than its header or longer than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is out of bounds")]
    BadLength(usize),
    /// Receive buffers too small for even a header.
    #[error("receive buffers of {room} bytes cannot hold a frame of {len}")]
    TooSmall { room: usize, len: usize },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    GuestMemory,
}

/// A frame's buffers in guest memory, as host iovecs. Only [`FrameBufs::readable`] and
/// [`FrameBufs::writable`] fill it, after checking the chain, so every entry lies inside
/// guest memory; it is cleared before the next chain. At most [`MAX_FRAME_LEN`] bytes in all.
#[derive(Debug, Default)]
pub struct FrameBufs {
    iov: Vec<libc::iovec>,
    len: usize,
}

// SAFETY: the iovecs point into guest memory, which is mapped for the device's whole life and
// shared with the vCPUs by design; the device moves between threads only while inactive.
unsafe impl Send for FrameBufs {}

impl FrameBufs {
    /// Empty buffers, with room for a full chain's entries.
    pub fn new() -> Self {
        Self {
            iov: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS * 2),
            len: 0,
        }
    }

    /// The host iovecs, in order (for `readv` / `writev`).
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
    }

    /// Adds `count` bytes of guest memory at `desc`'s address (split where guest memory's
    /// regions meet).
    fn push<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: vm_memory::GuestAddress,
        count: usize,
    ) -> Result<(), FrameError> {
        for slice in mem.get_slices(addr, count) {
            let slice = slice.map_err(|_| FrameError::GuestMemory)?;
            self.iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        self.len += count;
        Ok(())
    }

    /// The transmit chain `descriptors` as one frame: device-readable buffers only, at most
    /// [`MAX_CHAIN_DESCRIPTORS`] of them, a header and at most [`MAX_FRAME_LEN`] bytes.
    pub fn readable<M, I>(&mut self, mem: &M, descriptors: I) -> Result<(), FrameError>
    where
        M: GuestMemory,
        I: IntoIterator<Item = Descriptor>,
    {
        self.clear();
        for (count, desc) in descriptors.into_iter().enumerate() {
            if count >= MAX_CHAIN_DESCRIPTORS {
                return Err(FrameError::ChainTooLong);
            }
            if desc.is_write_only() {
                return Err(FrameError::WrongDirection);
            }
            let n = desc.len() as usize;
            if self.len + n > MAX_FRAME_LEN {
                return Err(FrameError::BadLength(self.len + n));
            }
            self.push(mem, desc.addr(), n)?;
        }
        if self.len < VNET_HDR_LEN {
            return Err(FrameError::BadLength(self.len));
        }
        Ok(())
    }

    /// The receive chain `descriptors` as room for one frame: device-writable buffers only, at
    /// most [`MAX_CHAIN_DESCRIPTORS`] of them, taken up to [`MAX_FRAME_LEN`] bytes (the rest
    /// of a bigger chain stays unused), and room for a header at least.
    pub fn writable<M, I>(&mut self, mem: &M, descriptors: I) -> Result<(), FrameError>
    where
        M: GuestMemory,
        I: IntoIterator<Item = Descriptor>,
    {
        self.clear();
        for (count, desc) in descriptors.into_iter().enumerate() {
            if count >= MAX_CHAIN_DESCRIPTORS {
                return Err(FrameError::ChainTooLong);
            }
            if !desc.is_write_only() {
                return Err(FrameError::WrongDirection);
            }
            let n = (desc.len() as usize).min(MAX_FRAME_LEN - self.len);
            self.push(mem, desc.addr(), n)?;
            if self.len == MAX_FRAME_LEN {
                break;
            }
        }
        if self.len < VNET_HDR_LEN {
            return Err(FrameError::TooSmall {
                room: self.len,
                len: VNET_HDR_LEN,
            });
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` of the buffers (the receive header's `num_buffers`;
    /// tests and fuzzing fill frames with it); returns how many bytes fit.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for iov in &self.iov {
            if done == data.len() {
                break;
            }
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            let n = (iov.iov_len - skip).min(data.len() - done);
            // SAFETY: the iovec lies inside mapped guest memory (see the type), `skip + n` is
            // within it, and `data[done..done + n]` is a valid source; guest memory never
            // overlaps the VMM's own.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data[done..].as_ptr(),
                    iov.iov_base.cast::<u8>().add(skip),
                    n,
                );
            }
            done += n;
            skip = 0;
        }
        done
    }

    /// The bytes of the buffers (tests and fuzzing).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for iov in &self.iov {
            // SAFETY: as in `write_at`: the iovec lies inside mapped guest memory.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn read(addr: u64, len: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_NEXT, next)
    }

    fn write(addr: u64, len: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next)
    }

    #[test]
    fn a_transmit_chain_is_its_buffers_in_order() {
        let mem = test_memory();
        mem.write_slice(&[1u8; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 60], GuestAddress(0x2000)).unwrap();
        let mut bufs = FrameBufs::new();
        bufs.readable(&mem, [read(0x1000, 12, 1), read(0x2000, 60, 0)])
            .unwrap();
        assert_eq!(bufs.len(), 72);
        assert_eq!(bufs.iovecs().len(), 2);
        let got = bufs.to_vec();
        assert_eq!(&got[..12], &[1u8; 12]);
        assert_eq!(&got[12..72], &[2u8; 60]);
    }

    #[test]
    fn a_transmit_chain_is_refused_when_the_guest_breaks_a_rule() {
        let mem = test_memory();
        let mut bufs = FrameBufs::new();
        assert_eq!(
            bufs.readable(&mem, [write(0x1000, 64, 0)]),
            Err(FrameError::WrongDirection)
        );
        assert_eq!(
            bufs.readable(&mem, [read(0x1000, 4, 0)]),
            Err(FrameError::BadLength(4))
        );
        let huge = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
        assert!(matches!(
            bufs.readable(&mem, [read(0x1000, huge, 0)]),
            Err(FrameError::BadLength(_))
        ));
        // Many small buffers adding up to too much.
        let many = (0..40u16).map(|i| read(0x1000, 2000, i + 1));
        assert!(matches!(
            bufs.readable(&mem, many),
            Err(FrameError::BadLength(_))
        ));
        let long = (0..=MAX_CHAIN_DESCRIPTORS as u16).map(|i| read(0x1000, 1, i + 1));
        assert_eq!(bufs.readable(&mem, long), Err(FrameError::ChainTooLong));
        let outside = u64::try_from(crate::devices::virtio::test_utils::TEST_MEM_SIZE).unwrap();
        assert_eq!(
            bufs.readable(&mem, [read(outside - 8, 64, 0)]),
            Err(FrameError::GuestMemory)
        );
        assert_eq!(
            bufs.readable(&mem, [read(outside + 0x1000, 64, 0)]),
            Err(FrameError::GuestMemory)
        );
    }

    #[test]
    fn a_receive_chain_is_room_up_to_the_largest_frame() {
        let mem = test_memory();
        let mut bufs = FrameBufs::new();
        bufs.writable(&mem, [write(0x1000, 40, 1), write(0x2000, 100, 0)])
            .unwrap();
        assert_eq!(bufs.len(), 140);
        let frame: Vec<u8> = (0..100u8).collect();
        assert_eq!(bufs.write_at(0, &frame), 100);
        let mut got = [0u8; 60];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got[..], &frame[40..]);
        // The header's num_buffers, across the boundary of two buffers.
        bufs.writable(&mem, [write(0x3000, 11, 1), write(0x4000, 100, 0)])
            .unwrap();
        assert_eq!(bufs.write_at(10, &[0xaa, 0xbb]), 2);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x300a)).unwrap();
        assert_eq!(b, [0xaa]);
        mem.read_slice(&mut b, GuestAddress(0x4000)).unwrap();
        assert_eq!(b, [0xbb]);
        // A chain bigger than the largest frame is used up to it.
        let big = (0..3u64).map(|i| write(0x10000 + i * 0x10000, 0x10000, 1));
        bufs.writable(&mem, big).unwrap();
        assert_eq!(bufs.len(), MAX_FRAME_LEN);
        assert_eq!(
            bufs.writable(&mem, [write(0x3000, 8, 0)]),
            Err(FrameError::TooSmall { room: 8, len: 12 })
        );
        assert_eq!(
            bufs.writable(&mem, [read(0x3000, 200, 0)]),
            Err(FrameError::WrongDirection)
        );
        let long = (0..=MAX_CHAIN_DESCRIPTORS as u16).map(|i| write(0x1000, 1, i + 1));
        assert_eq!(bufs.writable(&mem, long), Err(FrameError::ChainTooLong));
    }

    /// A buffer across the boundary of two regions of guest memory is two iovecs.
    #[test]
    fn a_buffer_across_two_regions_is_split() {
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let mut bufs = FrameBufs::new();
        bufs.readable(&mem, [read(0xff00, 0x200, 0)]).unwrap();
        assert_eq!(bufs.iovecs().len(), 2);
        assert_eq!(bufs.len(), 0x200);
        // A hole between regions is outside guest memory.
        let holed: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap();
        assert_eq!(
            bufs.readable(&holed, [read(0xff00, 0x200, 0)]),
            Err(FrameError::GuestMemory)
        );
    }
}
