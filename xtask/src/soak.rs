//! `cargo xtask rig soak`: L3 guests booted back to back in the rig (`husk-bench soak`: 1 and
//! 4 vCPU guests of 128 MiB with the real kernel and agent, and a `husk run` container every
//! fifth boot) while a CPU hog keeps a host core busy, counting how the rig holds up:
//! completed and failed boots, L2 wedges (heartbeat stopped), L2 deaths, and what L2's kernel
//! reported (soft lockups, RCU stalls, oopses, hung tasks). An L2 that fails is replaced by a
//! fresh one that carries on from the next boot, so one soak counts every failure in its
//! budget of boots and minutes. It ends with one line, the tally, also appended to
//! `target/soak/tallies.txt`.

use crate::rig::{self, RigConfig, RigEnd, RigRun};
use crate::testing;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `cargo xtask rig soak`.
pub struct SoakArgs {
    pub boots: usize,
    pub minutes: f64,
    pub hog: bool,
}

/// What a soak counted.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    ok: usize,
    failed: usize,
    by_kind: std::collections::BTreeMap<String, usize>,
    boot_secs: Vec<f64>,
    /// The next boot's number.
    next: usize,
    l2_runs: usize,
    wedges: usize,
    /// Wedges where L2 did not answer the host's NMI.
    deaf_wedges: usize,
    deaths: usize,
    soft_lockups: usize,
    rcu_stalls: usize,
    oopses: usize,
    hung_tasks: usize,
    in_kvm: usize,
}

impl Tally {
    /// Counts the soak's console lines (`soak: boot N KIND ok|FAILED ...`).
    fn add_lines(&mut self, lines: &[String]) {
        for line in lines {
            let mut words = line.split_whitespace().skip(2);
            let (Some(n), Some(kind), Some(result)) = (
                words.next().and_then(|n| n.parse::<usize>().ok()),
                words.next(),
                words.next(),
            ) else {
                continue;
            };
            self.next = self.next.max(n + 1);
            *self.by_kind.entry(kind.to_string()).or_default() += 1;
            if result == "ok" {
                self.ok += 1;
                if let Some(secs) = words.next().and_then(|s| s.parse().ok()) {
                    self.boot_secs.push(secs);
                }
            } else {
                self.failed += 1;
            }
        }
    }

    fn clean(&self) -> bool {
        self.failed
            + self.wedges
            + self.deaths
            + self.soft_lockups
            + self.rcu_stalls
            + self.oopses
            + self.hung_tasks
            == 0
    }

    fn line(&self, config: &RigConfig, hog: bool, secs: f64) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let mut sorted = self.boot_secs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
        format!(
            "soak tally: {} boots ({}), {} ok, {} failed; L2 wedges {} ({} deaf to an NMI), L2 deaths {}, soft lockups {}, \
             RCU stalls {}, oopses {}, hung tasks {} ({} with a trace inside L2's KVM); {} L2 boots, \
             {secs:.0} s, median boot {median:.2} s; host CPU hog {}; {}",
            self.ok + self.failed,
            kinds.join(", "),
            self.ok,
            self.failed,
            self.wedges,
            self.deaf_wedges,
            self.deaths,
            self.soft_lockups,
            self.rcu_stalls,
            self.oopses,
            self.hung_tasks,
            self.in_kvm,
            self.l2_runs,
            if hog { "on" } else { "off" },
            config.describe(),
        )
    }
}

/// A thread that keeps one host CPU busy until dropped: the load a second build or a benchmark
/// puts on a shared machine any day.
struct CpuHog(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl CpuHog {
    fn start() -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut x = 1u64;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
        });
        CpuHog(stop, Some(handle))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

/// How many L2s in a row may fail without a single boot before the soak gives up.
const FRUITLESS_L2_LIMIT: usize = 3;

pub fn soak(args: &SoakArgs) -> Result<()> {
    let config = RigConfig::from_env()?;
    let image = rig::build()?;
    let artifacts = testing::build_vm_artifacts()?;
    let bench_bin = crate::bench::build_husk_bench()?;
    let (mut inputs, env) = testing::rig_vm_inputs(&artifacts);
    inputs.push((bench_bin, "bin/husk-bench".into()));
    eprintln!(
        "xtask: soak: up to {} boots in {} min, host CPU hog {}; {}",
        args.boots,
        args.minutes,
        if args.hog { "on" } else { "off" },
        config.describe()
    );
    let _hog = args.hog.then(CpuHog::start);
    let started = Instant::now();
    let budget = Duration::from_secs_f64(args.minutes * 60.0);
    let mut tally = Tally::default();
    let mut fruitless = 0;
    while tally.next < args.boots && started.elapsed() < budget {
        let left = budget.saturating_sub(started.elapsed());
        let mut job = RigRun::new(
            inputs.clone(),
            Some(format!(
                "husk-bench soak --boots {} --first {} --minutes {:.2}",
                args.boots,
                tally.next,
                left.as_secs_f64() / 60.0
            )),
            env.clone(),
        );
        // The soak stops starting boots at its budget; the last one may take its own bounds.
        job.timeout = left + Duration::from_secs(600);
        job.collect_prefix = Some("soak: boot ".into());
        let before = tally.next;
        let report = rig::run_in_rig_once(&image, &job)?;
        tally.l2_runs += 1;
        tally.add_lines(&report.collected);
        let f = &report.faults;
        tally.soft_lockups += f.soft_lockups;
        tally.rcu_stalls += f.rcu_stalls;
        tally.oopses += f.oopses;
        tally.hung_tasks += f.hung_tasks;
        tally.in_kvm += usize::from(f.in_kvm);
        match report.end {
            RigEnd::Finished(_) => break,
            RigEnd::Wedged => {
                tally.wedges += 1;
                tally.deaf_wedges += usize::from(report.nmi_unanswered);
            }
            RigEnd::Died => tally.deaths += 1,
            RigEnd::TimedOut => bail!("the soak's rig run passed its time limit"),
        }
        eprintln!(
            "xtask: soak: L2 failed after boot {}: {}; a fresh L2 carries on",
            tally.next,
            report.describe()
        );
        fruitless = if tally.next == before {
            fruitless + 1
        } else {
            0
        };
        if fruitless >= FRUITLESS_L2_LIMIT {
            eprintln!("xtask: soak: {FRUITLESS_L2_LIMIT} L2s in a row failed before a single boot; giving up");
            break;
        }
    }
    let line = tally.line(&config, args.hog, started.elapsed().as_secs_f64());
    println!("{line}");
    let dir = crate::util::target_dir().join("soak");
    std::fs::create_dir_all(&dir)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tallies.txt"))?;
    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())?;
    if !tally.clean() {
        bail!("the rig did not hold up (see the tally above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_lines_are_tallied_by_kind_and_result() {
        let mut t = Tally::default();
        t.add_lines(&[
            "soak: boot 0 1vcpu ok 1.50 s".into(),
            "soak: boot 1 4vcpu FAILED after 120.00 s: no handshake".into(),
            "soak: boot 2 1vcpu ok 2.50 s".into(),
            "soak: boot garbage".into(),
        ]);
        assert_eq!((t.ok, t.failed, t.next), (2, 1, 3));
        assert_eq!(t.by_kind.get("1vcpu"), Some(&2));
        assert_eq!(t.by_kind.get("4vcpu"), Some(&1));
        assert_eq!(t.boot_secs, vec![1.5, 2.5]);
        assert!(!t.clean());
    }

    #[test]
    fn a_resumed_soak_counts_on_from_its_first_boot() {
        let mut t = Tally {
            next: 40,
            ..Tally::default()
        };
        t.add_lines(&["soak: boot 40 1vcpu ok 1.00 s".into()]);
        assert_eq!(t.next, 41);
        assert!(t.clean());
    }
}
