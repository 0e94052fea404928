//! husk-vmm's user namespace: the VMM runs as an unprivileged host uid, while its file server
//! still acts as the guest's users on the share.
//!
//! The runtime (the `husk` CLI, the shim) makes a user namespace ([`create`]) that maps the
//! ids 0 to [`ID_COUNT`]` - 1` onto host ids starting at a base far from every real user
//! ([`DEFAULT_UID_BASE`]): root in it is host uid `base`, a nobody on the host. Everything the
//! VMM must reach as its guest's users is mounted through that mapping:
//! - the share's binds (the container's rootfs and bind-mount sources) are **idmapped
//!   mounts** ([`idmapped_tree`]): a file whose owner on disk is `k` is seen in the namespace
//!   as owned by `k`, and a file the VMM makes as `k` is owned by `k` on disk, as before;
//! - the jail's directories (the state directory with the VMM's sockets and reports), so
//!   that what the VMM writes there lands as root-owned on the host, as before.
//!
//! husk-vmm joins the namespace ([`enter`]) once its jail is built, before it drops
//! capabilities: from then on its capabilities (those the file server keeps) work only in
//! the namespace, that is on inodes whose owner and group it maps, which are those of the
//! idmapped mounts alone. Whatever else of the host it might reach, it reaches as uid
//! `base`. Files of the share owned by ids at or above [`ID_COUNT`] are seen as the overflow
//! id (65534), and the guest cannot give a file such an owner, as in Kubernetes' pods without
//! host users.
//!
//! Every VMM uses the same range: each is alone in its own pid, mount, ipc, uts and network
//! namespaces and its jail, so none can name another or another's files.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The first host id of the range, unless configured: 0x7000_0000, above systemd's container
/// ranges (which end at 0x6fff_ffff) and below the ids that are negative as signed integers.
pub const DEFAULT_UID_BASE: u32 = 0x7000_0000;
/// How many ids the namespace maps (uids and gids alike): 0 to 2^28 - 1 (268435455). Every id
/// a container may run as or own files as must be in it, including the ids of the user
/// namespaces that containers' own `linux.uidMappings` make (podman's `--uidmap 0:100000:65536`,
/// Kubernetes' pods without host users, which get blocks of 65536 from 65536 up), so the range
/// is wide; from [`DEFAULT_UID_BASE`] it ends at 2^31 - 1, below the ids that are negative as
/// signed integers.
pub const ID_COUNT: u32 = 0x1000_0000;

/// `mount_setattr`'s argument (`struct mount_attr` of `linux/mount.h`, version 0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `MOUNT_ATTR_IDMAP`: the mount maps ids through the user namespace `userns_fd`.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `move_mount`'s flag: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The line of `uid_map` and `gid_map` for a range starting at `base`.
pub fn map_line(base: u32) -> io::Result<String> {
    if base == 0 || base.checked_add(ID_COUNT).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the VMM's id range {base}..{}: it must start above 0 and end below 2^32",
                u64::from(base) + u64::from(ID_COUNT)
            ),
        ));
    }
    Ok(format!("0 {base} {ID_COUNT}\n"))
}

fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: the path holds a NUL byte", path.display()),
        )
    })
}

/// Makes a user namespace that maps ids 0 to [`ID_COUNT`]` - 1` onto `base` and up, and returns
/// a descriptor of it (the namespace lives as long as a descriptor or a process holds it).
/// Needs root: a child process unshares it and waits while this process writes its maps.
pub fn create(base: u32) -> io::Result<OwnedFd> {
    let line = map_line(base)?;
    let (ready_read, ready_write) = pipe()?;
    let (done_read, done_write) = pipe()?;
    let (ready_r, ready_w) = (ready_read.as_raw_fd(), ready_write.as_raw_fd());
    let (done_r, done_w) = (done_read.as_raw_fd(), done_write.as_raw_fd());
    // SAFETY: the child runs only async-signal-safe system calls (close, unshare, write, read,
    // _exit) on descriptors it inherited, then exits without running any destructor.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("forking the user namespace's first process"));
    }
    if pid == 0 {
        // SAFETY: see above; every call takes plain integers or a pointer to a local byte.
        unsafe {
            // The parent's ends: with its copy of `done_w` open, the child would never see
            // the end of file it waits for.
            libc::close(ready_r);
            libc::close(done_w);
            let ok = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(ready_w, std::ptr::addr_of!(ok).cast(), 1);
            let mut byte = 0u8;
            // Returns at end of file: the parent closed its end (or died).
            libc::read(done_r, std::ptr::addr_of_mut!(byte).cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_write);
    drop(done_read);
    let result = map_child(pid, &ready_read, &line);
    drop(done_write);
    let mut status = 0;
    // SAFETY: waits for our own child, which exits once `done_write` is closed.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    result
}

/// Writes the maps of the child `pid` once it says it unshared, and opens its namespace.
fn map_child(pid: libc::pid_t, ready: &OwnedFd, line: &str) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let n = nix::unistd::read(ready.as_raw_fd(), &mut byte).map_err(io::Error::from)?;
    if n != 1 || byte[0] != 1 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "cannot make a user namespace (unshare(CLONE_NEWUSER) failed in the child: \
             user namespaces may be disabled, see /proc/sys/user/max_user_namespaces)",
        ));
    }
    let proc = format!("/proc/{pid}");
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("{proc}/{map}"), line)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {proc}/{map}: {e}")))?;
    }
    let ns = std::fs::File::open(format!("{proc}/ns/user"))
        .map_err(|e| io::Error::new(e.kind(), format!("opening {proc}/ns/user: {e}")))?;
    Ok(OwnedFd::from(ns))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A detached copy of the mount tree at `path` (with what is mounted below it if
/// `recursive`), not yet mounted anywhere.
pub fn clone_tree(path: &Path, recursive: bool) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree reads a NUL-terminated path and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_error(&format!(
            "cloning the mount of {}",
            path.display()
        )));
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("open_tree: descriptor range"))?;
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the detached tree `tree` map ids through `userns` (the whole tree if `recursive`).
/// Fails (`EINVAL`, `EOPNOTSUPP`) where a file system of the tree cannot be idmapped.
pub fn idmap(tree: &OwnedFd, userns: BorrowedFd<'_>, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).unwrap_or(u64::MAX),
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr reads an empty NUL-terminated path and `attr`, whose size it is
    // given; it changes only the detached mount.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret != 0 {
        let e = io::Error::last_os_error();
        let why = if e.raw_os_error() == Some(libc::EINVAL) {
            " (its file system cannot be idmapped: an overlayfs mount, NFS, FUSE, or tmpfs \
             before Linux 6.3)"
        } else {
            ""
        };
        return Err(io::Error::new(
            e.kind(),
            format!("idmapping the mount: {e}{why}"),
        ));
    }
    Ok(())
}

/// An idmapped, detached copy of the mount tree at `source`, to be [`attach`]ed.
pub fn idmapped_tree(
    source: &Path,
    userns: BorrowedFd<'_>,
    recursive: bool,
) -> io::Result<OwnedFd> {
    let tree = clone_tree(source, recursive)?;
    idmap(&tree, userns, recursive)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
    Ok(tree)
}

/// Mounts the detached tree `tree` on `target`.
pub fn attach(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    let c = cstring(target)?;
    // SAFETY: move_mount reads two NUL-terminated paths (the first empty, with the flag that
    // says the source is the descriptor) and changes only the mount tree.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if ret != 0 {
        return Err(last_error(&format!("mounting on {}", target.display())));
    }
    Ok(())
}

/// Joins the user namespace `userns` and becomes its root (uid and gid 0, no supplementary
/// groups): host uid and gid `base`. Call it on the only thread (the kernel refuses a
/// multithreaded process), after the jail is built and before capabilities are dropped; the
/// process then holds every capability in the namespace, and none outside it.
pub fn enter(userns: BorrowedFd<'_>) -> io::Result<()> {
    nix::sched::setns(userns.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("joining it: {e}")))?;
    // SAFETY: plain integer arguments; each changes only this process's credentials.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last_error("dropping supplementary groups"));
        }
        if libc::setresgid(0, 0, 0) != 0 {
            return Err(last_error("setting its gid"));
        }
        if libc::setresuid(0, 0, 0) != 0 {
            return Err(last_error("setting its uid"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_map_covers_the_range_and_refuses_overflow() {
        assert_eq!(
            map_line(DEFAULT_UID_BASE).unwrap(),
            "0 1879048192 268435456\n"
        );
        assert!(map_line(0).is_err());
        assert!(map_line(u32::MAX - 100).is_err());
        assert!(map_line(u32::MAX - ID_COUNT).is_ok());
    }

    /// A process in the namespace, on an idmapped bind: its files are owned on disk by the
    /// ids it gives them, while it is host uid `base` and cannot write a root-owned directory
    /// outside the idmapped mount.
    #[test]
    fn the_vmm_acts_as_its_guests_users_only_through_idmapped_mounts() {
        if !crate::jail::possible() {
            eprintln!(
                "SKIPPED the_vmm_acts_as_its_guests_users_only_through_idmapped_mounts: needs \
                 CAP_SYS_ADMIN"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (src, mnt, plain) = (
            dir.path().join("src"),
            dir.path().join("mnt"),
            dir.path().join("plain"),
        );
        for d in [&src, &mnt, &plain] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(src.join("theirs"), "x").unwrap();
        std::os::unix::fs::chown(src.join("theirs"), Some(1000), Some(1000)).unwrap();
        let ns = create(DEFAULT_UID_BASE).unwrap();
        let tree = idmapped_tree(&src, ns.as_fd(), true).unwrap();
        attach(&tree, &mnt).unwrap();
        // Inherited by the child under its number.
        nix::fcntl::fcntl(
            ns.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "userns::tests::child_acts_in_the_namespace",
                "--test-threads=1",
            ])
            .env("HUSK_USERNS_TEST_DIR", dir.path())
            .env("HUSK_USERNS_TEST_FD", ns.as_raw_fd().to_string())
            .status()
            .unwrap();
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(status.success(), "the child in the namespace failed");
        let made = std::fs::metadata(src.join("made")).unwrap();
        assert_eq!(
            (made.uid(), made.gid()),
            (0, 0),
            "made as the namespace's root"
        );
        let given = std::fs::metadata(src.join("given")).unwrap();
        assert_eq!(
            (given.uid(), given.gid()),
            (2000, 3000),
            "chowned in the namespace"
        );
        let theirs = std::fs::metadata(src.join("theirs")).unwrap();
        assert_eq!(theirs.mode() & 0o7777, 0o600, "chmod of another's file");
        assert!(!plain.join("refused").exists());
    }

    #[test]
    #[ignore = "run by the_vmm_acts_as_its_guests_users_only_through_idmapped_mounts"]
    fn child_acts_in_the_namespace() {
        let Some(dir) = std::env::var_os("HUSK_USERNS_TEST_DIR") else {
            return;
        };
        let fd: RawFd = std::env::var("HUSK_USERNS_TEST_FD")
            .unwrap()
            .parse()
            .unwrap();
        // The test runs on a thread of its own, and a user namespace takes only a process of
        // one thread: the checks run in a forked child.
        // SAFETY: the child only runs the checks and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = std::panic::catch_unwind(|| checks_in_the_namespace(Path::new(&dir), fd))
                    .is_ok();
                // SAFETY: ends the forked child at once.
                unsafe { libc::_exit(if ok { 42 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 42));
            }
        }
    }

    fn checks_in_the_namespace(dir: &Path, fd: RawFd) {
        // SAFETY: the descriptor was inherited for this test and nothing else uses it.
        let ns = unsafe { BorrowedFd::borrow_raw(fd) };
        enter(ns).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        // /proc shows ids as the reader's namespace sees them: 0 here.
        assert_eq!(uid_line.split_whitespace().nth(1), Some("0"), "{uid_line}");
        let mnt = dir.join("mnt");
        std::fs::write(mnt.join("made"), "ns root").unwrap();
        std::fs::write(mnt.join("given"), "x").unwrap();
        std::os::unix::fs::chown(mnt.join("given"), Some(2000), Some(3000)).unwrap();
        let theirs = mnt.join("theirs");
        assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 1000);
        std::fs::set_permissions(&theirs, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        // Outside the idmapped mount, root-owned: the namespace's root is nobody there.
        let refused = std::fs::write(dir.join("plain/refused"), "x").unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
        // Ids outside the range cannot be given.
        assert!(std::os::unix::fs::chown(mnt.join("given"), Some(ID_COUNT), None).is_err());
    }
}
