//! x86_64 boot: guest layout, kernel and initramfs loading, boot structures, CPUID and the
//! initial vCPU registers.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod pvh;
pub mod regs;
pub mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemory, ReadVolatile};

use self::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, %ebx = `hvm_start_info`.
    Pvh,
    /// 64-bit Linux boot protocol: long mode, identity-mapped, %rsi = zero page.
    LinuxBoot,
}

/// Where the kernel was loaded and how to enter it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// Guest-physical entry address.
    pub entry: u64,
    /// End (exclusive) of the loaded kernel image.
    pub kernel_end: u64,
}

/// Where the initramfs sits in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitramfsPlacement {
    /// Guest-physical start (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One entry of the guest memory map (E820 / PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// E820 type.
    pub kind: u32,
}

/// Errors of kernel and initramfs loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Opening or reading the kernel image failed.
    #[error("cannot read kernel {path}")]
    KernelIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// linux-loader rejected the image or could not place it.
    #[error("cannot load kernel {path}")]
    Kernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Opening or reading the initramfs failed.
    #[error("cannot read initramfs {path}")]
    InitramfsIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitramfsTooLarge { path: String, size: u64 },
}

/// The guest memory map: base memory below the EBDA, then high memory around the MMIO gap.
/// The first MiB above the EBDA (MP table, legacy video/ROM holes) is left out.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let ram = |addr, end: u64| MemoryMapEntry {
        addr,
        size: end - addr,
        kind: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA_START.min(mem_size))];
    if mem_size > HIMEM_START {
        map.push(ram(HIMEM_START, mem_size.min(MMIO_GAP_START)));
    }
    if mem_size > MMIO_GAP_START {
        map.push(ram(
            MMIO_GAP_END,
            MMIO_GAP_END + (mem_size - MMIO_GAP_START),
        ));
    }
    map
}

/// Loads an ELF vmlinux at its physical addresses and picks the entry protocol: PVH when the
/// kernel has the PVH note, else the 64-bit boot protocol at the ELF entry point.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<KernelEntry, LoadError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| LoadError::KernelIo {
        path: display.clone(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            LoadError::Kernel {
                path: display,
                source,
            }
        })?;
    let (protocol, entry) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (BootProtocol::Pvh, addr.0),
        _ => (BootProtocol::LinuxBoot, result.kernel_load.0),
    };
    Ok(KernelEntry {
        protocol,
        entry,
        kernel_end: result.kernel_end,
    })
}

/// Loads the initramfs page aligned at the top of low RAM, above `kernel_end`.
pub fn load_initramfs<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<InitramfsPlacement, LoadError> {
    let display = path.display().to_string();
    let io_err = |source| LoadError::InitramfsIo {
        path: display.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    let addr = layout::initramfs_start(mem_size, size, kernel_end).ok_or_else(|| {
        LoadError::InitramfsTooLarge {
            path: display.clone(),
            size,
        }
    })?;
    read_into_guest(mem, GuestAddress(addr), &mut file, size as usize).map_err(io_err)?;
    Ok(InitramfsPlacement { addr, size })
}

/// Reads `len` bytes of `src` straight into guest memory (no intermediate buffer).
fn read_into_guest<M: GuestMemory, R: Read + ReadVolatile>(
    mem: &M,
    addr: GuestAddress,
    src: &mut R,
    len: usize,
) -> std::io::Result<()> {
    mem.read_exact_volatile_from(addr, src, len)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn memory_map_for_small_guest() {
        let map = memory_map(128 << 20);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: HIMEM_START,
                    size: (128 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn memory_map_for_large_guest_skips_the_gap() {
        let map = memory_map(4 << 30);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(
            (map[2].addr, map[2].size),
            (1 << 32, (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn initramfs_is_copied_page_aligned_at_top_of_ram() {
        let mem_size = 16u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("mmap");
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&[0xab; 5000]).expect("write");
        let placed = load_initramfs(&mem, mem_size, 0x20_0000, file.path()).expect("load");
        assert_eq!(
            placed,
            InitramfsPlacement {
                addr: mem_size - 0x2000,
                size: 5000
            }
        );
        let mut back = [0u8; 5000];
        mem.read_slice(&mut back, GuestAddress(placed.addr))
            .expect("read");
        assert!(back.iter().all(|b| *b == 0xab));
    }

    #[test]
    fn initramfs_that_does_not_fit_is_rejected() {
        let mem_size = 1u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("mmap");
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&[0; 0x2000]).expect("write");
        let err =
            load_initramfs(&mem, mem_size, mem_size - 0x1000, file.path()).expect_err("must fail");
        assert!(matches!(
            err,
            LoadError::InitramfsTooLarge { size: 0x2000, .. }
        ));
    }

    #[test]
    fn non_elf_kernel_is_rejected_by_the_loader() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&[0u8; 256]).expect("write");
        let err = load_kernel(&mem, file.path()).expect_err("must fail");
        assert!(matches!(err, LoadError::Kernel { .. }));
    }
}
