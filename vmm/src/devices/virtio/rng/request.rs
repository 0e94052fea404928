//! Serving one entropy request: checking the guest's descriptor chain and filling its
//! buffers. Kept apart from the device so it can be fuzzed.

use vm_memory::{Bytes, GuestMemory};

use super::{RngError, MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES};

/// Fills the device-writable buffers of one request with random bytes, at most
/// [`MAX_REQUEST_BYTES`] in all; returns how many bytes were written.
pub fn fill_request<M, I>(mem: &M, descriptors: I) -> Result<u32, RngError>
where
    M: GuestMemory,
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut written = 0usize;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(RngError::ChainTooLong);
        }
        if !desc.is_write_only() {
            return Err(RngError::ReadOnlyDescriptor);
        }
        let room = MAX_REQUEST_BYTES - written;
        let len = (desc.len() as usize).min(room);
        if len == 0 {
            continue;
        }
        let chunk = &mut buf[..len];
        getrandom(chunk)?;
        mem.write_slice(chunk, desc.addr())
            .map_err(RngError::GuestMemory)?;
        written += len;
    }
    // MAX_REQUEST_BYTES fits in u32.
    Ok(u32::try_from(written).unwrap_or(u32::MAX))
}

/// Fills `buf` from the kernel's random pool.
fn getrandom(buf: &mut [u8]) -> Result<(), RngError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(err));
        }
        filled += ret as usize;
    }
    Ok(())
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use virtio_queue::desc::split::Descriptor;

    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    #[test]
    fn too_many_descriptors_are_refused() {
        let descs = (0..=MAX_CHAIN_DESCRIPTORS as u16)
            .map(|i| Descriptor::new(0x1000, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, i + 1));
        assert!(matches!(
            fill_request(&test_memory(), descs),
            Err(RngError::ChainTooLong)
        ));
    }

    #[test]
    fn empty_buffers_give_no_bytes() {
        let descs = [Descriptor::new(0x1000, 0, VRING_DESC_F_WRITE, 0)];
        assert_eq!(fill_request(&test_memory(), descs).unwrap(), 0);
    }
}
