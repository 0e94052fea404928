//! `husk check`: can this host run husk microVMs, and if not, why not.
//!
//! The static checks (/dev/kvm, API version, kvm_pvm, vmx/svm) come from
//! [`husk_vmm::kvm_check`]. With a kernel and initramfs, a probe guest is booted as well: some
//! hosts pass every static check yet cannot run a Linux guest (a paravirtual or emulating KVM),
//! and only a boot tells. The probe is bounded by a timeout, so it reports rather than hangs.

use anyhow::{Context, Result};
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::Handshake;
use husk_vmm::kvm_check::{check_host, KvmUsability};
use husk_vmm::timeline::BootTimeline;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `husk check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Boot a probe guest from this kernel (with --initramfs) to prove guests really run.
    #[arg(long, requires = "initramfs")]
    pub kernel: Option<PathBuf>,
    /// The initramfs holding husk-agent, for the probe guest.
    #[arg(long, requires = "kernel")]
    pub initramfs: Option<PathBuf>,
    /// The husk-vmm binary (default: next to this husk binary, then $PATH).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// How long the probe guest may take to answer, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// Prints the report; returns whether husk can run guests here.
pub fn check(args: &CheckArgs) -> Result<bool> {
    let report = check_host();
    crate::outln!("{}", report.message());
    let mut usable = report.usability == KvmUsability::Usable;
    if let (true, Some(kernel), Some(initramfs)) = (usable, &args.kernel, &args.initramfs) {
        let vmm = args.vmm.clone().unwrap_or_else(default_vmm);
        match probe_boot(&vmm, kernel, initramfs, Duration::from_secs(args.timeout_s)) {
            Ok(probe) => print_probe(&probe),
            Err(e) => {
                crate::outln!("probe guest: FAILED: {e:#}");
                usable = false;
            }
        }
    } else if usable {
        crate::outln!("probe guest: not run (pass --kernel and --initramfs to boot one)");
    }
    Ok(usable)
}

/// husk-vmm next to the running husk binary, else whatever $PATH finds.
fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("husk-vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("husk-vmm"))
}

/// What the probe guest showed.
struct Probe {
    /// Spawn of husk-vmm to the agent's handshake, seen from here.
    took: Duration,
    handshake: Handshake,
    timeline: Option<BootTimeline>,
}

fn print_probe(probe: &Probe) {
    let h = &probe.handshake;
    crate::outln!(
        "probe guest: agent answered {} ms after husk-vmm was started",
        probe.took.as_millis()
    );
    crate::outln!(
        "  agent handshake: husk-agent {} (protocol {}), guest uptime {:.1} ms, {} vCPU(s), \
         {} MiB RAM ({} MiB managed by the kernel)",
        h.agent_version,
        h.protocol_version,
        h.uptime_us as f64 / 1e3,
        h.cpus,
        h.mem_phys_kib / 1024,
        h.mem_total_kib / 1024
    );
    let Some(t) = &probe.timeline else {
        crate::outln!("  boot timeline: not reported");
        return;
    };
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1e3);
    let opt = |us: Option<u64>| us.map_or_else(|| "-".to_string(), ms);
    crate::outln!(
        "  boot timeline (since husk-vmm started, {} boot):",
        t.boot_protocol
    );
    crate::outln!("    VM created          {}", ms(t.vm_created_us));
    crate::outln!("    kernel loaded       {}", ms(t.kernel_loaded_us));
    crate::outln!("    first vCPU entry    {}", opt(t.first_vcpu_entry_us));
    crate::outln!("    agent handshake     {}", opt(t.agent_handshake_us));
    crate::outln!(
        "  confinement took {} (of which the jail {}; abstract sockets scoped by {})",
        opt(t.confine_us),
        opt(t.jail_us),
        t.jail_sockets.as_deref().unwrap_or("-")
    );
}

/// Boots a 1 vCPU / 128 MiB guest, waits for the agent's handshake, shuts it down.
fn probe_boot(vmm: &Path, kernel: &Path, initramfs: &Path, timeout: Duration) -> Result<Probe> {
    let dir = std::env::temp_dir().join(format!("husk-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("probe.sock");
    let report = dir.join("boot.json");
    let started = Instant::now();
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--cpus", "1", "--mem-mib", "128", "--vsock-socket"])
        .arg(&socket)
        .arg("--boot-report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // As every sandbox's husk-vmm starts: pid 1 of a pid namespace of its own.
    let mut child = crate::container::in_new_pid_namespace(|| cmd.spawn(), &crate::logging::warn)
        .with_context(|| format!("spawning {}", vmm.display()))?;
    let stderr = child.stderr.take();
    let collector = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
        }
        text
    });
    let result = AgentClient::connect(&socket, timeout);
    let outcome = match result {
        Ok((client, handshake)) => {
            let took = started.elapsed();
            // husk-vmm writes its report right after its own handshake with the agent.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !report.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let timeline = std::fs::read_to_string(&report)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            let _ = client.shutdown();
            Ok(Probe {
                took,
                handshake,
                timeline,
            })
        }
        Err(e) => Err(e),
    };
    // Whatever happened, the probe VM must not outlive the check.
    let _ = child.kill();
    let status = child.wait().ok();
    let stderr = collector.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    outcome.map_err(|e| {
        let stderr = stderr.trim();
        let exited = status.map(|s| s.to_string()).unwrap_or_default();
        anyhow::anyhow!("{e}; husk-vmm ({exited}) said: {stderr}")
    })
}
