//! ELF vmlinux parsing, and the page arithmetic that lets the loader map a file's pages into
//! guest memory copy-on-write instead of copying them.
//!
//! The ELF is a host file the user chose, but every header field is still bounds checked
//! against the file's length before anything is read or mapped.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// ELF program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// ELF program header type of a note segment.
const PT_NOTE: u32 = 4;
/// `p_flags` bit of a writable segment.
const PF_W: u32 = 2;
/// Size of an ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header.
const PHDR_SIZE: usize = 56;
/// More program headers than any kernel has: a bound on what we read.
const MAX_PHDRS: u16 = 64;
/// A bound on the size of a note segment we read.
const MAX_NOTE_SIZE: u64 = 64 << 10;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note holding the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;

/// Errors of [`parse_kernel`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Reading the file failed.
    #[error("read error: {0}")]
    Read(String),
    /// Not a little-endian 64-bit x86 ELF executable.
    #[error("not a 64-bit little-endian x86_64 ELF file")]
    NotElf64,
    /// The program header table is malformed.
    #[error("bad program header table")]
    BadProgramHeaders,
    /// A segment points outside the file or its sizes overflow.
    #[error("segment {0} lies outside the file or overflows")]
    BadSegment(usize),
    /// A note segment is malformed.
    #[error("malformed note segment")]
    BadNote,
    /// No loadable segment.
    #[error("no loadable segment")]
    NoLoadSegment,
}

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// Offset of the segment's bytes in the file.
    pub file_offset: u64,
    /// Guest-physical address (`p_paddr`).
    pub guest_addr: u64,
    /// Bytes taken from the file.
    pub file_size: u64,
    /// Bytes in memory (the rest, past `file_size`, is zero: bss).
    pub mem_size: u64,
    /// `PF_W`: the kernel writes this segment (data, per-CPU data, init and bss).
    pub writable: bool,
}

/// What the loader needs from a vmlinux.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelImage {
    /// `e_entry`.
    pub entry: u64,
    /// The PVH entry point, if the kernel has the Xen PHYS32_ENTRY note.
    pub pvh_entry: Option<u64>,
    /// Loadable segments with a non-zero size.
    pub segments: Vec<LoadSegment>,
}

impl KernelImage {
    /// End (exclusive) of the highest segment in memory.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.guest_addr + s.mem_size)
            .max()
            .unwrap_or(0)
    }

    /// Start of the lowest writable segment, if any.
    pub fn writable_start(&self) -> Option<u64> {
        self.segments
            .iter()
            .filter(|s| s.writable)
            .map(|s| s.guest_addr)
            .min()
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), ElfError> {
    file.read_exact_at(buf, offset)
        .map_err(|e| ElfError::Read(e.to_string()))
}

/// Parses the ELF header, program headers and notes of the vmlinux `file` of `file_len` bytes.
pub fn parse_kernel(file: &File, file_len: u64) -> Result<KernelImage, ElfError> {
    let mut ehdr = [0u8; EHDR_SIZE];
    if file_len < EHDR_SIZE as u64 {
        return Err(ElfError::NotElf64);
    }
    read_at(file, &mut ehdr, 0)?;
    // Magic, ELFCLASS64, ELFDATA2LSB, and x86_64.
    if &ehdr[0..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(ElfError::NotElf64);
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::BadProgramHeaders);
    }
    let table_len = u64::from(phnum) * PHDR_SIZE as u64;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(ElfError::BadProgramHeaders);
    }
    let mut table = vec![0u8; table_len as usize];
    read_at(file, &mut table, phoff)?;

    let mut image = KernelImage {
        entry,
        pvh_entry: None,
        segments: Vec::new(),
    };
    for (index, phdr) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let kind = u32_at(phdr, 0);
        let flags = u32_at(phdr, 4);
        let file_offset = u64_at(phdr, 8);
        let guest_addr = u64_at(phdr, 24);
        let file_size = u64_at(phdr, 32);
        let mem_size = u64_at(phdr, 40);
        let in_file = file_offset
            .checked_add(file_size)
            .is_some_and(|end| end <= file_len);
        match kind {
            PT_LOAD if mem_size > 0 => {
                if !in_file || file_size > mem_size || guest_addr.checked_add(mem_size).is_none() {
                    return Err(ElfError::BadSegment(index));
                }
                image.segments.push(LoadSegment {
                    file_offset,
                    guest_addr,
                    file_size,
                    mem_size,
                    writable: flags & PF_W != 0,
                });
            }
            PT_NOTE if image.pvh_entry.is_none() => {
                if !in_file || file_size > MAX_NOTE_SIZE {
                    return Err(ElfError::BadNote);
                }
                let mut notes = vec![0u8; file_size as usize];
                read_at(file, &mut notes, file_offset)?;
                image.pvh_entry = find_pvh_entry(&notes)?;
            }
            _ => {}
        }
    }
    if image.segments.is_empty() {
        return Err(ElfError::NoLoadSegment);
    }
    Ok(image)
}

/// Walks the notes of one note segment for Xen's PHYS32_ENTRY; its descriptor's first four
/// bytes are the 32-bit entry address (the kernel stores it as a 4- or 8-byte word).
fn find_pvh_entry(notes: &[u8]) -> Result<Option<u64>, ElfError> {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3).ok_or(ElfError::BadNote);
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = u32_at(notes, pos) as usize;
        let descsz = u32_at(notes, pos + 4) as usize;
        let kind = u32_at(notes, pos + 8);
        let name_start = pos + 12;
        let desc_start = name_start
            .checked_add(align4(namesz)?)
            .ok_or(ElfError::BadNote)?;
        let next = desc_start
            .checked_add(align4(descsz)?)
            .ok_or(ElfError::BadNote)?;
        if desc_start
            .checked_add(descsz)
            .is_none_or(|e| e > notes.len())
        {
            return Err(ElfError::BadNote);
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[name_start..name_start + namesz] == b"Xen\0" {
            if descsz < 4 {
                return Err(ElfError::BadNote);
            }
            return Ok(Some(u64::from(u32_at(notes, desc_start))));
        }
        pos = next;
    }
    Ok(None)
}

/// How one piece of a file-backed range gets into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Map whole pages of the file privately (copy-on-write) at `guest_addr`.
    Map {
        file_offset: u64,
        guest_addr: u64,
        len: u64,
    },
    /// Copy bytes of the file into guest memory (partial pages, or misaligned ranges).
    Copy {
        file_offset: u64,
        guest_addr: u64,
        len: u64,
    },
}

/// Splits `len` file bytes at `file_offset`, bound for `guest_addr`, into the whole pages that
/// can be mapped from the file and the partial head and tail pages that must be copied (a
/// mapped page would bring along the file's neighbouring bytes, where the guest expects the
/// next segment or zeros). Mapping needs the file offset and the guest address congruent
/// modulo `page_size` (a power of two); otherwise everything is copied.
pub fn split_for_mapping(
    file_offset: u64,
    guest_addr: u64,
    len: u64,
    page_size: u64,
) -> Vec<Piece> {
    let mask = page_size - 1;
    let mut pieces = Vec::new();
    if len == 0 {
        return pieces;
    }
    let copy = |file_offset, guest_addr, len| Piece::Copy {
        file_offset,
        guest_addr,
        len,
    };
    if (file_offset & mask) != (guest_addr & mask) {
        pieces.push(copy(file_offset, guest_addr, len));
        return pieces;
    }
    let end = guest_addr + len;
    let map_start = (guest_addr + mask) & !mask;
    let map_end = end & !mask;
    if map_start >= map_end {
        // Not one whole page inside the range.
        pieces.push(copy(file_offset, guest_addr, len));
        return pieces;
    }
    if map_start > guest_addr {
        pieces.push(copy(file_offset, guest_addr, map_start - guest_addr));
    }
    pieces.push(Piece::Map {
        file_offset: file_offset + (map_start - guest_addr),
        guest_addr: map_start,
        len: map_end - map_start,
    });
    if end > map_end {
        pieces.push(copy(
            file_offset + (map_end - guest_addr),
            map_end,
            end - map_end,
        ));
    }
    pieces
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    const PAGE: u64 = 4096;

    #[test]
    fn aligned_range_with_partial_tail_maps_pages_and_copies_the_tail() {
        // The shape of vmlinux's text segment: file 0x200000 -> guest 0x1000000, 0xa7da84 long.
        let pieces = split_for_mapping(0x20_0000, 0x100_0000, 0xa7_da84, PAGE);
        assert_eq!(
            pieces,
            vec![
                Piece::Map {
                    file_offset: 0x20_0000,
                    guest_addr: 0x100_0000,
                    len: 0xa7_d000
                },
                Piece::Copy {
                    file_offset: 0xc7_d000,
                    guest_addr: 0x1a7_d000,
                    len: 0xa84
                },
            ]
        );
    }

    #[test]
    fn congruent_range_with_partial_head_copies_the_head() {
        let pieces = split_for_mapping(0x1100, 0x5100, 0x2000, PAGE);
        assert_eq!(
            pieces,
            vec![
                Piece::Copy {
                    file_offset: 0x1100,
                    guest_addr: 0x5100,
                    len: 0xf00
                },
                Piece::Map {
                    file_offset: 0x2000,
                    guest_addr: 0x6000,
                    len: 0x1000
                },
                Piece::Copy {
                    file_offset: 0x3000,
                    guest_addr: 0x7000,
                    len: 0x100
                },
            ]
        );
    }

    #[test]
    fn exactly_page_aligned_range_is_one_mapping() {
        let pieces = split_for_mapping(0, 0x7fe_0000, 0x3000, PAGE);
        assert_eq!(
            pieces,
            vec![Piece::Map {
                file_offset: 0,
                guest_addr: 0x7fe_0000,
                len: 0x3000
            }]
        );
    }

    #[test]
    fn misaligned_range_is_copied_whole() {
        let pieces = split_for_mapping(0x1010, 0x2000, 0x5000, PAGE);
        assert_eq!(
            pieces,
            vec![Piece::Copy {
                file_offset: 0x1010,
                guest_addr: 0x2000,
                len: 0x5000
            }]
        );
    }

    #[test]
    fn range_inside_one_page_is_copied() {
        let pieces = split_for_mapping(0x1800, 0x3800, 0x1000, PAGE);
        assert_eq!(
            pieces,
            vec![Piece::Copy {
                file_offset: 0x1800,
                guest_addr: 0x3800,
                len: 0x1000
            }]
        );
        assert!(split_for_mapping(0, 0, 0, PAGE).is_empty());
    }

    /// An ELF64 file of `file_len` bytes whose program headers are `phdrs`, each
    /// `[p_type, p_offset, p_paddr (and p_vaddr), p_filesz, p_memsz, p_flags, unused]`, followed
    /// by `notes`.
    pub(crate) fn elf_with(
        phdrs: &[[u64; 7]],
        notes: &[u8],
        file_len: usize,
    ) -> tempfile::NamedTempFile {
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes());
        elf.extend_from_slice(&EM_X86_64.to_le_bytes());
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&0x100_0000u64.to_le_bytes());
        elf.extend_from_slice(&64u64.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes());
        elf.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, phdrs.len() as u16, 64, 0, 0] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        for [kind, off, addr, filesz, memsz, flags, _] in phdrs {
            elf.extend_from_slice(&(*kind as u32).to_le_bytes());
            elf.extend_from_slice(&(*flags as u32).to_le_bytes());
            for v in [*off, *addr, *addr, *filesz, *memsz, 0x1000] {
                elf.extend_from_slice(&v.to_le_bytes());
            }
        }
        let note_off = elf.len();
        elf.extend_from_slice(notes);
        assert_eq!(note_off, 64 + 56 * phdrs.len());
        elf.resize(file_len, 0);
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&elf).expect("write");
        file
    }

    fn parse(file: &tempfile::NamedTempFile) -> Result<KernelImage, ElfError> {
        let len = file.as_file().metadata().expect("meta").len();
        parse_kernel(file.as_file(), len)
    }

    fn xen_note(desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        // An unrelated note first.
        for v in [4u32, 4, 1] {
            n.extend_from_slice(&v.to_le_bytes());
        }
        n.extend_from_slice(b"GNU\0abcd");
        for v in [4u32, desc.len() as u32, XEN_ELFNOTE_PHYS32_ENTRY] {
            n.extend_from_slice(&v.to_le_bytes());
        }
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(desc);
        n
    }

    #[test]
    fn segments_and_pvh_entry_are_parsed() {
        let note = xen_note(&0x100_0123u64.to_le_bytes());
        let note_off = 64 + 56 * 3;
        let file = elf_with(
            &[
                [1, 0x1000, 0x100_0000, 0x800, 0x2000, 0, 0],
                [4, note_off, 0, note.len() as u64, note.len() as u64, 0, 0],
                [1, 0x1800, 0x200_0000, 0, 0, 0, 0],
            ],
            &note,
            0x2000,
        );
        let image = parse(&file).expect("parse");
        assert_eq!(image.entry, 0x100_0000);
        assert_eq!(image.pvh_entry, Some(0x100_0123));
        assert_eq!(
            image.segments,
            vec![LoadSegment {
                file_offset: 0x1000,
                guest_addr: 0x100_0000,
                file_size: 0x800,
                mem_size: 0x2000,
                writable: false,
            }]
        );
        assert_eq!(image.end(), 0x100_2000);
    }

    #[test]
    fn writable_segments_are_told_apart() {
        // A vmlinux's shape: text and rodata (R E), then data and bss (RW).
        let file = elf_with(
            &[
                [1, 0x1000, 0x100_0000, 0x1000, 0x1000, 5, 0],
                [1, 0x2000, 0x100_2000, 0x800, 0x3000, 6, 0],
            ],
            &[],
            0x3000,
        );
        let image = parse(&file).expect("parse");
        let writable: Vec<bool> = image.segments.iter().map(|s| s.writable).collect();
        assert_eq!(writable, [false, true]);
        assert_eq!(image.writable_start(), Some(0x100_2000));
        assert_eq!(image.end(), 0x100_5000);
        let file = elf_with(
            &[[1, 0x1000, 0x100_0000, 0x1000, 0x1000, 5, 0]],
            &[],
            0x3000,
        );
        assert_eq!(parse(&file).expect("parse").writable_start(), None);
    }

    #[test]
    fn segment_past_the_end_of_the_file_is_rejected() {
        let file = elf_with(
            &[[1, 0x1000, 0x100_0000, 0x2000, 0x2000, 0, 0]],
            &[],
            0x2000,
        );
        assert_eq!(parse(&file), Err(ElfError::BadSegment(0)));
    }

    #[test]
    fn segment_with_more_file_than_memory_is_rejected() {
        let file = elf_with(&[[1, 0x1000, 0x100_0000, 0x800, 0x400, 0, 0]], &[], 0x2000);
        assert_eq!(parse(&file), Err(ElfError::BadSegment(0)));
    }

    #[test]
    fn truncated_note_is_rejected() {
        let mut note = xen_note(&[1, 2, 3, 4]);
        // Claim a descriptor longer than the segment.
        let len = note.len();
        note[len - 4 - 4 - 12 + 4..len - 4 - 4 - 12 + 8].copy_from_slice(&64u32.to_le_bytes());
        let note_off = 64 + 56 * 2;
        let file = elf_with(
            &[
                [1, 0x1000, 0x100_0000, 0x800, 0x800, 0, 0],
                [4, note_off, 0, note.len() as u64, note.len() as u64, 0, 0],
            ],
            &note,
            0x2000,
        );
        assert_eq!(parse(&file), Err(ElfError::BadNote));
    }

    #[test]
    fn non_elf_and_bad_tables_are_rejected() {
        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(&[0u8; 256]).expect("write");
        assert_eq!(parse(&file), Err(ElfError::NotElf64));
        let file = elf_with(&[], &[], 0x100);
        assert_eq!(parse(&file), Err(ElfError::BadProgramHeaders));
        let file = elf_with(&[[4, 0, 0, 0, 0, 0, 0]], &[], 0x100);
        assert_eq!(parse(&file), Err(ElfError::NoLoadSegment));
    }
}
