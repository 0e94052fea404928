//! husk's end-to-end test harness: boots real microVMs through the real `husk-vmm` binary.
//!
//! Each test gets a [`TestVm`] from a builder, waits with [`wait_until`] (never a bare sleep),
//! and relies on `Drop` to kill whatever it started and remove its temp dir.
//!
//! Where the artifacts come from: `HUSK_VMM_BIN`, `HUSK_KERNEL` and `HUSK_INITRAMFS`, which
//! `cargo xtask test` sets (on the host, or inside the test rig). Where they are missing, or the
//! host's KVM cannot run a Linux guest, VM tests skip with a loud message - unless
//! `HUSK_REQUIRE_KVM=1`, where they fail.

pub mod containerd;
pub mod cri;
pub mod oci;
pub mod skip;

use anyhow::{bail, Context, Result};
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::Handshake;
use husk_vmm::kvm_check::{check_host, KvmUsability};
use husk_vmm::timeline::BootTimeline;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a guest may take to reach its agent. Generous: inside the rig everything runs about
/// 20x slower than on hardware, and CI machines are shared.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The artifacts a VM test boots.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The `husk-vmm` binary: `HUSK_VMM_BIN`, else the one cargo built next to this test.
pub fn vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HUSK_VMM_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/husk-vmm
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("husk-vmm")))
        .unwrap_or_else(|| PathBuf::from("husk-vmm"))
}

/// Returns the artifacts when VM tests can run here; otherwise prints why they are skipped and
/// returns `None`, or panics when `HUSK_REQUIRE_KVM=1`.
pub fn vm_artifacts(test: &str) -> Option<Artifacts> {
    let why_not = (|| {
        let kernel = std::env::var_os("HUSK_KERNEL")
            .ok_or("HUSK_KERNEL is not set (run the tests with `cargo xtask test`)")?;
        let initramfs = std::env::var_os("HUSK_INITRAMFS")
            .ok_or("HUSK_INITRAMFS is not set (run the tests with `cargo xtask test`)")?;
        let report = check_host();
        if let KvmUsability::Unusable(reason) = &report.usability {
            return Err(format!("no usable KVM here: {reason}").leak() as &str);
        }
        Ok(Artifacts {
            vmm: vmm_binary(),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
        })
    })();
    match why_not {
        Ok(artifacts) => Some(artifacts),
        Err(reason) => {
            skip::skip(&format!("VM test not run ({test}): {reason}"));
            None
        }
    }
}

/// `GET /` over HTTP/1.0 from `ip:port`; the whole reply, headers included. (Debian's
/// `busybox wget` crashes, so tests fetch with this.)
pub fn http_get(ip: &str, port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| std::io::Error::other(format!("{e}")))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Makes sure `/dev/net/tun` exists, which husk's networking needs: a node loads `tun` at
/// boot, the rig's L2 (no udev, no systemd) does not.
pub fn load_tun() -> Result<()> {
    if !Path::new("/dev/net/tun").exists() {
        let loaded = std::process::Command::new("modprobe")
            .arg("tun")
            .status()
            .is_ok_and(|s| s.success());
        if !loaded || !Path::new("/dev/net/tun").exists() {
            bail!("no /dev/net/tun, and `modprobe tun` did not provide it");
        }
    }
    Ok(())
}

/// Polls `condition` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A private temp dir removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(std::env::temp_dir())?
            .keep();
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to boot a [`TestVm`].
#[derive(Clone, Debug)]
pub struct TestVmBuilder {
    artifacts: Artifacts,
    cpus: u8,
    mem_mib: u32,
    cmdline_extra: Option<String>,
    console: bool,
    extra_args: Vec<String>,
}

impl TestVmBuilder {
    pub fn new(artifacts: &Artifacts) -> Self {
        TestVmBuilder {
            artifacts: artifacts.clone(),
            cpus: 1,
            mem_mib: 128,
            cmdline_extra: None,
            console: false,
            extra_args: Vec::new(),
        }
    }

    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    pub fn cmdline_extra(mut self, extra: &str) -> Self {
        self.cmdline_extra = Some(extra.to_string());
        self
    }

    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// Shares `dir` with the guest through virtio-fs (`--shared-dir`; the agent mounts it at
    /// `/run/husk/shared`).
    pub fn shared_dir(mut self, dir: &Path) -> Self {
        self.extra_args.push("--shared-dir".into());
        self.extra_args.push(dir.display().to_string());
        self
    }

    /// One more `husk-vmm` argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Starts `husk-vmm`; its stdout and stderr are captured to files in the VM's temp dir.
    pub fn spawn(self) -> Result<TestVm> {
        let dir = TempDir::new("husk-test-vm")?;
        let socket = dir.path().join("vsock.sock");
        let report = dir.path().join("boot.json");
        let stdout = std::fs::File::create(dir.path().join("stdout"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr"))?;
        let mut cmd = Command::new(&self.artifacts.vmm);
        cmd.arg("--kernel")
            .arg(&self.artifacts.kernel)
            .arg("--initramfs")
            .arg(&self.artifacts.initramfs)
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--mem-mib")
            .arg(self.mem_mib.to_string())
            .arg("--vsock-socket")
            .arg(&socket)
            .arg("--boot-report")
            .arg(&report)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(extra) = &self.cmdline_extra {
            cmd.arg("--cmdline-extra").arg(extra);
        }
        if self.console {
            cmd.arg("--console");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.artifacts.vmm.display()))?;
        Ok(TestVm {
            child,
            socket,
            report,
            dir,
            started: Instant::now(),
        })
    }
}

/// A running `husk-vmm`; killed on drop.
#[derive(Debug)]
pub struct TestVm {
    child: Child,
    pub socket: PathBuf,
    report: PathBuf,
    dir: TempDir,
    pub started: Instant,
}

impl TestVm {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to the agent and returns the client and its handshake. Fails as soon as
    /// husk-vmm exits (a guest that crashed while booting), not at [`BOOT_TIMEOUT`].
    pub fn connect(&mut self) -> Result<(AgentClient, Handshake)> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "husk-vmm exited with {status} before the agent answered; stderr: {}",
                    self.stderr()
                );
            }
            if self.socket.exists() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        AgentClient::connect(&self.socket, left.max(Duration::from_secs(1))).with_context(|| {
            format!(
                "no handshake from the agent; husk-vmm stderr: {}",
                self.stderr()
            )
        })
    }

    /// The boot report husk-vmm wrote once the agent answered its own handshake.
    pub fn boot_report(&self) -> Result<BootTimeline> {
        if !wait_until(BOOT_TIMEOUT, || self.report.exists()) {
            bail!("husk-vmm wrote no boot report; stderr: {}", self.stderr());
        }
        let text = std::fs::read_to_string(&self.report)?;
        serde_json::from_str(&text).context("parsing the boot report")
    }

    /// Waits for husk-vmm to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "husk-vmm did not exit within {} s; stderr: {}",
                    timeout.as_secs(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` to husk-vmm.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on our own child, which is not yet reaped (we hold its `Child`).
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// What husk-vmm printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// What husk-vmm printed on stdout so far (the guest console with `--console`).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a process with this pid still exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Runs `husk-vmm` with `args` to completion (it must fail fast) and returns (status, stderr).
pub fn run_vmm(args: &[&str]) -> Result<(ExitStatus, String)> {
    let out = Command::new(vmm_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {}", vmm_binary().display()))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A deterministic byte stream (xorshift64) so that bulk transfers can be checked byte for byte
/// without keeping a copy. However the stream is cut into `fill` calls, the bytes are the same.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_however_it_is_split() {
        let mut whole = vec![0u8; 100];
        Pattern::new(7).fill(&mut whole);
        let mut split = vec![0u8; 100];
        let mut p = Pattern::new(7);
        p.fill(&mut split[..3]);
        p.fill(&mut split[3..50]);
        p.fill(&mut split[50..]);
        assert_eq!(whole, split);
        assert_ne!(whole[..8], whole[8..16]);
    }
}

/// Resident memory of a process split into guest RAM and everything else, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssSplit {
    /// Resident pages of the mappings inside the guest memory's host ranges: guest memory the
    /// host backs, whether private or page cache shared with other VMs.
    pub guest_kib: u64,
    /// The anonymous part of `guest_kib`: pages that belong to this VM alone (RAM the guest
    /// wrote, and its copy-on-write copies of file pages).
    pub guest_anon_kib: u64,
    /// Everything else: the VMM's own footprint.
    pub vmm_kib: u64,
}

impl RssSplit {
    /// The file-backed part of `guest_kib`: page-cache pages of the kernel and initramfs files,
    /// shared by every VM booting them (and the host's page cache).
    pub fn guest_file_kib(&self) -> u64 {
        self.guest_kib - self.guest_anon_kib
    }
}

/// Reads `/proc/<pid>/smaps`.
pub fn read_smaps(pid: u32) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))
}

/// Splits `/proc/<pid>/smaps` into guest memory (mappings inside one of the host address
/// ranges `guest_ranges`, `[start, end)`) and the rest.
pub fn rss_split(pid: u32, guest_ranges: &[(u64, u64)]) -> Result<RssSplit> {
    Ok(parse_smaps_split(&read_smaps(pid)?, guest_ranges))
}

/// The address ranges of anonymous mappings of exactly `size_kib`: how guest memory was found
/// before the VMM reported its ranges (a VMM that copies the kernel keeps guest RAM in one
/// anonymous mapping per region). For comparing against such VMMs only.
pub fn anonymous_ranges_of_size(smaps: &str, size_kib: u64) -> Vec<(u64, u64)> {
    smaps
        .lines()
        .filter(|line| line.split_whitespace().count() <= 5)
        .filter_map(|line| {
            let (a, b) = line.split_whitespace().next()?.split_once('-')?;
            let (start, end) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (end - start == size_kib * 1024).then_some((start, end))
        })
        .collect()
}

/// [`rss_split`] on smaps text already read.
pub fn parse_smaps_split(smaps: &str, guest_ranges: &[(u64, u64)]) -> RssSplit {
    let mut split = RssSplit::default();
    let mut in_guest = false;
    let field = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        }) {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest = guest_ranges
                .iter()
                .any(|&(lo, hi)| start >= lo && end <= hi);
        } else if line.starts_with("Rss:") {
            if in_guest {
                split.guest_kib += field(line);
            } else {
                split.vmm_kib += field(line);
            }
        } else if line.starts_with("Anonymous:") && in_guest {
            split.guest_anon_kib += field(line);
        }
    }
    split
}

/// Median, minimum and maximum of a sample.
pub fn stats(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

#[cfg(test)]
mod smaps_tests {
    use super::*;

    #[test]
    fn guest_ranges_are_told_apart_by_address() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 1234 /usr/bin/husk-vmm
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
7f0000000000-7f0001000000 rw-p 00000000 00:00 0 
Size:              16384 kB
Rss:                 300 kB
Anonymous:           300 kB
7f0001000000-7f0001a7d000 rw-p 00200000 08:01 99 /var/cache/vmlinux
Size:              10740 kB
Rss:                4000 kB
Anonymous:           120 kB
7f0001a7d000-7f0008000000 rw-p 00000000 00:00 0 
Size:             103948 kB
Rss:               15000 kB
Anonymous:         15000 kB
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 100 kB
Anonymous:           100 kB
";
        let split = parse_smaps_split(smaps, &[(0x7f00_0000_0000, 0x7f00_0800_0000)]);
        assert_eq!(
            split,
            RssSplit {
                guest_kib: 19300,
                guest_anon_kib: 15420,
                vmm_kib: 900
            }
        );
        assert_eq!(split.guest_file_kib(), 3880);
        assert_eq!(
            anonymous_ranges_of_size(smaps, 2048),
            vec![(0x7f00_1000_0000, 0x7f00_1020_0000)]
        );
        assert_eq!(parse_smaps_split(smaps, &[]).vmm_kib, 20200);
    }

    #[test]
    fn stats_of_odd_and_even_samples() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
