//! `husk exec`: run an extra process in a running container, in the foreground (relaying its
//! stdio and exiting with its code, 128 + signal when killed) or detached (`-d`: a background `husk` relays and mirrors
//! the status; its pid goes to `--pid-file`, which is what conmon waits on).

use crate::agent::{call, connect};
use crate::commands::create::validate_console_socket;
use crate::container::StateDir;
use crate::state::ContainerState;
use crate::Globals;
use anyhow::{bail, Context, Result};
use husk_agent_protocol::{AgentClient, ExecProcess, ProcessRef, Request, Response, StdioConfig};
use husk_vmm::supervisor::{mirror_exit, wait_on, HostStdio, Relay, SupervisorPlan};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// Options of `husk exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// An OCI `process` JSON file (instead of the command line).
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Allocate a pty (needs --console-socket).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Detach: return once the process runs.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the pid of the process that mirrors the exec'd process here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// User as uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long, short = 'g')]
    pub additional_gids: Vec<u32>,
    /// A Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Refused, as `process.selinuxLabel` in config.json is: the guest kernel has no LSM.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Refused, as `process.apparmorProfile` in config.json is: the guest kernel has no LSM.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Extra fds passed to the process: not supported (only 0 is accepted).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container id.
    pub id: String,
    /// The command and its arguments (without -p).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Options of the hidden `husk exec-attach` (the background half of `exec -d`).
#[derive(Debug, clap::Args)]
pub struct ExecAttachArgs {
    #[arg(long)]
    pub ready_fd: i32,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
    pub exec_id: String,
}

/// Builds the process to run: `-p` file, or the container's own process with the command
/// line's args, env, cwd and user.
pub fn build_process(dir: &StateDir, args: &ExecArgs) -> Result<Value> {
    let mut process = match &args.process {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid process JSON", path.display()))?
        }
        None => {
            if args.command.is_empty() {
                bail!("exec needs a command (or -p process.json)");
            }
            let plan: SupervisorPlan = serde_json::from_slice(
                &std::fs::read(dir.plan_file()).context("cannot read the container's plan")?,
            )?;
            let mut p = plan.spec["process"].clone();
            p["args"] = serde_json::json!(args.command);
            p
        }
    };
    let has_args = matches!(process["args"].as_array(), Some(a) if !a.is_empty());
    if !has_args {
        bail!("process.args must not be empty");
    }
    if args.tty {
        process["terminal"] = Value::Bool(true);
    } else if args.process.is_none() {
        process["terminal"] = Value::Bool(false);
    }
    if let Some(cwd) = &args.cwd {
        process["cwd"] = Value::String(cwd.clone());
    }
    if !args.env.is_empty() {
        let mut env: Vec<Value> = process["env"].as_array().cloned().unwrap_or_default();
        env.extend(args.env.iter().map(|e| Value::String(e.clone())));
        process["env"] = Value::Array(env);
    }
    if let Some(user) = &args.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let uid: u32 = uid.parse().context("--user: uid must be a number")?;
        process["user"]["uid"] = uid.into();
        if let Some(g) = gid {
            let gid: u32 = g.parse().context("--user: gid must be a number")?;
            process["user"]["gid"] = gid.into();
        }
    }
    if !args.additional_gids.is_empty() {
        process["user"]["additionalGids"] = serde_json::json!(args.additional_gids);
    }
    if args.no_new_privs {
        process["noNewPrivileges"] = Value::Bool(true);
    }
    if process["cwd"].as_str().is_none() {
        process["cwd"] = Value::String("/".into());
    }
    Ok(process)
}

/// A fresh exec id.
fn new_exec_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("exec-{}-{nanos}", std::process::id())
}

/// `husk exec`; returns the exit code (or re-raises the process's signal).
pub fn exec(globals: &Globals, args: &ExecArgs) -> Result<i32> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported by husk");
    }
    if args.apparmor.is_some() || args.process_label.is_some() {
        bail!(
            "--apparmor / --process-label are not supported: the guest kernel has no LSM \
             (the same as apparmorProfile / selinuxLabel in config.json)"
        );
    }
    let (exec_id, client) = {
        let _lock = dir.lock()?;
        let state = ContainerState::load(&dir)?;
        if !state.can_exec() {
            bail!("cannot exec in a {} container", state.status);
        }
        let process = build_process(&dir, args)?;
        let terminal = process["terminal"].as_bool().unwrap_or(false);
        match (&args.console_socket, terminal) {
            (Some(s), true) => validate_console_socket(s)?,
            (None, true) => bail!("a terminal needs --console-socket"),
            (Some(_), false) => bail!("--console-socket needs a terminal (--tty)"),
            (None, false) => {}
        }
        let exec_id = new_exec_id();
        let stdio = if terminal {
            StdioConfig {
                terminal: true,
                ..StdioConfig::default()
            }
        } else {
            StdioConfig {
                terminal: false,
                stdin: true,
                stdout: true,
                stderr: true,
            }
        };
        let mut client = connect(&dir)?;
        match call(
            &mut client,
            "creating the exec process",
            &Request::ExecProcess(ExecProcess {
                id: args.id.clone(),
                exec_id: exec_id.clone(),
                process,
                stdio,
            }),
        )? {
            Response::Created { .. } => {}
            other => bail!(
                "creating the exec process: unexpected {} reply",
                other.kind()
            ),
        }
        (exec_id, client)
    };
    if args.detach {
        return spawn_detached(globals, args, &exec_id);
    }
    if let Some(pid_file) = &args.pid_file {
        crate::state::write_atomic(pid_file, std::process::id().to_string().as_bytes())?;
    }
    attach_start_wait(
        &dir,
        &exec_id,
        Some(client),
        args.console_socket.as_deref(),
        &mut None,
        false,
    )
}

/// Attaches the exec process's stdio, starts it, reports `started` (if `ready`), waits, and
/// returns its exit code (128 + signal, as `runc exec` does), or with `reraise` ends this process
/// the way the exec'd process ended (the background half of `exec -d`, whose pid conmon waits on).
/// The process is started, and then waited for, on `control`, the connection that created it,
/// where there is one: each connection saved is a round trip to the agent saved.
fn attach_start_wait(
    dir: &StateDir,
    exec_id: &str,
    control: Option<AgentClient>,
    console_socket: Option<&std::path::Path>,
    ready: &mut Option<std::fs::File>,
    reraise: bool,
) -> Result<i32> {
    let socket = dir.vsock_socket();
    let process = ProcessRef {
        id: dir.id.clone(),
        exec_id: Some(exec_id.to_string()),
    };
    let relay = match console_socket {
        Some(console) => {
            let (path, connected) = husk_vmm::supervisor::connect_console(console)?;
            Relay::start_console(&socket, &process, &path, connected)?
        }
        // The exec process was created with all three streams (it may be attached by
        // `exec -d`'s background half, whose streams are not known when it is created).
        None => Relay::start_pipes(
            &socket,
            &process,
            HostStdio::dup_current()?,
            &StdioConfig {
                terminal: false,
                stdin: true,
                stdout: true,
                stderr: true,
            },
        )?,
    };
    let mut client = match control {
        Some(client) => client,
        None => connect(dir)?,
    };
    crate::agent::call_ok(
        &mut client,
        "starting the exec process",
        &Request::StartProcess(process.clone()),
    )?;
    if let Some(mut ready) = ready.take() {
        let _ = writeln!(ready, "started");
    }
    let status = wait_on(&mut client, &process).map_err(anyhow::Error::msg)?;
    relay.finish(husk_vmm::supervisor::DRAIN_TIMEOUT);
    if reraise {
        mirror_exit(&status)
    }
    Ok(husk_vmm::supervisor::exit_code_of(&status))
}

/// `exec -d`: a background `husk exec-attach` does the rest; its pid is the pid file's.
fn spawn_detached(globals: &Globals, args: &ExecArgs, exec_id: &str) -> Result<i32> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(write.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let exe = std::env::current_exe().context("cannot find the husk binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&globals.root)
        .arg("exec-attach")
        .arg("--ready-fd")
        .arg(write.as_raw_fd().to_string());
    if let Some(console) = &args.console_socket {
        cmd.arg("--console-socket").arg(console);
    }
    cmd.arg(&args.id).arg(exec_id);
    let child = cmd.spawn().context("cannot start the exec relay")?;
    drop(write);
    let mut line = String::new();
    let _ = std::fs::File::from(read).read_to_string(&mut line);
    if line.trim() != "started" {
        bail!("the exec process did not start: {}", line.trim());
    }
    if let Some(pid_file) = &args.pid_file {
        crate::state::write_atomic(pid_file, child.id().to_string().as_bytes())?;
    }
    Ok(0)
}

/// The hidden `husk exec-attach`.
pub fn exec_attach(globals: &Globals, args: &ExecAttachArgs) -> Result<i32> {
    let ready = husk_vmm::supervisor::take_ready_fd(args.ready_fd)?;
    let _ = nix::unistd::setsid();
    let dir = StateDir::new(&globals.root, &args.id)?;
    let mut ready = Some(ready);
    let result = attach_start_wait(
        &dir,
        &args.exec_id,
        None,
        args.console_socket.as_deref(),
        &mut ready,
        true,
    );
    if let Err(e) = &result {
        if let Some(mut r) = ready {
            let _ = writeln!(r, "error {e:#}");
        }
    }
    result
}
