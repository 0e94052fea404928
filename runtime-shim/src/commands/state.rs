//! `husk state`: the OCI state document of a container, as runc prints it. Needs no live VM.

use crate::container::StateDir;
use crate::state::ContainerState;
use crate::Globals;
use anyhow::Result;

/// Options of `husk state`.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The container id.
    pub id: String,
}

/// `husk state`.
pub fn state(globals: &Globals, args: &StateArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let state = ContainerState::load(&dir)?;
    if state.status == crate::state::Status::Stopped {
        if let Some(reason) = dir.vmm_killed_by_seccomp() {
            eprintln!("husk: container {}: {reason}", args.id);
        }
    }
    crate::outln!("{}", serde_json::to_string_pretty(&state.oci_state())?);
    Ok(())
}
