//! Where the host's CPU went while a figure was measured, and KVM's exits: the profile behind
//! a figure. The rig has one CPU, so a figure's time is the sum of everyone's CPU time, and the
//! split says which part is husk's: its vCPU threads in the guest and in the host's kernel
//! (handling exits), its device thread, and everything else (the driving process, the host's
//! own network stack).
//!
//! Read from `/proc` (each thread's time on the CPU, `schedstat`; a vCPU thread's time in the
//! guest, `stat`'s `guest_time`; the host's busy time, `/proc/stat`) and from KVM's debugfs
//! totals (`exits`, `mmio_exits`: those that went on to husk-vmm), over every VM on the host,
//! so a phase is measured with one sandbox running. debugfs is mounted if it is not.

use std::path::Path;

/// husk-vmm's thread names (`vmm/src/vmm.rs`).
const VCPU_THREAD: &str = "husk-vcpu-";
const DEVICE_THREAD: &str = "husk-devices";

/// Counters at one instant; [`Usage::since`] makes the difference.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// The host's busy CPU time (all but idle and I/O wait), ns.
    pub busy_ns: f64,
    /// husk-vmm's vCPU threads: on the CPU, and of that in the guest, ns.
    pub vcpu_ns: f64,
    pub guest_ns: f64,
    /// husk-vmm's device threads on the CPU, ns.
    pub devices_ns: f64,
    /// KVM's exits, and those that went on to user space (husk-vmm); `None` without debugfs.
    pub exits: Option<(f64, f64)>,
}

impl Usage {
    /// The counters now.
    pub fn now() -> Usage {
        let tick_ns = clock_tick_ns();
        let mut usage = Usage {
            busy_ns: busy_ticks() * tick_ns,
            exits: kvm_exits(),
            ..Usage::default()
        };
        for task in tasks() {
            let comm = read(&task.join("comm"));
            let comm = comm.trim();
            let on_cpu = read(&task.join("schedstat"))
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if comm.starts_with(VCPU_THREAD) {
                usage.vcpu_ns += on_cpu;
                usage.guest_ns += guest_ticks(&read(&task.join("stat"))) * tick_ns;
            } else if comm == DEVICE_THREAD {
                usage.devices_ns += on_cpu;
            }
        }
        usage
    }

    /// What was used from `earlier` to `self`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            busy_ns: self.busy_ns - earlier.busy_ns,
            vcpu_ns: self.vcpu_ns - earlier.vcpu_ns,
            guest_ns: self.guest_ns - earlier.guest_ns,
            devices_ns: self.devices_ns - earlier.devices_ns,
            exits: match (self.exits, earlier.exits) {
                (Some((a, b)), Some((c, d))) => Some((a - c, b - d)),
                _ => None,
            },
        }
    }

    /// Every counter divided by `n` (per MiB, per round trip).
    pub fn per(&self, n: f64) -> Usage {
        Usage {
            busy_ns: self.busy_ns / n,
            vcpu_ns: self.vcpu_ns / n,
            guest_ns: self.guest_ns / n,
            devices_ns: self.devices_ns / n,
            exits: self.exits.map(|(a, b)| (a / n, b / n)),
        }
    }

    /// The rows of a profile table: (key, what it is), in the order the table shows them.
    pub const ROWS: [(&'static str, &'static str); 7] = [
        ("busy", "the host's CPU, busy"),
        ("guest", "husk's vCPU in the guest"),
        ("exits_cpu", "husk's vCPU in the host's kernel (VM exits)"),
        ("devices", "husk-vmm's device thread (virtio, TAP)"),
        ("rest", "everything else (the sender, the host's stack)"),
        ("exits", "KVM exits"),
        ("user_exits", "of them, on to husk-vmm"),
    ];

    /// The value of a row (ns, or a count), if measured.
    pub fn row(&self, key: &str) -> Option<f64> {
        Some(match key {
            "busy" => self.busy_ns,
            "guest" => self.guest_ns,
            "exits_cpu" => (self.vcpu_ns - self.guest_ns).max(0.0),
            "devices" => self.devices_ns,
            "rest" => (self.busy_ns - self.vcpu_ns - self.devices_ns).max(0.0),
            "exits" => self.exits?.0,
            "user_exits" => self.exits?.1,
            _ => return None,
        })
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn clock_tick_ns() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e9 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Busy ticks of all CPUs: user (which includes guest time), nice, system, irq, softirq, steal.
fn busy_ticks() -> f64 {
    let stat = read(Path::new("/proc/stat"));
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum()
}

/// A thread's `guest_time` (field 43 of `stat`, counted after the parenthesized name).
fn guest_ticks(stat: &str) -> f64 {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(43 - 3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Every thread of every process.
fn tasks() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for process in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = process.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for task in std::fs::read_dir(process.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(task.path());
        }
    }
    out
}

/// KVM's exits and exits to user space, summed over its VMs.
fn kvm_exits() -> Option<(f64, f64)> {
    let dir = Path::new("/sys/kernel/debug/kvm");
    if !dir.exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"])
            .output();
    }
    let counter = |name: &str| read(&dir.join(name)).trim().parse::<f64>().ok();
    let to_user = counter("mmio_exits")? + counter("io_exits").unwrap_or(0.0);
    Some((counter("exits")?, to_user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_time_is_read_after_a_name_with_spaces_and_parentheses() {
        // Fields 1-2, then 3 (state) .. 42, then 43 guest_time = 77.
        let mut stat = String::from("123 (husk-vcpu-0 (x) y) S");
        for field in 4..=42 {
            stat.push_str(&format!(" {field}"));
        }
        stat.push_str(" 77 0 0");
        assert_eq!(guest_ticks(&stat), 77.0);
    }

    #[test]
    fn rows_are_the_split_of_the_busy_time() {
        let u = Usage {
            busy_ns: 100.0,
            vcpu_ns: 50.0,
            guest_ns: 30.0,
            devices_ns: 20.0,
            exits: None,
        };
        assert_eq!(u.row("exits_cpu"), Some(20.0));
        assert_eq!(u.row("rest"), Some(30.0));
        assert_eq!(u.row("exits"), None);
        let sum: f64 = ["guest", "exits_cpu", "devices", "rest"]
            .iter()
            .filter_map(|k| u.row(k))
            .sum();
        assert_eq!(sum, u.busy_ns);
    }
}
