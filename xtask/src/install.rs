//! `cargo xtask install [--prefix DIR]`: builds the release binaries, the guest kernel and the
//! initramfs, and installs them where `husk` and `containerd-shim-husk-v2` look by default:
//! binaries in `PREFIX/bin` (the shim finds `husk-vmm` next to itself, containerd finds the shim
//! on its `PATH`), kernel and initramfs in `PREFIX/share/husk/{vmlinux,initramfs.cpio}` (the
//! default of `/etc/husk/config.toml`'s `kernel` and `initramfs` for the `/usr/local` prefix).
//! Each file is replaced atomically, so a running engine never starts a half-written binary.

use crate::testing::{build_vm_artifacts, VmArtifacts, VM_BINARIES};
use crate::util;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What goes where: `(built file, installed path)`.
fn plan(artifacts: &VmArtifacts, prefix: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut files: Vec<(PathBuf, PathBuf)> = VM_BINARIES
        .iter()
        .map(|bin| (artifacts.bin_dir.join(bin), prefix.join("bin").join(bin)))
        .collect();
    let share = prefix.join("share/husk");
    files.push((artifacts.kernel.clone(), share.join("vmlinux")));
    files.push((artifacts.initramfs.clone(), share.join("initramfs.cpio")));
    files
}

/// `cargo xtask install`.
pub fn install(prefix: &Path) -> Result<()> {
    let artifacts = build_vm_artifacts()?;
    for (from, to) in plan(&artifacts, prefix) {
        let dir = to.parent().context("an install path has a parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        util::copy_atomic(&from, &to)?;
        println!("installed {}", to.display());
    }
    if prefix != Path::new("/usr/local") {
        println!(
            "note: husk looks for the kernel and initramfs in /usr/local/share/husk; set `kernel` \
             and `initramfs` in /etc/husk/config.toml to the ones under {}",
            prefix.join("share/husk").display()
        );
    }
    println!(
        "containerd: add a runtime with runtime_type = \"io.containerd.husk.v2\" (docs/kubernetes.md)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_go_to_bin_and_guest_files_to_share_husk() {
        let artifacts = VmArtifacts {
            bin_dir: "/t/release".into(),
            kernel: "/cache/kernel/abc/vmlinux".into(),
            initramfs: "/t/husk/initramfs.cpio".into(),
            agent: "/t/agent/husk-agent".into(),
        };
        let plan = plan(&artifacts, Path::new("/usr/local"));
        let to: Vec<&str> = plan
            .iter()
            .map(|(_, to)| to.to_str().expect("utf-8"))
            .collect();
        assert_eq!(
            to,
            [
                "/usr/local/bin/husk-vmm",
                "/usr/local/bin/husk",
                "/usr/local/bin/containerd-shim-husk-v2",
                "/usr/local/share/husk/vmlinux",
                "/usr/local/share/husk/initramfs.cpio",
            ]
        );
        assert_eq!(plan[1].0, Path::new("/t/release/husk"));
        assert_eq!(plan[3].0, Path::new("/cache/kernel/abc/vmlinux"));
    }
}
