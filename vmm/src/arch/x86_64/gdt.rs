//! Global descriptor table entries and their KVM segment equivalents.
//!
//! The boot vCPU's segment registers are loaded from the same descriptors that are written into
//! the guest's boot GDT, so a later reload by the kernel sees identical segments.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from access/flags (`0xF0FF` mask: flags nibble and access byte),
/// base and limit (20 bits).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// 32-bit flat code segment (PVH entry): present, DPL 0, exec/read, 4 KiB granular, 32-bit.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// 64-bit code segment (long-mode entry): present, DPL 0, exec/read, L bit.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Flat data segment: present, DPL 0, read/write, 4 KiB granular, 32-bit.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// The TSS descriptor (busy 32/64-bit TSS).
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// Selector index of the code segment.
pub const CODE_INDEX: u8 = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: u8 = 2;
/// Selector index of the TSS.
pub const TSS_INDEX: u8 = 3;

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    if granularity(entry) == 0 {
        limit
    } else {
        (limit << 12) | 0xfff
    }
}

fn granularity(entry: u64) -> u8 {
    ((entry >> 55) & 1) as u8
}

/// Decodes descriptor `entry`, found at `index` in the GDT, into a KVM segment.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity(entry),
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code32_decodes_to_flat_32bit_code() {
        let seg = kvm_segment_from_gdt(CODE32, CODE_INDEX);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.s, seg.db, seg.l, seg.g), (1, 1, 1, 0, 1));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn code64_sets_long_mode_and_clears_db() {
        let seg = kvm_segment_from_gdt(CODE64, CODE_INDEX);
        assert_eq!((seg.l, seg.db, seg.type_), (1, 0, 0xb));
    }

    #[test]
    fn data_and_tss_decode() {
        let data = kvm_segment_from_gdt(DATA, DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.s),
            (0x10, 0x3, 1, 1)
        );
        let tss = kvm_segment_from_gdt(TSS, TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 1));
        assert_eq!(tss.limit, 0xffff_ffff);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn not_present_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
