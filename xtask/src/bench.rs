//! `cargo xtask bench <what>`: benchmarks run where VM tests run (the rig on machines without
//! hardware KVM), each runtime against its peers in the same run. Results land in `target/bench/`.
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
use std::path::PathBuf;
use std::process::Command;

/// The suites `husk-bench` knows.
const SUITES: &[&str] = &["boot", "boot-trace", "oci", "cri", "fs", "net", "density"];

/// Runs one benchmark suite (`quick`: at small sizes, where the suite has them).
pub fn bench(what: &str, runs: usize, quick: bool) -> Result<()> {
    if !SUITES.contains(&what) {
        bail!(
            "unknown benchmark {what:?}; available: {}",
            SUITES.join(", ")
        );
    }
    let (place, why) = testing::decide_vm_place()?;
    eprintln!("xtask: benchmarks run: {place:?} ({why})");
    let artifacts = testing::build_vm_artifacts()?;
    let bench_bin = build_husk_bench()?;
    // runsc for the OCI suite; without it the bench still runs and says loudly what it could
    // not check.
    let runsc: Option<PathBuf> = if what == "oci" || what == "fs" || what == "density" {
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
    // Results are written fresh: an earlier run's files never get this run's labels.
    let md = out.join(format!("{what}.md"));
    for old in [md.clone(), out.join(format!("{what}.json"))] {
        if old.exists() {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let commit = git_commit();
    let runs = runs.to_string();
    let mut extra_args: Vec<String> = std::env::var("HUSK_BENCH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    if quick {
        if !["fs", "net", "density"].contains(&what) {
            bail!("--quick is for the fs, net and density suites only");
        }
        extra_args.push("--quick".into());
    }
    let load_before = bench_oci::host_load();
    let started_at = utc_now();
    let started = std::time::Instant::now();
    match place {
        VmPlace::Skip => bail!("HUSK_TEST_VM=skip: benchmarks need a VM"),
        VmPlace::Host => run(Command::new(&bench_bin)
            .args([what, "--runs", &runs, "--out"])
            .arg(&out)
            .args(&extra_args)
            .env("HUSK_VMM_BIN", artifacts.bin_dir.join("husk-vmm"))
            .env("HUSK_BIN", artifacts.bin_dir.join("husk"))
            .env("HUSK_KERNEL", &artifacts.kernel)
            .env("HUSK_INITRAMFS", &artifacts.initramfs))?,
        VmPlace::Rig => {
            let image = rig::build()?;
            let (mut inputs, env) = testing::rig_vm_inputs(&artifacts);
            inputs.push((bench_bin, "bin/husk-bench".into()));
            if let Some(runsc) = runsc {
                inputs.push((runsc, "bin/runsc".into()));
            }
            // The OCI suite builds its rootfs on the work disk (a disk file system, so that
            // dropping the page cache makes reads cold; the rig's /tmp is tmpfs).
            let mut extra = String::new();
            if what == "oci" || what == "fs" {
                extra.push_str(&format!(" --dir /work/{what}-bench"));
            }
            for arg in &extra_args {
                extra.push(' ');
                extra.push_str(&testing::sh_quote(arg));
            }
            let mut job = RigRun::new(
                inputs,
                Some(format!("husk-bench {what} --runs {runs}{extra}")),
                env,
            );
            job.out_dir = Some(out.clone());
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
    eprintln!("xtask: results in {}", out.display());
    Ok(())
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
