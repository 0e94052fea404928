//! The orphan reaper of PID 1.
//!
//! Every process whose parent dies is re-parented to PID 1, so PID 1 must collect exit statuses
//! or zombies pile up. SIGCHLD is blocked in every thread (the mask is set before any thread is
//! spawned and threads inherit it) and one reaper thread takes it with `sigwait`, then reaps with
//! `waitpid(-1, WNOHANG)` until nothing is left. A blocked signal is never discarded, not even
//! for PID 1 (whose signals with default action are otherwise ignored).
//!
//! A process whose exit status matters (a container's init, an exec'd process) is started through
//! [`Reaper::spawn_watched`], which registers a waiter under the same lock the reaper holds while
//! reaping: its status is routed to the waiter, never swallowed, even if it exits at once.
//! `std::process::Command` resets the signal mask in the child, so children do not inherit the
//! blocked SIGCHLD.

use crate::sys::Syscall;
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::WaitStatus;
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

/// Errors of starting the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// SIGCHLD could not be blocked.
    #[error("blocking SIGCHLD failed")]
    BlockSignal(#[source] Errno),
    /// The reaper thread could not be spawned.
    #[error("spawning the reaper thread failed")]
    SpawnThread(#[source] std::io::Error),
}

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(signal) => write!(f, "killed by {signal}"),
        }
    }
}

/// Reaps every child of the agent and routes the statuses of watched ones to their waiters.
pub struct Reaper {
    sys: Arc<dyn Syscall>,
    waiters: Mutex<Waiters>,
}

/// Most statuses of unwatched children kept for a late [`Reaper::watch`].
pub const MAX_UNCLAIMED: usize = 64;

/// Waiters by pid, and the last statuses of children nobody waited for (oldest first).
#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, Sender<ExitStatus>>,
    unclaimed: std::collections::VecDeque<(i32, ExitStatus)>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper without its thread (tests, or a caller that drives [`Reaper::reap_all`]).
    pub fn new(sys: Arc<dyn Syscall>) -> Self {
        Self {
            sys,
            waiters: Mutex::new(Waiters::default()),
        }
    }

    /// Blocks SIGCHLD in the calling thread and starts the reaper thread.
    ///
    /// Call it from the main thread before spawning any other thread, so that every thread
    /// inherits the blocked SIGCHLD and the signal always reaches the reaper's `sigwait`.
    pub fn start(sys: Arc<dyn Syscall>) -> Result<Arc<Reaper>, ReaperError> {
        let mut sigchld = SigSet::empty();
        sigchld.add(Signal::SIGCHLD);
        sigchld.thread_block().map_err(ReaperError::BlockSignal)?;
        let reaper = Arc::new(Reaper::new(sys));
        let thread_reaper = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || thread_reaper.run(sigchld))
            .map_err(ReaperError::SpawnThread)?;
        // Children that exited before the thread waited for the signal are reaped by its first
        // pass (a pending SIGCHLD stays pending until taken).
        Ok(reaper)
    }

    fn run(&self, sigchld: SigSet) {
        loop {
            self.reap_all();
            if let Err(errno) = sigchld.wait() {
                crate::log_error!("waiting for SIGCHLD failed: {errno}");
            }
        }
    }

    /// Reaps every exited child, sending watched ones' statuses to their waiters.
    /// Returns how many children were reaped.
    pub fn reap_all(&self) -> usize {
        let mut waiters = self.lock_waiters();
        let mut reaped = 0;
        loop {
            let (pid, status) = match self.sys.wait_any_nohang() {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, _core)) => (pid, ExitStatus::Signaled(signal)),
                // StillAlive: children left, none exited. Stop/continue reports are not asked for.
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(errno) => {
                    crate::log_error!("waitpid failed: {errno}");
                    break;
                }
            };
            reaped += 1;
            if let Some(waiter) = waiters.by_pid.remove(&pid.as_raw()) {
                // The waiter may have given up; its status is then of no use to anyone.
                let _ = waiter.send(status);
            } else {
                if waiters.unclaimed.len() >= MAX_UNCLAIMED {
                    waiters.unclaimed.pop_front();
                }
                waiters.unclaimed.push_back((pid.as_raw(), status));
            }
        }
        reaped
    }

    /// Starts a process whose exit status someone waits for.
    ///
    /// `spawn` runs with the reaper's lock held and returns the new pid plus any value; the
    /// returned receiver gets the process's [`ExitStatus`] once it is reaped. Keep `spawn`
    /// short (fork/exec): reaping waits for it.
    pub fn spawn_watched<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(i32, T), E>,
    ) -> Result<(T, Receiver<ExitStatus>), E> {
        let mut waiters = self.lock_waiters();
        let (pid, value) = spawn()?;
        let (sender, receiver) = channel();
        waiters.unclaimed.retain(|(p, _)| *p != pid);
        waiters.by_pid.insert(pid, sender);
        Ok((value, receiver))
    }

    /// Watches a child that was started without [`Reaper::spawn_watched`] (e.g. one a helper
    /// forked with `CLONE_PARENT`). If it was already reaped, its status (kept among the last
    /// [`MAX_UNCLAIMED`]) is delivered at once.
    pub fn watch(&self, pid: i32) -> Receiver<ExitStatus> {
        let mut waiters = self.lock_waiters();
        let (sender, receiver) = channel();
        if let Some(i) = waiters.unclaimed.iter().position(|(p, _)| *p == pid) {
            if let Some((_, status)) = waiters.unclaimed.remove(i) {
                let _ = sender.send(status);
                return receiver;
            }
        }
        waiters.by_pid.insert(pid, sender);
        receiver
    }

    /// Number of processes with a registered waiter not yet reaped.
    pub fn watched(&self) -> usize {
        self.lock_waiters().by_pid.len()
    }

    fn lock_waiters(&self) -> MutexGuard<'_, Waiters> {
        // A panic aborts the agent (panic = "abort"), so the lock can never be poisoned; take it
        // anyway rather than panic.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_utils::{Call, RecordingSyscall};
    use crate::sys::LinuxSyscall;
    use nix::unistd::Pid;
    use std::time::Duration;

    #[test]
    fn watched_exit_goes_to_its_waiter_and_orphans_are_just_reaped() {
        let sys = Arc::new(RecordingSyscall::new());
        let reaper = Reaper::new(sys.clone());
        let (value, rx) = reaper
            .spawn_watched(|| Ok::<_, Errno>((42, "spawned")))
            .expect("spawn");
        assert_eq!(value, "spawned");
        assert_eq!(reaper.watched(), 1);

        sys.push_wait(Ok(WaitStatus::Exited(Pid::from_raw(7), 3)));
        sys.push_wait(Err(Errno::EINTR));
        sys.push_wait(Ok(WaitStatus::Signaled(
            Pid::from_raw(42),
            Signal::SIGKILL,
            false,
        )));
        assert_eq!(reaper.reap_all(), 2);
        assert_eq!(rx.try_recv(), Ok(ExitStatus::Signaled(Signal::SIGKILL)));
        assert_eq!(reaper.watched(), 0);
        // Two statuses, EINTR, then ECHILD ends the pass.
        assert_eq!(sys.calls(), vec![Call::WaitAnyNohang; 4]);
    }

    #[test]
    fn reaping_stops_when_children_are_still_alive() {
        let sys = Arc::new(RecordingSyscall::new());
        let reaper = Reaper::new(sys.clone());
        sys.push_wait(Ok(WaitStatus::StillAlive));
        sys.push_wait(Ok(WaitStatus::Exited(Pid::from_raw(9), 0)));
        assert_eq!(reaper.reap_all(), 0);
        assert_eq!(sys.calls().len(), 1);
    }

    #[test]
    fn late_watch_gets_the_status_of_an_already_reaped_child() {
        let sys = Arc::new(RecordingSyscall::new());
        let reaper = Reaper::new(sys.clone());
        sys.push_wait(Ok(WaitStatus::Exited(Pid::from_raw(77), 4)));
        assert_eq!(reaper.reap_all(), 1);
        let rx = reaper.watch(77);
        assert_eq!(rx.try_recv(), Ok(ExitStatus::Exited(4)));
        let rx = reaper.watch(78);
        assert!(rx.try_recv().is_err());
        assert_eq!(reaper.watched(), 1);
    }

    #[test]
    fn failed_spawn_registers_no_waiter() {
        let reaper = Reaper::new(Arc::new(RecordingSyscall::new()));
        let result = reaper.spawn_watched(|| Err::<(i32, ()), _>("no fork"));
        assert_eq!(result.err(), Some("no fork"));
        assert_eq!(reaper.watched(), 0);
    }

    #[test]
    fn real_child_exit_code_reaches_its_waiter() {
        let reaper = Reaper::new(Arc::new(LinuxSyscall));
        let (_, rx) = reaper
            .spawn_watched(|| {
                let child = std::process::Command::new("/bin/sh")
                    .args(["-c", "exit 5"])
                    .spawn()?;
                Ok::<_, std::io::Error>((child.id() as i32, ()))
            })
            .expect("spawn sh");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            reaper.reap_all();
            if let Ok(status) = rx.try_recv() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "child never reaped");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(status, ExitStatus::Exited(5));
    }
}
