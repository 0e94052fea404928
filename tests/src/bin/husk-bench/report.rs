//! `husk-bench report`: the benchmark report (BENCHMARKS.md) from one run of every suite.
//!
//! `cargo xtask bench` runs the suites (boot, oci, cri, fs, net, density) one after another in
//! one place, each writing `<suite>.md` and `<suite>.json` into one results folder, then
//! describes the run in `run.json` (commit, time, the machines, each suite's exit status and
//! duration) and calls this to write the report: one headline table of husk against runc, crun
//! and runsc (medians of this run, and the ratios), every target the suites check with its
//! verdict, the plots (start latency, memory per sandbox, the density curve), the machine and
//! versions, the method, the command that reproduces it, and below all that every suite's own
//! tables. Nothing in it is typed by hand: a figure the run did not produce is shown as `-`, and
//! the report fails (after writing) when husk's or runc's headline figure is missing.
//!
//! [`Target`] is the shape in which every suite writes its targets (`"targets"` in its JSON).

use anyhow::{bail, Context, Result};
use husk_tests::stats;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::plot::{self, Panel};

/// The suites, in the order they run and are reported.
pub(crate) const SUITES: [(&str, &str); 6] = [
    ("boot", "Boot: husk-vmm against QEMU's microvm"),
    ("oci", "OCI runtimes: start, idle memory, syscalls"),
    ("cri", "Pods through CRI"),
    ("fs", "The container's files"),
    ("net", "The container's network"),
    ("density", "Density: idle sandboxes accumulated"),
];

/// The runtimes of the headline table, in column order.
const RUNTIMES: [&str; 4] = ["husk", "runc", "crun", "runsc"];

/// A goal a suite checks: a figure and its bound (at most, or at least).
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) value: Option<f64>,
    pub(crate) bound: f64,
    pub(crate) at_least: bool,
    /// `x` for a ratio, else the figure's unit (`MiB`, `%`, `` for a count).
    pub(crate) unit: String,
}

impl Target {
    pub(crate) fn at_most(
        what: impl Into<String>,
        value: Option<f64>,
        bound: f64,
        unit: &str,
    ) -> Target {
        Target {
            what: what.into(),
            value: value.filter(|v| v.is_finite()),
            bound,
            at_least: false,
            unit: unit.into(),
        }
    }

    pub(crate) fn at_least(
        what: impl Into<String>,
        value: Option<f64>,
        bound: f64,
        unit: &str,
    ) -> Target {
        Target {
            at_least: true,
            ..Target::at_most(what, value, bound, unit)
        }
    }

    pub(crate) fn met(&self) -> Option<bool> {
        let v = self.value?;
        Some(if self.at_least {
            v >= self.bound
        } else {
            v <= self.bound
        })
    }

    pub(crate) fn verdict(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "**not measured**",
        }
    }

    fn fmt(&self, v: f64) -> String {
        match self.unit.as_str() {
            "x" => format!("{}x", plot::num(v)),
            "" => plot::num(v),
            unit => format!("{} {unit}", plot::num(v)),
        }
    }

    /// The bound as the report writes it: "at most 1.5x".
    pub(crate) fn bound_text(&self) -> String {
        format!(
            "{} {}",
            if self.at_least { "at least" } else { "at most" },
            self.fmt(self.bound)
        )
    }

    pub(crate) fn value_text(&self) -> String {
        self.value.map_or_else(|| "-".into(), |v| self.fmt(v))
    }

    /// A Markdown list item: what, value, bound, verdict.
    pub(crate) fn md_line(&self) -> String {
        format!(
            "- {}: {} (target {}): {}\n",
            self.what,
            self.value_text(),
            self.bound_text(),
            self.verdict()
        )
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "what": self.what,
            "value": self.value,
            "bound": self.bound,
            "at_least": self.at_least,
            "unit": self.unit,
            "met": self.met(),
        })
    }

    fn from_json(v: &Value) -> Option<Target> {
        Some(Target {
            what: v.get("what")?.as_str()?.to_string(),
            value: v.get("value").and_then(Value::as_f64),
            bound: v.get("bound")?.as_f64()?,
            at_least: v.get("at_least")?.as_bool()?,
            unit: v.get("unit")?.as_str()?.to_string(),
        })
    }
}

/// The JSON list of a suite's targets.
pub(crate) fn targets_json(targets: &[Target]) -> Value {
    Value::Array(targets.iter().map(Target::json).collect())
}

pub(crate) struct ReportOptions {
    /// The results folder: each suite's `.md` and `.json`, `run.json`, the suites' `.svg`s.
    pub(crate) results: PathBuf,
    /// The report to write.
    pub(crate) out: PathBuf,
    /// Where the plots go (the suites' and the report's own).
    pub(crate) plots: PathBuf,
    /// How the report links to the plots folder (`docs/bench`).
    pub(crate) link: String,
}

/// A headline row: title, unit, whether more is better, each runtime's median.
struct Row {
    title: String,
    unit: &'static str,
    more_is_better: bool,
    values: BTreeMap<&'static str, f64>,
}

/// The results of one run, as the suites wrote them.
struct Results {
    suites: BTreeMap<&'static str, Value>,
    run: Value,
}

impl Results {
    fn load(dir: &Path) -> Result<Results> {
        let read = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(format!("{name}.json"));
            if !path.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not JSON", path.display())
            })?))
        };
        let mut suites = BTreeMap::new();
        for (suite, _) in SUITES {
            if let Some(v) = read(suite)? {
                suites.insert(suite, v);
            }
        }
        let run = read("run")?.context("run.json (the run's description) is missing")?;
        Ok(Results { suites, run })
    }

    fn suite(&self, name: &str) -> Option<&Value> {
        self.suites.get(name)
    }

    /// `oci.json`: `figures.KEY.runtimes.RT.median`.
    fn oci(&self, key: &str, rt: &str) -> Option<f64> {
        self.suite("oci")?
            .pointer(&format!("/figures/{key}/runtimes/{rt}/median"))?
            .as_f64()
    }

    fn oci_values(&self, key: &str, rt: &str) -> Vec<f64> {
        numbers(
            self.suite("oci")
                .and_then(|s| s.pointer(&format!("/figures/{key}/runtimes/{rt}/values"))),
        )
    }

    /// `fs.json` and `net.json`: `figures.KEY.RT` is every sample.
    fn samples_median(&self, suite: &str, key: &str, rt: &str) -> Option<f64> {
        let v = numbers(self.suite(suite)?.pointer(&format!("/figures/{key}/{rt}")));
        (!v.is_empty()).then(|| stats(&v).0)
    }

    /// `density.json`: `figures.KEY.RT` is one number.
    fn density(&self, key: &str, rt: &str) -> Option<f64> {
        self.suite("density")?
            .pointer(&format!("/figures/{key}/{rt}"))?
            .as_f64()
    }

    fn cri_start(&self, handler: &str) -> Option<&Value> {
        self.suite("cri")?.get("start")?.get(format!(
            "{handler}: RunPodSandbox + CreateContainer + StartContainer"
        ))
    }

    fn cri_idle(&self, handler: &str) -> Option<f64> {
        self.suite("cri")?
            .pointer(&format!("/idle/{handler}/pss_per_pod_mib"))?
            .as_f64()
    }

    fn row(
        &self,
        title: impl Into<String>,
        unit: &'static str,
        more_is_better: bool,
        get: impl Fn(&str) -> Option<f64>,
    ) -> Row {
        Row {
            title: title.into(),
            unit,
            more_is_better,
            values: RUNTIMES
                .iter()
                .filter_map(|rt| Some((*rt, get(rt).filter(|v| v.is_finite())?)))
                .collect(),
        }
    }

    fn headline(&self) -> Vec<Row> {
        let density_n = self
            .density("count", "husk")
            .map_or(String::new(), |n| format!(" ({n:.0} up)"));
        fn cri_handler(rt: &str) -> Option<&str> {
            (rt == "husk" || rt == "runc").then_some(rt)
        }
        vec![
            self.row("`run` of /bin/true, end to end", "ms", false, |rt| {
                self.oci("run_true", rt)
            }),
            self.row("`create` of it", "ms", false, |rt| {
                self.oci("split_create", rt)
            }),
            self.row(
                "pod start through CRI (sandbox and one container)",
                "ms",
                false,
                |rt| self.cri_start(cri_handler(rt)?)?.get("median")?.as_f64(),
            ),
            self.row("idle sandbox alone, PSS", "MiB", false, |rt| {
                self.oci("idle_pss", rt)
            }),
            self.row(
                format!("idle sandboxes at once, PSS each{density_n}"),
                "MiB",
                false,
                |rt| self.density("pss_each", rt),
            ),
            self.row("idle pod through CRI, PSS each", "MiB", false, |rt| {
                self.cri_idle(cri_handler(rt)?)
            }),
            self.row("idle sandboxes up at once (run's bound)", "", true, |rt| {
                self.density("count", rt)
            }),
            self.row("starts per second, 8 in flight", "/s", true, |rt| {
                self.density("rate", rt)
            }),
            self.row("syscalls: `dd bs=1`, per byte", "µs", false, |rt| {
                self.oci("dd_per_byte", rt)
            }),
            self.row("read small files (rootfs), cold", "s", false, |rt| {
                self.samples_median("fs", "rootfs_small_cold", rt)
            }),
            self.row("read small files (rootfs), warm", "s", false, |rt| {
                self.samples_median("fs", "rootfs_small_warm", rt)
            }),
            self.row("read a big file (rootfs), cold", "s", false, |rt| {
                self.samples_median("fs", "rootfs_seq_read_cold", rt)
            }),
            self.row(
                "unpack a small-file tree (rootfs, `tar`)",
                "s",
                false,
                |rt| self.samples_median("fs", "rootfs_untar", rt),
            ),
            self.row("TCP throughput, host to container", "MiB/s", true, |rt| {
                self.samples_median("net", "to_container", rt)
            }),
            self.row("TCP round trip, 64 bytes", "µs", false, |rt| {
                self.samples_median("net", "echo", rt)
            }),
        ]
    }

    fn targets(&self) -> Vec<(&'static str, Target)> {
        let mut out = Vec::new();
        for (suite, _) in SUITES {
            if let Some(list) = self.suite(suite).and_then(|s| s.get("targets")?.as_array()) {
                out.extend(
                    list.iter()
                        .filter_map(Target::from_json)
                        .map(|t| (suite, t)),
                );
            }
        }
        out
    }
}

fn numbers(v: Option<&Value>) -> Vec<f64> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn cell(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".into(),
        Some(v) if unit.is_empty() => format!("{v:.0}"),
        Some(v) => plot::num(v),
    }
}

fn ratio(row: &Row, peer: &str) -> String {
    match (row.values.get("husk"), row.values.get(peer)) {
        (Some(h), Some(p)) if *p > 0.0 => format!("{}x", plot::num(h / p)),
        _ => "-".into(),
    }
}

/// Writes the report and its plots. Fails, after writing, when a headline figure of husk or
/// runc is missing or a suite of the run failed.
pub(crate) fn report(opts: &ReportOptions) -> Result<()> {
    let results = Results::load(&opts.results)?;
    std::fs::create_dir_all(&opts.plots)?;
    let rows = results.headline();
    let mut problems = Vec::new();
    for row in &rows {
        for rt in ["husk", "runc"] {
            if !row.values.contains_key(rt) {
                problems.push(format!("no headline figure: {} for {rt}", row.title));
            }
        }
    }
    for (name, exit, _) in suites_run(&results.run) {
        if exit != 0 {
            problems.push(format!("suite {name} failed (exit {exit})"));
        }
    }
    let md = markdown(opts, &results, &rows, &problems)?;
    std::fs::write(&opts.out, md).with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("bench: the report is in {}", opts.out.display());
    if !problems.is_empty() {
        for p in &problems {
            crate::oci::loud(p);
        }
        bail!("the benchmark run is incomplete: {}", problems.join("; "));
    }
    Ok(())
}

fn markdown(
    opts: &ReportOptions,
    r: &Results,
    rows: &[Row],
    problems: &[String],
) -> Result<String> {
    let run = &r.run;
    let s = |key: &str| {
        run.get(key)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    let quick = run.get("quick").and_then(Value::as_bool).unwrap_or(false);
    let minutes = run.get("secs").and_then(Value::as_f64).unwrap_or(f64::NAN) / 60.0;
    let link = |file: &str| format!("{}/{file}", opts.link);
    let mut md = String::from("# husk benchmarks\n\n");
    let _ = write!(
        md,
        "husk against the namespace runtimes runc and crun and against gVisor's runsc, from one run \
         of `{}` at commit `{}` (started {}, {minutes:.0} minutes). Every runtime ran in the same \
         place, {}, and paid the same cost of it: compare the runtimes with each other (the ratios), \
         not with hardware. Medians; how each figure is taken is under [Method](#method), where \
         husk's time and memory go in [docs/performance.md](docs/performance.md).\n\n",
        s("command"),
        s("commit"),
        s("started"),
        s("place"),
    );
    if quick {
        md.push_str(
            "**This is a `--quick` run: small counts and sizes, to check that every figure is \
             produced. Its figures are not for comparing.**\n\n",
        );
    }
    if !problems.is_empty() {
        let _ = writeln!(md, "**This run is incomplete:** {}.\n", problems.join("; "));
    }

    md.push_str("## Headline\n\n| figure | husk | runc | crun | runsc | husk / runc | husk / runsc |\n|---|---|---|---|---|---|---|\n");
    for row in rows {
        let unit = if row.unit.is_empty() {
            String::new()
        } else {
            format!(" ({})", row.unit)
        };
        let _ = write!(
            md,
            "| {}{unit}{} |",
            row.title,
            if row.more_is_better { " ↑" } else { "" }
        );
        for rt in RUNTIMES {
            let _ = write!(md, " {} |", cell(row.values.get(rt).copied(), row.unit));
        }
        let _ = writeln!(md, " {} | {} |", ratio(row, "runc"), ratio(row, "runsc"));
    }
    md.push_str(
        "\nLower is better, except in rows marked ↑. `-`: the runtime has no such figure (CRI pods \
         are compared with runc only) or the run did not produce it.\n\n",
    );
    if let Some(boot) = r.suite("boot") {
        let m = |key: &str| {
            boot.pointer(&format!("/{key}/median"))
                .and_then(Value::as_f64)
        };
        if let (Some(restored), Some(booted)) = (
            m("(r) husk-vmm spawn to a renewed agent, restored from a template"),
            m("(a) husk-vmm spawn to agent handshake (vsock)"),
        ) {
            let _ = writeln!(
                md,
                "A husk microVM restored from its template reaches its agent {} ms after \
                 `husk-vmm` is spawned, a booted one {} ms; to the agent's first console line, \
                 husk-vmm takes {}x the time of QEMU's microvm machine with the same kernel.\n",
                plot::num(restored),
                plot::num(booted),
                boot.get("ratio_husk_over_qemu")
                    .and_then(Value::as_f64)
                    .map_or("-".into(), plot::num)
            );
        }
    }

    md.push_str("## Targets\n\nThe goals husk's issues set, each checked by its suite in this run.\n\n| suite | target | measured | bound | verdict |\n|---|---|---|---|---|\n");
    for (suite, t) in r.targets() {
        let _ = writeln!(
            md,
            "| {suite} | {} | {} | {} | {} |",
            t.what,
            t.value_text(),
            t.bound_text(),
            t.verdict()
        );
    }
    md.push('\n');

    md.push_str("## Plots\n\n");
    let plots = plots(r);
    for (file, alt, svg) in &plots {
        std::fs::write(opts.plots.join(file), svg)?;
        let _ = writeln!(md, "![{alt}]({})\n", link(file));
    }
    if opts.results.join("density.svg").exists() {
        copy_plot(&opts.results, &opts.plots, "density.svg")?;
        let _ = writeln!(
            md,
            "![PSS sum and start latency as idle sandboxes accumulate]({})\n",
            link("density.svg")
        );
    }

    md.push_str("## Machine and versions\n\n");
    for (key, label) in [
        ("host", "Host"),
        ("rig", "Where the runtimes ran (the rig's L2)"),
    ] {
        if let Some(m) = run.get(key).filter(|m| m.is_object()) {
            let _ = writeln!(md, "- {label}: {}", machine(m));
        }
    }
    if let Some(versions) = r
        .suite("oci")
        .and_then(|o| o.get("runtimes"))
        .and_then(Value::as_object)
    {
        let list: Vec<String> = versions
            .iter()
            .map(|(rt, v)| format!("{rt}: {}", v.as_str().unwrap_or("?")))
            .collect();
        let _ = writeln!(md, "- Runtimes: {}", list.join("; "));
    }
    let timing: Vec<String> = suites_run_text(&suites_run(run));
    if !timing.is_empty() {
        let _ = writeln!(md, "- Suites: {}", timing.join(", "));
    }
    md.push('\n');

    md.push_str(METHOD);
    md.push_str("## Reproduce\n\n```sh\ncargo xtask bench            # every suite, as above; rewrites this file and docs/bench/\ncargo xtask bench oci        # one suite (boot, oci, cri, fs, net, density): target/bench/\ncargo xtask bench --quick    # every suite at small sizes, as CI runs it: target/bench/\n```\n\n");

    md.push_str("## Every figure of this run\n\n");
    for (suite, title) in SUITES {
        let _ = writeln!(md, "### {title}\n");
        match std::fs::read_to_string(opts.results.join(format!("{suite}.md"))) {
            Ok(text) => {
                md.push_str(&embed(&text, &link));
                md.push('\n');
                for svg in referenced_svgs(&text) {
                    copy_plot(&opts.results, &opts.plots, &svg)?;
                }
            }
            Err(_) => md.push_str("**Not produced by this run.**\n\n"),
        }
    }
    Ok(md)
}

fn suites_run(run: &Value) -> Vec<(String, i64, f64)> {
    run.get("suites")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                        s.get("exit").and_then(Value::as_i64).unwrap_or(-1),
                        s.get("secs").and_then(Value::as_f64).unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn suites_run_text(suites: &[(String, i64, f64)]) -> Vec<String> {
    suites
        .iter()
        .map(|(name, exit, secs)| {
            let status = if *exit == 0 {
                String::new()
            } else {
                format!(", **failed (exit {exit})**")
            };
            format!("{name} {:.0} min{status}", secs / 60.0)
        })
        .collect()
}

/// A machine's one-line description from `husk-bench machine`'s JSON.
fn machine(m: &Value) -> String {
    let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?");
    let n = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    format!(
        "{}, {} CPUs ({}), {:.1} GiB, Linux {}{}",
        s("os"),
        n("cpus"),
        s("cpu"),
        n("mem_mib") / 1024.0,
        s("kernel"),
        match s("kvm") {
            "?" | "" => String::new(),
            kvm => format!(", KVM: {kvm}"),
        }
    )
}

fn copy_plot(from: &Path, to: &Path, name: &str) -> Result<()> {
    let src = from.join(name);
    if src.exists() && from != to {
        std::fs::copy(&src, to.join(name))
            .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
    }
    Ok(())
}

/// The `.svg` files a suite's Markdown shows (`![...](name.svg)`).
fn referenced_svgs(md: &str) -> Vec<String> {
    md.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')'))
        .map(|(target, _)| target.to_string())
        .filter(|t| t.ends_with(".svg") && !t.contains('/'))
        .collect()
}

/// A suite's Markdown under the report's heading: its own title dropped, its sections one level
/// down, its plots linked where the report keeps them.
fn embed(text: &str, link: &dyn Fn(&str) -> String) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("## ") {
            continue;
        }
        let line = match line.strip_prefix("### ") {
            Some(rest) => format!("#### {rest}"),
            None => line.to_string(),
        };
        let line = referenced_svgs(&line).iter().fold(line, |l, svg| {
            l.replace(&format!("]({svg})"), &format!("]({})", link(svg)))
        });
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// This machine, for the report: `{os, cpu, cpus, mem_mib, kernel, kvm}`.
pub(crate) fn machine_json() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, v)| v.trim().to_string());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0);
    let kvm: Vec<&str> = ["kvm_amd", "kvm_intel", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    json!({
        "os": os,
        "cpu": cpu,
        "cpus": cpus,
        "mem_mib": mem_mib,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "kvm": kvm.join(", "),
    })
}

/// The report's own plots: file, description, SVG.
fn plots(r: &Results) -> Vec<(&'static str, &'static str, String)> {
    let all = ["husk", "husk-cold", "runc", "crun", "runsc"];
    let series = |get: &dyn Fn(&str) -> Vec<f64>| -> Vec<(String, Vec<f64>)> {
        all.iter()
            .map(|rt| (rt.to_string(), get(rt)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    };
    let density_starts = |rt: &str| {
        numbers(
            r.suite("density")
                .and_then(|d| d.pointer(&format!("/curves/{rt}/starts_ms"))),
        )
    };
    let cri_starts = |rt: &str| {
        if rt == "husk" || rt == "runc" {
            numbers(r.cri_start(rt).and_then(|v| v.get("values")))
        } else {
            Vec::new()
        }
    };
    let start = plot::strip(
        &[
            Panel {
                title: "`run` of /bin/true, end to end (husk-cold: warm start off)".into(),
                unit: "ms",
                series: series(&|rt| r.oci_values("run_true", rt)),
            },
            Panel {
                title: "`run --detach` of `sleep`, each start of the density run".into(),
                unit: "ms",
                series: series(&density_starts),
            },
            Panel {
                title: "pod start through CRI".into(),
                unit: "ms",
                series: series(&cri_starts),
            },
        ],
        true,
    );
    let one = |v: Option<f64>| v.into_iter().collect::<Vec<f64>>();
    let memory = plot::bars(&[
        Panel {
            title: "an idle sandbox alone, PSS of all its processes".into(),
            unit: "MiB",
            series: series(&|rt| one(r.oci("idle_pss", rt))),
        },
        Panel {
            title: "each of many idle sandboxes at once (density run), PSS".into(),
            unit: "MiB",
            series: series(&|rt| one(r.density("pss_each", rt))),
        },
        Panel {
            title: "each of several idle pods through CRI, PSS".into(),
            unit: "MiB",
            series: series(&|rt| {
                one((rt == "husk" || rt == "runc")
                    .then(|| r.cri_idle(rt))
                    .flatten())
            }),
        },
    ]);
    vec![
        (
            "start.svg",
            "Start latency per runtime, every sample (log scale)",
            start,
        ),
        ("memory.svg", "Memory per idle sandbox per runtime", memory),
    ]
}

const METHOD: &str = "## Method\n\n\
- **Where.** `cargo xtask bench` boots the test rig once (a Debian VM under QEMU's emulator \
  with emulated AMD SVM, whose KVM runs husk's microVMs; on a host with a usable KVM the suites \
  run there instead) and runs the suites there one after another. husk, runc, crun and runsc \
  run side by side in that VM, each through its own CLI with a private `--root`, on the same \
  bundles, the runtimes interleaved run by run so that drifting load hits all alike. The rig is \
  about 20 times slower than hardware, and every VM exit costs far more there: read the ratios. \
  Its CPU model lacks the fast string operations (ERMS, FSRM), which the emulator runs a byte \
  at a time where hardware runs them at full speed (the README's \"How the rig was chosen\").\n\
- **Runtimes.** husk is this tree's release build with its defaults (warm start from a \
  template; `husk-cold` is warm start off); runc and crun are Debian 12's packages; runsc is \
  gVisor from Debian's bookworm-backports (systrap platform, `--network=none` except in the \
  network suite).\n\
- **boot** (`tests/src/bin/husk-bench/main.rs`): `husk-vmm` from spawn to its agent, booted and \
  restored from a template, its memory, and the console race against QEMU's microvm.\n\
- **oci** (`oci.rs`): `run` of `/bin/true` end to end and split into `create`, `start`, \
  `delete`; an idle `sleep` container's PSS (every process it added; for husk the VMM, whose \
  PSS includes the guest memory it backs); a `dd bs=1` syscall loop timed inside.\n\
- **cri** (`cri.rs`): pods through containerd's CRI plugin, handler `husk` against `runc`: pod \
  start (RunPodSandbox + one container) and the PSS per idle pod with several up.\n\
- **fs** (`fs.rs`): in the container, big-file and small-file reads (cold and warm), a tree \
  walk, an fsync'ed write, create/stat/remove and `tar` unpacking, on the rootfs and on a bind \
  mount, timed inside by busybox `time`.\n\
- **net** (`net.rs`): a network namespace made as an engine makes it; TCP throughput each way \
  and 64-byte round trips, driven from the host with busybox `nc`; beside them, where the \
  host's CPU went meanwhile (husk's vCPU in the guest and in exits, its device thread, the \
  rest) and KVM's exits.\n\
- **density** (`density.rs`): idle `sleep` sandboxes (husk: 1 vCPU, 128 MiB) started one after \
  another until the run's bound, L2's memory guard or a time budget, PSS and MemAvailable read \
  as they accumulate; then starts with 8 in flight.\n\n";

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: Value) {
        std::fs::write(dir.join(name), serde_json::to_string(&v).unwrap()).unwrap();
    }

    #[test]
    fn targets_round_trip_through_json_with_their_verdicts() {
        let t = Target::at_most("`run`: husk / runc", Some(3.58), 1.5, "x");
        assert_eq!(t.met(), Some(false));
        let back = Target::from_json(&t.json()).unwrap();
        assert_eq!(
            (back.what.as_str(), back.value, back.bound),
            ("`run`: husk / runc", Some(3.58), 1.5)
        );
        assert_eq!(
            back.md_line(),
            "- `run`: husk / runc: 3.58x (target at most 1.50x): **not met**\n"
        );
        let count = Target::at_least("idle sandboxes at once", Some(500.0), 500.0, "");
        assert_eq!(count.verdict(), "met");
        assert_eq!(
            Target::at_most("x", Some(f64::NAN), 1.0, "x").verdict(),
            "**not measured**"
        );
    }

    #[test]
    fn the_report_takes_every_figure_from_the_run_and_fails_on_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "run.json",
            json!({
                "command": "cargo xtask bench", "commit": "abc", "started": "now", "secs": 600.0,
                "place": "the rig", "quick": false,
                "suites": [{"name": "oci", "exit": 0, "secs": 60.0}],
            }),
        );
        let fig = |h: f64, r: f64| {
            json!({"runtimes": {
            "husk": {"median": h, "values": [h]}, "runc": {"median": r, "values": [r]}}})
        };
        write(
            d,
            "oci.json",
            json!({
                "figures": {"run_true": fig(1257.0, 351.0), "split_create": fig(1057.0, 258.0),
                            "idle_pss": fig(29.6, 1.4), "dd_per_byte": fig(2.63, 3.31)},
                "runtimes": {"husk": "husk 0.1.0", "runc": "runc 1.1.5"},
                "targets": [Target::at_most("`run` of /bin/true: husk / runc", Some(3.58), 1.5, "x").json()],
            }),
        );
        std::fs::write(d.join("oci.md"), "## OCI\n### Targets\n![strip](oci.svg)\n").unwrap();
        std::fs::write(d.join("oci.svg"), "<svg/>").unwrap();
        let plots = d.join("plots");
        let opts = ReportOptions {
            results: d.to_path_buf(),
            out: d.join("BENCHMARKS.md"),
            plots: plots.clone(),
            link: "docs/bench".into(),
        };
        // Only the OCI suite ran: the report is written, and fails naming what is missing.
        let err = report(&opts).unwrap_err().to_string();
        assert!(err.contains("pod start through CRI"), "{err}");
        let md = std::fs::read_to_string(d.join("BENCHMARKS.md")).unwrap();
        assert!(
            md.contains("| `run` of /bin/true, end to end (ms) | 1257 | 351 | - | - | 3.58x | - |"),
            "{md}"
        );
        assert!(md.contains(
            "| oci | `run` of /bin/true: husk / runc | 3.58x | at most 1.50x | **not met** |"
        ));
        assert!(md.contains("#### Targets") && !md.contains("## OCI\n"));
        assert!(md.contains("![strip](docs/bench/oci.svg)"));
        assert!(plots.join("oci.svg").exists() && plots.join("start.svg").exists());
        assert!(md.contains("### Pods through CRI\n\n**Not produced by this run.**"));
    }

    #[test]
    fn svgs_referenced_by_a_suite_are_found() {
        assert_eq!(
            referenced_svgs("a ![x](density.svg) b ![y](other/z.svg) [c](d.md)"),
            vec!["density.svg".to_string()]
        );
    }
}
