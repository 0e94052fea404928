//! Container root file systems: containerd's rootfs mounts (an `overlay` from the overlayfs
//! snapshotter, or a `bind` from the native one) are mounted on the bundle's `rootfs`, which
//! [`translate_spec`](crate::bundle::translate_spec) then bind-mounts into the sandbox share as
//! `shared/<container id>/rootfs` for the guest.

use crate::share::{remove_tree, unmount_all_under, ShareError};
use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Longest mount data the kernel takes (one page).
const MAX_MOUNT_DATA: usize = 4096;

/// Errors of mounting a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs mount type {0:?} is not supported (overlay and bind are)")]
    UnsupportedType(String),
    #[error("rootfs mount options are {0} bytes, more than the kernel's {MAX_MOUNT_DATA}")]
    OptionsTooLong(usize),
    #[error("cannot mount {kind} {source_path} on {target}")]
    Mount {
        kind: String,
        source_path: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the rootfs directory {0}")]
    Create(String, #[source] std::io::Error),
}

/// Mount flags and file system data of a list of mount options (`ro`, `nosuid`, ... become
/// flags, the rest data), as `mount(8)` reads them.
pub fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data)
}

/// Mounts containerd's rootfs `mounts`, in order, on `target`.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(target)
        .map_err(|e| RootfsError::Create(target.display().to_string(), e))?;
    for m in mounts {
        let (mut flags, data) = parse_options(&m.options);
        let kind = m.type_.as_str();
        match kind {
            "overlay" => {}
            "bind" | "rbind" => flags.insert(MsFlags::MS_BIND),
            other if flags.contains(MsFlags::MS_BIND) && other.is_empty() => {}
            other => return Err(RootfsError::UnsupportedType(other.to_string())),
        }
        let data = data.join(",");
        if data.len() >= MAX_MOUNT_DATA {
            return Err(RootfsError::OptionsTooLong(data.len()));
        }
        let err = |source| RootfsError::Mount {
            kind: kind.to_string(),
            source_path: m.source.clone(),
            target: target.display().to_string(),
            source,
        };
        let fstype = (kind == "overlay").then_some("overlay");
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(err)?;
        // A bind mount ignores MS_RDONLY until remounted.
        if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
            let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, target, None::<&str>, remount, None::<&str>).map_err(err)?;
        }
    }
    Ok(())
}

/// Unmounts everything on (and below) a bundle's rootfs.
pub fn unmount_rootfs(target: &Path) -> Result<(), ShareError> {
    if !target.exists() {
        return Ok(());
    }
    unmount_all_under(target)
}

/// Unmounts a container's part of the share (`shared/<id>/`) and removes it.
pub fn release_container_share(share: &Path) -> Result<(), ShareError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(share) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ShareError::Create(share.to_path_buf(), e)),
    };
    unmount_all_under(share)?;
    remove_tree(share, meta.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlay_options_are_data_and_flags_are_flags() {
        let (flags, data) = parse_options(&strings(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
            "nosuid",
        ]));
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(
            data,
            strings(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])
        );
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let (flags, data) = parse_options(&strings(&["rbind", "ro", "rw"]));
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }

    #[test]
    fn unknown_mount_types_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = Mount {
            type_: "zfs".into(),
            source: "pool/x".into(),
            ..Default::default()
        };
        let err = mount_rootfs(&[m], dir.path()).expect_err("refused");
        assert!(matches!(err, RootfsError::UnsupportedType(t) if t == "zfs"));
    }

    #[test]
    fn releasing_a_missing_share_is_fine() {
        let dir = tempfile::tempdir().expect("temp dir");
        release_container_share(&dir.path().join("nope")).expect("nothing to do");
        let share = dir.path().join("c1");
        std::fs::create_dir_all(share.join("rootfs")).expect("mkdir");
        release_container_share(&share).expect("removed");
        assert!(!share.exists());
    }
}
