//! [`ConfinedFs`]: the passthrough file system behind the policy of the [module
//! docs](super): name checks, no device nodes, no setuid/setgid bits, no xattrs, no DAX, and
//! a serving thread without `CAP_MKNOD` / `CAP_FSETID` and with its own umask.

use std::cell::Cell;
use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::{FsError, CACHE_TIMEOUT};

/// An inode number as the guest sees it.
pub type Inode = u64;
/// An open file handle as the guest sees it.
pub type Handle = u64;

/// Mode bits the guest may never set on the host.
pub const FORBIDDEN_MODE_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

/// `renameat2` flags the guest may use.
const ALLOWED_RENAME_FLAGS: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;

/// FUSE features the guest is never offered (see the module docs): writeback cache, DAX,
/// NFS export (`..` lookups, file handles), ACLs, killpriv handling by the guest, and
/// zero-message opens (every open must come through [`ConfinedFs::open`]).
const REFUSED_OPTIONS: FsOptions = FsOptions::WRITEBACK_CACHE
    .union(FsOptions::PERFILE_DAX)
    .union(FsOptions::EXPORT_SUPPORT)
    .union(FsOptions::POSIX_ACL)
    .union(FsOptions::HANDLE_KILLPRIV)
    .union(FsOptions::HANDLE_KILLPRIV_V2)
    .union(FsOptions::ZERO_MESSAGE_OPEN)
    .union(FsOptions::ZERO_MESSAGE_OPENDIR)
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

/// The passthrough file system over one shared directory, with husk's policy enforced.
pub struct ConfinedFs {
    inner: PassthroughFs<()>,
}

impl ConfinedFs {
    /// Serves `shared_dir` (which must be a directory).
    pub fn new(shared_dir: &Path) -> Result<Self, FsError> {
        let err = |source| FsError::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        };
        let root_dir = shared_dir
            .to_str()
            .ok_or_else(|| err(io::Error::from_raw_os_error(libc::EINVAL)))?
            .to_string();
        if !shared_dir.is_dir() {
            return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let cfg = Config {
            root_dir,
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            cache_policy: CachePolicy::Always,
            writeback: false,
            xattr: false,
            do_import: true,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            inode_file_handles: false,
            no_readdir: false,
            seal_size: false,
            dax_file_size: None,
            allow_direct_io: true,
            ..Config::default()
        };
        let inner = PassthroughFs::new(cfg).map_err(err)?;
        // Open the root now so a bad directory fails the build, not the guest's mount.
        // `import` sets the process umask to 0; only the serving thread may keep that.
        let saved = set_umask(0);
        let imported = inner.import();
        set_umask(saved);
        imported.map_err(err)?;
        Ok(Self { inner })
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
    // SAFETY: unshare(CLONE_FS) only gives this thread its own cwd/root/umask; no memory.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    set_umask(0);
    drop_thread_caps(&[CAP_FSETID, CAP_MKNOD])?;
    THREAD_CONFINED.with(|c| c.set(true));
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
        let want = self.host()?.init(capable)? | WANTED_OPTIONS;
        Ok(want - REFUSED_OPTIONS)
    }

    fn destroy(&self) {
        // `destroy` re-imports the root, which sets the umask: only on a confined thread.
        match confine_thread() {
            Ok(()) => self.inner.destroy(),
            Err(e) => tracing::warn!("virtio-fs: cannot end the session: {e}"),
        }
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        self.host()?.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.host()?.getattr(ctx, inode, handle)
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
        self.host()?.setattr(ctx, inode, attr, handle, valid)
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
        self.host()?.symlink(ctx, linkname, parent, name)
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
        self.host()?
            .mknod(ctx, parent, name, strip_mode(mode), rdev, umask)
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
        self.host()?
            .mkdir(ctx, parent, name, strip_mode(mode), umask)
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
        self.host()?.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        // The passthrough opens only regular files and directories (EBADF otherwise).
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
        args.mode = strip_mode(args.mode);
        self.host()?.create(ctx, parent, name, args)
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
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.host()?.flush(ctx, inode, handle, lock_owner)
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
        self.host()?
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
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
