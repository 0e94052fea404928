//! Harness for the OCI CLI tests: a private `husk --root`, busybox bundles, and a `Drop` that
//! force-deletes every container the test left.
//!
//! The bundles share one busybox rootfs (Debian's static `/bin/busybox` plus applet symlinks)
//! and differ in their `config.json`, made by `husk spec` and patched per test.

use crate::{vm_artifacts, wait_until, Artifacts, TempDir};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A husk `config.toml` for tests: this build's kernel, initramfs and VMM, 128 MiB guests, and
/// an agent timeout generous enough for a loaded rig.
///
/// Sandboxes start from templates (husk's default) unless `HUSK_TEST_WARM_START=0`, with
/// which the suites run a second time, booting every sandbox. `HUSK_TEST_DEBUG=1` turns husk's
/// `debug` on (the guest's console in each sandbox's vmm.log), for chasing a guest's fault.
pub fn husk_config_text(artifacts: &Artifacts) -> String {
    let mut text = format!(
        "kernel = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\ndefault_mem_mib = 128\nagent_timeout_ms = 600000\n",
        artifacts.kernel.display(),
        artifacts.initramfs.display(),
        artifacts.vmm.display()
    );
    if !warm_start() {
        text.push_str("warm_start = false\n");
    }
    if std::env::var("HUSK_TEST_DEBUG").is_ok_and(|v| v == "1") {
        text.push_str("debug = true\n");
    }
    text
}

/// Whether this run's sandboxes start from templates (see [`husk_config_text`]).
pub fn warm_start() -> bool {
    !std::env::var("HUSK_TEST_WARM_START").is_ok_and(|v| v == "0")
}

/// Process `pid`'s command line, its arguments joined by spaces.
pub fn cmdline_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// Asserts that the husk-vmm `pid` was restored from a template when this run starts sandboxes
/// warm and booted when not (a refused template is booted in its place, silently to the user).
pub fn assert_started_as_configured(pid: u32, what: &str) {
    let cmdline = cmdline_of(pid);
    assert_eq!(
        cmdline.contains(" --restore "),
        warm_start(),
        "{what}: restored from a template exactly when warm start is on ({}): {cmdline}",
        warm_start()
    );
}

/// The template directory husk-vmm `pid` was restored from (its `--restore` argument).
pub fn restored_from(pid: u32) -> Option<PathBuf> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = raw.split(|&b| b == 0);
    args.find(|a| *a == b"--restore")?;
    let dir = args.next()?;
    Some(PathBuf::from(String::from_utf8_lossy(dir).into_owned()))
}

/// How long one client command (husk, podman, docker) may take before the test kills it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `cmd` to completion with its output through files in `dir` (a pipe would never reach
/// EOF while a `husk-vmm` it started holds it); kills it after [`COMMAND_TIMEOUT`] and panics.
pub fn output_of(mut cmd: Command, dir: &Path) -> Output {
    let n = NEXT_OUTPUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = dir.join(format!("out.{n}"));
    let err_path = dir.join(format!("err.{n}"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {} s; stdout {:?}, stderr {:?}",
                COMMAND_TIMEOUT.as_secs(),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    output
}

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
        if !crate::skip::have_root("bind mounts into the sandbox share") {
            return None;
        }
        let env = OciEnv::build(artifacts).expect("set up the OCI test environment");
        Some(env)
    }

    fn build(artifacts: Artifacts) -> Result<OciEnv> {
        let root = TempDir::new("husk-oci-root")?;
        let work = TempDir::new("husk-oci-work")?;
        let config = work.path().join("config.toml");
        std::fs::write(&config, husk_config_text(&artifacts))?;
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

    /// Adds lines to the test's config.toml.
    pub fn append_config(&self, lines: &str) {
        let mut text = std::fs::read_to_string(&self.config).expect("read config.toml");
        text.push_str(lines);
        std::fs::write(&self.config, text).expect("write config.toml");
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
        output_of(self.husk(args), self.work.path())
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

    /// `husk create --pid-file` of `id` from `bundle`, which must succeed; returns the pid
    /// written (husk-vmm's, the container's pid on the host).
    pub fn create_with_pid(&self, id: &str, bundle: &Path) -> u32 {
        let pid_file = self.work.path().join(format!("{id}.pid"));
        let out = self.run(&[
            "create",
            "--bundle",
            bundle.to_str().expect("utf-8"),
            "--pid-file",
            pid_file.to_str().expect("utf-8"),
            id,
        ]);
        assert!(
            out.status.success(),
            "create {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pid_in(&pid_file)
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

    /// The tail of every container's `vmm.log` under the state root, for failure messages.
    pub fn logs(&self) -> String {
        logs_under(self.root.path())
    }

    /// Asserts that nothing of husk is left under this environment's root (`what` names the
    /// moment): no state, no mount, no husk-vmm (given 30 s to end).
    pub fn assert_nothing_left(&self, what: &str) {
        assert!(
            wait_until(Duration::from_secs(30), || self.vmms_left().is_empty()),
            "{what}: husk-vmm left: {:?}",
            self.vmms_left()
        );
        assert!(
            self.root_entries().is_empty(),
            "{what}: {:?}",
            self.root_entries()
        );
        assert!(
            self.mounts_left().is_empty(),
            "{what}: {:?}",
            self.mounts_left()
        );
        assert!(
            self.cgroups_left().is_empty(),
            "{what}: host cgroups left: {:?}",
            self.cgroups_left()
        );
    }

    /// The host cgroups (`husk-vmm`'s, in husk's default place for this environment's state
    /// root) still there.
    pub fn cgroups_left(&self) -> Vec<String> {
        let probe =
            husk::host_cgroup::relative_path(&serde_json::json!({}), self.root.path(), "ID")
                .expect("the default cgroup path");
        let (Some(parent), Some(name)) = (probe.parent(), probe.file_name()) else {
            panic!("default cgroup path {}", probe.display());
        };
        let prefix = name.to_string_lossy().trim_end_matches("ID").to_string();
        std::fs::read_dir(Path::new(husk::host_cgroup::CGROUP_ROOT).join(parent))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
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
    /// A `podman ARGS` command with this podman's storage and runtime.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(&self.args).args(args);
        cmd
    }

    /// Runs `podman ARGS` to completion (output through files, as [`OciEnv::run`]).
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        output_of(cmd, &self.dir)
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
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
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

/// `linux.resources` that husk ignores, each with a warning on the CLI's stderr and in the
/// shim's log (`runtime-shim`'s `drop_ignored_resources`).
pub fn ignored_resources() -> Value {
    serde_json::json!({
        "memory": {"swappiness": 10, "kernel": 1048576, "kernelTCP": 1048576},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
        "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]}
    })
}

/// What the warnings for [`ignored_resources`] name, one each.
pub const IGNORED_RESOURCE_WARNINGS: &[&str] = &[
    "memory.swappiness",
    "memory.kernel ",
    "memory.kernelTCP",
    "hugepageLimits",
    "resources.network",
];

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

/// Whether the client program `name` (podman, docker, dockerd) is installed. When it is not:
/// a failure where `HUSK_REQUIRE_KVM=1` (the rig installs every client), else a loud skip.
pub fn client_available(test: &str, name: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if found {
        return true;
    }
    crate::skip::skip(&format!("{test}: {name} is not installed"));
    false
}

impl OciEnv {
    /// A tarball of the busybox rootfs (for `podman import` / `docker import`).
    pub fn rootfs_tarball(&self) -> PathBuf {
        let tarball = self.work.path().join("rootfs.tar");
        if !tarball.exists() {
            let status = Command::new("tar")
                .arg("-C")
                .arg(&self.rootfs)
                .arg("-cf")
                .arg(&tarball)
                .arg(".")
                .status()
                .expect("tar");
            assert!(status.success(), "tar of the rootfs failed");
        }
        tarball
    }

    /// A [`OciEnv::podman`] with the busybox rootfs imported as `localhost/bb:latest`.
    pub fn podman_with_busybox(&self) -> Podman {
        let podman = self.podman();
        let tarball = self.rootfs_tarball();
        let out = podman.run(&[
            "import",
            tarball.to_str().expect("utf-8"),
            "localhost/bb:latest",
        ]);
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        podman
    }

    /// The busybox rootfs the bundles use (tests may add files to it).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// A script that runs this husk with this environment's configuration and every argument
    /// it is given (the engine passes its own `--root`); engines pass no environment through,
    /// so it also carries the seccomp lists' development mode (`HUSK_VMM_SECCOMP`) when set.
    pub fn runtime_wrapper(&self, path: &Path) -> PathBuf {
        let seccomp = match std::env::var(husk_vmm::seccomp::MODE_ENV) {
            Ok(mode) if mode.chars().all(|c| c.is_ascii_alphanumeric()) => {
                format!(" {}={mode}", husk_vmm::seccomp::MODE_ENV)
            }
            _ => String::new(),
        };
        std::fs::write(
            path,
            format!(
                "#!/bin/sh\nexec env HUSK_CONFIG='{}'{seccomp} '{}' \"$@\"\n",
                self.config.display(),
                self.husk.display(),
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.to_path_buf()
    }
}

/// The tails of the `vmm.log` files of husk's state dirs under `root`.
pub fn logs_under(root: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path().join("vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        text.push_str(&format!(
            "--- {}:\n{}\n",
            entry.path().display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        ));
    }
    text
}

/// husk's container state dirs (those holding a `plan.json`) anywhere under `dir`: where an
/// engine's `--root` put them.
pub fn husk_state_dirs(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) {
        if dir.join("plan.json").is_file() {
            found.push(dir.to_path_buf());
            return;
        }
        if depth == 0 {
            return;
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, 8, &mut found);
    found
}

/// Live `husk-vmm` processes whose command line mentions `path` (their state dir lives there).
pub fn vmms_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("husk-vmm") && cmdline.contains(&needle) && crate::process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points under `path` (by its real path).
pub fn mounts_under(path: &Path) -> Vec<String> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let prefix = real.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Sets RLIMIT_NOFILE of the command's process (and so of everything it starts) before it
/// runs: how an engine whose own hard limit is below the spec's runs the runtime.
pub fn with_nofile_limit(cmd: &mut Command, soft: u64, hard: u64) {
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, on a stack value.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A program running on a fresh pty (its controlling terminal), as a user at a terminal runs
/// `podman run -it`. A thread collects everything the program writes.
pub struct PtySession {
    child: Child,
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    /// Set by the reader thread when the pty has no replica left (every writer gone).
    drained: Arc<std::sync::atomic::AtomicBool>,
}

fn set_cloexec(fd: &OwnedFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        bail!("fcntl: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl PtySession {
    /// Spawns `cmd` with a new session whose controlling terminal is a new pty (80x24).
    pub fn spawn(mut cmd: Command) -> Result<PtySession> {
        let mut master: libc::c_int = -1;
        let mut replica: libc::c_int = -1;
        let size = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the out-pointers are valid for the call; no name buffer, default termios.
        let ret = unsafe {
            libc::openpty(
                &mut master,
                &mut replica,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        if ret != 0 {
            bail!("openpty: {}", std::io::Error::last_os_error());
        }
        // SAFETY: openpty returned this new fd; nothing else owns it.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        // SAFETY: as above.
        let replica = unsafe { OwnedFd::from_raw_fd(replica) };
        set_cloexec(&master)?;
        set_cloexec(&replica)?;
        cmd.stdin(Stdio::from(replica.try_clone()?))
            .stdout(Stdio::from(replica.try_clone()?))
            .stderr(Stdio::from(replica.try_clone()?));
        // SAFETY: the closure only calls setsid and ioctl, both async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning on the pty")?;
        drop(replica);
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone()?;
        let sink = Arc::clone(&output);
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::clone(&drained);
        // Detached: it ends when the last replica closes (EIO), or with the test process.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&buf[..n]),
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(PtySession {
            child,
            master,
            output,
            drained,
        })
    }

    /// Everything the program wrote so far, with `\r` removed.
    pub fn output(&self) -> String {
        let bytes = self
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.output().contains(needle))
    }

    /// Types `text` at the terminal.
    pub fn write(&mut self, text: &str) -> Result<()> {
        self.master.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Waits for the program to exit (killing it after `timeout`), then for what it wrote last
    /// to be read off the pty: the exit can be seen before the reader thread has drained the
    /// master. A descendant that keeps the replica open ends that second wait after 5 s.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                wait_until(Duration::from_secs(5), || {
                    self.drained.load(std::sync::atomic::Ordering::SeqCst)
                });
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the program on the pty did not exit within {} s; output: {:?}",
                    timeout.as_secs(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `dockerd` of the test's own: its own data root, exec root, pid file and socket, no
/// iptables and no bridge, vfs storage, and `husk` registered as a runtime (through a wrapper
/// that gives husk the test's configuration). It starts its own containerd.
pub struct Dockerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub exec_root: PathBuf,
    pub data_root: PathBuf,
}

impl Dockerd {
    /// Starts dockerd in `dir` without networks of its own (no bridge, no iptables) and waits
    /// (up to `timeout`) until it answers.
    pub fn start(dir: &Path, husk_runtime: &Path, timeout: Duration) -> Result<Dockerd> {
        Dockerd::start_with(dir, husk_runtime, timeout, false)
    }

    /// [`Dockerd::start`], with docker's default bridge network and its iptables rules when
    /// `bridge` is set.
    pub fn start_with(
        dir: &Path,
        husk_runtime: &Path,
        timeout: Duration,
        bridge: bool,
    ) -> Result<Dockerd> {
        std::fs::create_dir_all(dir)?;
        let data_root = dir.join("data");
        let exec_root = dir.join("exec");
        let socket = dir.join("docker.sock");
        let config = dir.join("daemon.json");
        std::fs::write(
            &config,
            serde_json::json!({"runtimes": {"husk": {"path": husk_runtime}}}).to_string(),
        )?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(if bridge {
                &["--storage-driver=vfs"][..]
            } else {
                &[
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--storage-driver=vfs",
                ][..]
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning dockerd")?;
        let mut dockerd = Dockerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            exec_root,
            data_root,
        };
        let up = wait_until(timeout, || {
            let exited = dockerd
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            exited || (dockerd.socket.exists() && dockerd.docker(&["version"]).status.success())
        });
        let exited = dockerd
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            bail!("dockerd exited with {status}: {}", dockerd.log_tail());
        }
        if !up {
            bail!(
                "dockerd did not answer within {} s: {}",
                timeout.as_secs(),
                dockerd.log_tail()
            );
        }
        Ok(dockerd)
    }

    /// The last lines of dockerd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `docker ARGS` against this daemon (output through files).
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", self.dir.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null());
        output_of(cmd, &self.dir)
    }

    /// Stops dockerd with SIGTERM and waits for it (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("dockerd was already stopped");
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on our own child, not yet reaped (we hold its `Child`).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "dockerd did not stop within {} s of SIGTERM: {}",
                    timeout.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Dockerd {
    /// Stops dockerd (which must exit 0) and checks that husk left nothing of its containers:
    /// no husk-vmm naming its exec root (given 30 s to go), no husk state directory under the
    /// exec root, no mount under the exec or the data root.
    pub fn stop_and_assert_clean(&mut self, timeout: Duration) {
        let status = self.stop(timeout).expect("stop dockerd");
        assert!(status.success(), "dockerd: {status}");
        assert!(
            crate::wait_until(Duration::from_secs(30), || vmms_mentioning(&self.exec_root)
                .is_empty()),
            "husk-vmm left: {:?}",
            vmms_mentioning(&self.exec_root)
        );
        let left = husk_state_dirs(&self.exec_root);
        assert!(left.is_empty(), "husk state left: {left:?}");
        let mounts: Vec<_> = mounts_under(&self.exec_root)
            .into_iter()
            .chain(mounts_under(&self.data_root))
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
            let _ = self.stop(Duration::from_secs(60));
        }
    }
}

/// The pid a `--pid-file` holds (as `u32` or `libc::pid_t`).
pub fn pid_in<T: std::str::FromStr>(pid_file: &Path) -> T
where
    T::Err: std::fmt::Debug,
{
    std::fs::read_to_string(pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_session_is_a_controlling_terminal() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "tty; [ -t 0 ] && echo stdin-is-a-tty; printf 'ready\\n'; read x; echo \"got $x\"; exit 3",
        ]);
        let mut session = PtySession::spawn(cmd).expect("spawn");
        assert!(
            session.wait_for("ready\n", Duration::from_secs(30)),
            "{:?}",
            session.output()
        );
        session.write("hello\n").expect("write");
        let status = session.wait(Duration::from_secs(30)).expect("wait");
        assert_eq!(status.code(), Some(3));
        let output = session.output();
        assert!(output.starts_with("/dev/pts/"), "{output:?}");
        assert!(output.contains("stdin-is-a-tty\n"), "{output:?}");
        // The pty echoes what is typed, then the shell answers.
        assert!(output.contains("hello\ngot hello\n"), "{output:?}");
    }

    #[test]
    fn nofile_limit_applies_to_the_child() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ulimit -Sn; ulimit -Hn"]);
        with_nofile_limit(&mut cmd, 512, 2000);
        let out = cmd.output().expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "512\n2000\n");
    }
}
