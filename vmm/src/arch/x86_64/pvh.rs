//! The PVH boot protocol: `hvm_start_info`, its module list (the initramfs) and memory map.
//!
//! The kernel's PVH entry point (found by linux-loader in the ELF note `XEN_ELFNOTE_PHYS32_ENTRY`)
//! is entered in 32-bit protected mode with paging off and %ebx holding [`PVH_INFO_START`].

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use super::{memory_map, InitramfsPlacement};

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Errors of [`setup_pvh_boot`].
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// The memory map has more entries than its slot holds.
    #[error("the PVH memory map has {0} entries, more than fit")]
    MemmapTooLarge(usize),
    /// Writing the module list failed.
    #[error("failed to write the PVH module list")]
    WriteModlist,
    /// linux-loader failed to write the start info or memory map.
    #[error("failed to write the PVH start info")]
    WriteStartInfo(#[source] linux_loader::configurator::Error),
}

/// Writes `hvm_start_info`, the memory map and the module list for a guest with `mem_size`
/// bytes of RAM.
pub fn setup_pvh_boot<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    initramfs: Option<InitramfsPlacement>,
) -> Result<(), PvhError> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::MemmapTooLarge(memmap.len()));
    }

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some(initramfs) = initramfs {
        let module = hvm_modlist_entry {
            paddr: initramfs.addr,
            size: initramfs.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| PvhError::WriteModlist)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }

    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(PvhError::WriteStartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{EBDA_START, HIMEM_START};
    use crate::arch::x86_64::E820_RAM;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn start_info_points_at_cmdline_memmap_and_initramfs() {
        let mem_size = 64u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("mmap");
        let initramfs = InitramfsPlacement {
            addr: 0x300_0000,
            size: 0x1234,
        };
        setup_pvh_boot(&mem, mem_size, Some(initramfs)).expect("setup");

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("info");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 2);

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).expect("mod");
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));

        let e0: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START)).expect("e0");
        let e1: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 24))
            .expect("e1");
        assert_eq!((e0.addr, e0.size, e0.type_), (0, EBDA_START, E820_RAM));
        assert_eq!(
            (e1.addr, e1.size, e1.type_),
            (HIMEM_START, mem_size - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn no_initramfs_means_no_modules() {
        let mem_size = 16u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("mmap");
        setup_pvh_boot(&mem, mem_size, None).expect("setup");
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("info");
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
