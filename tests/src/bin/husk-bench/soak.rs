//! `husk-bench soak`: L3 guests booted back to back, to find out whether the place they run in
//! (the rig's L2, above all) stays up under a long series of boots. Driven by
//! `cargo xtask rig soak`, which counts what L2's kernel reports around it (wedges, soft
//! lockups, RCU stalls, oopses) and starts a fresh L2 when one fails.
//!
//! The cycle, repeated until `--boots` guests have run or `--minutes` have passed: a 1 vCPU and
//! a 4 vCPU guest of 128 MiB (the real kernel and agent) each booted to the agent's handshake
//! and shut down through it, and every [`RUN_EVERY`]th boot a busybox container through
//! `husk run` instead. Each boot is bounded ([`BOOT_TIMEOUT`] to the handshake, then
//! [`EXIT_TIMEOUT`] to exit); one that misses its bound is killed and counted as failed, and
//! the soak goes on.
//!
//! Every boot prints one line (`soak: boot N KIND ok|FAILED ...`; `cargo xtask rig soak` counts
//! them on the console, so the count survives an L2 that dies mid-soak) and the end prints
//! `soak: tally ...`.

use anyhow::{bail, Context, Result};
use husk_tests::oci::OciEnv;
use husk_tests::{vm_artifacts, Artifacts, TestVmBuilder, BOOT_TIMEOUT};
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Every this many boots, a `husk run` container instead of a bare guest.
const RUN_EVERY: usize = 5;
/// How long a guest may take to exit once asked to (or a container to run to its end).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest memory of every soak guest.
const MEM_MIB: u32 = 128;

/// Options of `husk-bench soak`.
pub struct SoakOptions {
    /// Stop after this many boots.
    pub boots: usize,
    /// Stop starting boots after this long.
    pub duration: Duration,
    /// Number the first boot this (a soak resumed in a fresh L2 continues the count).
    pub first: usize,
}

/// What one boot was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bare { cpus: u8 },
    Container,
}

impl Kind {
    /// The kind of the `n`th boot of a soak (counted from 0 over the whole soak).
    fn of(n: usize) -> Kind {
        if n % RUN_EVERY == RUN_EVERY - 1 {
            Kind::Container
        } else if n.is_multiple_of(2) {
            Kind::Bare { cpus: 1 }
        } else {
            Kind::Bare { cpus: 4 }
        }
    }

    fn label(self) -> String {
        match self {
            Kind::Bare { cpus } => format!("{cpus}vcpu"),
            Kind::Container => "husk-run".into(),
        }
    }
}

pub fn soak(opts: &SoakOptions) -> Result<()> {
    let artifacts = vm_artifacts("husk-bench soak").context("no usable KVM or artifacts")?;
    let oci = OciEnv::new("husk-bench soak").context("husk run needs root")?;
    let bundle = oci.bundle("soak", &["/bin/true"], |_| {});
    let started = Instant::now();
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut n = opts.first;
    while n < opts.boots && started.elapsed() < opts.duration {
        let kind = Kind::of(n);
        let t = Instant::now();
        let result = match kind {
            Kind::Bare { cpus } => boot_bare(&artifacts, cpus),
            Kind::Container => run_container(&oci, &bundle, n),
        };
        let secs = t.elapsed().as_secs_f64();
        let mut line = match &result {
            Ok(()) => {
                ok += 1;
                format!("soak: boot {n} {} ok {secs:.2} s", kind.label())
            }
            Err(e) => {
                failed += 1;
                format!(
                    "soak: boot {n} {} FAILED after {secs:.2} s: {e:#}",
                    kind.label()
                )
            }
        };
        line.push('\n');
        // Straight to stdout, flushed: the host counts these lines as they arrive.
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())?;
        out.flush()?;
        n += 1;
    }
    println!(
        "soak: tally boots={} ok={ok} failed={failed} in {:.0} s",
        ok + failed,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {} boots failed", ok + failed);
    }
    Ok(())
}

/// Boots a bare guest to the agent's handshake, checks it, and shuts it down through the agent.
fn boot_bare(artifacts: &Artifacts, cpus: u8) -> Result<()> {
    // The console (quiet: the kernel prints only emergencies) shows why a guest crashed.
    let mut vm = TestVmBuilder::new(artifacts)
        .cpus(cpus)
        .mem_mib(MEM_MIB)
        .console(true)
        .spawn()?;
    let (client, hello) = vm.connect().map_err(|e| {
        let console = vm.stdout();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("the guest's console ends:\n{}", tail.join("\n")))
    })?;
    if hello.cpus != u32::from(cpus) {
        bail!("the guest has {} vCPUs, asked for {cpus}", hello.cpus);
    }
    client.shutdown().context("agent shutdown")?;
    let status = vm.wait_exit(EXIT_TIMEOUT)?;
    if !status.success() {
        bail!("husk-vmm exited with {status}: {}", vm.stderr());
    }
    Ok(())
}

/// `husk run` of a busybox `/bin/true`, bounded by [`BOOT_TIMEOUT`] + [`EXIT_TIMEOUT`].
fn run_container(oci: &OciEnv, bundle: &std::path::Path, n: usize) -> Result<()> {
    let id = format!("soak-{n}");
    // stderr through a file: the container's husk-vmm holds it too, so a pipe could stay open.
    let err_path = oci.work.path().join("soak-run.err");
    let mut child = oci
        .husk(&["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("spawning husk run")?;
    let deadline = Instant::now() + BOOT_TIMEOUT + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = oci.run(&["delete", "--force", &id]);
            bail!(
                "husk run did not finish within {} s",
                (BOOT_TIMEOUT + EXIT_TIMEOUT).as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        let _ = oci.run(&["delete", "--force", &id]);
        bail!("husk run exited with {status}: {}", stderr.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cycle_alternates_sizes_and_runs_a_container_every_fifth_boot() {
        let kinds: Vec<Kind> = (0..10).map(Kind::of).collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Bare { cpus: 1 },
                Kind::Bare { cpus: 4 },
                Kind::Bare { cpus: 1 },
                Kind::Bare { cpus: 4 },
                Kind::Container,
                Kind::Bare { cpus: 4 },
                Kind::Bare { cpus: 1 },
                Kind::Bare { cpus: 4 },
                Kind::Bare { cpus: 1 },
                Kind::Container,
            ]
        );
    }
}
