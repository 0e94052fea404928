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
use crate::util::{self, apt_install, cache_dir, describe, hash_inputs, run, write_atomic};
use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Modules the L2 initramfs loads, in dependency order, relative to `/lib/modules/<version>/`.
/// KVM itself is loaded later from the root disk with modprobe (so its options stay in one place).
const INITRAMFS_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

const INITRAMFS_INIT: &str = include_str!("../rig/initramfs-init.sh");
const RIG_INIT: &str = include_str!("../rig/rig-init.sh");
/// Bump when the way the image is assembled changes in a way the inputs above do not show.
const RIG_FORMAT: &str = "husk-rig-v1";

const ROOT_LABEL: &str = "husk-rig-root";
const WORK_LABEL: &str = "husk-rig-work";
const EXIT_MARKER: &str = "HUSK-RIG-EXIT=";
/// A report a command may leave in the work disk's `out/` for the host to print after the run.
pub const HANG_REPORT: &str = "hang-report.txt";

/// A built rig: the cached files QEMU boots.
pub struct RigImage {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub root: PathBuf,
}

fn rig_key() -> String {
    let packages = RIG_PACKAGES.join("\n");
    let modules = INITRAMFS_MODULES.join("\n");
    hash_inputs([
        ("format", RIG_FORMAT.as_bytes()),
        ("packages", packages.as_bytes()),
        ("modules", modules.as_bytes()),
        ("initramfs-init", INITRAMFS_INIT.as_bytes()),
        ("rig-init", RIG_INIT.as_bytes()),
    ])
}

/// Tools the host needs to build and run the rig.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "debootstrap",
    "e2fsprogs",
    "lz4",
    "xz-utils",
    "zstd",
];

/// Builds the rig image if the cache does not hold one for the current inputs.
pub fn build() -> Result<RigImage> {
    apt_install(HOST_PACKAGES)?;
    let key = rig_key();
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
    // Older images only take disk space now.
    for entry in std::fs::read_dir(&rig_root)? {
        let path = entry?.path();
        if path != dir && path.is_dir() {
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
    for module in INITRAMFS_MODULES {
        let name = Path::new(module)
            .file_name()
            .expect("module paths name a file")
            .to_string_lossy();
        let bytes = std::fs::read(modules.join(module))
            .with_context(|| format!("module {module} missing for kernel {kernel_version}"))?;
        w.file(&format!("modules/{name}"), 0o644, &bytes)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.file("modules.order", 0o644, order.as_bytes())?;
    write_atomic(out, &w.finish()?)
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
}

/// How a rig run ended.
pub struct RigOutcome {
    pub exit_code: i32,
}

/// L2's own kernel failed and panicked while running the command: a CPU stuck in a nested
/// guest (`softlockup_panic`), or an oops (`panic_on_oops`). Both are faults of the emulated
/// nested virtualization under QEMU's TCG, seen now and then (a few runs in a day's dozens)
/// and never on real hardware: an L2 vCPU left looping in an L3 guest for good (the L3 smoke
/// check, with an unmodified Debian kernel), L2's KVM stuck injecting a timer interrupt into a
/// 4-vCPU guest (`kvm_inject_apic_timer_irqs`), and kvm_amd's return from an L3 guest with a
/// corrupt per-CPU base (a recursive page fault in L2's `exc_page_fault` on a `husk-vcpu`
/// thread). Before L2 panicked on an oops, such a fault left the process of that thread
/// unkillable and the test waiting on it for good. Not a failure of the command: callers may
/// run it again.
///
/// Also: L2 stopped answering altogether (both of its CPUs spinning, seen with a husk-vcpu
/// thread livelocked in L2's KVM while the other CPU waited for it), which no detector inside
/// L2 reports; the host notices that L2's heartbeat (a console line every 30 s, see
/// [`HEARTBEAT`]) stopped, and kills it after [`SILENCE_LIMIT`].
#[derive(Debug)]
pub struct L2KernelFault(pub &'static str);

impl std::fmt::Display for L2KernelFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the rig's L2 kernel failed ({}; see its console above): a fault of the emulated \
             nested virtualization, not of the command",
            self.0
        )
    }
}

/// Prepended to every rig command: a line on L2's console every 30 s, through the kernel log
/// (which reaches the console even when the console's tty is stuck), so the host can tell a
/// quiet command from a wedged L2.
const HEARTBEAT: &str =
    "( while sleep 30; do echo '<3>husk-rig: alive' > /dev/kmsg; done ) 2>/dev/null &\n";
/// How long L2's console may stay silent (heartbeat included) before the host calls L2 wedged.
const SILENCE_LIMIT: Duration = Duration::from_secs(180);

impl std::error::Error for L2KernelFault {}

/// Boots L2 with a fresh work disk, runs the command, and returns its exit code.
pub fn run_in_rig(image: &RigImage, job: &RigRun) -> Result<RigOutcome> {
    let scratch = tempdir("husk-rig-run")?;
    let result = run_in_rig_at(image, job, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// A test binary in the rig hung and was killed by its time limit (the hang report, printed
/// above, says where everything was). The rig's emulated nested virtualization sometimes
/// livelocks a vCPU thread inside L2's KVM, where even SIGKILL does not reach it; that is the
/// hang seen so far. Retried like an [`L2KernelFault`]: a hang of husk's own would come back
/// on the next run and fail it, with its report.
#[derive(Debug)]
pub struct RigHang;

impl std::fmt::Display for RigHang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a test binary hung in the rig and was killed at its time limit (hang report above)",
        )
    }
}

impl std::error::Error for RigHang {}

/// How many times a command is run again after an [`L2KernelFault`] or a [`RigHang`].
const FAULT_RETRIES: usize = 2;

/// [`run_in_rig`], run again (up to [`FAULT_RETRIES`] times) if L2's kernel failed
/// ([`L2KernelFault`]) or a test binary hung ([`RigHang`]); either on the last attempt is an
/// error.
pub fn run_in_rig_retrying_fault(image: &RigImage, job: &RigRun) -> Result<RigOutcome> {
    let mut attempt = 0;
    loop {
        match run_in_rig(image, job) {
            Err(e) if (e.is::<L2KernelFault>() || e.is::<RigHang>()) && attempt < FAULT_RETRIES => {
                attempt += 1;
                eprintln!(
                    "xtask: !!! {e}; running the whole command again ({attempt} of {FAULT_RETRIES}) !!!"
                );
            }
            other => return other,
        }
    }
}

fn run_in_rig_at(image: &RigImage, job: &RigRun, scratch: &Path) -> Result<RigOutcome> {
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
    make_ext4(&work, WORK_LABEL, 1024, &disk)?;
    std::fs::remove_dir_all(&work)?;

    let interactive = job.script.is_none();
    let mut qemu = qemu_command(image, &disk, interactive);
    eprintln!("xtask: booting the rig: {}", describe(&qemu));
    let started = Instant::now();
    let end = if interactive {
        let status = qemu.status().context("spawning qemu-system-x86_64")?;
        ensure!(status.success(), "QEMU failed: {status}");
        ConsoleEnd {
            marker: None,
            fault: false,
            timed_out: false,
            wedged: false,
        }
    } else {
        stream_console(&mut qemu, job.timeout)?
    };
    let (marker_code, fault) = (end.marker, end.fault);
    eprintln!(
        "xtask: rig run finished after {:.1} s",
        started.elapsed().as_secs_f64()
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
    let hang_report = std::fs::read_to_string(out_dir.join(HANG_REPORT)).ok();
    if let Some(report) = &hang_report {
        eprintln!("xtask: {HANG_REPORT} from the rig's work disk:\n{report}");
    }
    if end.wedged {
        return Err(L2KernelFault(
            "L2 stopped answering: no console output, not even its heartbeat, for 3 minutes",
        )
        .into());
    }
    if end.timed_out {
        bail!(
            "the rig did not finish within {} s; QEMU was killed (see the console above)",
            job.timeout.as_secs()
        );
    }
    let file_code = std::fs::read_to_string(out_dir.join("exit-code"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(dest) = &job.out_dir {
        std::fs::create_dir_all(dest)?;
        if dumped && out_dir.exists() {
            run(Command::new("cp")
                .arg("-a")
                .arg(out_dir.join("."))
                .arg(dest))?;
        }
    }
    if fault && file_code.or(marker_code).is_none() {
        return Err(L2KernelFault(
            "a soft lockup or an oops while running a nested guest; it panicked",
        )
        .into());
    }
    let exit_code = file_code
        .or(marker_code)
        .context("the command in the rig left no exit code: L2 died before it finished (see its console above)")?;
    if exit_code != 0 && hang_report.is_some() {
        return Err(RigHang.into());
    }
    Ok(RigOutcome { exit_code })
}

fn qemu_command(image: &RigImage, work_disk: &Path, interactive: bool) -> Command {
    let mem_mib = std::env::var("HUSK_RIG_MEM_MIB").unwrap_or_else(|_| "6144".into());
    // softlockup_panic: a CPU stuck for 2 x watchdog_thresh (60 s) panics L2, which ends the
    // run at once (panic=-1 reboots, -no-reboot exits) instead of at the run's timeout; see
    // [`L2KernelFault`]. 60 s is far above any pause a busy host gives L2's vCPU threads.
    // panic_on_oops: an oops panics L2 too, rather than leaving a process unkillable.
    // printk.devkmsg=on: a hang report written to /dev/kmsg is not rate-limited away.
    let mut append = format!(
        "console=ttyS0 panic=-1 loglevel=4 pci=off tsc=reliable tsc_early_khz={} \
         softlockup_panic=1 watchdog_thresh=30 panic_on_oops=1 printk.devkmsg=on",
        host_tsc_khz()
    );
    if !interactive {
        append.push_str(" quiet");
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel",
        "tcg,thread=multi,tb-size=512",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        &mem_mib,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        if interactive { "mon:stdio" } else { "stdio" },
        "-kernel",
    ])
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

/// What L2's kernel prints when it fails (see [`L2KernelFault`]).
const L2_FAULT_MARKS: &[&str] = &["soft lockup", "BUG: ", "Oops: ", "Kernel panic"];

/// How a rig run's console ended.
struct ConsoleEnd {
    /// The exit code the rig's init printed, if it printed one.
    marker: Option<i32>,
    /// Whether L2 reported a kernel fault (see [`L2KernelFault`]; the caller counts it only
    /// when the command did not finish, as a test's own output may quote such lines).
    fault: bool,
    /// Whether QEMU was killed at the run's timeout.
    timed_out: bool,
    /// Whether QEMU was killed because L2's console fell silent (see [`SILENCE_LIMIT`]).
    wedged: bool,
}

/// Runs QEMU, copying its console to our stdout as it arrives (partial lines too: a test
/// binary prints `test NAME ... ` before the test runs), and kills it at `timeout`.
fn stream_console(qemu: &mut Command, timeout: Duration) -> Result<ConsoleEnd> {
    let mut child = qemu
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning qemu-system-x86_64")?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let wedged = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // Milliseconds after `started` of the console's last output.
    let last_output = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watchdog = {
        let done = done.clone();
        let timed_out = timed_out.clone();
        let wedged = wedged.clone();
        let last_output = last_output.clone();
        std::thread::spawn(move || {
            let deadline = started + timeout;
            loop {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    timed_out.store(true, Ordering::Relaxed);
                    break;
                }
                let quiet_ms = (now - started)
                    .as_millis()
                    .saturating_sub(u128::from(last_output.load(Ordering::Relaxed)));
                if quiet_ms > SILENCE_LIMIT.as_millis() {
                    wedged.store(true, Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (the
            // main thread reaps it only after this thread is joined or the pipe closes).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        })
    };
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let mut marker = None;
    let mut fault = false;
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the rig's console"),
        };
        last_output.store(
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
        out.write_all(&chunk)?;
        out.flush()?;
        for &b in &chunk {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(code) = text.trim().strip_prefix(EXIT_MARKER) {
                marker = code.trim().parse().ok();
            }
            fault |= L2_FAULT_MARKS.iter().any(|mark| text.contains(mark));
            line.clear();
        }
    }
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let timed_out = timed_out.load(Ordering::Relaxed);
    let wedged = wedged.load(Ordering::Relaxed);
    if !timed_out && !wedged && !status.success() && marker.is_none() && !fault {
        bail!("QEMU exited with {status} before the command finished");
    }
    Ok(ConsoleEnd {
        marker,
        fault,
        timed_out,
        wedged,
    })
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
        image[0x24c..0x250].copy_from_slice(&0x10000u32.to_le_bytes());
        assert!(bzimage_payload(&image).is_err());
        image[0x202] = b'X';
        assert!(bzimage_payload(&image).is_err());
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
