//! The container's init helper: `husk-agent __husk-container-init`, started by the agent with
//! `clone(2)` (in a new pid namespace for a new container) and an immediate `execve` of the
//! agent's own binary, so that all setup runs in a fresh single-threaded process.
//!
//! File descriptors: 0-2 the process's stdio, 3 a socket to the agent carrying frames:
//! agent -> helper [`ToInit::Setup`] then [`ToInit::Start`]; helper -> agent an optional
//! [`FromInit::Pid`] (the process to watch, when the helper had to fork to enter a pid
//! namespace), with `process.terminal` a [`FromInit::Console`], then [`FromInit::Ready`] or
//! [`FromInit::Error`]. After `Start` the helper applies the process attributes and `execve`s
//! the program; the socket is close-on-exec, so the agent reads end-of-stream on success, or a
//! [`FromInit::Error`]. Before either, [`FromInit::Warning`]s may come (an ambient capability
//! that cannot be raised, which runc also only warns about): the agent logs them.
//!
//! The root file system is set up as runc's prepareRoot / pivotRoot / msMoveRoot do it: `/`
//! gets `linux.rootfsPropagation` (default `rslave`), the mount holding the container's root is
//! made private and the root bound onto itself, the old root is made a slave before anything of
//! it is detached (no unmount propagates out), and the configured propagation is applied to the
//! new root last.
//!
//! A terminal is made inside the container, as runc makes it: the helper opens the container's
//! `/dev/ptmx` (its own devpts instance) once it is in the container's mount namespace, so that
//! the process's tty is `/dev/pts/N` of that instance (`tty`, `ttyname` and `ps` work). The
//! replica becomes fds 0-2; the controller goes to the agent over the socket (SCM_RIGHTS).

use super::seccomp::{self, SockFilter};
use super::spec::{
    CapsPlan, DevicePlan, MountPlan, NamespacePlan, Plan, ProcessPlan, DEFAULT_DEVICES,
    DEV_SYMLINKS,
};
use crate::sys::{LinuxSyscall, Syscall};
use husk_agent_protocol::{read_frame, write_frame};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{chdir, pivot_root, Gid, Uid};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

/// The argument that selects this mode of the agent binary.
pub const INIT_ARG: &str = "__husk-container-init";

/// The descriptor of the socket to the agent.
pub const CONTROL_FD: i32 = 3;

/// Default `PATH` for finding the program when the process env has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the helper does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// A new container (its root file system, mounts, ...), or `None` for an exec.
    pub create: Option<Box<Plan>>,
    /// Namespaces to join (an exec joins all of the container's).
    pub join: Vec<NamespacePlan>,
    /// The cgroup directory to enter.
    pub cgroup: Option<PathBuf>,
    pub process: ProcessPlan,
    pub seccomp: Vec<Vec<SockFilter>>,
    /// Skip `pivot_root` and take the `MS_MOVE` + `chroot` road (what an initramfs root needs
    /// anyway); [`NO_PIVOT_ENV`] sets it, for tests of that road on a host.
    #[serde(default)]
    pub no_pivot: bool,
}

/// Environment variable of the agent: when `1`, containers never `pivot_root`.
pub const NO_PIVOT_ENV: &str = "HUSK_AGENT_NO_PIVOT";

/// Agent -> helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToInit {
    Setup(Box<InitConfig>),
    Start,
    /// The maps of the helper's new user namespace are written.
    IdsMapped,
}

/// Helper -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromInit {
    /// The pid (in the agent's namespace) of the process that will run the program.
    Pid(i32),
    /// The pty's controller follows on the socket: one byte carrying it as SCM_RIGHTS.
    Console,
    /// Set up; waiting for [`ToInit::Start`].
    Ready,
    /// Setup or start failed.
    Error(String),
    /// Something the agent logs as a warning; the process goes on (as runc's init logs to runc).
    Warning(String),
    /// The helper is in its new user namespace: the agent writes its uid and gid maps (a
    /// process cannot map ids other than its own), then answers [`ToInit::IdsMapped`].
    MapIds,
}

/// A failed step, with context.
type StepResult<T = ()> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> StepResult<T> {
    r.map_err(|err| format!("{}: {err}", what()))
}

/// Entry point of the helper. Never returns.
pub fn run() -> ! {
    // SAFETY: fd 3 was set up by the agent for this process and nothing else owns it.
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let code = match setup_and_exec(&mut control) {
        Ok(never) => match never {},
        Err(message) => {
            let _ = write_frame(&mut control, &FromInit::Error(message));
            127
        }
    };
    std::process::exit(code)
}

fn setup_and_exec(control: &mut UnixStream) -> StepResult<std::convert::Infallible> {
    let ToInit::Setup(config) = ctx(read_frame::<_, ToInit>(control), || {
        "reading the setup".into()
    })?
    else {
        return Err("expected the setup first".into());
    };
    ctx(
        nix::fcntl::fcntl(
            control.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        ),
        || "marking the control socket close-on-exec".into(),
    )?;
    umask(Mode::empty());
    let sys = &LinuxSyscall;
    if let Some(cgroup) = &config.cgroup {
        let procs = cgroup.join("cgroup.procs");
        ctx(fs::write(&procs, "0"), || {
            format!("joining {}", procs.display())
        })?;
    }
    let enters_userns = config.join.iter().any(|ns| ns.flag == libc::CLONE_NEWUSER)
        || config
            .create
            .as_ref()
            .is_some_and(|p| p.in_user_namespace());
    if enters_userns {
        set_rlimits(&config.process)?;
    }
    let joined_pid = join_namespaces(&config, control)?;
    if joined_pid {
        fork_into_pid_namespace(control)?;
    }
    if let Some(plan) = &config.create {
        setup_rootfs(sys, plan, config.no_pivot)?;
        if let Some(hostname) = &plan.hostname {
            ctx(nix::unistd::sethostname(hostname), || "sethostname".into())?;
        }
        if let Some(domainname) = &plan.domainname {
            set_domainname(domainname)?;
        }
        for (key, value) in &plan.sysctls {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            ctx(fs::write(&path, value), || format!("sysctl {key}"))?;
        }
        finalize_rootfs(sys, plan)?;
    }
    if config.process.terminal {
        setup_console(control)?;
    }
    ctx(write_frame(control, &FromInit::Ready), || {
        "reporting ready".into()
    })?;
    match read_frame::<_, ToInit>(control) {
        Ok(ToInit::Start) => {}
        Ok(other) => return Err(format!("expected start, got {other:?}")),
        // The agent gave up on this process (removed it).
        Err(_) => std::process::exit(1),
    }
    exec_process(control, &config.process, &config.seccomp)
}

/// Sends a warning to the agent, which logs it. Best effort: a warning never fails the process.
fn warn(control: &mut UnixStream, message: String) {
    let _ = write_frame(control, &FromInit::Warning(message));
}

/// Makes the process's pty in the container's devpts (through its `/dev/ptmx`), puts the
/// replica on fds 0-2 and sends the controller to the agent.
fn setup_console(control: &UnixStream) -> StepResult {
    let master = ctx(
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC),
        || "process.terminal: opening the container's /dev/ptmx (is /dev/pts mounted?)".into(),
    )?;
    ctx(nix::pty::unlockpt(&master), || "unlockpt".into())?;
    // SAFETY: TIOCGPTPEER takes open(2) flags by value and returns a new fd (or -1); the
    // controller fd is valid for the call.
    let replica = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if replica < 0 {
        return Err(format!("opening the pty's replica: {}", Errno::last()));
    }
    // SAFETY: TIOCGPTPEER returned a new fd that nothing else owns.
    let replica = unsafe { OwnedFd::from_raw_fd(replica) };
    for target in 0..=2 {
        // SAFETY: dup2 of a valid fd onto 0-2; the old stdio placeholders (/dev/null) close.
        if unsafe { libc::dup2(replica.as_raw_fd(), target) } < 0 {
            return Err(format!(
                "dup2 of the pty onto fd {target}: {}",
                Errno::last()
            ));
        }
    }
    let mut control_ref = control;
    ctx(write_frame(&mut control_ref, &FromInit::Console), || {
        "reporting the console".into()
    })?;
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(&[0u8])];
    ctx(
        sendmsg::<()>(control.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None),
        || "sending the pty to the agent".into(),
    )?;
    Ok(())
}

/// Enters the namespaces: joins those with a path, creates the others. Returns whether the
/// caller must fork to be in its pid namespace (one was joined, or made by `unshare`).
///
/// A new user namespace comes first, alone: the agent writes its maps (see
/// [`FromInit::MapIds`]), the helper becomes its root, and every namespace made after it
/// (the pid namespace too, which the agent then did not make) is owned by it, as with runc.
fn join_namespaces(config: &InitConfig, control: &mut UnixStream) -> StepResult<bool> {
    let mut joins: Vec<&NamespacePlan> = config.join.iter().collect();
    let mut new_flags = CloneFlags::empty();
    let mut new_user = false;
    if let Some(plan) = &config.create {
        new_user = plan.user_namespace.is_some();
        for ns in &plan.namespaces {
            match &ns.path {
                Some(_) => joins.push(ns),
                None if ns.flag == libc::CLONE_NEWUSER => {}
                // A new pid namespace was made by the agent's clone (unless after a new user
                // namespace, made here).
                None if ns.flag == libc::CLONE_NEWPID && !new_user => {}
                None => new_flags |= CloneFlags::from_bits_retain(ns.flag),
            }
        }
    }
    // Open every namespace before entering any: after the mount namespace, paths change.
    let mut opened = Vec::new();
    for ns in &joins {
        let Some(path) = &ns.path else { continue };
        let file = ctx(File::open(path), || {
            format!("opening namespace {}", path.display())
        })?;
        opened.push((ns.flag, path.clone(), file));
    }
    // The user namespace next to last (the others are entered with the agent's privileges),
    // the mount namespace last.
    opened.sort_by_key(|(flag, _, _)| match *flag {
        libc::CLONE_NEWNS => 2,
        libc::CLONE_NEWUSER => 1,
        _ => 0,
    });
    let mut joined_pid = false;
    for (flag, path, file) in &opened {
        ctx(
            setns(file.as_fd(), CloneFlags::from_bits_retain(*flag)),
            || format!("joining namespace {}", path.display()),
        )?;
        joined_pid |= *flag == libc::CLONE_NEWPID;
        if *flag == libc::CLONE_NEWUSER {
            become_namespace_root()?;
        }
    }
    if new_user {
        ctx(unshare(CloneFlags::CLONE_NEWUSER), || {
            "unshare(CLONE_NEWUSER)".into()
        })?;
        ctx(write_frame(control, &FromInit::MapIds), || {
            "asking for the id maps".into()
        })?;
        match read_frame::<_, ToInit>(control) {
            Ok(ToInit::IdsMapped) => {}
            Ok(other) => return Err(format!("expected the id maps, got {other:?}")),
            Err(err) => return Err(format!("waiting for the id maps: {err}")),
        }
        become_namespace_root()?;
    }
    if !new_flags.is_empty() {
        ctx(unshare(new_flags), || format!("unshare({new_flags:?})"))?;
    }
    Ok(joined_pid || new_flags.contains(CloneFlags::CLONE_NEWPID))
}

/// Sets the process's rlimits. Raising a hard limit needs `CAP_SYS_RESOURCE` in the initial
/// user namespace: a process bound for a user namespace sets them before entering it (they
/// last through `setns`, `unshare`, `fork` and `execve`), as runc's parent sets them.
fn set_rlimits(p: &ProcessPlan) -> StepResult {
    for rl in &p.rlimits {
        let limit = libc::rlimit64 {
            rlim_cur: rl.soft,
            rlim_max: rl.hard,
        };
        // SAFETY: `limit` is a valid rlimit64 for the call's duration; the old-limit pointer is
        // null.
        let ret = unsafe { libc::prlimit64(0, rl.resource as _, &limit, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(format!("setrlimit({}): {}", rl.resource, Errno::last()));
        }
    }
    Ok(())
}

/// Becomes root (uid and gid 0) of the user namespace just entered: the helper's ids are the
/// agent's, which the namespace need not map, and files it makes must have owners there.
fn become_namespace_root() -> StepResult {
    ctx(
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
        || "becoming gid 0 of the user namespace (is gid 0 mapped?)".into(),
    )?;
    ctx(
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
        || "becoming uid 0 of the user namespace (is uid 0 mapped?)".into(),
    )
}

/// After joining a pid namespace only children are in it: fork one, as a child of the agent
/// (`CLONE_PARENT`), tell the agent its pid, and let the helper exit. The child waits until the
/// helper is gone (end of a pipe) so that its own messages follow the pid on the socket.
fn fork_into_pid_namespace(control: &mut UnixStream) -> StepResult {
    let (gate_r, gate_w) = ctx(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC), || {
        "pipe".into()
    })?;
    // SAFETY: a raw clone without CLONE_VM and without a new stack is fork(2) with extra flags;
    // this process is single threaded, so the child's copy of every lock and buffer is sound.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PARENT | libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        -1 => Err(format!("fork into the pid namespace: {}", Errno::last())),
        0 => {
            drop(gate_w);
            let mut gate = File::from(gate_r);
            let mut byte = [0u8; 1];
            // End of stream once the helper has reported the pid and exited.
            while matches!(io::Read::read(&mut gate, &mut byte), Ok(n) if n > 0) {}
            Ok(())
        }
        child => {
            let pid = i32::try_from(child).unwrap_or(-1);
            let _ = write_frame(control, &FromInit::Pid(pid));
            drop(gate_w);
            std::process::exit(0)
        }
    }
}

fn set_domainname(name: &str) -> StepResult {
    // SAFETY: the pointer and length describe `name`, which outlives the call.
    let ret = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    if ret != 0 {
        return Err(format!("setdomainname: {}", Errno::last()));
    }
    Ok(())
}

/// Resolves `path` under `root` as if `root` were `/`: symlinks (absolute or relative) and `..`
/// never leave `root`.
pub fn secure_join(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut parts: VecDeque<OsString> = VecDeque::new();
    let push_components = |parts: &mut VecDeque<OsString>, p: &Path, front: bool| {
        let comps: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        if front {
            for c in comps.into_iter().rev() {
                parts.push_front(c);
            }
        } else {
            parts.extend(comps);
        }
    };
    push_components(&mut parts, path, false);
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(part) = parts.pop_front() {
        if part == ".." {
            current.pop();
            continue;
        }
        let candidate = root.join(&current).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                push_components(&mut parts, &target, true);
            }
            _ => current.push(part),
        }
    }
    Ok(root.join(current))
}

fn mkdir_all(path: &Path) -> StepResult {
    ctx(fs::create_dir_all(path), || {
        format!("creating {}", path.display())
    })
}

fn do_mount(
    sys: &dyn Syscall,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> StepResult {
    let text = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{} is not UTF-8", p.display()))
    };
    let source_text = source.map(text).transpose()?;
    ctx(
        sys.mount(source_text.as_deref(), target, fstype, flags, data),
        || {
            format!(
                "mounting {} on {} (type {}, flags {flags:?})",
                source.map_or("none".into(), |s| s.display().to_string()),
                target.display(),
                fstype.unwrap_or("none")
            )
        },
    )
}

fn setup_rootfs(sys: &dyn Syscall, plan: &Plan, no_pivot: bool) -> StepResult {
    let rootfs = &plan.rootfs;
    prepare_root(sys, plan)?;
    let userns = plan.in_user_namespace();
    for m in &plan.mounts {
        mount_one(sys, rootfs, m, userns)?;
    }
    create_devices(sys, rootfs, &plan.devices, userns)?;
    ctx(chdir(rootfs), || format!("chdir {}", rootfs.display()))?;
    // To detach the old root after pivot_root: "." is no reliable name for it (runc's pivotRoot).
    let old_root = ctx(
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open("/"),
        || "opening the old root".into(),
    )?;
    let pivoted = if no_pivot {
        Err(Errno::EINVAL)
    } else {
        pivot_root(".", ".")
    };
    match pivoted {
        Ok(()) => detach_old_root(sys, &old_root)?,
        // The guest's root is the initramfs (rootfs), which pivot_root refuses: move the
        // container's root over it and chroot, as runc's --no-pivot does. The mount namespace
        // is the container's own and the VM is the isolation boundary.
        Err(Errno::EINVAL) => move_root(sys, rootfs)?,
        Err(errno) => return Err(format!("pivot_root: {errno}")),
    }
    ctx(chdir("/"), || "chdir /".into())?;
    Ok(())
}

/// runc's prepareRoot: `/` gets `linux.rootfsPropagation` (runc's default `rslave`: what the
/// container mounts never propagates out), the mount holding the root file system is made
/// private (pivot_root and `MS_MOVE` refuse a shared parent, and the bind below must not
/// propagate), and the root file system is bound onto itself, a mount of its own to pivot to.
fn prepare_root(sys: &dyn Syscall, plan: &Plan) -> StepResult {
    let root_flags = plan.rootfs_propagation.map_or(
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        MsFlags::from_bits_retain,
    );
    do_mount(sys, None, Path::new("/"), None, root_flags, None)?;
    make_parent_mount_private(sys, &plan.rootfs)?;
    do_mount(
        sys,
        Some(&plan.rootfs),
        &plan.rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
}

/// Makes the mount holding `path` private: `path` itself if it is a mount point, else the
/// nearest mount point above it (`mount(2)` answers `EINVAL` for a path that is none), as runc's
/// rootfsParentMountPrivate.
fn make_parent_mount_private(sys: &dyn Syscall, path: &Path) -> StepResult {
    let mut current = path;
    loop {
        match sys.mount(None, current, None, MsFlags::MS_PRIVATE, None) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL) => match current.parent() {
                Some(parent) => current = parent,
                None => break,
            },
            Err(errno) => {
                return Err(format!(
                    "making the mount of {} private ({}): {errno}",
                    path.display(),
                    current.display()
                ))
            }
        }
    }
    Err(format!(
        "making the mount of {} private: no mount point above it",
        path.display()
    ))
}

/// After `pivot_root(".", ".")` the old root is stacked on the new one: make it a recursive
/// slave, so that detaching it cannot propagate an unmount to a peer outside the container,
/// then detach it (runc's pivotRoot).
fn detach_old_root(sys: &dyn Syscall, old_root: &File) -> StepResult {
    ctx(nix::unistd::fchdir(old_root.as_raw_fd()), || {
        "entering the old root".into()
    })?;
    do_mount(
        sys,
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching the old root".into()
    })
}

/// The `MS_MOVE` road (runc's msMoveRoot): every mount of the old tree is made a slave, so that
/// neither detaching mounts nor moving the root propagates anywhere (and the root is not made
/// shared by a shared `/`); the mounts outside the container's root are detached, deepest
/// first, so nothing of the guest stays reachable beneath the chroot; then the container's root
/// is moved over `/` and entered.
fn move_root(sys: &dyn Syscall, rootfs: &Path) -> StepResult {
    let mountinfo = ctx(fs::read_to_string("/proc/self/mountinfo"), || {
        "reading mountinfo".into()
    })?;
    for point in mount_points_of_old_root(&mountinfo, rootfs) {
        match sys.mount(None, &point, None, MsFlags::MS_SLAVE, None) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(errno) => return Err(format!("making {} a slave: {errno}", point.display())),
        }
    }
    let mut points = mount_points_outside(&mountinfo, rootfs);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(errno) => return Err(format!("detaching {}: {errno}", point.display())),
        }
    }
    do_mount(
        sys,
        Some(rootfs),
        Path::new("/"),
        None,
        MsFlags::MS_MOVE,
        None,
    )?;
    ctx(nix::unistd::chroot("."), || "chroot".into())
}

/// The mount points of a mountinfo text (unescaped).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
}

/// Mount points of a mountinfo text that are neither `/` nor inside `rootfs` nor an ancestor of
/// it (those hold the container's root).
pub fn mount_points_outside(mountinfo: &str, rootfs: &Path) -> Vec<PathBuf> {
    mount_points(mountinfo)
        .filter(|p| p != Path::new("/") && !p.starts_with(rootfs) && !rootfs.starts_with(p))
        .collect()
}

/// Mount points of a mountinfo text that are not inside `rootfs`: the old tree, `/` and the
/// ancestors of `rootfs` included.
pub fn mount_points_of_old_root(mountinfo: &str, rootfs: &Path) -> Vec<PathBuf> {
    mount_points(mountinfo)
        .filter(|p| !p.starts_with(rootfs))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes.get(i), octal) {
            (Some(b'\\'), Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (Some(b), _) => {
                out.push(*b);
                i += 1;
            }
            (None, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// After the sysctls are written: masked and read-only paths, read-only root, then the root's
/// propagation.
fn finalize_rootfs(sys: &dyn Syscall, plan: &Plan) -> StepResult {
    for path in &plan.masked_paths {
        mask_path(sys, path)?;
    }
    for path in &plan.readonly_paths {
        readonly_path(sys, path)?;
    }
    if plan.readonly_rootfs {
        let locked = if plan.in_user_namespace() {
            locked_flags(Path::new("/"))
        } else {
            MsFlags::empty()
        };
        do_mount(
            sys,
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked,
            None,
        )?;
    }
    apply_root_propagation(sys, plan)
}

/// `linux.rootfsPropagation` on the container's root mount, which was made private to be
/// pivoted to (or moved), as runc applies it once the root is in place; runc skips `[r]private`,
/// which the root already is. Last: masked and read-only paths are bind mounts, which an
/// unbindable `/proc` or `/dev` would refuse.
fn apply_root_propagation(sys: &dyn Syscall, plan: &Plan) -> StepResult {
    match plan.rootfs_propagation {
        Some(bits) if bits & MsFlags::MS_PRIVATE.bits() == 0 => do_mount(
            sys,
            None,
            Path::new("/"),
            None,
            MsFlags::from_bits_retain(bits),
            None,
        ),
        _ => Ok(()),
    }
}

/// The flags of the mount at `path` that a user namespace cannot drop on a remount (the kernel
/// locks them on the mounts a less privileged mount namespace inherits, and on binds of those):
/// a remount there must repeat them, as runc's does.
fn locked_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let Ok(stat) = statvfs(path) else {
        return MsFlags::empty();
    };
    let f = stat.flags();
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| f.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

/// Mounts one entry of `mounts`. In a user namespace (`userns`) a remount keeps the locked
/// flags, and `sysfs`, which only the owner of the network namespace may mount, is bound
/// from the guest's `/sys` when the kernel refuses it (as runc does).
fn mount_one(sys: &dyn Syscall, rootfs: &Path, m: &MountPlan, userns: bool) -> StepResult {
    let target = ctx(secure_join(rootfs, &m.destination), || {
        format!("resolving {}", m.destination.display())
    })?;
    let flags = MsFlags::from_bits_retain(m.flags);
    if m.is_bind() {
        let source = m.source.as_deref().ok_or("a bind mount without a source")?;
        let meta = ctx(fs::metadata(source), || {
            format!("bind source {}", source.display())
        })?;
        if meta.is_dir() {
            mkdir_all(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                mkdir_all(parent)?;
            }
            if !target.exists() {
                ctx(File::create(&target), || {
                    format!("creating {}", target.display())
                })?;
            }
        }
        let bind_flags = flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
        do_mount(sys, Some(source), &target, None, bind_flags, None)?;
        let rest = flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            let locked = if userns {
                locked_flags(&target)
            } else {
                MsFlags::empty()
            };
            do_mount(
                sys,
                None,
                &target,
                None,
                rest | locked | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )?;
        }
    } else {
        mkdir_all(&target)?;
        let source = m.source.clone().unwrap_or_else(|| PathBuf::from("none"));
        let mounted = do_mount(
            sys,
            Some(&source),
            &target,
            m.fstype.as_deref(),
            flags,
            m.data.as_deref(),
        );
        match mounted {
            Err(_) if userns && m.fstype.as_deref() == Some("sysfs") => {
                // Refused (EPERM) to a user namespace that does not own the network namespace.
                do_mount(
                    sys,
                    Some(Path::new("/sys")),
                    &target,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )?;
            }
            other => other?,
        }
    }
    // One call per propagation option, with nothing but its flags (as runc).
    for change in &m.propagation {
        do_mount(
            sys,
            None,
            &target,
            None,
            MsFlags::from_bits_retain(*change),
            None,
        )?;
    }
    Ok(())
}

fn make_device(
    sys: &dyn Syscall,
    rootfs: &Path,
    dev: &DevicePlan,
    fallback_bind: bool,
) -> StepResult {
    let target = ctx(secure_join(rootfs, &dev.path), || {
        format!("resolving {}", dev.path.display())
    })?;
    if let Some(parent) = target.parent() {
        mkdir_all(parent)?;
    }
    let kind = SFlag::from_bits_truncate(dev.kind);
    match mknod(
        &target,
        kind,
        Mode::from_bits_truncate(dev.mode),
        makedev(dev.major, dev.minor),
    ) {
        Ok(()) => {}
        Err(Errno::EEXIST) => return Ok(()),
        Err(Errno::EPERM) if fallback_bind => {
            // A file system that refuses device nodes: bind the agent's own node.
            ctx(File::create(&target), || {
                format!("creating {}", target.display())
            })?;
            return do_mount(sys, Some(&dev.path), &target, None, MsFlags::MS_BIND, None);
        }
        Err(errno) => return Err(format!("mknod {}: {errno}", dev.path.display())),
    }
    ctx(
        nix::unistd::chown(
            &target,
            Some(Uid::from_raw(dev.uid)),
            Some(Gid::from_raw(dev.gid)),
        ),
        || format!("chown {}", dev.path.display()),
    )?;
    ctx(
        fs::set_permissions(&target, fs::Permissions::from_mode(dev.mode)),
        || format!("chmod {}", dev.path.display()),
    )
}

/// Makes the spec's device nodes and the default ones. In a user namespace, where `mknod` is
/// refused, each is the guest's own node bound in (as runc binds the host's).
fn create_devices(
    sys: &dyn Syscall,
    rootfs: &Path,
    devices: &[DevicePlan],
    userns: bool,
) -> StepResult {
    for dev in devices {
        make_device(sys, rootfs, dev, userns)?;
    }
    for (path, major, minor) in DEFAULT_DEVICES {
        if devices.iter().any(|d| d.path == Path::new(path)) {
            continue;
        }
        let dev = DevicePlan {
            path: PathBuf::from(path),
            kind: libc::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        make_device(sys, rootfs, &dev, true)?;
    }
    for (link, target) in DEV_SYMLINKS {
        let path = ctx(secure_join(rootfs, Path::new(link)), || {
            format!("resolving {link}")
        })?;
        match std::os::unix::fs::symlink(target, &path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(format!("symlink {link}: {err}")),
        }
    }
    Ok(())
}

fn mask_path(sys: &dyn Syscall, path: &Path) -> StepResult {
    match fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(format!("masking {}: {err}", path.display())),
        Ok(meta) if meta.is_dir() => do_mount(
            sys,
            Some(Path::new("tmpfs")),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        ),
        Ok(_) => do_mount(
            sys,
            Some(Path::new("/dev/null")),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        ),
    }
}

fn readonly_path(sys: &dyn Syscall, path: &Path) -> StepResult {
    match fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(format!("read-only path {}: {err}", path.display())),
        Ok(_) => {}
    }
    do_mount(
        sys,
        Some(path),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        sys,
        None,
        path,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_REC
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Finds the program: a name with a slash as is, otherwise along `PATH` of the process env.
pub fn find_program(arg0: &str, env: &[String]) -> StepResult<PathBuf> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(arg0);
        if let Ok(meta) = fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "{arg0}: executable file not found in $PATH ({path})"
    ))
}

fn cstring(s: &str) -> StepResult<CString> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// The highest capability the kernel knows.
fn last_cap() -> u8 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn cap_set(numbers: &[u8]) -> caps::CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|c| numbers.contains(&c.index()))
        .collect()
}

fn prctl_raw(option: i32, arg2: libc::c_ulong, arg3: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let ret = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if ret != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn prctl(option: i32, arg: libc::c_ulong, what: &str) -> StepResult {
    prctl_raw(option, arg, 0).map_err(|errno| format!("{what}: {errno}"))
}

/// `CAP_NET_BIND_SERVICE` for 10.
fn cap_name(number: u8) -> String {
    caps::all()
        .into_iter()
        .find(|c| c.index() == number)
        .map_or_else(|| format!("capability {number}"), |c| c.to_string())
}

fn install_seccomp(filters: &[Vec<SockFilter>]) -> StepResult {
    for filter in filters {
        seccomp::install(filter).map_err(|err| format!("seccomp: {err}"))?;
    }
    Ok(())
}

/// Applies the process attributes and executes the program.
fn exec_process(
    control: &mut UnixStream,
    p: &ProcessPlan,
    filters: &[Vec<SockFilter>],
) -> StepResult<std::convert::Infallible> {
    let ambient = p
        .caps
        .as_ref()
        .map(CapsPlan::ambient_split)
        .unwrap_or_default();
    // Reported now, before a seccomp filter could refuse the socket writes.
    for cap in &ambient.skip {
        warn(
            control,
            format!(
                "ambient capability {} not raised: it is not in both the permitted and the \
                 inheritable set",
                cap_name(*cap)
            ),
        );
    }
    ctx(nix::unistd::setsid(), || "setsid".into())?;
    if p.terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the pty's replica.
        let ret = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if ret != 0 {
            return Err(format!(
                "making the pty the controlling terminal: {}",
                Errno::last()
            ));
        }
    }
    set_rlimits(p)?;
    if let Some(adj) = p.oom_score_adj {
        ctx(
            fs::write("/proc/self/oom_score_adj", adj.to_string()),
            || "oom_score_adj".into(),
        )?;
    }
    if p.no_new_privileges {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")?;
    } else {
        // Needs CAP_SYS_ADMIN, so before the capabilities go.
        install_seccomp(filters)?;
    }
    if let Some(caps) = &p.caps {
        for cap in 0..=last_cap() {
            if !caps.bounding.contains(&cap) {
                prctl(
                    libc::PR_CAPBSET_DROP,
                    libc::c_ulong::from(cap),
                    "dropping a bounding capability",
                )?;
            }
        }
        prctl(libc::PR_SET_KEEPCAPS, 1, "keepcaps")?;
    }
    let groups: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    ctx(nix::unistd::setgroups(&groups), || "setgroups".into())?;
    let gid = Gid::from_raw(p.gid);
    ctx(nix::unistd::setresgid(gid, gid, gid), || {
        format!("setgid {}", p.gid)
    })?;
    let uid = Uid::from_raw(p.uid);
    ctx(nix::unistd::setresuid(uid, uid, uid), || {
        format!("setuid {}", p.uid)
    })?;
    if let Some(caps) = &p.caps {
        prctl(libc::PR_SET_KEEPCAPS, 0, "keepcaps")?;
        let set = |which, numbers: &[u8], name: &str| {
            ctx(caps::set(None, which, &cap_set(numbers)), || {
                format!("capabilities ({name})")
            })
        };
        set(caps::CapSet::Inheritable, &caps.inheritable, "inheritable")?;
        set(caps::CapSet::Effective, &caps.effective, "effective")?;
        set(caps::CapSet::Permitted, &caps.permitted, "permitted")?;
        ctx(caps::clear(None, caps::CapSet::Ambient), || {
            "clearing ambient capabilities".into()
        })?;
        for cap in &ambient.raise {
            match prctl_raw(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(*cap),
            ) {
                Ok(()) => {}
                // As runc: an ambient capability the kernel refuses is a warning, not a failure.
                Err(errno @ Errno::EPERM) => warn(
                    control,
                    format!("ambient capability {} not raised: {errno}", cap_name(*cap)),
                ),
                Err(errno) => return Err(format!("ambient {}: {errno}", cap_name(*cap))),
            }
        }
    }
    umask(Mode::from_bits_truncate(p.umask.unwrap_or(0o022)));
    ctx(chdir(&p.cwd), || format!("chdir {}", p.cwd.display()))?;
    let arg0 = p.args.first().ok_or("no args")?;
    let program = find_program(arg0, &p.env)?;
    let program_c = cstring(&program.display().to_string())?;
    let args: Vec<CString> = p
        .args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let env: Vec<CString> = p.env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?;
    if p.no_new_privileges {
        // Last: from here on only execve must pass the filter.
        install_seccomp(filters)?;
    }
    match nix::unistd::execve(&program_c, &args, &env) {
        Err(errno) => Err(format!("exec {}: {errno}", program.display())),
        Ok(never) => match never {},
    }
}

/// Whether `path` is a character device (for tests and checks).
pub fn is_char_device(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_utils::{Call, RecordingSyscall};

    fn mount_call(
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
    ) -> Call {
        Call::Mount {
            source: source.map(str::to_owned),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: None,
        }
    }

    #[test]
    fn masked_directory_gets_a_read_only_tmpfs_and_a_file_dev_null() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("kcore");
        fs::write(&file, "secret").expect("write");
        let sys = RecordingSyscall::new();
        mask_path(&sys, dir.path()).expect("dir");
        mask_path(&sys, &file).expect("file");
        mask_path(&sys, &dir.path().join("missing")).expect("missing is fine");
        assert_eq!(
            sys.calls(),
            vec![
                mount_call(Some("tmpfs"), dir.path(), Some("tmpfs"), MsFlags::MS_RDONLY),
                mount_call(Some("/dev/null"), &file, None, MsFlags::MS_BIND),
            ]
        );
    }

    #[test]
    fn read_only_path_is_bound_then_remounted_read_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let sys = RecordingSyscall::new();
        readonly_path(&sys, dir.path()).expect("ro");
        readonly_path(&sys, &dir.path().join("missing")).expect("missing is fine");
        let source = dir.path().to_str().expect("utf-8");
        assert_eq!(
            sys.calls(),
            vec![
                mount_call(
                    Some(source),
                    dir.path(),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
                mount_call(
                    None,
                    dir.path(),
                    None,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_REC
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC
                ),
            ]
        );
    }

    #[test]
    fn read_only_bind_mount_is_remounted_with_its_flags_and_propagation() {
        let dir = tempfile::tempdir().expect("tmp");
        let rootfs = dir.path().join("rootfs");
        let source = dir.path().join("data");
        fs::create_dir_all(&rootfs).expect("rootfs");
        fs::create_dir_all(&source).expect("source");
        let plan = MountPlan {
            destination: "/mnt/data".into(),
            source: Some(source.clone()),
            fstype: None,
            flags: (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY).bits(),
            propagation: vec![(MsFlags::MS_PRIVATE | MsFlags::MS_REC).bits()],
            data: None,
        };
        let sys = RecordingSyscall::new();
        mount_one(&sys, &rootfs, &plan, false).expect("mount");
        let target = rootfs.join("mnt/data");
        assert!(target.is_dir(), "mount point created");
        assert_eq!(
            sys.calls(),
            vec![
                mount_call(
                    source.to_str(),
                    &target,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
                mount_call(
                    None,
                    &target,
                    None,
                    MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REMOUNT
                ),
                mount_call(None, &target, None, MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            ]
        );
    }

    #[test]
    fn mounts_outside_the_container_root_are_found_for_detaching() {
        let mountinfo = "\
1 0 0:1 / / rw - rootfs rootfs rw
2 1 0:2 / /proc rw - proc proc rw
3 1 0:3 / /run rw - tmpfs tmpfs rw
4 3 0:4 / /run/husk/shared rw - virtiofs husk rw
5 4 0:4 /c1/rootfs /run/husk/shared/c1/rootfs rw - virtiofs husk rw
6 5 0:5 / /run/husk/shared/c1/rootfs/proc rw - proc proc rw
7 1 0:6 / /mnt/with\\040space rw - tmpfs tmpfs rw
";
        let rootfs = Path::new("/run/husk/shared/c1/rootfs");
        assert_eq!(
            mount_points_outside(mountinfo, rootfs),
            vec![PathBuf::from("/proc"), PathBuf::from("/mnt/with space")]
        );
    }

    #[test]
    fn mount_propagation_options_are_applied_one_call_each_after_the_mount() {
        let dir = tempfile::tempdir().expect("tmp");
        let plan = MountPlan {
            destination: "/mnt".into(),
            source: Some("tmpfs".into()),
            fstype: Some("tmpfs".into()),
            flags: MsFlags::MS_NOSUID.bits(),
            propagation: vec![
                MsFlags::MS_PRIVATE.bits(),
                (MsFlags::MS_SHARED | MsFlags::MS_REC).bits(),
            ],
            data: Some("size=1m".into()),
        };
        let sys = RecordingSyscall::new();
        mount_one(&sys, dir.path(), &plan, false).expect("mount");
        let target = dir.path().join("mnt");
        let mut first = mount_call(Some("tmpfs"), &target, Some("tmpfs"), MsFlags::MS_NOSUID);
        if let Call::Mount { data, .. } = &mut first {
            *data = Some("size=1m".into());
        }
        assert_eq!(
            sys.calls(),
            vec![
                first,
                mount_call(None, &target, None, MsFlags::MS_PRIVATE),
                mount_call(None, &target, None, MsFlags::MS_SHARED | MsFlags::MS_REC),
            ]
        );
    }

    fn plan_with_rootfs(rootfs: &Path, propagation: Option<MsFlags>) -> Plan {
        Plan {
            rootfs: rootfs.to_path_buf(),
            readonly_rootfs: false,
            rootfs_propagation: propagation.map(|f| f.bits()),
            namespaces: Vec::new(),
            mounts: Vec::new(),
            devices: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
            hostname: None,
            domainname: None,
            sysctls: Vec::new(),
            seccomp: Vec::new(),
            user_namespace: None,
            process: ProcessPlan {
                args: vec!["sh".into()],
                env: Vec::new(),
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                additional_gids: Vec::new(),
                umask: None,
                terminal: false,
                caps: None,
                rlimits: Vec::new(),
                no_new_privileges: false,
                oom_score_adj: None,
            },
        }
    }

    #[test]
    fn root_is_prepared_as_runc_does_with_the_parent_mount_made_private() {
        let rootfs = Path::new("/run/husk/shared/c1/rootfs");
        let sys = RecordingSyscall::new();
        // Neither the rootfs nor its directory is a mount point: the share above them is.
        sys.fail_mount("/run/husk/shared/c1/rootfs", Errno::EINVAL);
        sys.fail_mount("/run/husk/shared/c1", Errno::EINVAL);
        let plan = plan_with_rootfs(rootfs, Some(MsFlags::MS_SHARED));
        let err = prepare_root(&sys, &plan).expect_err("the scripted EINVAL hits the bind");
        assert!(err.contains("MS_BIND"), "{err}");
        assert_eq!(
            sys.calls(),
            vec![
                mount_call(None, Path::new("/"), None, MsFlags::MS_SHARED),
                mount_call(None, rootfs, None, MsFlags::MS_PRIVATE),
                mount_call(
                    None,
                    Path::new("/run/husk/shared/c1"),
                    None,
                    MsFlags::MS_PRIVATE
                ),
                mount_call(
                    None,
                    Path::new("/run/husk/shared"),
                    None,
                    MsFlags::MS_PRIVATE
                ),
                mount_call(
                    rootfs.to_str(),
                    rootfs,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
            ]
        );
    }

    #[test]
    fn unset_root_propagation_makes_the_root_a_recursive_slave_and_nothing_after() {
        let rootfs = Path::new("/b/rootfs");
        let sys = RecordingSyscall::new();
        let plan = plan_with_rootfs(rootfs, None);
        prepare_root(&sys, &plan).expect("prepared");
        apply_root_propagation(&sys, &plan).expect("nothing to apply");
        assert_eq!(
            sys.calls(),
            vec![
                mount_call(
                    None,
                    Path::new("/"),
                    None,
                    MsFlags::MS_SLAVE | MsFlags::MS_REC
                ),
                mount_call(None, rootfs, None, MsFlags::MS_PRIVATE),
                mount_call(
                    rootfs.to_str(),
                    rootfs,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC
                ),
            ]
        );
    }

    #[test]
    fn configured_root_propagation_is_applied_to_the_new_root_except_private() {
        let rootfs = Path::new("/b/rootfs");
        for (flags, applied) in [
            (MsFlags::MS_SHARED, true),
            (MsFlags::MS_SHARED | MsFlags::MS_REC, true),
            (MsFlags::MS_SLAVE, true),
            (MsFlags::MS_UNBINDABLE | MsFlags::MS_REC, true),
            (MsFlags::MS_PRIVATE, false),
            (MsFlags::MS_PRIVATE | MsFlags::MS_REC, false),
        ] {
            let sys = RecordingSyscall::new();
            apply_root_propagation(&sys, &plan_with_rootfs(rootfs, Some(flags))).expect("applied");
            let expected = if applied {
                vec![mount_call(None, Path::new("/"), None, flags)]
            } else {
                Vec::new()
            };
            assert_eq!(sys.calls(), expected, "{flags:?}");
        }
    }

    #[test]
    fn a_rootfs_under_no_mount_point_fails_clearly() {
        let sys = RecordingSyscall::new();
        for path in ["/b/rootfs", "/b", "/"] {
            sys.fail_mount(path, Errno::EINVAL);
        }
        let err = make_parent_mount_private(&sys, Path::new("/b/rootfs")).expect_err("none");
        assert!(err.contains("no mount point above it"), "{err}");
        let sys = RecordingSyscall::new();
        sys.fail_mount("/b/rootfs", Errno::EPERM);
        let err = make_parent_mount_private(&sys, Path::new("/b/rootfs")).expect_err("EPERM");
        assert!(err.contains("EPERM"), "{err}");
    }

    #[test]
    fn the_old_root_to_quiet_is_every_mount_not_inside_the_container_root() {
        let mountinfo = "\
1 0 0:1 / / rw - rootfs rootfs rw
2 1 0:2 / /proc rw - proc proc rw
3 1 0:3 / /run rw - tmpfs tmpfs rw
4 3 0:4 / /run/husk/shared rw - virtiofs husk rw
5 4 0:4 /c1/rootfs /run/husk/shared/c1/rootfs rw - virtiofs husk rw
6 5 0:5 / /run/husk/shared/c1/rootfs/proc rw - proc proc rw
7 4 0:4 /c2/rootfs /run/husk/shared/c2/rootfs rw - virtiofs husk rw
";
        let rootfs = Path::new("/run/husk/shared/c1/rootfs");
        assert_eq!(
            mount_points_of_old_root(mountinfo, rootfs),
            [
                "/",
                "/proc",
                "/run",
                "/run/husk/shared",
                "/run/husk/shared/c2/rootfs"
            ]
            .map(PathBuf::from)
            .to_vec()
        );
        assert_eq!(
            mount_points_outside(mountinfo, rootfs),
            ["/proc", "/run/husk/shared/c2/rootfs"]
                .map(PathBuf::from)
                .to_vec()
        );
    }

    #[test]
    fn capability_numbers_are_named_as_in_the_spec() {
        assert_eq!(cap_name(10), "CAP_NET_BIND_SERVICE");
        assert_eq!(cap_name(29), "CAP_AUDIT_WRITE");
        assert_eq!(cap_name(200), "capability 200");
    }

    #[test]
    fn failed_mount_names_the_target() {
        let dir = tempfile::tempdir().expect("tmp");
        let sys = RecordingSyscall::new();
        let target = dir.path().join("proc");
        sys.fail_mount(target.to_str().expect("utf-8"), Errno::EPERM);
        let plan = MountPlan {
            destination: "/proc".into(),
            source: Some("proc".into()),
            fstype: Some("proc".into()),
            flags: 0,
            propagation: Vec::new(),
            data: None,
        };
        let err = mount_one(&sys, dir.path(), &plan, false).expect_err("fails");
        assert!(
            err.contains("on ") && err.contains("/proc (type proc"),
            "{err}"
        );
        assert!(err.contains("EPERM"), "{err}");
    }

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        fs::create_dir_all(root.join("real/dir")).expect("mkdir");
        std::os::unix::fs::symlink("/real", root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../../etc", root.join("real/up")).expect("symlink");
        assert_eq!(
            secure_join(root, Path::new("/abs/dir/x")).expect("join"),
            root.join("real/dir/x")
        );
        assert_eq!(
            secure_join(root, Path::new("/real/up/passwd")).expect("join"),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).expect("join"),
            root.join("x")
        );
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        assert!(secure_join(root, Path::new("/loop/x")).is_err());
    }

    #[test]
    fn program_is_found_along_the_env_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("mkdir");
        let prog = bin.join("tool");
        fs::write(&prog, "#!/bin/sh\n").expect("write");
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).expect("chmod");
        let env = vec![format!("PATH=/nonexistent:{}", bin.display())];
        assert_eq!(find_program("tool", &env).expect("found"), prog);
        assert_eq!(
            find_program("./x", &env).expect("as is"),
            PathBuf::from("./x")
        );
        let err = find_program("nope", &env).expect_err("missing");
        assert!(err.contains("executable file not found"), "{err}");
    }

    #[test]
    fn init_messages_round_trip_as_json() {
        let msg = FromInit::Error("boom".into());
        let json = serde_json::to_string(&msg).expect("json");
        assert_eq!(json, r#"{"Error":"boom"}"#);
        assert_eq!(serde_json::from_str::<FromInit>(&json).expect("back"), msg);
        let msg = FromInit::Warning("ambient".into());
        let json = serde_json::to_string(&msg).expect("json");
        assert_eq!(json, r#"{"Warning":"ambient"}"#);
        assert_eq!(serde_json::from_str::<FromInit>(&json).expect("back"), msg);
    }
}
