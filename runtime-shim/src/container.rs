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
/// stdout. The OCI CLI adds `--supervise`; the shim runs it as it is.
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
    if debug {
        cmd.arg("--console");
    }
    Ok(cmd)
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
mod tests {
    use super::*;

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
