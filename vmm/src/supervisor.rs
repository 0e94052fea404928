//! Container supervisor mode of `husk-vmm` (`--supervise PLAN`): the process an OCI engine sees
//! as the container.
//!
//! `husk create` spawns `husk-vmm --supervise <state dir>/plan.json ...` detached and waits on
//! a pipe. After boot the supervisor thread:
//! 1. connects to the agent and sends `CreateContainer` (the spec already has guest paths);
//! 2. attaches the process's standard streams: without a terminal, stdin/stdout/stderr relay to
//!    and from this process's own fds 0/1/2 (which are `create`'s); with `process.terminal`, it
//!    opens a host pty, sends the master over `--console-socket` (SCM_RIGHTS, as runc does) and
//!    relays the slave both ways, forwarding window-size changes with `ResizePty`;
//! 3. writes `created <guest pid>` to the ready pipe (`create` then exits);
//! 4. waits for the init (`WaitProcess`), records the exit in the plan's `exit_file`, asks the
//!    agent to shut the guest down, and when the VM has gone exits with the init's status:
//!    the same exit code, or the same signal re-raised ([`mirror_exit`]; 128 + the signal when
//!    husk-vmm is pid 1 of its own pid namespace), so that conmon and containerd-shim-runc-v2
//!    read it as they would read runc's container process.
//!
//! Before the VM starts, fds 0/1/2 are duplicated for the relays and replaced by `/dev/null`
//! and the log file, so that VMM logs never mix with the container's output.
//!
//! The same building blocks ([`open_stream`], [`Relay`], [`mirror_exit`]) serve `husk exec`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::{
    read_frame, write_frame, AttachStdio, CreateContainer, ExitStatus, ProcessRef, Request,
    Response, StdioConfig, StreamKind, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};

use crate::builder::build_microvm;
use crate::config::VmConfig;
use crate::vmm::VmmExit;

/// How long stdout/stderr may keep draining after the process exited.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the VM may take to shut down after the agent acknowledged `Shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Socket timeout used where the wait is unbounded (a process may run for years).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How often a relayed terminal's window size is checked for changes.
const WINSIZE_POLL: Duration = Duration::from_millis(100);

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The plan file could not be read.
    #[error("cannot read the supervisor plan {0}")]
    ReadPlan(PathBuf, #[source] io::Error),
    /// The plan file is not valid JSON of the expected shape.
    #[error("invalid supervisor plan {0}")]
    ParsePlan(PathBuf, #[source] serde_json::Error),
    /// The ready fd given by `husk create` is not open.
    #[error("ready fd {0} is not an open file descriptor")]
    ReadyFd(RawFd),
    /// Rearranging the standard fds failed.
    #[error("failed to set up the standard streams")]
    Stdio(#[source] io::Error),
    /// The microVM could not be built.
    #[error("failed to build the microVM")]
    Build(#[from] crate::builder::BuildError),
    /// The microVM failed while running.
    #[error("the microVM failed")]
    Run(#[from] crate::vmm::VmmError),
    /// Talking to the agent failed.
    #[error("agent: {0}")]
    Agent(String),
    /// The console socket could not be used.
    #[error("console socket {0}")]
    Console(PathBuf, #[source] io::Error),
    /// `process.terminal` without a console socket to send the pty to.
    #[error("process.terminal is set but no console socket was given")]
    NoConsoleSocket,
    /// The host pty could not be set up.
    #[error("failed to set up the host pty")]
    Pty(#[source] nix::Error),
    /// The VM ended before the container's init exited.
    #[error("the microVM ended before the container exited ({0:?})")]
    VmEnded(VmmExit),
}

impl SupervisorError {
    /// Whether the VM could not start from its template (the runtime boots instead).
    pub fn is_template_refusal(&self) -> bool {
        match self {
            SupervisorError::Build(e) => e.is_template_refusal(),
            SupervisorError::Run(e) => e.is_template_refusal(),
            _ => false,
        }
    }
}

/// What `husk create` tells the supervisor (a JSON file in the state dir).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupervisorPlan {
    /// Container id.
    pub id: String,
    /// The OCI spec with guest paths.
    pub spec: serde_json::Value,
    /// The bundle as the guest sees it.
    pub bundle: String,
    /// `process.terminal`.
    pub terminal: bool,
    /// Where to send the pty master (required with `terminal`).
    pub console_socket: Option<PathBuf>,
    /// The write end of `create`'s ready pipe, inherited.
    pub ready_fd: Option<RawFd>,
    /// Where the init's [`ExitStatus`] is written (JSON) once it exited.
    pub exit_file: PathBuf,
    /// Where the VMM's own logs go (stderr is the container's); `/dev/null` when `None`.
    pub log_file: Option<PathBuf>,
    /// Start the init's program as soon as the container exists and its streams are
    /// relayed, and report `started` rather than `created`: `husk run` of a container with
    /// no hook to run in between, which spares it the round trip of a separate start.
    #[serde(default)]
    pub start: bool,
}

/// The container's standard streams on the host side.
#[derive(Debug)]
pub struct HostStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl HostStdio {
    /// Duplicates this process's fds 0, 1 and 2 (close-on-exec).
    pub fn dup_current() -> io::Result<HostStdio> {
        Ok(HostStdio {
            stdin: io::stdin().as_fd().try_clone_to_owned()?,
            stdout: io::stdout().as_fd().try_clone_to_owned()?,
            stderr: io::stderr().as_fd().try_clone_to_owned()?,
        })
    }

    /// The streams worth relaying: those that are not the host's `/dev/null`. A stream that is
    /// gets the guest's own `/dev/null` instead (reads see end of file, writes vanish, as
    /// they would on the host), and costs no connection to the agent.
    pub fn to_relay(&self) -> StdioConfig {
        StdioConfig {
            terminal: false,
            stdin: !is_dev_null(&self.stdin),
            stdout: !is_dev_null(&self.stdout),
            stderr: !is_dev_null(&self.stderr),
        }
    }
}

/// Whether `fd` is the host's `/dev/null` (the character device 1:3).
fn is_dev_null(fd: &OwnedFd) -> bool {
    nix::sys::stat::fstat(fd.as_raw_fd()).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
    })
}

/// Runs a container VM: builds the VM from `cfg`, supervises the container described by the
/// plan at `plan_path`, and exits the process with the init's mirrored status. Returns only
/// on errors before the container existed (the caller prints the error and exits 1).
pub fn run_supervised(cfg: &VmConfig, plan_path: &Path) -> Result<i32, SupervisorError> {
    let text = std::fs::read_to_string(plan_path)
        .map_err(|e| SupervisorError::ReadPlan(plan_path.to_path_buf(), e))?;
    let plan: SupervisorPlan = serde_json::from_str(&text)
        .map_err(|e| SupervisorError::ParsePlan(plan_path.to_path_buf(), e))?;
    // A new session, so that the engine's terminal and process group signals do not reach us
    // (fails harmlessly if we already lead one).
    let _ = nix::unistd::setsid();
    let ready = match plan.ready_fd {
        Some(fd) => Some(take_ready_fd(fd)?),
        None => None,
    };
    let ready = Arc::new(Mutex::new(ready));
    let result = supervise(cfg, &plan, ready.clone());
    match &result {
        // `husk create` boots instead, and says why.
        Err(e) if e.is_template_refusal() => {
            report_ready(&ready, &format!("refused {}", error_chain(e)))
        }
        Err(e) => report_ready(&ready, &format!("error {}", error_chain(e))),
        Ok(_) => {}
    }
    result
}

fn supervise(
    cfg: &VmConfig,
    plan: &SupervisorPlan,
    ready: Arc<Mutex<Option<File>>>,
) -> Result<i32, SupervisorError> {
    let stdio = HostStdio::dup_current().map_err(SupervisorError::Stdio)?;
    redirect_own_stdio(plan.log_file.as_deref()).map_err(SupervisorError::Stdio)?;
    if plan.terminal && plan.console_socket.is_none() {
        return Err(SupervisorError::NoConsoleSocket);
    }
    let mut vmm = build_microvm(cfg)?;
    let renewed = vmm.renewed_connection();
    // The console socket is a path of the engine's, outside the jail: connected now, used
    // once the container exists. Not before the build, which may refuse a template (the
    // engine would see a connection end without a console, and `husk create` boots anew).
    let console = match (&plan.console_socket, plan.terminal) {
        (Some(path), true) => Some(connect_console(path)?),
        _ => None,
    };
    let mut jail = cfg.jail_plan();
    jail.dir_of(&plan.exit_file);
    jail.pty = plan.terminal;
    // Before the supervisor thread starts: it inherits what is left.
    crate::confine::confine(&jail, cfg.seccomp_report.as_deref())
        .map_err(crate::vmm::VmmError::Confine)?
        .record(vmm.timeline());
    let outcome: Arc<Mutex<Option<Result<ExitStatus, String>>>> = Arc::new(Mutex::new(None));
    let thread = {
        let outcome = outcome.clone();
        let plan = plan.clone();
        let socket = cfg.vsock_socket.clone();
        let timeout = cfg.agent_timeout;
        let ready = ready.clone();
        thread::Builder::new()
            .name("husk-supervisor".into())
            .spawn(move || {
                crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Agent);
                let result =
                    supervise_container(&socket, timeout, &plan, stdio, console, &ready, renewed);
                if let Err(e) = &result {
                    tracing::error!("container supervision failed: {e}");
                    report_ready(&ready, &format!("error {e}"));
                    // End the VM: the run loop treats SIGTERM as "stop".
                    stop_own_vm();
                }
                *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            })
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?
    };
    let exit = vmm.run()?;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !thread.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let outcome = outcome.lock().unwrap_or_else(|p| p.into_inner()).take();
    match outcome {
        Some(Ok(status)) => mirror_exit(&status),
        Some(Err(message)) => Err(SupervisorError::Agent(message)),
        None => Err(SupervisorError::VmEnded(exit)),
    }
}

/// The supervisor thread's work; returns the init's exit status.
fn supervise_container(
    socket: &Path,
    timeout: Duration,
    plan: &SupervisorPlan,
    stdio: HostStdio,
    console: Option<(PathBuf, UnixStream)>,
    ready: &Mutex<Option<File>>,
    renewed: Option<mpsc::Receiver<AgentClient>>,
) -> Result<ExitStatus, String> {
    // A restored guest's renewal connection, or (a booted guest, a failed renewal) one of our own.
    let mut control = match renewed.and_then(|r| r.recv_timeout(timeout).ok()) {
        Some(client) => client,
        None => {
            AgentClient::connect(socket, timeout)
                .map_err(|e| format!("connect: {}", chain(&e)))?
                .0
        }
    };
    // Creating the container (share mounts through virtio-fs, the helper's setup) can take
    // long on a loaded host, like the boot: wait for it as long as for the agent.
    control
        .set_io_timeout(timeout)
        .map_err(|e| format!("connect: {}", chain(&e)))?;
    let process = ProcessRef {
        id: plan.id.clone(),
        exec_id: None,
    };
    let stdio_config = if plan.terminal {
        StdioConfig {
            terminal: true,
            ..StdioConfig::default()
        }
    } else {
        stdio.to_relay()
    };
    let pid = match control
        .request(&Request::CreateContainer(CreateContainer {
            id: plan.id.clone(),
            spec: plan.spec.clone(),
            bundle: plan.bundle.clone(),
            stdio: stdio_config,
        }))
        .map_err(|e| chain(&e))?
    {
        Response::Created { pid } => pid,
        Response::Error { message } => return Err(format!("create container: {message}")),
        other => {
            return Err(format!(
                "create container: unexpected {} reply",
                other.kind()
            ))
        }
    };
    let relay = if let Some((path, console)) = console {
        Relay::start_console(socket, &process, &path, console).map_err(|e| error_chain(&e))?
    } else {
        Relay::start_pipes(socket, &process, stdio, &stdio_config).map_err(|e| error_chain(&e))?
    };
    let reached = if plan.start {
        match control.request(&Request::StartProcess(process.clone())) {
            Ok(Response::Ok) => "started",
            Ok(Response::Error { message }) => return Err(format!("start container: {message}")),
            Ok(other) => {
                return Err(format!(
                    "start container: unexpected {} reply",
                    other.kind()
                ))
            }
            Err(e) => return Err(format!("start container: {}", chain(&e))),
        }
    } else {
        "created"
    };
    if !report_ready_at(ready, &format!("{reached} {pid}")) {
        // Killed before it learned of the container, `husk create` may not have recorded this
        // VMM: nobody could ever manage or delete it, so it ends here.
        return Err("husk create is gone before it learned the container was created".into());
    }
    // On the control connection, which nothing else needs until the init has exited.
    let status = wait_on(&mut control, &process)?;
    control
        .set_io_timeout(timeout)
        .map_err(|e| format!("wait: {}", chain(&e)))?;
    write_exit_file(&plan.exit_file, &status);
    relay.finish(DRAIN_TIMEOUT);
    match control.request(&Request::Shutdown) {
        // The agent synced the guest's file systems before it answered: nothing of the
        // container's is left in the guest, whose own shutdown (a reset after the agent sees
        // this connection close) would only add to the time `husk run` waits.
        Ok(Response::Ok) => {
            stop_own_vm();
            return Ok(status);
        }
        Ok(other) => tracing::warn!("agent shutdown request: unexpected {} reply", other.kind()),
        Err(e) => tracing::warn!("agent shutdown request failed: {e}"),
    }
    // The VM resets shortly; if it does not, stop it ourselves.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    thread::spawn(move || {
        thread::sleep(deadline.saturating_duration_since(Instant::now()));
        stop_own_vm();
    });
    Ok(status)
}

/// Sends `WaitProcess` on its own connection and waits without a deadline.
pub fn wait_process(
    client: Result<(AgentClient, husk_agent_protocol::Handshake), husk_agent_protocol::ClientError>,
    process: &ProcessRef,
) -> Result<ExitStatus, String> {
    let (mut client, _) = client.map_err(|e| format!("connect: {}", chain(&e)))?;
    wait_on(&mut client, process)
}

/// Sends `WaitProcess` on `client` and waits without a deadline.
pub fn wait_on(client: &mut AgentClient, process: &ProcessRef) -> Result<ExitStatus, String> {
    client.set_io_timeout(FOREVER).map_err(|e| chain(&e))?;
    match client
        .request(&Request::WaitProcess(process.clone()))
        .map_err(|e| format!("wait: {}", chain(&e)))?
    {
        Response::Exited(status) => Ok(status),
        Response::Error { message } => Err(format!("wait: {message}")),
        other => Err(format!("wait: unexpected {} reply", other.kind())),
    }
}

/// Asks this process's run loop to stop the VM (a process-directed SIGTERM, which the run
/// loop's signalfd reads).
fn stop_own_vm() {
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM);
}

/// Writes the exit status JSON atomically (temp file + rename).
fn write_exit_file(path: &Path, status: &ExitStatus) {
    let result = serde_json::to_vec(status)
        .map_err(io::Error::other)
        .and_then(|json| crate::atomic_file::write_atomic(path, &json));
    if let Err(e) = result {
        tracing::warn!("failed to write {}: {e}", path.display());
    }
}

/// The error and its causes on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn error_chain(err: &SupervisorError) -> String {
    chain(err)
}

/// Takes ownership of an inherited ready pipe (the fd number came from the parent).
pub fn take_ready_fd(fd: RawFd) -> Result<File, SupervisorError> {
    if fd < 3 {
        return Err(SupervisorError::ReadyFd(fd));
    }
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags; a closed fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(SupervisorError::ReadyFd(fd));
    }
    // SAFETY: `husk create` opened this descriptor for us and passed its number; it is open
    // (checked above) and nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sets FD_CLOEXEC on a descriptor we own; no memory is involved.
    let _ = unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(File::from(owned))
}

fn report_ready(ready: &Arc<Mutex<Option<File>>>, line: &str) {
    report_ready_at(ready, line);
}

/// Writes one line to the ready pipe and closes it (only the first report counts). Returns
/// false when the line could not be written: `husk create` is gone (EPIPE).
fn report_ready_at(ready: &Mutex<Option<File>>, line: &str) -> bool {
    let file = ready.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut file) = file {
        let line = line.replace('\n', " ");
        if let Err(e) = writeln!(file, "{line}") {
            tracing::warn!("failed to report to husk create: {e}");
            return false;
        }
    }
    true
}

/// Points fds 0/1/2 at `/dev/null` and the log file (fd 1 and 2).
fn redirect_own_stdio(log_file: Option<&Path>) -> io::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let log = match log_file {
        Some(path) => OpenOptions::new().create(true).append(true).open(path)?,
        None => null.try_clone()?,
    };
    nix::unistd::dup2(null.as_raw_fd(), 0).map_err(io::Error::from)?;
    nix::unistd::dup2(log.as_raw_fd(), 1).map_err(io::Error::from)?;
    nix::unistd::dup2(log.as_raw_fd(), 2).map_err(io::Error::from)?;
    Ok(())
}

/// One CONNECT + handshake, then `AttachStdio`: returns the raw stream of `kind`. All three
/// go out in one write, a single round trip: the vsock device hands the bytes after the
/// `CONNECT` line to the agent once it accepts, and the agent answers requests in order.
pub fn open_stream(
    socket: &Path,
    process: &ProcessRef,
    kind: StreamKind,
) -> Result<UnixStream, SupervisorError> {
    let agent = |what: &str, e: &dyn std::fmt::Display| {
        SupervisorError::Agent(format!("attaching {kind:?}: {what}: {e}"))
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| agent("connect", &e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| agent("socket", &e))?;
    let mut hello = format!("CONNECT {AGENT_VSOCK_PORT}\n").into_bytes();
    write_frame(
        &mut hello,
        &Request::Handshake {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .map_err(|e| agent("handshake", &e))?;
    write_frame(
        &mut hello,
        &Request::AttachStdio(AttachStdio {
            process: process.clone(),
            stream: kind,
        }),
    )
    .map_err(|e| agent("request", &e))?;
    stream.write_all(&hello).map_err(|e| agent("CONNECT", &e))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => return Err(agent("CONNECT", &"closed before OK")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(agent("CONNECT", &e)),
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(agent("CONNECT", &String::from_utf8_lossy(&line)));
    }
    match read_frame::<_, Response>(&mut stream).map_err(|e| agent("handshake", &e))? {
        Response::Handshake(h) if h.protocol_version == PROTOCOL_VERSION => {}
        other => return Err(agent("handshake", &other.kind())),
    }
    match read_frame::<_, Response>(&mut stream).map_err(|e| agent("reply", &e))? {
        Response::Ok => {}
        Response::Error { message } => return Err(agent("refused", &message)),
        other => return Err(agent("reply", &other.kind())),
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| agent("socket", &e))?;
    Ok(stream)
}

/// Relay threads of one process's standard streams.
pub struct Relay {
    /// Threads that end when the guest side closes (stdout, stderr, pty output).
    outputs: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Attaches the streams of stdin, stdout and stderr that `which` names (the agent was
    /// told the same; the others are the guest's `/dev/null`) and relays them to and from
    /// `host`. The attachments, three round trips to the agent each, are made at once.
    pub fn start_pipes(
        socket: &Path,
        process: &ProcessRef,
        host: HostStdio,
        which: &StdioConfig,
    ) -> Result<Relay, SupervisorError> {
        let (stdin, stdout, stderr) = thread::scope(|scope| {
            let attach = |wanted: bool, kind: StreamKind| {
                wanted.then(|| scope.spawn(move || open_stream(socket, process, kind)))
            };
            let handles = [
                attach(which.stdin, StreamKind::Stdin),
                attach(which.stdout, StreamKind::Stdout),
                attach(which.stderr, StreamKind::Stderr),
            ];
            let mut streams = handles.map(|handle| {
                handle.map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SupervisorError::Agent("a stream's attach panicked".into()))
                    })
                })
            });
            // The first error in stream order, once every attempt has ended.
            let mut take = |i: usize| streams[i].take().transpose();
            Ok::<_, SupervisorError>((take(0)?, take(1)?, take(2)?))
        })?;
        let HostStdio {
            stdin: host_in,
            stdout: host_out,
            stderr: host_err,
        } = host;
        if let Some(stdin) = stdin {
            thread::Builder::new()
                .name("husk-stdin".into())
                .spawn(move || {
                    crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Relay);
                    let mut stdin = stdin;
                    pump(&mut File::from(host_in), &mut stdin);
                    let _ = stdin.shutdown(std::net::Shutdown::Write);
                })
                .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        }
        let mut outputs = Vec::new();
        if let Some(stdout) = stdout {
            outputs.push(spawn_copy("husk-stdout", stdout, File::from(host_out))?);
        }
        if let Some(stderr) = stderr {
            outputs.push(spawn_copy("husk-stderr", stderr, File::from(host_err))?);
        }
        Ok(Relay { outputs })
    }

    /// Attaches the process's pty: makes a host pty, sends its master over `console` (the
    /// engine's console socket at `console_path`, see [`connect_console`]), and relays the
    /// slave both ways, forwarding window-size changes.
    pub fn start_console(
        socket: &Path,
        process: &ProcessRef,
        console_path: &Path,
        console: UnixStream,
    ) -> Result<Relay, SupervisorError> {
        let pty = nix::pty::openpty(None, None).map_err(SupervisorError::Pty)?;
        let mut termios = nix::sys::termios::tcgetattr(&pty.slave).map_err(SupervisorError::Pty)?;
        nix::sys::termios::cfmakeraw(&mut termios);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)
            .map_err(SupervisorError::Pty)?;
        send_console(&console, &pty.master)
            .map_err(|e| SupervisorError::Console(console_path.to_path_buf(), e))?;
        drop(console);
        drop(pty.master);
        let stream = open_stream(socket, process, StreamKind::Pty)?;
        let slave = File::from(pty.slave);
        let to_guest = stream
            .try_clone()
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        let from_slave = slave
            .try_clone()
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        let winsize_fd = slave
            .try_clone()
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        thread::Builder::new()
            .name("husk-pty-in".into())
            .spawn(move || {
                crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Relay);
                let mut to_guest = to_guest;
                pump(&mut { from_slave }, &mut to_guest);
            })
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        let out = spawn_copy("husk-pty-out", stream, slave)?;
        let socket = socket.to_path_buf();
        let process = process.clone();
        thread::Builder::new()
            // An agent client like the supervisor that starts it, whose list it inherits.
            .spawn(move || forward_window_size(&socket, &process, &winsize_fd))
            .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))?;
        Ok(Relay { outputs: vec![out] })
    }

    /// Waits up to `timeout` for the output relays to drain.
    pub fn finish(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for handle in self.outputs {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

fn spawn_copy(
    name: &str,
    mut from: UnixStream,
    mut to: File,
) -> Result<JoinHandle<()>, SupervisorError> {
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Relay);
            pump(&mut from, &mut to);
            let _ = to.flush();
        })
        .map_err(|e| SupervisorError::Stdio(io::Error::other(e)))
}

/// Copies until end of stream or an error, passing on every read at once. (Not `io::copy`:
/// its splice fast path from a socket into a pipe held data back until the stream ended.)
pub fn pump(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Connects to the engine's console socket at `path`.
pub fn connect_console(path: &Path) -> Result<(PathBuf, UnixStream), SupervisorError> {
    UnixStream::connect(path)
        .map(|stream| (path.to_path_buf(), stream))
        .map_err(|e| SupervisorError::Console(path.to_path_buf(), e))
}

/// Sends `master` over the engine's console socket with SCM_RIGHTS, with the pty's name as
/// the message body (as runc does).
pub fn send_console(socket: &UnixStream, master: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let name = nix::unistd::ttyname(master.as_fd())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/dev/ptmx".into());
    let iov = [io::IoSlice::new(name.as_bytes())];
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    Ok(())
}

/// The terminal size of `fd` as (rows, cols).
pub fn window_size(fd: &impl AsRawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_row, ws.ws_col))
}

/// Polls the host pty's window size and sends every change to the guest.
fn forward_window_size(socket: &Path, process: &ProcessRef, fd: &File) {
    let mut client = None;
    let mut last = None;
    loop {
        let Some(size) = window_size(fd) else { return };
        if Some(size) != last && size != (0, 0) {
            if client.is_none() {
                client = AgentClient::connect(socket, Duration::from_secs(5))
                    .ok()
                    .map(|(c, _)| c);
            }
            let Some(c) = client.as_mut() else { return };
            let reply = c.request(&Request::ResizePty {
                process: process.clone(),
                rows: size.0,
                cols: size.1,
            });
            if reply.is_err() {
                return;
            }
            last = Some(size);
        }
        thread::sleep(WINSIZE_POLL);
    }
}

/// The exit code a shell reports for `status`: the code, or 128 + the signal.
pub fn exit_code_of(status: &ExitStatus) -> i32 {
    match (status.code, status.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 255,
    }
}

/// Signals whose default action terminates the process (with or without a core dump), which
/// [`mirror_exit`] can therefore re-raise.
fn is_terminating(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGHUP
            | libc::SIGINT
            | libc::SIGQUIT
            | libc::SIGILL
            | libc::SIGTRAP
            | libc::SIGABRT
            | libc::SIGBUS
            | libc::SIGFPE
            | libc::SIGKILL
            | libc::SIGUSR1
            | libc::SIGSEGV
            | libc::SIGUSR2
            | libc::SIGPIPE
            | libc::SIGALRM
            | libc::SIGTERM
            | libc::SIGSTKFLT
            | libc::SIGXCPU
            | libc::SIGXFSZ
            | libc::SIGVTALRM
            | libc::SIGPROF
            | libc::SIGIO
            | libc::SIGPWR
            | libc::SIGSYS
    )
}

/// Ends this process the way the container's init ended: killed by the same signal (default
/// action, no core dump), or exiting with the same code.
///
/// A process that is pid 1 of its pid namespace (a jailed husk-vmm) cannot die of a signal it
/// raises: the kernel drops it. It exits with 128 + the signal instead, which is what conmon
/// and containerd-shim-runc-v2 make of a signal death too.
pub fn mirror_exit(status: &ExitStatus) -> ! {
    let init_of_its_namespace = nix::unistd::getpid().as_raw() == 1;
    if let Some(signal) = status
        .signal
        .filter(|s| is_terminating(*s) && !init_of_its_namespace)
    {
        let rlimit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the valid `rlimit` above; no core dump for a mirrored signal.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &rlimit) };
        if let Ok(sig) = nix::sys::signal::Signal::try_from(signal) {
            if sig != nix::sys::signal::Signal::SIGKILL {
                // SAFETY: installs the default disposition; no handler code is involved.
                let _ =
                    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(sig);
                let _ = set.thread_unblock();
            }
            let _ = nix::sys::signal::raise(sig);
            // A thread-directed signal may need a moment to be acted upon.
            thread::sleep(Duration::from_millis(100));
        }
    }
    std::process::exit(exit_code_of(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hosts_dev_null_goes_unrelayed() {
        let null = OwnedFd::from(File::open("/dev/null").expect("/dev/null"));
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let zero = OwnedFd::from(File::open("/dev/zero").expect("/dev/zero"));
        assert!(is_dev_null(&null));
        assert!(!is_dev_null(&read) && !is_dev_null(&write) && !is_dev_null(&zero));
        let host = HostStdio {
            stdin: null,
            stdout: write,
            stderr: zero,
        };
        assert_eq!(
            host.to_relay(),
            StdioConfig {
                terminal: false,
                stdin: false,
                stdout: true,
                stderr: true,
            }
        );
    }

    #[test]
    fn exit_code_is_code_or_128_plus_signal() {
        let code = ExitStatus {
            code: Some(42),
            signal: None,
            oom_killed: false,
        };
        assert_eq!(exit_code_of(&code), 42);
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: false,
        };
        assert_eq!(exit_code_of(&killed), 137);
    }

    #[test]
    fn only_terminating_signals_are_reraised() {
        assert!(is_terminating(libc::SIGKILL));
        assert!(is_terminating(libc::SIGTERM));
        assert!(!is_terminating(libc::SIGCHLD));
        assert!(!is_terminating(libc::SIGSTOP));
        assert!(!is_terminating(libc::SIGWINCH));
    }

    #[test]
    fn plan_round_trips_as_json() {
        let plan = SupervisorPlan {
            id: "c1".into(),
            spec: serde_json::json!({"ociVersion": "1.0.2"}),
            bundle: "/run/husk/shared/c1".into(),
            terminal: false,
            console_socket: None,
            ready_fd: Some(5),
            exit_file: "/run/husk/c1/exit.json".into(),
            log_file: None,
            start: true,
        };
        let json = serde_json::to_string(&plan).expect("serializable");
        let back: SupervisorPlan = serde_json::from_str(&json).expect("valid");
        assert_eq!(back, plan);
    }

    #[test]
    fn console_fd_is_received_over_the_socket() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let (_, socket) = connect_console(&path).expect("connected");
        send_console(&socket, &pty.master).expect("sent");
        let (conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 256];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("recvmsg");
        let mut got = None;
        for cmsg in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                got = fds.first().copied();
            }
        }
        let fd = got.expect("an fd was passed");
        // SAFETY: the fd was just received and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        assert!(window_size(&owned).is_some());
    }
}
