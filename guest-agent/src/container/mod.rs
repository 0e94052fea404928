//! Containers inside the guest: the agent's side of the OCI operations of the protocol.
//!
//! # Why our own code and not youki's `libcontainer`
//!
//! `libcontainer` is a complete runtime: it keeps its own state directory, drives hooks, owns
//! the process tree through its own fork/IPC scheme (a three-stage clone dance for user
//! namespaces), supports cgroup v1 and v2 and systemd, and pulls in a large
//! dependency tree (procfs, nix of another version, oci-spec, libbpf-less device emulation,
//! ...). The agent is PID 1 of a VM that has one job: turn the spec the host sends into
//! processes. Our needs are narrower (cgroup v2 only, hooks run by the host, no state on
//! disk: the agent's memory is the state, the VM is the boundary) and the agent must own
//! process lifetime itself (reaping, exit routing, stdio over vsock). So the setup is ours and
//! short: [`spec`] translates and checks the spec (pure, unit tested), [`seccomp`] compiles
//! seccomp profiles with `seccompiler`, [`cgroup`] writes cgroup v2 files, and [`child`] is the
//! init helper that applies it all in a fresh process.
//!
//! # Processes
//!
//! A process (a container's init or an exec) starts as the agent binary re-executed in helper
//! mode ([`child::INIT_ARG`]) through `clone(2)` (with `CLONE_NEWPID` for a new container), so
//! that setup runs single threaded. A container with a user namespace of its own gets it from
//! the helper's `unshare`, its maps written by the agent (root of the parent namespace) when the
//! helper asks, and then every other namespace, the pid namespace included, so that the user
//! namespace owns them; the helper reports `Ready` and blocks until
//! `StartProcess`, then `execve`s the program. Every process is a child of the agent (a helper
//! that must fork to enter a joined pid namespace forks with `CLONE_PARENT`), so the agent's
//! [`Reaper`] reaps it and routes its status. On the host (`--serve-unix`) the agent makes
//! itself a child subreaper for the same effect.
//!
//! A container without its own pid and mount namespaces is refused: it could signal PID 1 or
//! change the guest's mounts. Everything the host sends is bounded ([`MAX_CONTAINERS`],
//! [`MAX_EXECS`], [`spec::MAX_LIST_LEN`], frame sizes) and every failure is an error reply.

pub mod cgroup;
pub mod child;
pub mod devices;
pub mod seccomp;
pub mod spec;
mod syscalls_x86_64;

use crate::reaper::{ExitStatus as ReapStatus, Reaper};
use cgroup::Cgroup;
use child::{FromInit, InitConfig, ToInit};
use husk_agent_protocol::{
    read_frame, write_frame, ContainerInfo, ContainerStats, ContainerStatus, ExitStatus,
    FrameError, StdioConfig, StreamKind, PROCESS_SETUP_TIMEOUT,
};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use spec::{NamespacePlan, Plan};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most containers at once.
pub const MAX_CONTAINERS: usize = 256;
/// Most exec'd processes a container keeps; at the limit the exited ones are forgotten.
pub const MAX_EXECS: usize = 1024;
/// Longest identifier.
pub const MAX_ID_LEN: usize = 128;

/// How long a helper whose socket closed may take to be reaped, for its status in the error.
const HELPER_END_WAIT: Duration = Duration::from_secs(2);
/// How many of the guest kernel's last messages the error of a helper killed by a signal
/// carries.
const KERNEL_LOG_LINES: usize = 12;
/// The longest of those messages kept whole (a line of an oops is shorter).
const KERNEL_LOG_LINE_MAX: usize = 240;
/// Stack of the clone child (it only duplicates descriptors and execs).
const CLONE_STACK_LEN: usize = 64 * 1024;
/// Buffer of a stdio copy thread.
const COPY_BUF_LEN: usize = 32 * 1024;

/// Errors of container operations; each becomes an error reply.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("bad identifier {0:?}: want [A-Za-z0-9][A-Za-z0-9_.-]*, at most {MAX_ID_LEN} bytes")]
    BadId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no container {0}")]
    NoContainer(String),
    #[error("container {id} has no process {exec_id}")]
    NoProcess { id: String, exec_id: String },
    #[error("process {exec_id} already exists in container {id}")]
    ProcessExists { id: String, exec_id: String },
    #[error("too many {0}")]
    TooMany(&'static str),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Devices(#[from] devices::DevicesError),
    #[error("the container's process setup failed: {0}")]
    Setup(String),
    #[error("{0}")]
    State(String),
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(Errno) -> ContainerError {
    let what = what.into();
    move |errno| ContainerError::Sys { what, errno }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// Checks an identifier (`id`, `exec_id`).
pub fn check_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadId(id.chars().take(MAX_ID_LEN).collect()))
    }
}

/// How logs name a process: `container ID` or `container ID process EXEC_ID`.
fn process_label(id: &str, exec_id: Option<&str>) -> String {
    match exec_id {
        Some(exec_id) => format!("container {id} process {exec_id}"),
        None => format!("container {id}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Life of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Created,
    Running,
    Exited(ExitStatus),
}

/// The agent's ends of a process's stdio, until attached.
#[derive(Debug, Default)]
struct Pending {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    pty: Option<File>,
}

/// One process (init or exec).
#[derive(Debug)]
struct Proc {
    pid: i32,
    stdio: StdioConfig,
    state: Mutex<ProcState>,
    exited: Condvar,
    pending: Mutex<Pending>,
    /// The stdin pipe once attached (taken by CloseStdin).
    stdin: Arc<Mutex<Option<File>>>,
    /// The pty's controller side, for resizing.
    pty: Option<File>,
    /// The socket to the helper, until started.
    control: Mutex<Option<UnixStream>>,
}

impl Proc {
    fn state(&self) -> ProcState {
        *lock(&self.state)
    }

    fn is_alive(&self) -> bool {
        !matches!(self.state(), ProcState::Exited(_))
    }

    fn wait(&self) -> ExitStatus {
        let mut state = lock(&self.state);
        loop {
            if let ProcState::Exited(status) = *state {
                return status;
            }
            state = self
                .exited
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// One container.
#[derive(Debug)]
struct Container {
    id: String,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    cgroup: Option<Cgroup>,
    /// The container's seccomp filters, for exec'd processes too.
    seccomp: Vec<Vec<seccomp::SockFilter>>,
    /// Namespaces an exec joins: `(flag, kind name)`.
    namespace_flags: Vec<(i32, &'static str)>,
}

impl Container {
    fn process(&self, exec_id: Option<&str>) -> Result<Arc<Proc>, ContainerError> {
        match exec_id {
            None => Ok(Arc::clone(&self.init)),
            Some(exec_id) => {
                lock(&self.execs)
                    .get(exec_id)
                    .cloned()
                    .ok_or_else(|| ContainerError::NoProcess {
                        id: self.id.clone(),
                        exec_id: exec_id.to_owned(),
                    })
            }
        }
    }

    fn status(&self) -> ContainerStatus {
        match self.init.state() {
            ProcState::Created => ContainerStatus::Created,
            ProcState::Exited(_) => ContainerStatus::Stopped,
            ProcState::Running => {
                if self.cgroup.as_ref().is_some_and(Cgroup::is_frozen) {
                    ContainerStatus::Paused
                } else {
                    ContainerStatus::Running
                }
            }
        }
    }

    /// Pids of the container's processes (guest pids).
    fn pids(&self) -> Result<Vec<i32>, ContainerError> {
        if let Some(cgroup) = &self.cgroup {
            return Ok(cgroup.pids()?);
        }
        if !self.init.is_alive() {
            return Ok(Vec::new());
        }
        // No cgroup: every process in the init's pid namespace.
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init.pid))
            .map_err(io_err("reading the init's pid namespace"))?;
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").map_err(io_err("reading /proc"))? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|link| link == ns) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        Ok(pids)
    }
}

/// An attached stream waiting for its connection (see [`Containers::attach`]).
#[derive(Debug)]
pub struct AttachJob {
    kind: StreamKind,
    pipe: Option<File>,
    stdin: Arc<Mutex<Option<File>>>,
}

impl AttachJob {
    /// Copies between the process and the connection on threads of their own.
    pub fn run(self, conn: File) {
        let result = match self.kind {
            StreamKind::Stdout | StreamKind::Stderr => match self.pipe {
                Some(pipe) => spawn_copy("stdout", pipe, conn, true),
                None => Ok(()),
            },
            StreamKind::Stdin => {
                if let Some(pipe) = self.pipe {
                    *lock(&self.stdin) = Some(pipe);
                }
                let stdin = self.stdin;
                spawn_thread("stdin", move || copy_to_stdin(conn, &stdin))
            }
            StreamKind::Pty => match self.pipe {
                Some(master) => {
                    let spawned = match (master.try_clone(), conn.try_clone()) {
                        (Ok(master_in), Ok(conn_in)) => {
                            spawn_copy("pty-in", conn_in, master_in, false)
                        }
                        (Err(err), _) | (_, Err(err)) => Err(err),
                    };
                    spawned.and_then(|()| spawn_copy("pty-out", master, conn, true))
                }
                None => Ok(()),
            },
        };
        if let Err(err) = result {
            crate::log_error!("attaching a stream failed: {err}");
        }
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
        .spawn(f)
        .map(|_| ())
}

/// Copies `from` to `to` until end of stream (EIO from a pty whose process is gone counts as
/// the end), then shuts down the writing side of `to` if it is a socket.
fn spawn_copy(name: &str, mut from: File, mut to: File, shutdown_after: bool) -> io::Result<()> {
    spawn_thread(name, move || {
        let mut buf = vec![0u8; COPY_BUF_LEN];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if to.write_all(buf.get(..n).unwrap_or(&[])).is_err() {
                break;
            }
        }
        if shutdown_after {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        }
    })
}

fn copy_to_stdin(mut conn: File, stdin: &Mutex<Option<File>>) {
    let mut buf = vec![0u8; COPY_BUF_LEN];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut guard = lock(stdin);
        let Some(pipe) = guard.as_mut() else { return };
        if pipe.write_all(buf.get(..n).unwrap_or(&[])).is_err() {
            break;
        }
    }
    // End of the host's stdin: the program reads EOF.
    lock(stdin).take();
}

/// The process's ends of its stdio (fds 0-2) and the agent's.
struct StdioFds {
    child: [OwnedFd; 3],
    pending: Pending,
    pty: Option<File>,
}

fn dev_null() -> Result<OwnedFd, ContainerError> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(io_err("opening /dev/null"))
}

fn pipe() -> Result<(File, File), ContainerError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    Ok((File::from(r), File::from(w)))
}

fn make_stdio(config: &StdioConfig) -> Result<StdioFds, ContainerError> {
    let mut pending = Pending::default();
    if config.terminal {
        // The helper makes the pty inside the container and sends the controller
        // ([`child::FromInit::Console`]); until then fds 0-2 are placeholders.
        return Ok(StdioFds {
            child: [dev_null()?, dev_null()?, dev_null()?],
            pending,
            pty: None,
        });
    }
    let stdin = if config.stdin {
        let (r, w) = pipe()?;
        pending.stdin = Some(w);
        OwnedFd::from(r)
    } else {
        dev_null()?
    };
    let stdout = if config.stdout {
        let (r, w) = pipe()?;
        pending.stdout = Some(r);
        OwnedFd::from(w)
    } else {
        dev_null()?
    };
    let stderr = if config.stderr {
        let (r, w) = pipe()?;
        pending.stderr = Some(r);
        OwnedFd::from(w)
    } else {
        dev_null()?
    };
    Ok(StdioFds {
        child: [stdin, stdout, stderr],
        pending,
        pty: None,
    })
}

/// What a helper reported during its setup: the pid to watch (0: the helper itself), the
/// watch on a forked child, and the pty controller it made.
type HelperReport = (
    i32,
    Option<std::sync::mpsc::Receiver<ReapStatus>>,
    Option<OwnedFd>,
);

/// Reads the helper's next report, waiting at most until `deadline` ([`FrameError::TimedOut`]
/// past it), however many reports came before.
fn read_before<T: serde::de::DeserializeOwned>(
    socket: &mut UnixStream,
    deadline: Instant,
) -> Result<T, FrameError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(FrameError::TimedOut);
    }
    socket
        .set_read_timeout(Some(left))
        .map_err(FrameError::Io)?;
    read_frame(socket)
}

/// Receives the one fd the helper sends after [`child::FromInit::Console`] (close-on-exec).
fn receive_fd(socket: &UnixStream) -> Result<OwnedFd, ContainerError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(sys_err("receiving the pty"))?;
    let mut received = Vec::new();
    for cmsg in msg.cmsgs().map_err(sys_err("receiving the pty"))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: SCM_RIGHTS installed these fds in this process; nothing else owns them.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
            );
        }
    }
    let mut received = received.into_iter();
    match (received.next(), received.next()) {
        (Some(fd), None) => Ok(fd),
        _ => Err(ContainerError::Setup(
            "the helper's console message carried no single fd".into(),
        )),
    }
}

/// Writes the uid and gid maps of the helper `pid`'s new user namespace: from the agent, which
/// is root in the parent namespace, so any ranges are allowed (as runc's parent writes them).
fn write_id_maps(pid: i32, maps: &spec::UserNamespacePlan) -> Result<(), ContainerError> {
    for (file, text) in [
        ("uid_map", spec::UserNamespacePlan::map_text(&maps.uid_map)),
        ("gid_map", spec::UserNamespacePlan::map_text(&maps.gid_map)),
    ] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text.as_bytes())
            .map_err(|err| ContainerError::Setup(format!("writing {path}: {err}")))?;
    }
    Ok(())
}

/// Starts the helper with `clone(2)`: fds 0-2 and 3 (control) set up, then `execve` of the
/// agent binary in helper mode. Runs under the reaper's lock (see [`Reaper::spawn_watched`]).
fn clone_helper(flags: i32, fds: [RawFd; 4]) -> Result<i32, ContainerError> {
    // Everything the child touches is prepared here: after clone it may only make raw syscalls.
    let exe = CString::new("/proc/self/exe").map_err(|_| ContainerError::State("exe".into()))?;
    let arg = CString::new(child::INIT_ARG).map_err(|_| ContainerError::State("arg".into()))?;
    let argv = [exe.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: sigset_t is plain data; sigemptyset below initialises it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut empty) };
    let mut stack = vec![0u8; CLONE_STACK_LEN];
    let cb = Box::new(|| -> isize {
        let mut high = [0 as RawFd; 4];
        for (slot, fd) in high.iter_mut().zip(fds) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own; async-signal-safe.
            *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if *slot < 0 {
                return 127;
            }
        }
        for (target, fd) in high.iter().enumerate() {
            // SAFETY: dup2 of a valid descriptor onto 0..=3; async-signal-safe. The copy loses
            // close-on-exec, so the helper inherits it.
            if unsafe { libc::dup2(*fd, target as RawFd) } < 0 {
                return 127;
            }
        }
        // SAFETY: resets the mask inherited from the agent (SIGCHLD blocked); `empty` was
        // initialised before the clone.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
        // SAFETY: restores the default SIGPIPE disposition (Rust ignores it), as
        // std::process::Command does; async-signal-safe.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that live in the
        // parent's copy of memory, which the child shares by copy-on-write.
        unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        127
    });
    // SAFETY: the callback only makes async-signal-safe syscalls and execs (no allocation, no
    // locks), which is what a child of a multi-threaded process may do; the stack outlives
    // the call (the child gets its own copy of the address space).
    let pid = unsafe {
        nix::sched::clone(
            cb,
            &mut stack,
            nix::sched::CloneFlags::from_bits_retain(flags),
            Some(libc::SIGCHLD),
        )
    }
    .map_err(sys_err("clone"))?;
    Ok(pid.as_raw())
}

/// The containers the agent runs.
pub struct Containers {
    reaper: Arc<Reaper>,
    cgroup_root: PathBuf,
    no_pivot: bool,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers").finish_non_exhaustive()
    }
}

/// Namespace kinds an exec joins, with their `/proc/<pid>/ns/` names.
const NAMESPACE_NAMES: &[(i32, &str)] = &[
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWNET, "net"),
    (libc::CLONE_NEWPID, "pid"),
    (libc::CLONE_NEWCGROUP, "cgroup"),
    (libc::CLONE_NEWUSER, "user"),
    (libc::CLONE_NEWNS, "mnt"),
];

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            reaper,
            cgroup_root: cgroup::root(),
            no_pivot: std::env::var_os(child::NO_PIVOT_ENV).is_some_and(|v| v == "1"),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NoContainer(id.to_owned()))
    }

    /// Starts a helper and runs its setup; returns the process, waiting in `created`. `label`
    /// names the process in the helper's warnings.
    fn spawn_process(
        &self,
        clone_flags: i32,
        config: InitConfig,
        stdio: &StdioConfig,
        label: &str,
    ) -> Result<Arc<Proc>, ContainerError> {
        if config.process.terminal != stdio.terminal {
            return Err(ContainerError::State(format!(
                "process.terminal is {} but the stdio config asks terminal={}",
                config.process.terminal, stdio.terminal
            )));
        }
        let fds = make_stdio(stdio)?;
        let (mut agent_end, helper_end) = UnixStream::pair().map_err(io_err("socketpair"))?;
        let raw = [
            fds.child[0].as_raw_fd(),
            fds.child[1].as_raw_fd(),
            fds.child[2].as_raw_fd(),
            helper_end.as_raw_fd(),
        ];
        let user_namespace = config
            .create
            .as_ref()
            .and_then(|plan| plan.user_namespace.clone());
        let (helper_pid, helper_status) = self
            .reaper
            .spawn_watched(|| clone_helper(clone_flags, raw).map(|pid| (pid, pid)))?;
        drop(helper_end);
        drop(fds.child);
        // Set when the helper's socket closed before its report: the helper died in its setup.
        let mut ended = false;
        let deadline = Instant::now() + PROCESS_SETUP_TIMEOUT;
        let result = (|| -> Result<HelperReport, ContainerError> {
            agent_end
                .set_write_timeout(Some(PROCESS_SETUP_TIMEOUT))
                .map_err(io_err("socket timeout"))?;
            write_frame(&mut agent_end, &ToInit::Setup(Box::new(config)))
                .map_err(|err| ContainerError::Setup(format!("sending the setup: {err}")))?;
            let mut watched = None;
            let mut pid = None;
            let mut console = None;
            loop {
                let msg: FromInit = match read_before(&mut agent_end, deadline) {
                    Ok(msg) => msg,
                    Err(FrameError::TimedOut) => {
                        return Err(ContainerError::Setup(format!(
                            "the helper did not finish the setup within {} s",
                            PROCESS_SETUP_TIMEOUT.as_secs()
                        )))
                    }
                    Err(err) => {
                        ended = true;
                        return Err(ContainerError::Setup(format!(
                            "the helper ended without reporting: {err}"
                        )));
                    }
                };
                match msg {
                    FromInit::Pid(p) if p > 1 && pid.is_none() => {
                        watched = Some(self.reaper.watch(p));
                        pid = Some(p);
                    }
                    FromInit::Pid(p) => {
                        return Err(ContainerError::Setup(format!("unexpected pid {p}")))
                    }
                    FromInit::Console if stdio.terminal && console.is_none() => {
                        console = Some(receive_fd(&agent_end)?);
                    }
                    FromInit::Console => {
                        return Err(ContainerError::Setup("unexpected console".into()))
                    }
                    FromInit::Ready if stdio.terminal && console.is_none() => {
                        return Err(ContainerError::Setup("the helper made no terminal".into()))
                    }
                    FromInit::Ready => return Ok((pid.unwrap_or(0), watched, console)),
                    FromInit::Error(message) => return Err(ContainerError::Setup(message)),
                    FromInit::Warning(message) => crate::log_warn!("{label}: {message}"),
                    FromInit::MapIds if pid.is_none() => {
                        let maps = user_namespace.as_ref().ok_or_else(|| {
                            ContainerError::Setup("ids to map without a user namespace".into())
                        })?;
                        write_id_maps(helper_pid, maps)?;
                        write_frame(&mut agent_end, &ToInit::IdsMapped).map_err(|err| {
                            ContainerError::Setup(format!("answering the helper: {err}"))
                        })?;
                    }
                    FromInit::MapIds => {
                        return Err(ContainerError::Setup("unexpected id maps".into()))
                    }
                }
            }
        })();
        let (forked_pid, forked_status, console) = match result {
            Ok(r) => r,
            Err(err) => {
                // A helper stuck in its setup (a hung mount, a timeout) is killed; one that
                // already exited (status delivered) is not signalled, its pid may be reused. A
                // child it forked reads the closed socket and exits.
                drop(agent_end);
                // A helper that ended without a word is reaped within moments: how it ended (a
                // signal such as the OOM killer's SIGKILL, an exit code) is the useful part.
                let status = if ended {
                    helper_status.recv_timeout(HELPER_END_WAIT).ok()
                } else {
                    helper_status.try_recv().ok()
                };
                return Err(match (status, err) {
                    // A signal that ended it unasked came from the kernel (the OOM killer, an
                    // oops in a system call): its last messages say why.
                    (Some(status @ ReapStatus::Signaled(_)), ContainerError::Setup(message))
                        if ended =>
                    {
                        let log = kernel_log_tail(KERNEL_LOG_LINES)
                            .map(|tail| format!("; the guest kernel's last messages: {tail}"))
                            .unwrap_or_default();
                        ContainerError::Setup(format!("{message} ({status}){log}"))
                    }
                    (Some(status), ContainerError::Setup(message)) if ended => {
                        ContainerError::Setup(format!("{message} ({status})"))
                    }
                    (Some(_), err) => err,
                    (None, err) => {
                        let _ = nix::sys::signal::kill(Pid::from_raw(helper_pid), Signal::SIGKILL);
                        err
                    }
                });
            }
        };
        // The process to watch: the helper itself, or the child it forked into a pid namespace.
        let (pid, status_rx) = match forked_status {
            Some(rx) => (forked_pid, rx),
            None => (helper_pid, helper_status),
        };
        agent_end
            .set_read_timeout(None)
            .map_err(io_err("socket timeout"))?;
        let mut pending = fds.pending;
        let mut pty = fds.pty;
        if let Some(console) = console {
            let master = File::from(console);
            pty = Some(master.try_clone().map_err(io_err("dup pty"))?);
            pending.pty = Some(master);
        }
        let proc = Arc::new(Proc {
            pid,
            stdio: *stdio,
            state: Mutex::new(ProcState::Created),
            exited: Condvar::new(),
            pending: Mutex::new(pending),
            stdin: Arc::new(Mutex::new(None)),
            pty,
            control: Mutex::new(Some(agent_end)),
        });
        Ok(self.watch_exit(proc, status_rx))
    }

    fn watch_exit(
        &self,
        proc: Arc<Proc>,
        status_rx: std::sync::mpsc::Receiver<ReapStatus>,
    ) -> Arc<Proc> {
        let thread_proc = Arc::clone(&proc);
        let spawned = spawn_thread("wait", move || {
            let status = match status_rx.recv() {
                Ok(ReapStatus::Exited(code)) => ExitStatus {
                    code: Some(code),
                    signal: None,
                    oom_killed: false,
                },
                Ok(ReapStatus::Signaled(signal)) => ExitStatus {
                    code: None,
                    signal: Some(signal as i32),
                    oom_killed: false,
                },
                Err(_) => ExitStatus {
                    code: Some(255),
                    signal: None,
                    oom_killed: false,
                },
            };
            *lock(&thread_proc.state) = ProcState::Exited(status);
            thread_proc.exited.notify_all();
        });
        if let Err(err) = spawned {
            crate::log_error!("no thread to wait for pid {}: {err}", proc.pid);
        }
        proc
    }

    /// `CreateContainer`.
    pub fn create(
        &self,
        req: &husk_agent_protocol::CreateContainer,
    ) -> Result<i32, ContainerError> {
        check_id(&req.id)?;
        {
            let map = lock(&self.containers);
            if map.contains_key(&req.id) {
                return Err(ContainerError::Exists(req.id.clone()));
            }
            if map.len() >= MAX_CONTAINERS {
                return Err(ContainerError::TooMany("containers"));
            }
        }
        let spec = spec::parse_spec(&req.spec)?;
        let plan: Plan = spec::translate_spec(&spec, Path::new(&req.bundle))?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        // The device rules of the spec and the runtime, with one for each of `linux.devices`.
        let device_rules = match resources.as_ref().and_then(|r| r.devices().as_ref()) {
            Some(rules) => {
                let devs: Vec<(bool, u64, u64)> = plan
                    .devices
                    .iter()
                    .filter(|d| d.kind == libc::S_IFCHR || d.kind == libc::S_IFBLK)
                    .map(|d| (d.kind == libc::S_IFBLK, d.major, d.minor))
                    .collect();
                Some(devices::rules_for(rules, &devs)?)
            }
            None => None,
        };
        if let Some(resources) = &resources {
            // Refuse what cannot be applied before anything exists.
            cgroup::resource_files(resources)?;
        }
        let cgroup = match Cgroup::create(&self.cgroup_root, &req.id) {
            Ok(cgroup) => Some(cgroup),
            Err(err) if resources.is_none() => {
                crate::log_warn!("container {} runs without a cgroup: {err}", req.id);
                None
            }
            Err(err) => return Err(err.into()),
        };
        let cleanup = |cgroup: &Option<Cgroup>| {
            if let Some(cgroup) = cgroup {
                let _ = cgroup.kill_all();
                let _ = cgroup.remove();
            }
        };
        if let (Some(cgroup), Some(resources)) = (&cgroup, &resources) {
            if let Err(err) = cgroup.apply(resources) {
                cleanup(&Some(cgroup.clone()));
                return Err(err.into());
            }
        }
        if let (Some(cgroup), Some(rules)) = (&cgroup, &device_rules) {
            if let Err(err) = devices::attach(&cgroup.path, rules) {
                cleanup(&Some(cgroup.clone()));
                return Err(err.into());
            }
        }
        let new_pid = plan
            .namespaces
            .iter()
            .any(|ns| ns.flag == libc::CLONE_NEWPID && ns.path.is_none());
        let namespace_flags = NAMESPACE_NAMES
            .iter()
            .filter(|(flag, _)| plan.namespaces.iter().any(|ns| ns.flag == *flag))
            .copied()
            .collect();
        let seccomp = plan.seccomp.clone();
        let config = InitConfig {
            process: plan.process.clone(),
            seccomp: plan.seccomp.clone(),
            cgroup: cgroup.as_ref().map(|c| c.path.clone()),
            join: Vec::new(),
            create: Some(Box::new(plan)),
            no_pivot: self.no_pivot,
        };
        // With a new user namespace the helper makes the pid namespace itself, after the user
        // namespace, so that the user namespace owns it (and the container's root can mount
        // its /proc).
        let flags = if new_pid
            && config
                .create
                .as_ref()
                .is_some_and(|p| p.user_namespace.is_none())
        {
            libc::CLONE_NEWPID
        } else {
            0
        };
        let label = process_label(&req.id, None);
        let init = match self.spawn_process(flags, config, &req.stdio, &label) {
            Ok(init) => init,
            Err(err) => {
                cleanup(&cgroup);
                return Err(err);
            }
        };
        let pid = init.pid;
        let container = Arc::new(Container {
            id: req.id.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            cgroup,
            seccomp,
            namespace_flags,
        });
        let mut map = lock(&self.containers);
        if map.contains_key(&req.id) {
            drop(map);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            cleanup(&container.cgroup);
            return Err(ContainerError::Exists(req.id.clone()));
        }
        map.insert(req.id.clone(), container);
        crate::log_info!("container {} created, init pid {pid}", req.id);
        Ok(pid)
    }

    /// `ExecProcess`.
    pub fn exec(&self, req: &husk_agent_protocol::ExecProcess) -> Result<i32, ContainerError> {
        check_id(&req.id)?;
        check_id(&req.exec_id)?;
        let container = self.get(&req.id)?;
        if container.init.state() != ProcState::Running {
            return Err(ContainerError::State(format!(
                "container {} is not running",
                req.id
            )));
        }
        // A process joining a frozen cgroup would freeze in the middle of its setup.
        if container.cgroup.as_ref().is_some_and(Cgroup::is_frozen) {
            return Err(ContainerError::State(format!(
                "container {} is paused",
                req.id
            )));
        }
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(ContainerError::ProcessExists {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                });
            }
            if execs.len() >= MAX_EXECS {
                // Exec probes add up over a pod's life: forget the exited ones first.
                execs.retain(|_, proc| proc.is_alive());
            }
            if execs.len() >= MAX_EXECS {
                return Err(ContainerError::TooMany("processes in this container"));
            }
        }
        let process = spec::translate_process(&spec::parse_process(&req.process)?)?;
        let join = container
            .namespace_flags
            .iter()
            .map(|(flag, name)| NamespacePlan {
                flag: *flag,
                path: Some(PathBuf::from(format!(
                    "/proc/{}/ns/{name}",
                    container.init.pid
                ))),
            })
            .collect();
        let config = InitConfig {
            create: None,
            join,
            cgroup: container.cgroup.as_ref().map(|c| c.path.clone()),
            process,
            seccomp: container.seccomp.clone(),
            no_pivot: false,
        };
        let label = process_label(&req.id, Some(&req.exec_id));
        let proc = self.spawn_process(0, config, &req.stdio, &label)?;
        let pid = proc.pid;
        let mut execs = lock(&container.execs);
        if execs.contains_key(&req.exec_id) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(ContainerError::ProcessExists {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        execs.insert(req.exec_id.clone(), proc);
        Ok(pid)
    }

    fn process(&self, r: &husk_agent_protocol::ProcessRef) -> Result<Arc<Proc>, ContainerError> {
        self.get(&r.id)?.process(r.exec_id.as_deref())
    }

    /// `AttachStdio`: checks the stream and hands out the agent's end of it.
    pub fn attach(
        &self,
        req: &husk_agent_protocol::AttachStdio,
    ) -> Result<AttachJob, ContainerError> {
        let proc = self.process(&req.process)?;
        if let ProcState::Exited(status) = proc.state() {
            return Err(ContainerError::State(format!(
                "the process has exited ({status:?})"
            )));
        }
        let mut pending = lock(&proc.pending);
        let (requested, slot) = match req.stream {
            StreamKind::Stdin => (proc.stdio.stdin && !proc.stdio.terminal, &mut pending.stdin),
            StreamKind::Stdout => (
                proc.stdio.stdout && !proc.stdio.terminal,
                &mut pending.stdout,
            ),
            StreamKind::Stderr => (
                proc.stdio.stderr && !proc.stdio.terminal,
                &mut pending.stderr,
            ),
            StreamKind::Pty => (proc.stdio.terminal, &mut pending.pty),
        };
        if !requested {
            return Err(ContainerError::State(format!(
                "the process's stdio config has no {:?} stream",
                req.stream
            )));
        }
        let pipe = slot.take().ok_or_else(|| {
            ContainerError::State(format!("{:?} is already attached (or closed)", req.stream))
        })?;
        Ok(AttachJob {
            kind: req.stream,
            pipe: Some(pipe),
            stdin: Arc::clone(&proc.stdin),
        })
    }

    /// `StartProcess`.
    pub fn start(&self, r: &husk_agent_protocol::ProcessRef) -> Result<(), ContainerError> {
        let container = self.get(&r.id)?;
        if r.exec_id.is_some() && container.init.state() != ProcState::Running {
            return Err(ContainerError::State(format!(
                "container {} is not running",
                r.id
            )));
        }
        let proc = container.process(r.exec_id.as_deref())?;
        {
            let pending = lock(&proc.pending);
            let missing: Vec<&str> = [
                ("stdin", pending.stdin.is_some()),
                ("stdout", pending.stdout.is_some()),
                ("stderr", pending.stderr.is_some()),
                ("pty", pending.pty.is_some()),
            ]
            .iter()
            .filter(|(_, unattached)| *unattached)
            .map(|(name, _)| *name)
            .collect();
            if !missing.is_empty() {
                return Err(ContainerError::State(format!(
                    "attach the requested streams before starting: {} not attached",
                    missing.join(", ")
                )));
            }
        }
        let mut control = lock(&proc.control);
        let Some(mut sock) = control.take() else {
            return Err(ContainerError::State(
                "the process was already started".into(),
            ));
        };
        if proc.state() != ProcState::Created {
            return Err(ContainerError::State("the process has exited".into()));
        }
        *lock(&proc.state) = ProcState::Running;
        let label = process_label(&r.id, r.exec_id.as_deref());
        let deadline = Instant::now() + PROCESS_SETUP_TIMEOUT;
        let outcome = (|| {
            sock.set_write_timeout(Some(PROCESS_SETUP_TIMEOUT))
                .map_err(io_err("socket timeout"))?;
            write_frame(&mut sock, &ToInit::Start)
                .map_err(|err| ContainerError::Setup(format!("sending start: {err}")))?;
            loop {
                match read_before::<FromInit>(&mut sock, deadline) {
                    // Close-on-exec closed the helper's end: the program runs.
                    Err(FrameError::Closed) => return Ok(()),
                    Ok(FromInit::Warning(message)) => crate::log_warn!("{label}: {message}"),
                    Ok(FromInit::Error(message)) => return Err(ContainerError::Setup(message)),
                    Ok(other) => {
                        return Err(ContainerError::Setup(format!("unexpected {other:?}")))
                    }
                    Err(err) => {
                        return Err(ContainerError::Setup(format!("waiting for exec: {err}")))
                    }
                }
            }
        })();
        if outcome.is_err() {
            // The helper exits after reporting; its status arrives through the reaper.
            let _ = nix::sys::signal::kill(Pid::from_raw(proc.pid), Signal::SIGKILL);
        }
        outcome
    }

    /// `WaitProcess`.
    pub fn wait(&self, r: &husk_agent_protocol::ProcessRef) -> Result<ExitStatus, ContainerError> {
        let container = self.get(&r.id)?;
        let proc = container.process(r.exec_id.as_deref())?;
        let mut status = proc.wait();
        if r.exec_id.is_none() {
            if let Some(cgroup) = &container.cgroup {
                status.oom_killed = status.signal == Some(libc::SIGKILL) && cgroup.oom_kills() > 0;
                // Whatever the init left behind (only possible without a pid namespace of its
                // own) dies with it.
                let _ = cgroup.kill_all();
            }
        }
        Ok(status)
    }

    /// `SignalProcess`.
    pub fn signal(
        &self,
        r: &husk_agent_protocol::ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = Signal::try_from(signal).map_err(sys_err(format!("signal {signal}")))?;
        let container = self.get(&r.id)?;
        if all {
            for pid in container.pids()? {
                if pid > 1 {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                }
            }
            return Ok(());
        }
        let proc = container.process(r.exec_id.as_deref())?;
        // Held while signalling so the pid cannot be reaped (and reused) in between.
        let state = lock(&proc.state);
        if matches!(*state, ProcState::Exited(_)) {
            return Err(ContainerError::State("the process has exited".into()));
        }
        if proc.pid <= 1 {
            return Err(ContainerError::State("the process has no pid".into()));
        }
        nix::sys::signal::kill(Pid::from_raw(proc.pid), sig).map_err(sys_err("kill"))?;
        drop(state);
        Ok(())
    }

    /// `ResizePty`.
    pub fn resize(
        &self,
        r: &husk_agent_protocol::ProcessRef,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainerError> {
        let proc = self.process(r)?;
        let pty = proc
            .pty
            .as_ref()
            .ok_or_else(|| ContainerError::State("the process has no terminal".into()))?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
        let ret = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if ret != 0 {
            return Err(sys_err("TIOCSWINSZ")(Errno::last()));
        }
        Ok(())
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, r: &husk_agent_protocol::ProcessRef) -> Result<(), ContainerError> {
        let proc = self.process(r)?;
        lock(&proc.pending).stdin.take();
        lock(&proc.stdin).take();
        Ok(())
    }

    /// `ListProcesses`.
    pub fn list_processes(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        self.get(id)?.pids()
    }

    fn cgroup_of(&self, id: &str) -> Result<Cgroup, ContainerError> {
        self.get(id)?.cgroup.clone().ok_or_else(|| {
            cgroup::CgroupError::NoCgroup(self.cgroup_root.display().to_string()).into()
        })
    }

    /// `Stats`.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, ContainerError> {
        Ok(self.cgroup_of(id)?.stats())
    }

    /// `Update`.
    pub fn update(&self, id: &str, resources: &serde_json::Value) -> Result<(), ContainerError> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_value(resources.clone()).map_err(|err| spec::SpecError::Invalid {
                what: "resources",
                message: err.to_string(),
            })?;
        Ok(self.cgroup_of(id)?.apply(&resources)?)
    }

    /// `Pause` / `Resume`.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        if container.init.state() != ProcState::Running {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        Ok(self.cgroup_of(id)?.freeze(frozen)?)
    }

    /// `RemoveContainer`.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        match container.init.state() {
            ProcState::Running => {
                return Err(ContainerError::State(format!(
                    "container {id} is running: signal it (SIGKILL) and wait first"
                )))
            }
            ProcState::Created => {
                // Never started: the helper waits for a start that will not come.
                lock(&container.init.control).take();
                let _ = nix::sys::signal::kill(Pid::from_raw(container.init.pid), Signal::SIGKILL);
                container.init.wait();
            }
            ProcState::Exited(_) => {}
        }
        for exec in lock(&container.execs).values() {
            lock(&exec.control).take();
            if exec.is_alive() {
                let _ = nix::sys::signal::kill(Pid::from_raw(exec.pid), Signal::SIGKILL);
            }
        }
        if let Some(cgroup) = &container.cgroup {
            if cgroup.is_frozen() {
                let _ = cgroup.freeze(false);
            }
            let _ = cgroup.kill_all();
            cgroup.remove()?;
        }
        lock(&self.containers).remove(id);
        crate::log_info!("container {id} removed");
        Ok(())
    }

    /// `ListContainers`.
    pub fn list(&self) -> Vec<ContainerInfo> {
        let mut list: Vec<ContainerInfo> = lock(&self.containers)
            .values()
            .map(|c| ContainerInfo {
                id: c.id.clone(),
                status: c.status(),
                pid: if c.init.is_alive() { c.init.pid } else { 0 },
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }
}

/// The guest kernel's last `lines` messages (its ring buffer, `syslog(2)`), joined with ` | `,
/// or `None` where it cannot be read.
fn kernel_log_tail(lines: usize) -> Option<String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER reads no buffer.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).ok()?.clamp(4096, 1 << 20);
    let mut buf = vec![0u8; size];
    let len = libc::c_int::try_from(buf.len()).ok()?;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which holds that many.
    let read = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), len) };
    let read = usize::try_from(read).ok()?.min(buf.len());
    Some(last_lines(&String::from_utf8_lossy(&buf[..read]), lines))
}

/// The last `n` non-empty lines of `text`, each cut to [`KERNEL_LOG_LINE_MAX`] characters,
/// joined with ` | `.
fn last_lines(text: &str, n: usize) -> String {
    let mut tail: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(n)
        .map(|l| l.chars().take(KERNEL_LOG_LINE_MAX).collect())
        .collect();
    tail.reverse();
    tail.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helpers_kernel_log_tail_is_its_last_lines_bounded() {
        let text = "<6>[ 1.0] one\n\n<3>[ 2.0] two\n<4>[ 3.0] three\n";
        assert_eq!(last_lines(text, 2), "<3>[ 2.0] two | <4>[ 3.0] three");
        assert_eq!(
            last_lines(text, 9),
            "<6>[ 1.0] one | <3>[ 2.0] two | <4>[ 3.0] three"
        );
        assert_eq!(last_lines("", 3), "");
        let long = "x".repeat(1000);
        assert_eq!(last_lines(&long, 1).len(), KERNEL_LOG_LINE_MAX);
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_id("web-1.a_b").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("-x").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn stdio_without_streams_is_dev_null() {
        let fds = make_stdio(&StdioConfig::default()).expect("stdio");
        assert!(fds.pending.stdout.is_none() && fds.pty.is_none());
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fds.child[1].as_raw_fd()))
            .expect("link");
        assert_eq!(link, PathBuf::from("/dev/null"));
    }
}
