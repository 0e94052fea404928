//! husk's host side: the runc-compatible OCI runtime CLI and the containerd shim v2 ([`shim`]).
//! One file and one function per command, as the OCI runtime CLI spec lists them.
//!
//! Process model (see DESIGN.md "Host process model"): `create` spawns one `husk-vmm` per
//! container in supervisor mode (`husk_vmm::supervisor`); that process is the pid the engine
//! sees and exits with the container's status. Every other command finds the container through
//! its state directory ([`container::StateDir`]) and reaches the agent through the VMM's vsock
//! socket ([`agent`]).

/// `println!` for a command's output: a reader that went away (`husk state c | grep -q running`)
/// ends the process the way it ends runc and the shell's own tools, by `SIGPIPE`, where
/// `println!` would panic (see [`stdout_failed`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

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

/// A command's output could not be written: dies of `SIGPIPE` when the reader is gone (Rust
/// ignores the signal, so the write fails with `EPIPE` instead), else exits 1 saying why.
pub fn stdout_failed(error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restores the default disposition of SIGPIPE and raises it in this thread;
        // no handler code runs, the process ends.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("husk: writing the output: {error}");
    std::process::exit(1)
}

/// Options every command receives (runc's global flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Globals {
    /// State root (`--root`, default `/run/husk`).
    pub root: PathBuf,
    /// `--debug`.
    pub debug: bool,
}
