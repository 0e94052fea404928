//! `husk run`: create and start a container; without `-d`, wait for it, delete it and exit
//! with its status (the same code, or 128 + the signal), as runc does. A foreground `run`
//! forwards the usual job-control signals (HUP, INT, QUIT, TERM, USR1, USR2) to the container.

use crate::agent::{call_ok, connect, init_process};
use crate::commands::create::{create_container, CreateArgs, Then};
use crate::commands::delete::{delete, DeleteArgs};
use crate::commands::start::{run_poststart, start_locked};
use crate::container::StateDir;
use crate::state::Status;
use crate::Globals;
use anyhow::Result;
use husk_agent_protocol::ExitStatus;
use husk_agent_protocol::Request;
use nix::sys::signal::{SigSet, Signal};
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

/// Signals a foreground `run` forwards to the container's init, as runc does.
const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Blocks [`FORWARDED`] in this thread (threads spawned later inherit it) and forwards each
/// one that arrives to the container's init through the agent.
fn forward_signals(dir: &StateDir) {
    let mut set = SigSet::empty();
    for sig in FORWARDED {
        set.add(*sig);
    }
    if set.thread_block().is_err() {
        crate::logging::warn("cannot block signals: they will not reach the container");
        return;
    }
    let dir = dir.clone();
    let spawned = std::thread::Builder::new()
        .name("husk-signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { return };
            if sig == Signal::SIGWINCH {
                continue;
            }
            let request = Request::SignalProcess {
                process: init_process(&dir.id),
                signal: sig as i32,
                all: false,
            };
            let sent =
                connect(&dir).and_then(|mut c| call_ok(&mut c, "forwarding a signal", &request));
            if let Err(e) = sent {
                crate::logging::debug(&format!("signal {sig} not forwarded: {e}"));
            }
        });
    if spawned.is_err() {
        crate::logging::warn("cannot start the signal forwarder");
    }
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
    let mut created = create_container(globals, &create, Then::Start)?;
    if !args.detach {
        // Blocked only now, so that the VMM (already spawned) keeps its own signal mask.
        forward_signals(&created.dir);
    }
    {
        let _lock = created.dir.lock()?;
        let started = if created.state.status == Status::Running {
            run_poststart(&created.state)
        } else {
            start_locked(&created.dir)
        };
        if let Err(e) = started {
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
