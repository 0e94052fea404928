//! A recording fake of [`Syscall`] for unit tests.

use super::Syscall;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::wait::WaitStatus;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mkdir {
        path: PathBuf,
        mode: u32,
    },
    Mount {
        source: Option<String>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    WaitAnyNohang,
}

/// Records every call; answers with scripted errors or wait statuses.
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    calls: Mutex<Vec<Call>>,
    mkdir_errors: Mutex<HashMap<PathBuf, Errno>>,
    mount_errors: Mutex<HashMap<PathBuf, Errno>>,
    wait_results: Mutex<VecDeque<Result<WaitStatus, Errno>>>,
}

impl RecordingSyscall {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `mkdir(path)` fail with `errno`.
    pub fn fail_mkdir(&self, path: &str, errno: Errno) {
        lock(&self.mkdir_errors).insert(PathBuf::from(path), errno);
    }

    /// Makes `mount(.., target, ..)` fail with `errno`.
    pub fn fail_mount(&self, target: &str, errno: Errno) {
        lock(&self.mount_errors).insert(PathBuf::from(target), errno);
    }

    /// Queues the next results of `wait_any_nohang`; once empty it returns `ECHILD`.
    pub fn push_wait(&self, result: Result<WaitStatus, Errno>) {
        lock(&self.wait_results).push_back(result);
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Syscall for RecordingSyscall {
    fn mkdir(&self, path: &Path, mode: u32) -> Result<(), Errno> {
        lock(&self.calls).push(Call::Mkdir {
            path: path.to_path_buf(),
            mode,
        });
        lock(&self.mkdir_errors)
            .get(path)
            .map_or(Ok(()), |errno| Err(*errno))
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        lock(&self.calls).push(Call::Mount {
            source: source.map(str::to_owned),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: data.map(str::to_owned),
        });
        lock(&self.mount_errors)
            .get(target)
            .map_or(Ok(()), |errno| Err(*errno))
    }

    fn wait_any_nohang(&self) -> Result<WaitStatus, Errno> {
        lock(&self.calls).push(Call::WaitAnyNohang);
        lock(&self.wait_results)
            .pop_front()
            .unwrap_or(Err(Errno::ECHILD))
    }
}
