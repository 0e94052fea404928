//! Per-container cgroup v2: resources from the OCI spec, stats, freezing, killing.
//!
//! Every container gets `<root>/<id>`, where `<root>` is `/sys/fs/cgroup/husk` in the guest
//! (`HUSK_AGENT_CGROUP_ROOT` overrides it, for tests on a host). The agent enables every
//! available controller on the way down.

use husk_agent_protocol::ContainerStats;
use oci_spec::runtime::LinuxResources;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The default cgroup root of containers.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup/husk";

/// Environment variable overriding [`DEFAULT_ROOT`].
pub const ROOT_ENV: &str = "HUSK_AGENT_CGROUP_ROOT";

/// How long a freeze or thaw may take to settle.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read or written.
    #[error("{op} {} failed", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A resource the agent cannot apply.
    #[error("unsupported resource: {0}")]
    Unsupported(String),
    /// The container has no cgroup.
    #[error("the container has no cgroup (cgroup v2 unavailable at {0})")]
    NoCgroup(String),
    /// Freezing did not settle in time.
    #[error("cgroup.freeze did not settle within {FREEZE_TIMEOUT:?}")]
    FreezeTimeout,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup root of containers.
pub fn root() -> PathBuf {
    std::env::var_os(ROOT_ENV).map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from)
}

/// Enables every controller `parent` offers for its children; a controller that cannot be
/// enabled is left out (best effort, the resource write that needs it fails clearly later).
fn enable_controllers(parent: &Path) {
    let Ok(available) = fs::read_to_string(parent.join("cgroup.controllers")) else {
        return;
    };
    for controller in available.split_whitespace() {
        let _ = fs::write(
            parent.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );
    }
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `<root>/<id>` with the controllers enabled.
    pub fn create(root: &Path, id: &str) -> Result<Cgroup, CgroupError> {
        if let Some(parent) = root.parent() {
            enable_controllers(parent);
        }
        match fs::create_dir(root) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(io_err("creating", root)(err)),
        }
        enable_controllers(root);
        let path = root.join(id);
        fs::create_dir(&path).map_err(io_err("creating", &path))?;
        Ok(Cgroup { path })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        fs::write(&path, value).map_err(io_err("writing", &path))
    }

    fn read(&self, file: &str) -> Result<String, CgroupError> {
        let path = self.path.join(file);
        fs::read_to_string(&path).map_err(io_err("reading", &path))
    }

    /// Writes the resource files.
    ///
    /// A kernel without swap (the guest's: no `CONFIG_SWAP`) has no `memory.swap.max`; a swap
    /// limit is then met by construction and skipped.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in resource_files(resources)? {
            if file == "memory.swap.max" && !self.path.join(&file).exists() {
                continue;
            }
            self.write(&file, &value)?;
        }
        Ok(())
    }

    /// Pids of the processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .read("cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// `oom_kill` of `memory.events` (0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.events")
            .map(|text| keyed(&text, "oom_kill").unwrap_or(0))
            .unwrap_or(0)
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel reports it done.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = u64::from(frozen);
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            if keyed(&self.read("cgroup.events")?, "frozen") == Some(want) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::FreezeTimeout);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the cgroup is frozen.
    pub fn is_frozen(&self) -> bool {
        self.read("cgroup.events")
            .map(|t| keyed(&t, "frozen") == Some(1))
            .unwrap_or(false)
    }

    /// SIGKILLs every process (`cgroup.kill`, or each pid where that file is missing).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.write("cgroup.kill", "1").is_ok() {
            return Ok(());
        }
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    /// Removes the (empty) cgroup, retrying while its last processes are being reaped.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err)
                    if Instant::now() < deadline && err.raw_os_error() == Some(libc::EBUSY) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => return Err(io_err("removing", &self.path)(err)),
            }
        }
    }

    /// Resource usage.
    pub fn stats(&self) -> ContainerStats {
        let read = |file: &str| self.read(file).unwrap_or_default();
        parse_stats(
            &read("cpu.stat"),
            &read("memory.current"),
            &read("memory.max"),
            &read("memory.stat"),
            &read("pids.current"),
            &read("pids.max"),
            &read("memory.events"),
        )
    }
}

/// The value of `key` in a flat keyed file (`key value` lines).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key))
            .then(|| parts.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Builds [`ContainerStats`] from the contents of the cgroup files.
pub fn parse_stats(
    cpu_stat: &str,
    memory_current: &str,
    memory_max: &str,
    memory_stat: &str,
    pids_current: &str,
    pids_max: &str,
    memory_events: &str,
) -> ContainerStats {
    let current = single(memory_current).unwrap_or(0);
    let inactive = keyed(memory_stat, "inactive_file").unwrap_or(0);
    ContainerStats {
        cpu_usage_usec: keyed(cpu_stat, "usage_usec").unwrap_or(0),
        cpu_user_usec: keyed(cpu_stat, "user_usec").unwrap_or(0),
        cpu_system_usec: keyed(cpu_stat, "system_usec").unwrap_or(0),
        memory_current_bytes: current,
        memory_limit_bytes: single(memory_max),
        memory_working_set_bytes: current.saturating_sub(inactive),
        pids_current: single(pids_current).unwrap_or(0),
        pids_limit: single(pids_max),
        oom_kills: keyed(memory_events, "oom_kill").unwrap_or(0),
    }
}

fn limit(value: i64) -> String {
    if value < 0 {
        "max".to_string()
    } else {
        value.to_string()
    }
}

/// The cgroup v2 files and values for OCI resources, in write order.
///
/// Device rules are not files in cgroup v2: they become a device program at create
/// ([`super::devices`]); an update leaves them as created, as `runc update` does. Hugepage
/// limits are met by construction (the guest kernel has no huge pages; the host warns that
/// they are ignored, see `runtime-shim`'s `translate_spec`), as is `memory.swappiness` (no
/// swap). Block I/O, network and RDMA limits are refused.
pub fn resource_files(r: &LinuxResources) -> Result<Vec<(String, String)>, CgroupError> {
    let mut files = Vec::new();
    let mut push = |file: &str, value: String| files.push((file.to_string(), value));
    if let Some(mem) = r.memory() {
        if let Some(low) = mem.reservation() {
            push("memory.low", limit(low));
        }
        if let Some(max) = mem.limit() {
            push("memory.max", limit(max));
        }
        // OCI swap is memory+swap; v2 swap.max is swap alone.
        if let Some(swap) = mem.swap() {
            let value = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(CgroupError::Unsupported(format!(
                            "memory.swap {s} below memory.limit {l}"
                        )));
                    }
                    (s - l).to_string()
                }
                (_, _) => {
                    return Err(CgroupError::Unsupported(
                        "memory.swap without memory.limit".into(),
                    ))
                }
            };
            push("memory.swap.max", value);
        }
        if mem.kernel().is_some() || mem.kernel_tcp().is_some() {
            return Err(CgroupError::Unsupported("memory.kernel / kernelTCP".into()));
        }
        if mem.disable_oom_killer() == Some(true) {
            return Err(CgroupError::Unsupported("memory.disableOOMKiller".into()));
        }
    }
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            if shares > 0 {
                // runc's conversion of cgroup v1 shares [2, 262144] to weight [1, 10000].
                let shares = shares.clamp(2, 262_144);
                push(
                    "cpu.weight",
                    (1 + ((shares - 2) * 9999) / 262_142).to_string(),
                );
            }
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = cpu
                .quota()
                .filter(|q| *q > 0)
                .map_or("max".to_string(), |q| q.to_string());
            let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
            push("cpu.max", format!("{quota} {period}"));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|c| !c.is_empty()) {
            push("cpuset.cpus", cpus.clone());
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|m| !m.is_empty()) {
            push("cpuset.mems", mems.clone());
        }
        if let Some(idle) = cpu.idle() {
            push("cpu.idle", idle.to_string());
        }
        if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
            return Err(CgroupError::Unsupported("cpu.realtime*".into()));
        }
    }
    if let Some(pids) = r.pids() {
        push(
            "pids.max",
            if pids.limit() > 0 {
                pids.limit().to_string()
            } else {
                "max".into()
            },
        );
    }
    if r.block_io().is_some() {
        return Err(CgroupError::Unsupported("blockIO".into()));
    }
    if r.network().is_some() || r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(CgroupError::Unsupported("network / rdma".into()));
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (key, value) in keys {
            if key.contains('/') || key.starts_with('.') || key.starts_with("cgroup.") {
                return Err(CgroupError::Unsupported(format!("unified key {key:?}")));
            }
            push(key, value.clone());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resources(json: serde_json::Value) -> LinuxResources {
        serde_json::from_value(json).expect("valid resources")
    }

    #[test]
    fn resources_map_to_v2_files() {
        let files = resource_files(&resources(json!({
            "memory": {"limit": 104857600, "swap": 209715200, "reservation": 1000},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0", "idle": 1},
            "pids": {"limit": 64},
            "unified": {"memory.high": "90000000"}
        })))
        .expect("translates");
        let expect: Vec<(String, String)> = [
            ("memory.low", "1000"),
            ("memory.max", "104857600"),
            ("memory.swap.max", "104857600"),
            ("cpu.weight", "39"),
            ("cpu.max", "50000 100000"),
            ("cpuset.cpus", "0-1"),
            ("cpuset.mems", "0"),
            ("cpu.idle", "1"),
            ("pids.max", "64"),
            ("memory.high", "90000000"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(files, expect);
    }

    #[test]
    fn unlimited_values_become_max() {
        let files = resource_files(&resources(json!({
            "memory": {"limit": -1, "swap": -1},
            "cpu": {"quota": -1},
            "pids": {"limit": 0}
        })))
        .expect("translates");
        assert_eq!(
            files,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("memory.swap.max".to_string(), "max".to_string()),
                ("cpu.max".to_string(), "max 100000".to_string()),
                ("pids.max".to_string(), "max".to_string()),
            ]
        );
    }

    #[test]
    fn unsupported_resources_are_refused() {
        let err =
            resource_files(&resources(json!({"blockIO": {"weight": 10}}))).expect_err("blkio");
        assert!(err.to_string().contains("blockIO"), "{err}");
        let err = resource_files(&resources(json!({"unified": {"cgroup.procs": "1"}})))
            .expect_err("cgroup file");
        assert!(err.to_string().contains("cgroup.procs"), "{err}");
    }

    #[test]
    fn swap_limit_is_skipped_without_swap_accounting() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("memory.max"), "max\n").expect("file");
        let cgroup = Cgroup {
            path: dir.path().to_path_buf(),
        };
        cgroup
            .apply(&resources(json!({"memory": {"limit": 1000, "swap": 1000}})))
            .expect("applies");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).expect("read"),
            "1000"
        );
        assert!(!dir.path().join("memory.swap.max").exists());
    }

    #[test]
    fn stats_are_parsed_from_cgroup_files() {
        let stats = parse_stats(
            "usage_usec 100\nuser_usec 60\nsystem_usec 40\n",
            "5000\n",
            "max\n",
            "anon 10\ninactive_file 1000\nactive_file 5\n",
            "3\n",
            "64\n",
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
        );
        assert_eq!(
            stats,
            ContainerStats {
                cpu_usage_usec: 100,
                cpu_user_usec: 60,
                cpu_system_usec: 40,
                memory_current_bytes: 5000,
                memory_limit_bytes: None,
                memory_working_set_bytes: 4000,
                pids_current: 3,
                pids_limit: Some(64),
                oom_kills: 1,
            }
        );
    }
}
