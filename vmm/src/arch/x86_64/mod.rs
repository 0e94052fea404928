//! x86_64 boot: guest layout, kernel and initramfs loading, boot structures, CPUID and the
//! initial vCPU registers.

pub mod cpuid;
pub mod elf;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod pvh;
pub mod regs;
pub mod zero_page;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use self::elf::{ElfError, Piece};
use self::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
use crate::vstate::memory::{self, GuestMemory};

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
    /// Start of the loaded kernel image (its lowest segment).
    pub kernel_start: u64,
    /// End (exclusive) of the loaded kernel image.
    pub kernel_end: u64,
    /// Start of the image's writable part (data, per-CPU data, init code and data, bss; in a
    /// vmlinux they follow the text and read-only data), up to `kernel_end`: what every boot
    /// writes. `kernel_end` when no segment is writable.
    pub data_start: u64,
    /// End of the last segment mapped from the file (the read-only ones): `[kernel_start,
    /// mapped_end)` holds every page of guest memory that is the file's until the guest writes
    /// it (see `snapshot::write_memory`). `kernel_start` when none is.
    pub mapped_end: u64,
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
    /// The image is not a usable ELF vmlinux.
    #[error("cannot load kernel {path}")]
    Kernel {
        path: String,
        #[source]
        source: ElfError,
    },
    /// The entry point lies below high memory, where the boot structures live.
    #[error("kernel {path}: entry point {entry:#x} lies below 1 MiB")]
    KernelEntry { path: String, entry: u64 },
    /// A segment does not fit in guest RAM or overlaps the boot structures below 1 MiB.
    #[error("kernel {path}: segment at {addr:#x} ({size:#x} bytes) does not fit in guest RAM above 1 MiB")]
    KernelSegment { path: String, addr: u64, size: u64 },
    /// Copying or mapping an image into guest memory failed.
    #[error("cannot place {path} in guest memory")]
    Place {
        path: String,
        #[source]
        source: std::io::Error,
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
/// kernel has the PVH note, else the 64-bit boot protocol at the ELF entry point. Whole pages of
/// the segments are mapped copy-on-write from the file (see [`place_file_range`]).
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<KernelEntry, LoadError> {
    let display = path.display().to_string();
    let io_err = |source| LoadError::KernelIo {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let image = elf::parse_kernel(&file, file_len).map_err(|source| LoadError::Kernel {
        path: display.clone(),
        source,
    })?;
    if image.entry < HIMEM_START {
        return Err(LoadError::KernelEntry {
            path: display,
            entry: image.entry,
        });
    }
    for segment in &image.segments {
        let fits = segment.guest_addr >= HIMEM_START
            && mem.check_range(GuestAddress(segment.guest_addr), segment.mem_size as usize);
        if !fits {
            return Err(LoadError::KernelSegment {
                path: display,
                addr: segment.guest_addr,
                size: segment.mem_size,
            });
        }
    }
    for segment in &image.segments {
        // The bss past `file_size` stays as it is: fresh guest memory reads as zeros. The
        // writable segments are copied, not mapped: the kernel writes them as it boots, and a
        // write to a copy-on-write page costs the guest a second fault (see
        // [`load_initramfs`]).
        let placed = if segment.writable {
            copy_file_range(
                mem,
                &file,
                segment.file_offset,
                segment.guest_addr,
                segment.file_size,
            )
        } else {
            place_file_range(
                mem,
                &file,
                segment.file_offset,
                segment.guest_addr,
                segment.file_size,
            )
        };
        placed.map_err(|source| LoadError::Place {
            path: display.clone(),
            source,
        })?;
    }
    let (protocol, entry) = match image.pvh_entry {
        Some(addr) => (BootProtocol::Pvh, addr),
        None => (BootProtocol::LinuxBoot, image.entry),
    };
    let kernel_end = image.end();
    let kernel_start = image
        .segments
        .iter()
        .map(|segment| segment.guest_addr)
        .min()
        .unwrap_or(kernel_end);
    Ok(KernelEntry {
        protocol,
        entry,
        kernel_start,
        kernel_end,
        data_start: image.writable_start().unwrap_or(kernel_end),
        mapped_end: image
            .segments
            .iter()
            .filter(|s| !s.writable)
            .map(|s| s.guest_addr.saturating_add(s.file_size))
            .max()
            .unwrap_or(kernel_start),
    })
}

/// Loads the initramfs page aligned at the top of low RAM, above `kernel_end`, copied into
/// guest memory.
///
/// Copied, not mapped from the file like the kernel's segments: the guest writes every page of
/// it once it has unpacked it (the kernel poisons the initrd's pages as it frees them), so a
/// file mapping saves no memory, and it costs the guest time: each page is first mapped into
/// the guest read-only, then the poisoning write breaks the copy-on-write, which makes KVM zap
/// the mapping, flush TLBs and fault again. Measured in the rig (KVM's statistics at the
/// agent's first line, `husk-bench boot-trace`): per boot, VM exits 9,487 -> 8,029, NPT faults
/// 7,828 -> 6,396, remote TLB flushes 1,448 -> 730.
pub fn load_initramfs(
    mem: &GuestMemory,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<InitramfsPlacement, LoadError> {
    let display = path.display().to_string();
    let io_err = |source| LoadError::InitramfsIo {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let addr = layout::initramfs_start(mem_size, size, kernel_end).ok_or_else(|| {
        LoadError::InitramfsTooLarge {
            path: display.clone(),
            size,
        }
    })?;
    copy_file_range(mem, &file, 0, addr, size).map_err(io_err)?;
    Ok(InitramfsPlacement { addr, size })
}

/// Puts `len` bytes of `file` from `file_offset` into guest memory at `guest_addr`: whole pages
/// are mapped privately from the file (no copy at boot, and every VM shares the page cache's
/// pages until it writes one), partial pages are copied. Ranges whose file offset and guest
/// address are not congruent modulo the page size, or that the kernel refuses to map, are
/// copied.
pub fn place_file_range(
    mem: &GuestMemory,
    file: &File,
    file_offset: u64,
    guest_addr: u64,
    len: u64,
) -> std::io::Result<()> {
    for piece in elf::split_for_mapping(file_offset, guest_addr, len, memory::page_size()) {
        match piece {
            Piece::Map {
                file_offset,
                guest_addr,
                len,
            } => {
                let mapped =
                    memory::map_file_private(mem, GuestAddress(guest_addr), len, file, file_offset);
                if let Err(err) = mapped {
                    tracing::debug!(%err, guest_addr, "mapping the file failed; copying instead");
                    copy_file_range(mem, file, file_offset, guest_addr, len)?;
                }
            }
            Piece::Copy {
                file_offset,
                guest_addr,
                len,
            } => copy_file_range(mem, file, file_offset, guest_addr, len)?,
        }
    }
    Ok(())
}

/// Copies `len` bytes of `file` at `file_offset` into guest memory at `guest_addr`, through a
/// bounded buffer and checked guest writes.
fn copy_file_range(
    mem: &GuestMemory,
    file: &File,
    file_offset: u64,
    guest_addr: u64,
    len: u64,
) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.read_exact_at(&mut buf[..n], file_offset + done)?;
        mem.write_slice(&buf[..n], GuestAddress(guest_addr + done))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        done += n as u64;
    }
    Ok(())
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
    fn initramfs_is_placed_page_aligned_at_top_of_ram() {
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
    fn kernel_segments_are_placed_with_zero_bss() {
        // One segment: 0x2800 file bytes at file offset 0x1000 -> 0x100_0000, 0x4000 in memory;
        // read-only (mapped from the file, the partial tail copied) or writable (copied).
        for (flags, data_start, mapped_end) in
            [(5, 0x100_4000, 0x100_2800), (6, 0x100_0000, 0x100_0000)]
        {
            let mem = memory::create_guest_memory(32).expect("mem");
            let file = elf::tests::elf_with(
                &[[1, 0x1000, 0x100_0000, 0x2800, 0x4000, flags, 0]],
                &[],
                0x1000,
            );
            let mut content: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8 + 1).collect();
            {
                use std::io::{Seek, SeekFrom};
                let mut f = file.as_file();
                f.seek(SeekFrom::Start(0x1000)).expect("seek");
                f.write_all(&content).expect("write");
            }
            let entry = load_kernel(&mem, file.path()).expect("load");
            assert_eq!(entry.protocol, BootProtocol::LinuxBoot);
            assert_eq!(entry.kernel_start, 0x100_0000);
            assert_eq!(entry.kernel_end, 0x100_4000);
            assert_eq!(entry.data_start, data_start, "flags {flags}");
            assert_eq!(entry.mapped_end, mapped_end, "flags {flags}");
            let mut back = vec![0u8; 0x4000];
            mem.read_slice(&mut back, GuestAddress(0x100_0000))
                .expect("read");
            content.truncate(0x2800);
            content.resize(0x4000, 0);
            assert_eq!(
                back, content,
                "flags {flags}: file bytes, then zeros past file_size"
            );
        }
    }

    #[test]
    fn kernel_segment_outside_guest_ram_is_rejected() {
        let mem = memory::create_guest_memory(16).expect("mem");
        let file = elf::tests::elf_with(&[[1, 0x1000, 0x100_0000, 0x10, 0x10, 0, 0]], &[], 0x2000);
        let err = load_kernel(&mem, file.path()).expect_err("must fail");
        assert!(
            matches!(
                err,
                LoadError::KernelSegment {
                    addr: 0x100_0000,
                    ..
                }
            ),
            "{err}"
        );
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
