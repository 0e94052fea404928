//! A sandbox's microVM, as the shim runs it: a plain `husk-vmm` child (no supervisor mode: the
//! shim itself drives the agent) with the sandbox's share, in a state directory of the OCI CLI's
//! layout under [`SHIM_ROOT`](super::SHIM_ROOT)`/<namespace>/<sandbox id>/`, plus
//! `sandbox.json` (the VMM's pid and start time) so that `delete` can find a VM whose shim died.
//!
//! A monitor thread owns the child and waits for it: when the VMM ends, whatever the reason,
//! [`Sandbox::wait_exit`] returns and the shim marks every process of the sandbox as exited.

use crate::agent::{call_ok, connect, AgentError};
use crate::config::HuskConfig;
use crate::container::{
    in_new_pid_namespace, process_alive, process_start_time, vmm_command, StateDir, VmRollback,
};
use crate::host_cgroup::{self, HostCgroup, HostLimits};
use crate::network;
use crate::share::{mount_share, remove_state_dir, FsCache};
use crate::sizing::{host_cpus, size_vm};
use crate::state::write_atomic;
use crate::template::{self, Templates};
use anyhow::{bail, Context, Result};
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::Request;
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the VM may take to go away after the agent acknowledged `Shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What `sandbox.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    pub vmm_pid: i32,
    pub vmm_start_time: u64,
}

/// The state root of a containerd namespace.
pub fn sandbox_root(namespace: &str) -> PathBuf {
    Path::new(super::SHIM_ROOT).join(namespace)
}

fn sandbox_file(dir: &StateDir) -> PathBuf {
    dir.dir.join("sandbox.json")
}

/// A running sandbox VM.
pub struct Sandbox {
    pub id: String,
    pub dir: StateDir,
    pub vmm_pid: i32,
    /// The VM's vCPUs (a member container's cpuset is mapped onto them).
    pub vcpus: u8,
    /// The template the VM was restored from, until its write set was looked after (see
    /// [`Sandbox::record_write_set`]).
    template: Mutex<Option<PathBuf>>,
    /// Set by the monitor thread once the VMM exited (with its wait status text).
    exited: Arc<(Mutex<Option<String>>, Condvar)>,
}

impl Sandbox {
    /// Boots the VM of sandbox `id` under `root`, sized from `spec` (the sandbox container's
    /// OCI spec: husk's annotations, memory limit, CPU quota), and waits for its agent.
    pub fn boot(root: &Path, id: &str, spec: &serde_json::Value) -> Result<Sandbox> {
        let cfg = HuskConfig::load()?;
        let size = size_vm(spec, &cfg, host_cpus())?;
        let fs_cache = FsCache::wanted(&cfg, spec)?;
        let kernel = cfg.kernel_path()?;
        let initramfs = cfg.initramfs_path()?;
        let dir = StateDir::new(root, id)?;
        // The pod's VMM goes into the cgroup of the spec that boots it (the pod sandbox's).
        let warn = |m: &str| log::warn!("sandbox {id}: {m}");
        let block_io = spec["linux"]["resources"]
            .get("blockIO")
            .filter(|b| !crate::bundle::is_unset(b))
            .cloned();
        let cgroup_path = host_cgroup::plan(spec, root, id, block_io.as_ref(), &warn)?;
        let _lock = dir.create_locked()?;
        let mut guard = VmRollback::new(&dir, |m| log::warn!("{m}"));
        let mut mounts = Vec::new();
        mount_share(&dir, &mut mounts).context("preparing the share")?;
        // A pod's husk-vmm runs as root for now, without the user namespace of the CLI's
        // (`crate::container::vmm_userns`): in the rig, containerd's overlay rootfs mounts were
        // refused as idmapped mounts (mount_setattr: EINVAL) where podman's were taken, and a
        // pod's VMM starts before its containers' mounts are known. See SECURITY.md.
        let cgroup = HostCgroup::prepare_planned(
            cgroup_path.as_deref(),
            HostLimits {
                guest_mem_mib: u64::from(size.mem_mib),
                block_io,
            },
            &dir.dir,
            &warn,
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.log_file())
            .with_context(|| format!("cannot create {}", dir.log_file().display()))?;
        let socket = dir.vsock_socket();
        // The pod's CNI interfaces, carried into the VM over TAPs (see `crate::network`).
        let network = match network::netns_path(spec) {
            Some(netns) => network::prepare(&netns)
                .with_context(|| format!("wiring the pod's network {}", netns.display()))?,
            None => Vec::new(),
        };
        let cards = u8::try_from(network.len()).context("too many network cards")?;
        let templates = Templates::new(&cfg);
        let mut template = if template::wanted(&cfg, spec)? {
            templates.get(&cfg, &kernel, &initramfs, size, cards, |m| {
                log::warn!("{m}")
            })
        } else {
            None
        };
        let pid = loop {
            let mut cmd = vmm_command(&cfg, &kernel, &initramfs, size, fs_cache, &dir, cfg.debug)
                .with_context(|| format!("preparing {}", socket.display()))?;
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?);
            if let Some(template) = &template {
                cmd.arg("--restore").arg(template);
            }
            let mut tap_fds = Vec::with_capacity(network.len());
            for (card, net) in network.iter().enumerate() {
                log::info!(
                    "sandbox {id}: the pod's {} ({}, {}) goes to the VM's eth{card} through {}",
                    net.interface,
                    net.mac,
                    net.ipv4.as_deref().unwrap_or("no IPv4 address"),
                    network::tap_name(card)
                );
                // Inherited under its own number (above the standard streams).
                let tap = net.tap.as_raw_fd();
                tap_fds.push(tap);
                // SAFETY: between fork and exec the closure only calls fcntl(2), which is
                // async-signal-safe, on a descriptor that is open in the child.
                unsafe {
                    cmd.pre_exec(move || inherit_fd(tap));
                }
            }
            cmd.args(network::vmm_args(&network, &tap_fds));
            if let Some(cgroup) = &cgroup {
                cgroup.join_on_exec(&mut cmd);
            }
            log::info!("sandbox {id}: booting {size:?}: {cmd:?}");
            let child =
                in_new_pid_namespace(|| cmd.spawn(), &|w: &str| log::warn!("sandbox {id}: {w}"))
                    .with_context(|| format!("cannot start {}", cfg.vmm_path().display()))?;
            let spawned = Instant::now();
            let pid = i32::try_from(child.id()).context("pid out of range")?;
            let start_time = process_start_time(pid).unwrap_or(0);
            guard.child = Some(child);
            let state = SandboxState {
                id: id.to_string(),
                vmm_pid: pid,
                vmm_start_time: start_time,
            };
            write_atomic(&sandbox_file(&dir), &serde_json::to_vec_pretty(&state)?)?;

            // Wait for the agent, but stop at once if the VMM dies.
            let deadline = Instant::now() + cfg.agent_timeout;
            let refused = loop {
                match AgentClient::connect(&socket, Duration::from_millis(500)) {
                    Ok(_) => break false,
                    Err(e) => {
                        let child = guard.child.as_mut().context("the VMM handle is gone")?;
                        if let Some(status) = child.try_wait()? {
                            if template.is_some()
                                && status.code() == Some(husk_vmm::vmm::TEMPLATE_REFUSED_EXIT)
                            {
                                break true;
                            }
                            bail!(
                                "husk-vmm exited during boot ({status}){}",
                                log_tail(&dir.log_file())
                            );
                        }
                        if Instant::now() >= deadline {
                            bail!(
                                "the guest agent did not answer within {:?}: {}",
                                cfg.agent_timeout,
                                husk_vmm::supervisor::chain(&e)
                            );
                        }
                    }
                }
            };
            if !refused {
                log::info!(
                    "sandbox {id}: the agent answered {} ms after husk-vmm was spawned ({})",
                    spawned.elapsed().as_millis(),
                    if template.is_some() {
                        "restored"
                    } else {
                        "booted"
                    }
                );
                break pid;
            }
            log::warn!(
                "sandbox {id}: warm start: husk-vmm could not use the template{}; booting",
                log_tail(&dir.log_file())
            );
            guard.child = None;
            let _ = std::fs::remove_file(&socket);
            if let Some(dir) = template.take() {
                templates.discard(&dir);
            }
        };
        // The VMM has its own copies of the TAPs now.
        drop(network);
        let mut child = guard.child.take().context("the VMM handle is gone")?;
        guard.armed = false;
        drop(guard);
        let exited = Arc::new((Mutex::new(None), Condvar::new()));
        let monitor = exited.clone();
        std::thread::Builder::new()
            .name("husk-vmm-monitor".into())
            .spawn(move || {
                let status = match child.wait() {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                let (lock, cvar) = &*monitor;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                cvar.notify_all();
            })
            .context("cannot start the VMM monitor")?;
        Ok(Sandbox {
            id: id.to_string(),
            dir,
            vmm_pid: pid,
            vcpus: size.vcpus,
            template: Mutex::new(template),
            exited,
        })
    }

    /// Once the pod's first member container (the first after the sandbox's own) exists in a
    /// VM restored from a template, records the template's write set if it has none yet (see
    /// `husk_vmm::write_set`): the pages the restore, the renewal and the creation of both
    /// containers wrote, which later pods of the template copy ahead of their guest, as the
    /// CLI's containers do. A pod starts its workload only with a member container, so that
    /// is where its start is waited for. Only a hint: a failure is logged.
    pub fn record_write_set(&self) {
        let Some(template) = self
            .template
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        match template::record_write_set(&template, self.vmm_pid) {
            Ok(Some(pages)) => log::info!(
                "sandbox {}: recorded the write set of template {} ({pages} pages)",
                self.id,
                template.display()
            ),
            Ok(None) => {}
            Err(e) => log::warn!(
                "sandbox {}: no write set recorded for template {}: {e:#}",
                self.id,
                template.display()
            ),
        }
    }

    /// A new control connection to the agent.
    pub fn client(&self) -> Result<AgentClient, AgentError> {
        connect(&self.dir)
    }

    /// The VMM's vsock socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.vsock_socket()
    }

    /// Whether the VMM still runs.
    pub fn alive(&self) -> bool {
        self.exited
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Blocks until the VMM exited (or `timeout` passed); its wait status when it exited.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<String> {
        let (lock, cvar) = &*self.exited;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| Instant::now() + t);
        while guard.is_none() {
            match deadline {
                None => guard = cvar.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    guard = cvar
                        .wait_timeout(guard, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        guard.clone()
    }

    /// Stops the VM (the agent shuts the guest down; SIGKILL if it does not end in time),
    /// releases the share and removes the state directory.
    pub fn shutdown(&self) -> Result<()> {
        if self.alive() {
            let graceful = self
                .client()
                .map_err(anyhow::Error::from)
                .and_then(|mut c| {
                    Ok(call_ok(
                        &mut c,
                        "shutting down the guest",
                        &Request::Shutdown,
                    )?)
                });
            if let Err(e) = &graceful {
                log::warn!("sandbox {}: {e:#}", self.id);
            }
            let grace = if graceful.is_ok() {
                SHUTDOWN_GRACE
            } else {
                Duration::ZERO
            };
            if self.wait_exit(Some(grace)).is_none() {
                self.kill();
                if self.wait_exit(Some(SHUTDOWN_GRACE)).is_none() {
                    bail!("husk-vmm (pid {}) did not exit after SIGKILL", self.vmm_pid);
                }
            }
        }
        remove_state_dir(&self.dir).context("removing the sandbox state")?;
        Ok(())
    }

    /// SIGKILLs the VMM (still our unreaped child until the monitor saw it exit, so the pid
    /// cannot have been reused).
    pub fn kill(&self) {
        if self.alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.vmm_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// In a forked child: lets `fd` be inherited across exec under its own number (the child's
/// copy only: the shim's other children never see it).
fn inherit_fd(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor open in this process; touches only its flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Cleans up a sandbox whose shim is gone: SIGKILLs its VMM if it still runs (checked against
/// the recorded start time), waits for it to go, unmounts and removes the state directory.
pub fn remove_stale_sandbox(root: &Path, id: &str) -> Result<()> {
    let dir = StateDir::new(root, id)?;
    if !dir.dir.exists() {
        return Ok(());
    }
    if let Ok(text) = std::fs::read_to_string(sandbox_file(&dir)) {
        let state: SandboxState = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid", sandbox_file(&dir).display()))?;
        if process_alive(state.vmm_pid, state.vmm_start_time) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(state.vmm_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while process_alive(state.vmm_pid, state.vmm_start_time) {
                if Instant::now() >= deadline {
                    bail!("husk-vmm (pid {}) survived SIGKILL", state.vmm_pid);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    remove_state_dir(&dir).context("removing the sandbox state")?;
    Ok(())
}

/// The last lines of the VMM log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("; its log says: {}", tail.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sandbox_cleanup_removes_state_of_a_dead_vmm() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::new(root.path(), "pod1").expect("valid");
        std::fs::create_dir_all(dir.shared_dir()).expect("mkdir");
        let state = SandboxState {
            id: "pod1".into(),
            vmm_pid: i32::MAX,
            vmm_start_time: 1,
        };
        std::fs::write(
            sandbox_file(&dir),
            serde_json::to_vec(&state).expect("json"),
        )
        .expect("write");
        remove_stale_sandbox(root.path(), "pod1").expect("cleaned");
        assert!(!dir.dir.exists());
        remove_stale_sandbox(root.path(), "pod1").expect("nothing to do is fine");
    }

    #[test]
    fn sandbox_roots_are_per_namespace() {
        assert_eq!(sandbox_root("k8s.io"), Path::new("/run/husk-shim/k8s.io"));
    }
}
