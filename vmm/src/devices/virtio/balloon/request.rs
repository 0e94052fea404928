//! Reading one balloon request (an inflate or deflate array of page frame numbers, or a free
//! page report) out of the guest's descriptor chain, and discarding guest pages. Kept apart
//! from the device so it can be unit-tested and fuzzed.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::{BalloonError, MAX_CHAIN_DESCRIPTORS, MAX_PFNS_PER_REQUEST, PFN_SHIFT};

/// A range of guest-physical memory: `(address, length in bytes)`.
pub type Range = (u64, u64);

/// The page frame numbers of an inflate or deflate request, as ranges of guest memory
/// (neighbouring frames merged). Every buffer must be device-readable and a whole number of
/// little-endian `u32`s; at most [`MAX_PFNS_PER_REQUEST`] frames in all.
pub fn pfn_ranges<M, I>(mem: &M, descriptors: I) -> Result<Vec<Range>, BalloonError>
where
    M: GuestMemory,
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let page = 1u64 << PFN_SHIFT;
    let mut ranges: Vec<Range> = Vec::new();
    let mut pfns = 0usize;
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(BalloonError::ChainTooLong);
        }
        if desc.is_write_only() || desc.len() % 4 != 0 {
            return Err(BalloonError::BadPfnBuffer {
                len: desc.len(),
                writable: desc.is_write_only(),
            });
        }
        let n = desc.len() as usize / 4;
        pfns = pfns.saturating_add(n);
        if pfns > MAX_PFNS_PER_REQUEST {
            return Err(BalloonError::TooManyPfns);
        }
        let mut raw = vec![0u8; desc.len() as usize];
        mem.read_slice(&mut raw, desc.addr())
            .map_err(BalloonError::GuestMemory)?;
        for bytes in raw.chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            let addr = pfn << PFN_SHIFT;
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == addr => *len += page,
                _ => ranges.push((addr, page)),
            }
        }
    }
    Ok(ranges)
}

/// The ranges of a free page report: one per buffer (Linux makes them device-writable; either
/// direction is taken), at most [`MAX_CHAIN_DESCRIPTORS`]. Empty buffers are skipped.
pub fn reported_ranges<I>(descriptors: I) -> Result<Vec<Range>, BalloonError>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut ranges = Vec::new();
    for (count, desc) in descriptors.into_iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(BalloonError::ChainTooLong);
        }
        if desc.len() > 0 {
            ranges.push((desc.addr().raw_value(), u64::from(desc.len())));
        }
    }
    Ok(ranges)
}

/// Drops the host pages behind `len` bytes of guest memory at `addr` (`MADV_DONTNEED`): they
/// read as zeros afterwards, or as the file a private file mapping maps there. The range must
/// be non-empty, host-page aligned and inside one region of guest RAM.
pub fn discard<M: GuestMemory>(mem: &M, addr: u64, len: u64) -> Result<(), BalloonError> {
    let bad = || BalloonError::BadRange { addr, len };
    let mask = crate::vstate::memory::page_size() - 1;
    if len == 0 || (addr | len) & mask != 0 {
        return Err(bad());
    }
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(bad)?;
    let offset = addr - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad());
    }
    let host = mem
        .get_host_address(GuestAddress(addr))
        .map_err(|_| bad())?;
    let len = usize::try_from(len).map_err(|_| bad())?;
    // SAFETY: [host, host + len) lies inside one guest memory region's mapping (checked above),
    // which `mem` owns for its lifetime. MADV_DONTNEED keeps the mapping and only drops its
    // pages' contents; guest memory is reached only through volatile accesses, never through
    // Rust references, so no reference sees its contents change.
    let ret = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(BalloonError::Discard(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use virtio_queue::desc::split::Descriptor;

    use super::*;
    use crate::devices::virtio::test_utils::{
        test_memory, TEST_MEM_SIZE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    fn write_pfns(mem: &vm_memory::GuestMemoryMmap<()>, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn neighbouring_pfns_become_one_range() {
        let mem = test_memory();
        let len = write_pfns(&mem, 0x1000, &[0x100, 0x101, 0x102, 0x200, 0x0ff]);
        let ranges = pfn_ranges(&mem, [Descriptor::new(0x1000, len, 0, 0)]).unwrap();
        assert_eq!(
            ranges,
            vec![(0x100_000, 0x3000), (0x200_000, 0x1000), (0xff_000, 0x1000)]
        );
    }

    #[test]
    fn malformed_pfn_buffers_are_refused() {
        let mem = test_memory();
        write_pfns(&mem, 0x1000, &[1, 2]);
        let writable = [Descriptor::new(0x1000, 8, VRING_DESC_F_WRITE, 0)];
        assert!(matches!(
            pfn_ranges(&mem, writable),
            Err(BalloonError::BadPfnBuffer { writable: true, .. })
        ));
        let ragged = [Descriptor::new(0x1000, 6, 0, 0)];
        assert!(matches!(
            pfn_ranges(&mem, ragged),
            Err(BalloonError::BadPfnBuffer { len: 6, .. })
        ));
        let outside = [Descriptor::new(TEST_MEM_SIZE as u64, 8, 0, 0)];
        assert!(matches!(
            pfn_ranges(&mem, outside),
            Err(BalloonError::GuestMemory(_))
        ));
        let huge = [Descriptor::new(
            0x1000,
            4 * (MAX_PFNS_PER_REQUEST as u32 + 1),
            0,
            0,
        )];
        assert!(matches!(
            pfn_ranges(&mem, huge),
            Err(BalloonError::TooManyPfns)
        ));
    }

    #[test]
    fn long_chains_are_refused() {
        let descs = (0..=MAX_CHAIN_DESCRIPTORS as u16).map(|i| {
            Descriptor::new(
                0x1000,
                0x1000,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                i + 1,
            )
        });
        assert!(matches!(
            reported_ranges(descs),
            Err(BalloonError::ChainTooLong)
        ));
        let readable = (0..=MAX_CHAIN_DESCRIPTORS as u16)
            .map(|i| Descriptor::new(0x1000, 4, VRING_DESC_F_NEXT, i + 1));
        assert!(matches!(
            pfn_ranges(&test_memory(), readable),
            Err(BalloonError::ChainTooLong)
        ));
    }

    #[test]
    fn a_report_is_its_buffers() {
        let descs = [
            Descriptor::new(
                0x20_0000,
                0x20_0000,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                1,
            ),
            Descriptor::new(0x60_0000, 0, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
            Descriptor::new(0x80_0000, 0x40_0000, 0, 0),
        ];
        assert_eq!(
            reported_ranges(descs).unwrap(),
            vec![(0x20_0000, 0x20_0000), (0x80_0000, 0x40_0000)]
        );
    }

    #[test]
    fn discarded_pages_read_as_zeros_and_neighbours_keep_their_bytes() {
        let mem = test_memory();
        mem.write_slice(&[0xab; 0x3000], GuestAddress(0x10_0000))
            .unwrap();
        discard(&mem, 0x10_1000, 0x1000).unwrap();
        let mut page = [0u8; 0x1000];
        for (addr, want) in [(0x10_0000, 0xab), (0x10_1000, 0), (0x10_2000, 0xab)] {
            mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
            assert!(page.iter().all(|b| *b == want), "page {addr:#x}");
        }
    }

    #[test]
    fn bad_ranges_change_nothing() {
        let mem = test_memory();
        mem.write_slice(&[0xcd; 0x2000], GuestAddress(0)).unwrap();
        let end = TEST_MEM_SIZE as u64;
        for (addr, len) in [
            (0, 0),
            (0x800, 0x1000),
            (0, 0x1800),
            (end - 0x1000, 0x2000),
            (end, 0x1000),
            (!0xfff_u64, 0x1000),
            (0x1000, !0xfff_u64),
        ] {
            assert!(
                matches!(discard(&mem, addr, len), Err(BalloonError::BadRange { .. })),
                "{addr:#x}+{len:#x}"
            );
        }
        let mut bytes = [0u8; 0x2000];
        mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        assert!(bytes.iter().all(|b| *b == 0xcd));
    }
}
