//! A built microVM and its run loop: vCPU threads, the device thread, the readiness thread,
//! and the wait for the first thing that ends the VM.
//!
//! Exit handling:
//! - the i8042 reset (command 0xFE on port 0x64) means the guest finished: [`VmmExit::GuestShutdown`], exit 0;
//! - a triple fault / KVM_EXIT_SHUTDOWN: [`VmmError::GuestCrashed`];
//! - KVM_EXIT_INTERNAL_ERROR / KVM_EXIT_FAIL_ENTRY: [`VmmError::KvmCannotRunGuest`], at once;
//! - SIGTERM / SIGINT: [`VmmExit::Signal`], exit 128 + signal number.
//!
//! Signals: SIGTERM and SIGINT are blocked in every thread ([`block_exit_signals`], called first
//! thing in `main` so that threads inherit the mask) and read from a signalfd by the thread
//! that calls [`Vmm::run`]. No async-signal handler is involved.
//!
//! Teardown: every vCPU thread is kicked out of KVM_RUN with [`vcpu_kick_signal`] (a real-time
//! signal with a no-op handler, so KVM_RUN returns EINTR) and joined, the device thread is
//! stopped and joined (which drops the devices), and the vsock socket file is removed. Joins
//! are bounded by [`TEARDOWN_TIMEOUT`]: a thread that does not stop in time is left behind
//! with a warning, and the process exits anyway.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use husk_agent_protocol::client::AgentClient;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::VmConfig;
use crate::kvm_check;
use crate::timeline::{self, TimelineRecorder};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuExit};
use crate::vstate::vm::Vm;

/// The device thread's event loop, holding every device that handles events.
pub type DeviceEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// How a VM ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest reset the machine through the i8042: it finished.
    GuestShutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
}

impl VmmExit {
    /// The process exit status: 0 for a guest shutdown, 128 + signal number for a signal.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmExit::GuestShutdown => 0,
            VmmExit::Signal(signo) => 128 + signo,
        }
    }
}

/// How a VM ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Triple fault, KVM_EXIT_SHUTDOWN or a crash event.
    #[error("guest crashed (kernel panic or triple fault) on vCPU {0}")]
    GuestCrashed(u8),
    /// KVM refused to run or emulate the guest.
    #[error("KVM cannot run this guest: {cause} on vCPU {vcpu} - {hint}")]
    KvmCannotRunGuest {
        vcpu: u8,
        cause: String,
        hint: &'static str,
    },
    /// An exit the VMM does not handle.
    #[error("vCPU {0} stopped on an unexpected KVM exit ({1})")]
    UnexpectedExit(u8, &'static str),
    /// A vCPU ioctl failed.
    #[error("vCPU failed")]
    Vcpu(#[from] VcpuError),
    /// Setting up the signalfd failed.
    #[error("failed to set up signal handling")]
    Signals(#[source] nix::Error),
    /// A thread could not be started.
    #[error("failed to start the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    /// Waiting for the exit failed.
    #[error("failed to wait for the VM to exit")]
    Wait(#[source] nix::Error),
}

/// How long teardown waits for the vCPU and device threads to stop.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// The signal that kicks a vCPU thread out of KVM_RUN: the first real-time signal.
pub fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler of [`vcpu_kick_signal`] (once per process): its only effect is
/// to interrupt the KVM_RUN ioctl of the thread it is sent to.
fn install_kick_handler() -> Result<(), VmmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(vcpu_kick_signal(), noop_signal_handler).map_err(|e| e.errno())
        })
        .map_err(|errno| VmmError::Signals(nix::Error::from_raw(errno)))
}

/// Blocks SIGTERM and SIGINT in the calling thread (and in the threads it spawns later), so
/// that [`Vmm::run`] receives them through a signalfd. Call it first thing in `main`.
pub fn block_exit_signals() -> Result<SigSet, nix::Error> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()?;
    Ok(mask)
}

/// What a vCPU thread stopped with.
#[derive(Debug)]
enum VcpuStop {
    Exit(u8, VcpuExit),
    Error(VcpuError),
}

/// The first vCPU stop, and an eventfd to wake the waiting thread.
struct StopReport {
    first: Mutex<Option<VcpuStop>>,
    evt: EventFd,
    stopping: AtomicBool,
}

impl StopReport {
    fn report(&self, stop: VcpuStop) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(stop);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("failed to signal a vCPU stop: {e}");
        }
    }

    fn take(&self) -> Option<VcpuStop> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Ends the device thread's loop when its eventfd fires.
struct StopSubscriber {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("failed to register the device thread's stop event: {e:?}");
        }
    }
}

/// A microVM, built and ready to run.
pub struct Vmm {
    // Kept alive for the VM's lifetime: the memory slots point into `mem`.
    _vm: Vm,
    _mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    event_manager: DeviceEventManager,
    reset_evt: EventFd,
    vsock_socket: PathBuf,
    boot_report: Option<PathBuf>,
    agent_timeout: Duration,
    timeline: Arc<TimelineRecorder>,
}

impl Vmm {
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemory,
        vcpus: Vec<Vcpu>,
        event_manager: DeviceEventManager,
        reset_evt: EventFd,
        cfg: &VmConfig,
        timeline: Arc<TimelineRecorder>,
    ) -> Self {
        Vmm {
            _vm: vm,
            _mem: mem,
            vcpus,
            event_manager,
            reset_evt,
            vsock_socket: cfg.vsock_socket.clone(),
            boot_report: cfg.boot_report.clone(),
            agent_timeout: cfg.agent_timeout,
            timeline,
        }
    }

    /// The boot timeline recorded so far.
    pub fn timeline(&self) -> &Arc<TimelineRecorder> {
        &self.timeline
    }

    /// Runs the VM until the guest shuts down, crashes, KVM gives up, or a signal arrives.
    pub fn run(mut self) -> Result<VmmExit, VmmError> {
        let mask = block_exit_signals().map_err(VmmError::Signals)?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(VmmError::Signals)?;
        let stops = Arc::new(StopReport {
            first: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Spawn("vCPU", e))?,
            stopping: AtomicBool::new(false),
        });

        install_kick_handler()?;

        let (device_thread, device_stop_evt) = self.spawn_device_thread()?;
        let mut vcpu_threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            vcpu_threads.push(spawn_vcpu_thread(
                vcpu,
                stops.clone(),
                self.timeline.clone(),
            )?);
        }
        self.spawn_readiness_thread()?;

        let result = wait_for_exit(&signals, &self.reset_evt, &stops);

        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        stops.stopping.store(true, Ordering::Release);
        join_until(vcpu_threads, deadline, true);
        if let Err(e) = device_stop_evt.write(1) {
            tracing::warn!("failed to stop the device thread: {e}");
        }
        join_until(vec![device_thread], deadline, false);
        self.remove_socket();
        result
    }

    fn spawn_device_thread(&mut self) -> Result<(JoinHandle<()>, EventFd), VmmError> {
        let stop = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Spawn("device", e))?;
        let subscriber = StopSubscriber {
            evt: evt.try_clone().map_err(|e| VmmError::Spawn("device", e))?,
            stop: stop.clone(),
        };
        let mut event_manager = std::mem::replace(
            &mut self.event_manager,
            EventManager::new()
                .map_err(|e| VmmError::Spawn("device", io::Error::other(format!("{e:?}"))))?,
        );
        event_manager.add_subscriber(Arc::new(Mutex::new(subscriber)));
        let handle = thread::Builder::new()
            .name("husk-devices".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = event_manager.run_with_timeout(-1) {
                        tracing::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(|e| VmmError::Spawn("device", e))?;
        Ok((handle, evt))
    }

    fn spawn_readiness_thread(&self) -> Result<(), VmmError> {
        let socket = self.vsock_socket.clone();
        let timeout = self.agent_timeout;
        let timeline = self.timeline.clone();
        let report = self.boot_report.clone();
        thread::Builder::new()
            .name("husk-ready".into())
            .spawn(move || {
                match AgentClient::connect(&socket, timeout) {
                    Ok((client, handshake)) => {
                        let now = timeline::since_start_us();
                        drop(client);
                        timeline.update(|t| {
                            t.agent_handshake_us = Some(now);
                            t.guest_uptime_at_handshake_us = Some(handshake.uptime_us);
                            t.agent_version = Some(handshake.agent_version.clone());
                        });
                        tracing::debug!(
                            timeline = ?timeline.snapshot(),
                            guest_cpus = handshake.cpus,
                            guest_mem_total_kib = handshake.mem_total_kib,
                            "agent ready"
                        );
                    }
                    Err(e) => tracing::warn!(
                        "no handshake from the guest agent within {} ms: {e}",
                        timeout.as_millis()
                    ),
                }
                if let Some(path) = report {
                    if let Err(e) = timeline::write_report(&path, &timeline.snapshot()) {
                        tracing::warn!("{e}");
                    }
                }
            })
            .map_err(|e| VmmError::Spawn("readiness", e))?;
        Ok(())
    }

    fn remove_socket(&self) {
        match std::fs::remove_file(&self.vsock_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("failed to remove {}: {e}", self.vsock_socket.display()),
        }
    }
}

/// Joins `threads`, kicking them out of KVM_RUN first if `kick`, until `deadline`.
fn join_until(mut threads: Vec<JoinHandle<()>>, deadline: Instant, kick: bool) {
    loop {
        let (finished, running): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|t| t.is_finished());
        for t in finished {
            if t.join().is_err() {
                tracing::warn!("a VMM thread panicked");
            }
        }
        threads = running;
        if threads.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!("{} VMM thread(s) did not stop in time", threads.len());
            return;
        }
        if kick {
            for t in &threads {
                // A failed kick only delays teardown until the deadline.
                let _ = t.kill(vcpu_kick_signal());
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
}

fn spawn_vcpu_thread(
    mut vcpu: Vcpu,
    stops: Arc<StopReport>,
    timeline: Arc<TimelineRecorder>,
) -> Result<JoinHandle<()>, VmmError> {
    let index = vcpu.index();
    thread::Builder::new()
        .name(format!("husk-vcpu-{index}"))
        .spawn(move || {
            if index == 0 {
                let now = timeline::since_start_us();
                timeline.update(|t| t.first_vcpu_entry_us = Some(now));
            }
            while !stops.stopping.load(Ordering::Acquire) {
                match vcpu.run_once() {
                    Ok(VcpuExit::Handled) => {}
                    Ok(exit) => {
                        stops.report(VcpuStop::Exit(index, exit));
                        break;
                    }
                    Err(e) => {
                        stops.report(VcpuStop::Error(e));
                        break;
                    }
                }
            }
        })
        .map_err(|e| VmmError::Spawn("vCPU", e))
}

/// Borrows an EventFd's descriptor (vmm-sys-util's EventFd has no `AsFd`).
fn borrow_fd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is owned by `evt`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

/// Waits for a signal, the guest's reset, or a vCPU stop, and turns it into the outcome.
fn wait_for_exit(
    signals: &SignalFd,
    reset_evt: &EventFd,
    stops: &StopReport,
) -> Result<VmmExit, VmmError> {
    loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(borrow_fd(reset_evt), PollFlags::POLLIN),
            PollFd::new(borrow_fd(&stops.evt), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(VmmError::Wait(e)),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[2]) {
            if let Some(stop) = stops.take() {
                return vcpu_stop_outcome(stop);
            }
        }
        if ready(&fds[1]) {
            tracing::debug!("guest reset through the i8042: shutting down");
            return Ok(VmmExit::GuestShutdown);
        }
        if ready(&fds[0]) {
            if let Ok(Some(info)) = signals.read_signal() {
                tracing::debug!("signal {}: shutting down", info.ssi_signo);
                return Ok(VmmExit::Signal(info.ssi_signo as i32));
            }
        }
    }
}

fn kvm_hint() -> &'static str {
    if kvm_check::kvm_pvm_loaded() {
        "this host's KVM is kvm_pvm, which cannot run Linux guests; run `husk check`"
    } else {
        "run `husk check`"
    }
}

fn vcpu_stop_outcome(stop: VcpuStop) -> Result<VmmExit, VmmError> {
    match stop {
        VcpuStop::Error(e) => Err(VmmError::Vcpu(e)),
        VcpuStop::Exit(vcpu, exit) => Err(match exit {
            VcpuExit::Shutdown => VmmError::GuestCrashed(vcpu),
            VcpuExit::Reset => return Ok(VmmExit::GuestShutdown),
            VcpuExit::InternalError(kind) => VmmError::KvmCannotRunGuest {
                vcpu,
                cause: format!("internal error ({kind})"),
                hint: kvm_hint(),
            },
            VcpuExit::FailEntry { reason, cpu } => VmmError::KvmCannotRunGuest {
                vcpu,
                cause: format!("entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
                hint: kvm_hint(),
            },
            VcpuExit::Unexpected(name) => VmmError::UnexpectedExit(vcpu, name),
            VcpuExit::Handled => VmmError::UnexpectedExit(vcpu, "handled"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vcpu::InternalError;

    #[test]
    fn exit_codes() {
        assert_eq!(VmmExit::GuestShutdown.exit_code(), 0);
        assert_eq!(VmmExit::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(VmmExit::Signal(libc::SIGINT).exit_code(), 130);
    }

    #[test]
    fn triple_fault_is_a_crash() {
        let err = vcpu_stop_outcome(VcpuStop::Exit(0, VcpuExit::Shutdown)).expect_err("must fail");
        assert!(matches!(err, VmmError::GuestCrashed(0)));
        assert_eq!(
            err.to_string(),
            "guest crashed (kernel panic or triple fault) on vCPU 0"
        );
    }

    #[test]
    fn internal_error_names_the_cause() {
        let err = vcpu_stop_outcome(VcpuStop::Exit(
            1,
            VcpuExit::InternalError(InternalError::Emulation),
        ))
        .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.starts_with(
            "KVM cannot run this guest: internal error (emulation failure) on vCPU 1 - "
        ));
        assert!(msg.contains("husk check"));
    }

    #[test]
    fn kvm_reset_event_is_a_clean_shutdown() {
        let exit = vcpu_stop_outcome(VcpuStop::Exit(0, VcpuExit::Reset)).expect("ok");
        assert_eq!(exit, VmmExit::GuestShutdown);
    }

    #[test]
    fn first_stop_wins() {
        let stops = StopReport {
            first: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            stopping: AtomicBool::new(false),
        };
        stops.report(VcpuStop::Exit(2, VcpuExit::Shutdown));
        stops.report(VcpuStop::Exit(0, VcpuExit::Reset));
        assert!(matches!(
            stops.take(),
            Some(VcpuStop::Exit(2, VcpuExit::Shutdown))
        ));
        assert_eq!(stops.evt.read().expect("woken"), 2);
    }
}
