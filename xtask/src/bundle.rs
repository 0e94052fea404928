//! OCI bundles for demos and tests: a busybox rootfs (Debian's `busybox-static`: `/bin/busybox`
//! plus one symlink per applet) and a `config.json` written by `husk spec`, with the command
//! line and `terminal: false` set.

use crate::util::{apt_install, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds (or rebuilds) a busybox bundle at `dest` whose container runs `args`; `husk` is the
/// `husk` binary used for `husk spec`.
pub fn busybox_bundle(husk: &Path, dest: &Path, args: &[&str]) -> Result<PathBuf> {
    apt_install(&["busybox-static"])?;
    let busybox = Path::new("/bin/busybox");
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    let rootfs = dest.join("rootfs");
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).context("copying /bin/busybox")?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    if !list.status.success() {
        bail!("busybox --list failed");
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    run(Command::new(husk).arg("spec").arg("--bundle").arg(dest))?;
    let config = dest.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(&config, serde_json::to_string_pretty(&spec)?)?;
    Ok(dest.to_path_buf())
}
