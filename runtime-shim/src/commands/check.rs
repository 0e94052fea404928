//! `husk check`: can this host run husk microVMs, and if not, why not.
//!
//! The static checks (/dev/kvm, API version, kvm_pvm, vmx/svm) come from
//! [`husk_vmm::kvm_check`]. With a kernel and initramfs, a probe guest is booted as well: some
//! hosts pass every static check yet cannot run a Linux guest (a paravirtual or emulating KVM),
//! and only a boot tells. The probe is bounded by a timeout, so it reports rather than hangs.

use anyhow::{Context, Result};
use husk_agent_protocol::client::AgentClient;
use husk_vmm::kvm_check::{check_host, KvmUsability};
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
    println!("{}", report.message());
    let mut usable = report.usability == KvmUsability::Usable;
    if let (true, Some(kernel), Some(initramfs)) = (usable, &args.kernel, &args.initramfs) {
        let vmm = args.vmm.clone().unwrap_or_else(default_vmm);
        match probe_boot(&vmm, kernel, initramfs, Duration::from_secs(args.timeout_s)) {
            Ok(took) => println!("probe guest: agent answered after {} ms", took.as_millis()),
            Err(e) => {
                println!("probe guest: FAILED: {e:#}");
                usable = false;
            }
        }
    } else if usable {
        println!("probe guest: not run (pass --kernel and --initramfs to boot one)");
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

/// Boots a 1 vCPU / 128 MiB guest, waits for the agent's handshake, shuts it down.
fn probe_boot(vmm: &Path, kernel: &Path, initramfs: &Path, timeout: Duration) -> Result<Duration> {
    let dir = std::env::temp_dir().join(format!("husk-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("probe.sock");
    let started = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--cpus", "1", "--mem-mib", "128", "--vsock-socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
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
        Ok((client, _)) => {
            let took = started.elapsed();
            let _ = client.shutdown();
            Ok(took)
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
