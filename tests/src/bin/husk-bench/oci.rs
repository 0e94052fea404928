//! `husk-bench oci`: husk against runc, crun and gVisor's runsc as OCI runtimes, each driven
//! through its own CLI on the same bundles (one busybox rootfs, one `config.json` per workload)
//! in the same place, interleaved run by run so that drift in the machine's load hits all alike.
//! Driven by `cargo xtask bench oci`; writes `oci.md`, `oci.json` and `oci.csv` to `--out`.
//!
//! Workloads:
//! 1. `run` of `/bin/true` end to end with a fresh id each time (`<runtime> run --bundle B ID`;
//!    runc, crun, runsc and husk all delete the container when a foreground `run` ends; the
//!    bench checks with `state` and deletes whatever is left, outside the timing).
//! 2. PSS of an idle `sleep` container: started with `run --detach`, measured 3 s later as the
//!    sum of `Pss` in `/proc/PID/smaps_rollup` over every process that did not exist before the
//!    start and runs the runtime's binary, `husk-vmm` or the container's busybox (for runc and
//!    crun the container's process; for runsc its sandbox, gofer and stub processes; for husk
//!    the `husk-vmm` process, whose PSS includes all the guest memory the guest touched).
//! 3. Syscall cost: `time -p dd if=/dev/zero of=/dev/null bs=1 count=2000000` in the container,
//!    timed inside by busybox `time` (the container's own clock: for husk the guest's kvm-clock);
//!    runsc runs `count=20000` (see [`DD_COUNT_RUNSC`]); all are also given per byte.
//! 4. Reading the rootfs: a 256 MiB file (`cat big > /dev/null`) and a tree of 10,000 files of
//!    1 KiB (`find tree -type f | xargs cat > /dev/null`), each timed inside by busybox `time`,
//!    first cold (the page cache of the machine running the runtimes dropped just before the
//!    container starts; the container's own caches - husk's guest, runsc's sentry - are new),
//!    then warm (the same reads again in the same container), then a walk of the tree alone.

use anyhow::{bail, Context, Result};
use husk_tests::{oci::make_busybox_rootfs, stats};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Size of the big file read from the rootfs.
const BIG_FILE_MIB: usize = 256;
/// The small-file tree: directories x files per directory, of `SMALL_FILE_BYTES` each.
const TREE_DIRS: usize = 100;
const TREE_FILES_PER_DIR: usize = 100;
const SMALL_FILE_BYTES: usize = 1024;
/// Guest memory for husk in the read workloads (annotation `io.husk.vm.mem_mib`, ignored by the
/// other runtimes), so that the warm pass can find the 256 MiB file in the guest's page cache.
const IO_GUEST_MEM_MIB: u32 = 512;
/// How long after `run --detach` returns the idle container's memory is read.
const PSS_SETTLE: Duration = Duration::from_secs(3);
/// The syscall workload: `count` reads and writes of one byte, timed by busybox `time -p`.
fn dd_args(count: u64) -> Vec<String> {
    let mut args: Vec<String> = ["time", "-p", "dd", "if=/dev/zero", "of=/dev/null", "bs=1"]
        .map(String::from)
        .to_vec();
    args.push(format!("count={count}"));
    args
}
/// The issue's `dd` count.
const DD_COUNT: u64 = 2_000_000;
/// runsc's `dd` count: each of its syscalls is trapped by its sentry, ~50x slower than a
/// native one (0.5 s per 20,000 on hardware), so the full count would take ~20 min per run
/// in the rig. Compared per byte.
const DD_COUNT_RUNSC: u64 = 20_000;
/// The read workload, run by `sh -c` in the container; prints five `real` lines (busybox
/// `time -p`): big file cold, tree cold, big file warm, tree warm, and a last walk of the tree
/// that opens no file (`find` alone: lookups, attributes and directory reads), which splits
/// the warm tree pass into walking and opening. busybox `cat` copies with `sendfile`, so a warm
/// pass costs page-cache lookups rather than copies into user memory.
const IO_SCRIPT: &str = "cd /bench && \
    time -p cat big > /dev/null && \
    time -p sh -c 'find tree -type f | xargs cat > /dev/null' && \
    time -p cat big > /dev/null && \
    time -p sh -c 'find tree -type f | xargs cat > /dev/null' && \
    time -p find tree -type f > /dev/null";
/// The figures of one read run, in the order of `IO_SCRIPT`'s reports.
const IO_FIGURES: [&str; 5] = [
    "big_cold",
    "tree_cold",
    "big_warm",
    "tree_warm",
    "walk_warm",
];

/// husk with warm start off (`warm_start = false`): every sandbox boots.
const HUSK_COLD: &str = "husk-cold";

/// What `husk-bench oci` was asked for.
pub struct OciOptions {
    /// Runs of `/bin/true` per runtime.
    pub runs: usize,
    /// Idle containers measured per runtime.
    pub pss_runs: usize,
    /// `dd` runs per runtime.
    pub dd_runs: usize,
    /// Read-workload runs per runtime.
    pub io_runs: usize,
    /// Lifecycle runs (`create`, `start`, `delete` timed apart) per runtime.
    pub split_runs: usize,
    /// Idle husk sandboxes alive at once, warm and cold, for the memory they share.
    pub idle_many: usize,
    /// Where the rootfs and bundles are built (a disk file system, so that dropping the page
    /// cache makes reads cold).
    pub dir: PathBuf,
    /// Where the results go.
    pub out: PathBuf,
    /// The longest any one runtime command may take.
    pub timeout: Duration,
}

/// One OCI runtime under test.
#[derive(Clone, Debug)]
pub(crate) struct Runtime {
    pub(crate) name: &'static str,
    pub(crate) program: PathBuf,
    /// Its private state root (`--root`).
    root: PathBuf,
    /// Global options besides `--root`.
    global_args: Vec<&'static str>,
    env: Vec<(String, PathBuf)>,
}

impl Runtime {
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--root")
            .arg(&self.root)
            .args(&self.global_args)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }
}

/// How one runtime command ended.
pub(crate) struct Outcome {
    pub(crate) status: ExitStatus,
    pub(crate) wall: Duration,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to completion with its output in files under `scratch` (a detached container
/// keeps its stdio open, so pipes would never reach EOF), killing it after `timeout`.
pub(crate) fn run_cmd(mut cmd: Command, scratch: &Path, timeout: Duration) -> Result<Outcome> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = scratch.join(format!("out.{n}"));
    let err_path = scratch.join(format!("err.{n}"));
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let (done, until_done) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = until_done.recv_timeout(timeout) {
            // SAFETY: kill(2) on our child, not reaped yet: the main thread reaps it in
            // `wait` and only then tells this thread, which then does not get here.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let status = child.wait()?;
    let wall = started.elapsed();
    let _ = done.send(());
    let killed = watchdog.join().unwrap_or(false);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    if killed {
        bail!(
            "{:?} {:?} did not finish within {} s; killed",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            timeout.as_secs()
        );
    }
    Ok(Outcome {
        status,
        wall,
        stdout,
        stderr,
    })
}

pub(crate) fn tail(text: &str) -> String {
    last_lines(text, 8).join("\n")
}

/// The last `n` lines of `text` (all of them when it has fewer).
pub(crate) fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The containers this bench started and has not deleted yet; `Drop` force-deletes them.
pub(crate) struct Containers {
    pub(crate) live: Vec<(Runtime, String)>,
    pub(crate) scratch: PathBuf,
    pub(crate) timeout: Duration,
}

impl Containers {
    pub(crate) fn started(&mut self, rt: &Runtime, id: &str) {
        self.live.push((rt.clone(), id.to_string()));
    }

    /// Deletes the container if the runtime still knows it (`state` succeeds).
    pub(crate) fn remove(&mut self, rt: &Runtime, id: &str) -> Result<()> {
        self.live.retain(|(r, i)| !(r.name == rt.name && i == id));
        let state = run_cmd(rt.command(&["state", id]), &self.scratch, self.timeout)?;
        if state.status.success() {
            let deleted = run_cmd(
                rt.command(&["delete", "--force", id]),
                &self.scratch,
                self.timeout,
            )?;
            if !deleted.status.success() {
                bail!(
                    "{} delete --force {id} failed: {}",
                    rt.name,
                    tail(&deleted.stderr)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for (rt, id) in std::mem::take(&mut self.live) {
            let _ = run_cmd(
                rt.command(&["delete", "--force", &id]),
                &self.scratch,
                self.timeout,
            );
        }
    }
}

/// Finds `name` on `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The bench's files: one rootfs, a `config.json` template from `husk spec`.
pub(crate) struct Bench {
    pub(crate) rootfs: PathBuf,
    bundles: PathBuf,
    template: Value,
}

impl Bench {
    fn build(husk: &Path, dir: &Path) -> Result<Bench> {
        Bench::build_with(husk, dir, |rootfs| {
            let started = Instant::now();
            write_read_data(
                &rootfs.join("bench"),
                BIG_FILE_MIB,
                TREE_DIRS,
                TREE_FILES_PER_DIR,
                SMALL_FILE_BYTES,
            )?;
            eprintln!(
                "oci bench: rootfs data ({BIG_FILE_MIB} MiB file, {} small files) written in {:.1} s",
                TREE_DIRS * TREE_FILES_PER_DIR,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        })
    }

    /// A busybox rootfs in `dir/rootfs` (`dir` emptied first), with `data` run on it, and the
    /// spec template.
    pub(crate) fn build_with(
        husk: &Path,
        dir: &Path,
        data: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Bench> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let rootfs = dir.join("rootfs");
        make_busybox_rootfs(&rootfs)?;
        data(&rootfs)?;
        let bundles = dir.join("bundles");
        let template_dir = bundles.join("template");
        std::fs::create_dir_all(&template_dir)?;
        let out = Command::new(husk)
            .arg("spec")
            .arg("--bundle")
            .arg(&template_dir)
            .output()
            .context("husk spec")?;
        if !out.status.success() {
            bail!("husk spec failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let template: Value =
            serde_json::from_str(&std::fs::read_to_string(template_dir.join("config.json"))?)
                .context("husk spec wrote invalid JSON")?;
        Ok(Bench {
            rootfs,
            bundles,
            template,
        })
    }

    /// A bundle running `args`, with `annotations` added; every runtime uses the same one.
    fn bundle(&self, name: &str, args: &[&str], annotations: &[(&str, String)]) -> Result<PathBuf> {
        self.bundle_with(name, args, annotations, |_| {})
    }

    /// [`Self::bundle`], with `edit` applied to the spec last.
    pub(crate) fn bundle_with(
        &self,
        name: &str,
        args: &[&str],
        annotations: &[(&str, String)],
        edit: impl FnOnce(&mut Value),
    ) -> Result<PathBuf> {
        let dir = self.bundles.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut spec = self.template.clone();
        spec["process"]["args"] = json!(args);
        spec["process"]["terminal"] = Value::Bool(false);
        spec["root"]["path"] = Value::String(self.rootfs.display().to_string());
        for (key, value) in annotations {
            spec["annotations"][*key] = Value::String(value.clone());
        }
        edit(&mut spec);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&spec)?,
        )?;
        Ok(dir)
    }
}

/// The read workloads' data under `dir`: `big` (`big_mib` MiB) and `tree/dNN/fNNN` (`dirs` x
/// `files_per_dir` files of `file_bytes`), not zeros (a cheap xorshift stream), written and
/// synced once per bench run.
pub(crate) fn write_read_data(
    dir: &Path,
    big_mib: usize,
    dirs: usize,
    files_per_dir: usize,
    file_bytes: usize,
) -> Result<()> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut block = vec![0u8; 1 << 20];
    std::fs::create_dir_all(dir)?;
    let mut big = std::fs::File::create(dir.join("big"))?;
    for _ in 0..big_mib {
        for chunk in block.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        big.write_all(&block)?;
    }
    big.sync_all()?;
    for d in 0..dirs {
        let sub = dir.join("tree").join(format!("d{d:02}"));
        std::fs::create_dir_all(&sub)?;
        for f in 0..files_per_dir {
            let mut data = vec![0u8; file_bytes];
            for chunk in data.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
            std::fs::write(sub.join(format!("f{f:03}")), &data)?;
        }
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

/// Writes back dirty pages and drops the page cache, dentries and inodes of this machine.
pub(crate) fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("dropping the page cache (/proc/sys/vm/drop_caches; the bench needs root)")
}

/// The `real` seconds of each busybox `time -p` report in `stderr`, in order.
pub(crate) fn real_seconds(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("real "))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// Every pid in `/proc` now.
pub(crate) fn pids() -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `(Pss, Rss)` in KiB of a process from `/proc/PID/smaps_rollup`; `None` for kernel threads,
/// zombies and processes gone meanwhile.
pub(crate) fn pss_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Pss:")?, field("Rss:")?))
}

/// The executable of a process as `(device, inode)`, read through `/proc/PID/exe` (which
/// resolves across mount namespaces and `pivot_root`).
pub(crate) fn exe_id(pid: u32) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta),
    ))
}

pub(crate) fn file_id(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta),
    ))
}

pub(crate) fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Samples of one figure, per runtime.
#[derive(Default)]
pub(crate) struct Figure {
    pub(crate) values: BTreeMap<&'static str, Vec<f64>>,
}

impl Figure {
    pub(crate) fn push(&mut self, rt: &'static str, value: f64) {
        self.values.entry(rt).or_default().push(value);
    }

    pub(crate) fn median(&self, rt: &str) -> Option<f64> {
        let v = self.values.get(rt)?;
        (!v.is_empty()).then(|| stats(v).0)
    }

    /// Every sample, by runtime, for a suite's JSON (`{}` for a figure never measured).
    pub(crate) fn json(fig: Option<&Figure>) -> Value {
        let mut per_rt = serde_json::Map::new();
        if let Some(fig) = fig {
            for (rt, values) in &fig.values {
                per_rt.insert(rt.to_string(), json!(values));
            }
        }
        Value::Object(per_rt)
    }
}

/// What the `fs` and `net` suites' Markdown reports share: the runtimes' versions, table
/// headers with a column per runtime, a row's medians, the notes, and the rule that every
/// figure exists for husk and runc.
pub(crate) struct Report<'a> {
    runtimes: &'a [&'static str],
    missing: Vec<String>,
}

impl<'a> Report<'a> {
    pub(crate) fn new(runtimes: &'a [&'static str]) -> Self {
        Report {
            runtimes,
            missing: Vec::new(),
        }
    }

    /// A `- runtime: version` line per runtime.
    pub(crate) fn versions(&self, versions: &BTreeMap<&'static str, String>) -> String {
        self.runtimes
            .iter()
            .map(|rt| format!("- {rt}: {}\n", versions.get(rt).map_or("", String::as_str)))
            .collect()
    }

    /// A table's header: `first`, a column per runtime, then `extra`.
    pub(crate) fn header(&self, first: &str, extra: &[&str]) -> String {
        let columns = std::iter::once(first)
            .chain(self.runtimes.iter().copied())
            .chain(extra.iter().copied());
        let names: Vec<&str> = columns.collect();
        format!(
            "| {} |\n|{}\n",
            names.join(" | "),
            "---|".repeat(names.len())
        )
    }

    /// A row's cell per runtime: the median with `decimals` digits, `-` where there is none.
    /// A figure missing for husk or runc is remembered as `key`.
    pub(crate) fn cells(&mut self, key: &str, fig: Option<&Figure>, decimals: usize) -> String {
        let median = |rt: &str| fig.and_then(|f| f.median(rt));
        for rt in ["husk", "runc"] {
            if median(rt).is_none() {
                self.missing.push(format!("{key} for {rt}"));
            }
        }
        self.runtimes
            .iter()
            .map(|rt| match median(rt) {
                Some(v) => format!(" {v:.decimals$} |"),
                None => " - |".to_string(),
            })
            .collect()
    }

    /// The notes section, if there are notes.
    pub(crate) fn notes(notes: &[String]) -> String {
        if notes.is_empty() {
            return String::new();
        }
        let mut md = "\n### Notes\n\n".to_string();
        for note in notes {
            md.push_str(&format!("- {note}\n"));
        }
        md
    }

    /// Fails, naming each, when a figure is missing for husk or runc.
    pub(crate) fn finish(self, suite: &str) -> Result<()> {
        if self.missing.is_empty() {
            return Ok(());
        }
        for m in &self.missing {
            loud(&format!("no figure: {m}"));
        }
        bail!(
            "the {suite} benchmark left {} figure(s) unmeasured",
            self.missing.len()
        )
    }
}

/// The figures of the report, in order: key, title, unit.
const FIGURES: &[(&str, &str, &str)] = &[
    ("run_true", "`run` of /bin/true, end to end", "ms"),
    ("split_create", "`create` of the /bin/true container", "ms"),
    ("split_start", "`start` of it", "ms"),
    ("split_delete", "`delete` of it once stopped", "ms"),
    (
        "start_detached",
        "`run --detach` of `sleep` (until it returns)",
        "ms",
    ),
    (
        "idle_pss",
        "PSS of an idle `sleep` container (all its processes)",
        "MiB",
    ),
    (
        "idle_rss",
        "RSS of an idle `sleep` container (all its processes)",
        "MiB",
    ),
    (
        "idle_many_pss",
        "PSS sum of N idle `sleep` containers alive at once (husk warm and cold)",
        "MiB",
    ),
    (
        "dd_inside",
        "`dd bs=1 count=2000000`, timed inside (`time -p`)",
        "s",
    ),
    (
        "dd_per_byte",
        "`dd bs=1`: time per byte (a read and a write), inside",
        "us",
    ),
    ("dd_wall", "`run` of the `dd` container, end to end", "s"),
    ("big_cold", "read 256 MiB file, cold", "s"),
    ("tree_cold", "read 10,000 x 1 KiB files, cold", "s"),
    (
        "big_warm",
        "read 256 MiB file, warm (2nd pass, same container)",
        "s",
    ),
    (
        "tree_warm",
        "read 10,000 x 1 KiB files, warm (2nd pass)",
        "s",
    ),
    (
        "walk_warm",
        "walk the 10,000-file tree without opening (`find`), after the passes",
        "s",
    ),
];

/// Runs the OCI benchmark.
pub fn bench_oci(opts: &OciOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the OCI benchmark needs root (runc, crun and runsc, and husk's bind mounts)");
    }
    let artifacts = husk_tests::vm_artifacts("husk-bench oci").context(
        "husk cannot run microVMs here (no usable KVM, or HUSK_KERNEL/HUSK_INITRAMFS unset)",
    )?;
    let husk = husk_tests::oci::husk_binary();
    std::fs::create_dir_all(&opts.out)?;
    let bench = Bench::build(&husk, &opts.dir)?;
    let Peers {
        runtimes,
        versions,
        notes,
        mut containers,
        scratch,
        true_bundle,
    } = peers(
        &husk,
        &artifacts,
        &bench,
        &opts.dir,
        Path::new("/run/husk-bench-oci"),
        true,
        "the idle-PSS target (husk at most 0.6x runsc)",
        opts.timeout,
    )?;
    let sleep_bundle = bench.bundle("sleep", &["sleep", "100000"], &[])?;
    let dd_full = dd_args(DD_COUNT);
    let dd_short = dd_args(DD_COUNT_RUNSC);
    let dd_bundle = bench.bundle(
        "dd",
        &dd_full.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )?;
    let dd_runsc_bundle = bench.bundle(
        "dd-runsc",
        &dd_short.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )?;
    let io_bundle = bench.bundle(
        "io",
        &["sh", "-c", IO_SCRIPT],
        &[("io.husk.vm.mem_mib", IO_GUEST_MEM_MIB.to_string())],
    )?;

    let ours = our_executables(&runtimes, &artifacts.vmm, &bench.rootfs)?;

    let mut figs: BTreeMap<&str, Figure> = BTreeMap::new();
    let mut pss_detail: Vec<Value> = Vec::new();

    // 1. run of /bin/true, interleaved, the starting runtime rotating.
    for i in 0..opts.runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            let id = format!("true-{i}-{}", rt.name);
            containers.started(rt, &id);
            let o = run_cmd(
                rt.command(&["run", "--bundle", path_str(&true_bundle)?, &id]),
                &scratch,
                opts.timeout,
            )?;
            containers.remove(rt, &id)?;
            if !o.status.success() {
                bail!(
                    "{} run /bin/true failed ({}): {}",
                    rt.name,
                    o.status,
                    tail(&o.stderr)
                );
            }
            let ms = o.wall.as_secs_f64() * 1e3;
            figs.entry("run_true").or_default().push(rt.name, ms);
            eprintln!("oci bench: run {i}: {} run /bin/true {ms:.0} ms", rt.name);
        }
    }

    // 1b. The same container's lifecycle step by step: where a `run` spends its time.
    for i in 0..opts.split_runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            let id = format!("split-{i}-{}", rt.name);
            containers.started(rt, &id);
            let step = |args: &[&str], what: &str| -> Result<f64> {
                let o = run_cmd(rt.command(args), &scratch, opts.timeout)?;
                if !o.status.success() {
                    bail!(
                        "{} {what} failed ({}): {}",
                        rt.name,
                        o.status,
                        tail(&o.stderr)
                    );
                }
                Ok(o.wall.as_secs_f64() * 1e3)
            };
            let create = step(
                &["create", "--bundle", path_str(&true_bundle)?, &id],
                "create",
            )?;
            let start = step(&["start", &id], "start")?;
            // Untimed: wait until /bin/true has exited.
            let deadline = Instant::now() + opts.timeout;
            loop {
                let state = run_cmd(rt.command(&["state", &id]), &scratch, opts.timeout)?;
                if !state.status.success() || state.stdout.contains("\"stopped\"") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{}: {id} never stopped", rt.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let delete = step(&["delete", &id], "delete")?;
            containers.remove(rt, &id)?;
            eprintln!(
                "oci bench: lifecycle {i}: {} create {create:.0} ms, start {start:.0} ms, delete {delete:.0} ms",
                rt.name
            );
            figs.entry("split_create")
                .or_default()
                .push(rt.name, create);
            figs.entry("split_start").or_default().push(rt.name, start);
            figs.entry("split_delete")
                .or_default()
                .push(rt.name, delete);
        }
    }

    // 2. Idle memory of a detached sleep container.
    for i in 0..opts.pss_runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            if rt.name == HUSK_COLD {
                continue;
            }
            let id = format!("sleep-{i}-{}", rt.name);
            let before = pids();
            containers.started(rt, &id);
            let o = run_cmd(
                rt.command(&["run", "--detach", "--bundle", path_str(&sleep_bundle)?, &id]),
                &scratch,
                opts.timeout,
            )?;
            if !o.status.success() {
                bail!(
                    "{} run --detach sleep failed ({}): {}",
                    rt.name,
                    o.status,
                    tail(&o.stderr)
                );
            }
            std::thread::sleep(PSS_SETTLE);
            let mut procs = Vec::new();
            let mut ignored = Vec::new();
            let (mut pss, mut rss) = (0u64, 0u64);
            for pid in pids().difference(&before) {
                if !exe_id(*pid).is_some_and(|id| ours.contains(&id)) {
                    if pss_rss_kib(*pid).is_some_and(|(_, r)| r > 0) {
                        ignored.push(comm(*pid));
                    }
                    continue;
                }
                if let Some((p, r)) = pss_rss_kib(*pid) {
                    if r == 0 {
                        continue;
                    }
                    pss += p;
                    rss += r;
                    procs.push(json!({"pid": pid, "comm": comm(*pid), "pss_kib": p, "rss_kib": r}));
                }
            }
            containers.remove(rt, &id)?;
            if procs.is_empty() {
                bail!("{}: no process of the idle container found", rt.name);
            }
            let start_ms = o.wall.as_secs_f64() * 1e3;
            eprintln!(
                "oci bench: idle {i}: {} PSS {:.2} MiB, RSS {:.2} MiB over {} processes ({}; other new processes ignored: {ignored:?}), detached start {start_ms:.0} ms",
                rt.name,
                pss as f64 / 1024.0,
                rss as f64 / 1024.0,
                procs.len(),
                procs.iter().filter_map(|p| p["comm"].as_str()).collect::<Vec<_>>().join(", ")
            );
            figs.entry("idle_pss")
                .or_default()
                .push(rt.name, pss as f64 / 1024.0);
            figs.entry("idle_rss")
                .or_default()
                .push(rt.name, rss as f64 / 1024.0);
            figs.entry("start_detached")
                .or_default()
                .push(rt.name, start_ms);
            pss_detail.push(
                json!({"runtime": rt.name, "run": i, "processes": procs, "ignored": ignored}),
            );
        }
    }

    // 2b. Many idle husk sandboxes alive at once, warm then cold: what they share.
    for rt in runtimes
        .iter()
        .filter(|rt| rt.name == "husk" || rt.name == HUSK_COLD)
    {
        if opts.idle_many == 0 {
            break;
        }
        let before = pids();
        let ids: Vec<String> = (0..opts.idle_many)
            .map(|n| format!("many-{n}-{}", rt.name))
            .collect();
        for id in &ids {
            containers.started(rt, id);
            let o = run_cmd(
                rt.command(&["run", "--detach", "--bundle", path_str(&sleep_bundle)?, id]),
                &scratch,
                opts.timeout,
            )?;
            if !o.status.success() {
                bail!(
                    "{} run --detach sleep failed ({}): {}",
                    rt.name,
                    o.status,
                    tail(&o.stderr)
                );
            }
        }
        std::thread::sleep(PSS_SETTLE);
        let pss: u64 = pids()
            .difference(&before)
            .filter(|pid| exe_id(**pid).is_some_and(|id| ours.contains(&id)))
            .filter_map(|pid| pss_rss_kib(*pid).map(|(p, _)| p))
            .sum();
        for id in &ids {
            containers.remove(rt, id)?;
        }
        eprintln!(
            "oci bench: {} idle {} containers at once: PSS sum {:.1} MiB",
            opts.idle_many,
            rt.name,
            pss as f64 / 1024.0
        );
        figs.entry("idle_many_pss")
            .or_default()
            .push(rt.name, pss as f64 / 1024.0);
    }

    // 3. Syscall cost.
    for i in 0..opts.dd_runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            if rt.name == HUSK_COLD {
                continue;
            }
            let id = format!("dd-{i}-{}", rt.name);
            let (bundle, count) = if rt.name == "runsc" {
                (&dd_runsc_bundle, DD_COUNT_RUNSC)
            } else {
                (&dd_bundle, DD_COUNT)
            };
            containers.started(rt, &id);
            let o = run_cmd(
                rt.command(&["run", "--bundle", path_str(bundle)?, &id]),
                &scratch,
                opts.timeout,
            )?;
            containers.remove(rt, &id)?;
            let real = real_seconds(&o.stderr);
            if !o.status.success() || real.len() != 1 {
                bail!(
                    "{} dd run failed ({}): {}",
                    rt.name,
                    o.status,
                    tail(&o.stderr)
                );
            }
            let per_byte_us = real[0] / count as f64 * 1e6;
            eprintln!(
                "oci bench: dd {i}: {} count={count}: {:.2} s inside ({per_byte_us:.2} us per byte), {:.2} s end to end",
                rt.name,
                real[0],
                o.wall.as_secs_f64()
            );
            figs.entry("dd_per_byte")
                .or_default()
                .push(rt.name, per_byte_us);
            if count == DD_COUNT {
                figs.entry("dd_inside").or_default().push(rt.name, real[0]);
                figs.entry("dd_wall")
                    .or_default()
                    .push(rt.name, o.wall.as_secs_f64());
            }
        }
    }

    // 4. Reading the rootfs, cold then warm.
    for i in 0..opts.io_runs {
        for k in 0..runtimes.len() {
            let rt = &runtimes[(i + k) % runtimes.len()];
            if rt.name == HUSK_COLD {
                continue;
            }
            let id = format!("io-{i}-{}", rt.name);
            drop_caches()?;
            containers.started(rt, &id);
            let o = run_cmd(
                rt.command(&["run", "--bundle", path_str(&io_bundle)?, &id]),
                &scratch,
                opts.timeout,
            )?;
            containers.remove(rt, &id)?;
            let real = real_seconds(&o.stderr);
            if !o.status.success() || real.len() != IO_FIGURES.len() {
                bail!(
                    "{} read run failed ({}): {}",
                    rt.name,
                    o.status,
                    tail(&o.stderr)
                );
            }
            eprintln!(
                "oci bench: read {i}: {} big cold {:.2} s, tree cold {:.2} s, big warm {:.2} s, tree warm {:.2} s, walk only {:.2} s",
                rt.name, real[0], real[1], real[2], real[3], real[4]
            );
            for (key, value) in IO_FIGURES.into_iter().zip(real) {
                figs.entry(key).or_default().push(rt.name, value);
            }
        }
    }
    drop(containers);

    report(opts, &runtimes, &versions, &figs, &notes, pss_detail)
}

/// The runtimes to compare: husk (warm start, its default), with `with_cold` husk again with
/// every sandbox booted ([`HUSK_COLD`]), and runc, crun and runsc where they are on `PATH`
/// (each missing one noted; `runsc_target` names what cannot be checked without runsc).
/// husk's configuration files are written under `dir`; each runtime gets its own state root
/// under `state_roots` (emptied first).
pub(crate) fn candidate_runtimes(
    husk: &Path,
    artifacts: &husk_tests::Artifacts,
    dir: &Path,
    state_roots: &Path,
    with_cold: bool,
    runsc_target: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Runtime>> {
    let config = dir.join("husk-config.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\nagent_timeout_ms = 600000\n",
            artifacts.kernel.display(),
            artifacts.initramfs.display(),
            artifacts.vmm.display()
        ),
    )?;
    let _ = std::fs::remove_dir_all(state_roots);
    let mut candidates = vec![Runtime {
        name: "husk",
        program: husk.to_path_buf(),
        root: state_roots.join("husk"),
        global_args: Vec::new(),
        env: vec![("HUSK_CONFIG".into(), config.clone())],
    }];
    if with_cold {
        // husk again, every sandbox booted: warm start's gain, measured in the same run.
        let cold_config = dir.join("husk-cold-config.toml");
        std::fs::write(
            &cold_config,
            format!("{}warm_start = false\n", std::fs::read_to_string(&config)?),
        )?;
        candidates.push(Runtime {
            name: HUSK_COLD,
            program: husk.to_path_buf(),
            root: state_roots.join(HUSK_COLD),
            global_args: Vec::new(),
            env: vec![("HUSK_CONFIG".into(), cold_config)],
        });
    }
    for name in ["runc", "crun", "runsc"] {
        match which(name) {
            Some(program) => candidates.push(Runtime {
                name,
                program,
                root: state_roots.join(name),
                // runsc refuses to run a sandbox with networking in the caller's network
                // namespace (an engine would have made one with CNI); husk's guests have only
                // loopback too, and runc and crun get an empty network namespace.
                global_args: if name == "runsc" {
                    vec!["--network=none"]
                } else {
                    Vec::new()
                },
                env: Vec::new(),
            }),
            None => {
                let note = if name == "runsc" {
                    format!(
                        "runsc (gVisor) is UNAVAILABLE here (not on PATH): {runsc_target} CANNOT BE CHECKED"
                    )
                } else {
                    format!("{name} is UNAVAILABLE here (not on PATH)")
                };
                loud(&note);
                notes.push(note);
            }
        }
    }
    Ok(candidates)
}

/// The runtimes a suite compares, probed, with what it needs around them.
pub(crate) struct Peers {
    /// The runtimes that ran a container here.
    pub(crate) runtimes: Vec<Runtime>,
    /// Every candidate's `--version`.
    pub(crate) versions: BTreeMap<&'static str, String>,
    /// What is missing or failed, for the report.
    pub(crate) notes: Vec<String>,
    /// The containers started and not deleted yet.
    pub(crate) containers: Containers,
    /// Where runtime commands' output goes.
    pub(crate) scratch: PathBuf,
    /// The bundle that runs `/bin/true`.
    pub(crate) true_bundle: PathBuf,
}

/// husk, runc, crun and runsc as [`candidate_runtimes`] finds them (husk-cold too with
/// `with_cold`), each probed with a `/bin/true` bundle of `bench` ([`probe`]); `dir` holds the
/// scratch directory and husk's configuration.
#[allow(clippy::too_many_arguments)]
pub(crate) fn peers(
    husk: &Path,
    artifacts: &husk_tests::Artifacts,
    bench: &Bench,
    dir: &Path,
    state_roots: &Path,
    with_cold: bool,
    runsc_target: &str,
    timeout: Duration,
) -> Result<Peers> {
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut notes = Vec::new();
    let candidates = candidate_runtimes(
        husk,
        artifacts,
        dir,
        state_roots,
        with_cold,
        runsc_target,
        &mut notes,
    )?;
    let versions = versions(&candidates);
    let mut containers = Containers {
        live: Vec::new(),
        scratch: scratch.clone(),
        timeout,
    };
    let true_bundle = bench.bundle_with("true", &["/bin/true"], &[], |_| {})?;
    let runtimes = probe(
        candidates,
        &true_bundle,
        &versions,
        &mut containers,
        runsc_target,
        &mut notes,
    )?;
    Ok(Peers {
        runtimes,
        versions,
        notes,
        containers,
        scratch,
        true_bundle,
    })
}

/// The executables whose processes count as a runtime's: the runtimes (runsc's sandbox, gofer
/// and stubs are runsc itself), husk-vmm, and the container's busybox, as `(device, inode)`.
pub(crate) fn our_executables(
    runtimes: &[Runtime],
    vmm: &Path,
    rootfs: &Path,
) -> Result<BTreeSet<(u64, u64)>> {
    let mut ours = BTreeSet::new();
    for rt in runtimes {
        ours.insert(file_id(&rt.program)?);
    }
    ours.insert(file_id(vmm)?);
    ours.insert(file_id(&rootfs.join("bin/busybox"))?);
    Ok(ours)
}

/// Each runtime's `--version`, first line.
pub(crate) fn versions(runtimes: &[Runtime]) -> BTreeMap<&'static str, String> {
    let mut versions = BTreeMap::new();
    for rt in runtimes {
        let out = Command::new(&rt.program).arg("--version").output();
        let version = out
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        versions.insert(rt.name, version);
    }
    versions
}

/// One untimed run of `true_bundle` by each candidate (which also warms the page cache with
/// the binaries): those that work. husk and runc must; another that fails is left out, noted.
pub(crate) fn probe(
    candidates: Vec<Runtime>,
    true_bundle: &Path,
    versions: &BTreeMap<&'static str, String>,
    containers: &mut Containers,
    runsc_target: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Runtime>> {
    let mut runtimes = Vec::new();
    for rt in candidates {
        let id = format!("probe-{}", rt.name);
        containers.started(&rt, &id);
        let probe = run_cmd(
            rt.command(&["run", "--bundle", path_str(true_bundle)?, &id]),
            &containers.scratch,
            containers.timeout,
        );
        containers.remove(&rt, &id)?;
        match probe {
            Ok(o) if o.status.success() => {
                eprintln!(
                    "bench: {} ({}) works: probe run {:.0} ms",
                    rt.name,
                    versions.get(rt.name).map_or("", String::as_str),
                    o.wall.as_secs_f64() * 1e3
                );
                runtimes.push(rt);
            }
            other => {
                let why = match other {
                    Ok(o) => format!("exit {}: {}", o.status, tail(&o.stderr)),
                    Err(e) => format!("{e:#}"),
                };
                if rt.name == "husk" || rt.name == HUSK_COLD || rt.name == "runc" {
                    bail!("{} cannot run a container here: {why}", rt.name);
                }
                let note = format!(
                    "{} FAILED to run a container here and is left out{}: {why}",
                    rt.name,
                    if rt.name == "runsc" {
                        format!("; {runsc_target} CANNOT BE CHECKED")
                    } else {
                        String::new()
                    }
                );
                loud(&note);
                notes.push(note);
            }
        }
    }
    Ok(runtimes)
}

pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

pub(crate) fn loud(msg: &str) {
    eprintln!("bench: !!! {msg} !!!");
}

/// One ratio against a target.
struct Ratio {
    what: String,
    value: Option<f64>,
    /// The target (at most), if it sets one.
    target: Option<f64>,
}

/// A figure's key, its label, and the peers husk is compared with (each with its target).
type RatioRow<'a> = (&'a str, &'a str, Vec<(&'a str, Option<f64>)>);

fn ratios(figs: &BTreeMap<&str, Figure>) -> Vec<Ratio> {
    let median = |key: &str, rt: &str| figs.get(key).and_then(|f| f.median(rt));
    let ratio = |key: &str, peer: &str| Some(median(key, "husk")? / median(key, peer)?);
    let mut out = Vec::new();
    let mut rows: Vec<RatioRow> = vec![
        (
            "run_true",
            "`run` of /bin/true",
            vec![
                ("runc", Some(1.5)),
                ("crun", None),
                ("runsc", None),
                (HUSK_COLD, None),
            ],
        ),
        (
            "split_create",
            "`create`",
            vec![("runc", None), (HUSK_COLD, None)],
        ),
        (
            "idle_many_pss",
            "idle sandboxes alive at once, PSS sum",
            vec![(HUSK_COLD, Some(0.5))],
        ),
    ];
    for (key, label, peers) in [
        (
            "idle_pss",
            "idle PSS",
            [("runsc", Some(0.6)), ("runc", None), ("crun", None)],
        ),
        (
            "dd_per_byte",
            "`dd` syscall loop, per byte",
            [("runc", Some(1.2)), ("crun", None), ("runsc", None)],
        ),
        (
            "big_cold",
            "256 MiB read, cold",
            [("runc", None), ("crun", None), ("runsc", None)],
        ),
        (
            "tree_cold",
            "10,000 files read, cold",
            [("runc", None), ("crun", None), ("runsc", None)],
        ),
        (
            "big_warm",
            "256 MiB read, warm",
            [("runc", None), ("crun", None), ("runsc", None)],
        ),
        (
            "tree_warm",
            "10,000 files read, warm",
            [("runc", None), ("crun", None), ("runsc", None)],
        ),
        (
            "walk_warm",
            "10,000-file walk, warm",
            [("runc", None), ("crun", None), ("runsc", None)],
        ),
    ] {
        rows.push((key, label, peers.to_vec()));
    }
    for (key, label, peers) in rows {
        for (peer, target) in peers {
            out.push(Ratio {
                what: format!("{label}: husk / {peer}"),
                value: ratio(key, peer),
                target,
            });
        }
    }
    out
}

fn report(
    opts: &OciOptions,
    runtimes: &[Runtime],
    versions: &BTreeMap<&'static str, String>,
    figs: &BTreeMap<&str, Figure>,
    notes: &[String],
    pss_detail: Vec<Value>,
) -> Result<()> {
    let mut md = format!(
        "OCI benchmark: {} runs of /bin/true, {} idle containers, {} dd runs, {} read runs per runtime\n\n",
        opts.runs, opts.pss_runs, opts.dd_runs, opts.io_runs
    );
    for rt in runtimes {
        md.push_str(&format!("- {}: {}\n", rt.name, versions[rt.name]));
    }
    md.push('\n');
    md.push_str("| figure | runtime | median | min | max | n |\n|---|---|---|---|---|---|\n");
    let mut csv = String::from("figure,runtime,run,value,unit\n");
    let mut json_figs = serde_json::Map::new();
    for (key, title, unit) in FIGURES {
        let Some(fig) = figs.get(key) else { continue };
        let mut per_rt = serde_json::Map::new();
        for rt in runtimes {
            let Some(values) = fig.values.get(rt.name) else {
                continue;
            };
            let (median, min, max) = stats(values);
            let prec = if *unit == "ms" { 0 } else { 2 };
            md.push_str(&format!(
                "| {title} | {} | {median:.prec$} {unit} | {min:.prec$} {unit} | {max:.prec$} {unit} | {} |\n",
                rt.name,
                values.len()
            ));
            for (i, v) in values.iter().enumerate() {
                csv.push_str(&format!("{key},{},{i},{v},{unit}\n", rt.name));
            }
            per_rt.insert(
                rt.name.into(),
                json!({"median": median, "min": min, "max": max, "values": values}),
            );
        }
        json_figs.insert(
            key.to_string(),
            json!({"title": title, "unit": unit, "runtimes": per_rt}),
        );
    }
    md.push_str("\n| ratio of medians | value | target | verdict |\n|---|---|---|---|\n");
    let mut json_ratios = Vec::new();
    let mut targets = Vec::new();
    for r in ratios(figs) {
        let value = r
            .value
            .map_or("n/a (runtime unavailable)".to_string(), |v| {
                if v < 0.1 {
                    format!("{v:.4}x")
                } else {
                    format!("{v:.2}x")
                }
            });
        let (target, verdict) = match (r.target, r.value) {
            (Some(t), Some(v)) => (
                format!("at most {t}x"),
                if v <= t { "met" } else { "**NOT met**" }.to_string(),
            ),
            (Some(t), None) => (format!("at most {t}x"), "**CANNOT BE CHECKED**".to_string()),
            (None, _) => (String::new(), String::new()),
        };
        md.push_str(&format!(
            "| {} | {value} | {target} | {verdict} |\n",
            r.what
        ));
        json_ratios.push(json!({"what": r.what, "value": r.value, "target_at_most": r.target}));
        if let Some(bound) = r.target {
            targets.push(crate::report::Target::at_most(
                r.what.clone(),
                r.value,
                bound,
                "x",
            ));
        }
    }
    md.push_str(
        "\nMethod: each runtime runs the same bundles (one busybox rootfs on a disk file system, \
         `husk spec` configs) through its own CLI with a private `--root`, interleaved run by run. \
         PSS: sum of `Pss` (smaps_rollup) over every process that appeared with the detached \
         container, 3 s after `run --detach` returned; for husk that is `husk-vmm`, whose PSS \
         includes every guest page the guest touched (the guest kernel, the agent, page cache). \
         `dd` and the reads are timed inside the container by busybox `time -p` (10 ms \
         resolution). Cold reads: the page cache of the machine running the runtimes is dropped \
         just before the container starts; husk's guest and runsc's sentry start with empty caches \
         anyway. Warm: the same reads again in the same container; then a `find` walk of the tree alone. husk's read runs get 512 MiB \
         of guest memory (annotation `io.husk.vm.mem_mib`), the other workloads its default.\n",
    );
    for note in notes {
        md.push_str(&format!("\n**{note}**\n"));
    }
    println!("{md}");
    std::fs::write(opts.out.join("oci.md"), &md)?;
    std::fs::write(opts.out.join("oci.csv"), &csv)?;
    std::fs::write(opts.out.join("oci.svg"), svg(runtimes, figs))?;
    let json = json!({
        "runs": {"run_true": opts.runs, "idle": opts.pss_runs, "dd": opts.dd_runs, "read": opts.io_runs},
        "runtimes": runtimes.iter().map(|r| (r.name.to_string(), json!(versions[r.name]))).collect::<serde_json::Map<_, _>>(),
        "figures": json_figs,
        "ratios": json_ratios,
        "targets": crate::report::targets_json(&targets),
        "idle_processes": pss_detail,
        "notes": notes,
        "load_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    std::fs::write(
        opts.out.join("oci.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

/// A strip plot of every figure: one panel per figure, one row per runtime, a dot per run and a
/// bar at the median, on a linear axis from 0 to the panel's largest value.
fn svg(runtimes: &[Runtime], figs: &BTreeMap<&str, Figure>) -> String {
    const WIDTH: f64 = 760.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 90.0;
    const ROW: f64 = 18.0;
    const TITLE: f64 = 22.0;
    const COLORS: &[&str] = &["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let plot_w = WIDTH - LEFT - RIGHT;
    let mut body = String::new();
    let mut y = 10.0;
    for (key, title, unit) in FIGURES {
        let Some(fig) = figs.get(key) else { continue };
        let max = fig
            .values
            .values()
            .flatten()
            .copied()
            .fold(0.0f64, f64::max);
        if max <= 0.0 {
            continue;
        }
        let title = title.replace('`', "");
        body.push_str(&format!(
            "<text x=\"4\" y=\"{:.1}\" font-weight=\"bold\">{}</text>\n",
            y + 14.0,
            xml_escape(&format!("{title} ({unit})"))
        ));
        y += TITLE;
        let top = y;
        for (i, rt) in runtimes.iter().enumerate() {
            let Some(values) = fig.values.get(rt.name) else {
                continue;
            };
            let color = COLORS[i % COLORS.len()];
            let cy = y + ROW / 2.0;
            body.push_str(&format!(
                "<text x=\"4\" y=\"{:.1}\">{}</text>\n",
                cy + 4.0,
                rt.name
            ));
            for v in values {
                body.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{cy:.1}\" r=\"3\" fill=\"{color}\" fill-opacity=\"0.5\"/>\n",
                    LEFT + v / max * plot_w
                ));
            }
            let median = stats(values).0;
            let mx = LEFT + median / max * plot_w;
            body.push_str(&format!(
                "<line x1=\"{mx:.1}\" x2=\"{mx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{median:.2}</text>\n",
                cy - 7.0,
                cy + 7.0,
                WIDTH - RIGHT + 6.0,
                cy + 4.0
            ));
            y += ROW;
        }
        body.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{top:.1}\" y2=\"{y:.1}\" stroke=\"#888\"/>\n\
             <line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#888\"/>\n\
             <text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"10\">0</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{max:.2} {unit}</text>\n",
            WIDTH - RIGHT,
            y + 11.0,
            WIDTH - RIGHT,
            y + 11.0
        ));
        y += 20.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y:.0}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_time_reports_are_read_in_order() {
        let stderr =
            "2000000+0 records in\n2000000+0 records out\nreal 3.85\nuser 1.20\nsys 2.60\n\
                      real 0.07\nuser 0.00\nsys 0.07\n";
        assert_eq!(real_seconds(stderr), vec![3.85, 0.07]);
        assert!(real_seconds("dd: can't open 'x'\n").is_empty());
    }

    #[test]
    fn dd_args_carry_the_count() {
        assert_eq!(
            dd_args(20_000).join(" "),
            "time -p dd if=/dev/zero of=/dev/null bs=1 count=20000"
        );
    }

    #[test]
    fn ratios_compare_husk_with_each_peer_and_mark_missing_ones() {
        let mut figs = BTreeMap::new();
        let mut fig = Figure::default();
        for (rt, v) in [("husk", 30.0), ("husk", 32.0), ("runsc", 40.0)] {
            fig.push(rt, v);
        }
        figs.insert("idle_pss", fig);
        let all = ratios(&figs);
        let vs_runsc = all
            .iter()
            .find(|r| r.what == "idle PSS: husk / runsc")
            .expect("the runsc ratio");
        assert_eq!(vs_runsc.value, Some(31.0 / 40.0));
        assert_eq!(vs_runsc.target, Some(0.6));
        let vs_runc = all
            .iter()
            .find(|r| r.what == "idle PSS: husk / runc")
            .expect("the runc ratio");
        assert_eq!(vs_runc.value, None);
    }
}
