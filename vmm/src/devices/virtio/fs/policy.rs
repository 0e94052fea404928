//! [`ConfinedFs`]: the passthrough file system behind the policy of the [module
//! docs](super): name checks, no device nodes, no setuid/setgid bits, no xattrs, no DAX, and
//! a serving thread without `CAP_MKNOD` / `CAP_FSETID` and with its own umask.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::{CacheTimes, FsError};
use crate::devices::virtio::RateLimitedLog;

/// An inode number as the guest sees it.
pub type Inode = u64;
/// An open file handle as the guest sees it.
pub type Handle = u64;

/// Mode bits the guest may never set on the host.
pub const FORBIDDEN_MODE_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

/// `renameat2` flags the guest may use.
const ALLOWED_RENAME_FLAGS: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;

/// FUSE features the guest is never offered (see the module docs): writeback cache, DAX,
/// NFS export (`..` lookups, file handles), ACLs, and killpriv handling by the guest.
/// Zero-message opens are offered (see the module docs: every `READ` and `WRITE` opens the
/// inode on the host, with the passthrough's type check).
const REFUSED_OPTIONS: FsOptions = FsOptions::WRITEBACK_CACHE
    .union(FsOptions::PERFILE_DAX)
    .union(FsOptions::EXPORT_SUPPORT)
    .union(FsOptions::POSIX_ACL)
    .union(FsOptions::HANDLE_KILLPRIV)
    .union(FsOptions::HANDLE_KILLPRIV_V2)
    .union(FsOptions::SUBMOUNTS)
    .union(FsOptions::FD_PASSTHROUGH)
    .union(FsOptions::ATOMIC_O_TRUNC);

/// FUSE features we ask for on top of the passthrough's, for speed: 1 MiB requests,
/// parallel reads and directory operations, cached symlinks, and dropping cached data of
/// files changed on the host.
const WANTED_OPTIONS: FsOptions = FsOptions::ASYNC_READ
    .union(FsOptions::BIG_WRITES)
    .union(FsOptions::MAX_PAGES)
    .union(FsOptions::PARALLEL_DIROPS)
    .union(FsOptions::CACHE_SYMLINKS)
    .union(FsOptions::AUTO_INVAL_DATA);

/// Capabilities the serving thread gives up (numbers from `linux/capability.h`).
const CAP_FSETID: u32 = 4;
const CAP_MKNOD: u32 = 27;

thread_local! {
    /// Whether this thread already dropped its capabilities and umask for serving.
    static THREAD_CONFINED: Cell<bool> = const { Cell::new(false) };
}

/// Where an inode sits in the share, for how long the guest may cache it (see the module
/// docs' [Caching](super#caching)): husk lays the share out as `<id>/rootfs` and
/// `<id>/mounts/<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// The share's root directory.
    ShareRoot,
    /// A directory at the share's root: one container's (`<id>`).
    Container,
    /// `<id>/rootfs` and everything below it.
    Rootfs,
    /// Anything else: bind mounts (`<id>/mounts/<n>`), the share's own directories.
    Other,
}

impl Place {
    /// The place of the entry `name` in a directory of this place.
    fn child(self, name: &[u8]) -> Place {
        match self {
            Place::ShareRoot => Place::Container,
            Place::Container if name == b"rootfs" => Place::Rootfs,
            Place::Rootfs => Place::Rootfs,
            _ => Place::Other,
        }
    }

    /// The place of an inode reached by two paths (a hard link): the one that caches less.
    fn meet(self, other: Place) -> Place {
        if self == other {
            self
        } else {
            Place::Other
        }
    }
}

/// The places of the inodes the guest holds, each with the number of lookups the guest has
/// not forgotten (the passthrough's own count, kept alike: one per entry handed out).
#[derive(Default)]
struct Places {
    held: HashMap<Inode, (Place, u64)>,
}

impl Places {
    fn of(&self, inode: Inode) -> Place {
        if inode == ROOT_ID {
            return Place::ShareRoot;
        }
        self.held
            .get(&inode)
            .map_or(Place::Other, |&(place, _)| place)
    }

    /// Records one more lookup of `inode`, reached at `place`; returns its place now.
    fn looked_up(&mut self, inode: Inode, place: Place) -> Place {
        let held = self.held.entry(inode).or_insert((place, 0));
        held.0 = held.0.meet(place);
        held.1 = held.1.saturating_add(1);
        held.0
    }

    fn forget(&mut self, inode: Inode, count: u64) {
        if let Some(held) = self.held.get_mut(&inode) {
            held.1 = held.1.saturating_sub(count);
            if held.1 == 0 {
                self.held.remove(&inode);
            }
        }
    }
}

/// The passthrough file system over one shared directory, with husk's policy enforced.
pub struct ConfinedFs {
    inner: PassthroughFs<()>,
    /// The share's root, opened on the host before the VMM's jail: the passthrough (re)opens
    /// its root at ".", from a thread whose working directory is this ([`Self::in_share`]).
    root: OwnedFd,
    cache: CacheTimes,
    places: Mutex<Places>,
    /// The most inodes the guest may hold (see [Inodes held](super#inodes-held-bounded)).
    max_inodes: usize,
    /// Says, now and then, that the guest reached `max_inodes`.
    full_log: Mutex<RateLimitedLog>,
}

impl ConfinedFs {
    /// Serves `shared_dir` (which must be a directory), with [`CacheTimes::default`].
    pub fn new(shared_dir: &Path) -> Result<Self, FsError> {
        Self::with_cache(shared_dir, CacheTimes::default())
    }

    /// Serves `shared_dir` (which must be a directory), with `cache` for the guest's caches.
    pub fn with_cache(shared_dir: &Path, cache: CacheTimes) -> Result<Self, FsError> {
        Self::with_limits(shared_dir, cache, super::DEFAULT_MAX_INODES)
    }

    /// Serves `shared_dir` (which must be a directory), with `cache` for the guest's caches,
    /// the guest holding at most `max_inodes` inodes.
    pub fn with_limits(
        shared_dir: &Path,
        cache: CacheTimes,
        max_inodes: usize,
    ) -> Result<Self, FsError> {
        let err = |source| FsError::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        };
        // The host's own path to the share may go through symlinks: resolve it once, here (the
        // passthrough opens its root with O_NOFOLLOW).
        let resolved = shared_dir.canonicalize().map_err(err)?;
        if !resolved.is_dir() {
            return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&resolved)
            .map_err(err)?;
        let cfg = Config {
            // Inside husk-vmm's jail the share has no path (see `crate::jail`): the passthrough
            // opens "." on a thread standing in the share ([`Self::in_share`]).
            root_dir: ".".into(),
            // Replaced per reply by the inode's place; these serve what the passthrough
            // answers before we see it.
            entry_timeout: cache.other,
            attr_timeout: cache.other,
            cache_policy: CachePolicy::Always,
            writeback: false,
            xattr: false,
            do_import: true,
            no_open: true,
            no_opendir: true,
            killpriv_v2: false,
            inode_file_handles: false,
            no_readdir: false,
            seal_size: false,
            dax_file_size: None,
            allow_direct_io: true,
            ..Config::default()
        };
        let fs = Self {
            inner: PassthroughFs::new(cfg).map_err(err)?,
            root: root.into(),
            cache,
            places: Mutex::new(Places::default()),
            max_inodes,
            full_log: Mutex::new(RateLimitedLog::default()),
        };
        // Open the root now so a bad directory fails the build, not the guest's mount.
        // `import` sets the umask to 0: do it on a thread with its own umask.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    unshare_fs()?;
                    fs.in_share(|| fs.inner.import())?
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("import panicked")))
        })
        .map_err(err)?;
        Ok(fs)
    }

    /// Runs `f` with the calling thread's working directory in the share, then puts it back.
    /// The passthrough opens its root by path (at [`Self::with_cache`], FUSE INIT and
    /// DESTROY): "." then is the share, wherever the VMM's own root is. The thread must have
    /// its own fs context ([`confine_thread`]), so that no other thread's directory moves.
    fn in_share<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let back = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(".")?;
        nix::unistd::fchdir(self.root.as_raw_fd()).map_err(io::Error::from)?;
        let result = f();
        nix::unistd::fchdir(back.as_raw_fd()).map_err(io::Error::from)?;
        Ok(result)
    }

    fn places(&self) -> std::sync::MutexGuard<'_, Places> {
        // The map stays consistent through a panic elsewhere (each update is one call).
        self.places.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_time(&self, place: Place) -> Duration {
        match place {
            Place::Rootfs => self.cache.rootfs,
            _ => self.cache.other,
        }
    }

    /// Gives an entry for `name` in `parent` (a positive one the guest now holds one more
    /// lookup of, or a negative one) the cache times of its place.
    fn place_entry(&self, parent: Inode, name: &[u8], mut entry: Entry) -> Entry {
        let mut places = self.places();
        let place = places.of(parent).child(name);
        if entry.inode == 0 {
            entry.entry_timeout = self.cache_time(place);
            return entry;
        }
        let time = self.cache_time(places.looked_up(entry.inode, place));
        entry.entry_timeout = time;
        entry.attr_timeout = time;
        entry
    }

    /// Attributes with the cache time of the inode's place.
    fn place_attr(&self, inode: Inode, attr: (stat64, Duration)) -> (stat64, Duration) {
        (attr.0, self.cache_time(self.places().of(inode)))
    }

    /// Whether the guest holds as many inodes as it may: a new one would be one too many.
    fn full(&self) -> bool {
        let held = self.places().held.len();
        if held < self.max_inodes {
            return false;
        }
        let mut log = self.full_log.lock().unwrap_or_else(|p| p.into_inner());
        if log.should_log() {
            tracing::warn!(
                "virtio-fs: the guest holds {held} inodes, the most this VM may: new ones fail \
                 with ENFILE until it forgets some ({} times so far)",
                log.count()
            );
        }
        true
    }

    /// Whether an entry for `inode`, just handed out, must be taken back: it names an inode the
    /// guest does not hold (not a negative entry, inode 0) and the guest holds all it may.
    fn refuses(&self, inode: Inode) -> bool {
        inode != 0 && !self.places().held.contains_key(&inode) && self.full()
    }

    /// `full()` as the error a create answers.
    fn check_room(&self) -> io::Result<()> {
        if self.full() {
            Err(io::Error::from_raw_os_error(libc::ENFILE))
        } else {
            Ok(())
        }
    }

    /// An entry the passthrough just handed out, for `name` in `parent`: placed, or, when it
    /// names an inode the guest did not hold and the guest holds all it may, taken back
    /// (`ENFILE`).
    fn hold_entry(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &[u8],
        entry: Entry,
    ) -> io::Result<Entry> {
        if self.refuses(entry.inode) {
            self.inner.forget(ctx, entry.inode, 1);
            return Err(io::Error::from_raw_os_error(libc::ENFILE));
        }
        Ok(self.place_entry(parent, name, entry))
    }

    /// The passthrough file system, after confining the calling thread.
    fn host(&self) -> io::Result<&PassthroughFs<()>> {
        confine_thread()?;
        Ok(&self.inner)
    }
}

/// Prepares the calling thread for serving, once per thread: its own umask of 0 (the guest
/// applied its umask already; `unshare(CLONE_FS)` keeps this from the rest of the VMM) and
/// no `CAP_MKNOD` / `CAP_FSETID` in its effective and permitted sets. Fails closed: without
/// this the request is refused.
pub fn confine_thread() -> io::Result<()> {
    if THREAD_CONFINED.with(Cell::get) {
        return Ok(());
    }
    unshare_fs()?;
    set_umask(0);
    drop_thread_caps(&[CAP_FSETID, CAP_MKNOD])?;
    THREAD_CONFINED.with(|c| c.set(true));
    Ok(())
}

/// Gives the calling thread its own cwd, root and umask.
fn unshare_fs() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only copies this thread's fs context; no memory is touched.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the umask of the calling thread's fs context; returns the old one.
fn set_umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask has no memory effects and cannot fail.
    unsafe { libc::umask(mask) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Removes `caps` from the calling thread's effective, permitted and inheritable sets.
fn drop_thread_caps(caps: &[u32]) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the kernel to read and write; version 3 uses
    // exactly two CapData entries.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    for &cap in caps {
        let Some(entry) = data.get_mut((cap / 32) as usize) else {
            continue;
        };
        let bit = 1u32 << (cap % 32);
        entry.effective &= !bit;
        entry.permitted &= !bit;
        entry.inheritable &= !bit;
    }
    // SAFETY: as above; the kernel only reads header and data. pid 0 is this thread.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// "No such name": inode 0 (its time is set by [`ConfinedFs::place_entry`]).
fn negative_entry() -> Entry {
    Entry {
        inode: 0,
        generation: 0,
        // SAFETY: stat64 is plain integers; all-zero is a valid value.
        attr: unsafe { std::mem::zeroed() },
        attr_flags: 0,
        attr_timeout: Duration::ZERO,
        entry_timeout: Duration::ZERO,
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

fn enosys() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSYS)
}

/// A name the guest may use in a directory: not empty, not `.` or `..`, no `/`.
pub fn check_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(einval());
    }
    Ok(())
}

/// The mode with setuid and setgid cleared.
pub fn strip_mode(mode: u32) -> u32 {
    mode & !FORBIDDEN_MODE_BITS
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // The passthrough switches modes by what the guest offers: offer it only what we allow.
        let capable = capable - REFUSED_OPTIONS;
        let host = self.host()?;
        let want = self.in_share(|| host.init(capable))?? | WANTED_OPTIONS;
        Ok(want - REFUSED_OPTIONS)
    }

    fn destroy(&self) {
        // `destroy` re-imports the root, which sets the umask: only on a confined thread.
        // The guest's inodes go with the session.
        self.places().held.clear();
        match confine_thread().and_then(|()| self.in_share(|| self.inner.destroy())) {
            Ok(()) => {}
            Err(e) => tracing::warn!("virtio-fs: cannot end the session: {e}"),
        }
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        let entry = match self.host()?.lookup(ctx, parent, name) {
            // A negative entry the guest may cache (misses repeat: PATH and library searches).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => negative_entry(),
            other => other?,
        };
        self.hold_entry(ctx, parent, name.to_bytes(), entry)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.places().forget(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        {
            let mut places = self.places();
            for &(inode, count) in &requests {
                places.forget(inode, count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        let attr = self.host()?.getattr(ctx, inode, handle)?;
        Ok(self.place_attr(inode, attr))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = strip_mode(attr.st_mode);
        }
        let attr = self.host()?.setattr(ctx, inode, attr, handle, valid)?;
        Ok(self.place_attr(inode, attr))
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.host()?.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.check_room()?;
        let entry = self.host()?.symlink(ctx, linkname, parent, name)?;
        Ok(self.place_entry(parent, name.to_bytes(), entry))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            // Block and character devices (and anything else mknod could be asked for).
            _ => return Err(eperm()),
        }
        self.check_room()?;
        let entry = self
            .host()?
            .mknod(ctx, parent, name, strip_mode(mode), rdev, umask)?;
        Ok(self.place_entry(parent, name.to_bytes(), entry))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.check_room()?;
        let entry = self
            .host()?
            .mkdir(ctx, parent, name, strip_mode(mode), umask)?;
        Ok(self.place_entry(parent, name.to_bytes(), entry))
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.host()?.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.host()?.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        if flags & !ALLOWED_RENAME_FLAGS != 0 {
            return Err(einval());
        }
        self.host()?
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        check_name(newname)?;
        let entry = self.host()?.link(ctx, inode, newparent, newname)?;
        Ok(self.place_entry(newparent, newname.to_bytes(), entry))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        // ENOSYS once the guest took zero-message opens; otherwise the passthrough opens only
        // regular files and directories (EBADF otherwise).
        self.host()?.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        self.check_room()?;
        args.mode = strip_mode(args.mode);
        let (entry, handle, opts, passthrough) = self.host()?.create(ctx, parent, name, args)?;
        Ok((
            self.place_entry(parent, name.to_bytes(), entry),
            handle,
            opts,
            passthrough,
        ))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.host()?
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        // Without CAP_FSETID on this thread the host kernel clears setuid/setgid on write.
        self.host()?.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _lock_owner: u64,
    ) -> io::Result<()> {
        // FLUSH only releases host POSIX locks, and locks stay in the guest (no POSIX_LOCKS):
        // ENOSYS makes the guest stop sending it, one request less per close.
        Err(enosys())
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.host()?.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.host()?
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.host()?
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.host()?.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
    ) -> io::Result<()> {
        Err(enosys())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _name: &CStr,
        _size: u32,
    ) -> io::Result<fuse_backend_rs::api::filesystem::GetxattrReply> {
        Err(enosys())
    }

    fn listxattr(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _size: u32,
    ) -> io::Result<fuse_backend_rs::api::filesystem::ListxattrReply> {
        Err(enosys())
    }

    fn removexattr(&self, _ctx: &Context, _inode: Inode, _name: &CStr) -> io::Result<()> {
        Err(enosys())
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.host()?.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.host()?
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let host = self.host()?;
        // Entries sent, and whether the listing stopped at an inode the guest may not hold.
        let mut sent = 0usize;
        let mut stopped_full = false;
        host.readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
            // The passthrough counts a lookup for each entry it hands out, and takes it back
            // when the reply has no room for it: count alike (nothing for inode 0).
            let inode_held = entry.inode;
            if self.refuses(inode_held) {
                // "No room": the passthrough takes its lookup back and ends the reply here;
                // the guest asks again from this entry on.
                stopped_full = true;
                return Ok(0);
            }
            let placed = if inode_held != 0 {
                self.place_entry(inode, dir_entry.name, entry)
            } else {
                entry
            };
            let added = add_entry(dir_entry, placed)?;
            if added == 0 && inode_held != 0 {
                self.places().forget(inode_held, 1);
            }
            sent += usize::from(added != 0);
            Ok(added)
        })?;
        // An empty reply would read as the directory's end: say why it is empty instead.
        if stopped_full && sent == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENFILE));
        }
        Ok(())
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.host()?.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.host()?.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.host()?.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.host()?.lseek(ctx, inode, handle, offset, whence)
    }

    // setupmapping/removemapping (DAX), ioctl, locks, bmap, poll: the trait's defaults
    // (ENOSYS / ENOTTY).
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::ffi::CString;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
    use fuse_backend_rs::api::filesystem::ZeroCopyReader;
    use fuse_backend_rs::file_buf::FileVolatileSlice;
    use fuse_backend_rs::file_traits::FileReadWriteVolatile;
    use vm_memory::VolatileSlice;

    use super::*;

    /// A share with a secret file next to it (outside), and symlinks to it inside.
    struct Share {
        _tmp: tempfile::TempDir,
        share: PathBuf,
        secret: PathBuf,
        fs: ConfinedFs,
    }

    const SECRET: &[u8] = b"host secret\n";

    fn share() -> Share {
        share_with(|_| {})
    }

    /// A share with `prepare` run on the host directory before the first request.
    fn share_with(prepare: impl FnOnce(&Path)) -> Share {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let outside = tmp.path().join("outside");
        fs::create_dir(&share).unwrap();
        fs::create_dir(&outside).unwrap();
        let secret = outside.join("secret");
        fs::write(&secret, SECRET).unwrap();
        std::os::unix::fs::symlink(&secret, share.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", share.join("rel")).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("dirlink")).unwrap();
        fs::create_dir(share.join("sub")).unwrap();
        fs::write(share.join("sub/file"), b"inside").unwrap();
        prepare(&share);
        let fs = ConfinedFs::new(&share).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        Share {
            _tmp: tmp,
            share,
            secret,
            fs,
        }
    }

    fn ctx() -> Context {
        Context::new()
    }

    fn name(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn errno(e: io::Error) -> i32 {
        e.raw_os_error().unwrap()
    }

    impl Share {
        fn lookup(&self, parent: Inode, n: &str) -> io::Result<Entry> {
            self.fs.lookup(&ctx(), parent, &name(n))
        }

        fn secret_untouched(&self) {
            assert_eq!(fs::read(&self.secret).unwrap(), SECRET);
            let md = fs::metadata(&self.secret).unwrap();
            assert_eq!(md.nlink(), 1);
            assert_eq!(md.mode() & 0o7777, 0o644);
        }

        fn host_mode(&self, rel: &str) -> u32 {
            fs::symlink_metadata(self.share.join(rel)).unwrap().mode()
        }
    }

    fn create_args(mode: u32, flags: i32) -> CreateIn {
        CreateIn {
            flags: flags as u32,
            mode,
            umask: 0,
            fuse_flags: 0,
        }
    }

    #[test]
    fn dot_dot_and_slash_names_are_refused_everywhere() {
        let s = share();
        let sub = s.lookup(ROOT_ID, "sub").unwrap().inode;
        for n in ["..", ".", "", "sub/..", "../outside", "/etc"] {
            assert_eq!(
                errno(s.lookup(ROOT_ID, n).unwrap_err()),
                libc::EINVAL,
                "{n:?}"
            );
        }
        assert_eq!(errno(s.lookup(sub, "..").unwrap_err()), libc::EINVAL);
        let c = ctx();
        let dotdot = name("..");
        assert_eq!(
            errno(s.fs.mkdir(&c, sub, &name("../x"), 0o755, 0).unwrap_err()),
            libc::EINVAL
        );
        assert_eq!(
            errno(
                s.fs.create(&c, ROOT_ID, &name("../x"), create_args(0o644, libc::O_RDWR))
                    .unwrap_err()
            ),
            libc::EINVAL
        );
        assert_eq!(
            errno(s.fs.unlink(&c, sub, &dotdot).unwrap_err()),
            libc::EINVAL
        );
        assert!(!s.share.parent().unwrap().join("x").exists());
    }

    #[test]
    fn symlinks_are_returned_not_followed() {
        let s = share();
        for link in ["abs", "rel"] {
            let entry = s.lookup(ROOT_ID, link).unwrap();
            assert_eq!(entry.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{link}");
            assert_ne!(
                entry.attr.st_size,
                SECRET.len() as i64,
                "{link}: stat of the target"
            );
            // A hostile driver opens the link's inode instead of resolving it.
            for flags in [
                libc::O_RDONLY,
                libc::O_RDWR | libc::O_TRUNC,
                libc::O_NOFOLLOW,
            ] {
                assert!(
                    s.fs.open(&ctx(), entry.inode, flags as u32, 0).is_err(),
                    "{link} {flags:#x}"
                );
            }
        }
        let target =
            s.fs.readlink(&ctx(), s.lookup(ROOT_ID, "abs").unwrap().inode);
        assert_eq!(target.unwrap(), s.secret.as_os_str().as_encoded_bytes());
        // Looking up through a symlink to an outside directory.
        let dirlink = s.lookup(ROOT_ID, "dirlink").unwrap().inode;
        assert!(
            s.lookup(dirlink, "secret").is_err(),
            "O_PATH of a symlink is no directory"
        );
        assert!(s.fs.opendir(&ctx(), dirlink, 0).is_err());
        s.secret_untouched();
    }

    #[test]
    fn create_over_a_symlink_does_not_follow_it() {
        let s = share();
        for link in ["abs", "rel"] {
            let args = create_args(0o644, libc::O_WRONLY | libc::O_TRUNC);
            assert!(s.fs.create(&ctx(), ROOT_ID, &name(link), args).is_err());
            let excl = create_args(0o644, libc::O_WRONLY | libc::O_EXCL);
            assert_eq!(
                errno(s.fs.create(&ctx(), ROOT_ID, &name(link), excl).unwrap_err()),
                libc::EEXIST
            );
        }
        s.secret_untouched();
    }

    #[test]
    fn rename_cannot_leave_the_share() {
        let s = share();
        let c = ctx();
        let sub = s.lookup(ROOT_ID, "sub").unwrap().inode;
        assert_eq!(
            errno(
                s.fs.rename(&c, sub, &name("file"), ROOT_ID, &name("../file"), 0)
                    .unwrap_err()
            ),
            libc::EINVAL
        );
        assert_eq!(
            errno(
                s.fs.rename(&c, sub, &name(".."), ROOT_ID, &name("up"), 0)
                    .unwrap_err()
            ),
            libc::EINVAL
        );
        // RENAME_WHITEOUT would create a device node.
        assert_eq!(
            errno(
                s.fs.rename(
                    &c,
                    sub,
                    &name("file"),
                    ROOT_ID,
                    &name("f2"),
                    libc::RENAME_WHITEOUT
                )
                .unwrap_err()
            ),
            libc::EINVAL
        );
        // Renaming the symlink moves the link, not the outside file.
        s.fs.rename(&c, ROOT_ID, &name("abs"), sub, &name("moved"), 0)
            .unwrap();
        assert_eq!(s.host_mode("sub/moved") & libc::S_IFMT, libc::S_IFLNK);
        s.fs.rename(
            &c,
            sub,
            &name("file"),
            ROOT_ID,
            &name("file"),
            libc::RENAME_NOREPLACE,
        )
        .unwrap();
        assert_eq!(fs::read(s.share.join("file")).unwrap(), b"inside");
        s.secret_untouched();
    }

    #[test]
    fn hard_links_only_reach_inodes_inside_the_share() {
        let s = share();
        let c = ctx();
        // Linking the symlink links the symlink itself, never its outside target.
        let abs = s.lookup(ROOT_ID, "abs").unwrap().inode;
        let linked = s.fs.link(&c, abs, ROOT_ID, &name("hard")).unwrap();
        assert_eq!(linked.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(s.host_mode("hard") & libc::S_IFMT, libc::S_IFLNK);
        // A guessed inode number names nothing.
        assert!(s.fs.link(&c, 0x4242, ROOT_ID, &name("guess")).is_err());
        let file = s.lookup(ROOT_ID, "sub").unwrap().inode;
        assert_eq!(
            errno(
                s.fs.link(&c, file, ROOT_ID, &name("../escaped"))
                    .unwrap_err()
            ),
            libc::EINVAL
        );
        s.secret_untouched();
    }

    #[test]
    fn device_nodes_are_refused_fifos_and_sockets_allowed() {
        let s = share();
        let c = ctx();
        let null = libc::makedev(1, 3) as u32;
        for kind in [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFDIR, libc::S_IFLNK] {
            assert_eq!(
                errno(
                    s.fs.mknod(&c, ROOT_ID, &name("dev"), kind | 0o666, null, 0)
                        .unwrap_err()
                ),
                libc::EPERM,
                "{kind:o}"
            );
        }
        assert!(!s.share.join("dev").exists());
        s.fs.mknod(&c, ROOT_ID, &name("fifo"), libc::S_IFIFO | 0o644, 0, 0)
            .unwrap();
        s.fs.mknod(&c, ROOT_ID, &name("sock"), libc::S_IFSOCK | 0o644, 0, 0)
            .unwrap();
        let ft = |n: &str| fs::symlink_metadata(s.share.join(n)).unwrap().file_type();
        assert!(ft("fifo").is_fifo());
        assert!(ft("sock").is_socket());
    }

    #[test]
    fn existing_special_files_are_never_opened_on_the_host() {
        // Made by the host before serving: a hostile image may contain device nodes.
        let s = share_with(|dir| {
            let path = |n: &str| CString::new(dir.join(n).into_os_string().into_encoded_bytes());
            let dev = path("null").unwrap();
            // SAFETY: a valid NUL-terminated path; no memory is written.
            let ret =
                unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
            assert_eq!(ret, 0, "the test needs root");
            let fifo = path("fifo").unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        });
        for n in ["null", "fifo"] {
            let inode = s.lookup(ROOT_ID, n).unwrap().inode;
            // Would hang on a FIFO without a writer, or open the host's device.
            let err =
                s.fs.open(&ctx(), inode, libc::O_RDWR as u32, 0)
                    .unwrap_err();
            assert_eq!(errno(err), libc::EBADF, "{n}");
        }
    }

    #[test]
    fn setuid_and_setgid_bits_are_stripped() {
        let s = share();
        let c = ctx();
        let args = create_args(libc::S_IFREG | 0o6755, libc::O_RDWR);
        s.fs.create(&c, ROOT_ID, &name("created"), args).unwrap();
        assert_eq!(s.host_mode("created") & 0o7777, 0o755);
        s.fs.mkdir(&c, ROOT_ID, &name("dir"), 0o3777, 0).unwrap();
        assert_eq!(s.host_mode("dir") & 0o7777, 0o1777, "sticky kept, umask 0");
        s.fs.mknod(&c, ROOT_ID, &name("node"), libc::S_IFREG | 0o4755, 0, 0)
            .unwrap();
        assert_eq!(s.host_mode("node") & 0o7777, 0o755);
        let file = s.lookup(ROOT_ID, "created").unwrap().inode;
        // SAFETY: stat64 is plain data; all-zero is a valid value.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_mode = libc::S_IFREG | 0o6711;
        s.fs.setattr(&c, file, attr, None, SetattrValid::MODE)
            .unwrap();
        assert_eq!(s.host_mode("created") & 0o7777, 0o711);
    }

    #[test]
    fn setattr_of_a_symlink_never_reaches_its_target() {
        let s = share();
        let c = ctx();
        let before = fs::metadata(&s.secret).unwrap();
        for link in ["abs", "rel"] {
            let inode = s.lookup(ROOT_ID, link).unwrap().inode;
            // SAFETY: stat64 is plain data; all-zero is a valid value.
            let mut attr: stat64 = unsafe { std::mem::zeroed() };
            attr.st_mode = 0o777;
            attr.st_size = 0;
            attr.st_uid = 4242;
            attr.st_gid = 4242;
            attr.st_mtime = 1;
            let _ = s.fs.setattr(&c, inode, attr, None, SetattrValid::MODE);
            let _ = s.fs.setattr(&c, inode, attr, None, SetattrValid::SIZE);
            let _ =
                s.fs.setattr(&c, inode, attr, None, SetattrValid::UID | SetattrValid::GID);
            let _ = s.fs.setattr(&c, inode, attr, None, SetattrValid::MTIME);
        }
        s.secret_untouched();
        let after = fs::metadata(&s.secret).unwrap();
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(after.mtime(), before.mtime());
        assert_eq!(after.len(), SECRET.len() as u64);
    }

    /// Writes `data` like the FUSE server does for a WRITE request.
    struct SliceReader<'a>(&'a mut [u8]);

    impl io::Read for SliceReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            Ok(n)
        }
    }

    impl ZeroCopyReader for SliceReader<'_> {
        fn read_to(
            &mut self,
            f: &mut dyn FileReadWriteVolatile,
            count: usize,
            off: u64,
        ) -> io::Result<usize> {
            let count = count.min(self.0.len());
            let vs = VolatileSlice::from(&mut self.0[..count]);
            f.write_at_volatile(FileVolatileSlice::from_volatile_slice(&vs), off)
        }
    }

    #[test]
    fn writing_to_a_host_setuid_file_clears_the_bits() {
        let s = share();
        let path = s.share.join("su");
        fs::write(&path, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o6755)).unwrap();
        let inode = s.lookup(ROOT_ID, "su").unwrap().inode;
        let (handle, _, _) = s.fs.open(&ctx(), inode, libc::O_RDWR as u32, 0).unwrap();
        let mut data = *b"evil";
        let n =
            s.fs.write(
                &ctx(),
                inode,
                handle.unwrap(),
                &mut SliceReader(&mut data),
                4,
                0,
                None,
                false,
                libc::O_RDWR as u32,
                0,
            )
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(fs::read(&path).unwrap(), b"evilin/sh\n");
        assert_eq!(s.host_mode("su") & 0o7777, 0o755);
    }

    #[test]
    fn missing_names_get_a_cacheable_negative_entry() {
        let s = share();
        let entry = s.lookup(ROOT_ID, "missing").unwrap();
        assert_eq!(entry.inode, 0);
        assert_eq!(entry.entry_timeout, super::super::SHORT_CACHE);
        assert_eq!(
            s.lookup(ROOT_ID, "sub").unwrap().attr.st_mode & libc::S_IFMT,
            libc::S_IFDIR
        );
    }

    const LONG: Duration = Duration::from_secs(600);
    const SHORT: Duration = Duration::from_secs(1);

    /// A share laid out as husk lays it out: `c1/rootfs` and `c1/mounts/0`, the rootfs cached
    /// for [`LONG`] and the rest for [`SHORT`].
    fn container_share() -> (tempfile::TempDir, ConfinedFs) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("c1/rootfs/bin")).unwrap();
        fs::create_dir_all(root.join("c1/mounts/0/sub")).unwrap();
        fs::write(root.join("c1/rootfs/bin/sh"), b"sh").unwrap();
        fs::write(root.join("c1/mounts/0/data"), b"v1").unwrap();
        fs::write(root.join("c1/config.json"), b"{}").unwrap();
        let cache = CacheTimes {
            rootfs: LONG,
            other: SHORT,
        };
        let fs = ConfinedFs::with_cache(root, cache).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        (tmp, fs)
    }

    /// Looks up `path` (components separated by `/`) from the root; the last entry.
    fn walk(fs: &ConfinedFs, path: &str) -> Entry {
        let mut parent = ROOT_ID;
        let mut entry = None;
        for part in path.split('/') {
            let e = fs.lookup(&ctx(), parent, &name(part)).unwrap();
            parent = e.inode;
            entry = Some(e);
        }
        entry.unwrap()
    }

    #[test]
    fn the_rootfs_is_cached_long_and_everything_else_short() {
        let (_tmp, fs) = container_share();
        for (path, time) in [
            ("c1", SHORT),
            ("c1/config.json", SHORT),
            ("c1/rootfs", LONG),
            ("c1/rootfs/bin", LONG),
            ("c1/rootfs/bin/sh", LONG),
            ("c1/mounts", SHORT),
            ("c1/mounts/0", SHORT),
            ("c1/mounts/0/sub", SHORT),
            ("c1/mounts/0/data", SHORT),
            // Missing names: the host adds containers at the root, files to bind mounts.
            ("missing", SHORT),
            ("c1/mounts/0/missing", SHORT),
            ("c1/rootfs/bin/missing", LONG),
        ] {
            let entry = walk(&fs, path);
            assert_eq!(entry.entry_timeout, time, "{path}");
            if entry.inode != 0 {
                assert_eq!(entry.attr_timeout, time, "{path}");
                let (_, attr_time) = fs.getattr(&ctx(), entry.inode, None).unwrap();
                assert_eq!(attr_time, time, "{path}: getattr");
            }
        }
        // A directory named rootfs elsewhere is not the rootfs.
        let c = ctx();
        let mounts0 = walk(&fs, "c1/mounts/0").inode;
        let made = fs.mkdir(&c, mounts0, &name("rootfs"), 0o755, 0).unwrap();
        assert_eq!(made.entry_timeout, SHORT);
        // Entries the guest makes get their place's time too.
        let bin = walk(&fs, "c1/rootfs/bin").inode;
        let (created, ..) = fs
            .create(&c, bin, &name("new"), create_args(0o644, libc::O_RDWR))
            .unwrap();
        assert_eq!(created.entry_timeout, LONG);
        // A file reached from the rootfs and from a bind mount (a hard link; here both are in
        // one host directory, so the link can be made) caches as the shorter.
        let sh = walk(&fs, "c1/rootfs/bin/sh").inode;
        let linked = fs.link(&c, sh, mounts0, &name("sh")).unwrap();
        assert_eq!(linked.inode, sh);
        assert_eq!(linked.entry_timeout, SHORT);
        assert_eq!(fs.getattr(&c, sh, None).unwrap().1, SHORT);
    }

    #[test]
    fn an_inode_keeps_its_place_while_the_guest_holds_it() {
        let mut places = Places::default();
        assert_eq!(places.of(ROOT_ID), Place::ShareRoot);
        assert_eq!(places.of(7), Place::Other, "unknown inodes cache short");
        assert_eq!(places.looked_up(7, Place::Rootfs), Place::Rootfs);
        assert_eq!(places.looked_up(7, Place::Rootfs), Place::Rootfs);
        places.forget(7, 1);
        assert_eq!(places.of(7), Place::Rootfs, "one lookup still held");
        places.forget(7, 1);
        assert_eq!(places.of(7), Place::Other);
        assert!(places.held.is_empty(), "forgotten inodes are dropped");
        // Reached by two paths (a hard link), it caches as the shorter of the two.
        places.looked_up(8, Place::Rootfs);
        assert_eq!(places.looked_up(8, Place::Other), Place::Other);
        places.forget(8, u64::MAX);
        assert!(places.held.is_empty());
        assert_eq!(Place::ShareRoot.child(b"rootfs"), Place::Container);
        assert_eq!(Place::Container.child(b"rootfs"), Place::Rootfs);
        assert_eq!(Place::Container.child(b"mounts"), Place::Other);
        assert_eq!(Place::Other.child(b"rootfs"), Place::Other);
    }

    #[test]
    fn the_guest_holds_at_most_max_inodes() {
        assert_eq!(super::super::max_inodes_for(512), 49_152);
        assert_eq!(super::super::max_inodes_for(16), super::super::MIN_INODES);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir(root.join("d")).unwrap();
        for i in 0..5 {
            fs::write(root.join(format!("d/f{i}")), b"x").unwrap();
        }
        let fs = ConfinedFs::with_limits(root, CacheTimes::default(), 3).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let c = ctx();
        let d = fs.lookup(&c, ROOT_ID, &name("d")).unwrap().inode;
        let f0 = fs.lookup(&c, d, &name("f0")).unwrap().inode;
        let f1 = fs.lookup(&c, d, &name("f1")).unwrap().inode;
        // Full: a new inode is refused; one already held and a missing name are answered.
        assert_eq!(
            errno(fs.lookup(&c, d, &name("f2")).unwrap_err()),
            libc::ENFILE
        );
        assert_eq!(fs.lookup(&c, d, &name("f0")).unwrap().inode, f0);
        assert_eq!(fs.lookup(&c, d, &name("nope")).unwrap().inode, 0);
        // Creates are refused before anything is made.
        let err = fs.mkdir(&c, d, &name("new"), 0o755, 0).unwrap_err();
        assert_eq!(errno(err), libc::ENFILE);
        let args = create_args(0o644, libc::O_RDWR);
        let err = fs.create(&c, d, &name("new"), args).unwrap_err();
        assert_eq!(errno(err), libc::ENFILE);
        let err = fs.symlink(&c, &name("f0"), d, &name("new")).unwrap_err();
        assert_eq!(errno(err), libc::ENFILE);
        assert!(!root.join("d/new").exists(), "nothing made");
        // A listing hands out held inodes only, and is never an empty reply (the directory's
        // end): it fails instead.
        let (handle, _) = fs.opendir(&c, d, libc::O_RDONLY as u32).unwrap();
        let mut sent = Vec::new();
        let listed = fs.readdirplus(&c, d, handle.unwrap(), 4096, 0, &mut |entry, _| {
            sent.push(String::from_utf8_lossy(entry.name).into_owned());
            Ok(1)
        });
        match listed {
            Ok(()) => assert!(!sent.is_empty(), "an empty listing"),
            Err(e) => assert_eq!((errno(e), sent.len()), (libc::ENFILE, 0)),
        }
        assert!(sent.iter().all(|n| n == "f0" || n == "f1"), "{sent:?}");
        assert_eq!(fs.places().held.len(), 3);
        // Forgetting makes room.
        fs.forget(
            &c,
            f1,
            1 + sent.iter().filter(|n| *n == "f1").count() as u64,
        );
        assert!(fs.lookup(&c, d, &name("f2")).is_ok());
        assert_eq!(
            errno(fs.lookup(&c, d, &name("f3")).unwrap_err()),
            libc::ENFILE
        );
    }

    #[test]
    fn readdirplus_entries_get_their_place_and_count_only_when_sent() {
        let (_tmp, fs) = container_share();
        let c = ctx();
        let bin = walk(&fs, "c1/rootfs/bin").inode;
        let (handle, _) = fs.opendir(&c, bin, libc::O_RDONLY as u32).unwrap();
        let handle = handle.unwrap();
        let before = fs.places().held.len();
        // A reply with no room: nothing handed out, nothing counted.
        fs.readdirplus(&c, bin, handle, 4096, 0, &mut |_, _| Ok(0))
            .unwrap();
        assert_eq!(fs.places().held.len(), before);
        let mut seen = Vec::new();
        fs.readdirplus(&c, bin, handle, 4096, 0, &mut |d, e| {
            seen.push((d.name.to_vec(), e.entry_timeout, e.inode));
            Ok(1)
        })
        .unwrap();
        let sh = seen.iter().find(|(n, ..)| n == b"sh").expect("sh listed");
        assert_eq!(sh.1, LONG);
        assert_eq!(fs.places().of(sh.2), Place::Rootfs);
    }

    /// Collects what a `read` writes.
    struct VecWriter(Vec<u8>);

    impl io::Write for VecWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ZeroCopyWriter for VecWriter {
        fn write_from(
            &mut self,
            f: &mut dyn FileReadWriteVolatile,
            count: usize,
            off: u64,
        ) -> io::Result<usize> {
            let mut buf = vec![0u8; count.min(4096)];
            let vs = VolatileSlice::from(&mut buf[..]);
            let n = f.read_at_volatile(FileVolatileSlice::from_volatile_slice(&vs), off)?;
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn available_bytes(&self) -> usize {
            usize::MAX
        }
    }

    #[test]
    fn zero_message_opens_keep_the_policy() {
        let s = share_with(|dir| {
            let fifo =
                CString::new(dir.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path; no memory is written.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        });
        let want =
            s.fs.init(FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR)
                .unwrap();
        assert!(want.contains(FsOptions::ZERO_MESSAGE_OPEN), "{want:?}");
        assert!(want.contains(FsOptions::ZERO_MESSAGE_OPENDIR), "{want:?}");
        let c = ctx();
        let file = s.lookup(ROOT_ID, "sub").unwrap().inode;
        let file = s.fs.lookup(&c, file, &name("file")).unwrap().inode;
        // The guest stops sending OPEN; reads name handle 0 and open the inode themselves.
        assert_eq!(
            errno(s.fs.open(&c, file, libc::O_RDONLY as u32, 0).unwrap_err()),
            libc::ENOSYS
        );
        let mut out = VecWriter(Vec::new());
        let n = s.fs.read(&c, file, 0, &mut out, 100, 0, None, 0).unwrap();
        assert_eq!(&out.0[..n], b"inside");
        // Special files and symlinks are still never opened on the host (a FIFO would hang).
        for special in ["fifo", "abs"] {
            let inode = s.lookup(ROOT_ID, special).unwrap().inode;
            let err =
                s.fs.read(&c, inode, 0, &mut VecWriter(Vec::new()), 100, 0, None, 0)
                    .unwrap_err();
            assert_eq!(errno(err), libc::EBADF, "{special}");
        }
        s.secret_untouched();
    }

    #[test]
    fn flush_is_not_needed() {
        let s = share();
        let err = s.fs.flush(&ctx(), ROOT_ID, 1, 0).unwrap_err();
        assert_eq!(errno(err), libc::ENOSYS);
    }

    #[test]
    fn xattrs_are_not_served() {
        let s = share();
        let c = ctx();
        let sub = s.lookup(ROOT_ID, "sub").unwrap().inode;
        let cap = name("security.capability");
        assert_eq!(
            errno(s.fs.setxattr(&c, sub, &cap, b"\x01", 0).unwrap_err()),
            libc::ENOSYS
        );
        assert_eq!(
            errno(s.fs.getxattr(&c, sub, &cap, 64).err().unwrap()),
            libc::ENOSYS
        );
    }

    #[test]
    fn init_never_offers_refused_features() {
        let s = share();
        let want = s.fs.init(FsOptions::all()).unwrap();
        assert!(!want.intersects(REFUSED_OPTIONS), "{want:?}");
        assert!(want.contains(FsOptions::MAX_PAGES | FsOptions::DO_READDIRPLUS));
    }

    #[test]
    fn serving_thread_drops_mknod_and_fsetid() {
        std::thread::spawn(|| {
            confine_thread().unwrap();
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            // SAFETY: valid header and two data entries for version 3.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_capget,
                    &mut header as *mut CapHeader,
                    data.as_mut_ptr(),
                )
            };
            assert_eq!(ret, 0);
            for cap in [CAP_FSETID, CAP_MKNOD] {
                assert_eq!(data[0].effective & (1 << cap), 0);
                assert_eq!(data[0].permitted & (1 << cap), 0);
            }
            assert_eq!(set_umask(0), 0, "the serving thread's umask is 0");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_missing_or_non_directory_share_is_refused_a_symlinked_one_served() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            ConfinedFs::new(&file),
            Err(FsError::SharedDir { .. })
        ));
        assert!(matches!(
            ConfinedFs::new(&tmp.path().join("nope")),
            Err(FsError::SharedDir { .. })
        ));
        // The host may name its share through a symlink.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let fs = ConfinedFs::new(&link).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let entry = fs.lookup(&ctx(), ROOT_ID, &name("f")).unwrap();
        assert_eq!(entry.attr.st_mode & libc::S_IFMT, libc::S_IFREG);
    }
}
