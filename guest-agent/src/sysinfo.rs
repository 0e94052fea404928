//! What the agent reports about the guest in the handshake.

use husk_agent_protocol::{Handshake, PROTOCOL_VERSION};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{sysconf, SysconfVar};

/// The agent's version, reported in the handshake.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds the handshake reply from the live system. A value that cannot be read is reported as
/// 0 (and logged) rather than failing the handshake: the host needs the handshake to boot.
pub fn do_handshake() -> Handshake {
    Handshake {
        protocol_version: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.to_owned(),
        uptime_us: uptime_us(),
        cpus: online_cpus(),
        mem_total_kib: read_proc("/proc/meminfo")
            .and_then(|text| parse_mem_total_kib(&text))
            .unwrap_or(0),
        mem_phys_kib: read_proc("/proc/iomem")
            .map(|text| parse_system_ram_kib(&text))
            .unwrap_or(0),
    }
}

/// Time since boot, suspend included (`CLOCK_BOOTTIME`), in microseconds.
pub fn uptime_us() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
        }
        Err(errno) => {
            crate::log_error!("clock_gettime(CLOCK_BOOTTIME) failed: {errno}");
            0
        }
    }
}

/// Online CPUs (`sysconf(_SC_NPROCESSORS_ONLN)`).
pub fn online_cpus() -> u32 {
    match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) => u32::try_from(n).unwrap_or(0),
        Ok(None) => 0,
        Err(errno) => {
            crate::log_error!("sysconf(_SC_NPROCESSORS_ONLN) failed: {errno}");
            0
        }
    }
}

fn read_proc(path: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) => {
            crate::log_error!("reading {path} failed: {err}");
            None
        }
    }
}

/// `MemTotal` of `/proc/meminfo`, in KiB.
pub fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// Sum of the top-level "System RAM" ranges of `/proc/iomem`, in KiB. Nested (indented) lines
/// are parts of a top-level range and are not counted again.
pub fn parse_system_ram_kib(iomem: &str) -> u64 {
    let bytes: u64 = iomem
        .lines()
        .filter(|line| !line.starts_with(' '))
        .filter_map(|line| {
            let (range, name) = line.split_once(" : ")?;
            if name.trim_end() != "System RAM" {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            if start == 0 && end == 0 {
                // Addresses hidden from a reader without CAP_SYS_ADMIN.
                return None;
            }
            end.checked_sub(start)?.checked_add(1)
        })
        .fold(0u64, u64::saturating_add);
    bytes / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let meminfo =
            "MemFree:          1000 kB\nMemTotal:         123456 kB\nMemAvailable: 1 kB\n";
        assert_eq!(parse_mem_total_kib(meminfo), Some(123_456));
        assert_eq!(parse_mem_total_kib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total_kib("MemTotal: x kB\n"), None);
    }

    #[test]
    fn system_ram_sums_top_level_ranges_only() {
        let iomem = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : Reserved
00100000-07ffffff : System RAM
  01000000-01e0357f : Kernel code
  01e03580-0220c37f : System RAM
d0000000-d0000fff : virtio-mmio.0
";
        // 0x9ec00 + 0x7f00000 bytes = 635 KiB + 130048 KiB.
        assert_eq!(parse_system_ram_kib(iomem), 635 + 130_048);
    }

    #[test]
    fn iomem_without_addresses_counts_nothing() {
        // What a non-root reader sees: zeroed addresses.
        let iomem = "00000000-00000000 : System RAM\n";
        assert_eq!(parse_system_ram_kib(iomem), 0);
        assert_eq!(parse_system_ram_kib("garbage\nzz-1 : System RAM\n"), 0);
    }

    #[test]
    fn handshake_reports_this_agent_and_a_live_system() {
        let hs = do_handshake();
        assert_eq!(hs.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hs.agent_version, AGENT_VERSION);
        assert!(hs.cpus >= 1);
        assert!(hs.uptime_us > 0);
        assert!(hs.mem_total_kib > 0);
    }
}
