//! The virtio file system device (virtio spec 5.11): one host directory shared with the guest
//! through FUSE messages on a high-priority queue and one request queue, served in-process on
//! the file server's thread (its own event loop and seccomp list; the other devices share the
//! device thread) by `fuse-backend-rs`'s FUSE server over its passthrough file system,
//! wrapped in our confinement layer [`ConfinedFs`].
//!
//! # Security policy
//!
//! The guest is hostile. It gets the shared directory's contents as the guest's file system
//! (guest uid/gid N act on the host as uid/gid N inside the share: the container's rootfs as
//! the guest sees it) and nothing else:
//!
//! - **No path outside the share.** Host objects are named only by `O_PATH` file descriptors
//!   opened one component at a time with `O_NOFOLLOW` relative to the parent's descriptor (the
//!   passthrough's inode store); no host path string built from guest input is ever resolved.
//!   [`ConfinedFs`] refuses the names `.`, `..`, empty names and names with `/` in every
//!   operation (`EINVAL`; the Linux client never sends them: `..` is only looked up for NFS
//!   export, which is not offered), so `..` from the root or anywhere else is not a way up.
//! - **Symlinks are never followed on the host.** Lookups use `O_NOFOLLOW`; the guest
//!   resolves symlink targets itself, in its own namespace. Opening a symlink's inode (what a
//!   hostile driver would send instead of resolving it) fails: only regular files and
//!   directories are ever opened for I/O (`EBADF` from the passthrough, which we keep). Files
//!   are created with `O_CREAT | O_EXCL`, so an existing symlink at the name is not followed.
//! - **Special files are never opened on the host.** Device nodes, FIFOs and sockets that
//!   exist in the share (a hostile image can contain `dev/mem`) get no `open` (see above): the
//!   guest kernel serves its own FIFOs and devices on such inodes. This also means a host
//!   FIFO cannot block the file server's thread.
//! - **Hard links** can only be made to inodes the guest already reached inside the share
//!   (`link` takes an inode, never a path), so no new outside file becomes reachable. A hard
//!   link that the host itself placed in the share to a file elsewhere is the same inode as
//!   that file: the host granted it, and the guest can read and (permissions allowing) write
//!   it. The host must therefore never put hard links to files it does not want to share into
//!   the share (husk bind-mounts or copies rootfs trees, it never hard-links them).
//! - **Renames** move entries between directories the guest already holds, all inside the
//!   share; `RENAME_NOREPLACE` and `RENAME_EXCHANGE` are allowed, `RENAME_WHITEOUT` (which
//!   creates a device node) and unknown flags are refused with `EINVAL`.
//! - **No file handles.** `inode_file_handles` is off: no `name_to_handle_at` /
//!   `open_by_handle_at`, and NFS export support (`EXPORT_SUPPORT`) is not offered.
//! - **Device nodes.** `mknod` of a character or block device is refused with `EPERM`;
//!   regular files, FIFOs and sockets are allowed. As a second line, the thread serving the
//!   device drops `CAP_MKNOD` (see below).
//! - **setuid / setgid.** `S_ISUID` and `S_ISGID` are cleared from the mode of `create`,
//!   `mkdir`, `mknod` and `setattr` (chmod), so the guest never creates a setuid or setgid
//!   file on the host. The serving thread also drops `CAP_FSETID` (from its effective and
//!   permitted sets, so the passthrough's temporary uid switches cannot bring it back): the
//!   host kernel then clears those bits when the guest writes to, truncates or chowns an
//!   existing setuid/setgid file, as it does for any unprivileged writer, so a host-granted
//!   setuid binary cannot be turned into one with guest-chosen content.
//! - **No extended attributes** (`security.capability` would be file capabilities, i.e.
//!   setuid by another name; `trusted.*` and ACLs are host policy): all xattr operations
//!   answer `ENOSYS` and `POSIX_ACL` is not offered.
//! - **No DAX** (no shared memory window), no writeback cache, no ioctl, no locks (the guest
//!   kernel then keeps POSIX and flock locks local, so `FLUSH`, which only releases host
//!   locks, answers `ENOSYS` and the guest stops sending it).
//!
//! The host side must keep the share's directory private (mode 0700, root-owned parent):
//! files there are as the guest made them (owned by any uid, world-writable, symlinks to
//! anywhere), and host tools working in it must not follow symlinks in it. The host must not
//! move files or directories out of the share while the VM runs: the server holds inodes by
//! file descriptor, so an inode the guest already reached stays reachable wherever it is moved
//! (as with hard links above).
//! Guest uids other than 0 act through per-thread `setresuid`, which needs `CAP_SETUID`: in
//! husk-vmm's user namespace when it runs in one ([`crate::userns`]), where only the ids 0 to
//! 2^28 - 1 exist (a request as another fails) and only the idmapped mounts of the share are
//! mapped.
//!
//! # Inodes held, bounded
//!
//! Each inode the guest holds (looked up and not yet forgotten) costs the VMM one `O_PATH`
//! file descriptor (open files cost none: see below), and that descriptor pins the host
//! kernel's inode, dentry and file structures: about 2.7 KiB of kernel memory on ext4 (measured
//! in the rig), more on overlayfs, which pins a layer's objects too. The guest decides how many
//! it holds (its inode cache keeps them until its own memory runs short), so the count is
//! bounded: at most [`ConfinedFs`]'s `max_inodes` ([`max_inodes_for`] the guest's memory,
//! [`INODES_PER_GUEST_MIB`] per MiB). Past it, a lookup or readdirplus of an inode the guest
//! does not already hold, and every create, fails with `ENFILE` ("too many open files in
//! system") and the VMM logs why, until the guest forgets some (`echo 2 >
//! /proc/sys/vm/drop_caches` in the guest, or its memory pressure); nothing else of the VM is
//! affected, and the VMM's own descriptors (vsock connections, devices) never compete with
//! them (husk-vmm raises its `RLIMIT_NOFILE` above the bound). The kernel memory this can pin,
//! [`HELD_INODE_HOST_BYTES`] each, is part of the host memory cap husk gives the VMM.
//!
//! # Caching
//!
//! Every guest change goes through this server, so the guest may cache what it learned; what
//! the host changes behind its back it sees once its cache expires. How long that is depends
//! on where an inode sits in the share ([`CacheTimes`]), which husk lays out as
//! `<container id>/rootfs` and `<container id>/mounts/<n>`:
//!
//! - **The rootfs** (`<id>/rootfs` and below): the engine prepared it before the container
//!   started and nothing on the host changes it under a running container, so its entries
//!   (missing names too), attributes and data are trusted for [`CacheTimes::rootfs`] (husk
//!   gives a day unless told otherwise; `husk-vmm` alone gives [`SHORT_CACHE`]).
//! - **Everything else**: bind mounts (`<id>/mounts/<n>`, host directories the host may change,
//!   read-only ones too: Kubernetes updates ConfigMap and Secret volumes in place) and the
//!   share's own directories (where the host adds a pod's new containers): [`CacheTimes::other`]
//!   ([`SHORT_CACHE`], one second).
//!
//! The place is worked out at lookup from the parent's place and the name, and kept per inode
//! while the guest holds it (dropped at `FORGET`; an inode the server has no place for is
//! treated as "everything else"; reached by two paths, a hard link, it gets the shorter). It
//! only decides how long the guest trusts its own cache: a hostile guest that rearranges the
//! share can make itself see stale data, nothing more.
//!
//! File data stays in the guest's page cache across opens (`CachePolicy::Always`), and with
//! `AUTO_INVAL_DATA` the guest drops cached data of a file whose size or mtime changed on the
//! host once it revalidates the attributes. Writeback caching stays off: every write reaches
//! the host file at once, so there is no dirty guest data to lose or to reorder. Requests
//! carry up to 1 MiB of data (`MAX_PAGES`), and the agent widens the mount's readahead to
//! 1 MiB.
//!
//! # Opens without a round trip
//!
//! The guest never sends `OPEN`, `OPENDIR`, `RELEASE` or `RELEASEDIR` (`ZERO_MESSAGE_OPEN`,
//! `ZERO_MESSAGE_OPENDIR`): opening a file costs nothing on the host, and each `READ` or
//! `WRITE` opens the inode's host file for that request (read-only for reads, read-write for
//! writes) and closes it after. The policy holds without the open: only regular files and
//! directories are ever opened (the passthrough checks the inode's type on every such open),
//! names are checked at lookup and create, modes at create and setattr. Permission checks stay
//! where they were for a hostile guest: in the guest kernel (virtio-fs mounts with
//! `default_permissions`); a guest kernel can name any uid in a request, so the host-side open
//! as the caller's uid never was a boundary against it.
//!
//! # Hostile drivers
//!
//! A descriptor chain is checked before the FUSE server sees it (at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors, readable ones first, at most [`MAX_REQUEST_BYTES`]
//! each way, all in guest memory); a bad chain is returned with nothing written. A malformed
//! FUSE message fails that request only (the server answers with an error where the message
//! has a header, or not at all).

mod device;
mod event_handler;
pub mod policy;
pub mod request;

pub use device::Fs;
pub use policy::ConfinedFs;

use std::time::Duration;

/// The high-priority queue (FORGET, INTERRUPT).
pub const HIPRIO_QUEUE: usize = 0;
/// The request queue.
pub const REQUEST_QUEUE: usize = 1;
/// Size of the high-priority queue.
pub const HIPRIO_QUEUE_SIZE: u16 = 128;
/// With `VIRTIO_RING_F_EVENT_IDX` (which the device offers), the driver notifies the
/// high-priority queue once per this many chains (half the queue's size if that is less), not
/// per chain: what it carries needs no answer (FORGET; INTERRUPT, which a server that answers
/// each request before it takes the next has nothing to do for), so it waits for the device's
/// next pass over the request queue, which serves the high-priority queue first, and its used
/// buffers are signalled by that pass's interrupt. Removing a file thus costs one round trip
/// (the UNLINK) where it cost two, the FORGET of its inode an exit and an interrupt of its
/// own. Up to this many minus one FORGETs wait while the guest sends no request: the host
/// holds those inodes' descriptors that much longer, within the [held inodes'
/// bound](self#inodes-held-bounded), which a lookup or create counts only after the waiting
/// FORGETs were served.
pub const HIPRIO_NOTIFY_EVERY: u16 = 32;
/// Size of the request queue: the Linux driver sizes requests to the queue (pages = size - 4),
/// so this allows full 1 MiB requests.
pub const REQUEST_QUEUE_SIZE: u16 = 1024;
/// The tag the guest mounts the share by (`mount -t virtiofs husk /mnt`).
pub const DEFAULT_TAG: &str = "husk";
/// Length of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Size of the configuration space: tag, then `num_request_queues` (le32).
pub const CONFIG_SIZE: usize = TAG_LEN + 4;
/// The most descriptors one request may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = REQUEST_QUEUE_SIZE as usize;
/// The most bytes of a request in either direction: 1 MiB of data plus headers.
pub const MAX_REQUEST_BYTES: usize = (1 << 20) + 0x2000;
/// How long the guest trusts what it learned of a place in the share the host may change.
pub const SHORT_CACHE: Duration = Duration::from_secs(1);
/// Inodes the guest may hold per MiB of its memory (see [Inodes held](self#inodes-held-bounded)):
/// 49,152 for a 512 MiB guest, enough for the file benchmark's two 10,000-file trees and an
/// unpacked copy at once.
pub const INODES_PER_GUEST_MIB: usize = 96;
/// The fewest inodes a guest may hold, however small its memory.
pub const MIN_INODES: usize = 8192;
/// Host kernel memory one held inode may pin, for the VMM's memory cap: 2.7 KiB measured on
/// ext4, rounded up for overlayfs's extra layer.
pub const HELD_INODE_HOST_BYTES: u64 = 4096;

/// The most inodes a share served without a VM's size (`Fs::new`, tests) lets the guest hold.
pub const DEFAULT_MAX_INODES: usize = 1 << 16;

/// The most inodes the guest of a VM of `mem_mib` MiB may hold at once.
pub fn max_inodes_for(mem_mib: u64) -> usize {
    usize::try_from(mem_mib)
        .unwrap_or(usize::MAX)
        .saturating_mul(INODES_PER_GUEST_MIB)
        .max(MIN_INODES)
}

/// How long the guest may trust entries (missing names too) and attributes, by place in the
/// share (see [Caching](self#caching)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheTimes {
    /// Under `<id>/rootfs`.
    pub rootfs: Duration,
    /// Everywhere else: bind mounts and the share's own directories.
    pub other: Duration,
}

impl Default for CacheTimes {
    fn default() -> Self {
        CacheTimes {
            rootfs: SHORT_CACHE,
            other: SHORT_CACHE,
        }
    }
}

/// Errors of the file system device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The tag is empty or longer than [`TAG_LEN`] bytes.
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    /// The shared directory cannot be served.
    #[error("cannot share {path}")]
    SharedDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The request has more descriptors than allowed.
    #[error("request has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("request has a device-readable descriptor after a device-writable one")]
    ChainOrder,
    /// The request's buffers are larger than allowed.
    #[error("request buffers are larger than {MAX_REQUEST_BYTES} bytes")]
    RequestTooLarge,
    /// A buffer lies outside guest memory.
    #[error("request buffer is outside guest memory")]
    GuestMemory,
    /// The request has no device-readable buffer for the FUSE header.
    #[error("request has no FUSE header")]
    NoHeader,
    /// The FUSE server could not parse or answer the message.
    #[error("FUSE request failed")]
    Fuse(#[source] fuse_backend_rs::Error),
}
