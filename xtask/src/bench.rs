//! `cargo xtask bench [<what>]`: benchmarks run where VM tests run (the rig on machines without
//! hardware KVM), each runtime against its peers in the same run. Results land in `target/bench/`.
//!
//! With no suite, every suite runs (boot, oci, cri, fs, net, density), one after another in one
//! boot of the rig, with the sizes of [`suite_args`], and `husk-bench report` turns their results
//! into the report: the repository's `BENCHMARKS.md` and its plots in `docs/bench/`. `--quick`
//! runs every suite at small sizes and writes the report to `target/bench/BENCHMARKS.md` only;
//! `cargo xtask test` (and so CI) ends with it, and fails unless every figure is produced.
//!
//! - `boot`: husk-vmm's boot against QEMU's microvm machine (`husk-bench boot`).
//! - `oci`: husk against runc, crun and gVisor's runsc as OCI runtimes (`husk-bench oci`):
//!   `run` of `/bin/true`, idle memory, a syscall loop, reads from the rootfs. runc and crun come
//!   with the rig's packages; runsc is fetched from Debian by [`crate::bench_oci::fetch_runsc`].
//! - `boot-trace`: one husk boot with the guest kernel's messages, each line with the host
//!   time it arrived (`HUSK_BENCH_ARGS="--trace-cmdline initcall_debug"` adds kernel parameters).
//! - `cri`: pods through containerd's CRI plugin, runtime handler `husk` against `runc`
//!   (`husk-bench cri`): pod start, and memory per idle pod with ten pods up at once.
//! - `fs`: the container's files, husk against runc, crun and runsc (`husk-bench fs`):
//!   sequential read and write, small files cold and warm, a tree walk, create/stat/unlink and
//!   `tar` unpacking, in the rootfs and in a bind mount. `--quick` runs it at small sizes (CI
//!   does, after the tests, to check that every figure is produced).
//! - `density`: idle sandboxes started one after another up to 500 (or L2's memory guard; L2
//!   gets 12 GiB for it) and 40 with 8 in flight, husk against runc, crun and runsc
//!   (`husk-bench density`; 12 minutes at most per runtime): PSS and MemAvailable per sandbox, the curve as they accumulate,
//!   start latency and rate. `--quick`: 8 and 8.
//!
//! `HUSK_BENCH_ARGS` passes further options to `husk-bench` (split at spaces), e.g.
//! `--idle-runs 3 --dd-runs 3 --read-runs 2` for the OCI suite's other workloads.

use crate::bench_oci;
use crate::rig::{self, RigRun};
use crate::testing::{self, VmPlace};
use crate::util::{run, target_dir, workspace_root};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The suites `husk-bench` knows.
const SUITES: &[&str] = &["boot", "boot-trace", "oci", "cri", "fs", "net", "density"];

/// The suites of a whole run, in order (`husk-bench`'s report lists them the same way).
const ALL: [&str; 6] = ["boot", "oci", "cri", "fs", "net", "density"];

/// `cargo xtask bench [what]`: one suite, or every suite and the report.
pub fn bench(what: Option<&str>, runs: Option<usize>, quick: bool) -> Result<()> {
    match what {
        None | Some("all") => {
            if runs.is_some() || std::env::var_os("HUSK_BENCH_ARGS").is_some() {
                bail!(
                    "--runs and HUSK_BENCH_ARGS are for one suite (`cargo xtask bench oci`); a run \
                     of every suite uses the report's sizes"
                );
            }
            bench_all(quick)
        }
        Some(suite) => bench_one(suite, runs, quick),
    }
}

/// `husk-bench`'s arguments for `suite` in a run of every suite: the sizes the report is made
/// from (about two hours in the rig in all), or `--quick`'s small ones.
fn suite_args(suite: &str, quick: bool) -> &'static [&'static str] {
    match (suite, quick) {
        ("boot", true) => &["--runs", "2"],
        ("boot", false) => &["--runs", "10"],
        ("oci", true) => &[
            "--runs",
            "2",
            "--idle-runs",
            "1",
            "--dd-runs",
            "1",
            "--read-runs",
            "0",
            "--split-runs",
            "1",
            "--idle-many",
            "2",
        ],
        // Reads are the file suite's.
        ("oci", false) => &[
            "--runs",
            "20",
            "--idle-runs",
            "5",
            "--dd-runs",
            "3",
            "--read-runs",
            "0",
            "--split-runs",
            "5",
            "--idle-many",
            "10",
        ],
        ("cri", true) => &["--runs", "2", "--idle-pods", "2"],
        ("cri", false) => &["--runs", "10", "--idle-pods", "10"],
        ("fs", true) => &["--runs", "1", "--quick"],
        // 1 GiB and 10,000 new files (the suite's defaults) take over an hour here alone.
        ("fs", false) => &["--runs", "1", "--big-mib", "256", "--churn", "2000"],
        ("net", true) => &["--runs", "1", "--quick"],
        ("net", false) => &["--runs", "3"],
        ("density", true) => &["--quick"],
        // 500 husk sandboxes take about 13 minutes in the rig.
        ("density", false) => &["--minutes", "15"],
        _ => &[],
    }
}

/// One suite's extra arguments where it runs: its work folder on the rig's work disk (a disk
/// file system, so that dropping the page cache makes reads cold; the rig's /tmp is tmpfs).
fn place_args(suite: &str, place: VmPlace) -> Vec<String> {
    if place == VmPlace::Rig && (suite == "oci" || suite == "fs") {
        vec!["--dir".into(), format!("/work/{suite}-bench")]
    } else {
        Vec::new()
    }
}

/// What a run needs: the place, the VM artifacts, `husk-bench`, runsc (when it can be had).
struct Setup {
    place: VmPlace,
    artifacts: testing::VmArtifacts,
    bench_bin: PathBuf,
    runsc: Option<PathBuf>,
    out: PathBuf,
}

fn setup(with_runsc: bool) -> Result<Setup> {
    let (place, why) = testing::decide_vm_place()?;
    eprintln!("xtask: benchmarks run: {place:?} ({why})");
    if place == VmPlace::Skip {
        bail!("HUSK_TEST_VM=skip: benchmarks need a VM");
    }
    let artifacts = testing::build_vm_artifacts()?;
    let bench_bin = build_husk_bench()?;
    // Without runsc the bench still runs and says loudly what it could not check.
    let runsc = if with_runsc {
        match bench_oci::fetch_runsc() {
            Ok(path) => Some(path),
            Err(e) => {
                eprintln!("xtask: !!! runsc (gVisor) is UNAVAILABLE: {e:#}; the bench runs without it and its targets CANNOT BE CHECKED !!!");
                None
            }
        }
    } else {
        None
    };
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    Ok(Setup {
        place,
        artifacts,
        bench_bin,
        runsc,
        out,
    })
}

impl Setup {
    /// `husk-bench` on this host, with the VM artifacts in its environment.
    fn host_command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.bench_bin);
        cmd.args(args)
            .arg("--out")
            .arg(&self.out)
            .env("HUSK_VMM_BIN", self.artifacts.bin_dir.join("husk-vmm"))
            .env("HUSK_BIN", self.artifacts.bin_dir.join("husk"))
            .env("HUSK_KERNEL", &self.artifacts.kernel)
            .env("HUSK_INITRAMFS", &self.artifacts.initramfs);
        cmd
    }

    /// A rig run of `script` with the VM artifacts, `husk-bench` and runsc, results to `out`.
    fn rig_job(&self, script: String) -> RigRun {
        let (mut inputs, env) = testing::rig_vm_inputs(&self.artifacts);
        inputs.push((self.bench_bin.clone(), "bin/husk-bench".into()));
        if let Some(runsc) = &self.runsc {
            inputs.push((runsc.clone(), "bin/runsc".into()));
        }
        let mut job = RigRun::new(inputs, Some(script), env);
        job.out_dir = Some(self.out.clone());
        job
    }
}

/// Removes an earlier run's results, so that none of them gets this run's labels.
fn clear_results(out: &Path, names: &[String]) -> Result<()> {
    for name in names {
        let old = out.join(name);
        if old.exists() {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(())
}

/// Runs one benchmark suite (`quick`: at small sizes).
fn bench_one(what: &str, runs: Option<usize>, quick: bool) -> Result<()> {
    if !SUITES.contains(&what) {
        bail!(
            "unknown benchmark {what:?}; available: {} (none: all of them and the report)",
            SUITES.join(", ")
        );
    }
    if quick && what == "boot-trace" {
        bail!("--quick is for the suites of the report, not boot-trace");
    }
    let runs = runs.unwrap_or(match (what, quick) {
        ("fs" | "net" | "density", true) => 1,
        (_, true) => 2,
        ("fs" | "net", false) => 3,
        _ => 20,
    });
    let setup = setup(what == "oci" || what == "fs" || what == "density")?;
    let md = setup.out.join(format!("{what}.md"));
    clear_results(&setup.out, &[format!("{what}.md"), format!("{what}.json")])?;
    let commit = git_commit();
    let mut args: Vec<String> = vec![what.into(), "--runs".into(), runs.to_string()];
    if quick {
        // The quick sizes, without their run count (`--runs` above).
        let quick_args = suite_args(what, true);
        let mut it = quick_args.iter();
        while let Some(arg) = it.next() {
            if *arg == "--runs" {
                it.next();
            } else {
                args.push(arg.to_string());
            }
        }
    }
    args.extend(place_args(what, setup.place));
    args.extend(
        std::env::var("HUSK_BENCH_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from),
    );
    let load_before = bench_oci::host_load();
    let started_at = utc_now();
    let started = std::time::Instant::now();
    match setup.place {
        VmPlace::Host => run(&mut setup.host_command(&args))?,
        VmPlace::Rig => {
            let image = rig::build()?;
            let script = std::iter::once("husk-bench".to_string())
                .chain(args.iter().map(|a| testing::sh_quote(a)))
                .collect::<Vec<_>>()
                .join(" ");
            let mut job = setup.rig_job(script);
            if what == "fs" && !quick {
                // Two 1 GiB files and the 1 GiB written beside them.
                job.work_free_mib = 6 * 1024;
            }
            if what == "density" && !quick {
                // The L2 of 12 GiB, for 500 sandboxes and their peers'.
                job.mem_mib = Some(12 * 1024);
            }
            let code = rig::run_in_rig(&image, &job)?.exit_code()?;
            if code != 0 {
                bail!("the benchmark failed in the rig (exit code {code})");
            }
        }
        VmPlace::Skip => unreachable!("setup refuses it"),
    }
    let load_after = bench_oci::host_load();
    let load = format!(
        "Host ({} CPUs) load average (1, 5, 15 min, runnable/total, last pid) before: {load_before}; \
         after: {load_after}; the whole run took {:.0} s.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    eprintln!("xtask: {load}");
    if what != "boot-trace" {
        let mut text = std::fs::read_to_string(&md).with_context(|| {
            format!(
                "the {what} benchmark finished but left no {} (results not copied back from the rig?)",
                md.display()
            )
        })?;
        text.push('\n');
        text.push_str(&format!(
            "Measured at commit {commit}, run started {started_at}.\n"
        ));
        text.push_str(&load);
        std::fs::write(&md, text)?;
    }
    eprintln!("xtask: results in {}", setup.out.display());
    Ok(())
}

/// One suite's outcome in a whole run.
struct SuiteRun {
    name: String,
    exit: i64,
    secs: f64,
}

/// Every suite, one after another in one place (one boot of the rig), then the report. A
/// suite that fails does not stop the others; the run fails at the end, after the report
/// (which marks what is missing) is written.
fn bench_all(quick: bool) -> Result<()> {
    let setup = setup(true)?;
    let mut stale = vec!["run.json".to_string(), "suites.txt".to_string()];
    for suite in ALL {
        for ext in ["md", "json", "csv", "svg"] {
            stale.push(format!("{suite}.{ext}"));
        }
    }
    for name in ["host", "rig", "this"] {
        stale.push(format!("machine-{name}.json"));
    }
    clear_results(&setup.out, &stale)?;
    let commit = git_commit();
    let started_at = utc_now();
    let started = std::time::Instant::now();
    run(&mut setup.host_command(&["machine".into(), "--name".into(), "host".into()]))?;
    let command = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let (suites, place) = match setup.place {
        VmPlace::Host => {
            let mut suites = Vec::new();
            for (i, suite) in ALL.iter().enumerate() {
                eprintln!("xtask: bench [{}/{}] {suite}", i + 1, ALL.len());
                let mut args = vec![suite.to_string()];
                args.extend(suite_args(suite, quick).iter().map(|a| a.to_string()));
                let t0 = std::time::Instant::now();
                let status = setup.host_command(&args).status()?;
                let exit = i64::from(status.code().unwrap_or(-1));
                let secs = t0.elapsed().as_secs_f64();
                eprintln!(
                    "xtask: bench [{}/{}] {suite}: exit {exit} after {secs:.0} s",
                    i + 1,
                    ALL.len()
                );
                suites.push(SuiteRun {
                    name: suite.to_string(),
                    exit,
                    secs,
                });
            }
            (suites, "this host, under its own KVM".to_string())
        }
        VmPlace::Rig => {
            let image = rig::build()?;
            let mut job = setup.rig_job(all_script(quick));
            if !quick {
                job.mem_mib = Some(12 * 1024);
                job.work_free_mib = 6 * 1024;
                job.timeout = job.timeout.max(std::time::Duration::from_secs(5 * 3600));
            } else {
                job.work_free_mib = 2 * 1024;
            }
            // The script's own exit code says whether a suite failed; suites.txt says which.
            let code = rig::run_in_rig(&image, &job)?.exit_code()?;
            let suites = read_suites(&setup.out.join("suites.txt"))?;
            if code != 0 && suites.iter().all(|s| s.exit == 0) {
                bail!("the benchmark run failed in the rig (exit code {code}) outside its suites");
            }
            let mem = job
                .mem_mib
                .map_or("its default memory".into(), |m| format!("{} GiB", m / 1024));
            let cpu = rig::RigConfig::from_env()?.cpu;
            (
                suites,
                format!(
                    "the test rig's L2 (a Debian VM under QEMU's emulator with emulated AMD SVM, \
                     {mem}, `-cpu {cpu}`; husk's microVMs run under its KVM, nested)"
                ),
            )
        }
        VmPlace::Skip => unreachable!("setup refuses it"),
    };
    let read_machine = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(setup.out.join(format!("machine-{name}.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let description = serde_json::json!({
        "command": command,
        "commit": commit,
        "started": started_at,
        "secs": started.elapsed().as_secs_f64(),
        "place": place,
        "quick": quick,
        "host": read_machine("host"),
        "rig": read_machine("rig"),
        "suites": suites.iter().map(|s| serde_json::json!({"name": s.name, "exit": s.exit, "secs": s.secs})).collect::<Vec<_>>(),
    });
    std::fs::write(
        setup.out.join("run.json"),
        serde_json::to_string_pretty(&description)?,
    )?;
    let (report, plots, link) = if quick {
        (
            setup.out.join("BENCHMARKS.md"),
            setup.out.clone(),
            ".".to_string(),
        )
    } else {
        let root = workspace_root();
        (
            root.join("BENCHMARKS.md"),
            root.join("docs/bench"),
            "docs/bench".to_string(),
        )
    };
    run(Command::new(&setup.bench_bin)
        .arg("report")
        .arg("--results")
        .arg(&setup.out)
        .arg("--report")
        .arg(&report)
        .arg("--plots")
        .arg(&plots)
        .args(["--link", &link]))?;
    eprintln!(
        "xtask: every suite ran ({:.0} min); the report is {}",
        started.elapsed().as_secs_f64() / 60.0,
        report.display()
    );
    Ok(())
}

/// The shell text of a whole run in the rig: the machine's description, then each suite with
/// its progress on the console and its exit code and duration in `suites.txt`.
fn all_script(quick: bool) -> String {
    let mut script = String::from(
        "out=\"$HUSK_RIG_OUT\"\n\
         husk-bench machine --name rig\n\
         failed=0\n",
    );
    for (i, suite) in ALL.iter().enumerate() {
        let mut args: Vec<String> = suite_args(suite, quick)
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(place_args(suite, VmPlace::Rig));
        let args: Vec<String> = args.iter().map(|a| testing::sh_quote(a)).collect();
        let step = format!("[{}/{}] {suite}", i + 1, ALL.len());
        script.push_str(&format!(
            "echo \"bench: {step}: started at $(date -u +%H:%M:%S)\"\n\
             t0=$(date +%s)\n\
             husk-bench {suite} {}\n\
             rc=$?\n\
             t=$(( $(date +%s) - t0 ))\n\
             echo \"{suite} $rc $t\" >> \"$out/suites.txt\"\n\
             echo \"bench: {step}: exit $rc after ${{t}} s\"\n\
             [ \"$rc\" = 0 ] || failed=1\n",
            args.join(" ")
        ));
    }
    script.push_str("exit $failed\n");
    script
}

/// `suites.txt`: a line `NAME EXIT SECS` per suite that ran.
fn read_suites(path: &Path) -> Result<Vec<SuiteRun>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{} (the suites' outcomes) did not come back from the rig",
            path.display()
        )
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [name, exit, secs] => Ok(SuiteRun {
                    name: name.to_string(),
                    exit: exit.parse()?,
                    secs: secs.parse()?,
                }),
                _ => bail!("malformed line in {}: {line:?}", path.display()),
            }
        })
        .collect()
}

/// Builds `husk-bench` (release) and returns its path.
pub fn build_husk_bench() -> Result<PathBuf> {
    testing::install_test_build_packages()?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "-p",
                "husk-tests",
                "--bin",
                "husk-bench",
            ]),
    )?;
    Ok(target_dir().join("release/husk-bench"))
}

/// The checked-out commit (`git describe --always --dirty`), or "unknown".
fn git_commit() -> String {
    crate::util::output(Command::new("git").current_dir(workspace_root()).args([
        "describe",
        "--always",
        "--dirty",
        "--abbrev=12",
    ]))
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "unknown".into())
}

/// The time now in UTC, as `date -u` prints it.
fn utc_now() -> String {
    crate::util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
// A panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_run_runs_every_suite_in_order_and_records_each_outcome() {
        let script = all_script(true);
        let mut at = 0;
        for suite in ALL {
            let pos = script[at..]
                .find(&format!("husk-bench {suite} "))
                .unwrap_or_else(|| panic!("{suite} missing or out of order:\n{script}"));
            at += pos + 1;
        }
        assert!(script.contains("husk-bench oci '--runs' '2' '--idle-runs' '1'"));
        assert!(script.contains("husk-bench fs '--runs' '1' '--quick' '--dir' '/work/fs-bench'"));
        assert!(script.contains("echo \"density $rc $t\" >> \"$out/suites.txt\""));
        assert!(script.trim_end().ends_with("exit $failed"));
        // The report's sizes are not the quick ones.
        assert!(all_script(false).contains("husk-bench density '--minutes' '15'"));
    }

    #[test]
    fn suite_outcomes_are_read_back_and_a_malformed_line_is_refused() {
        let dir = std::env::temp_dir().join(format!("xtask-suites-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("suites.txt");
        std::fs::write(&path, "boot 0 61\noci 1 300\n").unwrap();
        let suites = read_suites(&path).unwrap();
        assert_eq!(suites.len(), 2);
        assert_eq!(
            (suites[1].name.as_str(), suites[1].exit, suites[1].secs),
            ("oci", 1, 300.0)
        );
        std::fs::write(&path, "boot 0\n").unwrap();
        assert!(read_suites(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
