//! The `start` and `delete` actions of the shim v2 contract.
//!
//! `start` runs in the new container's bundle directory. The shim server's address is derived
//! from the sandbox the container belongs to ([`super::sandbox_id_of`]), so every container of a
//! pod finds the pod's one shim: if a server already answers there, its address is printed;
//! otherwise a server is spawned (this binary without an action, in its own process group) and
//! its address printed once it accepts connections.
//!
//! `delete` runs after a shim died (or failed to start): it kills the sandbox's VMM (found
//! through `sandbox.json`, checked against its start time), unmounts everything the shim
//! mounted, removes the state, and prints a `DeleteResponse` with the SIGKILL status.

use super::sandbox::{remove_stale_sandbox, sandbox_root};
use super::{rootfs, sandbox_id_of};
use anyhow::{bail, Context, Result};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::{DeleteResponse, Flags, StartOpts};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `start` waits for a new shim server to accept connections.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The filesystem path of a `unix://` ttrpc address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Reads the bundle's `config.json` (in `dir`).
fn read_spec(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// `start`: prints the ttrpc address of the sandbox's shim server, spawning it if needed.
pub fn start(flags: &Flags) -> Result<()> {
    crate::container::validate_id(&flags.id).context("container id")?;
    crate::container::validate_id(&flags.namespace).context("namespace")?;
    let bundle = std::env::current_dir().context("cannot find the bundle (cwd)")?;
    let spec = read_spec(&bundle)?;
    let grouping = sandbox_id_of(&spec, &flags.id);
    crate::container::validate_id(&grouping).context("sandbox id")?;
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let address = opts.socket_address(&grouping);
    let path = socket_path(&address).to_string();
    if UnixStream::connect(&path).is_err() {
        // Nothing answers: a stale socket of a dead shim, or none.
        let _ = std::fs::remove_file(&path);
        spawn_server(flags, &bundle, &address)?;
    }
    // containerd reads `address` back when it restarts and reconnects to its shims.
    std::fs::write(bundle.join("address"), &address).context("cannot write the address file")?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Spawns the shim server for `address` and waits until it accepts connections.
fn spawn_server(flags: &Flags, bundle: &Path, address: &str) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the shim binary")?;
    let mut cmd = Command::new(exe);
    cmd.current_dir(bundle)
        .args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", address])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: signals meant for containerd's group do not reach the shim.
        .process_group(0);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd.spawn().context("cannot spawn the shim server")?;
    let path = socket_path(address);
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    loop {
        if UnixStream::connect(path).is_ok() {
            // The server outlives us; containerd (a subreaper) reaps it.
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("waiting for the shim server")? {
            bail!("the shim server exited at start ({status}); see the shim log");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the shim server did not listen on {address} within {SERVER_START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `delete`: cleans up after a dead shim; prints the `DeleteResponse`.
pub fn delete(flags: &Flags) -> Result<()> {
    crate::container::validate_id(&flags.id).context("container id")?;
    crate::container::validate_id(&flags.namespace).context("namespace")?;
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("cannot find the bundle (cwd)")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let root = sandbox_root(&flags.namespace);
    let sandbox = read_spec(&bundle)
        .map(|spec| sandbox_id_of(&spec, &flags.id))
        .unwrap_or_else(|_| flags.id.clone());
    let mut problems = Vec::new();
    if sandbox == flags.id {
        if let Err(e) = remove_stale_sandbox(&root, &flags.id) {
            problems.push(format!("{e:#}"));
        }
    } else if let Ok(dir) = crate::container::StateDir::new(&root, &sandbox) {
        // A pod member: its part of the (dead) pod's share.
        let share = dir.shared_dir().join(&flags.id);
        if let Err(e) = rootfs::release_container_share(&share) {
            problems.push(format!("{e:#}"));
        }
    }
    if let Err(e) = rootfs::unmount_rootfs(&bundle.join("rootfs")) {
        problems.push(format!("{e:#}"));
    }
    // The dead server's ttrpc socket (only when nothing answers there any more).
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = socket_path(address.trim());
        if path.starts_with('/') && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    if !problems.is_empty() {
        bail!("cleanup of {} failed: {}", flags.id, problems.join("; "));
    }
    let response = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(super::translate::timestamp(std::time::SystemTime::now())).into(),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    out.write_all(&response.write_to_bytes()?)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_drop_the_scheme() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/ab"),
            "/run/containerd/s/ab"
        );
        assert_eq!(socket_path("/x.sock"), "/x.sock");
    }
}
