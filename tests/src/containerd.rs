//! Harness for the containerd tests: a containerd of the test's own (own root, state, socket,
//! config; no system service), a busybox OCI image built by the test and imported with `ctr`,
//! and checks that nothing of a namespace is left (shims, VMMs, mounts, sockets, state).
//!
//! containerd finds `containerd-shim-husk-v2` on its `PATH` (the rig puts husk's binaries in
//! `/work/bin`, first on `PATH`) and passes its environment on to the shim, so the shim gets
//! the test's husk configuration through `HUSK_CONFIG`.

use crate::oci::{client_available, husk_config_text, make_busybox_rootfs, mounts_under};
use crate::{vm_artifacts, wait_until, Artifacts, TempDir};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The runtime type of husk's shim.
pub const RUNTIME: &str = "io.containerd.husk.v2";
/// The name the test image is imported as.
pub const IMAGE: &str = "docker.io/husk/busybox:test";
/// Where the shim keeps its sandboxes (per containerd namespace).
pub const SHIM_ROOT: &str = "/run/husk-shim";

static NEXT_OUTPUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A running containerd of the test's own.
pub struct Containerd {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    /// The containerd namespace the test uses (unique per test).
    pub namespace: String,
    pub artifacts: Artifacts,
}

impl Containerd {
    /// Starts containerd for `test` in namespace `namespace`, or `None` (loudly) where VM tests
    /// cannot run, this is not root, or containerd is not installed.
    pub fn start(test: &str, namespace: &str) -> Option<Containerd> {
        let artifacts = Containerd::available(test)?;
        Some(Containerd::launch(artifacts, namespace, None).expect("start containerd"))
    }

    /// [`Containerd::start`] with `env` set for containerd, and so for its shims and VMMs.
    pub fn start_with_env(test: &str, namespace: &str, env: &[(&str, &str)]) -> Option<Containerd> {
        let artifacts = Containerd::available(test)?;
        Some(Containerd::launch_with(artifacts, namespace, None, env).expect("start containerd"))
    }

    /// Whether the VM tests can run a containerd here (they skip loudly where not).
    pub fn available(test: &str) -> Option<Artifacts> {
        let artifacts = vm_artifacts(test)?;
        if !crate::skip::have_root("containerd and its shims") {
            return None;
        }
        if !client_available(test, "containerd") || !client_available(test, "ctr") {
            return None;
        }
        Some(artifacts)
    }

    /// Starts containerd in `dir`-relative root and state; `cri` is the CRI plugin's config
    /// section (the plugin is disabled when `None`), in which `{dir}` stands for the
    /// containerd's own directory.
    pub fn launch(artifacts: Artifacts, namespace: &str, cri: Option<&str>) -> Result<Containerd> {
        Containerd::launch_with(artifacts, namespace, cri, &[])
    }

    /// [`Containerd::launch`] with `env` added to containerd's environment.
    pub fn launch_with(
        artifacts: Artifacts,
        namespace: &str,
        cri: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Containerd> {
        let dir = TempDir::new("husk-ctrd")?;
        let socket = dir.path().join("containerd.sock");
        let husk_config = dir.path().join("husk.toml");
        std::fs::write(&husk_config, husk_config_text(&artifacts))?;
        let config = dir.path().join("config.toml");
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.devmapper",
        ];
        if cri.is_none() {
            disabled.push("io.containerd.grpc.v1.cri");
        }
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = {disabled:?}

[grpc]
  address = "{socket}"

[debug]
  level = "debug"
{cri}"#,
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                socket = socket.display(),
                cri = cri
                    .unwrap_or_default()
                    .replace("{dir}", &dir.path().display().to_string()),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("HUSK_CONFIG", &husk_config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd")?;
        let mut ctrd = Containerd {
            child: Some(child),
            dir,
            socket,
            namespace: namespace.to_string(),
            artifacts,
        };
        let timeout = Duration::from_secs(120);
        let up = wait_until(timeout, || {
            ctrd.exited().is_some()
                || (ctrd.socket.exists() && ctrd.ctr(&["version"], None).status.success())
        });
        if let Some(status) = ctrd.exited() {
            bail!("containerd exited with {status}: {}", ctrd.log_tail());
        }
        if !up {
            bail!(
                "containerd did not answer within {timeout:?}: {}",
                ctrd.log_tail()
            );
        }
        Ok(ctrd)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last lines of containerd's log (which carries the shims' logs too).
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// How many bytes containerd's log holds now (for [`Self::log_since`]).
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(self.dir.path().join("containerd.log")).map_or(0, |m| m.len())
    }

    /// What containerd's log (with the shims' logs) gained after its first `from` bytes.
    pub fn log_since(&self, from: u64) -> String {
        let text = std::fs::read(self.dir.path().join("containerd.log")).unwrap_or_default();
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }

    /// The lines of containerd's log (with the shims' logs) that mention `needle`, at most the
    /// last 150.
    pub fn log_mentioning(&self, needle: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        lines[lines.len().saturating_sub(150)..].join("\n")
    }

    /// `ctr --address SOCKET --namespace NS ARGS`, with `stdin` as its standard input
    /// (`/dev/null` when `None`), output through files, killed after five minutes.
    pub fn ctr(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let n = NEXT_OUTPUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out_path = self.dir.path().join(format!("out.{n}"));
        let err_path = self.dir.path().join(format!("err.{n}"));
        let stdin_file = match stdin {
            Some(data) => {
                let path = self.dir.path().join(format!("in.{n}"));
                std::fs::write(&path, data).expect("stdin file");
                Stdio::from(std::fs::File::open(&path).expect("stdin file"))
            }
            None => Stdio::null(),
        };
        let mut child = self
            .ctr_command(args)
            .stdin(stdin_file)
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("spawn ctr");
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for ctr") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                break child.wait().expect("wait for ctr");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        }
    }

    /// The `ctr` command line for this containerd and namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// `ctr ARGS`, which must succeed; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args, None);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds the busybox OCI image and imports it as [`IMAGE`].
    pub fn import_busybox(&self) -> Result<()> {
        self.import_image(
            IMAGE,
            json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
        )
    }

    /// Builds a busybox OCI image whose image config is `config` and imports it as `name`.
    pub fn import_image(&self, name: &str, config: serde_json::Value) -> Result<()> {
        let tar = build_busybox_image(self.dir.path(), name, config)?;
        let out = self.ctr(
            &[
                "images",
                "import",
                "--platform",
                "linux/amd64",
                &tar.display().to_string(),
            ],
            None,
        );
        if !out.status.success() {
            bail!(
                "ctr images import failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        let images = self.ctr_ok(&["images", "ls", "-q"]);
        if !images.lines().any(|l| l.trim() == name) {
            bail!("the imported image is not listed as {name}: {images:?}");
        }
        Ok(())
    }

    /// The husk-vmm processes of this namespace's sandboxes.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let shim_state = Path::new(SHIM_ROOT).join(&self.namespace);
        processes_mentioning(&["husk-vmm", &shim_state.display().to_string()])
    }

    /// What is left of this namespace's husk sandboxes: shim and VMM processes, mounts under
    /// the shim's state and containerd's, the shim's state directory entries.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let shim_state = Path::new(SHIM_ROOT).join(&self.namespace);
        for pid in processes_mentioning(&[
            "containerd-shim-husk-v2",
            &self.socket.display().to_string(),
        ]) {
            left.push(format!("shim process {pid}"));
        }
        for pid in self.vmm_pids() {
            left.push(format!("husk-vmm process {pid}"));
        }
        for mount in mounts_under(&shim_state) {
            left.push(format!("mount {mount}"));
        }
        for mount in mounts_under(self.dir.path()) {
            left.push(format!("mount {mount}"));
        }
        if let Ok(entries) = std::fs::read_dir(&shim_state) {
            for entry in entries.flatten() {
                left.push(format!("state {}", entry.path().display()));
            }
        }
        left
    }

    /// The ttrpc socket of the shim serving sandbox `id`: containerd's shim socket naming,
    /// `/run/containerd/s/<sha256 of "<address>/<namespace>/<id>">`.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let key = self.socket.join(&self.namespace).join(id);
        let digest = digest(
            key.display().to_string().as_bytes(),
            &self.dir.path().join("digest.tmp"),
        )
        .expect("sha256");
        Path::new("/run/containerd/s").join(digest.trim_start_matches("sha256:"))
    }

    /// Stops containerd (SIGTERM, then SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold its `Child`).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Best effort: kill what the test left in this namespace, then containerd.
        let tasks = self.ctr(&["tasks", "ls", "-q"], None);
        for id in String::from_utf8_lossy(&tasks.stdout).lines() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id.trim()], None);
            let _ = self.ctr(&["tasks", "delete", "-f", id.trim()], None);
        }
        self.stop(Duration::from_secs(20));
        for pid in processes_mentioning(&["husk-vmm", &format!("{SHIM_ROOT}/{}/", self.namespace)])
        {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) of a leftover VMM of this test; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for mount in mounts_under(self.dir.path()) {
            if let Ok(path) = std::ffi::CString::new(mount) {
                // SAFETY: umount2 with a valid NUL-terminated path.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Live processes whose command line contains every one of `needles`.
pub fn processes_mentioning(needles: &[&str]) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if needles.iter().all(|n| cmdline.contains(n)) && crate::process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// `sha256:<hex>` of `data` (via coreutils' `sha256sum`).
fn digest(data: &[u8], scratch: &Path) -> Result<String> {
    std::fs::write(scratch, data)?;
    let out = Command::new("sha256sum").arg(scratch).output()?;
    if !out.status.success() {
        bail!("sha256sum failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or("");
    if hex.len() != 64 {
        bail!("sha256sum printed {text:?}");
    }
    Ok(format!("sha256:{hex}"))
}

/// Builds an OCI image layout tarball of a busybox image (one uncompressed layer with Debian's
/// static busybox and its applet links) named `name`, with `config` as the image config's
/// `config` (command, environment), in `dir`; returns the tarball's path.
pub fn build_busybox_image(dir: &Path, name: &str, config: serde_json::Value) -> Result<PathBuf> {
    let key = digest(name.as_bytes(), &dir.join("digest.tmp"))?;
    let work = dir.join(format!("image-{}", &key["sha256:".len()..][..12]));
    let rootfs = work.join("rootfs");
    make_busybox_rootfs(&rootfs)?;
    let layer = work.join("layer.tar");
    let status = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()?;
    if !status.success() {
        bail!("tar of the rootfs failed");
    }
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let scratch = work.join("scratch");
    let put = |data: &[u8]| -> Result<(String, usize)> {
        let digest = digest(data, &scratch)?;
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hex), data)?;
        Ok((digest, data.len()))
    };
    let layer_data = std::fs::read(&layer)?;
    let (layer_digest, layer_size) = put(&layer_data)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes())?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "test",
            },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tarball = work.join("busybox-oci.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"])
        .status()?;
    if !status.success() {
        bail!("tar of the image layout failed");
    }
    Ok(tarball)
}
