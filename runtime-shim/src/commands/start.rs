//! `husk start`: let a created container's init run its program.

use crate::agent::{call_ok, connect, init_process};
use crate::container::StateDir;
use crate::hooks::HookKind;
use crate::logging::warn;
use crate::state::{ContainerState, Status};
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::Request;

/// Options of `husk start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The container id.
    pub id: String,
}

/// `husk start`.
pub fn start(globals: &Globals, args: &StartArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    start_locked(&dir)
}

/// Starts the container in `dir`, whose lock the caller holds.
pub fn start_locked(dir: &StateDir) -> Result<()> {
    let mut state = ContainerState::load(dir)?;
    if !state.can_start() {
        match state.status {
            Status::Stopped => bail!("cannot start a container that has stopped"),
            other => bail!("cannot start an already {other} container"),
        }
    }
    state
        .hooks
        .run(
            HookKind::StartContainer,
            &state.oci_state(),
            &state.bundle,
            warn,
        )
        .inspect_err(|_| {
            // The lifecycle: a failed startContainer hook stops the container.
            crate::commands::delete::stop_vmm(&state);
        })?;
    let mut client = connect(dir)?;
    let started = call_ok(
        &mut client,
        "starting the container",
        &Request::StartProcess(init_process(&dir.id)),
    );
    if let Err(e) = started {
        // A program that ends at once can end the VM (the supervisor shuts it down after the
        // init's exit) before the agent's reply gets out. Its recorded exit proves it ran.
        if !dir.exit_file().exists() {
            return Err(e.into());
        }
        crate::logging::debug(&format!(
            "the container ran and exited before start returned: {e}"
        ));
    }
    state.status = Status::Running;
    state.save(dir)?;
    run_poststart(&state)
}

/// The poststart hooks of a container whose program runs (a failure is reported, and the
/// container keeps running, as with runc).
pub fn run_poststart(state: &ContainerState) -> Result<()> {
    state
        .hooks
        .run(HookKind::Poststart, &state.oci_state(), &state.bundle, warn)
}
