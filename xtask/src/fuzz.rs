//! `cargo xtask fuzz`: builds the fuzz targets in `fuzz/` with `cargo fuzz` (libFuzzer, address
//! sanitizer, debug assertions) on the nightly toolchain and runs each for a bounded time.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/<target>`, made by
//! `husk_vmm::fuzzing::seeds`) and every crash kept as a regression (`fuzz/regressions/<target>`),
//! and grows a corpus of its own under `target/fuzz/corpus/<target>`, kept between runs on
//! this machine. A crash, a hang longer than [`HANG_SECS`] or a process over [`RSS_LIMIT_MB`]
//! fails the run, naming the input libFuzzer saved under `target/fuzz/artifacts/<target>/`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::util::{describe, run, target_dir, workspace_root};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &[
    "virtio_fs",
    "virtio_vsock",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "agent_reply",
    "net_handoff",
];

/// One input taking longer than this is a hang.
const HANG_SECS: u32 = 10;
/// A fuzz process using more memory than this has a leak or unbounded buffering.
const RSS_LIMIT_MB: u32 = 2048;

/// What one target's run gave.
struct Outcome {
    target: &'static str,
    runs: u64,
    secs: f64,
    coverage: Option<u64>,
    corpus: usize,
}

/// Fuzzes `targets` (all of them when empty) for `secs` seconds each.
pub fn fuzz(targets: &[String], secs: u32) -> Result<()> {
    let selected: Vec<&'static str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets
            .iter()
            .map(|t| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|known| known == t)
                    .with_context(|| format!("no fuzz target {t:?}; there are {TARGETS:?}"))
            })
            .collect::<Result<_>>()?
    };
    ensure_tools()?;
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let build_dir = target_dir().join("fuzz");
    run(nightly_cargo()
        .current_dir(&root)
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        .arg("--target-dir")
        .arg(&build_dir))?;
    let mut outcomes = Vec::new();
    for target in selected {
        outcomes.push(fuzz_one(target, secs, &fuzz_dir, &build_dir)?);
    }
    eprintln!("xtask: fuzzing, {secs} s per target, no crash, hang or leak:");
    eprintln!(
        "xtask:   {:<14} {:>10} {:>9} {:>9} {:>7}",
        "target", "runs", "runs/s", "coverage", "corpus"
    );
    for o in &outcomes {
        eprintln!(
            "xtask:   {:<14} {:>10} {:>9.0} {:>9} {:>7}",
            o.target,
            o.runs,
            o.runs as f64 / o.secs.max(0.001),
            o.coverage.map_or("?".to_string(), |c| c.to_string()),
            o.corpus
        );
    }
    Ok(())
}

fn fuzz_one(target: &'static str, secs: u32, fuzz_dir: &Path, build_dir: &Path) -> Result<Outcome> {
    let corpus = build_dir.join("corpus").join(target);
    let artifacts = build_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let mut cmd = nightly_cargo();
    cmd.current_dir(workspace_root())
        .args(["fuzz", "run", "--fuzz-dir"])
        .arg(fuzz_dir)
        .arg("--target-dir")
        .arg(build_dir)
        .arg(target)
        // The first corpus directory is the one libFuzzer adds to.
        .arg(&corpus);
    for kept in ["seeds", "regressions"] {
        let dir = fuzz_dir.join(kept).join(target);
        if dir.is_dir() {
            cmd.arg(dir);
        }
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={HANG_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    eprintln!("xtask: + {}", describe(&cmd));
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("spawning {}", describe(&cmd)))?;
    let secs_taken = start.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        let saved: Vec<PathBuf> = std::fs::read_dir(&artifacts)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        bail!(
            "fuzz target {target} failed ({}); the input: {saved:?}. Reproduce with `cargo +nightly \
             fuzz run --fuzz-dir fuzz {target} <input>`; once fixed, keep the input under \
             fuzz/regressions/{target}/",
            out.status
        );
    }
    Ok(Outcome {
        target,
        runs: stat(&log, "stat::number_of_executed_units:").unwrap_or(0),
        secs: secs_taken,
        coverage: coverage(&log),
        corpus: std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0),
    })
}

/// A `stat::...: N` line of libFuzzer's final statistics.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// The coverage (`cov:`) of libFuzzer's last status line.
fn coverage(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once(" cov: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `cargo` of the nightly toolchain, without what the stable cargo running xtask exported.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The nightly toolchain must be there; cargo-fuzz is installed from crates.io when missing.
fn ensure_tools() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running `rustup toolchain list` (fuzzing needs rustup's nightly toolchain)")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        bail!("fuzzing needs the nightly toolchain (`rustup toolchain install nightly`), and this machine has none");
    }
    let has_fuzz = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_fuzz {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

#[cfg(test)]
// A panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn final_statistics_are_read() {
        let log = "#2048\tpulse  cov: 1169 ft: 1542 corp: 61/214b\n\
                   #23829\tDONE   cov: 1606 ft: 3674 corp: 244/3324b lim: 33 exec/s: 390\n\
                   Done 23829 runs in 61 second(s)\n\
                   stat::number_of_executed_units: 23829\n\
                   stat::average_exec_per_sec:     390\n";
        assert_eq!(stat(log, "stat::number_of_executed_units:"), Some(23829));
        assert_eq!(coverage(log), Some(1606));
        assert_eq!(coverage("nothing"), None);
    }

    #[test]
    fn every_target_has_a_source_and_an_entry() {
        let fuzz = workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                fuzz.join(format!("fuzz_targets/{target}.rs")).is_file(),
                "{target}"
            );
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target}"
            );
        }
        let sources = std::fs::read_dir(fuzz.join("fuzz_targets"))
            .unwrap()
            .count();
        assert_eq!(
            sources,
            TARGETS.len(),
            "a fuzz target is missing from TARGETS"
        );
    }
}
