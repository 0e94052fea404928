//! Every guest-physical address the VMM uses, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM, untouched)
//! 0x0000_0500  boot GDT (4 entries), 0x520 boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, 0x6040 PVH module list, 0x6100 PVH memory map
//! 0x0000_7000  zero page (boot_params) for the 64-bit Linux boot protocol
//! 0x0000_8ff0  boot stack pointer (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPTE, 0xb000 PDE (identity map of the first GiB, long mode only)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  EBDA: MP floating pointer + MP configuration table (up to 1 KiB)
//! 0x0010_0000  high memory: the kernel is loaded at its ELF physical address (16 MiB usually)
//!   ...        initramfs at the top of low RAM, page aligned
//! 0xc000_0000  32-bit MMIO gap (not RAM) up to 4 GiB:
//!              0xd000_0000 virtio-mmio slots (4 KiB each), 0xfec0_0000 IOAPIC,
//!              0xfee0_0000 LAPIC, 0xfffb_c000 KVM identity map page, 0xfffb_d000 KVM TSS
//! 0x1_0000_0000 RAM above the gap, when the guest has more than 3 GiB
//! ```

/// Largest number of vCPUs a guest may have (bounded by the MP table size in the EBDA).
pub const MAX_VCPUS: u8 = 32;

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries of the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_MAX: usize = 4;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;

/// Where the PVH `hvm_start_info` goes; %ebx points here at the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH module list (the initramfs) goes.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Where the PVH memory map goes.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Largest number of PVH memory-map entries (up to the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// The zero page (`boot_params`) of the 64-bit Linux boot protocol; %rsi points here.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level 4 table of the boot identity map (long-mode entry only).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map (512 x 2 MiB pages = 1 GiB).
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Extended BIOS data area: start of the MP table, and the end of low RAM in the E820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Room for the MP table (the kernel scans the last KiB of base memory).
pub const MPTABLE_MAX_SIZE: u64 = 0x400;

/// First address of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Number of virtio-mmio slots (one IRQ each).
pub const VIRTIO_MMIO_MAX_SLOTS: u64 = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as u64;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// The page KVM uses for the real-mode identity map (KVM_SET_IDENTITY_MAP_ADDR).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// The three pages KVM uses for the TSS (KVM_SET_TSS_ADDR), right after the identity map page.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Serial port (COM1).
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of serial registers.
pub const SERIAL_PORT_LEN: u64 = 8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// i8042 data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// i8042 status/command port.
pub const I8042_COMMAND_PORT: u64 = 0x64;

/// First IRQ given to virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const IRQ_MAX: u32 = 23;

/// Page size used for alignment.
pub const PAGE_SIZE: u64 = 0x1000;

/// Guest RAM ranges for a guest of `mem_size` bytes: everything below the MMIO gap, the rest
/// from 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Base address and IRQ of virtio-mmio slot `index`.
pub fn virtio_mmio_slot(index: u64) -> Option<(u64, u32)> {
    if index >= VIRTIO_MMIO_MAX_SLOTS {
        return None;
    }
    Some((
        VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    ))
}

/// Where to put an initramfs of `size` bytes: page aligned, as high as possible in low RAM.
/// Returns `None` if it would not fit above `lowest` (the end of the kernel).
pub fn initramfs_start(mem_size: u64, size: u64, lowest: u64) -> Option<u64> {
    let start = low_ram_end(mem_size).checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= lowest).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fixed boot structure with its size.
    fn fixed_regions() -> Vec<(&'static str, u64, u64)> {
        vec![
            ("gdt", BOOT_GDT_START, BOOT_GDT_MAX as u64 * 8),
            ("idt", BOOT_IDT_START, 8),
            ("pvh info", PVH_INFO_START, 0x38),
            ("pvh modlist", PVH_MODLIST_START, 0x20),
            (
                "pvh memmap",
                PVH_MEMMAP_START,
                PVH_MEMMAP_MAX_ENTRIES as u64 * 24,
            ),
            ("zero page", ZERO_PAGE_START, 0x1000),
            ("stack", BOOT_STACK_POINTER - 0x800, 0x800),
            ("pml4", PML4_START, 0x1000),
            ("pdpte", PDPTE_START, 0x1000),
            ("pde", PDE_START, 0x1000),
            ("cmdline", CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            ("mptable", EBDA_START, MPTABLE_MAX_SIZE),
        ]
    }

    #[test]
    fn boot_structures_do_not_overlap_and_stay_below_himem() {
        let regions = fixed_regions();
        for (i, (name_a, a, len_a)) in regions.iter().enumerate() {
            assert!(a + len_a <= HIMEM_START, "{name_a} reaches high memory");
            for (name_b, b, len_b) in regions.iter().skip(i + 1) {
                assert!(
                    a + len_a <= *b || b + len_b <= *a,
                    "{name_a} overlaps {name_b}"
                );
            }
        }
    }

    #[test]
    fn mptable_fits_below_the_legacy_video_hole() {
        assert_eq!(EBDA_START + MPTABLE_MAX_SIZE, 0xa0000);
    }

    // The MMIO areas lie inside the gap, in this order, checked at compile time.
    const _: () = {
        let last_slot_end = VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAX_SLOTS * VIRTIO_MMIO_SLOT_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START);
        assert!(last_slot_end <= IOAPIC_START);
        assert!(IOAPIC_START < APIC_START);
        assert!(APIC_START < KVM_IDENTITY_MAP_START);
        assert!(KVM_IDENTITY_MAP_START + PAGE_SIZE == KVM_TSS_START);
        assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO_GAP_END);
    };

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn virtio_slots_get_consecutive_bases_and_irqs() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }

    #[test]
    fn initramfs_goes_page_aligned_at_top_of_low_ram() {
        let mem = 128 << 20;
        assert_eq!(initramfs_start(mem, 0x1800, 0x200_0000), Some(mem - 0x2000));
        assert_eq!(initramfs_start(mem, mem, 0x200_0000), None);
        assert_eq!(
            initramfs_start(8 << 30, 0x1000, 0),
            Some(MMIO_GAP_START - 0x1000)
        );
    }
}
