//! `husk pause`: freeze every process of a running container.

use crate::agent::{call_ok, connect};
use crate::container::StateDir;
use crate::state::{ContainerState, Status};
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::Request;

/// Options of `husk pause`.
#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// The container id.
    pub id: String,
}

/// `husk pause`.
pub fn pause(globals: &Globals, args: &PauseArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let mut state = ContainerState::load(&dir)?;
    if !state.can_pause() {
        bail!("container {} is not running: {}", args.id, state.status);
    }
    let mut client = connect(&dir)?;
    call_ok(
        &mut client,
        "pausing",
        &Request::Pause {
            id: args.id.clone(),
        },
    )?;
    state.status = Status::Paused;
    state.save(&dir)?;
    Ok(())
}
