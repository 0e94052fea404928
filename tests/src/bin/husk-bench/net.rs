//! `husk-bench net`: the container's network, husk against runc and crun on the same kind of
//! network in the same run. Driven by `cargo xtask bench net`; writes `net.md` and `net.json`
//! to `--out`.
//!
//! A network namespace as an engine leaves it (a veth end `eth0` with an address, its peer on
//! the host) is named in every container's spec: runc and crun put the container in it, husk
//! carries its interface into the microVM (TAP, `tc` redirects, virtio-net). The container
//! runs busybox `nc` servers one after another while this process drives them from the host:
//!
//! 1. `to_container`: TCP throughput, host to container (the container's `nc -l` reads into
//!    `/dev/null`), MiB/s from the first byte sent to the container closing;
//! 2. `echo`: request/response latency, 64-byte messages echoed by `nc -l -e cat`, the median
//!    round trip in microseconds;
//! 3. `from_container`: TCP throughput, container to host (`dd` of zeros into `nc`), MiB/s
//!    from the connection accepted to its end.
//!
//! And the wiring itself: husk's in-process rtnetlink wiring of that namespace to a TAP
//! (`husk::network::prepare`, released again after each round) against the same work done the
//! way husk did it before, with nine `ip` and `tc` commands, in milliseconds.
//!
//! Beside the figures, the profile behind them (`usage.rs`): during the first two, how the
//! host's busy CPU time splits between husk's vCPU (in the guest, and in the host's kernel for
//! exits), husk-vmm's device thread and everything else, and KVM's exits, per MiB and per
//! round trip.
//!
//! Targets (issue "networks from the engines"): throughput at least 0.5x runc's, latency at
//! most 3x runc's, the wiring at most 50 ms.

use crate::oci::{
    candidate_runtimes, path_str, probe, run_cmd, tail, versions, Bench, Containers, Figure, Report,
};
use crate::report::Target;
use crate::usage::Usage;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What `husk-bench net` was asked for.
pub struct NetOptions {
    /// Runs per runtime.
    pub runs: usize,
    /// Small sizes (a check that every figure is produced), not the report's.
    pub quick: bool,
    /// Where the bundles are built.
    pub dir: PathBuf,
    /// Where the results go.
    pub out: PathBuf,
    /// The longest any one runtime command may take.
    pub timeout: Duration,
}

/// The namespace, its host-side link and the addresses.
const NETNS: &str = "husk-bench-net";
const HOST_IF: &str = "hb-net0";
const HOST_IP: &str = "10.202.1.1";
const GUEST_IP: &str = "10.202.1.2";
const PORT_IN: u16 = 5001;
const PORT_ECHO: u16 = 5007;
const PORT_OUT: u16 = 5002;
/// Figures by key.
type Figures = BTreeMap<String, Figure>;

/// Bytes of each echoed message.
const ECHO_BYTES: usize = 64;

/// The figures: key, title, unit, whether more is better.
const FIGURES: [(&str, &str, &str, bool); 3] = [
    (
        "to_container",
        "TCP throughput, host to container",
        "MiB/s",
        true,
    ),
    ("echo", "request/response round trip, 64 bytes", "µs", false),
    (
        "from_container",
        "TCP throughput, container to host",
        "MiB/s",
        true,
    ),
];

/// The targets: figure, the husk / runc ratio's bound (throughput: at least; latency: at most).
const TARGETS: [(&str, f64); 3] = [
    ("to_container", 0.5),
    ("echo", 3.0),
    ("from_container", 0.5),
];

/// The wiring's bound, in milliseconds.
const WIRING_TARGET_MS: f64 = 50.0;

/// Times `rounds` wirings of the namespace: husk's (`prepare`, then the release that `delete`
/// does) and iproute2's nine commands for the same links, qdiscs and filters (the TAP made and
/// everything removed outside the timing). Returns the samples, keyed `husk` and `iproute2`.
fn wiring(rounds: usize, scratch: &Path) -> Result<Figure> {
    let netns = PathBuf::from(format!("/run/netns/{NETNS}"));
    let mut fig = Figure::default();
    let cmd = |program: &str, args: &[&str]| -> Result<()> {
        let out = Command::new(program)
            .arg("-n")
            .arg(NETNS)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    for _ in 0..rounds {
        let started = Instant::now();
        let net = husk::network::prepare(&netns)?;
        if net.is_empty() {
            bail!("husk found no interface to carry in the benchmark's namespace");
        }
        fig.push("husk", started.elapsed().as_secs_f64() * 1000.0);
        husk::network::record(scratch, &netns, &net)?;
        drop(net);
        husk::network::release_recorded(scratch)?;

        cmd("ip", &["tuntap", "add", "husk0", "mode", "tap", "vnet_hdr"])?;
        let started = Instant::now();
        cmd("ip", &["-j", "addr", "show"])?;
        cmd("ip", &["-j", "-4", "route", "show", "default"])?;
        cmd("ip", &["link", "set", "husk0", "mtu", "1500", "up"])?;
        for (from, to) in [("eth0", "husk0"), ("husk0", "eth0")] {
            cmd("tc", &["qdisc", "replace", "dev", from, "ingress"])?;
            // Nothing to delete (as in the common case before): it fails, as it did then.
            let _ = cmd("tc", &["filter", "del", "dev", from, "ingress"]);
            cmd(
                "tc",
                &[
                    "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
                ],
            )?;
        }
        fig.push("iproute2", started.elapsed().as_secs_f64() * 1000.0);
        cmd("ip", &["link", "del", "husk0"])?;
        cmd("tc", &["qdisc", "del", "dev", "eth0", "ingress"])?;
    }
    Ok(fig)
}

/// Makes the namespace (removing one a killed run left).
fn make_netns() -> Result<()> {
    remove_netns();
    let ip = |args: &[&str]| -> Result<()> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    ip(&["netns", "add", NETNS])?;
    ip(&[
        "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", NETNS,
    ])?;
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", HOST_IF])?;
    ip(&["link", "set", HOST_IF, "up"])?;
    ip(&[
        "-n",
        NETNS,
        "addr",
        "add",
        &format!("{GUEST_IP}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", NETNS, "link", "set", "eth0", "up"])?;
    ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
    ip(&["-n", NETNS, "route", "add", "default", "via", HOST_IP])?;
    Ok(())
}

fn remove_netns() {
    let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
    let _ = Command::new("ip").args(["link", "del", HOST_IF]).output();
}

/// Connects to the container's `port`, retrying while it is not listening yet.
fn connect(port: u16, deadline: Instant) -> Result<TcpStream> {
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse()?;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {addr}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends `bytes` to the container and returns MiB/s, timed until the container closed, and
/// what the host used meanwhile.
fn to_container(bytes: usize, deadline: Instant) -> Result<(f64, Usage)> {
    let mut s = connect(PORT_IN, deadline)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![0u8; 64 * 1024];
    let before = Usage::now();
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 16];
    while s.read(&mut sink)? > 0 {}
    let secs = started.elapsed().as_secs_f64();
    Ok((
        bytes as f64 / (1024.0 * 1024.0) / secs,
        Usage::now().since(&before),
    ))
}

/// `rounds` round trips with the container's echo server; the median in microseconds, and
/// what the host used meanwhile.
fn echo(rounds: usize, deadline: Instant) -> Result<(f64, Usage)> {
    let mut s = connect(PORT_ECHO, deadline)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let msg = [b'x'; ECHO_BYTES];
    let mut back = [0u8; ECHO_BYTES];
    let mut times = Vec::with_capacity(rounds);
    let before = Usage::now();
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let used = Usage::now().since(&before);
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], used))
}

/// Accepts the container's connection and returns MiB/s of what it sent, and the bytes.
fn from_container(listener: &TcpListener, deadline: Instant) -> Result<(f64, usize)> {
    listener.set_nonblocking(true)?;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("the container never connected to {HOST_IP}:{PORT_OUT}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting the container's connection"),
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok((
        total as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64(),
        total,
    ))
}

pub fn bench_net(opts: &NetOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the network benchmark needs root (network namespaces, runc and crun)");
    }
    let (mib, rounds) = if opts.quick { (8, 200) } else { (64, 1000) };
    let bytes = mib * 1024 * 1024;
    let artifacts = husk_tests::vm_artifacts("husk-bench net").context(
        "husk cannot run microVMs here (no usable KVM, or HUSK_KERNEL/HUSK_INITRAMFS unset)",
    )?;
    husk_tests::load_tun()?;
    let husk = husk_tests::oci::husk_binary();
    std::fs::create_dir_all(&opts.out)?;
    let bench = Bench::build_with(&husk, &opts.dir, |_| Ok(()))?;
    let scratch = opts.dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut notes = Vec::new();
    let mut candidates = candidate_runtimes(
        &husk,
        &artifacts,
        &opts.dir,
        Path::new("/run/husk-bench-net"),
        false,
        "none (runsc is not compared on this network)",
        &mut notes,
    )?;
    candidates.retain(|rt| rt.name != "runsc");
    notes.retain(|n| !n.contains("runsc"));
    let versions = versions(&candidates);
    let mut containers = Containers {
        live: Vec::new(),
        scratch: scratch.clone(),
        timeout: opts.timeout,
    };
    make_netns()?;
    let netns = format!("/run/netns/{NETNS}");
    let result = (|| -> Result<(Figures, Figure, Figures)> {
        let wired = wiring(if opts.quick { 3 } else { 10 }, &scratch)?;
        let in_netns = |spec: &mut Value| {
            if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
                namespaces.retain(|ns| ns["type"] != "network");
                namespaces.push(json!({"type": "network", "path": netns}));
            }
        };
        let true_bundle = bench.bundle_with("true", &["/bin/true"], &[], in_netns)?;
        let script = format!(
            "nc -l -p {PORT_IN} > /dev/null; nc -l -p {PORT_ECHO} -e cat; \
             dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {HOST_IP} {PORT_OUT}",
            bytes / 65536
        );
        let net_bundle = bench.bundle_with("net", &["sh", "-c", &script], &[], in_netns)?;
        let runtimes = probe(
            candidates,
            &true_bundle,
            &versions,
            &mut containers,
            "none",
            &mut notes,
        )?;
        let mut figs: BTreeMap<String, Figure> = BTreeMap::new();
        let mut profile: BTreeMap<String, Figure> = BTreeMap::new();
        for i in 0..opts.runs {
            for k in 0..runtimes.len() {
                let rt = runtimes[(i + k) % runtimes.len()].clone();
                let id = format!("net-{i}-{}", rt.name);
                let listener = TcpListener::bind((HOST_IP, PORT_OUT))
                    .with_context(|| format!("listening on {HOST_IP}:{PORT_OUT}"))?;
                containers.started(&rt, &id);
                let cmd = rt.command(&["run", "--bundle", path_str(&net_bundle)?, &id]);
                let (scratch, timeout) = (scratch.clone(), opts.timeout);
                let container = std::thread::spawn(move || run_cmd(cmd, &scratch, timeout));
                let deadline = Instant::now() + opts.timeout;
                let measured = (|| -> Result<[f64; 3]> {
                    let (tput_in, used_in) = to_container(bytes, deadline)?;
                    let (rtt, used_echo) = echo(rounds, deadline)?;
                    for (phase, used) in [
                        ("to_container", used_in.per(mib as f64)),
                        ("echo", used_echo.per(rounds as f64)),
                    ] {
                        for (row, _) in Usage::ROWS {
                            if let Some(v) = used.row(row) {
                                profile
                                    .entry(format!("{phase}/{row}"))
                                    .or_default()
                                    .push(rt.name, v);
                            }
                        }
                    }
                    let (tput_out, got) = from_container(&listener, deadline)?;
                    if got != bytes {
                        bail!("received {got} of {bytes} bytes from the container");
                    }
                    Ok([tput_in, rtt, tput_out])
                })();
                let outcome = container
                    .join()
                    .map_err(|_| anyhow::anyhow!("the container thread panicked"))?;
                containers.remove(&rt, &id)?;
                let values = match (measured, outcome) {
                    (Ok(values), Ok(o)) if o.status.success() => values,
                    (measured, outcome) => bail!(
                        "{} network run failed: {}; the container: {}",
                        rt.name,
                        measured.err().map_or("-".into(), |e| format!("{e:#}")),
                        match outcome {
                            Ok(o) => format!("{}: {}", o.status, tail(&o.stderr)),
                            Err(e) => format!("{e:#}"),
                        }
                    ),
                };
                let mut line = format!("net bench: run {i}: {}", rt.name);
                for ((key, _, unit, _), value) in FIGURES.iter().zip(values) {
                    line.push_str(&format!(" {key} {value:.1} {unit}"));
                    figs.entry(key.to_string())
                        .or_default()
                        .push(rt.name, value);
                }
                eprintln!("{line}");
            }
        }
        Ok((figs, wired, profile))
    })();
    drop(containers);
    remove_netns();
    let (figs, wired, profile) = result?;
    let names: Vec<&'static str> = ["husk", "runc", "crun"]
        .into_iter()
        .filter(|n| versions.contains_key(n))
        .collect();
    report(
        opts,
        mib,
        rounds,
        &names,
        &versions,
        (&figs, &wired, &profile),
        &notes,
    )
}

/// Writes `net.md` (the figures, ratios to runc, the targets) and `net.json`. Fails when a
/// figure is missing for husk or runc.
fn report(
    opts: &NetOptions,
    mib: usize,
    rounds: usize,
    runtimes: &[&'static str],
    versions: &BTreeMap<&'static str, String>,
    (figs, wired, profile): (
        &BTreeMap<String, Figure>,
        &Figure,
        &BTreeMap<String, Figure>,
    ),
    notes: &[String],
) -> Result<()> {
    let mut md = format!(
        "## The container's network (`cargo xtask bench net{}`)\n\n\
         Median of {} run(s) per runtime. Each container is in a network namespace with a veth \
         (runc, crun) or gets its interface carried into its microVM (husk); {mib} MiB each way, \
         {rounds} round trips of {ECHO_BYTES} bytes, driven from the host.\n\n",
        if opts.quick { " --quick" } else { "" },
        opts.runs
    );
    let mut report = Report::new(runtimes);
    md.push_str(&report.versions(versions));
    md.push('\n');
    md.push_str(&report.header("figure", &["husk / runc"]));
    let mut targets = Vec::new();
    let mut json_targets = Vec::new();
    let mut json_figs = serde_json::Map::new();
    for (key, title, unit, more_is_better) in FIGURES {
        let fig = figs.get(key);
        let median = |rt: &str| fig.and_then(|f| f.median(rt));
        md.push_str(&format!("| {title} ({unit}) |"));
        md.push_str(&report.cells(key, fig, 1));
        let ratio = (|| Some(median("husk")? / median("runc")?))();
        md.push_str(&format!(
            " {} |\n",
            ratio.map_or("-".to_string(), |r| format!("{r:.2}x"))
        ));
        if let Some((_, bound)) = TARGETS.iter().find(|(k, _)| *k == key) {
            let met = ratio.map(|r| {
                if more_is_better {
                    r >= *bound
                } else {
                    r <= *bound
                }
            });
            json_targets.push(if more_is_better {
                Target::at_least(format!("{title}: husk / runc"), ratio, *bound, "x")
            } else {
                Target::at_most(format!("{title}: husk / runc"), ratio, *bound, "x")
            });
            targets.push(format!(
                "- {key}: husk / runc {} (target {} {bound:.1}x): {}",
                ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
                if more_is_better {
                    "at least"
                } else {
                    "at most"
                },
                match met {
                    Some(true) => "met",
                    Some(false) => "NOT MET",
                    None => "not measured",
                }
            ));
        }
        json_figs.insert(key.to_string(), Figure::json(fig));
    }
    let wiring_ms = |who: &str| wired.median(who);
    md.push_str(&format!(
        "\n| wiring the namespace to a TAP (links, qdiscs, redirects), {} rounds | median (ms) |\n\
         |---|---|\n\
         | husk: in-process rtnetlink | {} |\n\
         | the same with `ip` and `tc` (9 commands) | {} |\n",
        wired.values.get("husk").map_or(0, Vec::len),
        wiring_ms("husk").map_or("-".to_string(), |v| format!("{v:.1}")),
        wiring_ms("iproute2").map_or("-".to_string(), |v| format!("{v:.1}")),
    ));
    json_targets.push(Target::at_most(
        "network wiring of a namespace (ms)".to_string(),
        wiring_ms("husk"),
        WIRING_TARGET_MS,
        "ms",
    ));
    targets.push(format!(
        "- wiring: husk {} (target at most {WIRING_TARGET_MS:.0} ms): {}",
        wiring_ms("husk").map_or("-".to_string(), |v| format!("{v:.1} ms")),
        match wiring_ms("husk") {
            Some(v) if v <= WIRING_TARGET_MS => "met",
            Some(_) => "NOT MET",
            None => "not measured",
        }
    ));
    json_figs.insert("wiring".to_string(), Figure::json(Some(wired)));
    md.push_str(&profile_table(profile, mib, rounds));
    md.push_str("\n### Targets\n\n");
    for line in &targets {
        md.push_str(line);
        md.push('\n');
    }
    md.push_str(&Report::notes(notes));
    std::fs::write(opts.out.join("net.md"), &md)?;
    std::fs::write(
        opts.out.join("net.json"),
        serde_json::to_string_pretty(&json!({
            "quick": opts.quick,
            "runs": opts.runs,
            "mib": mib,
            "rounds": rounds,
            "runtimes": runtimes,
            "figures": json_figs,
            "profile": profile
                .iter()
                .map(|(k, f)| (k.clone(), Figure::json(Some(f))))
                .collect::<serde_json::Map<_, _>>(),
            "targets": crate::report::targets_json(&json_targets),
        }))?,
    )?;
    eprintln!("{md}");
    report.finish("network")
}

/// The profile behind the figures (`usage.rs`): where the host's CPU went, medians of the
/// runs, per MiB sent to the container and per round trip; runc's busy time beside husk's.
fn profile_table(profile: &Figures, mib: usize, rounds: usize) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = if cpus == 1 {
        "the host has one CPU, so this is the figures' time".to_string()
    } else {
        format!("summed over the host's {cpus} CPUs")
    };
    let mut md = format!(
        "\nWhere the host's CPU went (median of the runs; {cpus}): the whole host busy, and \
         husk's part of it by thread; KVM's exits from its debugfs. Per MiB of the {mib} MiB \
         sent to the container, and per round trip of the {rounds}.\n\n\
         | where | to the container, per MiB | per round trip |\n|---|---|---|\n"
    );
    let cell = |phase: &str, row: &str, rt: &str, count: bool| {
        let value = profile.get(&format!("{phase}/{row}"))?.median(rt)?;
        Some(if count {
            format!("{value:.1}")
        } else if phase == "echo" {
            format!("{:.0} µs", value / 1e3)
        } else {
            format!("{:.2} ms", value / 1e6)
        })
    };
    let mut line = |who: &str, rt: &str, row: &str, what: &str| {
        let count = row.ends_with("exits");
        md.push_str(&format!(
            "| {who}{what} | {} | {} |\n",
            cell("to_container", row, rt, count).unwrap_or_else(|| "-".into()),
            cell("echo", row, rt, count).unwrap_or_else(|| "-".into()),
        ));
    };
    line("runc: ", "runc", "busy", Usage::ROWS[0].1);
    for (row, what) in Usage::ROWS {
        line("husk: ", "husk", row, what);
    }
    md
}
