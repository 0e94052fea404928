//! `husk-bench cri`: pods through the kubelet's path (CRI) with runtime handler `husk` against
//! the `runc` handler of the same containerd, in the same run (see `husk_tests::cri` for the
//! containerd, images and CNI network it sets up).
//!
//! 1. Pod start: RunPodSandbox, then CreateContainer + StartContainer of one `sleep` container,
//!    timed from the client; the handlers alternate run by run, so drift in the machine's load
//!    hits both alike. Each pod is stopped and removed (untimed) before the next.
//! 2. Idle pod memory: `--idle-pods` pods of each handler, each with one `sleep` container, all
//!    up at once (density); after they settle, the PSS (`/proc/PID/smaps_rollup`) of every
//!    process that did not exist before they started (husk: the shims and VMMs, which include
//!    the guest memory the host backs; runc: the shims, pause and container processes), per
//!    pod. containerd's own growth is left out for both.

use crate::oci::{comm, pids, pss_rss_kib};
use crate::report::Target;
use anyhow::{bail, Context, Result};
use husk_tests::cri::{Cri, HANDLER, RUNC_HANDLER};
use husk_tests::{stats, vm_artifacts};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long pods sit before their memory is read (the guest and shims settle after a start).
const SETTLE: Duration = Duration::from_secs(5);
/// Target: husk's pod start at most this many times runc's (issue: pod start at most 2x).
const START_TARGET: f64 = 2.0;
/// Target: husk's idle pod overhead at most this many MiB.
const IDLE_TARGET_MIB: f64 = 40.0;

pub struct CriOptions {
    pub runs: usize,
    pub idle_pods: usize,
    /// Print what containerd and the shim logged (timestamped) while the last husk pod started:
    /// where its time goes.
    pub trace: bool,
    pub out: PathBuf,
}

/// One timed pod start.
struct Start {
    sandbox_ms: f64,
    container_ms: f64,
}

/// `Pss` in KiB of a process; `None` for kernel threads (no user memory) and processes gone.
fn pss_kib(pid: u32) -> Option<u64> {
    pss_rss_kib(pid)
        .filter(|(_, rss)| *rss > 0)
        .map(|(pss, _)| pss)
}

/// The command name of a process's parent.
fn parent_comm(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: u32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(comm(ppid))
}

fn start_pod(cri: &Cri, handler: &str, name: &str) -> Result<(String, Start)> {
    let config = cri.pod_config(name, &[]);
    let t0 = Instant::now();
    let pod = cri.run_pod(&config, handler).map_err(|e| {
        let logs = cri.ctrd.log_mentioning("husk-vmm exited");
        anyhow::anyhow!(
            "{handler}: RunPodSandbox {name}: {e}\ncontainerd log:\n{}\n{logs}",
            cri.ctrd.log_tail()
        )
    })?;
    let t1 = Instant::now();
    cri.start_container(&pod, &config, "sleeper", &["sleep", "100000"], 0)
        .map_err(|e| anyhow::anyhow!("{handler}: the container of {name}: {e}"))?;
    let t2 = Instant::now();
    Ok((
        pod,
        Start {
            sandbox_ms: (t1 - t0).as_secs_f64() * 1e3,
            container_ms: (t2 - t1).as_secs_f64() * 1e3,
        },
    ))
}

pub fn bench_cri(opts: &CriOptions) -> Result<()> {
    if opts.runs == 0 || opts.idle_pods == 0 {
        bail!("--runs and --idle-pods must be at least 1");
    }
    let artifacts = vm_artifacts("husk-bench cri").context("no usable KVM or artifacts")?;
    let cri = Cri::launch(artifacts)?;
    let handlers = [HANDLER, RUNC_HANDLER];

    // 1. Pod start, alternating handlers (and which goes first).
    let mut starts: Vec<(&str, Start)> = Vec::new();
    for i in 0..opts.runs {
        for k in 0..handlers.len() {
            let handler = handlers[(i + k) % handlers.len()];
            let log_before = cri.ctrd.log_len();
            let (pod, start) = start_pod(&cri, handler, &format!("start-{handler}-{i}"))?;
            if opts.trace && handler == HANDLER && i + 1 == opts.runs {
                eprintln!(
                    "cri bench: what containerd and the shim logged while {pod} started:\n{}",
                    cri.ctrd.log_since(log_before)
                );
                eprintln!(
                    "cri bench: the templates' write sets:\n{}",
                    cri.ctrd.log_mentioning("write set")
                );
            }
            eprintln!(
                "cri bench: start {i}: {handler} RunPodSandbox {:.0} ms + container {:.0} ms = {:.0} ms",
                start.sandbox_ms,
                start.container_ms,
                start.sandbox_ms + start.container_ms
            );
            cri.stop_and_remove_pod(&pod)
                .map_err(|e| anyhow::anyhow!("{handler}: removing {pod}: {e}"))?;
            starts.push((handler, start));
        }
    }

    // 2. Idle pods, all up at once, one handler at a time.
    let mut idle = serde_json::Map::new();
    let mut idle_per_pod = std::collections::BTreeMap::new();
    for handler in handlers {
        let before = pids();
        let mut pods = Vec::new();
        for i in 0..opts.idle_pods {
            let (pod, _) = start_pod(&cri, handler, &format!("idle-{handler}-{i}"))?;
            pods.push(pod);
        }
        std::thread::sleep(SETTLE);
        let mut total_kib = 0u64;
        let mut by_comm: std::collections::BTreeMap<String, (u64, usize)> = Default::default();
        for pid in pids().difference(&before) {
            // Not the pods': the rig's own heartbeat (`sleep` under its shell).
            if parent_comm(*pid).as_deref() == Some("bash") {
                continue;
            }
            if let Some(pss) = pss_kib(*pid) {
                total_kib += pss;
                let entry = by_comm.entry(comm(*pid)).or_default();
                entry.0 += pss;
                entry.1 += 1;
            }
        }
        for pod in &pods {
            cri.stop_and_remove_pod(pod)
                .map_err(|e| anyhow::anyhow!("{handler}: removing {pod}: {e}"))?;
        }
        let per_pod = total_kib as f64 / 1024.0 / opts.idle_pods as f64;
        eprintln!(
            "cri bench: idle: {handler}: {} pods, PSS {:.1} MiB in all, {per_pod:.2} MiB per pod; by process: {by_comm:?}",
            opts.idle_pods,
            total_kib as f64 / 1024.0
        );
        idle_per_pod.insert(handler, per_pod);
        idle.insert(
            handler.to_string(),
            json!({
                "pods": opts.idle_pods,
                "pss_total_mib": total_kib as f64 / 1024.0,
                "pss_per_pod_mib": per_pod,
                "by_process": by_comm
                    .iter()
                    .map(|(c, (kib, n))| json!({"comm": c, "processes": n, "pss_mib": *kib as f64 / 1024.0}))
                    .collect::<Vec<_>>(),
            }),
        );
    }
    // A removed pod's shim exits on its own a moment after containerd lets it go: wait for
    // that, as the cri tests do, before calling anything left behind.
    let mut left = Vec::new();
    let clean = husk_tests::wait_until(Duration::from_secs(60), || {
        left = cri.leftovers();
        left.is_empty()
    });
    if !clean {
        bail!("the bench left pods behind: {left:?}");
    }

    // Report.
    let col = |handler: &str, f: fn(&Start) -> f64| -> Vec<f64> {
        starts
            .iter()
            .filter(|(h, _)| *h == handler)
            .map(|(_, s)| f(s))
            .collect()
    };
    let mut md = format!(
        "| pod start through CRI, {} pods per handler | median | min | max |\n|---|---|---|---|\n",
        opts.runs
    );
    let mut json_starts = serde_json::Map::new();
    let mut total_median = std::collections::BTreeMap::new();
    for handler in handlers {
        for (what, f) in [
            (
                "RunPodSandbox + CreateContainer + StartContainer",
                (|s: &Start| s.sandbox_ms + s.container_ms) as fn(&Start) -> f64,
            ),
            ("RunPodSandbox", |s: &Start| s.sandbox_ms),
            ("CreateContainer + StartContainer", |s: &Start| {
                s.container_ms
            }),
        ] {
            let values = col(handler, f);
            let (median, min, max) = stats(&values);
            md.push_str(&format!(
                "| {handler}: {what} | {median:.0} ms | {min:.0} ms | {max:.0} ms |\n"
            ));
            // The first row of each handler is the whole pod start.
            total_median.entry(handler).or_insert(median);
            json_starts.insert(
                format!("{handler}: {what}"),
                json!({"unit": "ms", "median": median, "min": min, "max": max, "values": values}),
            );
        }
    }
    md.push_str(&format!(
        "\n| idle pods ({} per handler, all up at once) | PSS per pod |\n|---|---|\n",
        opts.idle_pods
    ));
    for handler in handlers {
        md.push_str(&format!(
            "| {handler} | {:.2} MiB |\n",
            idle_per_pod[handler]
        ));
    }
    let start_ratio = total_median[HANDLER] / total_median[RUNC_HANDLER];
    let husk_idle = idle_per_pod[HANDLER];
    let overhead = husk_idle - idle_per_pod[RUNC_HANDLER];
    md.push_str(&format!(
        "\n- pod start, husk / runc (medians): **{start_ratio:.2}x** (target: at most {START_TARGET}x: {})\n\
         - idle pod, husk: **{husk_idle:.1} MiB** per pod (target: at most {IDLE_TARGET_MIB} MiB: {}); \
         above runc's pod: {overhead:.1} MiB\n",
        if start_ratio <= START_TARGET { "met" } else { "NOT met" },
        if husk_idle <= IDLE_TARGET_MIB { "met" } else { "NOT met" },
    ));
    println!("{md}");
    std::fs::write(opts.out.join("cri.md"), &md)?;
    std::fs::write(
        opts.out.join("cri.json"),
        serde_json::to_string_pretty(&json!({
            "start": json_starts,
            "idle": idle,
            "ratio_start_husk_over_runc": start_ratio,
            "idle_pss_per_pod_mib_husk": husk_idle,
            "targets": crate::report::targets_json(&[
                Target::at_most("pod start: husk / runc", Some(start_ratio), START_TARGET, "x"),
                Target::at_most("idle pod, husk: PSS per pod", Some(husk_idle), IDLE_TARGET_MIB, "MiB"),
            ]),
        }))?,
    )?;
    Ok(())
}
