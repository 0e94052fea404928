//! Guest CPUID: what `KVM_GET_SUPPORTED_CPUID` reports, filtered by an explicit policy.
//!
//! The policy, leaf by leaf (everything not listed passes through as KVM reports it; KVM
//! already hides what it cannot virtualize, e.g. TSC-deadline without an in-kernel LAPIC):
//! - 0x1: ECX.hypervisor set (the guest must know it is virtualized: paravirt clock, no
//!   spurious microcode/thermal work); EBX[31:24] initial APIC id = vCPU index, EBX[23:16]
//!   logical processor count = vCPU count, EDX.HTT set when there is more than one vCPU.
//!   Hidden: ECX.VMX (no nested virtualization), ECX.PDCM (no perf-capabilities MSR),
//!   EDX.MCE/MCA (the VMM sets up no machine-check banks), EDX.DS/ACPI/TM/PBE (no debug
//!   store, thermal or power management hardware). x2APIC stays: the in-kernel irqchip
//!   emulates it. ECX.TSC_DEADLINE set: the in-kernel LAPIC emulates the TSC-deadline timer
//!   (`KVM_CAP_TSC_DEADLINE_TIMER`, every KVM since Linux 3.6) but KVM leaves the bit for the
//!   VMM to set; without it the guest calibrates its LAPIC timer against the PIT at boot
//!   (10 ticks, 100 ms at HZ=100).
//! - 0x4 (Intel caches): cores per package = vCPU count; L1/L2 private, L3 shared by all.
//! - 0x7.0: ECX.WAITPKG hidden (UMWAIT/TPAUSE control MSR not provided), EBX.INTEL_PT and
//!   EDX.ARCH_LBR hidden (no tracing/LBR state saved by the VMM).
//! - 0xa (architectural perf monitoring): zeroed, no vPMU.
//! - 0xb / 0x1f (extended topology): one thread per core, N cores in one package, x2APIC id =
//!   vCPU index.
//! - 0x4000_0000: "KVMKVMKVM" signature (added if KVM did not report it) so the guest uses
//!   kvmclock and the other paravirtual features of 0x4000_0001 (passed through).
//! - AMD 0x8000_0001: ECX.CmpLegacy set with more than one vCPU (cores, not threads), SVM and
//!   the core/NB/LLC perf-counter extensions hidden; 0x8000_0008 ECX.NC = N-1 and
//!   ApicIdCoreIdSize; 0x8000_001d cache sharing like leaf 4; 0x8000_001e extended APIC id /
//!   core id = vCPU index, one thread per core, one node.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX bits.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bits.
const LEAF1_EDX_MCE: u32 = 1 << 7;
const LEAF1_EDX_MCA: u32 = 1 << 14;
const LEAF1_EDX_DS: u32 = 1 << 21;
const LEAF1_EDX_ACPI: u32 = 1 << 22;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_EDX_TM: u32 = 1 << 29;
const LEAF1_EDX_PBE: u32 = 1 << 31;
/// Leaf 7 bits.
const LEAF7_EBX_INTEL_PT: u32 = 1 << 25;
const LEAF7_ECX_WAITPKG: u32 = 1 << 5;
const LEAF7_EDX_ARCH_LBR: u32 = 1 << 19;
/// AMD 0x8000_0001 ECX bits.
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_SVM: u32 = 1 << 2;
const AMD_ECX_PERFCTR_CORE: u32 = 1 << 23;
const AMD_ECX_PERFCTR_NB: u32 = 1 << 24;
const AMD_ECX_PERFCTR_LLC: u32 = 1 << 28;

/// KVM paravirtual leaves.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// Topology level types of leaves 0xb / 0x1f.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// CPU vendor, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// GenuineIntel (and anything not AMD-like).
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
}

/// Reads the vendor from leaf 0.
pub fn cpu_vendor(entries: &[kvm_cpuid_entry2]) -> CpuVendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return CpuVendor::Intel;
    };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &vendor {
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Intel,
    }
}

/// Number of APIC-id bits needed for `num_cpus` cores.
fn core_id_bits(num_cpus: u8) -> u32 {
    u32::from(num_cpus.max(1))
        .next_power_of_two()
        .trailing_zeros()
}

fn topology_leaf(function: u32, index: u32, cpu_index: u8, num_cpus: u8) -> kvm_cpuid_entry2 {
    let (eax, ebx, level_type) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (core_id_bits(num_cpus), u32::from(num_cpus), LEVEL_TYPE_CORE),
        _ => (0, 0, LEVEL_TYPE_INVALID),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: u32::from(cpu_index),
        ..Default::default()
    }
}

fn kvm_signature_leaf(max_leaf: u32) -> kvm_cpuid_entry2 {
    let word = |i: usize| {
        u32::from_le_bytes([
            KVM_SIGNATURE[i],
            KVM_SIGNATURE[i + 1],
            KVM_SIGNATURE[i + 2],
            KVM_SIGNATURE[i + 3],
        ])
    };
    kvm_cpuid_entry2 {
        function: KVM_CPUID_SIGNATURE,
        eax: max_leaf,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    }
}

/// Applies the policy to the supported entries for vCPU `cpu_index` of `num_cpus`.
pub fn apply_cpuid_policy(entries: &mut Vec<kvm_cpuid_entry2>, cpu_index: u8, num_cpus: u8) {
    let vendor = cpu_vendor(entries);
    let many = num_cpus > 1;
    let shared_by_all = u32::from(num_cpus.max(1)) - 1;

    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                entry.ecx &= !(LEAF1_ECX_VMX | LEAF1_ECX_PDCM);
                entry.edx &= !(LEAF1_EDX_MCE
                    | LEAF1_EDX_MCA
                    | LEAF1_EDX_DS
                    | LEAF1_EDX_ACPI
                    | LEAF1_EDX_TM
                    | LEAF1_EDX_PBE);
                if many {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_index) << 24)
                    | (u32::from(num_cpus) << 16);
            }
            0x4 if vendor == CpuVendor::Intel => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { shared_by_all } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (shared_by_all << 26) | (sharing << 14);
            }
            0x7 if entry.index == 0 => {
                entry.ebx &= !LEAF7_EBX_INTEL_PT;
                entry.ecx &= !LEAF7_ECX_WAITPKG;
                entry.edx &= !LEAF7_EDX_ARCH_LBR;
            }
            0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            KVM_CPUID_SIGNATURE => {
                let sig = kvm_signature_leaf(entry.eax.max(KVM_CPUID_FEATURES));
                entry.eax = sig.eax;
                entry.ebx = sig.ebx;
                entry.ecx = sig.ecx;
                entry.edx = sig.edx;
            }
            0x8000_0001 if vendor == CpuVendor::Amd => {
                entry.ecx &= !(AMD_ECX_SVM
                    | AMD_ECX_PERFCTR_CORE
                    | AMD_ECX_PERFCTR_NB
                    | AMD_ECX_PERFCTR_LLC);
                if many {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == CpuVendor::Amd => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_id_bits(num_cpus) << 12) | shared_by_all;
            }
            0x8000_001d if vendor == CpuVendor::Amd => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { shared_by_all } else { 0 };
                entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
            }
            0x8000_001e if vendor == CpuVendor::Amd => {
                entry.eax = u32::from(cpu_index);
                entry.ebx = u32::from(cpu_index) & 0xff;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }

    for function in [0xb, 0x1f] {
        if entries.iter().any(|e| e.function == function) {
            entries.retain(|e| e.function != function);
            for index in 0..3 {
                entries.push(topology_leaf(function, index, cpu_index, num_cpus));
            }
        }
    }

    if !entries.iter().any(|e| e.function == KVM_CPUID_SIGNATURE) {
        entries.push(kvm_signature_leaf(KVM_CPUID_FEATURES));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_leaf(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        leaf(0, 0, [0x1f, w(0), w(8), w(4)])
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(b"GenuineIntel"),
            leaf(
                1,
                0,
                [
                    0x906ea,
                    0x0000_0800,
                    LEAF1_ECX_VMX | LEAF1_ECX_PDCM | 1,
                    u32::MAX,
                ],
            ),
            leaf(4, 0, [0x121, 0, 0, 0]),
            leaf(4, 3, [0x163, 0, 0, 0]),
            leaf(
                7,
                0,
                [
                    0,
                    LEAF7_EBX_INTEL_PT | 1,
                    LEAF7_ECX_WAITPKG | 2,
                    LEAF7_EDX_ARCH_LBR,
                ],
            ),
            leaf(0xa, 0, [0x0704_3004, 7, 0, 0x603]),
            leaf(0xb, 0, [1, 2, 0x100, 9]),
            leaf(0x4000_0001, 0, [0x7fff, 0, 0, 0]),
        ]
    }

    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(b"AuthenticAMD"),
            leaf(1, 0, [0x800f12, 0x0000_0800, 0, 0]),
            leaf(
                0x8000_0001,
                0,
                [0, 0, AMD_ECX_SVM | AMD_ECX_PERFCTR_CORE | 1, 0],
            ),
            leaf(0x8000_0008, 0, [0x3030, 0, 0xffff, 0]),
            leaf(0x8000_001d, 0, [0x121, 0, 0, 0]),
            leaf(0x8000_001d, 3, [0x163, 0, 0, 0]),
            leaf(0x8000_001e, 0, [7, 0x107, 0x3, 0]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    #[test]
    fn vendor_is_read_from_leaf_zero() {
        assert_eq!(cpu_vendor(&intel()), CpuVendor::Intel);
        assert_eq!(cpu_vendor(&amd()), CpuVendor::Amd);
        assert_eq!(cpu_vendor(&[vendor_leaf(b"HygonGenuine")]), CpuVendor::Amd);
    }

    #[test]
    fn leaf1_sets_hypervisor_topology_and_hides_unsupported() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 2, 4);
        let l1 = find(&entries, 1, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(
            l1.ecx & LEAF1_ECX_TSC_DEADLINE,
            0,
            "TSC-deadline timer offered"
        );
        assert_eq!(l1.ecx & (LEAF1_ECX_VMX | LEAF1_ECX_PDCM), 0);
        assert_eq!(l1.ecx & 1, 1, "unrelated bits pass through");
        assert_eq!(l1.edx & (LEAF1_EDX_MCE | LEAF1_EDX_MCA), 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ebx, (2 << 24) | (4 << 16) | 0x800);
    }

    #[test]
    fn single_cpu_clears_htt() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 0, 1);
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ebx, (1 << 16) | 0x800);
    }

    #[test]
    fn intel_cache_leaves_describe_private_l1_and_shared_l3() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 0, 4);
        let l1d = find(&entries, 4, 0);
        assert_eq!(
            (l1d.eax >> 26, (l1d.eax >> 14) & 0xfff, l1d.eax & 0x3fff),
            (3, 0, 0x121)
        );
        let l3 = find(&entries, 4, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (3, 3));
    }

    #[test]
    fn leaf7_hides_waitpkg_pt_and_arch_lbr() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 0, 1);
        let l7 = find(&entries, 7, 0);
        assert_eq!((l7.ebx, l7.ecx, l7.edx), (1, 2, 0));
    }

    #[test]
    fn perf_monitoring_leaf_is_zeroed() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 0, 1);
        let la = find(&entries, 0xa, 0);
        assert_eq!((la.eax, la.ebx, la.ecx, la.edx), (0, 0, 0, 0));
    }

    #[test]
    fn extended_topology_describes_n_cores_of_one_thread() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 3, 4);
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        let end = find(&entries, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert!(
            !entries.iter().any(|e| e.function == 0x1f),
            "0x1f not invented"
        );
    }

    #[test]
    fn core_id_bits_round_up() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(32), 5);
    }

    #[test]
    fn kvm_signature_is_added_and_features_pass_through() {
        let mut entries = intel();
        apply_cpuid_policy(&mut entries, 0, 1);
        let sig = find(&entries, KVM_CPUID_SIGNATURE, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        assert_eq!(find(&entries, KVM_CPUID_FEATURES, 0).eax, 0x7fff);
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.function == KVM_CPUID_SIGNATURE)
                .count(),
            1
        );
    }

    #[test]
    fn amd_topology_leaves() {
        let mut entries = amd();
        apply_cpuid_policy(&mut entries, 1, 4);
        let ext = find(&entries, 0x8000_0001, 0);
        assert_eq!(ext.ecx, AMD_ECX_CMP_LEGACY | 1);
        let size = find(&entries, 0x8000_0008, 0);
        assert_eq!(size.ecx & 0xf0ff, (2 << 12) | 3);
        assert_eq!(size.ecx & 0x0f00, 0x0f00, "other bits untouched");
        assert_eq!((find(&entries, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&entries, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
        let ids = find(&entries, 0x8000_001e, 0);
        assert_eq!((ids.eax, ids.ebx, ids.ecx), (1, 1, 0));
    }

    #[test]
    fn amd_single_cpu_clears_cmp_legacy() {
        let mut entries = amd();
        entries[2].ecx |= AMD_ECX_CMP_LEGACY;
        apply_cpuid_policy(&mut entries, 0, 1);
        assert_eq!(find(&entries, 0x8000_0001, 0).ecx & AMD_ECX_CMP_LEGACY, 0);
    }
}
