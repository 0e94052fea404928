//! A template's write set: the pages of its memory file that a sandbox restored from it writes
//! before its container exists, copied ahead of the guest by every later restore.
//!
//! A restored guest shares the template's pages copy-on-write. Each page it writes for the
//! first time costs a nested page fault: a VM exit, the host's copy, and KVM mapping the copy
//! (and a page it had never touched, a hole in the memory file, costs the same for a zeroed
//! page). Renewing the guest and creating its first container write much the same pages every
//! time, because every restore starts from the same memory with the same allocator state: some
//! two thousand of them, which in the test rig, where an exit is slow, is a good part of a warm
//! `create`.
//!
//! So the runtime records them once: after the first container of a template's first sandbox
//! is created, it reads which of the VMM's guest pages are its own (the VMM's
//! `/proc/PID/pagemap`: present, anonymous and mapped once) and writes their ranges into the
//! template's [`WRITE_SET_FILE`]. Every later restore copies those pages in the VMM before the
//! guest runs (`MADV_POPULATE_WRITE`) and maps them writable into KVM's page tables
//! (`KVM_PRE_FAULT_MEMORY`), so the guest's writes to them take no exit.
//!
//! What it costs: a sandbox holds its own copy of every page of the set from its start, where
//! it would otherwise copy only the pages it writes. The set is what a create writes, and a
//! create writes nearly all of it every time, so the difference is small; the set never holds
//! more pages than the guest has.
//!
//! The file: [`WRITE_SET_MAGIC`], the format ([`WRITE_SET_FORMAT`], `u32` little-endian), the
//! memory digest of the template it belongs to (64 hex characters), the number of ranges
//! (`u64`), each range as `(offset, len)` in the memory file (`u64` pairs, page-aligned,
//! sorted, disjoint, inside the file), and the SHA-256 of everything before it. It is only a
//! hint: one that does not check out is ignored with a log line and removed (the next sandbox
//! records it again), and the restore goes on.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::snapshot::{MemoryLayout, TemplateError};

/// The write set's name in a template directory.
pub const WRITE_SET_FILE: &str = "write-set";
/// First bytes of a write set file.
pub const WRITE_SET_MAGIC: &[u8; 8] = b"HUSKWSET";
/// Version of the write set format.
pub const WRITE_SET_FORMAT: u32 = 1;
/// Most ranges a write set may hold (a 4 GiB guest of alternate pages would need 2^19).
const MAX_RANGES: u64 = 1 << 20;
/// The header: magic, format, memory digest, range count.
const HEADER_LEN: usize = 8 + 4 + 64 + 8;

/// pagemap: the page is present in memory.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: the page is a file page or shared anonymous memory (not a private copy).
const PM_FILE: u64 = 1 << 61;
/// pagemap: the page is mapped once (not the shared zero page, which a read of anonymous
/// memory maps).
const PM_EXCLUSIVE: u64 = 1 << 56;

/// The ranges of guest memory whose pages the VMM has its own copies of: `entries` are the
/// pagemap entries of one region, one per page from file offset `offset`. Such a page was
/// written: a page of the template copied, or a zero page of a hole allocated. Pages still the
/// file's, and the shared zero page where the guest only read a hole, are not.
pub fn written_in_mapping(offset: u64, page_size: u64, entries: &[u64]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        if entry & PM_PRESENT == 0 || entry & PM_FILE != 0 || entry & PM_EXCLUSIVE == 0 {
            continue;
        }
        let start = offset + index as u64 * page_size;
        match ranges.last_mut() {
            Some((s, len)) if *s + *len == start => *len += page_size,
            _ => ranges.push((start, page_size)),
        }
    }
    ranges
}

/// Sorts `ranges` and merges those that touch or overlap.
pub fn normalize(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(_, len)| len > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match out.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(start + len - *s),
            _ => out.push((start, len)),
        }
    }
    out
}

/// Checks `ranges` against the template: page-aligned, non-empty, sorted, disjoint, inside
/// the memory file.
fn check(layout: &MemoryLayout, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), String> {
    let mut end = 0;
    for &(offset, len) in ranges {
        if offset % page_size != 0 || len % page_size != 0 || len == 0 {
            return Err(format!("range {offset:#x}+{len:#x} is not whole pages"));
        }
        if offset < end {
            return Err(format!("range {offset:#x}+{len:#x} is out of order"));
        }
        end = offset
            .checked_add(len)
            .filter(|&e| e <= layout.file_len)
            .ok_or_else(|| format!("range {offset:#x}+{len:#x} lies outside the memory file"))?;
    }
    Ok(())
}

/// The write set's file contents for `ranges` of the template of `layout`.
pub fn encode(layout: &MemoryLayout, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ranges.len() * 16 + 32);
    out.extend_from_slice(WRITE_SET_MAGIC);
    out.extend_from_slice(&WRITE_SET_FORMAT.to_le_bytes());
    let mut digest = [b'0'; 64];
    let n = layout.sha256.len().min(64);
    digest[..n].copy_from_slice(&layout.sha256.as_bytes()[..n]);
    out.extend_from_slice(&digest);
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(offset, len) in ranges {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Parses and checks a write set's file contents against the template of `layout`.
pub fn decode(
    layout: &MemoryLayout,
    page_size: u64,
    data: &[u8],
) -> Result<Vec<(u64, u64)>, String> {
    if data.len() < HEADER_LEN + 32 {
        return Err(format!("truncated: {} bytes", data.len()));
    }
    if &data[..8] != WRITE_SET_MAGIC {
        return Err("not a write set (bad magic)".into());
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("its digest does not match".into());
    }
    let format = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
    if format != WRITE_SET_FORMAT {
        return Err(format!(
            "format {format}, this husk-vmm reads {WRITE_SET_FORMAT}"
        ));
    }
    if &body[12..76] != layout.sha256.as_bytes() {
        return Err("it belongs to another template's memory".into());
    }
    let count = u64::from_le_bytes(body[76..84].try_into().unwrap_or_default());
    if count > MAX_RANGES || body.len() - HEADER_LEN != count as usize * 16 {
        return Err(format!(
            "{count} ranges in {} bytes",
            body.len() - HEADER_LEN
        ));
    }
    let ranges: Vec<(u64, u64)> = body[HEADER_LEN..]
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(c[8..].try_into().unwrap_or_default()),
            )
        })
        .collect();
    check(layout, page_size, &ranges)?;
    Ok(ranges)
}

/// Writes the write set of the template in `dir` (atomically, 0600 as the template's files).
pub fn write(
    dir: &Path,
    layout: &MemoryLayout,
    ranges: &[(u64, u64)],
) -> Result<(), TemplateError> {
    let path = dir.join(WRITE_SET_FILE);
    crate::atomic_file::write_atomic_mode(&path, &encode(layout, ranges), 0o600).map_err(|source| {
        TemplateError::Io {
            path,
            what: "cannot write it",
            source,
        }
    })
}

/// The write set of the template in `dir`, as ranges of its memory file: `None` when it has
/// none (yet), an error naming the file when it is there but does not check out.
pub fn load(
    dir: &Path,
    layout: &MemoryLayout,
    page_size: u64,
) -> Result<Option<Vec<(u64, u64)>>, TemplateError> {
    let path = dir.join(WRITE_SET_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TemplateError::Io {
                path,
                what: "cannot open it",
                source,
            })
        }
    };
    let mut data = Vec::new();
    let limit = HEADER_LEN as u64 + MAX_RANGES * 16 + 32;
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|source| TemplateError::Io {
            path: path.clone(),
            what: "cannot read it",
            source,
        })?;
    decode(layout, page_size, &data)
        .map(Some)
        .map_err(|what| TemplateError::Corrupt { path, what })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::snapshot::MemRegion;

    const PAGE: u64 = 4096;

    fn layout() -> MemoryLayout {
        MemoryLayout {
            regions: vec![MemRegion {
                guest_addr: 0,
                len: 16 * PAGE,
                file_offset: 0,
            }],
            file_len: 16 * PAGE,
            data: vec![(0, 4 * PAGE)],
            lazy: Vec::new(),
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn private_present_pages_are_the_written_ones() {
        let file_page = PM_PRESENT | PM_FILE | 0x1234;
        let copy = PM_PRESENT | PM_EXCLUSIVE | 0x5678;
        let zero_page = PM_PRESENT | 0x9abc;
        let entries = [file_page, copy, copy, 0, copy, zero_page, copy, copy];
        assert_eq!(
            written_in_mapping(8 * PAGE, PAGE, &entries),
            vec![
                (9 * PAGE, 2 * PAGE),
                (12 * PAGE, PAGE),
                (14 * PAGE, 2 * PAGE)
            ]
        );
        assert!(written_in_mapping(0, PAGE, &[0, file_page]).is_empty());
    }

    #[test]
    fn ranges_are_sorted_and_merged() {
        assert_eq!(
            normalize(vec![
                (8 * PAGE, PAGE),
                (0, 2 * PAGE),
                (PAGE, 2 * PAGE),
                (3 * PAGE, 0)
            ]),
            vec![(0, 3 * PAGE), (8 * PAGE, PAGE)]
        );
    }

    #[test]
    fn a_write_set_round_trips_and_belongs_to_its_template() {
        let ranges = vec![(0, 2 * PAGE), (5 * PAGE, PAGE), (15 * PAGE, PAGE)];
        let data = encode(&layout(), &ranges);
        assert_eq!(decode(&layout(), PAGE, &data).unwrap(), ranges);

        let mut other = layout();
        other.sha256 = "cd".repeat(32);
        let err = decode(&other, PAGE, &data).unwrap_err();
        assert!(err.contains("another template"), "{err}");
    }

    #[test]
    fn a_damaged_write_set_is_refused() {
        let data = encode(&layout(), &[(0, PAGE), (4 * PAGE, PAGE)]);
        for len in [0, 10, HEADER_LEN + 31, data.len() - 1] {
            assert!(
                decode(&layout(), PAGE, &data[..len]).is_err(),
                "{len} bytes"
            );
        }
        let mut flipped = data.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        let err = decode(&layout(), PAGE, &flipped).unwrap_err();
        assert!(err.contains("digest"), "{err}");
        let mut magic = data;
        magic[0] = b'X';
        assert!(decode(&layout(), PAGE, &magic)
            .unwrap_err()
            .contains("magic"));
    }

    #[test]
    fn ranges_outside_the_memory_file_or_unaligned_are_refused() {
        for ranges in [
            vec![(15 * PAGE, 2 * PAGE)],
            vec![(PAGE + 1, PAGE)],
            vec![(0, PAGE + 8)],
            vec![(4 * PAGE, PAGE), (0, PAGE)],
            vec![(0, 2 * PAGE), (PAGE, PAGE)],
            vec![(u64::MAX - PAGE + 1, PAGE)],
            vec![(0, 0)],
        ] {
            let data = encode(&layout(), &ranges);
            assert!(decode(&layout(), PAGE, &data).is_err(), "{ranges:?}");
        }
    }

    #[test]
    fn a_missing_write_set_is_none_and_a_written_one_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), &layout(), PAGE).unwrap().is_none());
        write(dir.path(), &layout(), &[(PAGE, PAGE)]).unwrap();
        assert_eq!(
            load(dir.path(), &layout(), PAGE).unwrap(),
            Some(vec![(PAGE, PAGE)])
        );
        std::fs::write(dir.path().join(WRITE_SET_FILE), b"junk").unwrap();
        let err = load(dir.path(), &layout(), PAGE).unwrap_err();
        assert!(err.to_string().contains(WRITE_SET_FILE), "{err}");
    }
}
