//! husk-vmm: the KVM virtual machine monitor that runs one husk microVM.
//!
//! [`builder::build_microvm`] turns a [`config::VmConfig`] into a [`vmm::Vmm`];
//! [`vmm::Vmm::run`] runs it until the guest finishes.

pub mod arch;
pub mod atomic_file;
pub mod builder;
pub mod config;
pub mod confine;
pub mod devices;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod jail;
pub mod kvm_check;
pub mod net_handoff;
pub mod seccomp;
pub mod snapshot;
pub mod supervisor;
pub mod timeline;
pub mod userns;
pub mod vmm;
pub mod vstate;
pub mod write_set;
