//! `husk run`: create and start a container; without `-d`, wait for it, delete it and exit
//! with its status (the same code, or 128 + the signal), as runc does.

use crate::commands::create::{create_container, CreateArgs};
use crate::commands::delete::{delete, DeleteArgs};
use crate::commands::start::start_locked;
use crate::Globals;
use anyhow::Result;
use husk_agent_protocol::ExitStatus;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

/// Options of `husk run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket that receives the pty master (with process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the container's pid (the husk-vmm process) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Detach: return once the container runs.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Keep the container's state after it exits (no automatic delete).
    #[arg(long)]
    pub keep: bool,
    /// Not supported (see `create`).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// The container id.
    pub id: String,
}

/// `husk run`; returns the exit code.
pub fn run(globals: &Globals, args: &RunArgs) -> Result<i32> {
    let create = CreateArgs {
        bundle: args.bundle.clone(),
        console_socket: args.console_socket.clone(),
        pid_file: args.pid_file.clone(),
        no_pivot: args.no_pivot,
        no_new_keyring: args.no_new_keyring,
        preserve_fds: 0,
        id: args.id.clone(),
    };
    let mut created = create_container(globals, &create)?;
    {
        let _lock = created.dir.lock()?;
        if let Err(e) = start_locked(&created.dir) {
            drop(_lock);
            let _ = delete(
                globals,
                &DeleteArgs {
                    force: true,
                    id: args.id.clone(),
                },
            );
            return Err(e);
        }
    }
    if args.detach {
        return Ok(0);
    }
    let status = created.child.wait()?;
    if !args.keep {
        delete(
            globals,
            &DeleteArgs {
                force: true,
                id: args.id.clone(),
            },
        )?;
    }
    // Like `runc run`: a container killed by a signal makes `run` exit with 128 + signal (the
    // container's pid itself, husk-vmm, was killed by the signal).
    Ok(husk_vmm::supervisor::exit_code_of(&ExitStatus {
        code: status.code(),
        signal: status.signal(),
        oom_killed: false,
    }))
}
