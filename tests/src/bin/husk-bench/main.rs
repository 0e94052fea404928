//! `husk-bench boot`: boot benchmarks of husk-vmm against QEMU's microvm machine, measured in the
//! same place (the rig's L2 on machines without hardware KVM), so every runtime pays the same
//! emulation cost. Driven by `cargo xtask bench boot`; writes `boot.md` and `boot.json` to
//! `--out` (default `$HUSK_RIG_OUT`, else `target/bench`).
//!
//! Per run, for a 1 vCPU / 128 MiB guest:
//! - husk over vsock: process spawn to the agent's handshake (client side), the guest's uptime at
//!   that moment, husk-vmm's RSS without guest memory, and the guest memory the host backs;
//! - husk and QEMU on the serial console: process spawn to the agent's first console line
//!   (`husk-agent ...: up`), with the same kernel, initramfs and kernel command line.
//!
//! `husk-bench oci`: husk against runc, crun and runsc as OCI runtimes (see `oci.rs`).
//!
//! `husk-bench cri`: pods through CRI, handler `husk` against `runc` (see `cri.rs`).
//!
//! `husk-bench density`: idle sandboxes accumulated until the host's memory guard, husk against
//! runc, crun and runsc (see `density.rs`).
//!
//! `husk-bench soak`: guests booted back to back, for `cargo xtask rig soak` (see `soak.rs`).
//!
//! `husk-bench boot-trace`: one husk boot with the guest kernel's messages on (`loglevel=7`,
//! plus each `--trace-cmdline P`, e.g. `initcall_debug`), each console line printed with the host
//! time it arrived, to see where a boot spends its time (the kernel's own timestamps start
//! only with its clock). Printing slows the boot (every console byte is an exit to the VMM),
//! so a second, quiet boot counts the VM's exits by kind (KVM's debugfs statistics).

mod cri;
mod density;
mod fs;
mod net;
mod oci;
mod plot;
mod report;
mod soak;
mod usage;

use anyhow::{bail, Context, Result};
use husk_agent_protocol::client::AgentClient;
use husk_tests::{
    anonymous_ranges_of_size, parse_smaps_split, read_smaps, rss_split, stats, vm_artifacts,
    Artifacts, TempDir, BOOT_TIMEOUT,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEM_MIB: u32 = 128;
/// The line the agent prints on the console once it is up.
const AGENT_UP: &str = "husk-agent";
/// Kernel command line for the console comparison, the same for both VMMs (husk adds its
/// virtio-mmio devices, QEMU's microvm adds its own).
/// This is husk's `BASE_CMDLINE` plus `console=ttyS0` (husk adds `earlyprintk=serial` too,
/// which prints nothing under `quiet loglevel=1`).
const CONSOLE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet loglevel=1 tsc=reliable \
     no_timer_check rdinit=/init";

struct VsockRun {
    handshake_ms: f64,
    uptime_ms: f64,
    vmm_rss_mib: f64,
    guest_mib: f64,
    guest_anon_mib: f64,
    vm_created_ms: f64,
    kernel_loaded_ms: f64,
    first_vcpu_ms: f64,
    jail_ms: f64,
    confine_ms: f64,
}

const USAGE: &str = "usage: husk-bench boot|boot-trace|oci|cri|fs|net|density|soak|report|machine [--runs N] [--out DIR] [cri: --idle-pods N --trace] \
     [report: --results DIR --report FILE --plots DIR --link PREFIX] [machine: --name NAME] \
     [fs: --quick] [--big-mib M] [--churn N] [--dir DIR] [net: --quick] [--dir DIR] \
     [soak: --boots N] [--minutes M] [--first N] \
     [boot-trace: --trace-cmdline PARAM]... \
     [density: --max N] [--minutes M] [--in-flight N] [--parallel N] [--quick] [--dir DIR] \
     [oci: --idle-runs N] [--dd-runs N] [--read-runs N] [--split-runs N] [--idle-many N] [--dir DIR] [--timeout-s S]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 20usize;
    let mut out = std::env::var_os("HUSK_RIG_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    let mut what = None;
    let mut oci_opts = oci::OciOptions {
        runs,
        pss_runs: 5,
        dd_runs: 5,
        io_runs: 2,
        split_runs: 5,
        idle_many: 20,
        dir: PathBuf::from("/var/tmp/husk-bench-oci"),
        out: out.clone(),
        timeout: Duration::from_secs(1200),
    };
    let mut idle_pods = 10usize;
    let mut trace = false;
    let mut quick = false;
    let mut big_mib = None;
    let mut churn = None;
    let mut dir: Option<PathBuf> = None;
    let mut trace_cmdline = Vec::new();
    let mut results = None;
    let mut report_file = None;
    let mut plots = None;
    let mut link = None;
    let mut name = None;
    let (mut max, mut in_flight, mut parallel) = (None, 8usize, None);
    let mut budget = Duration::from_secs(12 * 60);
    let mut soak_opts = soak::SoakOptions {
        boots: 300,
        duration: Duration::from_secs(3600),
        first: 0,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--runs" => runs = value("--runs")?.parse()?,
            "--out" => out = PathBuf::from(value("--out")?),
            "--results" => results = Some(PathBuf::from(value("--results")?)),
            "--report" => report_file = Some(PathBuf::from(value("--report")?)),
            "--plots" => plots = Some(PathBuf::from(value("--plots")?)),
            "--link" => link = Some(value("--link")?.clone()),
            "--name" => name = Some(value("--name")?.clone()),
            "--trace-cmdline" => trace_cmdline.push(value("--trace-cmdline")?.clone()),
            "--boots" => soak_opts.boots = value("--boots")?.parse()?,
            "--minutes" => {
                // soak: how long it goes on; density: each runtime's time budget.
                soak_opts.duration =
                    Duration::from_secs_f64(value("--minutes")?.parse::<f64>()? * 60.0);
                budget = soak_opts.duration;
            }
            "--first" => soak_opts.first = value("--first")?.parse()?,
            "--idle-pods" => idle_pods = value("--idle-pods")?.parse()?,
            "--trace" => trace = true,
            "--idle-runs" => oci_opts.pss_runs = value("--idle-runs")?.parse()?,
            "--dd-runs" => oci_opts.dd_runs = value("--dd-runs")?.parse()?,
            "--read-runs" => oci_opts.io_runs = value("--read-runs")?.parse()?,
            "--split-runs" => oci_opts.split_runs = value("--split-runs")?.parse()?,
            "--idle-many" => oci_opts.idle_many = value("--idle-many")?.parse()?,
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--quick" => quick = true,
            "--max" => max = Some(value("--max")?.parse()?),
            "--in-flight" => in_flight = value("--in-flight")?.parse()?,
            "--parallel" => parallel = Some(value("--parallel")?.parse()?),
            "--big-mib" => big_mib = Some(value("--big-mib")?.parse()?),
            "--churn" => churn = Some(value("--churn")?.parse()?),
            "--timeout-s" => oci_opts.timeout = Duration::from_secs(value("--timeout-s")?.parse()?),
            "boot" => what = Some("boot"),
            "oci" => what = Some("oci"),
            "cri" => what = Some("cri"),
            "fs" => what = Some("fs"),
            "net" => what = Some("net"),
            "density" => what = Some("density"),
            "boot-trace" => what = Some("boot-trace"),
            "soak" => what = Some("soak"),
            "report" => what = Some("report"),
            "machine" => what = Some("machine"),
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    std::fs::create_dir_all(&out)?;
    match what {
        Some("boot") => {
            let artifacts = vm_artifacts("husk-bench").context("no usable KVM or artifacts")?;
            bench_boot(&artifacts, runs, &out)
        }
        Some("oci") => {
            oci_opts.runs = runs;
            oci_opts.out = out;
            if let Some(dir) = dir {
                oci_opts.dir = dir;
            }
            oci::bench_oci(&oci_opts)
        }
        Some("fs") => fs::bench_fs(&fs::FsOptions {
            runs,
            quick,
            big_mib,
            churn,
            dir: dir.unwrap_or_else(|| PathBuf::from("/var/tmp/husk-bench-fs")),
            out,
            timeout: oci_opts.timeout,
        }),
        Some("net") => net::bench_net(&net::NetOptions {
            runs,
            quick,
            dir: dir.unwrap_or_else(|| PathBuf::from("/var/tmp/husk-bench-net")),
            out,
            timeout: oci_opts.timeout,
        }),
        Some("density") => density::bench_density(&density::DensityOptions {
            max: max.unwrap_or(if quick { 8 } else { 500 }),
            budget,
            in_flight,
            parallel: parallel.unwrap_or(if quick { 8 } else { 40 }),
            quick,
            dir: dir.unwrap_or_else(|| PathBuf::from("/var/tmp/husk-bench-density")),
            out,
            timeout: oci_opts.timeout,
        }),
        Some("boot-trace") => {
            let artifacts = vm_artifacts("husk-bench").context("no usable KVM or artifacts")?;
            boot_trace(&artifacts, &trace_cmdline)
        }
        Some("soak") => soak::soak(&soak_opts),
        Some("cri") => cri::bench_cri(&cri::CriOptions {
            runs,
            idle_pods,
            trace,
            out,
        }),
        Some("report") => {
            let results = results.context("report needs --results DIR")?;
            report::report(&report::ReportOptions {
                out: report_file.unwrap_or_else(|| results.join("BENCHMARKS.md")),
                plots: plots.unwrap_or_else(|| results.clone()),
                link: link.unwrap_or_else(|| ".".into()),
                results,
            })
        }
        Some("machine") => {
            let file = out.join(format!(
                "machine-{}.json",
                name.as_deref().unwrap_or("this")
            ));
            std::fs::write(
                &file,
                serde_json::to_string_pretty(&report::machine_json())?,
            )?;
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn bench_boot(artifacts: &Artifacts, runs: usize, out: &Path) -> Result<()> {
    let mut vsock = Vec::new();
    let mut restored = Vec::new();
    let mut husk_console = Vec::new();
    let mut qemu_console = Vec::new();
    let mut qemu_rss = Vec::new();
    let template_dir = TempDir::new("husk-bench-template")?;
    let template = build_template(artifacts, template_dir.path())?;
    // Interleave the runtimes so drift in the machine's load hits them alike.
    for i in 0..runs {
        let v = husk_vsock_run(artifacts, None).with_context(|| format!("husk vsock run {i}"))?;
        eprintln!(
            "run {i}: husk handshake {:.1} ms (guest uptime {:.1} ms), VMM RSS {:.2} MiB, guest {:.1} MiB ({:.1} MiB private)",
            v.handshake_ms, v.uptime_ms, v.vmm_rss_mib, v.guest_mib, v.guest_anon_mib
        );
        vsock.push(v);
        let r = husk_vsock_run(artifacts, Some(&template))
            .with_context(|| format!("husk restore run {i}"))?;
        eprintln!(
            "run {i}: husk restored and renewed {:.1} ms, guest {:.1} MiB ({:.1} MiB private)",
            r.handshake_ms, r.guest_mib, r.guest_anon_mib
        );
        restored.push(r);
        let h = console_run(&husk_console_cmd(artifacts)?, false)
            .with_context(|| format!("husk console run {i}"))?;
        let (q, rss) =
            console_run(&qemu_cmd(artifacts), true).with_context(|| format!("qemu run {i}"))?;
        eprintln!(
            "run {i}: to first agent line: husk {:.1} ms, QEMU {:.1} ms",
            h.0, q
        );
        husk_console.push(h.0);
        qemu_console.push(q);
        qemu_rss.push(rss);
    }

    let col = |f: fn(&VsockRun) -> f64| vsock.iter().map(f).collect::<Vec<_>>();
    let rcol = |f: fn(&VsockRun) -> f64| restored.iter().map(f).collect::<Vec<_>>();
    let rows: Vec<(&str, Vec<f64>, &str)> = vec![
        (
            "(r) husk-vmm spawn to a renewed agent, restored from a template",
            rcol(|r| r.handshake_ms),
            "ms",
        ),
        (
            "(r) guest memory touched on the host after the renewal",
            rcol(|r| r.guest_mib),
            "MiB",
        ),
        (
            "(r) of which private to this VM (copied on write)",
            rcol(|r| r.guest_anon_mib),
            "MiB",
        ),
        (
            "(a) husk-vmm spawn to agent handshake (vsock)",
            col(|r| r.handshake_ms),
            "ms",
        ),
        ("(b) guest uptime at handshake", col(|r| r.uptime_ms), "ms"),
        (
            "(c) husk-vmm RSS after boot, without guest memory",
            col(|r| r.vmm_rss_mib),
            "MiB",
        ),
        (
            "(d) guest memory touched on the host after boot (all resident pages)",
            col(|r| r.guest_mib),
            "MiB",
        ),
        (
            "(d) of which private to this VM (anonymous)",
            col(|r| r.guest_anon_mib),
            "MiB",
        ),
        (
            "(d) of which shared page cache (kernel, initramfs files)",
            col(|r| r.guest_mib - r.guest_anon_mib),
            "MiB",
        ),
        (
            "husk: VM created (since process start)",
            col(|r| r.vm_created_ms),
            "ms",
        ),
        (
            "husk: kernel loaded (since process start)",
            col(|r| r.kernel_loaded_ms),
            "ms",
        ),
        (
            "husk: first vCPU entry (since process start)",
            col(|r| r.first_vcpu_ms),
            "ms",
        ),
        ("husk: entering the jail", col(|r| r.jail_ms), "ms"),
        (
            "husk: confinement in all (jail, capabilities, seccomp)",
            col(|r| r.confine_ms),
            "ms",
        ),
        (
            "husk --console: spawn to first agent line",
            husk_console.clone(),
            "ms",
        ),
        (
            "QEMU microvm: spawn to first agent line",
            qemu_console.clone(),
            "ms",
        ),
        (
            "QEMU microvm: RSS at first agent line (VMM + guest)",
            qemu_rss.clone(),
            "MiB",
        ),
    ];
    let mut md = format!(
        "| boot, {runs} runs, 1 vCPU / {MEM_MIB} MiB | median | min | max |\n|---|---|---|---|\n"
    );
    let mut json = serde_json::Map::new();
    for (name, values, unit) in &rows {
        let (median, min, max) = stats(values);
        md.push_str(&format!(
            "| {name} | {median:.2} {unit} | {min:.2} {unit} | {max:.2} {unit} |\n"
        ));
        json.insert(
            name.to_string(),
            serde_json::json!({"unit": unit, "median": median, "min": min, "max": max, "values": values}),
        );
    }
    let _ = std::fs::remove_dir_all(console_dir());
    let ratio = stats(&husk_console).0 / stats(&qemu_console).0;
    md.push_str(&format!(
        "\nhusk / QEMU, median spawn to first agent line: **{ratio:.2}x** (target: at most 0.6x)\n"
    ));
    json.insert("ratio_husk_over_qemu".into(), serde_json::json!(ratio));
    let restore_ratio = stats(&rcol(|r| r.handshake_ms)).0 / stats(&col(|r| r.handshake_ms)).0;
    md.push_str(&format!(
        "husk restored / booted, median spawn to agent: **{restore_ratio:.2}x** (target: at most 0.2x)\n"
    ));
    json.insert(
        "ratio_restore_over_boot".into(),
        serde_json::json!(restore_ratio),
    );
    let confine_share = stats(&rcol(|r| r.confine_ms)).0 / stats(&rcol(|r| r.handshake_ms)).0;
    md.push_str(&format!(
        "husk confinement (jail, capabilities, seccomp) / a restored VM's spawn to agent, \
         medians: **{:.1}%** (target: at most 5%)\n",
        confine_share * 100.0
    ));
    json.insert(
        "ratio_confine_over_restore".into(),
        serde_json::json!(confine_share),
    );
    let targets = [
        report::Target::at_most(
            "husk-vmm RSS after boot, without guest memory",
            Some(stats(&col(|r| r.vmm_rss_mib)).0),
            5.0,
            "MiB",
        ),
        report::Target::at_most(
            "guest memory touched on the host after boot",
            Some(stats(&col(|r| r.guest_mib)).0),
            24.0,
            "MiB",
        ),
        report::Target::at_most(
            "spawn to first agent line: husk / QEMU",
            Some(ratio),
            0.6,
            "x",
        ),
        report::Target::at_most(
            "spawn to agent: restored / booted",
            Some(restore_ratio),
            0.2,
            "x",
        ),
        report::Target::at_most(
            "confinement (jail, capabilities, seccomp) / a restored VM's spawn to agent",
            Some(confine_share * 100.0),
            5.0,
            "%",
        ),
    ];
    json.insert("targets".into(), report::targets_json(&targets));
    println!("{md}");
    std::fs::write(out.join("boot.md"), &md)?;
    std::fs::write(
        out.join("boot.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    Ok(())
}

/// The husk-vmm command of a bench guest in `dir` (1 vCPU, [`MEM_MIB`], a share).
fn vmm_cmd(artifacts: &Artifacts, dir: &Path) -> Result<Command> {
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let mut cmd = Command::new(&artifacts.vmm);
    cmd.arg("--kernel")
        .arg(&artifacts.kernel)
        .arg("--initramfs")
        .arg(&artifacts.initramfs)
        .args(["--cpus", "1", "--mem-mib", &MEM_MIB.to_string()])
        .arg("--vsock-socket")
        .arg(dir.join("v.sock"))
        .arg("--shared-dir")
        .arg(share)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(cmd)
}

/// A template of the bench's guest, saved under `dir`.
fn build_template(artifacts: &Artifacts, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("template");
    std::fs::create_dir_all(&out)?;
    let status = vmm_cmd(artifacts, dir)?
        .arg("--template-out")
        .arg(&out)
        .status()?;
    if !status.success() {
        bail!("husk-vmm --template-out failed ({status})");
    }
    Ok(out)
}

/// One guest booted (or restored from `template`) to its agent's answer, then shut down.
fn husk_vsock_run(artifacts: &Artifacts, template: Option<&Path>) -> Result<VsockRun> {
    let dir = TempDir::new("husk-bench")?;
    let socket = dir.path().join("v.sock");
    let report = dir.path().join("boot.json");
    let mut cmd = vmm_cmd(artifacts, dir.path())?;
    cmd.arg("--boot-report").arg(&report);
    if let Some(template) = template {
        cmd.arg("--restore").arg(template);
    }
    let started = Instant::now();
    let mut child = KillOnDrop(cmd.spawn()?);
    let (client, hello) = AgentClient::connect(&socket, BOOT_TIMEOUT)?;
    let handshake_ms = started.elapsed().as_secs_f64() * 1e3;
    // Read smaps at the handshake; split it once the report names the guest memory's ranges.
    let smaps = read_smaps(child.0.id())?;
    if !husk_tests::wait_until(BOOT_TIMEOUT, || report.exists()) {
        bail!("no boot report");
    }
    let timeline: husk_vmm::timeline::BootTimeline =
        serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let ranges = if timeline.guest_memory_host_ranges.is_empty() {
        // A husk-vmm from before the ranges were reported: its guest RAM is one anonymous
        // mapping of the guest's size.
        anonymous_ranges_of_size(&smaps, u64::from(MEM_MIB) * 1024)
    } else {
        timeline.guest_memory_host_ranges.clone()
    };
    let split = parse_smaps_split(&smaps, &ranges);
    client.shutdown()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let ms = |us: u64| us as f64 / 1e3;
    Ok(VsockRun {
        handshake_ms,
        uptime_ms: ms(hello.uptime_us),
        vmm_rss_mib: split.vmm_kib as f64 / 1024.0,
        guest_mib: split.guest_kib as f64 / 1024.0,
        guest_anon_mib: split.guest_anon_kib as f64 / 1024.0,
        vm_created_ms: ms(timeline.vm_created_us),
        kernel_loaded_ms: ms(timeline.kernel_loaded_us),
        first_vcpu_ms: timeline.first_vcpu_entry_us.map_or(f64::NAN, ms),
        jail_ms: timeline.jail_us.map_or(f64::NAN, ms),
        confine_ms: timeline.confine_us.map_or(f64::NAN, ms),
    })
}

fn husk_console_cmd(artifacts: &Artifacts) -> Result<Command> {
    let dir = console_dir();
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("v.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(&artifacts.vmm);
    cmd.arg("--kernel")
        .arg(&artifacts.kernel)
        .arg("--initramfs")
        .arg(&artifacts.initramfs)
        .args([
            "--cpus",
            "1",
            "--mem-mib",
            &MEM_MIB.to_string(),
            "--console",
        ])
        .arg("--vsock-socket")
        .arg(socket);
    Ok(cmd)
}

fn console_dir() -> PathBuf {
    std::env::temp_dir().join(format!("husk-bench-console-{}", std::process::id()))
}

fn qemu_cmd(artifacts: &Artifacts) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        &MEM_MIB.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(&artifacts.kernel)
    .arg("-initrd")
    .arg(&artifacts.initramfs)
    .arg("-append")
    .arg(CONSOLE_CMDLINE);
    cmd
}

/// Spawns `cmd`, returns the milliseconds until its stdout shows the agent's first line (and,
/// if `measure_rss`, the process's RSS at that moment in MiB), then kills it.
fn console_run(cmd: &Command, measure_rss: bool) -> Result<(f64, f64)> {
    let mut cmd = clone_command(cmd);
    let started = Instant::now();
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?,
    );
    let stdout = child.0.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if String::from_utf8_lossy(&line).contains(AGENT_UP) {
                let _ = tx.send(Instant::now());
                return;
            }
        }
    });
    let seen = rx
        .recv_timeout(BOOT_TIMEOUT)
        .context("the agent's console line never came")?;
    let ms = seen.duration_since(started).as_secs_f64() * 1e3;
    let rss = if measure_rss {
        rss_split(child.0.id(), &[])?.vmm_kib as f64 / 1024.0
    } else {
        0.0
    };
    Ok((ms, rss))
}

/// `husk-bench boot-trace` (see the module docs).
fn boot_trace(artifacts: &Artifacts, extra: &[String]) -> Result<()> {
    let mut cmd = husk_console_cmd(artifacts)?;
    cmd.arg("--cmdline-extra")
        .arg(format!("loglevel=7 {}", extra.join(" ")));
    let started = Instant::now();
    let (child, stdout) = spawn_with_stdout(&mut cmd)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            println!("{:9.1} ms | {text}", started.elapsed().as_secs_f64() * 1e3);
            if text.contains(AGENT_UP) {
                let _ = tx.send(());
                return;
            }
        }
    });
    rx.recv_timeout(BOOT_TIMEOUT)
        .context("the agent's console line never came")?;
    drop(child);

    // A quiet boot, to count its VM exits by kind (KVM's per-VM statistics in debugfs) at the
    // agent's first line: printing would add an exit per console byte.
    let mut cmd = husk_console_cmd(artifacts)?;
    let started = Instant::now();
    let (child, stdout) = spawn_with_stdout(&mut cmd)?;
    let up = BufReader::new(stdout)
        .split(b'\n')
        .map_while(Result::ok)
        .any(|line| String::from_utf8_lossy(&line).contains(AGENT_UP));
    if !up {
        bail!("the quiet boot's agent never printed its line");
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let stats = kvm_stats(child.0.id())?;
    println!("quiet boot: agent up after {ms:.0} ms; KVM statistics of the VM at that moment:");
    for (name, value) in stats {
        println!("{name:>28} {value}");
    }
    let _ = std::fs::remove_dir_all(console_dir());
    Ok(())
}

/// Spawns husk-vmm from `cmd` with its stdout piped to us; killed when the handle drops.
fn spawn_with_stdout(cmd: &mut Command) -> Result<(KillOnDrop, std::process::ChildStdout)> {
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning husk-vmm")?,
    );
    let stdout = child.0.stdout.take().context("stdout")?;
    Ok((child, stdout))
}

/// KVM's statistics of the VM of process `pid` (`/sys/kernel/debug/kvm/<pid>-<fd>/`, the
/// per-VM sums over its vCPUs), non-zero ones, largest first. Mounts debugfs if needed.
fn kvm_stats(pid: u32) -> Result<Vec<(String, u64)>> {
    let root = Path::new("/sys/kernel/debug");
    if !root.join("kvm").exists() {
        let status = Command::new("mount")
            .args(["-t", "debugfs", "debugfs"])
            .arg(root)
            .status()
            .context("mount debugfs")?;
        if !status.success() {
            bail!("cannot mount debugfs at {}", root.display());
        }
    }
    let prefix = format!("{pid}-");
    let dir = std::fs::read_dir(root.join("kvm"))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .with_context(|| format!("no KVM statistics for pid {pid}"))?
        .path();
    let mut stats = Vec::new();
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if !entry.path().is_file() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Ok(value) = text.trim().parse::<u64>() {
            if value > 0 {
                stats.push((entry.file_name().to_string_lossy().into_owned(), value));
            }
        }
    }
    stats.sort_by_key(|s| std::cmp::Reverse(s.1));
    Ok(stats)
}

fn clone_command(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    c
}

/// Kills and reaps the child when dropped, so no run outlives the benchmark.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
