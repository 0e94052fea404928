//! Moving one frame between a descriptor chain and a buffer, with the guest's chain checked.
//! Kept apart from the device so it can be tested (and fuzzed) on its own.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory};

use super::{MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, VNET_HDR_LEN};

/// What is wrong with a chain the guest gave.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The chain has more descriptors than allowed.
    #[error("chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A transmit chain has a device-writable buffer, or a receive chain a read-only one.
    #[error("chain has a buffer of the wrong direction")]
    WrongDirection,
    /// A transmit frame is longer than [`MAX_FRAME_LEN`] or shorter than its header.
    #[error("frame of {0} bytes is out of bounds")]
    BadLength(usize),
    /// A receive chain is too small for the frame.
    #[error("receive buffers of {room} bytes cannot hold a frame of {len}")]
    TooSmall { room: usize, len: usize },
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    GuestMemory,
}

/// Gathers a transmit chain (device-readable buffers only) into `buf`; returns the frame's
/// length (header included).
pub fn gather<M, I>(mem: &M, descriptors: I, buf: &mut [u8]) -> Result<usize, FrameError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    let mut len = 0usize;
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(FrameError::ChainTooLong);
        }
        if desc.is_write_only() {
            return Err(FrameError::WrongDirection);
        }
        let n = desc.len() as usize;
        let end = len
            .checked_add(n)
            .filter(|end| *end <= MAX_FRAME_LEN.min(buf.len()))
            .ok_or(FrameError::BadLength(len.saturating_add(n)))?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| FrameError::GuestMemory)?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(FrameError::BadLength(len));
    }
    Ok(len)
}

/// Scatters `frame` (header included) into a receive chain (device-writable buffers only);
/// returns the bytes written. Nothing is written unless the whole frame fits.
pub fn scatter<M, I>(mem: &M, descriptors: I, frame: &[u8]) -> Result<u32, FrameError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    let mut bufs = Vec::new();
    let mut room = 0usize;
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(FrameError::ChainTooLong);
        }
        if !desc.is_write_only() {
            return Err(FrameError::WrongDirection);
        }
        room = room.saturating_add(desc.len() as usize);
        bufs.push(desc);
        if room >= frame.len() {
            break;
        }
    }
    if room < frame.len() {
        return Err(FrameError::TooSmall {
            room,
            len: frame.len(),
        });
    }
    let mut done = 0usize;
    for desc in bufs {
        if done == frame.len() {
            break;
        }
        let n = (desc.len() as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], desc.addr())
            .map_err(|_| FrameError::GuestMemory)?;
        done += n;
    }
    // MAX_FRAME_LEN fits in u32.
    Ok(u32::try_from(done).unwrap_or(u32::MAX))
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    fn read(addr: u64, len: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_NEXT, next)
    }

    fn write(addr: u64, len: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, next)
    }

    #[test]
    fn gather_joins_buffers_in_order() {
        let mem = test_memory();
        mem.write_slice(&[1u8; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 60], GuestAddress(0x2000)).unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let n = gather(&mem, [read(0x1000, 12, 1), read(0x2000, 60, 0)], &mut buf).unwrap();
        assert_eq!(n, 72);
        assert_eq!(&buf[..12], &[1u8; 12]);
        assert_eq!(&buf[12..72], &[2u8; 60]);
    }

    #[test]
    fn gather_refuses_what_the_guest_must_not_send() {
        let mem = test_memory();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert_eq!(
            gather(&mem, [write(0x1000, 64, 0)], &mut buf),
            Err(FrameError::WrongDirection)
        );
        assert_eq!(
            gather(&mem, [read(0x1000, 4, 0)], &mut buf),
            Err(FrameError::BadLength(4))
        );
        let huge = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
        assert!(matches!(
            gather(&mem, [read(0x1000, huge, 0)], &mut buf),
            Err(FrameError::BadLength(_))
        ));
        let long = (0..=MAX_CHAIN_DESCRIPTORS as u16).map(|i| read(0x1000, 1, i + 1));
        assert_eq!(gather(&mem, long, &mut buf), Err(FrameError::ChainTooLong));
        let outside = u64::try_from(crate::devices::virtio::test_utils::TEST_MEM_SIZE).unwrap();
        assert_eq!(
            gather(&mem, [read(outside - 8, 64, 0)], &mut buf),
            Err(FrameError::GuestMemory)
        );
    }

    #[test]
    fn scatter_fills_buffers_and_needs_room_for_the_whole_frame() {
        let mem = test_memory();
        let frame: Vec<u8> = (0..100u8).collect();
        let n = scatter(&mem, [write(0x1000, 40, 1), write(0x2000, 100, 0)], &frame).unwrap();
        assert_eq!(n, 100);
        let mut got = [0u8; 60];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got[..], &frame[40..]);
        assert_eq!(
            scatter(&mem, [write(0x3000, 50, 0)], &frame),
            Err(FrameError::TooSmall { room: 50, len: 100 })
        );
        assert_eq!(
            scatter(&mem, [read(0x3000, 200, 0)], &frame),
            Err(FrameError::WrongDirection)
        );
    }
}
