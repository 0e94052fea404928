//! The zero page (`boot_params`) of the 64-bit Linux boot protocol, used when the kernel has no
//! PVH note: setup header fields a boot loader must fill, the command line, the initramfs and
//! the E820 map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{GuestAddress, GuestMemory};

use super::layout::{CMDLINE_START, ZERO_PAGE_START};
use super::{memory_map, InitramfsPlacement};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Errors of [`setup_zero_page`].
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// The E820 map has more entries than `boot_params` holds.
    #[error("the E820 map has {0} entries, more than boot_params holds")]
    E820TooLarge(usize),
    /// linux-loader failed to write the zero page.
    #[error("failed to write the zero page")]
    Write(#[source] linux_loader::configurator::Error),
}

/// Builds the `boot_params` for a guest with `mem_size` bytes and a command line of
/// `cmdline_size` bytes (without the NUL).
pub fn build_boot_params(
    mem_size: u64,
    cmdline_size: u32,
    initramfs: Option<InitramfsPlacement>,
) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.addr as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
    }
    let map = memory_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(ZeroPageError::E820TooLarge(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn setup_zero_page<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    cmdline_size: u32,
    initramfs: Option<InitramfsPlacement>,
) -> Result<(), ZeroPageError> {
    let params = build_boot_params(mem_size, cmdline_size, initramfs)?;
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(ZeroPageError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
    use crate::arch::x86_64::E820_RAM;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn zero_page_carries_header_cmdline_initramfs_and_e820() {
        let mem_size = 32u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("mmap");
        let initramfs = InitramfsPlacement {
            addr: 0x1f0_0000,
            size: 0x8000,
        };
        setup_zero_page(&mem, mem_size, 42, Some(initramfs)).expect("setup");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x1f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x8000);
        assert_eq!(params.e820_entries, 2);
        let e820 = params.e820_table;
        assert_eq!(
            ({ e820[0].addr }, { e820[0].size }, { e820[0].type_ }),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(
            ({ e820[1].addr }, { e820[1].size }, { e820[1].type_ }),
            (HIMEM_START, mem_size - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn e820_skips_the_mmio_gap_for_large_guests() {
        let mem_size = 5u64 << 30;
        let params = build_boot_params(mem_size, 0, None).expect("build");
        assert_eq!(params.e820_entries, 3);
        let e820 = params.e820_table;
        assert_eq!(
            ({ e820[1].addr }, { e820[1].size }),
            (HIMEM_START, MMIO_GAP_START - HIMEM_START)
        );
        assert_eq!(
            ({ e820[2].addr }, { e820[2].size }),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START)
        );
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }
}
