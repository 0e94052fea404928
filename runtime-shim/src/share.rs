//! The per-container share on the host: `<state dir>/shared/`, exported to the guest by the
//! VMM's virtio-fs device, with the rootfs and the spec's bind-mount sources bind-mounted into
//! `shared/<id>/`.
//!
//! `shared/` is first bind-mounted onto itself and made private, so that the binds below it do
//! not propagate into other mount namespaces (where `delete` could not remove them).
//! [`release_share`] detaches every mount under the state directory - found in
//! `/proc/self/mountinfo`, so mounts of an interrupted `create` are found too - and checks that
//! none is left before anything is removed: a recursive removal must never descend into a
//! user's rootfs.

use crate::bundle::BindPlan;
use crate::config::HuskConfig;
use crate::container::StateDir;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Annotation choosing how long the guest caches the container's files, for one sandbox
/// (`auto` or `short`; see [`FsCache`]).
pub const ANNOTATION_FS_CACHE: &str = "io.husk.fs.cache";

/// How long the guest may cache what it learns of the share (entries, missing names and
/// attributes; file data is kept until the attributes show a change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsCache {
    /// The rootfs, which nothing on the host changes under a running container, for a day;
    /// bind mounts (which the host may change) for a second. The default.
    Auto,
    /// Everything for a second: changes the host makes in the rootfs of a running container
    /// (`podman cp`, an edit in the engine's overlay) are seen within a second, at the cost of
    /// a revalidation per path each second.
    Short,
}

impl FsCache {
    /// Seconds the rootfs is cached in `Auto`.
    pub const ROOTFS_SECS: u32 = 24 * 60 * 60;
    /// Seconds everything else (and in `Short` the rootfs too) is cached.
    pub const SHORT_SECS: u32 = 1;

    /// The configuration's choice, overridden by the spec's annotation.
    pub fn wanted(cfg: &HuskConfig, spec: &serde_json::Value) -> anyhow::Result<FsCache> {
        match spec["annotations"][ANNOTATION_FS_CACHE].as_str() {
            None => Ok(cfg.fs_cache),
            Some("auto") => Ok(FsCache::Auto),
            Some("short") => Ok(FsCache::Short),
            Some(other) => {
                anyhow::bail!("annotation {ANNOTATION_FS_CACHE}={other:?}: expected auto or short")
            }
        }
    }

    /// The `husk-vmm` options that say it.
    pub fn vmm_args(self) -> [String; 4] {
        let rootfs = match self {
            FsCache::Auto => Self::ROOTFS_SECS,
            FsCache::Short => Self::SHORT_SECS,
        };
        [
            "--share-rootfs-cache-secs".into(),
            rootfs.to_string(),
            "--share-cache-secs".into(),
            Self::SHORT_SECS.to_string(),
        ]
    }
}

/// Errors of preparing and releasing the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot bind-mount {source_path} on {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("bind-mount source {0} does not exist")]
    SourceMissing(PathBuf),
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("{0} is still mounted; refusing to remove the state directory")]
    StillMounted(PathBuf),
    #[error("cannot idmap {source_path} for husk-vmm's user namespace")]
    Idmap {
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `shared/` and makes it a private bind mount of itself (once per sandbox), so that
/// the binds below it do not propagate into other mount namespaces. The mount is appended to
/// `mounts`.
pub fn mount_share(dir: &StateDir, mounts: &mut Vec<PathBuf>) -> Result<(), ShareError> {
    let shared = dir.shared_dir();
    make_dir(&shared)?;
    bind(&shared, &shared, MsFlags::empty())?;
    mounts.push(shared.clone());
    mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| ShareError::Bind {
        source_path: shared.clone(),
        target: shared.clone(),
        source,
    })
}

/// Bind-mounts `binds` below `bundle` (a container's `shared/<id>/`, created here); every mount
/// made is appended to `mounts` (also on error).
///
/// With `userns` (husk-vmm's user namespace, see [`husk_vmm::userns`]) every bind is an
/// idmapped mount through it, so that husk-vmm, an unprivileged uid, acts there as the guest's
/// users. A source whose file system cannot be idmapped fails with [`ShareError::Idmap`]
/// before anything is made. The directories made here are searchable by all (0755):
/// husk-vmm, nobody on the host outside its mounts, looks up through them.
pub fn bind_into_share(
    bundle: &Path,
    binds: &[BindPlan],
    mounts: &mut Vec<PathBuf>,
    userns: Option<BorrowedFd<'_>>,
) -> Result<(), ShareError> {
    if let Some(missing) = binds.iter().find(|plan| !plan.source.exists()) {
        return Err(ShareError::SourceMissing(missing.source.clone()));
    }
    let mut trees: Vec<Option<OwnedFd>> = Vec::with_capacity(binds.len());
    for plan in binds {
        trees.push(match userns {
            Some(ns) => Some(
                husk_vmm::userns::idmapped_tree(&plan.source, ns, true).map_err(|source| {
                    ShareError::Idmap {
                        source_path: plan.source.clone(),
                        source,
                    }
                })?,
            ),
            None => None,
        });
    }
    make_dir(bundle)?;
    for (plan, tree) in binds.iter().zip(trees) {
        let target = bundle.join(&plan.target);
        if let Some(parent) = target.parent() {
            make_dir(parent)?;
        }
        let made = if plan.is_dir {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        };
        made.map_err(|e| ShareError::Create(target.clone(), e))?;
        match tree {
            Some(tree) => {
                husk_vmm::userns::attach(&tree, &target).map_err(|e| ShareError::Bind {
                    source_path: plan.source.clone(),
                    target: target.clone(),
                    source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?
            }
            None => bind(&plan.source, &target, MsFlags::MS_REC)?,
        }
        mounts.push(target);
    }
    Ok(())
}

/// Creates `dir` (and its parents) and makes it searchable by all, whatever the umask.
fn make_dir(dir: &Path) -> Result<(), ShareError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| ShareError::Create(dir.to_path_buf(), e))
}

fn bind(source: &Path, target: &Path, extra: MsFlags) -> Result<(), ShareError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | extra,
        None::<&str>,
    )
    .map_err(|e| ShareError::Bind {
        source_path: source.to_path_buf(),
        target: target.to_path_buf(),
        source: e,
    })
}

/// Mount points at or below `dir`, deepest first. `dir` is resolved first: mountinfo names
/// real paths (docker's `/var/run/...` root is `/run/...` there).
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, ShareError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(ShareError::MountInfo)?;
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found = mounts_under_in(&text, &real);
    if real != dir {
        found.extend(mounts_under_in(&text, dir));
    }
    Ok(found)
}

/// Removes `path` recursively without ever crossing into another file system: a directory
/// whose device differs from its parent's is a mount point left behind, and is refused.
pub fn remove_tree(path: &Path, dev: u64) -> Result<(), ShareError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e| ShareError::Create(path.to_path_buf(), e);
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(io);
    }
    if meta.dev() != dev {
        return Err(ShareError::StillMounted(path.to_path_buf()));
    }
    for entry in std::fs::read_dir(path).map_err(io)? {
        remove_tree(&entry.map_err(io)?.path(), dev)?;
    }
    std::fs::remove_dir(path).map_err(io)
}

/// [`mounts_under`] on the text of a mountinfo file.
pub fn mounts_under_in(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Decodes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount below the state directory, then checks that none is left.
pub fn release_share(dir: &StateDir) -> Result<(), ShareError> {
    unmount_all_under(&dir.dir)
}

/// Detaches every mount at or below `path` (deepest first), then checks that none is left.
pub fn unmount_all_under(path: &Path) -> Result<(), ShareError> {
    for _ in 0..3 {
        let mounts = mounts_under(path)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for point in mounts {
            if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
                if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                    eprintln!("husk: warning: cannot unmount {}: {e}", point.display());
                }
            }
        }
    }
    match mounts_under(path)?.into_iter().next() {
        Some(left) => Err(ShareError::StillMounted(left)),
        None => Ok(()),
    }
}

/// Removes the state directory (and a vsock socket kept outside it) after [`release_share`]
/// found no mount left in it; what the container wired in a network namespace is undone first
/// ([`crate::network::release_recorded`]).
pub fn remove_state_dir(dir: &StateDir) -> Result<(), ShareError> {
    if let Err(e) = crate::network::release_recorded(&dir.dir) {
        eprintln!("husk: warning: {e:#}");
    }
    release_share(dir)?;
    if let Err(e) = crate::host_cgroup::release_recorded(&dir.dir) {
        eprintln!("husk: warning: {e:#}");
    }
    let socket = dir.vsock_socket();
    if !socket.starts_with(&dir.dir) {
        let _ = std::fs::remove_file(&socket);
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(&dir.dir) {
        Ok(meta) => remove_tree(&dir.dir, meta.dev()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ShareError::Create(dir.dir.clone(), e)),
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_fs_cache_annotation_overrides_the_configuration() {
        let cfg = HuskConfig::default();
        assert_eq!(cfg.fs_cache, FsCache::Auto);
        let spec = |v: &str| serde_json::json!({"annotations": {ANNOTATION_FS_CACHE: v}});
        assert_eq!(
            FsCache::wanted(&cfg, &serde_json::json!({})).unwrap(),
            FsCache::Auto
        );
        assert_eq!(
            FsCache::wanted(&cfg, &spec("short")).unwrap(),
            FsCache::Short
        );
        let short = HuskConfig {
            fs_cache: FsCache::Short,
            ..HuskConfig::default()
        };
        assert_eq!(
            FsCache::wanted(&short, &spec("auto")).unwrap(),
            FsCache::Auto
        );
        let err = FsCache::wanted(&cfg, &spec("always")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation io.husk.fs.cache=\"always\": expected auto or short"
        );
        assert_eq!(
            FsCache::Auto.vmm_args(),
            [
                "--share-rootfs-cache-secs",
                "86400",
                "--share-cache-secs",
                "1"
            ]
            .map(String::from)
        );
        assert_eq!(
            FsCache::Short.vmm_args(),
            ["--share-rootfs-cache-secs", "1", "--share-cache-secs", "1"].map(String::from)
        );
    }

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /run rw shared:5 - tmpfs tmpfs rw
40 30 8:1 /b/rootfs /run/husk/c1/shared/c1/rootfs rw - ext4 /dev/sda1 rw
41 30 0:25 /run/husk/c1/shared /run/husk/c1/shared rw - tmpfs tmpfs rw
42 30 8:1 /d /run/husk/c10/shared/c10/rootfs rw - ext4 /dev/sda1 rw
43 30 8:1 /e /run/husk/c1/shared/c1/mounts/my\\040dir rw - ext4 /dev/sda1 rw
";

    #[test]
    fn mounts_under_a_dir_are_found_deepest_first() {
        let found = mounts_under_in(MOUNTINFO, Path::new("/run/husk/c1"));
        assert_eq!(
            found,
            vec![
                PathBuf::from("/run/husk/c1/shared/c1/mounts/my dir"),
                PathBuf::from("/run/husk/c1/shared/c1/rootfs"),
                PathBuf::from("/run/husk/c1/shared"),
            ]
        );
    }

    #[test]
    fn remove_tree_removes_a_plain_tree() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("c1");
        std::fs::create_dir_all(dir.join("shared/c1/mounts")).expect("mkdir");
        std::fs::write(dir.join("state.json"), "{}").expect("write");
        std::os::unix::fs::symlink("/etc", dir.join("shared/c1/link")).expect("symlink");
        let dev = std::fs::metadata(&dir).expect("stat").dev();
        remove_tree(&dir, dev).expect("removed");
        assert!(!dir.exists());
        assert!(Path::new("/etc").exists(), "symlinks are not followed");
    }

    #[test]
    fn remove_tree_refuses_another_device() {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("d")).expect("mkdir");
        let err = remove_tree(&root.path().join("d"), u64::MAX).expect_err("refused");
        assert!(matches!(err, ShareError::StillMounted(_)));
        assert!(root.path().join("d").exists());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape_mountinfo("plain\\"), "plain\\");
    }
}
