//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (vm-memory's `MmapRegion::new`
//! passes exactly these flags), split around the 32-bit MMIO gap. Untouched guest pages cost
//! the host nothing. The kernel's segments (read-only at boot, mostly) can be
//! mapped over parts of it from their files, privately: see [`map_file_private`].
//!
//! Guest RAM is marked `MADV_NOHUGEPAGE`. On a host whose transparent huge pages are "always"
//! (Debian's default, and the test rig's), the first guest touch in any 2 MiB block would
//! otherwise back the whole block: a booting guest touches a few pages here and there all over
//! low memory and gets whole huge pages for them (measured in the rig: 8 huge pages, 16 MiB of
//! the 24-26 MiB a fresh guest held at its agent's handshake). The mappings are not 2 MiB
//! aligned in guest-physical terms either, so KVM could not map them as huge pages into the
//! guest anyway: the guest paid the host's 2 MiB zeroing and got 4 KiB mappings.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion as _};

use crate::arch::layout;

/// The guest memory type used everywhere in the VMM.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Errors of [`create_guest_memory`].
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping the guest RAM failed.
    #[error("failed to map {mem_size_mib} MiB of guest memory")]
    Map {
        mem_size_mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The range to map from a file is not page aligned or not inside one guest RAM region.
    #[error("cannot map {len:#x} bytes at guest address {addr:#x}: not page aligned or not in guest RAM")]
    BadFileRange { addr: u64, len: u64 },
    /// mmap of the file failed.
    #[error("failed to map a file over guest memory")]
    MapFile(#[source] std::io::Error),
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// Maps `len` bytes of `file` at `file_offset` over the guest memory at `addr`, private and
/// copy-on-write: the guest reads the file's page-cache pages (shared by every VM that maps the
/// same file) until it writes a page, which then becomes a private copy. `addr`, `len` and
/// `file_offset` must be page aligned and the range inside one region. Call it before the guest
/// runs. The file must not be truncated while the VM runs (a read of a page past the new end
/// would fail the vCPU with EFAULT); in-place changes to not-yet-copied pages would show
/// through, so images should be replaced by rename, as builds do.
pub fn map_file_private(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: u64,
    file: &File,
    file_offset: u64,
) -> Result<(), MemoryError> {
    let bad = || MemoryError::BadFileRange { addr: addr.0, len };
    let mask = page_size() - 1;
    if len == 0 || (addr.0 | len | file_offset) & mask != 0 {
        return Err(bad());
    }
    let region = mem.find_region(addr).ok_or_else(bad)?;
    let offset_in_region = addr.0 - region.start_addr().0;
    if offset_in_region
        .checked_add(len)
        .is_none_or(|end| end > region.len())
    {
        return Err(bad());
    }
    let host = mem.get_host_address(addr).map_err(|_| bad())?;
    let len = usize::try_from(len).map_err(|_| bad())?;
    let file_offset = libc::off_t::try_from(file_offset).map_err(|_| bad())?;
    // SAFETY: [host, host + len) lies inside the guest memory region's own mapping (checked
    // above), which `mem` owns and keeps for its lifetime; MAP_FIXED replaces those pages with
    // file pages of the same size and protection, so the region stays fully mapped and its
    // later munmap covers them. No Rust reference into guest memory exists (guest memory is only
    // reached through volatile accesses), and the guest is not running yet.
    let ret = unsafe {
        libc::mmap(
            host.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(MemoryError::MapFile(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The host address ranges `(start, end)` of the guest memory regions.
pub fn host_ranges(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|region| {
            let host = mem.get_host_address(region.start_addr()).ok()? as u64;
            Some((host, host + region.len()))
        })
        .collect()
}

/// Maps `mem_size_mib` MiB of guest RAM at the guest-physical ranges of [`layout::ram_ranges`].
pub fn create_guest_memory(mem_size_mib: u32) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(u64::from(mem_size_mib) << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mem_size_mib,
        source,
    })?;
    for (start, end) in host_ranges(&mem) {
        let len = usize::try_from(end - start).unwrap_or(0);
        // SAFETY: madvise on a range of mappings `mem` owns; MADV_NOHUGEPAGE only changes how
        // future faults are backed, never the contents.
        let ret = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
        if ret != 0 {
            // Not fatal: a kernel without THP support rejects it, and there it changes nothing.
            tracing::debug!(
                "madvise(MADV_NOHUGEPAGE) on guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryRegion;

    #[test]
    fn small_guest_has_one_region_from_zero() {
        let mem = create_guest_memory(64).expect("map");
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }

    #[test]
    fn guest_memory_is_never_backed_by_huge_pages() {
        let mem = create_guest_memory(64).expect("map");
        let (start, _) = host_ranges(&mem)[0];
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let header = format!("{start:x}-");
        // Each smaps entry starts with the mapping's line and ends with its VmFlags line.
        let flags = smaps
            .lines()
            .skip_while(|line| !line.starts_with(&header))
            .find(|line| line.starts_with("VmFlags:"))
            .expect("the guest memory mapping and its VmFlags");
        assert!(flags.split_whitespace().any(|f| f == "nh"), "{flags}");
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let mem = create_guest_memory(4096).expect("map");
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            vec![
                (0, layout::MMIO_GAP_START),
                (1 << 32, (4096u64 << 20) - layout::MMIO_GAP_START)
            ]
        );
        assert!(!mem.address_in_range(GuestAddress(layout::VIRTIO_MMIO_BASE)));
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn file_of(pages: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        for b in pages {
            file.write_all(&[*b; 4096]).expect("write");
        }
        file
    }

    #[test]
    fn mapped_file_pages_read_through_and_writes_stay_private() {
        let mem = create_guest_memory(2).expect("map");
        let file = file_of(&[1, 2, 3]);
        map_file_private(&mem, GuestAddress(0x1000), 0x2000, file.as_file(), 0x1000)
            .expect("map file");
        let read = |addr| mem.read_obj::<u8>(GuestAddress(addr)).expect("read");
        assert_eq!(
            [read(0xfff), read(0x1000), read(0x2fff), read(0x3000)],
            [0, 2, 3, 0]
        );
        mem.write_obj(9u8, GuestAddress(0x1000)).expect("write");
        assert_eq!(read(0x1000), 9);
        let mut back = [0u8; 1];
        file.as_file()
            .read_exact_at(&mut back, 0x1000)
            .expect("read file");
        assert_eq!(back, [2], "the file is not written");
    }

    #[test]
    fn unaligned_or_out_of_range_file_mapping_is_refused() {
        let mem = create_guest_memory(1).expect("map");
        let file = file_of(&[1, 2]);
        for (addr, len, off) in [
            (0x800, 0x1000, 0),
            (0, 0x800, 0),
            (0, 0x1000, 0x10),
            (0xff000, 0x2000, 0),
        ] {
            let err = map_file_private(&mem, GuestAddress(addr), len, file.as_file(), off)
                .expect_err("refused");
            assert!(matches!(err, MemoryError::BadFileRange { .. }), "{err}");
        }
    }

    #[test]
    fn host_ranges_cover_each_region() {
        let mem = create_guest_memory(4).expect("map");
        let ranges = host_ranges(&mem);
        assert_eq!(ranges.len(), 1);
        assert_eq!(ranges[0].1 - ranges[0].0, 4 << 20);
    }
}
