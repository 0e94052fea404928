//! L2's console, read as it arrives: copied to our stdout, scanned for what L2's kernel reports
//! about itself (soft lockups, RCU stalls, oopses, panics, and whether their traces run through
//! L2's KVM), and watched for L2's heartbeat, whose absence means L2 is wedged.
//!
//! Kernel lines are told from the command's own output by their timestamp (`printk.time=1`:
//! `[   12.345678] text`), so a test that prints "BUG:" or a hang report quoting `dmesg` is
//! never taken for a fault of L2's (the hang report's lines reach the console through
//! `/dev/kmsg` with a `husk-rig: ` prefix, which the scan leaves out too).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the rig's init prints as the command's exit code.
pub const EXIT_MARKER: &str = "HUSK-RIG-EXIT=";
/// The kernel-log line L2's heartbeat writes (see [`crate::rig::HEARTBEAT`]).
pub const HEARTBEAT_TEXT: &str = "husk-rig: alive";
/// Lines the command writes through `/dev/kmsg` (hang reports, the heartbeat) carry this prefix.
const RIG_KMSG_PREFIX: &str = "husk-rig:";
/// How long L2 may go without a heartbeat before the host calls it wedged. The heartbeat comes
/// every 10 s; a busy host has been seen to delay L2's timers by a few seconds, never by 50.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(60);
/// How long the first heartbeat may take: L2's boot (3-10 s, 30 s on a loaded host) comes first.
const FIRST_HEARTBEAT_LIMIT: Duration = Duration::from_secs(150);
/// After a wedge, how long the host waits for L2's panic (from the NMI it injects) to print.
const NMI_PANIC_WAIT: Duration = Duration::from_secs(40);
/// How many lines after a fault's first line are searched for a trace through KVM.
const TRACE_WINDOW: usize = 120;

/// What L2's kernel reported about itself during a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2Faults {
    pub soft_lockups: usize,
    pub rcu_stalls: usize,
    pub oopses: usize,
    pub hung_tasks: usize,
    /// L2 panicked (on a fault above, or on the NMI the host sent a wedged L2).
    pub panicked: bool,
    /// L2 took the NMI the host sent it and ran on: on the microvm machine it reads the NMI as
    /// a PCI SERR, logs "Dazed and confused" and does not panic (see `rig::qemu_command`).
    pub nmi_survived: bool,
    /// A fault's trace runs through L2's KVM (`[kvm]` or `[kvm_amd]` frames): the emulated
    /// nested virtualization failed, not the command.
    pub in_kvm: bool,
    /// The first fault line, for messages.
    pub first: Option<String>,
}

impl L2Faults {
    /// Whether L2's kernel reported any fault.
    pub fn any(&self) -> bool {
        self.soft_lockups + self.rcu_stalls + self.oopses + self.hung_tasks > 0 || self.panicked
    }

    /// One line: counts and the first fault.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "soft lockups {}, RCU stalls {}, oopses {}, hung tasks {}{}{}",
            self.soft_lockups,
            self.rcu_stalls,
            self.oopses,
            self.hung_tasks,
            if self.panicked { ", panicked" } else { "" },
            if self.in_kvm {
                ", trace inside L2's KVM"
            } else {
                ""
            },
        );
        if let Some(first) = &self.first {
            s.push_str(&format!("; first: {first:?}"));
        }
        s
    }
}

/// Scans console lines one at a time.
#[derive(Default)]
pub struct ConsoleScan {
    pub faults: L2Faults,
    /// The exit code the rig's init printed.
    pub marker: Option<i32>,
    /// L2's uptime when the rig's init started the command.
    pub l2_up_s: Option<f64>,
    /// Lines starting with the collect prefix.
    pub collected: Vec<String>,
    collect_prefix: Option<String>,
    /// Lines left to search for a KVM frame after the last fault line.
    trace_window: usize,
}

/// What one console line told.
#[derive(Debug, PartialEq, Eq)]
pub enum LineKind {
    Heartbeat,
    Other,
}

impl ConsoleScan {
    pub fn new(collect_prefix: Option<String>) -> ConsoleScan {
        ConsoleScan {
            collect_prefix,
            ..ConsoleScan::default()
        }
    }

    pub fn line(&mut self, line: &str) -> LineKind {
        let line = line.trim_end();
        if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
            self.marker = code.trim().parse().ok();
        }
        if let Some(up) = line
            .strip_prefix("husk-rig: L2 up after ")
            .and_then(|r| r.strip_suffix(" s"))
        {
            self.l2_up_s = up.trim().parse().ok();
        }
        if let Some(prefix) = &self.collect_prefix {
            if line.starts_with(prefix.as_str()) {
                self.collected.push(line.to_string());
            }
        }
        let Some(text) = kernel_text(line) else {
            return LineKind::Other;
        };
        if text.starts_with(RIG_KMSG_PREFIX) {
            return if text.starts_with(HEARTBEAT_TEXT) {
                LineKind::Heartbeat
            } else {
                LineKind::Other
            };
        }
        if self.trace_window > 0 {
            self.trace_window -= 1;
            if text.contains("[kvm]") || text.contains("[kvm_amd]") {
                self.faults.in_kvm = true;
            }
        }
        let f = &mut self.faults;
        if text.contains("Dazed and confused") {
            f.nmi_survived = true;
        }
        let fault = if text.contains("soft lockup") {
            f.soft_lockups += 1;
            true
        } else if text.contains("rcu: INFO:") && text.contains("stall") {
            f.rcu_stalls += 1;
            true
        } else if text.contains("blocked for more than") && text.starts_with("INFO: task") {
            f.hung_tasks += 1;
            true
        } else if text.starts_with("Oops:")
            || text.starts_with("BUG: ")
            || text.starts_with("general protection fault")
        {
            f.oopses += 1;
            true
        } else if text.starts_with("Kernel panic") {
            f.panicked = true;
            true
        } else {
            false
        };
        if fault {
            if f.first.is_none() {
                f.first = Some(text.to_string());
            }
            self.trace_window = TRACE_WINDOW;
        }
        LineKind::Other
    }
}

/// The text of a kernel console line (`[   12.345678] text`), or `None` for any other line.
///
/// The kernel's line need not start the console's line: L2's kernel prints whole lines under
/// its console lock, but between the command's own writes, so a kernel line often follows a
/// partial line of the command's (a test harness's `test NAME ... `, printed before a test
/// that runs for tens of seconds). The first timestamp in the line starts the kernel's text.
/// (Read only from the line's start, every heartbeat printed during a long test was missed,
/// and six in a row made a healthy L2 look wedged.)
fn kernel_text(line: &str) -> Option<&str> {
    line.match_indices('[')
        .find_map(|(at, _)| kernel_text_at(&line[at..]))
}

/// [`kernel_text`] of a line that starts with the timestamp's `[`.
fn kernel_text_at(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let stamp = stamp.trim_start();
    let (secs, frac) = stamp.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(secs) && digits(frac)).then(|| text.strip_prefix(' ').unwrap_or(text))
}

/// How a rig run's console ended.
pub struct ConsoleEnd {
    pub scan: ConsoleScan,
    /// QEMU was killed at the run's timeout.
    pub timed_out: bool,
    /// L2's heartbeat stopped for [`HEARTBEAT_LIMIT`] (the host then sent it an NMI, so that
    /// its panic shows where its CPUs were).
    pub wedged: bool,
    /// L2 was wedged and did not even take the NMI the host sent it (neither panicked nor
    /// logged it): its CPUs are stuck where no code of L2's (nor of anything L2 runs) can keep
    /// an NMI out, in the emulator or in L2's KVM.
    pub nmi_unanswered: bool,
    /// L2 was wedged in a state that proves the emulator lost an interrupt (see
    /// [`lost_wakeup`]).
    pub lost_wakeup: bool,
    /// QEMU's own exit status was a failure.
    pub qemu_failed: bool,
}

/// Runs QEMU, copying its console to our stdout as it arrives (partial lines too: a test
/// binary prints `test NAME ... ` before the test runs), scanning it, and killing QEMU at
/// `timeout` or when L2's heartbeat stops. `qmp` is QEMU's QMP socket, through which a wedged
/// L2 is sent an NMI first (it panics, and the panic prints its CPUs' stacks).
pub fn stream_console(
    qemu: &mut Command,
    timeout: Duration,
    qmp: Option<PathBuf>,
    collect_prefix: Option<String>,
) -> Result<ConsoleEnd> {
    let mut child = qemu
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning qemu-system-x86_64")?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let wedged = Arc::new(AtomicBool::new(false));
    let lost_wakeup = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // Milliseconds after `started` of the last heartbeat (0: none yet).
    let last_heartbeat = Arc::new(AtomicU64::new(0));
    let watchdog = {
        let done = done.clone();
        let timed_out = timed_out.clone();
        let wedged = wedged.clone();
        let lost_wakeup = lost_wakeup.clone();
        let last_heartbeat = last_heartbeat.clone();
        std::thread::spawn(move || {
            let deadline = started + timeout;
            let mut nmi_sent: Option<Instant> = None;
            loop {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    timed_out.store(true, Ordering::Relaxed);
                    break;
                }
                if let Some(sent) = nmi_sent {
                    if now - sent > NMI_PANIC_WAIT {
                        break;
                    }
                } else {
                    let last = last_heartbeat.load(Ordering::Relaxed);
                    let since = now - started;
                    let silent = if last == 0 {
                        since > FIRST_HEARTBEAT_LIMIT
                    } else {
                        since.saturating_sub(Duration::from_millis(last)) > HEARTBEAT_LIMIT
                    };
                    if silent {
                        wedged.store(true, Ordering::Relaxed);
                        eprintln!(
                            "\nxtask: !!! L2's heartbeat stopped ({} s without one): L2 is wedged; \
                             sending it an NMI so that its panic shows where its CPUs are !!!",
                            if last == 0 {
                                since.as_secs()
                            } else {
                                since.as_secs() - last / 1000
                            }
                        );
                        match qmp.as_deref().map(inject_nmi) {
                            Some(Ok(lost)) => {
                                lost_wakeup.store(lost, Ordering::Relaxed);
                                nmi_sent = Some(now);
                            }
                            Some(Err(e)) => {
                                eprintln!("xtask: could not send the NMI: {e:#}");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (the
            // main thread reaps it only after this thread is joined or the pipe closes).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        })
    };
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let mut scan = ConsoleScan::new(collect_prefix);
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the rig's console"),
        };
        let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
        out.write_all(&chunk)?;
        out.flush()?;
        for &b in &chunk {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            if scan.line(&String::from_utf8_lossy(&line)) == LineKind::Heartbeat {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                last_heartbeat.store(ms.max(1), Ordering::Relaxed);
            }
            line.clear();
        }
    }
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let wedged = wedged.load(Ordering::Relaxed);
    Ok(ConsoleEnd {
        nmi_unanswered: wedged && !scan.faults.panicked && !scan.faults.nmi_survived,
        lost_wakeup: wedged && lost_wakeup.load(Ordering::Relaxed),
        scan,
        timed_out: timed_out.load(Ordering::Relaxed),
        wedged,
        qemu_failed: !status.success(),
    })
}

/// Asks a wedged L2's QEMU, through its QMP socket, where L2's CPUs are (`info registers -a`,
/// of which each CPU's instruction pointer, flags and halt state are printed) and what their
/// local APICs hold, then sends every CPU an NMI. L2 runs with `unknown_nmi_panic`, so a
/// kernel that takes an unknown NMI panics and prints every CPU's backtrace
/// (`panic_print=0x40`); on the microvm machine L2 reads this one as a PCI SERR, logs it and
/// runs on (see `rig::qemu_command`). Returns whether the state read proves a lost wakeup
/// ([`lost_wakeup`]).
fn inject_nmi(qmp: &Path) -> Result<bool> {
    let mut session = Qmp::connect(qmp)?;
    session.execute(r#"{"execute":"qmp_capabilities"}"#)?;
    let registers = match session.execute(
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"info registers -a"}}"#,
    ) {
        Ok(reply) => {
            eprintln!("xtask: L2's CPUs: {}", cpu_summary(&reply));
            reply
        }
        Err(e) => {
            eprintln!("xtask: could not read L2's registers: {e:#}");
            String::new()
        }
    };
    match session.execute(r#"{"execute":"query-status"}"#) {
        Ok(reply) => eprintln!("xtask: L2's run state: {reply}"),
        Err(e) => eprintln!("xtask: could not read L2's run state: {e:#}"),
    }
    // Which interrupts each local APIC holds (requested, in service, the priorities) and what
    // its timer does.
    let cpus = registers.matches("CPU#").count();
    let mut apics = Vec::new();
    for cpu in 0..cpus {
        let cmd = format!(
            r#"{{"execute":"human-monitor-command","arguments":{{"command-line":"info lapic {cpu}"}}}}"#
        );
        match session.execute(&cmd) {
            Ok(reply) => {
                for line in reply.lines().filter(|l| !l.trim().is_empty()) {
                    eprintln!("xtask: L2's APIC: {}", line.trim_end());
                }
                apics.push(reply);
            }
            Err(e) => eprintln!("xtask: could not read L2's APIC {cpu}: {e:#}"),
        }
    }
    let lost = cpus > 0 && apics.len() == cpus && lost_wakeup(&registers, &apics);
    if lost {
        eprintln!(
            "xtask: every L2 CPU is halted with interrupts enabled and a periodic APIC timer \
             it takes: an interrupt was due within milliseconds, and the emulator never \
             delivered it"
        );
    }
    session.execute(r#"{"execute":"inject-nmi"}"#)?;
    Ok(lost)
}

/// Whether L2's CPUs, as `info registers -a` and each one's `info lapic` show them, are in a
/// state no code of L2's can leave them in for a minute: every CPU halted (`HLT=1`) with
/// interrupts enabled (`IF` in `RFL`) outside an interrupt shadow (`II=0`), its APIC's timer
/// unmasked, periodic, and of a priority above the APIC's (`PPR`). A periodic timer needs no
/// re-arming by software, so such a CPU takes an interrupt within one period on any correct
/// x86; a heartbeat gone for a minute then is the emulator losing the wakeup. (With the
/// one-shot timer a tickless kernel uses, an unarmed timer would be L2's own doing; the rig's
/// L2 runs a periodic tick for that reason.)
fn lost_wakeup(registers: &str, apics: &[String]) -> bool {
    let mut cpus = 0;
    let mut current: Option<(bool, bool, bool)> = None; // (halted, interruptible, shadow)
    let mut complete = |cpu: Option<(bool, bool, bool)>| match cpu {
        Some((true, true, false)) => {
            cpus += 1;
            true
        }
        Some(_) => false,
        None => true,
    };
    for line in registers.lines() {
        if line.starts_with("CPU#") {
            if !complete(current.take()) {
                return false;
            }
            current = Some((false, false, true));
        }
        let Some(cpu) = current.as_mut() else {
            continue;
        };
        for word in line.split_whitespace() {
            if let Some(flags) = word.strip_prefix("RFL=") {
                cpu.1 = u64::from_str_radix(flags, 16).is_ok_and(|f| f & 0x200 != 0);
            } else if let Some(ii) = word.strip_prefix("II=") {
                cpu.2 = ii != "0";
            } else if let Some(hlt) = word.strip_prefix("HLT=") {
                cpu.0 = hlt == "1";
            }
        }
    }
    complete(current) && cpus > 0 && cpus == apics.len() && apics.iter().all(|a| timer_taken(a))
}

/// Whether an `info lapic` dump shows a periodic, unmasked timer whose vector the APIC's
/// processor priority lets through.
fn timer_taken(apic: &str) -> bool {
    let hex = |w: &str| u32::from_str_radix(w.trim_start_matches("0x"), 16).ok();
    let Some(lvtt) = apic.lines().find(|l| l.starts_with("LVTT")) else {
        return false;
    };
    let Some(vector) = lvtt
        .split("(vec ")
        .nth(1)
        .and_then(|v| v.trim_end_matches(')').trim().parse::<u32>().ok())
    else {
        return false;
    };
    let ppr = apic.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "PPR")
            .and_then(|w| hex(w[1]))
    });
    let Some(ppr) = ppr else {
        return false;
    };
    lvtt.contains("periodic") && !lvtt.contains("masked") && (vector & 0xf0) > (ppr & 0xf0)
}

/// A QMP session: one JSON command a line, one reply a line (events in between are skipped).
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        use std::io::BufRead;
        let stream = std::os::unix::net::UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = std::io::BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        Ok(Qmp {
            reader,
            writer: stream,
        })
    }

    /// Sends `cmd` and returns the reply's `return` value as JSON text.
    fn execute(&mut self, cmd: &str) -> Result<String> {
        use std::io::BufRead;
        self.writer.write_all(cmd.as_bytes())?;
        self.writer.write_all(b"\n")?;
        for _ in 0..100 {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QMP closed the connection");
            }
            let reply: serde_json::Value = serde_json::from_str(&line).context("QMP reply")?;
            if let Some(ret) = reply.get("return") {
                return Ok(match ret {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                });
            }
            if let Some(err) = reply.get("error") {
                bail!("QMP {cmd}: {err}");
            }
        }
        bail!("QMP {cmd}: no reply")
    }
}

/// `CPU#0 RIP=ffffffff81000000 HLT=1; CPU#1 ...` from `info registers -a`.
fn cpu_summary(registers: &str) -> String {
    let mut cpus = Vec::new();
    let mut current = String::new();
    for line in registers.lines() {
        if let Some(n) = line.strip_prefix("CPU#") {
            if !current.is_empty() {
                cpus.push(std::mem::take(&mut current));
            }
            current = format!("CPU#{}", n.trim());
        }
        for word in line.split_whitespace() {
            if ["RIP=", "RFL=", "HLT=", "CPL=", "II="]
                .iter()
                .any(|p| word.starts_with(p))
            {
                current.push(' ');
                current.push_str(word);
            }
        }
    }
    if !current.is_empty() {
        cpus.push(current);
    }
    cpus.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(lines: &[&str]) -> ConsoleScan {
        let mut s = ConsoleScan::new(Some("soak: ".into()));
        for l in lines {
            s.line(l);
        }
        s
    }

    #[test]
    fn cpu_summary_keeps_each_cpus_place() {
        let regs = "CPU#0\nRAX=0 RBX=1\nRIP=ffffffff81a0 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
                    CPU#1\nRIP=00007f12 RFL=0 [---] CPL=3 II=0 A20=1 SMM=0 HLT=0\n";
        assert_eq!(
            cpu_summary(regs),
            "CPU#0 RIP=ffffffff81a0 RFL=00000246 CPL=0 II=0 HLT=1; \
             CPU#1 RIP=00007f12 RFL=0 CPL=3 II=0 HLT=0"
        );
    }

    /// What QEMU 10 printed for a wedged L2 (trimmed).
    const WEDGED_APIC: &str = "dumping local APIC state for CPU 0 \n\
        LVT0\t 0x00000700 active-hi edge                              ExtINT (vec 0)\n\
        LVTT\t 0x000200ec active-hi edge                 periodic     Fixed  (vec 236)\n\
        Timer\t DCR=0x3 (divide by 16) initial_count = 249997 current_count = 36096\n\
        ISR\t (none)\nIRR\t (none)\n\
        APR 0x00 TPR 0x10 DFR 0x0f LDR 0x00 PPR 0x10\n";
    const IDLE_CPU: &str =
        "CPU#0\nRIP=ffffffff81c83e2f RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\n";

    #[test]
    fn a_halted_interruptible_cpu_with_a_periodic_timer_due_is_a_lost_wakeup() {
        assert!(lost_wakeup(IDLE_CPU, &[WEDGED_APIC.to_string()]));
    }

    #[test]
    fn a_wedge_that_l2_could_cause_is_not_called_a_lost_wakeup() {
        let apic = || vec![WEDGED_APIC.to_string()];
        // Interrupts disabled, running, in an interrupt shadow.
        for regs in [
            IDLE_CPU.replace("RFL=00000202", "RFL=00000002"),
            IDLE_CPU.replace("HLT=1", "HLT=0"),
            IDLE_CPU.replace("II=0", "II=1"),
        ] {
            assert!(!lost_wakeup(&regs, &apic()), "{regs}");
        }
        // A one-shot or masked timer, a priority that holds the timer's vector back.
        for dump in [
            WEDGED_APIC.replace("periodic", "one-shot"),
            WEDGED_APIC.replace(
                "0x000200ec active-hi edge ",
                "0x000300ec active-hi edge  masked",
            ),
            WEDGED_APIC.replace("PPR 0x10", "PPR 0xf0"),
        ] {
            assert!(
                !lost_wakeup(IDLE_CPU, std::slice::from_ref(&dump)),
                "{dump}"
            );
        }
        // A second CPU that runs, or whose APIC could not be read.
        let two = format!(
            "{IDLE_CPU}{}",
            IDLE_CPU.replace("CPU#0", "CPU#1").replace("HLT=1", "HLT=0")
        );
        assert!(!lost_wakeup(
            &two,
            &[WEDGED_APIC.into(), WEDGED_APIC.into()]
        ));
        let both = format!("{IDLE_CPU}{}", IDLE_CPU.replace("CPU#0", "CPU#1"));
        assert!(lost_wakeup(
            &both,
            &[WEDGED_APIC.into(), WEDGED_APIC.into()]
        ));
        assert!(!lost_wakeup(&both, &apic()));
        assert!(!lost_wakeup("", &[]));
    }

    #[test]
    fn kernel_lines_are_told_by_their_timestamp() {
        assert_eq!(kernel_text("[   12.345678] hello"), Some("hello"));
        assert_eq!(kernel_text("[12.3] x"), Some("x"));
        assert_eq!(kernel_text("[ ok ] hello"), None);
        assert_eq!(kernel_text("test foo ... ok"), None);
        assert_eq!(kernel_text("[12] no fraction"), None);
        assert_eq!(kernel_text("[ 12.5 ] inner space"), None);
    }

    #[test]
    fn a_kernel_line_after_a_partial_line_of_the_commands_is_read() {
        // As the console showed it during the containerd suite: each test's name printed, the
        // heartbeat while the test ran, `ok` on the next line.
        assert_eq!(
            kernel_text(
                "test faults_end_tasks_and_leave_nothing ... [  356.377215] husk-rig: alive 356.34"
            ),
            Some("husk-rig: alive 356.34")
        );
        assert_eq!(
            kernel_text("a [bracket] then [   70.3] Oops: 0000 [#1]"),
            Some("Oops: 0000 [#1]")
        );
        let mut s = ConsoleScan::new(None);
        assert_eq!(
            s.line("test ignored_resources_are_warned_by_the_shim ... [  366.460223] husk-rig: alive 366.42"),
            LineKind::Heartbeat
        );
        s.line("test long ... [  100.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 63s!");
        assert_eq!(s.faults.soft_lockups, 1);
        // A hang report's quoted kernel line is still the report's, wherever it starts.
        s.line("test x ... [   80.0] husk-rig: [   70.3] Oops: 0000 [#1] quoted");
        assert_eq!(s.faults.oopses, 0);
    }

    #[test]
    fn a_soft_lockup_with_a_kvm_trace_is_counted_and_placed_in_kvm() {
        let s = scan(&[
            "[  100.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 63s! [husk-vcpu:812]",
            "[  100.000001] Call Trace:",
            "[  100.000002]  __apic_accept_irq+0x1a/0x2c0 [kvm]",
            "[  100.000003] Kernel panic - not syncing: softlockup: hung tasks",
        ]);
        assert_eq!(s.faults.soft_lockups, 1);
        assert_eq!(
            s.faults.oopses, 0,
            "the soft lockup's BUG: is not an oops too"
        );
        assert!(s.faults.panicked);
        assert!(s.faults.in_kvm);
        assert!(s
            .faults
            .first
            .as_deref()
            .is_some_and(|f| f.contains("soft lockup")));
    }

    #[test]
    fn rcu_stalls_oopses_and_hung_tasks_are_counted_apart() {
        let s = scan(&[
            "[   63.1] rcu: INFO: rcu_preempt self-detected stall on CPU",
            "[   70.2] BUG: unable to handle page fault for address: 0000000000001234",
            "[   70.3] Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "[  130.0] INFO: task husk:99 blocked for more than 120 seconds.",
        ]);
        assert_eq!(s.faults.rcu_stalls, 1);
        assert_eq!(s.faults.oopses, 2);
        assert_eq!(s.faults.hung_tasks, 1);
        assert!(!s.faults.in_kvm, "no KVM frame in any trace");
        assert!(!s.faults.panicked);
    }

    #[test]
    fn the_commands_own_output_and_quoted_reports_are_not_faults() {
        let s = scan(&[
            "test prints_bug ... BUG: soft lockup (a test's own words)",
            "Oops: not the kernel",
            "[   80.0] husk-rig: [   70.3] Oops: 0000 [#1] quoted by a hang report",
            "[   90.0] husk-rig: alive 90.0",
        ]);
        assert!(!s.faults.any(), "{:?}", s.faults);
    }

    #[test]
    fn the_heartbeat_exit_marker_and_collected_lines_are_read() {
        let mut s = ConsoleScan::new(Some("soak: ".into()));
        assert_eq!(
            s.line("[   12.5] husk-rig: alive 12.5"),
            LineKind::Heartbeat
        );
        assert_eq!(s.line("husk-rig: L2 up after 4.25 s"), LineKind::Other);
        s.line("soak: boot 0 1vcpu ok 1.20 s");
        s.line("HUSK-RIG-EXIT=3");
        assert_eq!(s.marker, Some(3));
        assert_eq!(s.l2_up_s, Some(4.25));
        assert_eq!(s.collected, vec!["soak: boot 0 1vcpu ok 1.20 s"]);
    }
}
