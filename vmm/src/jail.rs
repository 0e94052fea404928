//! The jail: once the microVM is built, before the guest runs its first instruction, `husk-vmm`
//! leaves the host's mount, ipc, uts and network namespaces and pivots into a root of its own
//! that holds only what it still reaches by path.
//!
//! What the jail holds ([`JailPlan`]), each at the path it has on the host so that nothing
//! else in husk-vmm changes:
//! - the directories where husk-vmm still creates or connects to files: its vsock socket's
//!   (the guest's connections to `<socket>_<port>`, the socket's removal at teardown), the
//!   boot report's, the seccomp report's, the exit file's (`--supervise`) and a template's
//!   (`--template-out`). Each is bound alone (not recursively): what is mounted below it on
//!   the host (a container's share with its rootfs) stays outside.
//! - `/dev/kvm` (a template build opens it again to list the MSRs it saves);
//! - with a terminal (`--supervise` of a container with `process.terminal`), a devpts
//!   instance of its own and `/dev/ptmx`: the pty it relays is made there, and no pty of the
//!   host is in reach.
//!
//! What it does not need by path, it reaches through descriptors opened before: the kernel
//! and initramfs were read, a template's memory is mapped, the TAP device is open, the file
//! server holds its share's root and `/proc/self/fd` (lookups go from these descriptors, in
//! the host's mount tree, so a rootfs the shim mounts into a pod's share later is served),
//! the log is open, and the console socket (`--supervise` with a terminal) is connected.
//!
//! The root itself is a small read-only tmpfs.
//!
//! Of the host's network namespace, husk-vmm's seccomp filter leaves one thing in reach: its
//! abstract Unix sockets (it may open Unix sockets only, to connect to paths, and may not
//! `bind` once confined; the TAP device's descriptor works from any namespace). Where Linux
//! has Landlock's scopes (Landlock ABI 6, Linux 6.12), husk-vmm scopes itself
//! ([`SocketScope::Landlock`]): it may connect to no abstract socket and signal no process
//! outside its own Landlock domain. That costs two system calls, where a new network
//! namespace costs the kernel's set-up of one (loopback, sysctls, protocol state) and its
//! teardown when husk-vmm ends: some 0.4 ms on hardware, 4-8 ms in the test rig, most of the
//! jail's time there. Where Landlock cannot scope, husk-vmm leaves the host's network namespace
//! for a new, empty one ([`SocketScope::NetworkNamespace`]).
//!
//! The pid namespace is not made here: a process cannot enter one, only its children can.
//! The runtime spawns husk-vmm as the first process of a new one
//! (`husk::container::in_new_pid_namespace`), so it is pid 1 there and sees no other process;
//! its seccomp filter also lets it signal only itself. Once in the jail, husk-vmm may join a
//! user namespace and run as an unprivileged uid ([`crate::userns`]); the jail's directories
//! are then idmapped mounts through it ([`JailPlan::userns`]), so that they stay its own.
//! A husk-vmm started by a user other than root cannot build the jail and runs without it,
//! saying so in its log.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// The namespaces husk-vmm always leaves (the network namespace only where Landlock cannot
/// scope it: [`SocketScope`]).
const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS);

/// How the jail keeps husk-vmm from the host's abstract Unix sockets (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketScope {
    /// Landlock scopes: no abstract socket and no process outside husk-vmm's own Landlock
    /// domain is in reach (`LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`, `LANDLOCK_SCOPE_SIGNAL`).
    Landlock,
    /// A new, empty network namespace: the kernel has no Landlock scopes.
    NetworkNamespace,
}

impl SocketScope {
    /// How logs and reports name it.
    pub fn name(self) -> &'static str {
        match self {
            SocketScope::Landlock => "landlock",
            SocketScope::NetworkNamespace => "network namespace",
        }
    }
}

/// The device files the jail holds.
const DEVICES: &[&str] = &["/dev/kvm"];

/// What goes into the jail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailPlan {
    /// Host directories reachable at the same path inside, writable (each bound alone).
    pub dirs: Vec<PathBuf>,
    /// Device files reachable at the same path inside.
    pub devices: Vec<PathBuf>,
    /// A devpts instance of the jail's own at `/dev/pts`, with `/dev/ptmx`.
    pub pty: bool,
    /// The user namespace husk-vmm joins once in its jail (a descriptor it inherited; see
    /// [`crate::userns`]): the directories are idmapped mounts through it, so that they stay
    /// husk-vmm's own.
    pub userns: Option<std::os::fd::RawFd>,
}

impl JailPlan {
    /// A plan with the jail's devices.
    pub fn new() -> JailPlan {
        JailPlan {
            devices: DEVICES.iter().map(PathBuf::from).collect(),
            ..JailPlan::default()
        }
    }

    /// Adds the directory that holds `file` (a file husk-vmm creates, writes or connects to).
    pub fn dir_of(&mut self, file: &Path) -> &mut Self {
        match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => self.dir(dir),
            _ => self.dir(Path::new(".")),
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, dir: &Path) -> &mut Self {
        self.dirs.push(dir.to_path_buf());
        self
    }
}

/// Errors of [`enter`].
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Threads share their mount namespace only if they start after it was entered.
    #[error("the jail must be entered before husk-vmm starts a thread ({0} threads run)")]
    Threads(usize),
    /// A path of the plan is not usable.
    #[error("cannot put {path} into the jail: {why}")]
    Path { path: PathBuf, why: String },
    /// A step of the set-up failed.
    #[error("cannot build the jail ({step})")]
    Step {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

fn step(step: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> JailError {
    let step = step.into();
    move |e| JailError::Step {
        step,
        source: std::io::Error::from(e),
    }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

/// Whether this process can build the jail (it runs as root with `CAP_SYS_ADMIN`).
pub fn possible() -> bool {
    caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_ADMIN,
    )
    .unwrap_or(false)
}

/// Enters the jail that `plan` describes; says how it scoped abstract sockets. Call it on the
/// only thread (threads started later inherit the Landlock domain), before dropping
/// capabilities (it needs `CAP_SYS_ADMIN`). On an error the process may be half-way in and
/// must not run the guest.
pub fn enter(plan: &JailPlan) -> Result<SocketScope, JailError> {
    let threads = own_threads()?;
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    // What goes in, as host paths, before anything changes.
    let mut binds: Vec<(PathBuf, OwnedFd, bool)> = Vec::new();
    for (paths, is_dir) in [(&plan.dirs, true), (&plan.devices, false)] {
        for path in paths {
            let path = absolute(path)?;
            if binds.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            if path == Path::new("/") {
                return Err(JailError::Path {
                    path,
                    why: "the host's root cannot be in the jail".into(),
                });
            }
            // Not what is mounted below it.
            let fd = crate::userns::clone_tree(&path, false).map_err(|e| JailError::Path {
                path: path.clone(),
                why: e.to_string(),
            })?;
            if let (true, Some(userns)) = (is_dir, plan.userns) {
                // SAFETY: the plan's descriptor stays open while the jail is built.
                let userns = unsafe { std::os::fd::BorrowedFd::borrow_raw(userns) };
                crate::userns::idmap(&fd, userns, false).map_err(|e| JailError::Path {
                    path: path.clone(),
                    why: format!("{e} (husk-vmm's user namespace needs idmapped mounts)"),
                })?;
            }
            binds.push((path, fd, is_dir));
        }
    }
    // Parents before children; a device file's directory is the jail's own.
    binds.sort_by(|a, b| a.0.cmp(&b.0));
    let Some(anchor) = binds.iter().find(|b| b.2).map(|b| b.0.clone()) else {
        return Err(JailError::Path {
            path: PathBuf::new(),
            why: "the plan names no directory".into(),
        });
    };

    // Relative paths given to husk-vmm (a socket in the working directory) keep working.
    let cwd = std::env::current_dir().ok().filter(|cwd| {
        binds
            .iter()
            .any(|(p, _, is_dir)| *is_dir && cwd.starts_with(p))
    });
    unshare(NAMESPACES).map_err(step("unshare"))?;
    // Nothing done here reaches the host, and nothing the host mounts later reaches here.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making the mount tree private"))?;
    // The new root, on top of a directory the jail holds anyway (its own view of it was
    // cloned above).
    mount(
        Some("tmpfs"),
        &anchor,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=64k,nr_inodes=256,mode=0755"),
    )
    .map_err(step(format!(
        "mounting the jail's root on {}",
        anchor.display()
    )))?;
    for (path, fd, is_dir) in &binds {
        let target = inside(&anchor, path);
        if *is_dir {
            std::fs::create_dir_all(&target)
                .map_err(io_step(format!("making {}", target.display())))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_step(format!("making {}", parent.display())))?;
            }
            std::fs::File::create(&target)
                .map_err(io_step(format!("making {}", target.display())))?;
        }
        crate::userns::attach(fd, &target).map_err(io_step("mounting it in the jail"))?;
    }
    if plan.pty {
        let pts = anchor.join("dev/pts");
        std::fs::create_dir_all(&pts).map_err(io_step("making /dev/pts"))?;
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(step("mounting a devpts instance"))?;
        std::os::unix::fs::symlink("pts/ptmx", anchor.join("dev/ptmx"))
            .map_err(io_step("linking /dev/ptmx"))?;
    }
    pivot(&anchor)?;
    // The root is read-only; what husk-vmm writes goes into the bound directories.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("making the jail's root read-only"))?;
    if let Some(cwd) = cwd {
        nix::unistd::chdir(&cwd).map_err(step(format!("entering {}", cwd.display())))?;
    }
    let scope = match landlock_scope() {
        Ok(()) => SocketScope::Landlock,
        Err(e) => {
            tracing::debug!("no Landlock scopes ({e}): a network namespace of its own instead");
            unshare(CloneFlags::CLONE_NEWNET).map_err(step("unshare(CLONE_NEWNET)"))?;
            SocketScope::NetworkNamespace
        }
    };
    Ok(scope)
}

/// `struct landlock_ruleset_attr` as of Landlock ABI 6 (`linux/landlock.h`).
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`: no connecting or sending to an abstract Unix socket
/// bound outside the domain.
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
/// `LANDLOCK_SCOPE_SIGNAL`: no signal to a process outside the domain.
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;

/// Puts the calling thread, and the threads it starts later, in a Landlock domain of its own
/// that handles no file or network access but scopes abstract Unix sockets and signals.
/// Fails (`EINVAL`, `EOPNOTSUPP`, `ENOSYS`) where the kernel has no such scopes or no Landlock.
fn landlock_scope() -> std::io::Result<()> {
    let attr = LandlockRulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
    };
    // SAFETY: the kernel reads `size` bytes of `attr`, which lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const LandlockRulesetAttr,
            std::mem::size_of::<LandlockRulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = std::os::fd::RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the call above returned a new descriptor that nothing else owns.
    let ruleset = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: plain integers; the descriptor is the ruleset just made. The calling thread has
    // CAP_SYS_ADMIN (or no_new_privs), as the call requires.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Test-only: `HUSK_VMM_TEST_ABSTRACT_SOCKET=<name>` makes husk-vmm, once confined, try to
/// connect to the abstract Unix socket `@<name>` and log how that went: the tests' proof that
/// the host's abstract sockets are out of its reach ([`test_hook_abstract_socket`]).
pub const TEST_ABSTRACT_SOCKET_ENV: &str = "HUSK_VMM_TEST_ABSTRACT_SOCKET";

/// The log line's start when the test hook's connection failed.
pub const TEST_ABSTRACT_SOCKET_REFUSED: &str = "test hook: the abstract socket is out of reach";

/// The test hook of [`TEST_ABSTRACT_SOCKET_ENV`]: does nothing unless it is set.
pub fn test_hook_abstract_socket() {
    let Some(name) = std::env::var_os(TEST_ABSTRACT_SOCKET_ENV) else {
        return;
    };
    let reached = connect_abstract(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()));
    match reached {
        Ok(()) => tracing::warn!("test hook: connected to the abstract socket @{name:?}"),
        Err(e) => tracing::warn!("{TEST_ABSTRACT_SOCKET_REFUSED} (@{name:?}: {e})"),
    }
}

/// Connects a stream socket to the abstract Unix socket `@name`.
fn connect_abstract(name: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    std::os::unix::net::UnixStream::connect_addr(&addr).map(drop)
}

/// The threads of this process that run or may run husk-vmm's code, waiting up to
/// [`THREADS_SETTLE`] for threads that are ending: a thread just joined (the file server's
/// import thread) may still be listed for a moment, and runs nothing more. KVM's own workers
/// (such as `kvm-nx-lpage-recovery`, which the kernel starts in the VM owner's thread group)
/// run no husk code and are not counted.
fn own_threads() -> Result<usize, JailError> {
    let deadline = std::time::Instant::now() + THREADS_SETTLE;
    loop {
        let mut count = 0;
        for task in
            std::fs::read_dir("/proc/self/task").map_err(io_step("listing /proc/self/task"))?
        {
            let task = task.map_err(io_step("listing /proc/self/task"))?;
            // Gone meanwhile: not counted.
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if counts_as_own(&stat) {
                count += 1;
            }
        }
        if count <= 1 || std::time::Instant::now() >= deadline {
            return Ok(count);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// How long [`own_threads`] waits for ending threads to go.
const THREADS_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a task whose `/proc/.../stat` is `stat` is a thread of husk's that still lives: not
/// a zombie or dead, not one of KVM's workers.
fn counts_as_own(stat: &str) -> bool {
    // "tid (comm) S ...": the name may hold spaces and parentheses; the state follows the last ')'.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return true;
    };
    let comm = stat.get(open + 1..close).unwrap_or("");
    let state = stat
        .get(close + 1..)
        .unwrap_or("")
        .trim_start()
        .chars()
        .next();
    !(comm.starts_with("kvm-") || matches!(state, Some('Z' | 'X' | 'x')))
}

/// `path` made absolute (from the working directory) and without `.` or `..`.
fn absolute(path: &Path) -> Result<PathBuf, JailError> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_step("reading the working directory"))?
            .join(path)
    };
    let mut clean = PathBuf::from("/");
    for part in joined.components() {
        match part {
            Component::Normal(name) => clean.push(name),
            Component::ParentDir => {
                clean.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(clean)
}

/// Where the host path `path` is in the jail's root mounted on `anchor`.
fn inside(anchor: &Path, path: &Path) -> PathBuf {
    anchor.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes `new_root` the root and lets go of the host's.
fn pivot(new_root: &Path) -> Result<(), JailError> {
    let old = std::fs::File::open("/").map_err(io_step("opening the old root"))?;
    nix::unistd::chdir(new_root).map_err(step("entering the jail's root"))?;
    // With the same directory twice, the old root ends up stacked on the new one, at ".".
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    nix::unistd::fchdir(old.as_raw_fd()).map_err(step("entering the old root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    drop(old);
    nix::unistd::chdir("/").map_err(step("entering the new root"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_absolute_and_clean() {
        assert_eq!(
            absolute(Path::new("/run/husk/../husk/c1/./x")).unwrap(),
            PathBuf::from("/run/husk/c1/x")
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new("sock")).unwrap(), cwd.join("sock"));
        assert_eq!(
            inside(Path::new("/run/husk/c1"), Path::new("/run/husk/c1")),
            PathBuf::from("/run/husk/c1/run/husk/c1")
        );
    }

    #[test]
    fn ending_threads_and_kvm_workers_are_not_counted() {
        assert!(counts_as_own("12 (husk-vmm) R 1 2 3"));
        assert!(counts_as_own("12 (a (b) c) S 1"));
        assert!(!counts_as_own("13 (husk-vmm) Z 1 2 3"));
        assert!(!counts_as_own("13 (husk-vmm) X 1"));
        assert!(!counts_as_own("14 (kvm-nx-lpage-re) S 1"));
        assert_eq!(own_threads().ok().map(|n| n >= 1), Some(true));
    }

    #[test]
    fn a_file_adds_its_directory() {
        let mut plan = JailPlan::new();
        plan.dir_of(Path::new("/run/husk/c1/vsock.sock"))
            .dir_of(Path::new("report.json"));
        assert_eq!(
            plan.dirs,
            vec![PathBuf::from("/run/husk/c1"), PathBuf::from(".")]
        );
        assert_eq!(plan.devices, vec![PathBuf::from("/dev/kvm")]);
    }

    /// The jailed process's checks; panics on the first that fails.
    fn jailed_checks(dir: &Path) {
        let mut plan = JailPlan::default();
        plan.dir(&dir.join("state"));
        plan.devices.push("/dev/null".into());
        plan.pty = true;
        let scope = enter(&plan).unwrap();
        // Landlock wherever the kernel has its scopes; the fallback is checked on every kernel
        // by a_network_namespace_stands_in_where_landlock_cannot_scope.
        assert_eq!(scope == SocketScope::Landlock, landlock_abi() >= 6);
        // The plan's directory, writable, with what the host put there.
        assert_eq!(
            std::fs::read_to_string(dir.join("state/before")).unwrap(),
            "host"
        );
        std::fs::write(dir.join("state/after"), "jail").unwrap();
        // Not what is mounted below it, nor anything beside it.
        assert!(!dir.join("state/below/secret").exists());
        assert!(!dir.join("outside").exists());
        assert!(!Path::new("/etc/passwd").exists());
        assert!(!Path::new("/proc/self").exists());
        // The devices, a pty of its own, and a read-only root.
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        drop(nix::pty::openpty(None, None).unwrap());
        // The working directory, bound, is kept: relative paths still work.
        assert_eq!(std::fs::read_to_string("before").unwrap(), "host");
        assert!(std::fs::write("/new-file", "x").is_err());
        // The host's abstract sockets are out of reach, whichever way they were scoped.
        let name = std::env::var("HUSK_JAIL_TEST_SOCKET").unwrap();
        let err = connect_abstract(name.as_bytes()).unwrap_err();
        let expected = match scope {
            SocketScope::Landlock => libc::EPERM,
            SocketScope::NetworkNamespace => libc::ECONNREFUSED,
        };
        assert_eq!(err.raw_os_error(), Some(expected), "{err}");
    }

    /// Run by [`a_jailed_process_sees_only_its_plan`] in a process of its own (the jail
    /// cannot be left), which forks once more: the test harness runs this on a thread of its
    /// own, and the jail is entered by a process's only thread.
    #[test]
    #[ignore = "run in a child process by a_jailed_process_sees_only_its_plan"]
    fn child_enters_a_jail() {
        let Ok(dir) = std::env::var("HUSK_JAIL_TEST_DIR") else {
            return;
        };
        in_forked_child(|| jailed_checks(Path::new(&dir)));
    }

    /// Runs `checks` in a forked child, which is its process's only thread (the test
    /// harness's process has several), and asserts that none failed.
    fn in_forked_child(checks: impl FnOnce() + std::panic::UnwindSafe) {
        // SAFETY: the child only runs the checks and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = std::panic::catch_unwind(checks).is_ok();
                // SAFETY: ends the forked child at once.
                unsafe { libc::_exit(if ok { 42 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 42));
            }
        }
    }

    /// A listening abstract socket `@name` of the host's, which accepts without waiting.
    fn abstract_listener(name: &str) -> std::os::unix::net::UnixListener {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    }

    /// The Landlock ABI of this kernel (0 without Landlock).
    fn landlock_abi() -> i64 {
        // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with no attributes only returns the ABI.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<LandlockRulesetAttr>(),
                0usize,
                1u32,
            )
        };
        abi.max(0)
    }

    /// Run by [`a_network_namespace_stands_in_where_landlock_cannot_scope`] in a process of
    /// its own: a seccomp filter there fails Landlock's calls as a kernel without it does.
    #[test]
    #[ignore = "run in a child process by a_network_namespace_stands_in_where_landlock_cannot_scope"]
    fn child_enters_a_jail_without_landlock() {
        let Ok(dir) = std::env::var("HUSK_JAIL_TEST_DIR") else {
            return;
        };
        in_forked_child(|| {
            deny_landlock();
            let mut plan = JailPlan::default();
            plan.dir(Path::new(&dir));
            assert_eq!(enter(&plan).unwrap(), SocketScope::NetworkNamespace);
            // The host's socket by that name is not in this network namespace.
            let name = std::env::var("HUSK_JAIL_TEST_SOCKET").unwrap();
            let err = connect_abstract(name.as_bytes()).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
        });
    }

    /// Makes `landlock_create_ruleset` fail with ENOSYS in this thread (a seccomp filter).
    fn deny_landlock() {
        use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
        let filter = SeccompFilter::new(
            [(libc::SYS_landlock_create_ruleset, vec![])]
                .into_iter()
                .collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&program).unwrap();
    }

    #[test]
    fn a_network_namespace_stands_in_where_landlock_cannot_scope() {
        if !possible() {
            eprintln!(
                "SKIPPED a_network_namespace_stands_in_where_landlock_cannot_scope: needs \
                 CAP_SYS_ADMIN"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket_name = format!("husk-jail-nolandlock-{}", std::process::id());
        // Held while the child runs: in the host's network namespace the name is bound.
        let _listener = abstract_listener(&socket_name);
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "jail::tests::child_enters_a_jail_without_landlock",
                "--test-threads=1",
            ])
            .env("HUSK_JAIL_TEST_DIR", dir.path())
            .env("HUSK_JAIL_TEST_SOCKET", &socket_name)
            .status()
            .unwrap();
        assert!(status.success(), "the jailed child failed");
    }

    #[test]
    fn a_jailed_process_sees_only_its_plan() {
        if !possible() {
            eprintln!("SKIPPED a_jailed_process_sees_only_its_plan: needs CAP_SYS_ADMIN");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("below")).unwrap();
        std::fs::write(state.join("before"), "host").unwrap();
        std::fs::write(dir.path().join("outside"), "host").unwrap();
        // A mount below the plan's directory, as a container's share is.
        let below = state.join("below");
        mount(
            Some("tmpfs"),
            &below,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(below.join("secret"), "share").unwrap();
        // An abstract socket of the host's, which the jailed child must not reach.
        let socket_name = format!("husk-jail-test-{}", std::process::id());
        let listener = abstract_listener(&socket_name);
        connect_abstract(socket_name.as_bytes()).expect("the host reaches its own socket");
        listener.accept().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "jail::tests::child_enters_a_jail",
                "--test-threads=1",
            ])
            .env("HUSK_JAIL_TEST_DIR", dir.path())
            .env("HUSK_JAIL_TEST_SOCKET", &socket_name)
            .current_dir(&state)
            .status()
            .unwrap();
        umount2(&below, MntFlags::MNT_DETACH).unwrap();
        assert!(status.success(), "the jailed child failed");
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the jailed child connected to the host's abstract socket"
        );
        assert_eq!(
            std::fs::read_to_string(state.join("after")).unwrap(),
            "jail"
        );
    }
}
