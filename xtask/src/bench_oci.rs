//! What `cargo xtask bench oci` needs beyond the boot bench: gVisor's `runsc`, the peer whose
//! idle memory sets husk's target.
//!
//! runsc is not in Debian 12 itself, but Debian ships it (source package `golang-gvisor-gvisor`,
//! binary package `runsc`, a static Go binary with no dependencies) in trixie and in
//! `bookworm-backports`. The rig's image is a plain bookworm debootstrap, so rather than add a
//! second suite to it, xtask fetches the backports `.deb` with apt on the host (a private apt
//! state under the cache dir, from the host's own Debian mirror, checked against the archive
//! keys like any apt download), unpacks `runsc` from it and carries it into the rig like the
//! husk binaries.

use crate::debian::{PrivateApt, BACKPORTS};
use crate::util::{self, cache_dir, run};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The suite that carries runsc for the rig's Debian release.
const RUNSC_SUITE: &str = BACKPORTS;

/// The `runsc` binary from Debian's `runsc` package in [`RUNSC_SUITE`], fetched once into the
/// cache (`<cache>/runsc/runsc`, with the package version beside it in `version`).
pub fn fetch_runsc() -> Result<PathBuf> {
    let dir = cache_dir()?.join("runsc");
    let bin = dir.join("runsc");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    let _lock = util::lock_file(&dir.join("lock"))?;
    if bin.exists() {
        return Ok(bin);
    }
    let apt = dir.join("apt");
    let private = PrivateApt::new(&apt, RUNSC_SUITE)?;
    let deb = private.download("runsc")?;
    let unpacked = apt.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let found = ["usr/bin/runsc", "usr/sbin/runsc", "bin/runsc"]
        .iter()
        .map(|p| unpacked.join(p))
        .find(|p| p.is_file())
        .with_context(|| format!("{} holds no runsc binary", deb.display()))?;
    let version = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    util::write_atomic(&dir.join("version"), format!("{version}\n").as_bytes())?;
    util::copy_atomic(&found, &bin)?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::remove_dir_all(&apt)?;
    eprintln!(
        "xtask: runsc from Debian's {version} is in {}",
        bin.display()
    );
    Ok(bin)
}

/// The host's load average line (`/proc/loadavg`), for saying how busy the machine was.
pub fn host_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
