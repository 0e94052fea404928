//! `husk ps`: the processes of a container (guest pids).

use crate::agent::{call, connect};
use crate::container::StateDir;
use crate::state::{ContainerState, Status};
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::{Request, Response};

/// Output format of `ps` and `list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Options of `husk ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: Format,
    /// The container id.
    pub id: String,
    /// `ps` options (not supported: the processes live in the guest).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `husk ps`.
pub fn ps(globals: &Globals, args: &PsArgs) -> Result<()> {
    if !args.ps_args.is_empty() {
        bail!("husk ps takes no ps(1) options: the container's processes run inside its microVM");
    }
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let state = ContainerState::load(&dir)?;
    let pids = if state.status == Status::Stopped {
        Vec::new()
    } else {
        let mut client = connect(&dir)?;
        match call(
            &mut client,
            "listing processes",
            &Request::ListProcesses {
                id: args.id.clone(),
            },
        )? {
            Response::Pids { pids } => pids,
            other => bail!("listing processes: unexpected {} reply", other.kind()),
        }
    };
    match args.format {
        Format::Json => crate::outln!("{}", serde_json::to_string(&pids)?),
        Format::Table => {
            crate::outln!("PID");
            for pid in pids {
                crate::outln!("{pid}");
            }
        }
    }
    Ok(())
}
