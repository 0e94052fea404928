//! `husk-bench density`: how many idle sandboxes fit, and what each costs, husk against runc,
//! crun and runsc in the same run. Driven by `cargo xtask bench density`; writes `density.md`,
//! `density.json`, `density.csv` and `density.svg` to `--out`.
//!
//! For each runtime in turn:
//! 1. **One after another**: idle `sleep` containers (husk: 1 vCPU, 128 MiB guests, warm start as
//!    by default) started with `run --detach` until `--max` are up or the host's
//!    `MemAvailable` falls below its guard (a tenth of `MemTotal`, at least 768 MiB): the bench
//!    stops cleanly before the host is in danger; or until `--minutes` have passed (gVisor's
//!    starts slow down as its sandboxes accumulate). One untimed start and delete comes first
//!    (husk builds its template of this size on first use). Each start is timed; at each checkpoint
//!    (1, 2, 5, 10, 20, 50, 100, ... and the last) the PSS sum of every process the runtime
//!    started (as `husk-bench oci` counts them: for husk its `husk-vmm`s, guest memory
//!    included) and the drop of `MemAvailable` since the first start are read. The last point
//!    is read again after [`SETTLE`], when the guests' free page reporting has handed back
//!    what their start freed.
//! 2. **With `--in-flight` at once**: `--parallel` containers started by that many threads;
//!    the rate is containers per second of wall time.
//!
//! Everything started is deleted (`--in-flight` at a time, untimed) before the next runtime.

use crate::oci::{
    exe_id, last_lines, loud, our_executables, path_str, peers, pids, pss_rss_kib, run_cmd, tail,
    Bench, Peers, Runtime,
};
use crate::report::Target;
use anyhow::{bail, Context, Result};
use husk_tests::stats;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the last point waits before it is read again (the guest's free page reporting runs
/// 2 s after memory is freed, in passes).
const SETTLE: Duration = Duration::from_secs(10);
/// Guest memory of each husk sandbox, in MiB.
const GUEST_MEM_MIB: u32 = 128;
/// Target: an idle husk sandbox's PSS at most this many MiB.
const IDLE_TARGET_MIB: f64 = 16.0;
/// Target: at least this many idle husk sandboxes at once.
const COUNT_TARGET: usize = 500;
/// Target: husk's start rate with `--in-flight` at once at least this times runc's.
const RATE_TARGET: f64 = 0.5;

/// What `husk-bench density` was asked for.
pub struct DensityOptions {
    /// The most sandboxes started one after another, per runtime.
    pub max: usize,
    /// The longest the one-after-another part may take, per runtime.
    pub budget: Duration,
    /// Sandboxes started at once in the second part.
    pub in_flight: usize,
    /// Sandboxes started in the second part, per runtime.
    pub parallel: usize,
    pub quick: bool,
    pub dir: PathBuf,
    pub out: PathBuf,
    pub timeout: Duration,
}

/// One point of a runtime's curve.
#[derive(Clone, Debug)]
struct Point {
    count: usize,
    pss_mib: f64,
    avail_drop_mib: f64,
    /// The start that made this count, in ms.
    start_ms: f64,
}

/// One runtime's results.
#[derive(Default)]
struct Curve {
    points: Vec<Point>,
    starts_ms: Vec<f64>,
    /// The last point, read again after [`SETTLE`].
    settled: Option<Point>,
    /// Why the curve ended before `--max`, if it did.
    stopped: Option<String>,
    /// Containers per second with `--in-flight` at once.
    rate: Option<f64>,
}

/// `MemTotal` and `MemAvailable` in MiB.
fn meminfo() -> Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Result<f64> {
        let kib: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("no {name} in /proc/meminfo"))?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Writes to the bench's log what the host looked like when a start failed: the kernel's
/// task and memory accounting and its last messages (an OOM kill, a limit reached), so a stop
/// short of `--max` can be explained from the log alone.
fn log_host_state(runtime: &str) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let meminfo = read("/proc/meminfo");
    const FIELDS: [&str; 6] = [
        "MemTotal:",
        "MemAvailable:",
        "Committed_AS:",
        "CommitLimit:",
        "Slab:",
        "Shmem:",
    ];
    let memory: Vec<String> = meminfo
        .lines()
        .filter(|l| FIELDS.iter().any(|f| l.starts_with(f)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    eprintln!(
        "density bench: {runtime}: host at the failed start: loadavg {}; threads-max {}; pid_max {}; {}",
        read("/proc/loadavg").trim(),
        read("/proc/sys/kernel/threads-max").trim(),
        read("/proc/sys/kernel/pid_max").trim(),
        memory.join(", ")
    );
    match std::process::Command::new("dmesg").output() {
        Ok(out) => {
            for line in last_lines(&String::from_utf8_lossy(&out.stdout), 40) {
                eprintln!("density bench: dmesg: {line}");
            }
        }
        Err(e) => eprintln!("density bench: dmesg: {e}"),
    }
}

/// Counts at which the curve is read: 1, 2, 5, 10, 20, 50, ...
fn is_checkpoint(n: usize) -> bool {
    let mut decade = 1;
    while decade <= n {
        if [decade, 2 * decade, 5 * decade].contains(&n) {
            return true;
        }
        decade *= 10;
    }
    false
}

/// PSS sum in MiB of the processes started since `before` that run one of `ours`.
fn pss_sum_mib(before: &BTreeSet<u32>, ours: &BTreeSet<(u64, u64)>) -> f64 {
    let kib: u64 = pids()
        .difference(before)
        .filter(|pid| exe_id(**pid).is_some_and(|id| ours.contains(&id)))
        .filter_map(|pid| pss_rss_kib(*pid).map(|(p, _)| p))
        .sum();
    kib as f64 / 1024.0
}

/// Runs `f(i)` for `i` in `0..count` on `threads` threads; the first error ends the work.
fn in_parallel(count: usize, threads: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count || failed.lock().map_or(true, |f| f.is_some()) {
                    return;
                }
                if let Err(e) = f(i) {
                    if let Ok(mut slot) = failed.lock() {
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

fn start(rt: &Runtime, bundle: &Path, id: &str, scratch: &Path, timeout: Duration) -> Result<f64> {
    let o = run_cmd(
        rt.command(&["run", "--detach", "--bundle", path_str(bundle)?, id]),
        scratch,
        timeout,
    )?;
    if !o.status.success() {
        bail!(
            "{} run --detach {id} failed ({}): {}",
            rt.name,
            o.status,
            tail(&o.stderr)
        );
    }
    Ok(o.wall.as_secs_f64() * 1e3)
}

/// Deletes `ids` of `rt`, `threads` at a time.
fn delete_all(rt: &Runtime, ids: &[String], threads: usize, scratch: &Path, timeout: Duration) {
    let _ = in_parallel(ids.len(), threads, |i| {
        let o = run_cmd(
            rt.command(&["delete", "--force", &ids[i]]),
            scratch,
            timeout,
        )?;
        if !o.status.success() {
            loud(&format!(
                "{} delete --force {} failed: {}",
                rt.name,
                ids[i],
                tail(&o.stderr)
            ));
        }
        Ok(())
    });
}

fn measure(
    rt: &Runtime,
    bundle: &Path,
    ours: &BTreeSet<(u64, u64)>,
    opts: &DensityOptions,
    scratch: &Path,
) -> Result<Curve> {
    let mut curve = Curve::default();
    let (total, avail0) = meminfo()?;
    let guard = (total / 10.0).max(768.0);
    let warmup = format!("density-{}-warmup", rt.name);
    let warm = start(rt, bundle, &warmup, scratch, opts.timeout);
    delete_all(rt, std::slice::from_ref(&warmup), 1, scratch, opts.timeout);
    warm?;
    let before = pids();
    let mut ids = Vec::new();
    let began = Instant::now();
    let result = (|| -> Result<()> {
        for n in 1..=opts.max {
            if began.elapsed() > opts.budget {
                curve.stopped = Some(format!(
                    "stopped at {} sandboxes: the time budget of {:.0} min",
                    n - 1,
                    opts.budget.as_secs_f64() / 60.0
                ));
                return Ok(());
            }
            let (_, avail) = meminfo()?;
            if avail < guard {
                curve.stopped = Some(format!(
                    "stopped at {} sandboxes: MemAvailable {avail:.0} MiB is below the guard of {guard:.0} MiB",
                    n - 1
                ));
                return Ok(());
            }
            // Ids of one length: runsc takes an id as a prefix ("-1" would also name "-10").
            let id = format!("density-{}-{n:04}", rt.name);
            ids.push(id.clone());
            let ms = match start(rt, bundle, &id, scratch, opts.timeout) {
                Ok(ms) => ms,
                Err(e) => {
                    curve.stopped = Some(format!("stopped at {} sandboxes: {e:#}", n - 1));
                    log_host_state(rt.name);
                    return Ok(());
                }
            };
            curve.starts_ms.push(ms);
            if is_checkpoint(n) || n == opts.max {
                let (_, avail) = meminfo()?;
                let point = Point {
                    count: n,
                    pss_mib: pss_sum_mib(&before, ours),
                    avail_drop_mib: avail0 - avail,
                    start_ms: ms,
                };
                eprintln!(
                    "density bench: {} x{n}: PSS {:.1} MiB ({:.2} each), MemAvailable -{:.0} MiB, start {ms:.0} ms",
                    rt.name,
                    point.pss_mib,
                    point.pss_mib / n as f64,
                    point.avail_drop_mib
                );
                curve.points.push(point);
            }
        }
        Ok(())
    })();
    let count = curve.starts_ms.len();
    if result.is_ok() && count > 0 {
        if curve.points.last().is_none_or(|p| p.count != count) {
            curve.points.push(Point {
                count,
                pss_mib: pss_sum_mib(&before, ours),
                avail_drop_mib: avail0 - meminfo()?.1,
                start_ms: curve.starts_ms[count - 1],
            });
        }
        std::thread::sleep(SETTLE);
        let settled = Point {
            count,
            pss_mib: pss_sum_mib(&before, ours),
            avail_drop_mib: avail0 - meminfo()?.1,
            start_ms: curve.starts_ms[count - 1],
        };
        eprintln!(
            "density bench: {} x{count} after {} s: PSS {:.1} MiB ({:.2} each), MemAvailable -{:.0} MiB",
            rt.name,
            SETTLE.as_secs(),
            settled.pss_mib,
            settled.pss_mib / count as f64,
            settled.avail_drop_mib
        );
        curve.settled = Some(settled);
    }
    delete_all(rt, &ids, opts.in_flight, scratch, opts.timeout);
    result?;
    if let Some(why) = &curve.stopped {
        loud(&format!("{}: {why}", rt.name));
    }

    // 2. `in_flight` at once.
    let ids: Vec<String> = (0..opts.parallel)
        .map(|i| format!("burst-{}-{i:04}", rt.name))
        .collect();
    let t0 = Instant::now();
    let burst = in_parallel(ids.len(), opts.in_flight, |i| {
        start(rt, bundle, &ids[i], scratch, opts.timeout).map(|_| ())
    });
    let wall = t0.elapsed().as_secs_f64();
    delete_all(rt, &ids, opts.in_flight, scratch, opts.timeout);
    match burst {
        Ok(()) => {
            let rate = ids.len() as f64 / wall;
            eprintln!(
                "density bench: {}: {} started {} at a time in {wall:.1} s: {rate:.2}/s",
                rt.name,
                ids.len(),
                opts.in_flight
            );
            curve.rate = Some(rate);
        }
        Err(e) => loud(&format!(
            "{}: starting {} at a time failed: {e:#}",
            rt.name, opts.in_flight
        )),
    }
    Ok(curve)
}

pub fn bench_density(opts: &DensityOptions) -> Result<()> {
    if opts.max == 0 || opts.in_flight == 0 || opts.parallel == 0 {
        bail!("--max, --in-flight and --parallel must be at least 1");
    }
    let artifacts = husk_tests::vm_artifacts("husk-bench density").context(
        "husk cannot run microVMs here (no usable KVM, or HUSK_KERNEL/HUSK_INITRAMFS unset)",
    )?;
    let husk = husk_tests::oci::husk_binary();
    std::fs::create_dir_all(&opts.out)?;
    let bench = Bench::build_with(&husk, &opts.dir, |_| Ok(()))?;
    let Peers {
        runtimes,
        versions,
        mut notes,
        containers,
        scratch,
        ..
    } = peers(
        &husk,
        &artifacts,
        &bench,
        &opts.dir,
        Path::new("/run/husk-bench-density"),
        false,
        "the density comparison with gVisor",
        opts.timeout,
    )?;
    drop(containers);
    let sleep = bench.bundle_with(
        "sleep",
        &["sleep", "1000000"],
        &[
            ("io.husk.vm.mem_mib", GUEST_MEM_MIB.to_string()),
            ("io.husk.vm.cpus", "1".to_string()),
        ],
        |_| {},
    )?;
    let ours = our_executables(&runtimes, &artifacts.vmm, &bench.rootfs)?;
    let mut curves = BTreeMap::new();
    for rt in &runtimes {
        let curve = measure(rt, &sleep, &ours, opts, &scratch)
            .with_context(|| format!("{}'s density run", rt.name))?;
        if let Some(why) = &curve.stopped {
            notes.push(format!("{}: {why}", rt.name));
        }
        curves.insert(rt.name, curve);
    }
    let names: Vec<&'static str> = runtimes.iter().map(|rt| rt.name).collect();
    report(opts, &names, &versions, &curves, &notes)
}

/// The median start of the last tenth of a curve's starts (at least one).
fn late_start_ms(curve: &Curve) -> Option<f64> {
    let n = curve.starts_ms.len();
    let tail = &curve.starts_ms[n - (n / 10).max(1).min(n)..];
    (!tail.is_empty()).then(|| stats(tail).0)
}

fn report(
    opts: &DensityOptions,
    runtimes: &[&'static str],
    versions: &BTreeMap<&'static str, String>,
    curves: &BTreeMap<&'static str, Curve>,
    notes: &[String],
) -> Result<()> {
    let mut md = format!(
        "## Density (`cargo xtask bench density{}`)\n\n\
         Idle `sleep` containers (husk: 1 vCPU, {GUEST_MEM_MIB} MiB guests, warm start) started \
         one after another up to {} or until the host's MemAvailable guard, then {} with {} at \
         once; per sandbox figures are read {} s after the last start.\n\n",
        if opts.quick { " --quick" } else { "" },
        opts.max,
        opts.parallel,
        opts.in_flight,
        SETTLE.as_secs()
    );
    for rt in runtimes {
        md.push_str(&format!(
            "- {rt}: {}\n",
            versions.get(rt).map_or("", String::as_str)
        ));
    }
    md.push_str(&format!(
        "\n| figure | {} | husk / runc |\n|{}\n",
        runtimes.join(" | "),
        "---|".repeat(runtimes.len() + 2)
    ));
    type Getter = fn(&Curve) -> Option<f64>;
    let rows: [(&str, &str, Getter, usize); 6] = [
        (
            "count",
            "sandboxes up at once",
            |c| Some(c.starts_ms.len() as f64),
            0,
        ),
        (
            "pss_each",
            "PSS per sandbox (MiB)",
            |c| c.settled.as_ref().map(|p| p.pss_mib / p.count as f64),
            2,
        ),
        (
            "avail_each",
            "MemAvailable drop per sandbox (MiB)",
            |c| {
                c.settled
                    .as_ref()
                    .map(|p| p.avail_drop_mib / p.count as f64)
            },
            2,
        ),
        (
            "start",
            "start, median of all (ms)",
            |c| (!c.starts_ms.is_empty()).then(|| stats(&c.starts_ms).0),
            0,
        ),
        (
            "start_late",
            "start, median of the last tenth (ms)",
            late_start_ms,
            0,
        ),
        (
            "rate",
            "starts per second, in flight at once",
            |c| c.rate,
            2,
        ),
    ];
    let mut missing = Vec::new();
    let mut figures = serde_json::Map::new();
    for (key, title, get, decimals) in rows {
        md.push_str(&format!("| {title} |"));
        let mut per_rt = serde_json::Map::new();
        for rt in runtimes {
            let value = curves.get(rt).and_then(get);
            match value {
                Some(v) => md.push_str(&format!(" {v:.decimals$} |")),
                None => md.push_str(" - |"),
            }
            if value.is_none() && (*rt == "husk" || *rt == "runc") {
                missing.push(format!("{key} for {rt}"));
            }
            per_rt.insert(rt.to_string(), json!(value));
        }
        let ratio =
            (|| Some(curves.get("husk").and_then(get)? / curves.get("runc").and_then(get)?))();
        md.push_str(&format!(
            " {} |\n",
            ratio.map_or("-".to_string(), |r| format!("{r:.2}x"))
        ));
        figures.insert(key.to_string(), serde_json::Value::Object(per_rt));
    }
    // Targets.
    let husk = curves.get("husk");
    let pss_each = husk
        .and_then(|c| c.settled.as_ref())
        .map(|p| p.pss_mib / p.count as f64);
    let count = husk.map_or(0, |c| c.starts_ms.len());
    let rate_ratio = (|| Some(husk?.rate? / curves.get("runc")?.rate?))();
    // A run bounded below the target count (--max) does not measure that target.
    let count_measured = opts.max >= COUNT_TARGET || count < opts.max;
    let targets = [
        Target::at_most(
            "an idle husk sandbox's PSS, many at once",
            pss_each,
            IDLE_TARGET_MIB,
            "MiB",
        ),
        Target::at_least(
            "idle husk sandboxes up at once",
            count_measured.then_some(count as f64),
            COUNT_TARGET as f64,
            "",
        ),
        Target::at_least(
            format!("start rate with {} in flight: husk / runc", opts.in_flight),
            rate_ratio,
            RATE_TARGET,
            "x",
        ),
    ];
    md.push_str("\n### Targets\n\n");
    for t in &targets {
        md.push_str(&t.md_line());
    }
    md.push_str(
        "\n### The curve\n\nPSS sum (MiB) and that start's latency (ms) as the count grows:\n\n",
    );
    md.push_str(&format!(
        "| count | {} |\n|{}\n",
        runtimes
            .iter()
            .map(|rt| format!("{rt} PSS | {rt} start"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(2 * runtimes.len() + 1)
    ));
    let counts: BTreeSet<usize> = curves
        .values()
        .flat_map(|c| c.points.iter().map(|p| p.count))
        .collect();
    let mut csv = String::from("runtime,count,pss_mib,avail_drop_mib,start_ms\n");
    for n in &counts {
        md.push_str(&format!("| {n} |"));
        for rt in runtimes {
            match curves
                .get(rt)
                .and_then(|c| c.points.iter().find(|p| p.count == *n))
            {
                Some(p) => md.push_str(&format!(" {:.1} | {:.0} |", p.pss_mib, p.start_ms)),
                None => md.push_str(" - | - |"),
            }
        }
        md.push('\n');
    }
    let mut json_curves = serde_json::Map::new();
    for (rt, curve) in curves {
        let points: Vec<_> = curve
            .points
            .iter()
            .map(|p| {
                csv.push_str(&format!(
                    "{rt},{},{:.2},{:.2},{:.1}\n",
                    p.count, p.pss_mib, p.avail_drop_mib, p.start_ms
                ));
                json!({"count": p.count, "pss_mib": p.pss_mib, "avail_drop_mib": p.avail_drop_mib, "start_ms": p.start_ms})
            })
            .collect();
        json_curves.insert(
            rt.to_string(),
            json!({"points": points, "starts_ms": curve.starts_ms, "stopped": curve.stopped}),
        );
    }
    md.push_str("\n![PSS sum and start latency as idle sandboxes accumulate](density.svg)\n");
    md.push_str(&crate::oci::Report::notes(notes));
    std::fs::write(opts.out.join("density.md"), &md)?;
    std::fs::write(opts.out.join("density.csv"), csv)?;
    std::fs::write(opts.out.join("density.svg"), svg(runtimes, curves))?;
    std::fs::write(
        opts.out.join("density.json"),
        serde_json::to_string_pretty(&json!({
            "quick": opts.quick,
            "max": opts.max,
            "in_flight": opts.in_flight,
            "parallel": opts.parallel,
            "figures": figures,
            "curves": json_curves,
            "targets": crate::report::targets_json(&targets),
        }))?,
    )?;
    eprintln!("{md}");
    if !missing.is_empty() {
        for m in &missing {
            loud(&format!("no figure: {m}"));
        }
        bail!(
            "the density benchmark left {} figure(s) unmeasured",
            missing.len()
        );
    }
    Ok(())
}

/// Two line plots over the sandbox count: the PSS sum, and each start's latency (on a log
/// scale: runsc's late starts are a hundred times husk's).
fn svg(runtimes: &[&'static str], curves: &BTreeMap<&'static str, Curve>) -> String {
    let series = |of: &dyn Fn(&Curve) -> Vec<(f64, f64)>| {
        runtimes
            .iter()
            .filter_map(|rt| Some((rt.to_string(), of(curves.get(rt)?))))
            .collect()
    };
    crate::plot::lines(&[
        crate::plot::LinePanel {
            title: "PSS sum of the idle sandboxes (MiB)".into(),
            x_label: "sandboxes",
            log_y: false,
            series: series(&|c| {
                c.points
                    .iter()
                    .map(|p| (p.count as f64, p.pss_mib))
                    .collect()
            }),
        },
        crate::plot::LinePanel {
            title: "start latency of each sandbox (ms)".into(),
            x_label: "sandboxes",
            log_y: true,
            series: series(&|c| {
                c.starts_ms
                    .iter()
                    .enumerate()
                    .map(|(i, ms)| ((i + 1) as f64, *ms))
                    .collect()
            }),
        },
    ])
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_one_two_five_per_decade() {
        let got: Vec<usize> = (1..=120).filter(|n| is_checkpoint(*n)).collect();
        assert_eq!(got, vec![1, 2, 5, 10, 20, 50, 100]);
    }

    #[test]
    fn parallel_work_does_every_index_once_and_reports_a_failure() {
        let seen = Mutex::new(Vec::new());
        in_parallel(25, 8, |i| {
            seen.lock().unwrap().push(i);
            Ok(())
        })
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, (0..25).collect::<Vec<_>>());
        let err = in_parallel(25, 4, |i| {
            if i == 3 {
                bail!("index 3")
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "index 3");
    }
}
