//! husk-agent: PID 1 of a husk guest.
//!
//! It runs as `/init` from the initramfs: mounts the pseudo file systems and the host's shared
//! directory (virtio-fs tag `husk` at `/run/husk/shared`) and brings up `lo` ([`init`]), reaps
//! orphans ([`reaper`]), serves the agent protocol ([`husk_agent_protocol`]) on vsock port 1024
//! ([`server`], [`rpc`]) and runs OCI containers ([`container`]).
//!
//! The same binary run as `husk-agent __husk-container-init` is a container's init helper
//! ([`container::child`]).
//!
//! PID 1 must never panic (that panics the kernel) and is built with `panic = "abort"`: errors
//! are logged ([`log`]) and the agent keeps serving. Only a failure to serve at all ends it,
//! which panics the kernel; with `panic=-1 reboot=t` the VM then resets by triple fault and the
//! VMM reports a crash instead of leaving the host to time out.

pub mod container;
pub mod identity;
pub mod init;
pub mod log;
pub mod reaper;
pub mod rpc;
pub mod server;
pub mod sys;
pub mod sysinfo;

use husk_agent_protocol::{AGENT_IDENTITY_PORT, AGENT_VSOCK_PORT};
use reaper::{Reaper, ReaperError};
use server::{Server, ServerError, ShutdownMode, UnixTestListener, VsockListener};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use sys::{LinuxSyscall, Syscall};

/// Errors that stop the agent from serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The reaper could not start.
    #[error("starting the reaper failed")]
    Reaper(#[from] ReaperError),
    /// The listener could not be set up.
    #[error("setting up the listener failed")]
    Server(#[from] ServerError),
}

/// Runs the agent as the guest's init. Returns only when it cannot serve.
pub fn run_init() -> AgentError {
    let sys: Arc<dyn Syscall> = Arc::new(LinuxSyscall);
    let mount_errors = init::setup_mounts(sys.as_ref());
    log::use_kmsg();
    for err in mount_errors {
        log_error!("{err}: {}", err_source(&err));
    }
    init::tune_page_reporting();
    if identity::detect_template_boot() {
        log_info!("template boot: the host share waits for the renewal");
    } else {
        match init::mount_share(sys.as_ref()) {
            Ok(true) => {
                init::tune_share();
                log_info!("host share mounted at {}", init::SHARE_MOUNT_POINT)
            }
            Ok(false) => log_info!(
                "no host share (no virtio-fs device tagged {})",
                init::SHARE_TAG
            ),
            Err(err) => log_error!("{err}: {}", err_source(&err)),
        }
    }
    if let Err(errno) = sys::bring_up_loopback() {
        log_error!("bringing up lo failed: {errno}");
    }
    for err in init::configure_network_from_cmdline() {
        log_error!("network configuration failed: {err}");
    }
    // Before any other thread exists: every thread must inherit the blocked SIGCHLD.
    let reaper = match Reaper::start(sys) {
        Ok(reaper) => reaper,
        Err(err) => return err.into(),
    };
    // One line on the console, visible only when the VMM attaches one (`husk-vmm --console`): the
    // boot benchmark's "agent is up" mark, comparable across VMMs (before vsock, which another
    // VMM may not offer). Without a console the write goes nowhere and costs nothing.
    let _ = writeln!(
        std::io::stdout(),
        "husk-agent {}: up",
        sysinfo::AGENT_VERSION
    );
    let server = Server::new(ShutdownMode::ResetVm, Some(reaper));
    // The identity port listens before the ready signal, so that a template taken after the
    // signal has it (see `identity`).
    let identity = match VsockListener::bind_quiet(AGENT_IDENTITY_PORT) {
        Ok(listener) => listener,
        Err(err) => return err.into(),
    };
    let identity_server = server.clone();
    if let Err(err) = std::thread::Builder::new()
        .name("identity".into())
        .spawn(move || server::serve(identity, identity_server))
    {
        log_error!("starting the identity listener failed: {err}");
    }
    let listener = match VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(listener) => listener,
        Err(err) => return err.into(),
    };
    server::serve(listener, server)
}

/// Serves the protocol on a Unix socket that behaves like husk-vmm's vsock socket, for tests
/// on the host. A shutdown request exits the process with status 0. Returns only on error.
///
/// Containers work here too: the agent becomes a child subreaper (so processes that a helper
/// forks, and orphans, are reparented to it) and runs the same reaper as in the guest.
pub fn run_unix(path: &Path) -> AgentError {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        log_warn!(
            "PR_SET_CHILD_SUBREAPER failed: {}",
            nix::errno::Errno::last()
        );
    }
    // Before any other thread exists (see Reaper::start).
    let reaper = match Reaper::start(Arc::new(LinuxSyscall)) {
        Ok(reaper) => reaper,
        Err(err) => return err.into(),
    };
    match UnixTestListener::bind(path) {
        Ok(listener) => server::serve(
            listener,
            Server::new(ShutdownMode::ExitProcess, Some(reaper)),
        ),
        Err(err) => err.into(),
    }
}

fn err_source(err: &dyn std::error::Error) -> String {
    err.source().map_or_else(String::new, ToString::to_string)
}
