//! The KVM VM: creation, the in-kernel irqchip and PIT, guest memory slots, irqfds and
//! ioeventfds.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{Address, GuestMemory as _, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;
use crate::arch::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::snapshot::VmState;

/// Errors of VM set-up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("failed to create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("failed to set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("failed to set the identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("failed to create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("failed to create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// A guest memory region has no host mapping.
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoHostAddress(u64),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("failed to register guest memory slot {slot} at {guest_addr:#x}")]
    SetMemoryRegion {
        slot: u32,
        guest_addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("failed to register an irqfd for GSI {gsi}")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saving or restoring VM state failed.
    #[error("failed to {0}")]
    State(&'static str, #[source] kvm_ioctls::Error),
    /// A saved irqchip names a chip that does not exist.
    #[error("saved irqchip state for unknown chip {0}")]
    BadChip(u32),
    /// KVM_IOEVENTFD failed.
    #[error("failed to register an ioeventfd at {addr:#x}")]
    RegisterIoevent {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM virtual machine.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and the x86 system pieces KVM needs before any vCPU exists: the TSS and
    /// identity-map pages, the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(VmError::SetTssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmError::SetIdentityMapAddress)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Vm { fd })
    }

    /// The KVM VM file descriptor (for vCPU creation).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Saves the irqchip, PIT and kvm-clock state (the vCPUs must be stopped).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| VmError::State("get the irqchip", e))?;
            Ok(chip)
        };
        let mut clock = self
            .fd
            .get_clock()
            .map_err(|e| VmError::State("get the clock", e))?;
        // Only the clock's value is restored; the flags describe this host's clock source.
        clock.flags = 0;
        Ok(VmState {
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::State("get the PIT", e))?,
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Restores a saved irqchip, PIT and kvm-clock state, before any vCPU runs.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::State("set the PIT", e))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(|e| VmError::State("set the clock", e))?;
        for (chip, id) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(VmError::BadChip(chip.chip_id));
            }
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::State("set the irqchip", e))?;
        }
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let guest_addr = region.start_addr().raw_value();
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| VmError::NoHostAddress(guest_addr))?;
            let slot = slot as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: guest_addr,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host + len) is a live mapping owned by `mem`, whose
            // regions are reference counted and kept alive by the Vmm for as long as the VM
            // (and so this slot) exists.
            let result = unsafe { self.fd.set_user_memory_region(desc) };
            result.map_err(|source| VmError::SetMemoryRegion {
                slot,
                guest_addr,
                source,
            })?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::RegisterIrqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `datamatch` to MMIO address `addr` signal `evt` inside
    /// KVM, without an exit to user space.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::RegisterIoevent { addr, source })
    }

    /// Makes a guest write of any width and value to MMIO address `addr` signal `evt` inside
    /// KVM, without an exit to user space. KVM keeps its own reference to the eventfd: the
    /// registration outlives `evt`'s descriptor, until the VM is gone.
    pub fn register_mmio_ioevent_any(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| VmError::RegisterIoevent { addr, source })
    }
}
