//! `husk resume`: thaw a paused container.

use crate::agent::{call_ok, connect};
use crate::container::StateDir;
use crate::state::{ContainerState, Status};
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::Request;

/// Options of `husk resume`.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The container id.
    pub id: String,
}

/// `husk resume`.
pub fn resume(globals: &Globals, args: &ResumeArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let mut state = ContainerState::load(&dir)?;
    if !state.can_resume() {
        bail!("container {} is not paused: {}", args.id, state.status);
    }
    let mut client = connect(&dir)?;
    call_ok(
        &mut client,
        "resuming",
        &Request::Resume {
            id: args.id.clone(),
        },
    )?;
    state.status = Status::Running;
    state.save(&dir)?;
    Ok(())
}
