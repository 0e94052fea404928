//! `husk delete`: remove a container and everything husk made for it (its microVM, mounts,
//! sockets, state directory). `--force` kills a running container first.

use crate::container::{process_alive, ContainerError, StateDir};
use crate::share::remove_state_dir;
use crate::state::{ContainerState, StateError};
use crate::Globals;
use anyhow::{bail, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How long a stopped container's VMM may take to shut down by itself.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(10);

/// Options of `husk delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Kill the container first if it is running.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// The container id.
    pub id: String,
}

/// `husk delete`.
pub fn delete(globals: &Globals, args: &DeleteArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let lock = match dir.lock() {
        Ok(lock) => lock,
        // runc: deleting a container that does not exist with --force succeeds.
        Err(ContainerError::NotFound(_)) if args.force => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let state = match ContainerState::load(&dir) {
        Ok(state) => Some(state),
        // A create that died half-way: clean up what is there.
        Err(StateError::NotFound(_)) if args.force => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(state) = &state {
        if !state.can_delete() && !args.force {
            bail!(
                "cannot delete container {} that is not stopped: {}",
                args.id,
                state.status
            );
        }
        stop_vmm(state);
    }
    remove_state_dir(&dir)?;
    drop(lock);
    if let Some(state) = &state {
        crate::commands::create::run_poststop(state);
    }
    Ok(())
}

/// Makes sure the container's VMM is gone: a stopped one gets a grace period to shut down by
/// itself, then it is killed.
pub fn stop_vmm(state: &ContainerState) {
    let pid = Pid::from_raw(state.pid);
    let alive = || process_alive(state.pid, state.pid_start_time);
    if !alive() {
        return;
    }
    let grace = if state.status == crate::state::Status::Stopped {
        VMM_EXIT_GRACE
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + grace;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive() {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}
