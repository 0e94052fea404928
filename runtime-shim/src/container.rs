//! A container's state directory (`<root>/<id>/`): id validation, paths, the per-container lock,
//! and whether its `husk-vmm` still lives.
//!
//! Layout of `<root>/<id>/`:
//! - `state.json`: the persisted [`ContainerState`](crate::state::ContainerState), written atomically;
//! - `plan.json`: what `husk-vmm --supervise` runs (the spec with guest paths);
//! - `vsock.sock`: the VMM's vsock Unix socket (the agent is reached through it);
//! - `exit.json`: the init's exit status, written by the supervisor when the init exited;
//! - `vmm.log`: the VMM's own log;
//! - `host-cgroup`: the host cgroup `husk-vmm` runs in (see [`crate::host_cgroup`]);
//! - `seccomp-report`: empty, or the line saying which system call the VMM's seccomp filter
//!   stopped (then the VMM ended);
//! - `shared/`: the virtio-fs share; `shared/<id>/rootfs` and `shared/<id>/mounts/<n>` are bind
//!   mounts of the bundle's rootfs and bind-mount sources.
//!
//! Every command that reads or changes a container holds an exclusive `flock` on the directory
//! for its whole run, so concurrent commands on one id are serialized.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Longest container id accepted (the agent's limit).
pub const MAX_ID_LEN: usize = 128;

/// Default state root, as runc's `/run/runc`.
pub const DEFAULT_ROOT: &str = "/run/husk";

/// Longest socket path used in place: `sun_path` holds 108 bytes with the final NUL.
pub const MAX_SOCKET_PATH: usize = 100;

/// Where vsock sockets go whose path in the state dir would be too long.
pub const SHORT_SOCKET_DIR: &str = "/run/husk-vsock";

/// 64-bit FNV-1a.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Errors about container ids and state directories.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The id is empty.
    #[error("container id must not be empty")]
    EmptyId,
    /// The id is too long.
    #[error("container id is longer than {MAX_ID_LEN} bytes")]
    IdTooLong,
    /// The id has characters outside `[A-Za-z0-9_.-]`, starts with another character than a
    /// letter or digit, or contains `..`.
    #[error("invalid container id {0:?}: it must match [A-Za-z0-9][A-Za-z0-9_.-]* without '..'")]
    InvalidId(String),
    /// No state directory for this id.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("container {0:?} already exists")]
    Exists(String),
    /// A filesystem operation on the state directory failed.
    #[error("{0}")]
    Io(String, #[source] io::Error),
}

/// Checks a container id: `[A-Za-z0-9][A-Za-z0-9_.-]*`, no `..`, at most [`MAX_ID_LEN`] bytes.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    if id.is_empty() {
        return Err(ContainerError::EmptyId);
    }
    if id.len() > MAX_ID_LEN {
        return Err(ContainerError::IdTooLong);
    }
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first_ok || !rest_ok || id.contains("..") {
        return Err(ContainerError::InvalidId(id.to_string()));
    }
    Ok(())
}

/// The paths of one container's state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    pub id: String,
    pub dir: PathBuf,
}

impl StateDir {
    /// The state directory of `id` under `root` (the id is validated first).
    pub fn new(root: &Path, id: &str) -> Result<StateDir, ContainerError> {
        validate_id(id)?;
        Ok(StateDir {
            id: id.to_string(),
            dir: root.join(id),
        })
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn plan_file(&self) -> PathBuf {
        self.dir.join("plan.json")
    }
    /// The VMM's vsock socket: `vsock.sock` in the state dir, or, where that path would not
    /// fit a Unix socket address (docker's root plus a 64-character id does not), a socket
    /// named by a hash of the state dir in [`SHORT_SOCKET_DIR`].
    pub fn vsock_socket(&self) -> PathBuf {
        let inside = self.dir.join("vsock.sock");
        if inside.as_os_str().len() <= MAX_SOCKET_PATH {
            return inside;
        }
        let hash = fnv1a(self.dir.as_os_str().as_encoded_bytes());
        Path::new(SHORT_SOCKET_DIR).join(format!("{hash:016x}.sock"))
    }
    pub fn exit_file(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn seccomp_report_file(&self) -> PathBuf {
        self.dir.join("seccomp-report")
    }
    /// Why the VMM ended, if its seccomp filter ended it.
    pub fn vmm_killed_by_seccomp(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.seccomp_report_file()).ok()?;
        husk_vmm::seccomp::find_report(&text).map(str::to_string)
    }
    /// The directory exported to the guest (virtio-fs tag `husk`).
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
    /// `shared/<id>/`: the bundle as the guest sees it.
    pub fn shared_bundle(&self) -> PathBuf {
        self.shared_dir().join(&self.id)
    }

    /// Creates the directory (and `root`); fails with [`ContainerError::Exists`] if the id is
    /// taken. Returns it locked.
    pub fn create_locked(&self) -> Result<Flock<File>, ContainerError> {
        if let Some(root) = self.dir.parent() {
            std::fs::create_dir_all(root).map_err(|e| {
                ContainerError::Io(
                    format!("cannot create the state root {}", root.display()),
                    e,
                )
            })?;
        }
        match std::fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists(self.id.clone()))
            }
            Err(e) => {
                return Err(ContainerError::Io(
                    format!("cannot create {}", self.dir.display()),
                    e,
                ))
            }
        }
        self.lock()
    }

    /// Locks an existing state directory, waiting for other commands on the same id. Fails
    /// with [`ContainerError::NotFound`] when there is no such container (also when it was
    /// deleted while we waited).
    pub fn lock(&self) -> Result<Flock<File>, ContainerError> {
        let dir = File::open(&self.dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContainerError::NotFound(self.id.clone()),
            _ => ContainerError::Io(format!("cannot open {}", self.dir.display()), e),
        })?;
        let lock = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| {
            ContainerError::Io(format!("cannot lock {}", self.dir.display()), e.into())
        })?;
        if !self.dir.exists() {
            return Err(ContainerError::NotFound(self.id.clone()));
        }
        Ok(lock)
    }
}

/// The `husk-vmm` command that boots the VM of the container or sandbox in `dir` with `size`,
/// its share and its vsock socket (a stale socket of an earlier VM with the same state dir is
/// removed first). `debug` logs at debug level and keeps the guest console in the VMM's
/// stdout ([`debug_vmm_args`]). The OCI CLI adds `--supervise`; the shim runs it as it is.
pub fn vmm_command(
    cfg: &crate::config::HuskConfig,
    kernel: &Path,
    initramfs: &Path,
    size: crate::sizing::VmSize,
    fs_cache: crate::share::FsCache,
    dir: &StateDir,
    debug: bool,
) -> io::Result<std::process::Command> {
    let socket = dir.vsock_socket();
    if !socket.starts_with(&dir.dir) {
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&socket);
    }
    // Made here, so that a state directory without room fails this command by name.
    let report = dir.seccomp_report_file();
    std::fs::File::create(&report).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot create {}: {e}", report.display()))
    })?;
    let mut cmd = std::process::Command::new(cfg.vmm_path());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .arg("--cpus")
        .arg(size.vcpus.to_string())
        .arg("--mem-mib")
        .arg(size.mem_mib.to_string())
        .arg("--vsock-socket")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(dir.shared_dir())
        .args(fs_cache.vmm_args())
        .arg("--agent-timeout-ms")
        .arg(cfg.agent_timeout.as_millis().to_string())
        .arg("--seccomp-report")
        .arg(dir.seccomp_report_file())
        .arg("--log-level")
        .arg(if debug { "debug" } else { "warn" });
    cmd.args(debug_vmm_args(debug));
    Ok(cmd)
}

/// husk-vmm's user namespace for the sandbox in `dir` (see [`husk_vmm::userns`]), to idmap
/// the share's binds through and to pass with [`pass_userns`]. `None` when the configuration
/// turns it off (`vmm_userns = false`) or this host cannot give it (no user namespaces, a
/// state directory on a file system that cannot be idmapped, such as tmpfs before Linux 6.3),
/// which `warn` hears: husk-vmm then runs as root, with the rest of its confinement.
pub fn vmm_userns(
    cfg: &crate::config::HuskConfig,
    dir: &StateDir,
    warn: &dyn Fn(&str),
) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    if !cfg.vmm_userns {
        return None;
    }
    let made = husk_vmm::userns::create(cfg.vmm_uid_base).and_then(|ns| {
        // husk-vmm's jail binds the state directory through it: its file system must allow it.
        husk_vmm::userns::idmapped_tree(&dir.dir, ns.as_fd(), false)?;
        Ok(ns)
    });
    made.map_err(|e| {
        warn(&format!(
            "husk-vmm runs as root, without its user namespace: {e}"
        ))
    })
    .ok()
}

/// Gives `cmd` (a husk-vmm) the user namespace `userns`, inherited under its own number.
pub fn pass_userns(cmd: &mut std::process::Command, userns: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = userns.as_raw_fd();
    cmd.arg("--userns-fd").arg(fd.to_string());
    // SAFETY: between fork and exec the closure only calls fcntl(2), async-signal-safe, on a
    // descriptor open in the child; the flag changes in the child alone.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a debug sandbox's `husk-vmm` (and its template's) gets, nothing without `debug`: the
/// guest console, with the guest kernel's messages up to `info` (the base command line's
/// `loglevel=1` shows only emergencies, not an oops or a warning).
pub fn debug_vmm_args(debug: bool) -> &'static [&'static str] {
    if debug {
        &["--console", "--cmdline-extra", "loglevel=7"]
    } else {
        &[]
    }
}

/// Runs `spawn` (which starts `husk-vmm`) where the process it starts is the first of a new
/// pid namespace: husk-vmm is pid 1 there and sees no other process, while it stays this
/// process's child under its host pid, which the runtime records, waits for and signals.
/// `warn` hears why it could not be, and husk-vmm then starts in this pid namespace, as its
/// jail goes without a mount namespace when it may not make one (a runtime that is not root).
///
/// `unshare(CLONE_NEWPID)` moves no process: it makes the calling thread's next child the
/// namespace's first, and a thread may do it only once. So `spawn` runs in a thread made for
/// it. Its child's parent is that thread: a `PR_SET_PDEATHSIG` child is signalled when it
/// ends, so such a `spawn` must also wait for its child.
///
/// husk-vmm as pid 1 can still be signalled from here: SIGKILL, SIGSTOP and SIGCONT always
/// reach it, and so do the SIGTERM and SIGINT it blocks to read through its signalfd. Other
/// signals are ignored, as by any pid namespace's init without a handler; the runtime sends
/// none, and husk-vmm leads a session of its own, so no terminal does.
pub fn in_new_pid_namespace<T: Send>(
    spawn: impl FnOnce() -> T + Send,
    warn: &(dyn Fn(&str) + Sync),
) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID) {
                warn(&format!(
                    "husk-vmm shares the host's pid namespace: cannot make one ({e})"
                ));
            }
            spawn()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`, clock ticks since boot), `None`
/// when it does not exist or is a zombie (it ran to its end and waits to be reaped).
pub fn process_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_time(&stat)
}

/// Parses `/proc/<pid>/stat`: the start time of a live (not zombie or dead) process.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); field 22 is rest[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | Some(&"x")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start_time`.
pub fn process_alive(pid: i32, start_time: u64) -> bool {
    process_start_time(pid) == Some(start_time)
}

/// Undoes a VM that was being set up, if dropped while armed: kills and reaps the VMM (or
/// supervisor) child, unmounts and removes the state directory. `create` and the shim's
/// sandbox boot hold one until the VM is theirs for good; `warn` reports a cleanup that failed.
pub struct VmRollback<'a> {
    pub dir: &'a StateDir,
    pub child: Option<std::process::Child>,
    pub armed: bool,
    warn: fn(&str),
}

impl<'a> VmRollback<'a> {
    /// An armed rollback of `dir`, with no child yet.
    pub fn new(dir: &'a StateDir, warn: fn(&str)) -> VmRollback<'a> {
        VmRollback {
            dir,
            child: None,
            armed: true,
            warn,
        }
    }
}

impl Drop for VmRollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = crate::share::remove_state_dir(self.dir) {
            (self.warn)(&format!("cleanup after a failed VM set-up: {e:#}"));
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_debug_vmm_gets_the_console_and_the_kernel_messages() {
        assert!(debug_vmm_args(false).is_empty());
        let args = debug_vmm_args(true);
        assert!(args.contains(&"--console"));
        assert_eq!(
            args.windows(2).find(|w| w[0] == "--cmdline-extra"),
            Some(&["--cmdline-extra", "loglevel=7"][..])
        );
    }

    /// Each spawn's process is pid 1 of a namespace of its own, and stays this process's child.
    /// Without the right to make one, husk-vmm's spawn goes on in this namespace and says why.
    #[test]
    fn each_spawn_is_the_first_process_of_a_new_pid_namespace() {
        let warnings = std::sync::Mutex::new(Vec::new());
        let warn = |w: &str| warnings.lock().unwrap().push(w.to_string());
        let host_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut child = in_new_pid_namespace(
                || {
                    std::process::Command::new("sh")
                        .args(["-c", "echo $$; read line; true"])
                        .stdin(std::process::Stdio::piped())
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                },
                &warn,
            )
            .unwrap();
            let mut line = String::new();
            let mut stdout = io::BufReader::new(child.stdout.take().unwrap());
            io::BufRead::read_line(&mut stdout, &mut line).unwrap();
            let ns = std::fs::read_link(format!("/proc/{}/ns/pid", child.id())).unwrap();
            drop(child.stdin.take());
            assert!(child.wait().unwrap().success(), "the spawner's child");
            seen.push((line.trim().to_string(), ns));
        }
        let warnings = warnings.into_inner().unwrap();
        if warnings.is_empty() {
            assert_eq!(seen[0].0, "1", "pid inside");
            assert_eq!(seen[1].0, "1", "pid inside");
            assert_ne!(seen[0].1, host_ns);
            assert_ne!(seen[1].1, host_ns);
            assert_ne!(seen[0].1, seen[1].1, "one namespace each");
        } else {
            // Only a runtime without CAP_SYS_ADMIN (21) may fail to make one.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            assert_eq!(eff & (1 << 21), 0, "with CAP_SYS_ADMIN: {warnings:?}");
            assert!(warnings[0].contains("cannot make one"), "{warnings:?}");
            assert_eq!(seen[0].1, host_ns);
        }
    }

    #[test]
    fn valid_ids_are_accepted() {
        for id in ["a", "web-1", "A.b_c", "0123456789abcdef", "x.y"] {
            assert!(validate_id(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn bad_ids_are_refused_with_the_reason() {
        assert!(matches!(validate_id(""), Err(ContainerError::EmptyId)));
        assert!(matches!(
            validate_id(&"a".repeat(129)),
            Err(ContainerError::IdTooLong)
        ));
        for id in [
            "a/b", "..", "a..b", ".hidden", "-x", "_x", "a b", "a\nb", "é",
        ] {
            assert!(
                matches!(validate_id(id), Err(ContainerError::InvalidId(_))),
                "{id}"
            );
        }
    }

    #[test]
    fn state_dir_paths_live_under_root() {
        let dir = StateDir::new(Path::new("/run/husk"), "c1").expect("valid");
        assert_eq!(dir.state_file(), Path::new("/run/husk/c1/state.json"));
        assert_eq!(dir.vsock_socket(), Path::new("/run/husk/c1/vsock.sock"));
        assert_eq!(dir.shared_bundle(), Path::new("/run/husk/c1/shared/c1"));
        assert!(matches!(
            StateDir::new(Path::new("/run/husk"), "../etc"),
            Err(ContainerError::InvalidId(_))
        ));
    }

    #[test]
    fn long_state_dirs_get_a_short_socket_path() {
        let id = "a".repeat(64);
        let dir =
            StateDir::new(Path::new("/var/run/docker/runtime-runc/moby"), &id).expect("valid");
        let socket = dir.vsock_socket();
        assert!(socket.starts_with(SHORT_SOCKET_DIR), "{}", socket.display());
        assert!(socket.as_os_str().len() <= MAX_SOCKET_PATH);
        let other =
            StateDir::new(Path::new("/var/run/docker/runtime-runc/other"), &id).expect("valid");
        assert_ne!(other.vsock_socket(), socket);
        assert_eq!(dir.vsock_socket(), socket, "stable");
    }

    #[test]
    fn create_refuses_a_duplicate_id() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::new(root.path(), "c1").expect("valid");
        let lock = dir.create_locked().expect("created");
        drop(lock);
        assert!(matches!(
            dir.create_locked(),
            Err(ContainerError::Exists(id)) if id == "c1"
        ));
        let missing = StateDir::new(root.path(), "nope").expect("valid");
        assert!(matches!(missing.lock(), Err(ContainerError::NotFound(_))));
    }

    #[test]
    fn stat_parsing_handles_odd_names_and_zombies() {
        let live = "12 (a) b) S 1 12 12 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        assert_eq!(parse_stat_start_time(live), Some(4242));
        let zombie = "12 (sh) Z 1 12 12 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 0 0";
        assert_eq!(parse_stat_start_time(zombie), None);
        let me = std::process::id() as i32;
        let start = process_start_time(me).expect("this process lives");
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
    }
}
