//! husk's host side: the runc-compatible OCI runtime CLI and the containerd shim v2 ([`shim`]).
//! One file and one function per command, as the OCI runtime CLI spec lists them.
//!
//! Process model (see DESIGN.md "Host process model"): `create` spawns one `husk-vmm` per
//! container in supervisor mode (`husk_vmm::supervisor`); that process is the pid the engine
//! sees and exits with the container's status. Every other command finds the container through
//! its state directory ([`container::StateDir`]) and reaches the agent through the VMM's vsock
//! socket ([`agent`]).

pub mod agent;
pub mod bundle;
pub mod commands;
pub mod config;
pub mod container;
pub mod hooks;
pub mod host_cgroup;
pub mod limits;
pub mod logging;
pub mod netlink;
pub mod network;
pub mod share;
pub mod shim;
pub mod sizing;
pub mod state;
pub mod template;

use std::path::PathBuf;

/// Options every command receives (runc's global flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Globals {
    /// State root (`--root`, default `/run/husk`).
    pub root: PathBuf,
    /// `--debug`.
    pub debug: bool,
}
