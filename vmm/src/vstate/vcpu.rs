//! vCPUs: creation, boot-state configuration and the run loop.
//!
//! Every port-I/O and MMIO exit is dispatched through a [`Bus`]; nothing here knows device
//! addresses. Accesses nobody claims read as all ones and writes are dropped silently (the
//! kernel probes many legacy ports). A triple fault, an internal KVM error or a failed entry
//! stop the vCPU at once with a [`VcpuExit`] naming the cause.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, Msrs, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use super::memory::GuestMemory;
use super::vm::Vm;
use crate::arch::{cpuid, regs, KernelEntry};
use crate::devices::bus::Bus;

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

    /// Loads CPUID, MSRs and LAPIC LINT set-up; for the boot vCPU also the registers of the
    /// kernel entry (application processors wait for INIT/SIPI from the boot vCPU).
    pub fn configure(
        &self,
        mem: &GuestMemory,
        supported_cpuid: &[kvm_cpuid_entry2],
        num_cpus: u8,
        kernel: &KernelEntry,
    ) -> Result<(), VcpuError> {
        let mut entries = supported_cpuid.to_vec();
        cpuid::apply_cpuid_policy(&mut entries, self.index, num_cpus);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::BuildCpuid(self.index))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.configure_err("set CPUID"))?;

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

#[cfg(test)]
mod tests {
    use super::*;

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
