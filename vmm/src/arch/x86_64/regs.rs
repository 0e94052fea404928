//! Initial register state of the vCPUs for the two entry protocols.
//!
//! These functions only compute values (and write the boot GDT / page tables into guest
//! memory); the KVM ioctls that load them live in `vstate::vcpu`.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{self, kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use super::BootProtocol;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors of the boot register set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegsError {
    /// Writing the boot GDT or IDT failed.
    #[error("failed to write the boot GDT/IDT")]
    WriteGdt,
    /// Writing the boot page tables failed.
    #[error("failed to write the boot page tables")]
    WritePageTables,
}

/// General-purpose registers at the kernel entry point.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and must be set
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
        BootProtocol::LinuxBoot => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// FPU state: the defaults after FNINIT, MXCSR with all exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every boot vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled
/// with write-back as the default memory type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Writes the boot GDT and IDT, and (for the long-mode entry) identity page tables, into
/// guest memory, and returns `sregs` updated for `protocol`.
pub fn boot_sregs<M: GuestMemory>(
    mem: &M,
    protocol: BootProtocol,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let code = match protocol {
        BootProtocol::Pvh => gdt::CODE32,
        BootProtocol::LinuxBoot => gdt::CODE64,
    };
    let table: [u64; BOOT_GDT_MAX] = [0, code, gdt::DATA, gdt::TSS];
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| RegsError::WriteGdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::WriteGdt)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_MAX * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = kvm_segment_from_gdt(gdt::DATA, DATA_INDEX);
    sregs.cs = kvm_segment_from_gdt(code, CODE_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt::TSS, TSS_INDEX);

    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::LinuxBoot => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages: PML4[0] -> PDPTE[0] -> 512 PDEs.
fn setup_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))
        .map_err(|_| RegsError::WritePageTables)?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))
        .map_err(|_| RegsError::WritePageTables)?;
    let mut pde = [0u8; 512 * 8];
    for (i, chunk) in pde.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | HUGE_PAGE | PRESENT_WRITABLE;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pde, GuestAddress(PDE_START))
        .map_err(|_| RegsError::WritePageTables)
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

/// Programs LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as a PC BIOS does.
pub fn set_lapic_lints(lapic: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap")
    }

    #[test]
    fn pvh_regs_point_ebx_at_start_info() {
        let regs = boot_regs(BootProtocol::Pvh, 0x100_0000);
        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags),
            (0x100_0000, PVH_INFO_START, 2)
        );
    }

    #[test]
    fn linux_boot_regs_point_rsi_at_zero_page() {
        let regs = boot_regs(BootProtocol::LinuxBoot, 0x100_0000);
        assert_eq!((regs.rsi, regs.rsp), (ZERO_PAGE_START, BOOT_STACK_POINTER));
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let mem = mem();
        let sregs = boot_sregs(&mem, BootProtocol::Pvh, kvm_sregs::default()).expect("sregs");
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (0x8, 1, 0));
        assert_eq!(sregs.ds.selector, 0x10);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).expect("gdt");
        assert_eq!(code, gdt::CODE32);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_identity_map() {
        let mem = mem();
        let sregs = boot_sregs(&mem, BootProtocol::LinuxBoot, kvm_sregs::default()).expect("ok");
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("pml4");
        assert_eq!(pml4, PDPTE_START | 3);
        let last_pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 511 * 8))
            .expect("pde");
        assert_eq!(last_pde, (511 << 21) | 0x83);
    }

    #[test]
    fn lapic_lints_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        set_lapic_lints(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x400);
    }

    #[test]
    fn boot_msrs_enable_mtrrs_with_write_back() {
        let msrs = boot_msrs();
        let mtrr = msrs
            .iter()
            .find(|m| m.index == MSR_MTRR_DEF_TYPE)
            .expect("mtrr");
        assert_eq!(mtrr.data, 0x806);
    }
}
