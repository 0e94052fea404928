//! `husk-bench fs`: the container's files, husk against runc, crun and runsc, each driven
//! through its own CLI on the same bundles in the same place, runtimes interleaved run by run.
//! Driven by `cargo xtask bench fs`; writes `fs.md` and `fs.json` to `--out`.
//!
//! One container per runtime and run executes [`script`] in two places: the rootfs (`/bench`,
//! which husk shares with its rootfs cache policy) and a bind mount of a host directory
//! (`/data`, which husk caches briefly). Each step is timed inside the container by busybox
//! `time -p` (for husk the guest's clock):
//!
//! 1. `seq_read_cold`: `cat` of a big file to `/dev/null`; the page cache of the machine
//!    running the runtimes was dropped just before the container started.
//! 2. `small_cold`: `find tree -type f | xargs cat`: the small files (1 KiB each), cold.
//! 3. `small_warm`: the same again.
//! 4. `walk_warm`: `find tree -type f` alone: lookups and directory reads, no open.
//! 5. `seq_write`: `dd` of zeros into a new file, 1 MiB blocks, `conv=fsync`.
//! 6. `create`, `stat`, `unlink`: as many empty files made (`xargs touch`), stat'ed and removed.
//! 7. `untar`: the small-file tree unpacked from a tar archive.
//!
//! Targets (issue "the container's files at near-native speed"), ratios of husk's median to
//! runc's: small files cold at most 4x, warm at most 2x, walk at most 2x, sequential read at
//! most 2x (at least half the throughput); and husk never slower than runsc.

use crate::oci::{
    drop_caches, path_str, peers, real_seconds, run_cmd, tail, write_read_data, Bench, Figure,
    Peers, Report,
};
use crate::report::Target;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `husk-bench fs` was asked for.
pub struct FsOptions {
    /// Runs per runtime.
    pub runs: usize,
    /// Small sizes (a check that every figure is produced, for CI), not the report's.
    pub quick: bool,
    /// The big file's size in MiB, instead of the default (1 GiB; `quick`: 16 MiB).
    pub big_mib: Option<usize>,
    /// Files made, stat'ed and removed, instead of the default (10,000; `quick`: 200).
    pub churn: Option<usize>,
    /// Where the rootfs, the bind-mounted directory and the bundles are built (a disk file
    /// system, so that dropping the page cache makes reads cold).
    pub dir: PathBuf,
    /// Where the results go.
    pub out: PathBuf,
    /// The longest any one runtime command may take.
    pub timeout: Duration,
}

/// The sizes of one bench run.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// The big file read and the file written, MiB.
    big_mib: usize,
    /// Directories of the small-file tree.
    dirs: usize,
    /// Files per directory.
    files_per_dir: usize,
    /// Files made, stat'ed and removed.
    churn: usize,
}

const FULL: Sizes = Sizes {
    big_mib: 1024,
    dirs: 100,
    files_per_dir: 100,
    churn: 10_000,
};

const QUICK: Sizes = Sizes {
    big_mib: 16,
    dirs: 10,
    files_per_dir: 20,
    churn: 200,
};

/// Bytes of each small file.
const SMALL_FILE_BYTES: usize = 1024;
/// Guest memory for husk (annotation `io.husk.vm.mem_mib`, ignored by the others): room for
/// the small files and the written file's pages.
const GUEST_MEM_MIB: u32 = 512;

/// The places measured: name, path inside the container.
const PLACES: [(&str, &str); 2] = [("rootfs", "/bench"), ("bind", "/data")];

/// The steps of [`script`], in the order of its `time -p` reports: key, title.
const STEPS: [(&str, &str); 9] = [
    ("seq_read_cold", "sequential read of the big file, cold"),
    ("small_cold", "read every small file, cold"),
    ("small_warm", "read every small file, warm"),
    ("walk_warm", "walk the tree (`find`), warm"),
    (
        "seq_write",
        "sequential write of the big file's size, fsync'ed",
    ),
    ("create", "create the churn files (`xargs touch`)"),
    ("stat", "stat them (`xargs stat`)"),
    ("unlink", "remove them (`xargs rm`)"),
    ("untar", "unpack the small-file tree from a tar archive"),
];

/// The targets: step, most husk / runc (the issue's, as a time ratio).
const TARGETS: [(&str, f64); 4] = [
    ("small_cold", 4.0),
    ("small_warm", 2.0),
    ("walk_warm", 2.0),
    ("seq_read_cold", 2.0),
];

/// The shell text run in the container: every step in each of [`PLACES`], each timed by
/// busybox `time -p`, what the steps wrote removed (untimed) so that every run starts alike.
fn script(sizes: Sizes) -> String {
    let mut text = String::from("set -e\n");
    for (_, dir) in PLACES {
        text.push_str(&format!(
            "cd {dir}\n\
             time -p cat big > /dev/null\n\
             time -p sh -c 'find tree -type f | xargs cat > /dev/null'\n\
             time -p sh -c 'find tree -type f | xargs cat > /dev/null'\n\
             time -p find tree -type f > /dev/null\n\
             time -p sh -c 'dd if=/dev/zero of=out bs=1048576 count={big} conv=fsync 2> /dev/null'\n\
             rm -f out\n\
             mkdir churn\n\
             cd churn\n\
             time -p sh -c 'seq {churn} | xargs touch'\n\
             time -p sh -c 'seq {churn} | xargs stat -c %s > /dev/null'\n\
             time -p sh -c 'seq {churn} | xargs rm'\n\
             cd ..\n\
             rmdir churn\n\
             mkdir untar\n\
             time -p tar -xf tree.tar -C untar\n\
             rm -rf untar\n",
            big = sizes.big_mib,
            churn = sizes.churn,
        ));
    }
    text
}

/// The bench's data in `dir`: the read workloads' `big` and `tree` (see
/// [`write_read_data`]), and `tree.tar` of the tree; written and synced once per bench run.
fn write_data(dir: &Path, sizes: Sizes) -> Result<()> {
    write_read_data(
        dir,
        sizes.big_mib,
        sizes.dirs,
        sizes.files_per_dir,
        SMALL_FILE_BYTES,
    )?;
    let tar = std::process::Command::new("tar")
        .arg("-cf")
        .arg(dir.join("tree.tar"))
        .arg("-C")
        .arg(dir)
        .arg("tree")
        .output()
        .context("running tar")?;
    if !tar.status.success() {
        bail!(
            "tar of the small-file tree failed: {}",
            String::from_utf8_lossy(&tar.stderr)
        );
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

/// The figure's key for a step in a place.
fn key(place: &str, step: &str) -> String {
    format!("{place}_{step}")
}

pub fn bench_fs(opts: &FsOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the file benchmark needs root (runc, crun and runsc, and husk's bind mounts)");
    }
    let mut sizes = if opts.quick { QUICK } else { FULL };
    sizes.big_mib = opts.big_mib.unwrap_or(sizes.big_mib);
    sizes.churn = opts.churn.unwrap_or(sizes.churn);
    let artifacts = husk_tests::vm_artifacts("husk-bench fs").context(
        "husk cannot run microVMs here (no usable KVM, or HUSK_KERNEL/HUSK_INITRAMFS unset)",
    )?;
    let husk = husk_tests::oci::husk_binary();
    std::fs::create_dir_all(&opts.out)?;
    let started = Instant::now();
    let bench = Bench::build_with(&husk, &opts.dir, |rootfs| {
        write_data(&rootfs.join("bench"), sizes)
    })?;
    let data = opts.dir.join("data");
    write_data(&data, sizes)?;
    eprintln!(
        "fs bench: data ({} MiB file, {} small files, twice) written in {:.1} s",
        sizes.big_mib,
        sizes.dirs * sizes.files_per_dir,
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(bench.rootfs.join("data"))?;
    let Peers {
        runtimes,
        versions,
        notes,
        mut containers,
        scratch,
        ..
    } = peers(
        &husk,
        &artifacts,
        &bench,
        &opts.dir,
        Path::new("/run/husk-bench-fs"),
        false,
        "the target \"husk never slower than runsc\"",
        opts.timeout,
    )?;
    let data_str = path_str(&data)?.to_string();
    let fs_bundle = bench.bundle_with(
        "fs",
        &["sh", "-c", &script(sizes)],
        &[("io.husk.vm.mem_mib", GUEST_MEM_MIB.to_string())],
        |spec| {
            // The rootfs is written to (the churn and the written file): not read-only.
            spec["root"]["readonly"] = Value::Bool(false);
            if let Some(mounts) = spec["mounts"].as_array_mut() {
                mounts.push(json!({
                    "destination": "/data",
                    "type": "bind",
                    "source": data_str,
                    "options": ["rbind", "rw"]
                }));
            }
        },
    )?;

    let mut figs: BTreeMap<String, Figure> = BTreeMap::new();
    for i in 0..opts.runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            let id = format!("fs-{i}-{}", rt.name);
            drop_caches()?;
            containers.started(rt, &id);
            let o = run_cmd(
                rt.command(&["run", "--bundle", path_str(&fs_bundle)?, &id]),
                &scratch,
                opts.timeout,
            )?;
            containers.remove(rt, &id)?;
            let real = real_seconds(&o.stderr);
            if !o.status.success() || real.len() != PLACES.len() * STEPS.len() {
                bail!(
                    "{} file run failed ({}, {} of {} timings): {}",
                    rt.name,
                    o.status,
                    real.len(),
                    PLACES.len() * STEPS.len(),
                    tail(&o.stderr)
                );
            }
            let mut line = format!("fs bench: run {i}: {}", rt.name);
            let keys = PLACES
                .iter()
                .flat_map(|(place, _)| STEPS.iter().map(move |(step, _)| key(place, step)));
            for (key, value) in keys.zip(real) {
                line.push_str(&format!(" {key} {value:.2}"));
                figs.entry(key).or_default().push(rt.name, value);
            }
            eprintln!("{line}");
        }
    }
    drop(containers);
    report(
        opts,
        sizes,
        &runtimes_names(&runtimes),
        &versions,
        &figs,
        &notes,
    )
}

fn runtimes_names(runtimes: &[crate::oci::Runtime]) -> Vec<&'static str> {
    runtimes.iter().map(|rt| rt.name).collect()
}

/// Writes `fs.md` (a table per place, ratios to runc and runsc, the targets) and `fs.json`.
/// Fails when a figure is missing for husk or runc: the bench must produce every one.
fn report(
    opts: &FsOptions,
    sizes: Sizes,
    runtimes: &[&'static str],
    versions: &BTreeMap<&'static str, String>,
    figs: &BTreeMap<String, Figure>,
    notes: &[String],
) -> Result<()> {
    let mut md = String::new();
    md.push_str(&format!(
        "## The container's files (`cargo xtask bench fs{}`)\n\n",
        if opts.quick { " --quick" } else { "" }
    ));
    md.push_str(&format!(
        "Seconds, median of {} run(s) per runtime, timed inside the container by busybox `time -p`. \
         Big file {} MiB; {} small files of {} bytes; {} files made, stat'ed and removed. \
         `rootfs`: files in the container's rootfs; `bind`: files in a bind-mounted host directory.\n\n",
        opts.runs,
        sizes.big_mib,
        sizes.dirs * sizes.files_per_dir,
        SMALL_FILE_BYTES,
        sizes.churn
    ));
    let mut report = Report::new(runtimes);
    md.push_str(&report.versions(versions));
    md.push('\n');
    let mut json_figs = serde_json::Map::new();
    let mut target_lines = Vec::new();
    let mut targets = Vec::new();
    let mut slowest_vs_runsc: Option<(f64, String)> = None;
    for (place, dir) in PLACES {
        md.push_str(&format!("### {place} (`{dir}`)\n\n"));
        md.push_str(&report.header("step", &["husk / runc", "husk / runsc"]));
        for (step, title) in STEPS {
            let k = key(place, step);
            let fig = figs.get(&k);
            let median = |rt: &str| fig.and_then(|f| f.median(rt));
            md.push_str(&format!("| {title} |"));
            md.push_str(&report.cells(&k, fig, 2));
            let ratio = |peer: &str| Some(median("husk")? / median(peer)?);
            let fmt = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
            md.push_str(&format!(
                " {} | {} |\n",
                fmt(ratio("runc")),
                fmt(ratio("runsc"))
            ));
            if let Some((_, most)) = TARGETS.iter().find(|(s, _)| *s == step) {
                let r = ratio("runc");
                targets.push(Target::at_most(
                    format!("{place}: {title}: husk / runc"),
                    r,
                    *most,
                    "x",
                ));
                target_lines.push(format!(
                    "- {place} {step}: husk / runc {} (target at most {most:.1}x): {}",
                    fmt(r),
                    match r {
                        Some(r) if r <= *most => "met",
                        Some(_) => "NOT MET",
                        None => "not measured",
                    }
                ));
            }
            if let Some(r) = ratio("runsc") {
                if slowest_vs_runsc
                    .as_ref()
                    .is_none_or(|(worst, _)| r > *worst)
                {
                    slowest_vs_runsc = Some((r, format!("{place}: {title}")));
                }
                if r > 1.0 {
                    target_lines.push(format!(
                        "- {place} {step}: husk is SLOWER than runsc ({r:.2}x; target: never)"
                    ));
                }
            }
            json_figs.insert(k, Figure::json(fig));
        }
        md.push('\n');
    }
    targets.push(Target::at_most(
        format!(
            "never slower than runsc: the largest husk / runsc{}",
            slowest_vs_runsc
                .as_ref()
                .map_or(String::new(), |(_, what)| format!(" ({what})"))
        ),
        slowest_vs_runsc.map(|(r, _)| r),
        1.0,
        "x",
    ));
    md.push_str("### Targets\n\n");
    for line in &target_lines {
        md.push_str(line);
        md.push('\n');
    }
    md.push_str(&Report::notes(notes));
    std::fs::write(opts.out.join("fs.md"), &md)?;
    std::fs::write(
        opts.out.join("fs.json"),
        serde_json::to_string_pretty(&json!({
            "quick": opts.quick,
            "runs": opts.runs,
            "sizes": {
                "big_mib": sizes.big_mib,
                "small_files": sizes.dirs * sizes.files_per_dir,
                "small_file_bytes": SMALL_FILE_BYTES,
                "churn": sizes.churn,
            },
            "runtimes": runtimes,
            "figures": json_figs,
            "targets": crate::report::targets_json(&targets),
        }))?,
    )?;
    eprintln!("{md}");
    report.finish("file")
}
