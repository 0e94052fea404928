//! The boot timeline: microseconds since the VMM process started until each boot milestone,
//! logged at debug level and optionally written as JSON (`--boot-report`) for tests and
//! benchmarks.

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start; call first thing in `main`. Later calls keep the first value.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// Microseconds since [`mark_process_start`] (or since the first call to this function).
pub fn since_start_us() -> u64 {
    PROCESS_START
        .get_or_init(Instant::now)
        .elapsed()
        .as_micros()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Boot milestones, in microseconds since the process started.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootTimeline {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub mem_size_mib: u32,
    /// "Pvh" or "LinuxBoot".
    pub boot_protocol: String,
    /// The KVM VM exists (memory mapped and registered, irqchip created).
    pub vm_created_us: u64,
    /// Kernel, initramfs, command line and boot structures are in guest memory.
    pub kernel_loaded_us: u64,
    /// The boot vCPU is about to enter KVM_RUN for the first time.
    pub first_vcpu_entry_us: Option<u64>,
    /// The agent's handshake arrived.
    pub agent_handshake_us: Option<u64>,
    /// The guest's uptime reported in the handshake.
    pub guest_uptime_at_handshake_us: Option<u64>,
    /// The agent's version from the handshake.
    pub agent_version: Option<String>,
    /// Host virtual address ranges `[start, end)` of the guest memory, so a reader of
    /// `/proc/PID/smaps` can tell guest memory from the VMM's own (the ranges may be split into
    /// several mappings: pages mapped from the kernel and initramfs files, anonymous RAM).
    #[serde(default)]
    pub guest_memory_host_ranges: Vec<(u64, u64)>,
    /// How long entering the jail took (none when husk-vmm could not build one).
    #[serde(default)]
    pub jail_us: Option<u64>,
    /// How long the whole confinement took: the jail, the capability drop, the seccomp filter.
    #[serde(default)]
    pub confine_us: Option<u64>,
    /// How the jail kept the host's abstract sockets out of reach (`crate::jail::SocketScope`'s
    /// name; none without a jail).
    #[serde(default)]
    pub jail_sockets: Option<String>,
}

/// Errors of [`write_report`].
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// Serialization or file I/O failed.
    #[error("failed to write the boot report {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A timeline shared by the threads that record milestones.
#[derive(Debug, Default)]
pub struct TimelineRecorder {
    inner: Mutex<BootTimeline>,
}

impl TimelineRecorder {
    /// Starts from `initial`.
    pub fn new(initial: BootTimeline) -> Self {
        TimelineRecorder {
            inner: Mutex::new(initial),
        }
    }

    /// Applies `f` to the timeline.
    pub fn update(&self, f: impl FnOnce(&mut BootTimeline)) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }

    /// A copy of the current timeline.
    pub fn snapshot(&self) -> BootTimeline {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Writes `timeline` as JSON to `path` atomically (temporary file in the same directory, then
/// rename), so readers never see a partial report.
pub fn write_report(path: &Path, timeline: &BootTimeline) -> Result<(), TimelineError> {
    let err = |source| TimelineError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut json = serde_json::to_vec_pretty(timeline).map_err(|e| err(e.into()))?;
    json.push(b'\n');
    crate::atomic_file::write_atomic(path, &json).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_from_the_mark() {
        mark_process_start();
        let a = since_start_us();
        let b = since_start_us();
        assert!(b >= a);
    }

    #[test]
    fn report_round_trips_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("boot.json");
        let recorder = TimelineRecorder::new(BootTimeline {
            vcpus: 2,
            mem_size_mib: 128,
            boot_protocol: "Pvh".into(),
            vm_created_us: 10,
            kernel_loaded_us: 20,
            guest_memory_host_ranges: vec![(0x7f00_0000_0000, 0x7f00_0800_0000)],
            ..Default::default()
        });
        recorder.update(|t| {
            t.first_vcpu_entry_us = Some(30);
            t.agent_handshake_us = Some(40_000);
            t.guest_uptime_at_handshake_us = Some(35_000);
        });
        write_report(&path, &recorder.snapshot()).expect("write");
        let back: BootTimeline =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(back, recorder.snapshot());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("boot.json")]);
    }

    #[test]
    fn report_into_missing_directory_fails() {
        let err = write_report(
            Path::new("/nonexistent/dir/boot.json"),
            &BootTimeline::default(),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("/nonexistent/dir/boot.json"));
    }
}
