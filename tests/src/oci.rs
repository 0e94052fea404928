//! Harness for the OCI CLI tests: a private `husk --root`, busybox bundles, and a `Drop` that
//! force-deletes every container the test left.
//!
//! The bundles share one busybox rootfs (Debian's static `/bin/busybox` plus applet symlinks)
//! and differ in their `config.json`, made by `husk spec` and patched per test.

use crate::{vm_artifacts, wait_until, Artifacts, TempDir};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The `husk` binary: `HUSK_BIN`, else the one cargo built next to this test.
pub fn husk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HUSK_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("husk")))
        .unwrap_or_else(|| PathBuf::from("husk"))
}

static NEXT_OUTPUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One test's husk environment.
pub struct OciEnv {
    pub root: TempDir,
    pub work: TempDir,
    pub husk: PathBuf,
    pub artifacts: Artifacts,
    config: PathBuf,
    rootfs: PathBuf,
}

impl OciEnv {
    /// A fresh environment, or `None` (with a loud skip message) where VMs cannot run here or
    /// this is not root (bind mounts need it).
    pub fn new(test: &str) -> Option<OciEnv> {
        let artifacts = vm_artifacts(test)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            if std::env::var("HUSK_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: the OCI tests need root");
            }
            eprintln!("!!! SKIPPED {test}: the OCI tests need root !!!");
            return None;
        }
        let env = OciEnv::build(artifacts).expect("set up the OCI test environment");
        Some(env)
    }

    fn build(artifacts: Artifacts) -> Result<OciEnv> {
        let root = TempDir::new("husk-oci-root")?;
        let work = TempDir::new("husk-oci-work")?;
        let config = work.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\ndefault_mem_mib = 128\nagent_timeout_ms = 600000\n",
                artifacts.kernel.display(),
                artifacts.initramfs.display(),
                artifacts.vmm.display()
            ),
        )?;
        let rootfs = work.path().join("rootfs");
        make_busybox_rootfs(&rootfs)?;
        Ok(OciEnv {
            root,
            work,
            husk: husk_binary(),
            artifacts,
            config,
            rootfs,
        })
    }

    /// A `husk --root <root> ARGS` command with the test's configuration.
    pub fn husk(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.husk);
        cmd.env("HUSK_CONFIG", &self.config)
            .arg("--root")
            .arg(self.root.path())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `husk ARGS` to completion. Output goes through files, not pipes: `create` and
    /// `run -d` leave a `husk-vmm` holding their stdout and stderr (as runc's container process
    /// would), so a pipe would never reach EOF.
    pub fn run(&self, args: &[&str]) -> Output {
        let n = NEXT_OUTPUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out_path = self.work.path().join(format!("out.{n}"));
        let err_path = self.work.path().join(format!("err.{n}"));
        let status = self
            .husk(args)
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .status()
            .expect("spawn husk");
        let output = Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        output
    }

    /// A bundle named `name` whose container runs `args`; `patch` edits the spec further.
    pub fn bundle(&self, name: &str, args: &[&str], patch: impl FnOnce(&mut Value)) -> PathBuf {
        let dir = self.work.path().join("bundles").join(name);
        std::fs::create_dir_all(&dir).expect("bundle dir");
        let out = Command::new(&self.husk)
            .arg("spec")
            .arg("--bundle")
            .arg(&dir)
            .output()
            .expect("husk spec");
        assert!(out.status.success(), "husk spec: {out:?}");
        let path = dir.join("config.json");
        let mut spec: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read spec"))
                .expect("spec JSON");
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["terminal"] = Value::Bool(false);
        spec["root"]["path"] = Value::String(self.rootfs.display().to_string());
        patch(&mut spec);
        std::fs::write(&path, spec.to_string()).expect("write spec");
        dir
    }

    /// `husk state ID` parsed, or `None` when it fails.
    pub fn state(&self, id: &str) -> Option<Value> {
        let out = self.run(&["state", id]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `husk state ID` says `status`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.state(id).is_some_and(|s| s["status"] == status)
        })
    }

    /// Entries of the state root.
    pub fn root_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mount points under the state root.
    pub fn mounts_left(&self) -> Vec<String> {
        let root = self.root.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .map(str::to_string)
            .collect()
    }

    /// `husk-vmm` processes whose command line mentions this state root.
    pub fn vmms_left(&self) -> Vec<u32> {
        let root = self.root.path().display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("husk-vmm") && cmdline.contains(&root) && crate::process_alive(pid)
            {
                pids.push(pid);
            }
        }
        pids
    }
}

/// A podman with its own storage and run dirs, using this environment's husk as its runtime.
pub struct Podman {
    args: Vec<String>,
    dir: PathBuf,
}

impl Podman {
    /// Runs `podman ARGS` to completion (output through files, as [`OciEnv::run`]).
    pub fn run(&self, args: &[&str]) -> Output {
        let n = NEXT_OUTPUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out_path = self.dir.join(format!("out.{n}"));
        let err_path = self.dir.join(format!("err.{n}"));
        let status = Command::new("podman")
            .args(&self.args)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .status()
            .expect("spawn podman");
        Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-af"]);
    }
}

impl OciEnv {
    /// A podman whose runtime is a wrapper running this husk with this environment's root and
    /// configuration (conmon passes no environment through).
    pub fn podman(&self) -> Podman {
        let dir = self.work.path().join("podman");
        std::fs::create_dir_all(&dir).expect("podman dir");
        let wrapper = dir.join("husk-runtime");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec env HUSK_CONFIG='{}' '{}' --root '{}' \"$@\"\n",
                self.config.display(),
                self.husk.display(),
                self.root.path().display()
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let args = vec![
            format!("--root={}", dir.join("storage").display()),
            format!("--runroot={}", dir.join("run").display()),
            "--storage-driver=vfs".to_string(),
            "--cgroup-manager=cgroupfs".to_string(),
            "--events-backend=file".to_string(),
            format!("--runtime={}", wrapper.display()),
        ];
        Podman { args, dir }
    }
}

impl Drop for OciEnv {
    fn drop(&mut self) {
        for id in self.root_entries() {
            let _ = self.run(&["delete", "--force", &id]);
        }
    }
}

/// A busybox rootfs at `dir`.
pub fn make_busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing (install busybox-static)");
    }
    for sub in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).context("copy busybox")?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}
