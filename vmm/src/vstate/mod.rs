//! Everything that owns a KVM file descriptor: guest memory registration, the VM and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
