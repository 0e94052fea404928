//! The test rig: a small Debian VM ("L2") under QEMU's emulator (TCG) with emulated AMD SVM, in
//! which `kvm_amd` gives real KVM to husk's microVMs (L3).
//!
//! Why: the development and CI machines are VMs whose `/dev/kvm` is `kvm_pvm`, a paravirtual
//! nested KVM that cannot run a Linux guest's user space. QEMU's TCG emulates SVM with nested
//! paging, so a Debian VM under it loads `kvm_amd` and runs real KVM guests, about 20x slower than
//! native. Performance is therefore only ever compared between runtimes measured in the same rig
//! run.
//!
//! The root image is built once (debootstrap + `mkfs.ext4 -d`, no loop mounts) and cached outside
//! the clone, keyed by a hash of its inputs. Each `rig run` writes a fresh work disk (label
//! `husk-rig-work`) holding the command and the files it needs, boots L2 with the root image
//! read-only (`snapshot=on`), streams the console, reads the exit code and the files the command
//! left in `$HUSK_RIG_OUT` back from the work disk (debugfs, again no mounts), and powers off.

use crate::cpio::CpioWriter;
use crate::rig_console::{self, L2Faults};
use crate::util::{self, apt_install, cache_dir, describe, hash_inputs, run, write_atomic};
use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian packages in the L2 image: the one place to extend when a test needs a tool in L2.
pub const RIG_PACKAGES: &[&str] = &[
    // The L2 kernel (its virtio and KVM drivers are modules) and what loads them.
    "linux-image-cloud-amd64",
    "kmod",
    // Networking for tests and the later TAP work.
    "iproute2",
    // The rig's own initramfs takes its busybox from here; also handy in tests.
    "busybox-static",
    // QEMU inside L2: the L3 smoke test and the boot benchmark's peer (QEMU microvm).
    "qemu-system-x86",
    // ps, pgrep, pkill, free: tests check that nothing is left running.
    "procps",
    // blkid (find the work disk by label), setsid -c for `rig shell`.
    "util-linux",
    "e2fsprogs",
    // Real OCI clients and peer runtimes for the OCI tests and benchmarks (gVisor's runsc is
    // in bookworm-backports, not bookworm: `bench_oci::fetch_runsc` brings it in when needed).
    "podman",
    // podman's containers-common needs a `container-network-stack`, a virtual package that
    // debootstrap does not resolve: name the CNI plugins.
    "containernetworking-plugins",
    "docker.io",
    "runc",
    "crun",
];

/// Modules the L2 initramfs loads (with what they depend on, from the kernel's `modules.dep`)
/// to reach its disks. KVM itself is loaded later from the root disk with modprobe.
const INITRAMFS_MODULES: &[&str] = &["virtio_mmio", "virtio_blk"];

const INITRAMFS_INIT: &str = include_str!("../rig/initramfs-init.sh");
const RIG_INIT: &str = include_str!("../rig/rig-init.sh");
/// Bump when the way the image is assembled changes in a way the inputs above do not show.
const RIG_FORMAT: &str = "husk-rig-v2";

const ROOT_LABEL: &str = "husk-rig-root";
const WORK_LABEL: &str = "husk-rig-work";

/// A built rig: the cached files QEMU boots.
pub struct RigImage {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
}

fn rig_key(config: &RigConfig) -> String {
    let packages = RIG_PACKAGES.join("\n");
    let modules = INITRAMFS_MODULES.join("\n");
    hash_inputs([
        ("format", RIG_FORMAT.as_bytes()),
        ("packages", packages.as_bytes()),
        ("modules", modules.as_bytes()),
        ("initramfs-init", INITRAMFS_INIT.as_bytes()),
        ("rig-init", RIG_INIT.as_bytes()),
        ("l2-kernel-suite", config.l2_kernel_suite.as_bytes()),
    ])
}

/// Tools the host needs to build and run the rig.
/// QEMU itself comes from the configured suite (see [`install_host_qemu`]).
const HOST_PACKAGES: &[&str] = &["debootstrap", "e2fsprogs", "lz4", "xz-utils", "zstd"];

/// Builds the rig image if the cache does not hold one for the current inputs.
pub fn build() -> Result<RigImage> {
    let config = RigConfig::from_env()?;
    install_host_qemu(&config)?;
    let key = rig_key(&config);
    let rig_root = cache_dir()?.join("rig");
    let dir = rig_root.join(&key[..16]);
    let image = RigImage {
        vmlinux: dir.join("vmlinux"),
        initrd: dir.join("initrd.cpio"),
        root: dir.join("root.ext4"),
    };
    if dir.join("ready").exists() {
        return Ok(image);
    }
    // One builder at a time (parallel `cargo xtask` runs); a waiter finds the image ready.
    std::fs::create_dir_all(&rig_root)?;
    let _lock = util::lock_file(&rig_root.join("lock"))?;
    if dir.join("ready").exists() {
        return Ok(image);
    }
    let started = Instant::now();
    eprintln!(
        "xtask: building the test rig image {} (once per set of inputs)",
        dir.display()
    );
    let work = rig_root.join(format!("{}.building", &key[..16]));
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("removing stale {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let rootfs = work.join("rootfs");

    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--include={}", RIG_PACKAGES.join(",")))
        .arg("bookworm")
        .arg(&rootfs);
    if let Some(mirror) = host_debian_mirror() {
        debootstrap.arg(mirror);
    }
    run(&mut debootstrap)?;

    // Our init, and a smaller image: the .deb files are not needed once installed.
    let init_dir = rootfs.join("husk-rig");
    std::fs::create_dir_all(&init_dir)?;
    std::fs::write(init_dir.join("init"), RIG_INIT)?;
    set_mode(&init_dir.join("init"), 0o755)?;
    let debs = rootfs.join("var/cache/apt/archives");
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            std::fs::remove_file(&path)?;
        }
    }

    if config.l2_kernel_suite != "bookworm" {
        replace_kernel(&rootfs, &config.l2_kernel_suite, &work.join("apt"))?;
    }

    std::fs::create_dir_all(&dir)?;
    let (kernel_version, vmlinuz) = find_kernel(&rootfs)?;
    extract_vmlinux(&vmlinuz, &work.join("vmlinux"))?;
    write_initrd(&rootfs, &kernel_version, &work.join("initrd.cpio"))?;
    make_ext4(&rootfs, ROOT_LABEL, 1536, &work.join("root.ext4"))?;

    for name in ["vmlinux", "initrd.cpio", "root.ext4"] {
        std::fs::rename(work.join(name), dir.join(name))?;
    }
    std::fs::remove_dir_all(&work)?;
    write_atomic(
        &dir.join("ready"),
        format!("kernel {kernel_version}\nkey {key}\n").as_bytes(),
    )?;
    // Images of other inputs only take disk space, once they have not been built for two
    // weeks (a soak comparing configurations switches between a few of them).
    let stale = std::time::SystemTime::now() - Duration::from_secs(14 * 24 * 3600);
    for entry in std::fs::read_dir(&rig_root)? {
        let path = entry?.path();
        let built = std::fs::metadata(path.join("ready")).and_then(|m| m.modified());
        if path != dir && path.is_dir() && built.map_or(true, |t| t < stale) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    eprintln!(
        "xtask: rig image built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// The Debian mirror the host's apt uses, so that the rig comes from the same place.
pub fn host_debian_mirror() -> Option<String> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            texts.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    texts.iter().find_map(|t| parse_debian_mirror(t))
}

/// Finds the first plain Debian archive URI (not the security archive) in apt sources, in either
/// the one-line or the deb822 format.
fn parse_debian_mirror(text: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        let uri = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().next()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace().find(|w| w.contains("://"))
        } else {
            None
        };
        if let Some(uri) = uri {
            if uri.ends_with("/debian") || uri.ends_with("/debian/") {
                return Some(uri.to_string());
            }
        }
    }
    None
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Replaces L2's kernel (bookworm's, which debootstrap installed) with the cloud kernel of
/// `suite`: its package is unpacked into the root (no maintainer scripts: the rig makes its own
/// initramfs), its module index made with `depmod`, and bookworm's kernel removed.
fn replace_kernel(rootfs: &Path, suite: &str, apt_dir: &Path) -> Result<()> {
    let apt = crate::debian::PrivateApt::new(apt_dir, suite)?;
    let image = apt
        .depends("linux-image-cloud-amd64")?
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("linux-image-cloud-amd64 in {suite} names no kernel package"))?;
    let deb = apt.download(&image)?;
    for entry in std::fs::read_dir(rootfs.join("boot"))? {
        let path = entry?.path();
        std::fs::remove_file(&path)
            .or_else(|_| std::fs::remove_dir_all(&path))
            .with_context(|| format!("removing {}", path.display()))?;
    }
    let modules = rootfs.join("lib/modules");
    if modules.exists() {
        std::fs::remove_dir_all(&modules)?;
    }
    // Unpacked beside the root and copied in: unpacking into it could replace the merged-/usr
    // symlinks (`/lib -> usr/lib`) with folders.
    let unpacked = apt_dir.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    std::fs::create_dir_all(&modules)?;
    for (from, to) in [
        ("boot/.", rootfs.join("boot")),
        ("lib/modules/.", modules.clone()),
        ("usr/lib/modules/.", modules.clone()),
    ] {
        if unpacked.join(from).exists() {
            run(Command::new("cp")
                .arg("-a")
                .arg(unpacked.join(from))
                .arg(&to))?;
        }
    }
    let (version, _) = find_kernel(rootfs)?;
    // The root's own depmod (kmod is one of its packages): the host need not have one.
    run(Command::new("chroot")
        .arg(rootfs)
        .args(["/usr/sbin/depmod", "-a"])
        .arg(&version))?;
    eprintln!("xtask: L2 runs kernel {version} from {suite}");
    Ok(())
}

fn find_kernel(rootfs: &Path) -> Result<(String, PathBuf)> {
    for entry in std::fs::read_dir(rootfs.join("boot"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            return Ok((version.to_string(), path));
        }
    }
    bail!("no vmlinuz-* in {}/boot", rootfs.display())
}

/// Extracts the ELF `vmlinux` from a bzImage, which QEMU's microvm machine boots through its PVH
/// note without any firmware.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let data = std::fs::read(bzimage)?;
    let payload = bzimage_payload(&data)
        .with_context(|| format!("{} is not a bzImage we can read", bzimage.display()))?;
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => bail!("{}: unknown kernel compression", bzimage.display()),
    };
    // The build appends the uncompressed size (4 bytes) after the stream; the tools don't want it.
    let stream = &payload[..payload.len().saturating_sub(4)];
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let input = stream.to_vec();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let mut elf = Vec::new();
    child
        .stdout
        .take()
        .context("decompressor stdout")?
        .read_to_end(&mut elf)?;
    child.wait()?;
    let _ = feeder.join();
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "decompressed kernel of {} is not an ELF file",
        bzimage.display()
    );
    write_atomic(out, &elf)
}

/// The compressed kernel inside a bzImage, located through the setup header (boot protocol >= 2.08).
fn bzimage_payload(data: &[u8]) -> Result<&[u8]> {
    ensure!(data.len() > 0x250, "file too short");
    ensure!(&data[0x202..0x206] == b"HdrS", "no setup header magic");
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let start = (setup_sects + 1) * 512 + word(0x248) as usize;
    let len = word(0x24c) as usize;
    data.get(start..start + len)
        .context("payload lies outside the file")
}

/// The L2 initramfs: busybox, the virtio drivers the cloud kernel keeps as modules, and our init.
fn write_initrd(rootfs: &Path, kernel_version: &str, out: &Path) -> Result<()> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        w.dir(dir, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    let busybox = std::fs::read(rootfs.join("bin/busybox"))
        .context("busybox-static missing from the rig rootfs")?;
    w.file("bin/busybox", 0o755, &busybox)?;
    w.file("init", 0o755, INITRAMFS_INIT.as_bytes())?;
    let mut order = String::new();
    let modules = rootfs.join("lib/modules").join(kernel_version);
    let deps = std::fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("modules.dep missing for kernel {kernel_version}"))?;
    for module in module_load_order(&deps, INITRAMFS_MODULES)? {
        let path = modules.join(&module);
        let mut bytes = std::fs::read(&path)
            .with_context(|| format!("module {module} missing for kernel {kernel_version}"))?;
        // busybox's insmod takes plain modules only; newer Debian kernels compress theirs.
        let tool = if module.ends_with(".ko.xz") {
            Some("xz")
        } else if module.ends_with(".ko.zst") {
            Some("zstd")
        } else {
            None
        };
        if let Some(tool) = tool {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(&path)
                .output()
                .with_context(|| format!("spawning {tool}"))?;
            ensure!(out.status.success(), "{tool} -dc {module} failed");
            bytes = out.stdout;
        }
        let file = Path::new(&module)
            .file_name()
            .expect("module paths name a file")
            .to_string_lossy();
        let name = format!("{}.ko", file.split(".ko").next().unwrap_or(&file));
        w.file(&format!("modules/{name}"), 0o644, &bytes)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.file("modules.order", 0o644, order.as_bytes())?;
    write_atomic(out, &w.finish()?)
}

/// The module files (paths relative to the kernel's module folder) to load, in order, for the
/// modules `wanted` and everything they depend on, from `modules.dep`. A module that is not in
/// `modules.dep` must be built into the kernel; that is checked by the boot, which fails
/// to find its disk otherwise.
fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let stem = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut order: Vec<String> = Vec::new();
    for name in wanted {
        let Some((module, deps)) = modules_dep.lines().find_map(|l| {
            let (m, d) = l.split_once(':')?;
            (stem(m) == name.replace('-', "_")).then_some((m.trim(), d))
        }) else {
            continue;
        };
        // modules.dep lists every dependency, the deepest last: load them from the end.
        for dep in deps.split_whitespace().rev().chain(std::iter::once(module)) {
            if !order.iter().any(|o| o == dep) {
                order.push(dep.to_string());
            }
        }
    }
    ensure!(
        !order.is_empty() || wanted.is_empty(),
        "none of the modules {wanted:?} is in modules.dep"
    );
    Ok(order)
}

/// Writes `dir` into a new ext4 image of its size plus `extra_mib`, without mounting anything.
fn make_ext4(dir: &Path, label: &str, extra_mib: u64, out: &Path) -> Result<()> {
    let used_kib: u64 = util::output(
        Command::new("du")
            .args(["-s", "-k", "--apparent-size"])
            .arg(dir),
    )?
    .split_whitespace()
    .next()
    .and_then(|s| s.parse().ok())
    .context("parsing du output")?;
    let size_mib = used_kib * 5 / 4 / 1024 + extra_mib;
    let _ = std::fs::remove_file(out);
    let file = std::fs::File::create(out)?;
    file.set_len(size_mib << 20)?;
    drop(file);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(out))
}

/// What a rig run needs: files to bring in, a command, how long it may take.
pub struct RigRun {
    /// `(source, destination inside /work)`; directories are copied whole.
    pub inputs: Vec<(PathBuf, String)>,
    /// Shell text run by bash in /work; `None` opens an interactive shell.
    pub script: Option<String>,
    /// Extra `export` lines for the command's environment.
    pub env: Vec<(String, String)>,
    /// Host folder that receives what the command wrote to `$HUSK_RIG_OUT`.
    pub out_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// Console lines starting with this are kept in [`RigReport::collected`].
    pub collect_prefix: Option<String>,
    /// Free space on the work disk beyond its inputs, in MiB (the image is sparse).
    pub work_free_mib: u64,
    /// L2's memory in MiB, when the job needs other than `HUSK_RIG_MEM_MIB` or 6 GiB.
    pub mem_mib: Option<u64>,
    /// L2's CPU count, when the job needs other than the configured one (the rest of the
    /// configuration stays: multi-threaded TCG, one host thread per L2 CPU). Two L2 CPUs ran
    /// 300 L3 boots with one L2 fault, an `int3` oops while L2 patched its text, which the
    /// test run retries as a proven rig fault. Single-threaded TCG (`HUSK_RIG_TCG=single`) is
    /// worse with two: an L3 guest now and then spins for ever in
    /// `ktime_get_update_offsets_now` on a timekeeping sequence count left odd, as if an
    /// interrupt had been delivered inside its interrupts-off write section.
    pub l2_cpus: Option<u32>,
}

impl RigRun {
    /// A run of `script` with `inputs` and `env`, bounded by the rig timeout.
    pub fn new(
        inputs: Vec<(PathBuf, String)>,
        script: Option<String>,
        env: Vec<(String, String)>,
    ) -> RigRun {
        RigRun {
            inputs,
            script,
            env,
            out_dir: None,
            timeout: crate::testing::rig_timeout(),
            collect_prefix: None,
            work_free_mib: 1024,
            mem_mib: None,
            l2_cpus: None,
        }
    }
}

/// How a rig run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RigEnd {
    /// The command ran to its end and exited with this code.
    Finished(i32),
    /// L2's heartbeat stopped (see [`rig_console::HEARTBEAT_LIMIT`]); the host sent it an NMI
    /// and, if it did not panic, killed QEMU.
    Wedged,
    /// L2 died (a panic, QEMU gone) before the command finished.
    Died,
    /// The run's time limit passed; QEMU was killed.
    TimedOut,
}

/// What a rig run did and what L2 said about itself meanwhile.
pub struct RigReport {
    pub end: RigEnd,
    pub faults: L2Faults,
    /// L2's uptime when its init started the command.
    pub l2_up_s: Option<f64>,
    /// From QEMU's start to its end.
    pub elapsed: Duration,
    /// Console lines matching [`RigRun::collect_prefix`].
    pub collected: Vec<String>,
    /// Hang reports the command left (`out/hang-*.txt`, see `testing::RUN_TEST_FN`), by file name.
    pub hang_reports: Vec<(String, String)>,
    /// L2 wedged and did not answer the NMI the host sent it (see `rig_console::ConsoleEnd`).
    pub nmi_unanswered: bool,
    /// L2 wedged with every CPU halted, interrupts enabled and a periodic timer due: the
    /// emulator lost its wakeup (see `rig_console::lost_wakeup`).
    pub lost_wakeup: bool,
    /// Boots before this one whose L2 ended before it was up, and how (see [`run_in_rig`]).
    pub failed_boots: Vec<String>,
}

impl RigReport {
    /// Whether the rig proved that a failure is its own, and how: L2's kernel reported a fault
    /// (soft lockup, RCU stall, oops, hung task, or the panic of the NMI sent to a wedged L2)
    /// whose trace runs through L2's KVM, or L2 wedged so deep that it did not even take an
    /// NMI, or wedged and took the NMI without a panic or fault of its own (a heartbeat gone
    /// for a minute while nothing in L2's kernel says why), or wedged idle in a state that
    /// proves the emulator lost an interrupt (every CPU halted with interrupts enabled and a
    /// periodic timer due), none of which anything L2 runs (husk's processes, its L3 guests)
    /// can cause. A hang of husk's own shows none of
    /// them: L2 stays up, or its panic's traces are elsewhere and its CPUs busy.
    pub fn rig_fault(&self) -> Option<String> {
        if self.nmi_unanswered {
            Some("L2 wedged and did not answer an NMI (its CPUs stuck below its kernel)".into())
        } else if self.end == RigEnd::Wedged && self.faults.nmi_survived && !self.faults.panicked {
            Some(
                "L2 wedged (no heartbeat for a minute), took the host's NMI as a PCI SERR and \
                 ran on, without a panic or fault of its own"
                    .into(),
            )
        } else if self.lost_wakeup {
            Some(
                "L2 wedged idle: halted with interrupts enabled and its periodic timer due, \
                 the emulator lost the wakeup"
                    .into(),
            )
        } else if self.faults.in_kvm {
            Some(self.faults.summary())
        } else {
            None
        }
    }

    /// How the run ended, in words.
    pub fn describe(&self) -> String {
        let end = match self.end {
            RigEnd::Finished(code) => format!("the command exited {code}"),
            RigEnd::Wedged if self.nmi_unanswered => {
                "L2 wedged (its heartbeat stopped) and did not answer an NMI".into()
            }
            RigEnd::Wedged if self.faults.nmi_survived => {
                "L2 wedged (its heartbeat stopped), took the host's NMI and ran on; it was \
                 stopped"
                    .into()
            }
            RigEnd::Wedged => "L2 wedged (its heartbeat stopped)".into(),
            RigEnd::Died => "L2 died before the command finished".into(),
            RigEnd::TimedOut => "the run's time limit passed".into(),
        };
        if self.faults.any() {
            format!("{end}; L2's kernel reported: {}", self.faults.summary())
        } else {
            end
        }
    }

    /// The command's exit code, or an error naming how L2 failed.
    pub fn exit_code(&self) -> Result<i32> {
        match self.end {
            RigEnd::Finished(code) => Ok(code),
            _ => bail!(
                "the rig run failed: {} (see its console above)",
                self.describe()
            ),
        }
    }
}

/// Prepended to every rig command: a line on L2's console at once and then every 10 s, through
/// the kernel log (which reaches the console even when the console's tty is stuck), so the
/// host can tell a quiet command from a wedged L2 (see [`rig_console::HEARTBEAT_LIMIT`]).
pub const HEARTBEAT: &str = "( while :; do echo \"<3>husk-rig: alive $(cut -d' ' -f1 /proc/uptime)\" > /dev/kmsg; sleep 10; done ) 2>/dev/null &\n";

/// How many times L2 is booted again when it ended before it came up.
const BOOT_RETRIES: usize = 2;

/// Boots L2 with a fresh work disk, runs the command, and reports how it went. An L2 that dies
/// or wedges before its init says it is up (`husk-rig: L2 up after`, printed just before the
/// command starts) ran nothing of the command, so nothing of husk's or the tests': it is booted
/// again, at most [`BOOT_RETRIES`] times, each time said loudly and listed in
/// [`RigReport::failed_boots`]. An end after L2 came up is never retried here (see
/// `testing::judge` for when a step is).
pub fn run_in_rig(image: &RigImage, job: &RigRun) -> Result<RigReport> {
    let mut failed_boots = Vec::new();
    loop {
        let mut report = run_in_rig_once(image, job)?;
        match before_l2_up(&report) {
            Some(why) if failed_boots.len() < BOOT_RETRIES => {
                eprintln!(
                    "xtask: !!! {why}: booting L2 again (boot {} of at most {}) !!!",
                    failed_boots.len() + 2,
                    BOOT_RETRIES + 1
                );
                failed_boots.push(why);
            }
            _ => {
                report.failed_boots = failed_boots;
                return Ok(report);
            }
        }
    }
}

/// Why `report`'s L2 ended before the command started, if it did: it died or wedged without
/// printing that it was up, and left no exit code.
fn before_l2_up(report: &RigReport) -> Option<String> {
    if report.l2_up_s.is_some() || !matches!(report.end, RigEnd::Died | RigEnd::Wedged) {
        return None;
    }
    Some(format!(
        "L2 ended {:.1} s after QEMU started, before it was up, so before the command ran: {}",
        report.elapsed.as_secs_f64(),
        report.describe()
    ))
}

/// One boot of L2 with a fresh work disk: runs the command and reports how it went, however
/// L2 ended (the soak counts every end; everything else uses [`run_in_rig`]).
pub fn run_in_rig_once(image: &RigImage, job: &RigRun) -> Result<RigReport> {
    let scratch = tempdir("husk-rig-run")?;
    let result = run_in_rig_at(image, job, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_in_rig_at(image: &RigImage, job: &RigRun, scratch: &Path) -> Result<RigReport> {
    let work = scratch.join("work");
    std::fs::create_dir_all(work.join("out"))?;
    for (src, dest) in &job.inputs {
        let target = work.join(dest);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        run(Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(src)
            .arg(&target))?;
    }
    if let Some(script) = &job.script {
        std::fs::write(work.join("cmd"), format!("{HEARTBEAT}{script}"))?;
    }
    let mut env = String::new();
    for (k, v) in &job.env {
        env.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    std::fs::write(work.join("env"), env)?;
    let disk = scratch.join("work.ext4");
    make_ext4(&work, WORK_LABEL, job.work_free_mib, &disk)?;
    std::fs::remove_dir_all(&work)?;

    let interactive = job.script.is_none();
    let mut config = RigConfig::from_env()?;
    if let Some(cpus) = job.l2_cpus {
        config.smp = cpus;
    }
    let qmp = scratch.join("qmp.sock");
    let mut qemu = qemu_command(&config, image, &disk, interactive, &qmp, job.mem_mib);
    eprintln!(
        "xtask: booting the rig ({}): {}",
        config.describe(),
        describe(&qemu)
    );
    let started = Instant::now();
    let end = if interactive {
        let status = qemu.status().context("spawning qemu-system-x86_64")?;
        ensure!(status.success(), "QEMU failed: {status}");
        None
    } else {
        Some(rig_console::stream_console(
            &mut qemu,
            job.timeout,
            Some(qmp),
            job.collect_prefix.clone(),
        )?)
    };
    let elapsed = started.elapsed();
    eprintln!(
        "xtask: rig run finished after {:.1} s",
        elapsed.as_secs_f64()
    );

    let out_dir = scratch.join("out");
    let dumped = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /out {}", scratch.display()))
        .arg(&disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    // Reports the command left on the work disk for when L2's console is no help (a hang
    // report written while the console was stuck; see `testing::RUN_TEST_FN`).
    let mut hang_reports = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&out_dir) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("hang-") && name.ends_with(".txt") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                eprintln!("xtask: {name} from the rig's work disk:\n{text}");
                hang_reports.push((name, text));
            }
        }
    }
    hang_reports.sort();
    if let Some(dest) = &job.out_dir {
        std::fs::create_dir_all(dest)?;
        if dumped && out_dir.exists() {
            run(Command::new("cp")
                .arg("-a")
                .arg(out_dir.join("."))
                .arg(dest))?;
        }
    }
    let Some(end) = end else {
        return Ok(RigReport {
            end: RigEnd::Finished(0),
            faults: L2Faults::default(),
            l2_up_s: None,
            elapsed,
            collected: Vec::new(),
            hang_reports,
            nmi_unanswered: false,
            lost_wakeup: false,
            failed_boots: Vec::new(),
        });
    };
    let file_code = std::fs::read_to_string(out_dir.join("exit-code"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let code = file_code.or(end.scan.marker);
    let rig_end = match code {
        Some(code) => RigEnd::Finished(code),
        None if end.wedged => RigEnd::Wedged,
        None if end.timed_out => RigEnd::TimedOut,
        None => RigEnd::Died,
    };
    if end.qemu_failed && code.is_none() && !end.wedged && !end.timed_out && !end.scan.faults.any()
    {
        bail!("QEMU exited with a failure before the command finished (see its messages above)");
    }
    Ok(RigReport {
        end: rig_end,
        faults: end.scan.faults,
        l2_up_s: end.scan.l2_up_s,
        elapsed,
        collected: end.scan.collected,
        hang_reports,
        nmi_unanswered: end.nmi_unanswered,
        lost_wakeup: end.lost_wakeup,
        failed_boots: Vec::new(),
    })
}

/// The rig's configuration: which QEMU runs L2, how L2's CPUs look, which kernel L2 runs and
/// how its KVM is loaded. The defaults are the combination `cargo xtask rig soak` found not to
/// wedge (the README's "How the rig was chosen" has the tallies); each may be overridden
/// from the environment to measure another with the soak:
/// `HUSK_RIG_QEMU` (`bookworm` or `bookworm-backports`: the suite L1's QEMU comes from),
/// `HUSK_RIG_L2_KERNEL` (the same, for L2's kernel; part of the image's cache key),
/// `HUSK_RIG_CPU` (QEMU's `-cpu`), `HUSK_RIG_SMP` (L2's CPU count), `HUSK_RIG_TCG` (`multi` or
/// `single`: one host thread per L2 CPU, or one for all of them in turn) and `HUSK_RIG_KVM_AMD`
/// (kvm_amd's module options, space-separated, given to L2 on its kernel command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RigConfig {
    pub qemu_suite: String,
    pub l2_kernel_suite: String,
    pub cpu: String,
    pub smp: u32,
    pub tcg: String,
    pub kvm_amd: String,
}

/// The configuration the rig uses unless told otherwise (see [`RigConfig`]).
pub const DEFAULT_QEMU_SUITE: &str = "bookworm-backports";
pub const DEFAULT_L2_KERNEL_SUITE: &str = "bookworm-backports";
/// QEMU's richest CPU model without the fast string operations (ERMS, FSRM). A CPU that has
/// them is told to copy memory with `rep movsb`, which hardware runs as fast as any copy
/// loop and QEMU's emulator runs a byte at a time: in the rig, a 128 MiB read from tmpfs took
/// 1.45 s with them and 0.08 s without. That made every copy some 18 times dearer against
/// everything else, VM exits included, which no hardware does: work bound by copies (a
/// namespace's file reads and TCP) looked slower beside work bound by exits (a microVM's)
/// than it is.
pub const DEFAULT_CPU: &str = "max,-erms,-fsrm";
/// One L2 CPU: multi-threaded TCG has races between emulated CPUs that a lone CPU cannot hit
/// (seen with two: an `int3` oops in L2's `__schedule` while kernel text was being patched, a
/// livelock of L2's KVM injecting a timer interrupt, both CPUs wedged); with a CPU hog on the
/// host, a second L2 CPU bought no speed either (median L3 boot 3.55 s with two, 3.36 with one).
pub const DEFAULT_SMP: u32 = 1;
/// With one L2 CPU, QEMU's multi-threaded and single-threaded TCG both run it on one thread.
pub const DEFAULT_TCG: &str = "multi";
/// L3 guests never run guests of their own: no nested SVM for them.
pub const DEFAULT_KVM_AMD: &str = "nested=0";

impl RigConfig {
    pub fn from_env() -> Result<RigConfig> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let suite = |name: &str, default: &str| -> Result<String> {
            let v = var(name, default);
            ensure!(
                v == "bookworm" || v == crate::debian::BACKPORTS,
                "{name}={v}: expected bookworm or {}",
                crate::debian::BACKPORTS
            );
            Ok(v)
        };
        let smp = var("HUSK_RIG_SMP", &DEFAULT_SMP.to_string());
        let tcg = var("HUSK_RIG_TCG", DEFAULT_TCG);
        ensure!(
            tcg == "multi" || tcg == "single",
            "HUSK_RIG_TCG={tcg}: expected multi or single"
        );
        Ok(RigConfig {
            qemu_suite: suite("HUSK_RIG_QEMU", DEFAULT_QEMU_SUITE)?,
            l2_kernel_suite: suite("HUSK_RIG_L2_KERNEL", DEFAULT_L2_KERNEL_SUITE)?,
            cpu: var("HUSK_RIG_CPU", DEFAULT_CPU),
            smp: smp
                .parse()
                .ok()
                .filter(|n| (1..=8).contains(n))
                .with_context(|| format!("HUSK_RIG_SMP={smp}: expected 1 to 8"))?,
            tcg,
            kvm_amd: var("HUSK_RIG_KVM_AMD", DEFAULT_KVM_AMD),
        })
    }

    /// One line naming every knob, for logs and the soak's tally.
    pub fn describe(&self) -> String {
        format!(
            "qemu {} ({}), L2 kernel {}, -cpu {}, -smp {}, {}-threaded TCG, kvm_amd {:?}",
            self.qemu_suite,
            host_qemu_version().unwrap_or_else(|| "not installed".into()),
            self.l2_kernel_suite,
            self.cpu,
            self.smp,
            self.tcg,
            self.kvm_amd
        )
    }
}

/// `qemu-system-x86_64 --version`'s number, if QEMU is installed.
pub fn host_qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()?
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
}

/// The installed QEMU's major version (0 if unknown).
fn qemu_major() -> u32 {
    host_qemu_version()
        .and_then(|v| v.split('.').next().and_then(|m| m.parse().ok()))
        .unwrap_or(0)
}

/// Installs QEMU on the host from the configured suite (bookworm-backports' is installed with
/// `apt-get -t`, from a source list of the host's own mirror that xtask adds; apt's default
/// priority for backports keeps every other package where it is).
fn install_host_qemu(config: &RigConfig) -> Result<()> {
    apt_install(HOST_PACKAGES)?;
    if config.qemu_suite != crate::debian::BACKPORTS {
        return apt_install(&["qemu-system-x86"]);
    }
    if qemu_major() >= 10 {
        return Ok(());
    }
    let mirror = host_debian_mirror().context("the host's apt sources name no Debian mirror")?;
    let list = Path::new("/etc/apt/sources.list.d/husk-bookworm-backports.list");
    write_atomic(
        list,
        format!(
            "# Added by husk's `cargo xtask` for the rig's QEMU (see README: the test rig).\n\
             deb {mirror} {} main\n",
            crate::debian::BACKPORTS
        )
        .as_bytes(),
    )?;
    eprintln!(
        "xtask: installing QEMU from {} for the rig",
        crate::debian::BACKPORTS
    );
    run(Command::new("apt-get").args(["update", "-q", util::APT_WAIT_FOR_LOCK]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args([util::APT_WAIT_FOR_LOCK, "-t", crate::debian::BACKPORTS])
        .arg("qemu-system-x86")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let version = host_qemu_version().unwrap_or_default();
    ensure!(
        version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0)
            >= 10,
        "QEMU from {} is {version:?}, not 10 or later",
        crate::debian::BACKPORTS
    );
    Ok(())
}

fn qemu_command(
    config: &RigConfig,
    image: &RigImage,
    work_disk: &Path,
    interactive: bool,
    qmp: &Path,
    job_mem_mib: Option<u64>,
) -> Command {
    let mem_mib = job_mem_mib.map_or_else(
        || std::env::var("HUSK_RIG_MEM_MIB").unwrap_or_else(|_| "6144".into()),
        |mib| mib.to_string(),
    );
    // softlockup_panic: a CPU stuck for 2 x watchdog_thresh (60 s) panics L2, which ends the
    // run at once (panic=-1 reboots, -no-reboot exits) instead of at the run's timeout.
    // panic_on_rcu_stall with a 60 s stall timeout: the same for a CPU that stops RCU (seen:
    // L2 reporting stalls every 63 s while its heartbeat had stopped). 60 s is far above any
    // pause a busy host gives L2's vCPU threads.
    // panic_on_oops: an oops panics L2 too, rather than leaving a process unkillable.
    // unknown_nmi_panic, panic_print=0x40: an unknown NMI from the host panics L2, with every
    // CPU's backtrace (see `rig_console::stream_console`). But the microvm machine has no port
    // 0x61: L2 reads the NMI's reason as 0xff, a PCI SERR, which it logs ("Dazed and
    // confused") and survives, so a wedged L2 that takes the NMI runs on and does not panic.
    // (The sysctl kernel.panic_on_unrecovered_nmi would make that fatal; it is not set, as it
    // would turn into failures of husk's the wedges that xtask now retries as the rig's.)
    // printk.time: kernel lines carry a timestamp, which tells them from the command's output.
    // printk.devkmsg=on: a hang report written to /dev/kmsg is not rate-limited away.
    // lapic=notscdeadline nohz=off highres=off: L2's tick comes from its local APIC's own
    // periodic timer, which QEMU re-fires by itself, not from a one-shot deadline L2 re-arms
    // when the last one is handled. QEMU's TCG with nested SVM sometimes loses an interrupt
    // (L2 halted with its timer pending, woken only by an NMI); with a one-shot timer nothing
    // ever raises it again and L2 sleeps until the host's watchdog, with a periodic one the
    // next tick does.
    let mut append = format!(
        "console=ttyS0 panic=-1 loglevel=4 pci=off tsc=reliable tsc_early_khz={} \
         lapic=notscdeadline nohz=off highres=off \
         softlockup_panic=1 watchdog_thresh=30 panic_on_oops=1 \
         sysctl.kernel.panic_on_rcu_stall=1 rcupdate.rcu_cpu_stall_timeout=60 \
         unknown_nmi_panic=1 panic_print=0x40 printk.time=1 printk.devkmsg=on",
        host_tsc_khz()
    );
    for opt in config.kvm_amd.split_whitespace() {
        append.push_str(&format!(" kvm_amd.{opt}"));
    }
    if !interactive {
        append.push_str(" quiet");
    }
    // QEMU 7.2's microvm firmware (qboot) enters a PVH kernel itself; from QEMU 8 on Debian's
    // is SeaBIOS, which needs the PVH option ROM to do it.
    // No 8259 PIC (`pic=off`): L2 takes its interrupts through the IOAPIC and never programs
    // a PIC, so the PIC the firmware left with its timer line open delivered the PIT's tick
    // as vector 0 the moment L2's kernel first enabled interrupts: a "divide error" oops in
    // start_kernel and a dead L2, in most boots on some hosts (seen: 9 of 10).
    let machine = if qemu_major() >= 8 {
        "microvm,isa-serial=on,rtc=on,pic=off"
    } else {
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,pic=off"
    };
    let accel = format!("tcg,thread={},tb-size=512", config.tcg);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        machine,
        "-accel",
        &accel,
        "-cpu",
        &config.cpu,
        "-smp",
        &config.smp.to_string(),
        "-m",
        &mem_mib,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        if interactive { "mon:stdio" } else { "stdio" },
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-kernel")
    .arg(&image.vmlinux)
    .arg("-initrd")
    .arg(&image.initrd)
    .arg("-append")
    .arg(append)
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,snapshot=on,cache=unsafe",
        image.root.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"])
    .arg("-drive")
    .arg(format!(
        "id=work,file={},format=raw,if=none,cache=unsafe",
        work_disk.display()
    ))
    .args(["-device", "virtio-blk-device,drive=work"]);
    if !interactive {
        cmd.stdin(Stdio::null());
    }
    // QEMU must not outlive xtask, whatever ends it (a CI timeout, Ctrl-C, kill -9).
    let die_with_parent = || {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers are involved.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, die_with_parent) };
    cmd
}

/// The host's TSC frequency in kHz: L2 is told it so it never calibrates against the emulated PIT,
/// which hangs when the host is busy.
fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpu_mhz(&cpuinfo)
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A fresh private folder under the system temp dir.
pub fn tempdir(prefix: &str) -> Result<PathBuf> {
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    for n in 0..1000u32 {
        let dir = base.join(format!("{prefix}-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a temp dir under {}", base.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(end: RigEnd, l2_up_s: Option<f64>) -> RigReport {
        RigReport {
            end,
            faults: L2Faults::default(),
            l2_up_s,
            elapsed: Duration::from_millis(400),
            collected: Vec::new(),
            hang_reports: Vec::new(),
            nmi_unanswered: false,
            lost_wakeup: false,
            failed_boots: Vec::new(),
        }
    }

    #[test]
    fn only_an_l2_that_never_came_up_is_booted_again() {
        let why = before_l2_up(&ended(RigEnd::Died, None)).expect("died before it was up");
        assert!(
            why.contains("0.4 s") && why.contains("L2 died before the command finished"),
            "{why}"
        );
        assert!(before_l2_up(&ended(RigEnd::Wedged, None)).is_some());
        // Once the command may have run, the end is the caller's to judge.
        assert_eq!(before_l2_up(&ended(RigEnd::Died, Some(3.2))), None);
        assert_eq!(before_l2_up(&ended(RigEnd::Wedged, Some(3.2))), None);
        assert_eq!(before_l2_up(&ended(RigEnd::Finished(1), None)), None);
        assert_eq!(before_l2_up(&ended(RigEnd::TimedOut, None)), None);
    }

    #[test]
    fn mirror_is_read_from_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n";
        assert_eq!(
            parse_debian_mirror(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let classic = "deb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(
            parse_debian_mirror(classic).as_deref(),
            Some("http://m.example/debian")
        );
        let security = "URIs: http://m.example/debian-security\n";
        assert_eq!(parse_debian_mirror(security), None);
    }

    #[test]
    fn cpu_mhz_is_parsed() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2596.140\n";
        assert_eq!(parse_cpu_mhz(cpuinfo), Some(2596.14));
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }

    #[test]
    fn bzimage_payload_follows_the_setup_header() {
        let mut image = vec![0u8; 0x2000];
        image[0x1f1] = 3; // setup sectors: protected-mode code at (3 + 1) * 512 = 0x800
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&4u32.to_le_bytes());
        image[0x810..0x814].copy_from_slice(b"LZ4!");
        assert_eq!(bzimage_payload(&image).expect("valid header"), b"LZ4!");
    }

    fn valid_bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 0x2000];
        image[0x1f1] = 3;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&4u32.to_le_bytes());
        image
    }

    #[test]
    fn a_bzimage_payload_past_the_file_is_refused() {
        // One corruption per case: the header is otherwise valid.
        let mut image = valid_bzimage();
        assert!(bzimage_payload(&image).is_ok());
        image[0x24c..0x250].copy_from_slice(&0x10000u32.to_le_bytes());
        let err = bzimage_payload(&image).expect_err("payload too long");
        assert_eq!(err.to_string(), "payload lies outside the file");
    }

    #[test]
    fn a_bzimage_without_the_setup_magic_is_refused() {
        let mut image = valid_bzimage();
        image[0x202] = b'X';
        let err = bzimage_payload(&image).expect_err("bad magic");
        assert_eq!(err.to_string(), "no setup header magic");
    }

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        let dep = "kernel/drivers/virtio/virtio.ko.xz:\n\
                   kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n\
                   kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz\n\
                   kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz\n";
        assert_eq!(
            module_load_order(dep, &["virtio_mmio", "virtio_blk"]).expect("found"),
            vec![
                "kernel/drivers/virtio/virtio.ko.xz",
                "kernel/drivers/virtio/virtio_ring.ko.xz",
                "kernel/drivers/virtio/virtio_mmio.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
            ]
        );
        let err = module_load_order(dep, &["nvme"]).expect_err("not a module");
        assert!(err.to_string().contains("is in modules.dep"), "{err}");
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
