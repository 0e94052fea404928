//! The persisted state of one container (`state.json`), its status guards, and the OCI `state`
//! document derived from it.
//!
//! The status is what the last command recorded (`created`, `running`, `paused`), corrected on
//! every load: a container whose `husk-vmm` is gone, or whose init has exited (the supervisor
//! wrote `exit.json`), is `stopped` - so `state` never needs the VM alive.

use crate::container::{process_alive, StateDir};
use husk_agent_protocol::ExitStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The OCI runtime spec version of the `state` documents we print.
pub const OCI_VERSION: &str = "1.0.2";

/// Errors of loading and saving the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `state.json` is missing: the container does not exist (or `create` did not finish).
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(String, #[source] io::Error),
    /// `state.json` is not valid.
    #[error("corrupt state file {0}")]
    Corrupt(PathBuf, #[source] serde_json::Error),
}

/// OCI container status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What husk persists about a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub status: Status,
    /// The `husk-vmm` process (the pid the engine sees).
    pub pid: i32,
    /// Its start time (`/proc/<pid>/stat` field 22), to tell it from a reused pid.
    pub pid_start_time: u64,
    /// The bundle on the host (absolute).
    pub bundle: PathBuf,
    /// The rootfs on the host (absolute).
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Mount points husk made for this container (unmounted by `delete`), in mount order.
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    /// The init's exit status once known.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// The microVM's vCPUs (0 in a state written before they were recorded).
    #[serde(default)]
    pub vcpus: u8,
    /// The OCI hooks of `config.json`, for `start` and `delete` (see [`crate::hooks`]).
    #[serde(default, skip_serializing_if = "crate::hooks::Hooks::is_empty")]
    pub hooks: crate::hooks::Hooks,
}

impl ContainerState {
    /// `start` is allowed only on a created container.
    pub fn can_start(&self) -> bool {
        self.status == Status::Created
    }

    /// Signals reach created, running and paused containers.
    pub fn can_kill(&self) -> bool {
        matches!(
            self.status,
            Status::Created | Status::Running | Status::Paused
        )
    }

    /// `delete` without `--force` takes stopped and created (never started) containers.
    pub fn can_delete(&self) -> bool {
        matches!(self.status, Status::Stopped | Status::Created)
    }

    /// `exec`, `ps`, `pause`, `update`, `events` need a running container.
    pub fn can_exec(&self) -> bool {
        self.status == Status::Running
    }

    pub fn can_pause(&self) -> bool {
        self.status == Status::Running
    }

    pub fn can_resume(&self) -> bool {
        self.status == Status::Paused
    }

    /// Corrects the recorded status with what is true now: the init exited (`exit_file`
    /// exists) or the VMM is gone means `stopped`.
    pub fn refresh(&mut self, exit_file: &Path) {
        if self.status == Status::Stopped {
            return;
        }
        if let Ok(text) = std::fs::read_to_string(exit_file) {
            if let Ok(exit) = serde_json::from_str::<ExitStatus>(&text) {
                self.exit = Some(exit);
            }
            self.status = Status::Stopped;
            return;
        }
        if !process_alive(self.pid, self.pid_start_time) {
            self.status = Status::Stopped;
        }
    }

    /// The OCI `state` document (runc's shape: pid 0 once stopped).
    pub fn oci_state(&self) -> serde_json::Value {
        let pid = if self.status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": pid,
            "status": self.status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "annotations": self.annotations,
            "owner": "",
        })
    }

    /// Loads `state.json` of `dir` and refreshes the status.
    pub fn load(dir: &StateDir) -> Result<ContainerState, StateError> {
        let path = dir.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(dir.id.clone()))
            }
            Err(e) => return Err(StateError::Io(format!("cannot read {}", path.display()), e)),
        };
        let mut state: ContainerState =
            serde_json::from_str(&text).map_err(|e| StateError::Corrupt(path, e))?;
        state.refresh(&dir.exit_file());
        Ok(state)
    }

    /// Writes `state.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &StateDir) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| StateError::Io("cannot encode the state".into(), io::Error::other(e)))?;
        write_atomic(&dir.state_file(), &json)
    }
}

/// Writes `data` to `path` atomically: a temp file beside it, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let io_err = |what: &str, e: io::Error| StateError::Io(format!("{what} {}", path.display()), e);
    let mut file = std::fs::File::create(&tmp).map_err(|e| io_err("cannot write", e))?;
    file.write_all(data)
        .map_err(|e| io_err("cannot write", e))?;
    file.sync_all().map_err(|e| io_err("cannot sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err("cannot rename into", e)
    })
}

/// Now as RFC 3339 UTC with nanoseconds, as runc prints `created`.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

/// Formats seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: Status) -> ContainerState {
        ContainerState {
            id: "c1".into(),
            status,
            pid: 1,
            pid_start_time: 0,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00.000000000Z".into(),
            annotations: BTreeMap::new(),
            mounts: vec![],
            exit: None,
            vcpus: 1,
            hooks: Default::default(),
        }
    }

    #[test]
    fn guards_follow_the_oci_lifecycle() {
        let created = state(Status::Created);
        assert!(created.can_start() && created.can_kill() && created.can_delete());
        assert!(!created.can_exec());
        let running = state(Status::Running);
        assert!(!running.can_start() && running.can_kill() && !running.can_delete());
        assert!(running.can_exec() && running.can_pause() && !running.can_resume());
        let paused = state(Status::Paused);
        assert!(paused.can_kill() && paused.can_resume() && !paused.can_delete());
        let stopped = state(Status::Stopped);
        assert!(!stopped.can_start() && !stopped.can_kill() && stopped.can_delete());
        assert!(!stopped.can_exec());
    }

    #[test]
    fn a_dead_vmm_means_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = state(Status::Running);
        s.pid = i32::MAX;
        s.refresh(&dir.path().join("exit.json"));
        assert_eq!(s.status, Status::Stopped);
        assert_eq!(s.oci_state()["pid"], 0);
    }

    #[test]
    fn an_exit_file_means_stopped_with_its_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exit = dir.path().join("exit.json");
        std::fs::write(&exit, r#"{"code":42,"signal":null}"#).expect("write");
        let mut s = state(Status::Running);
        s.pid = std::process::id() as i32;
        s.pid_start_time = crate::container::process_start_time(s.pid).expect("alive");
        s.refresh(&exit);
        assert_eq!(s.status, Status::Stopped);
        assert_eq!(s.exit.and_then(|e| e.code), Some(42));
    }

    #[test]
    fn a_live_vmm_keeps_the_recorded_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = state(Status::Created);
        s.pid = std::process::id() as i32;
        s.pid_start_time = crate::container::process_start_time(s.pid).expect("alive");
        s.refresh(&dir.path().join("exit.json"));
        assert_eq!(s.status, Status::Created);
        let doc = s.oci_state();
        assert_eq!(doc["status"], "created");
        assert_eq!(doc["pid"], s.pid);
        assert_eq!(doc["ociVersion"], OCI_VERSION);
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = StateDir::new(root.path(), "c1").expect("valid");
        std::fs::create_dir(&dir.dir).expect("mkdir");
        let mut s = state(Status::Stopped);
        s.mounts = vec!["/x".into()];
        s.save(&dir).expect("saved");
        assert_eq!(ContainerState::load(&dir).expect("loaded"), s);
        let other = StateDir::new(root.path(), "c2").expect("valid");
        assert!(matches!(
            ContainerState::load(&other),
            Err(StateError::NotFound(_))
        ));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_709_210_096, 5), "2024-02-29T12:34:56.000000005Z");
    }
}
