//! vCPUs: creation, boot-state configuration and the run loop.
//!
//! Every port-I/O and MMIO exit is dispatched through a [`Bus`]; nothing here knows device
//! addresses. Accesses nobody claims read as all ones and writes are dropped silently (the
//! kernel probes many legacy ports). A triple fault, an internal KVM error or a failed entry
//! stop the vCPU at once with a [`VcpuExit`] naming the cause.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use vmm_sys_util::ioctl_iowr_nr;

use super::memory::GuestMemory;
use super::vm::Vm;
use crate::arch::{cpuid, regs, KernelEntry};
use crate::devices::bus::Bus;
use crate::snapshot::VcpuState;

// KVM_PRE_FAULT_MEMORY (Linux 6.10); kvm-ioctls does not wrap it yet.
ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_bindings::kvm_pre_fault_memory
);

/// The whole 4 KiB pages `[start, start + size)` that hold `[gpa, gpa + len)`.
fn page_span(gpa: u64, len: u64) -> Option<(u64, u64)> {
    const PAGE: u64 = 4096;
    let start = gpa & !(PAGE - 1);
    let end = gpa.checked_add(len)?.checked_next_multiple_of(PAGE)?;
    Some((start, end - start))
}

/// Errors of vCPU creation, configuration and running.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// The filtered CPUID could not be built.
    #[error("failed to build the CPUID of vCPU {0}")]
    BuildCpuid(u8),
    /// A KVM ioctl configuring the vCPU failed.
    #[error("failed to {what} on vCPU {index}")]
    Configure {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM accepted {set} of {wanted} boot MSRs on vCPU {index}")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    /// Writing boot structures (GDT, page tables) failed.
    #[error("failed to set up boot registers of vCPU {0}")]
    BootRegs(u8, #[source] regs::RegsError),
    /// KVM_RUN failed.
    #[error("KVM_RUN failed on vCPU {0}")]
    Run(u8, #[source] kvm_ioctls::Error),
}

/// Why KVM reported an internal error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InternalError {
    /// KVM could not emulate an instruction.
    Emulation,
    /// An exception happened while KVM was simulating one.
    SimultaneousException,
    /// KVM could not deliver an event (interrupt/exception) to the guest.
    DeliveryEvent,
    /// The hardware reported an exit reason KVM does not know.
    UnexpectedExitReason,
    /// Any other sub-error code.
    Other(u32),
}

impl InternalError {
    fn from_suberror(suberror: u32) -> Self {
        match suberror {
            KVM_INTERNAL_ERROR_EMULATION => Self::Emulation,
            KVM_INTERNAL_ERROR_SIMUL_EX => Self::SimultaneousException,
            KVM_INTERNAL_ERROR_DELIVERY_EV => Self::DeliveryEvent,
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => Self::UnexpectedExitReason,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for InternalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Emulation => write!(f, "emulation failure"),
            Self::SimultaneousException => write!(f, "exception while injecting an exception"),
            Self::DeliveryEvent => write!(f, "event delivery failure"),
            Self::UnexpectedExitReason => write!(f, "unexpected hardware exit reason"),
            Self::Other(code) => write!(f, "sub-error {code}"),
        }
    }
}

/// What one KVM_RUN ended with, as the VMM cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// Handled (I/O, MMIO, a signal); run again.
    Handled,
    /// The guest asked for a reset through KVM (system event).
    Reset,
    /// Triple fault / KVM_EXIT_SHUTDOWN, or a guest crash event.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError(InternalError),
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The physical CPU.
        cpu: u32,
    },
    /// An exit the VMM does not handle (the KVM exit's name).
    Unexpected(&'static str),
}

/// One virtual CPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
}

impl Vcpu {
    /// Creates vCPU `index` (its APIC id).
    pub fn new(
        vm: &Vm,
        index: u8,
        pio_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            pio_bus,
            mmio_bus,
        })
    }

    /// The vCPU index (= APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU fd, for state extraction.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn configure_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    }

    /// The CPUID this vCPU gets: KVM's supported CPUID after husk's policy.
    pub fn policy_cpuid(
        &self,
        supported_cpuid: &[kvm_cpuid_entry2],
        num_cpus: u8,
    ) -> Vec<kvm_cpuid_entry2> {
        let mut entries = supported_cpuid.to_vec();
        cpuid::apply_cpuid_policy(&mut entries, self.index, num_cpus);
        entries
    }

    /// Sets this vCPU's CPUID.
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| VcpuError::BuildCpuid(self.index))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.configure_err("set CPUID"))
    }

    /// Loads CPUID, MSRs and LAPIC LINT set-up; for the boot vCPU also the registers of the
    /// kernel entry (application processors wait for INIT/SIPI from the boot vCPU).
    pub fn configure(
        &self,
        mem: &GuestMemory,
        supported_cpuid: &[kvm_cpuid_entry2],
        num_cpus: u8,
        kernel: &KernelEntry,
    ) -> Result<(), VcpuError> {
        self.set_cpuid(&self.policy_cpuid(supported_cpuid, num_cpus))?;

        let boot_msrs = regs::boot_msrs();
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::BuildCpuid(self.index))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.configure_err("set MSRs"))?;
        if set != boot_msrs.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set,
                wanted: boot_msrs.len(),
            });
        }

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.configure_err("get LAPIC"))?;
        regs::set_lapic_lints(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.configure_err("set LAPIC"))?;

        if self.index == 0 {
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.configure_err("set FPU"))?;
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.configure_err("get sregs"))?;
            let sregs = regs::boot_sregs(mem, kernel.protocol, sregs)
                .map_err(|e| VcpuError::BootRegs(self.index, e))?;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.configure_err("set sregs"))?;
            self.fd
                .set_regs(&regs::boot_regs(kernel.protocol, kernel.entry))
                .map_err(self.configure_err("set registers"))?;
        }
        Ok(())
    }

    /// Completes an I/O or MMIO exit whose result the guest has not taken yet: KVM_RUN with
    /// `immediate_exit` finishes the emulated instruction and returns at once (EINTR) without
    /// running the guest further. Call it on a stopped vCPU before saving its state.
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(VcpuError::Run(self.index, e)),
        }
    }

    /// The MSRs of `candidates` this vCPU can read, one by one (KVM's GET_MSRS stops at the
    /// first it cannot).
    pub fn readable_msrs(&self, candidates: &[u32]) -> Vec<u32> {
        candidates
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                Msrs::from_entries(&[entry])
                    .ok()
                    .and_then(|mut msrs| self.fd.get_msrs(&mut msrs).ok())
                    == Some(1)
            })
            .collect()
    }

    /// Saves the vCPU's state (in the order KVM needs: MP state first, as reading it may
    /// deliver pending INIT/SIPI; events last). `msrs` are the MSRs to save (see
    /// [`Self::readable_msrs`]).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.configure_err("get MP state"))?;
        let regs = self
            .fd
            .get_regs()
            .map_err(self.configure_err("get registers"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.configure_err("get sregs"))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(self.configure_err("get XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.configure_err("get XCRs"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.configure_err("get debug registers"))?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(self.configure_err("get LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let wanted: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut kvm_msrs =
            Msrs::from_entries(&wanted).map_err(|_| VcpuError::BuildCpuid(self.index))?;
        let read = self
            .fd
            .get_msrs(&mut kvm_msrs)
            .map_err(self.configure_err("get MSRs"))?;
        if read != wanted.len() {
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set: read,
                wanted: wanted.len(),
            });
        }
        let msrs = order_msrs(kvm_msrs.as_slice().to_vec());
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(self.configure_err("get vCPU events"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Maps the guest-physical range `[gpa, gpa + len)` into KVM's two-dimensional page tables
    /// now, as this vCPU's reads of it would (`KVM_PRE_FAULT_MEMORY`, Linux 6.10, with
    /// `KVM_CAP_PRE_FAULT_MEMORY`): read-only where the host's page is copy-on-write, so a
    /// template's pages stay shared until the guest writes them. Call it with the vCPU's state
    /// set. Each of the guest's first touches of such a page would otherwise be a VM exit.
    /// The range is widened to whole pages.
    pub fn pre_fault(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        let (start, size) = page_span(gpa, len)
            .ok_or_else(|| std::io::Error::other("range past the address space"))?;
        let mut range = kvm_bindings::kvm_pre_fault_memory {
            gpa: start,
            size,
            ..Default::default()
        };
        // Each call maps at least a page and leaves what remains in `range`; a pending signal
        // ends one early (EINTR). Bounded: a call that maps nothing is an error.
        let mut interrupted = 0;
        while range.size > 0 {
            let before = range.size;
            // SAFETY: KVM_PRE_FAULT_MEMORY reads and updates the `kvm_pre_fault_memory` that
            // `range` is, which lives across the call; the fd is this vCPU's.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(
                    &self.fd,
                    KVM_PRE_FAULT_MEMORY(),
                    &mut range,
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) && interrupted < 16 {
                    interrupted += 1;
                    continue;
                }
                return Err(err);
            }
            if range.size >= before {
                return Err(std::io::Error::other(
                    "KVM_PRE_FAULT_MEMORY made no progress",
                ));
            }
        }
        Ok(())
    }

    /// Restores a saved state (after [`Self::set_cpuid`]), in the order KVM needs.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if let (Some(saved), Ok(now)) = (state.tsc_khz, self.fd.get_tsc_khz()) {
            if saved != now {
                self.fd
                    .set_tsc_khz(saved)
                    .map_err(self.configure_err("set the TSC frequency"))?;
            }
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.configure_err("set MP state"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.configure_err("set registers"))?;
        self.fd
            .set_sregs(&sregs_for_restore(&state.sregs, host_is_amd()))
            .map_err(self.configure_err("set sregs"))?;
        // SAFETY: a kvm_xsave is the legacy 4 KiB area KVM_SET_XSAVE reads, and the template's
        // was read by KVM_GET_XSAVE on a host with the same CPUID (checked by the caller).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.configure_err("set XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.configure_err("set XCRs"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(self.configure_err("set debug registers"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.configure_err("set LAPIC"))?;
        let msrs =
            Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::BuildCpuid(self.index))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.configure_err("set MSRs"))?;
        if set != state.msrs.len() {
            tracing::error!(
                vcpu = self.index,
                msr = format_args!("{:#x}", state.msrs.get(set).map_or(0, |e| e.index)),
                "KVM refused a template MSR"
            );
            return Err(VcpuError::PartialMsrs {
                index: self.index,
                set,
                wanted: state.msrs.len(),
            });
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(self.configure_err("set vCPU events"))
    }

    fn internal_error(&mut self) -> InternalError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
        // `internal` member of the union; it is plain integers, valid for any bit pattern.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        // Diagnostics for whoever reads the log: where the guest was and what KVM reported
        // (for an emulation failure, data holds the instruction bytes when KVM has them).
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => tracing::error!(
                vcpu = self.index,
                suberror = internal.suberror,
                rip = format_args!("{:#x}", regs.rip),
                cs = format_args!("{:#x}", sregs.cs.selector),
                cr0 = format_args!("{:#x}", sregs.cr0),
                efer = format_args!("{:#x}", sregs.efer),
                data = format_args!("{data:x?}"),
                "KVM internal error"
            ),
            _ => tracing::error!(
                vcpu = self.index,
                suberror = internal.suberror,
                data = format_args!("{data:x?}"),
                "KVM internal error"
            ),
        }
        InternalError::from_suberror(internal.suberror)
    }

    /// Runs the vCPU until the next exit and handles it.
    pub fn run_once(&mut self) -> Result<VcpuExit, VcpuError> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Handled)
            }
            Err(e) => return Err(VcpuError::Run(self.index, e)),
        };
        let outcome = match exit {
            KvmExit::IoIn(port, data) => {
                if !self.pio_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                VcpuExit::Handled
            }
            KvmExit::IoOut(port, data) => {
                self.pio_bus.write(u64::from(port), data);
                VcpuExit::Handled
            }
            KvmExit::MmioRead(addr, data) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                VcpuExit::Handled
            }
            KvmExit::MmioWrite(addr, data) => {
                self.mmio_bus.write(addr, data);
                VcpuExit::Handled
            }
            KvmExit::Hlt | KvmExit::IrqWindowOpen | KvmExit::Intr => VcpuExit::Handled,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_CRASH => VcpuExit::Shutdown,
                _ => VcpuExit::Unexpected("system event"),
            },
            KvmExit::FailEntry(reason, cpu) => VcpuExit::FailEntry { reason, cpu },
            KvmExit::InternalError => return Ok(VcpuExit::InternalError(self.internal_error())),
            KvmExit::Unknown => VcpuExit::Unexpected("unknown"),
            KvmExit::Exception => VcpuExit::Unexpected("exception"),
            KvmExit::Debug(_) => VcpuExit::Unexpected("debug"),
            KvmExit::MemoryFault { .. } => VcpuExit::Unexpected("memory fault"),
            _ => VcpuExit::Unexpected("unsupported exit"),
        };
        Ok(outcome)
    }
}

/// Whether the host CPU is AMD's (SVM).
fn host_is_amd() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf.ecx.to_le_bytes());
    &vendor == b"AuthenticAMD"
}

/// A TSS descriptor type: available (9) and busy (11).
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// The special registers to restore. On AMD, KVM_GET_SREGS reports the task register as a
/// busy TSS although SVM keeps it as loaded, available (KVM's `svm_get_segment` sets the busy
/// bit for user space); written back busy, a CPU that checks the type for I/O permission
/// (QEMU's emulated SVM, which the test rig runs on) refuses every port access a process was
/// allowed with ioperm(2) with a #GP. So the type goes back as SVM holds it. VMX, which
/// requires a busy TSS on entry, gets it unchanged.
fn sregs_for_restore(saved: &kvm_bindings::kvm_sregs, amd: bool) -> kvm_bindings::kvm_sregs {
    let mut sregs = *saved;
    if amd && sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Orders saved MSRs for their restore: the TSC deadline last (KVM reads it against the guest
/// TSC, restored first). A zero deadline becomes the saved TSC, so that a guest whose timer
/// had fired, with the interrupt not yet taken, still gets a timer interrupt after the restore
/// rather than waiting forever (a spurious tick costs the guest nothing).
fn order_msrs(mut msrs: Vec<kvm_msr_entry>) -> Vec<kvm_msr_entry> {
    let tsc = msrs
        .iter()
        .find(|e| e.index == MSR_IA32_TSC)
        .map(|e| e.data);
    if let Some(pos) = msrs.iter().position(|e| e.index == MSR_IA32_TSC_DEADLINE) {
        let mut deadline = msrs.remove(pos);
        if deadline.data == 0 {
            deadline.data = tsc.unwrap_or(0);
        }
        msrs.push(deadline);
    }
    msrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_fault_ranges_are_widened_to_whole_pages() {
        assert_eq!(page_span(0x1000, 0x2000), Some((0x1000, 0x2000)));
        assert_eq!(page_span(0x1234, 0x10), Some((0x1000, 0x1000)));
        assert_eq!(page_span(0x1ff0, 0x20), Some((0x1000, 0x2000)));
        assert_eq!(page_span(0x1000, 0), Some((0x1000, 0)));
        assert_eq!(page_span(u64::MAX - 0x10, 0x20), None);
        assert_eq!(page_span(u64::MAX - 0x10, 0x8), None);
    }

    #[test]
    fn a_busy_tss_is_restored_available_on_amd_only() {
        let mut saved = kvm_bindings::kvm_sregs::default();
        saved.tr.type_ = TSS_BUSY;
        assert_eq!(sregs_for_restore(&saved, true).tr.type_, TSS_AVAILABLE);
        assert_eq!(sregs_for_restore(&saved, false).tr.type_, TSS_BUSY);
        saved.tr.type_ = 3;
        assert_eq!(sregs_for_restore(&saved, true).tr.type_, 3);
    }

    #[test]
    fn tsc_deadline_goes_last_and_is_never_zero() {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let ordered = order_msrs(vec![
            entry(MSR_IA32_TSC, 500),
            entry(MSR_IA32_TSC_DEADLINE, 0),
            entry(0xc000_0080, 1),
        ]);
        let got: Vec<(u32, u64)> = ordered.iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(
            got,
            vec![
                (MSR_IA32_TSC, 500),
                (0xc000_0080, 1),
                (MSR_IA32_TSC_DEADLINE, 500)
            ]
        );
        let kept = order_msrs(vec![
            entry(MSR_IA32_TSC_DEADLINE, 9),
            entry(MSR_IA32_TSC, 5),
        ]);
        assert_eq!(kept[1].data, 9);
    }

    #[test]
    fn internal_error_suberrors_are_named() {
        assert_eq!(InternalError::from_suberror(1), InternalError::Emulation);
        assert_eq!(
            InternalError::from_suberror(3),
            InternalError::DeliveryEvent
        );
        assert_eq!(InternalError::from_suberror(99), InternalError::Other(99));
        assert_eq!(InternalError::Emulation.to_string(), "emulation failure");
    }
}
