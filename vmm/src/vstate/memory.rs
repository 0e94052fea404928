//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (vm-memory's `MmapRegion::new`
//! passes exactly these flags), split around the 32-bit MMIO gap. Untouched guest pages cost
//! the host nothing.

use vm_memory::GuestAddress;

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
}

/// Maps `mem_size_mib` MiB of guest RAM at the guest-physical ranges of [`layout::ram_ranges`].
pub fn create_guest_memory(mem_size_mib: u32) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(u64::from(mem_size_mib) << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mem_size_mib,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemory as _, GuestMemoryRegion};

    #[test]
    fn small_guest_has_one_region_from_zero() {
        let mem = create_guest_memory(64).expect("map");
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
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
