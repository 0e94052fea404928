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
use std::sync::{mpsc, Arc, Mutex};
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
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::kvm_check;
use crate::snapshot::{self, Template, TemplateInputs};
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
    /// The guest was saved as a template (`--template-out`).
    TemplateWritten,
}

/// The exit status of husk-vmm when it could not restore a template (before any guest code
/// ran) or the restored guest did not take its new identity: the runtime then boots the
/// sandbox instead, and throws the template away.
pub const TEMPLATE_REFUSED_EXIT: i32 = 3;

/// How a VM starts and what ends it.
#[derive(Debug)]
pub enum VmMode {
    /// A cold boot.
    Boot,
    /// A boot that ends by saving the guest as a template, once its agent is ready.
    Template(Box<TemplateJob>),
    /// A template restored: the guest gets its new identity before anything else reaches it.
    Restored,
}

/// Where a template goes and what it is made from.
pub struct TemplateJob {
    pub dir: PathBuf,
    pub inputs: TemplateInputs,
    /// The guest's balloon, whose first free page report the template waits for (see
    /// [`snapshot_due`]).
    pub balloon: Arc<Mutex<Balloon>>,
    /// Guest memory mapped from a file (the kernel's text and read-only data): what the guest
    /// never touched there is the file's content, not zeros (see [`snapshot::write_memory`]).
    pub file_mapped: Vec<(vm_memory::GuestAddress, u64)>,
}

impl std::fmt::Debug for TemplateJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateJob")
            .field("dir", &self.dir)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

/// What the builder hands to [`Vmm::new`].
pub struct VmmParts {
    pub vm: Vm,
    pub mem: GuestMemory,
    pub vcpus: Vec<Vcpu>,
    pub event_manager: DeviceEventManager,
    /// The file server's event loop (virtio-fs alone), with a shared directory.
    pub fs_event_manager: Option<DeviceEventManager>,
    pub reset_evt: EventFd,
    pub transports: Vec<(&'static str, Arc<Mutex<MmioTransport>>)>,
    pub vsock: Arc<Mutex<Vsock>>,
    pub mode: VmMode,
}

impl VmmExit {
    /// The process exit status: 0 for a guest shutdown, 128 + signal number for a signal.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmExit::GuestShutdown | VmmExit::TemplateWritten => 0,
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
    /// Dropping privileges failed (see [`crate::confine`]).
    #[error("cannot confine husk-vmm")]
    Confine(#[from] crate::confine::ConfineError),
    /// Setting up the signalfd failed.
    #[error("failed to set up signal handling")]
    Signals(#[source] nix::Error),
    /// A thread could not be started.
    #[error("failed to start the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    /// Waiting for the exit failed.
    #[error("failed to wait for the VM to exit")]
    Wait(#[source] nix::Error),
    /// The restored guest did not take its new identity.
    #[error("the restored guest did not take its new identity: {0}")]
    Renew(String),
    /// The template could not be made.
    #[error("cannot make the template: {0}")]
    Template(String),
}

impl VmmError {
    /// Whether the runtime should boot the sandbox instead (see [`TEMPLATE_REFUSED_EXIT`]).
    pub fn is_template_refusal(&self) -> bool {
        matches!(self, VmmError::Renew(_))
    }
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

/// Makes every thread allocate from glibc's one main malloc arena. Call it first thing in
/// `main`, before any thread starts.
///
/// glibc gives each thread that allocates an arena of its own (up to eight per CPU): a 64 MiB
/// reservation of which it touches 8-84 KiB at once, plus what the thread's allocations leave
/// free there. husk-vmm has five such threads besides `main` (supervisor, devices, each vCPU,
/// the stdio relays), so in the rig five arenas held some 280 KiB of a booted VMM's ~5 MiB
/// without guest memory. Its threads allocate little and seldom together (the vCPU threads
/// mostly not at all once the guest runs), and glibc's per-thread cache serves small
/// allocations without the arena's lock, so one arena costs no contention that matters.
/// Elsewhere than glibc this does nothing.
pub fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes effect for threads'
    // first allocations, and no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and in the threads it spawns later), so
/// that [`Vmm::run`] receives them through a signalfd. Call it first thing in `main`.
pub fn block_exit_signals() -> Result<SigSet, nix::Error> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    if crate::seccomp::test_hook_armed(crate::seccomp::HOOK_SIGUSR2) {
        mask.add(Signal::SIGUSR2);
    }
    mask.thread_block()?;
    Ok(mask)
}

/// What a vCPU thread stopped with.
#[derive(Debug)]
enum VcpuStop {
    Exit(u8, VcpuExit),
    Error(VcpuError),
    Confine(crate::confine::ConfineError),
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

/// A request to the thread waiting in [`Vmm::run`] from a helper thread: save the template
/// now, or give up.
#[derive(Debug)]
enum Control {
    Snapshot,
    Fail(VmmError),
}

/// The pending [`Control`] and the eventfd that wakes the waiting thread.
struct ControlChannel {
    request: Mutex<Option<Control>>,
    evt: EventFd,
}

impl ControlChannel {
    fn send(&self, control: Control) {
        let mut request = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if request.is_none() {
            *request = Some(control);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("failed to wake the VMM's main thread: {e}");
        }
    }

    fn take(&self) -> Option<Control> {
        self.request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// What [`wait_for_exit`] saw.
enum Ended {
    Exit(VmmExit),
    Snapshot,
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
    vm: Vm,
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    transports: Vec<(&'static str, Arc<Mutex<MmioTransport>>)>,
    vsock: Arc<Mutex<Vsock>>,
    mode: VmMode,
    event_manager: DeviceEventManager,
    fs_event_manager: Option<DeviceEventManager>,
    reset_evt: EventFd,
    vsock_socket: PathBuf,
    boot_report: Option<PathBuf>,
    agent_timeout: Duration,
    /// A restored guest's card configuration for its renewal (none without a card).
    network_params: Vec<String>,
    timeline: Arc<TimelineRecorder>,
    /// Where the renewal's connection goes once the guest is renewed, if someone wants it
    /// ([`Vmm::renewed_connection`]).
    renewed: Option<mpsc::Sender<AgentClient>>,
}

impl Vmm {
    pub(crate) fn new(parts: VmmParts, cfg: &VmConfig, timeline: Arc<TimelineRecorder>) -> Self {
        Vmm {
            vm: parts.vm,
            mem: parts.mem,
            vcpus: parts.vcpus,
            transports: parts.transports,
            vsock: parts.vsock,
            mode: parts.mode,
            event_manager: parts.event_manager,
            fs_event_manager: parts.fs_event_manager,
            reset_evt: parts.reset_evt,
            vsock_socket: cfg.vsock_socket.clone(),
            boot_report: cfg.boot_report.clone(),
            agent_timeout: cfg.agent_timeout,
            network_params: cfg
                .net
                .iter()
                .enumerate()
                .flat_map(|(card, net)| net.renewal_params(card))
                .collect(),
            timeline,
            renewed: None,
        }
    }

    /// For a restored guest, the connection its renewal was made on, handed over once the
    /// guest is renewed: a connection to the agent like any other (the identity port serves
    /// every request), and one fewer for the caller to make. The sender is dropped, unsent,
    /// if the renewal fails. `None` for a booted guest, which is not renewed.
    pub fn renewed_connection(&mut self) -> Option<mpsc::Receiver<AgentClient>> {
        if !matches!(self.mode, VmMode::Restored) {
            return None;
        }
        let (sender, receiver) = mpsc::channel();
        self.renewed = Some(sender);
        Some(receiver)
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
        let control = Arc::new(ControlChannel {
            request: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Spawn("control", e))?,
        });

        let manager = self.take_event_manager()?;
        let mut event_threads = vec![spawn_event_thread(
            manager,
            "husk-devices",
            crate::seccomp::ThreadKind::Devices,
        )?];
        if let Some(manager) = self.fs_event_manager.take() {
            event_threads.push(spawn_event_thread(
                manager,
                "husk-fs",
                crate::seccomp::ThreadKind::FileServer,
            )?);
        }
        let mut vcpu_threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            vcpu_threads.push(spawn_vcpu_thread(
                vcpu,
                stops.clone(),
                self.timeline.clone(),
            )?);
        }
        match self.mode {
            VmMode::Boot => self.spawn_readiness_thread()?,
            VmMode::Template(ref job) => {
                self.spawn_template_watcher(control.clone(), job.balloon.clone())?
            }
            VmMode::Restored => self.spawn_renewal_thread(control.clone())?,
        }
        // Every thread that serves the guest runs, and the main thread starts none after: it
        // keeps only its own calls. If it cannot, the VM is stopped as for any other failure.
        let result = match crate::seccomp::narrow_main_thread() {
            Ok(()) => wait_for_exit(&signals, &self.reset_evt, &stops, &control),
            Err(e) => Err(VmmError::Confine(e.into())),
        };

        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        stops.stopping.store(true, Ordering::Release);
        let mut vcpus = join_until(vcpu_threads, deadline, true);
        let mut handles = Vec::with_capacity(event_threads.len());
        for (handle, stop_evt) in event_threads {
            if let Err(e) = stop_evt.write(1) {
                tracing::warn!("failed to stop an event thread: {e}");
            }
            handles.push(handle);
        }
        join_until(handles, deadline, false);
        let result = match result {
            Ok(Ended::Exit(exit)) => Ok(exit),
            Ok(Ended::Snapshot) => self.save_template(&mut vcpus),
            Err(e) => Err(e),
        };
        self.remove_socket();
        self.refuse_unrenewed(result)
    }

    /// A restored guest that ended (crashed, reset, or stopped KVM) before it was renewed ran
    /// nothing of the sandbox's: that is the template's fault, and the runtime boots instead.
    fn refuse_unrenewed(&self, result: Result<VmmExit, VmmError>) -> Result<VmmExit, VmmError> {
        let renewed = self.timeline.snapshot().agent_handshake_us.is_some();
        if !matches!(self.mode, VmMode::Restored) || renewed {
            return result;
        }
        match result {
            Ok(VmmExit::GuestShutdown) => Err(VmmError::Renew(
                "the restored guest reset itself before its renewal".into(),
            )),
            Err(e) if !e.is_template_refusal() => Err(VmmError::Renew(format!(
                "the restored guest ended before its renewal: {}",
                crate::supervisor::chain(&e)
            ))),
            other => other,
        }
    }

    /// Saves the stopped guest as a template (see [`crate::snapshot`]).
    fn save_template(&self, vcpus: &mut [Vcpu]) -> Result<VmmExit, VmmError> {
        let VmMode::Template(job) = &self.mode else {
            return Err(VmmError::Template(
                "this VM was not booted to be one".into(),
            ));
        };
        if vcpus.len() != self.timeline.snapshot().vcpus as usize {
            return Err(VmmError::Template("a vCPU thread did not stop".into()));
        }
        vcpus.sort_by_key(Vcpu::index);
        let fail =
            |what: &str, e: &dyn std::fmt::Display| VmmError::Template(format!("{what}: {e}"));
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| fail("opening /dev/kvm", &e))?;
        let xsave_size = self.vm.fd().check_extension_int(kvm_ioctls::Cap::Xsave2);
        if xsave_size > 4096 {
            return Err(VmmError::Template(format!(
                "the XSAVE area is {xsave_size} bytes (dynamic features such as AMX), more than \
                 templates keep"
            )));
        }
        let candidates = kvm
            .get_msr_index_list()
            .map_err(|e| fail("reading KVM's MSR list", &e))?;
        for vcpu in vcpus.iter_mut() {
            vcpu.complete_pending_io()
                .map_err(|e| fail("completing a vCPU's I/O", &e))?;
        }
        let msrs = vcpus
            .first()
            .map(|v| v.readable_msrs(candidates.as_slice()))
            .unwrap_or_default();
        let vcpu_states = vcpus
            .iter()
            .map(|v| v.save_state(&msrs))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("saving a vCPU", &crate::supervisor::chain(&e)))?;
        let vm = self
            .vm
            .save_state()
            .map_err(|e| fail("saving the VM", &crate::supervisor::chain(&e)))?;
        let devices = self
            .transports
            .iter()
            .map(|(_, t)| t.lock().unwrap_or_else(|p| p.into_inner()).snapshot())
            .collect();
        let memory = snapshot::write_memory(&job.dir, &self.mem, &job.file_mapped)
            .map_err(|e| fail("saving guest memory", &e))?;
        let data: u64 = memory.data.iter().map(|(_, len)| len).sum();
        let lazy: u64 = memory.lazy.iter().map(|(_, len)| len).sum();
        Template {
            inputs: job.inputs.clone(),
            vm,
            vcpus: vcpu_states,
            devices,
            memory,
        }
        .write(&job.dir)
        .map_err(|e| fail("writing the state", &e))?;
        tracing::info!(
            dir = %job.dir.display(),
            memory_kib = data / 1024,
            lazy_kib = lazy / 1024,
            "template written"
        );
        Ok(VmmExit::TemplateWritten)
    }

    /// Template mode: asks for the snapshot once [`snapshot_due`] says so: the agent has
    /// signalled readiness, no vsock connection is open or owes the guest a packet, and the
    /// guest's first free page report is done.
    fn spawn_template_watcher(
        &self,
        control: Arc<ControlChannel>,
        balloon: Arc<Mutex<Balloon>>,
    ) -> Result<(), VmmError> {
        let vsock = self.vsock.clone();
        let timeout = self.agent_timeout;
        thread::Builder::new()
            .name("husk-template".into())
            .spawn(move || {
                crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Agent);
                let start = Instant::now();
                let mut idle_since: Option<Instant> = None;
                let mut ready_at: Option<Instant> = None;
                let (mut reported, mut reported_at) = (0u64, start);
                loop {
                    let idle = vsock
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ready_and_idle();
                    let discarded = balloon
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .bytes_discarded();
                    let now = Instant::now();
                    if discarded != reported {
                        (reported, reported_at) = (discarded, now);
                    }
                    idle_since = if idle { idle_since.or(Some(now)) } else { None };
                    let settled = idle_since.is_some_and(|t| now - t >= TEMPLATE_SETTLE);
                    if settled {
                        let ready = *ready_at.get_or_insert(now);
                        let quiet = (reported > 0).then(|| now - reported_at);
                        if snapshot_due(now - ready, quiet) {
                            tracing::info!(
                                reported_kib = reported / 1024,
                                after_ready_ms = (now - ready).as_millis(),
                                "template: the guest's free memory is handed back; saving it"
                            );
                            control.send(Control::Snapshot);
                            return;
                        }
                    }
                    if now - start > timeout {
                        control.send(Control::Fail(VmmError::Template(format!(
                            "the guest agent did not signal readiness within {} ms",
                            timeout.as_millis()
                        ))));
                        return;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            })
            .map_err(|e| VmmError::Spawn("template", e))?;
        Ok(())
    }

    /// Restored mode: gives the guest its new identity through the agent's identity port
    /// (the only one open to host clients until the agent signals readiness again).
    fn spawn_renewal_thread(&mut self, control: Arc<ControlChannel>) -> Result<(), VmmError> {
        let socket = self.vsock_socket.clone();
        let timeout = self.agent_timeout;
        let timeline = self.timeline.clone();
        let report = self.boot_report.clone();
        let network = self.network_params.clone();
        let handover = self.renewed.take();
        thread::Builder::new()
            .name("husk-renew".into())
            .spawn(move || {
                crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Agent);
                match renew_guest(&socket, timeout, network) {
                    Ok((client, handshake)) => {
                        let now = timeline::since_start_us();
                        timeline.update(|t| {
                            t.agent_handshake_us = Some(now);
                            t.guest_uptime_at_handshake_us = Some(handshake.uptime_us);
                            t.agent_version = Some(handshake.agent_version.clone());
                        });
                        tracing::debug!(timeline = ?timeline.snapshot(), "restored guest renewed");
                        if let Some(handover) = handover {
                            // Nobody waiting any more is no error: they connect on their own.
                            let _ = handover.send(client);
                        }
                    }
                    Err(e) => {
                        control.send(Control::Fail(VmmError::Renew(e)));
                        return;
                    }
                }
                if let Some(path) = report {
                    if let Err(e) = timeline::write_report(&path, &timeline.snapshot()) {
                        tracing::warn!("{e}");
                    }
                }
            })
            .map_err(|e| VmmError::Spawn("renewal", e))?;
        Ok(())
    }

    /// The devices' event loop, for its thread; an empty one is left in its place.
    fn take_event_manager(&mut self) -> Result<DeviceEventManager, VmmError> {
        let empty = EventManager::new()
            .map_err(|e| VmmError::Spawn("device", io::Error::other(format!("{e:?}"))))?;
        Ok(std::mem::replace(&mut self.event_manager, empty))
    }

    fn spawn_readiness_thread(&self) -> Result<(), VmmError> {
        let socket = self.vsock_socket.clone();
        let timeout = self.agent_timeout;
        let timeline = self.timeline.clone();
        let report = self.boot_report.clone();
        thread::Builder::new()
            .name("husk-ready".into())
            .spawn(move || {
                crate::seccomp::confine_helper(crate::seccomp::ThreadKind::Agent);
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

/// How long a template's guest must stay idle (ready, no vsock connection) before it is
/// saved: its agent's threads settle back into their waits.
pub const TEMPLATE_SETTLE: Duration = Duration::from_millis(100);

/// How long the balloon must go without a free page report before the report counts as done.
/// The guest sends its blocks in batches of 32, one right after the host acknowledges the last.
pub const TEMPLATE_REPORT_QUIET: Duration = Duration::from_millis(500);

/// How long after the guest is ready a template waits for its first free page report (which
/// the agent sets off as it starts, and the guest kernel makes 2 s later) before it is saved
/// without one.
pub const TEMPLATE_REPORT_WAIT: Duration = Duration::from_secs(8);

/// Whether a template's guest, ready and idle for `since_ready`, is saved now: once its first
/// free page report is done (the balloon quiet for [`TEMPLATE_REPORT_QUIET`] after its last
/// discard; `quiet` is `None` while nothing was reported), or at [`TEMPLATE_REPORT_WAIT`].
///
/// Saved before that report, every sandbox restored from the template would make it right
/// after its restore: the guest kernel takes up to 32 free 2 MiB blocks off its free lists
/// while the host drops their pages, 64 MiB of a 128 MiB guest, while the sandbox's
/// container is being created, which the guest's OOM killer then found short of memory (seen:
/// 2 creates of 100 in the rig). Saved after it, the template's free memory is already handed
/// back: holes in its memory file, and nothing for a restored guest to report.
pub fn snapshot_due(since_ready: Duration, quiet: Option<Duration>) -> bool {
    quiet.is_some_and(|q| q >= TEMPLATE_REPORT_QUIET) || since_ready >= TEMPLATE_REPORT_WAIT
}

/// Bytes of host randomness a restored guest gets.
const RENEWAL_ENTROPY: usize = 64;

/// Connects to the restored guest's identity port and renews it (with `network`, the
/// configuration of its card); returns the connection and the agent's handshake.
fn renew_guest(
    socket: &std::path::Path,
    timeout: Duration,
    network: Vec<String>,
) -> Result<(AgentClient, husk_agent_protocol::Handshake), String> {
    let (mut client, handshake) =
        AgentClient::connect_port(socket, husk_agent_protocol::AGENT_IDENTITY_PORT, timeout)
            .map_err(|e| crate::supervisor::chain(&e))?;
    let mut entropy = vec![0u8; RENEWAL_ENTROPY];
    // SAFETY: getrandom writes at most `entropy.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if usize::try_from(n).ok() != Some(entropy.len()) {
        return Err(format!("getrandom failed: {}", io::Error::last_os_error()));
    }
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos();
    client
        .renew(husk_agent_protocol::Renewal {
            entropy,
            realtime_ns: u64::try_from(realtime_ns).unwrap_or(u64::MAX),
            hostname: None,
            network,
        })
        .map_err(|e| crate::supervisor::chain(&e))?;
    Ok((client, handshake))
}

/// Joins `threads`, kicking them out of KVM_RUN first if `kick`, until `deadline`; returns
/// what the threads that ended returned.
fn join_until<T>(mut threads: Vec<JoinHandle<T>>, deadline: Instant, kick: bool) -> Vec<T> {
    let mut results = Vec::new();
    loop {
        let (finished, running): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|t| t.is_finished());
        for t in finished {
            match t.join() {
                Ok(value) => results.push(value),
                Err(_) => tracing::warn!("a VMM thread panicked"),
            }
        }
        threads = running;
        if threads.is_empty() {
            return results;
        }
        if Instant::now() >= deadline {
            tracing::warn!("{} VMM thread(s) did not stop in time", threads.len());
            return results;
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

/// Runs `event_manager` on a thread of its own, named `name` and held to `kind`'s seccomp
/// list, until the returned eventfd is written. The device thread (every device but
/// virtio-fs) needs none of the capabilities husk-vmm keeps for the file server and drops
/// them, as vCPU threads do; it also runs the seccomp test hook
/// [`crate::seccomp::HOOK_DEVICES`].
fn spawn_event_thread(
    mut event_manager: DeviceEventManager,
    name: &'static str,
    kind: crate::seccomp::ThreadKind,
) -> Result<(JoinHandle<()>, EventFd), VmmError> {
    let stop = Arc::new(AtomicBool::new(false));
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Spawn(name, e))?;
    let subscriber = StopSubscriber {
        evt: evt.try_clone().map_err(|e| VmmError::Spawn(name, e))?,
        stop: stop.clone(),
    };
    event_manager.add_subscriber(Arc::new(Mutex::new(subscriber)));
    let handle = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let dropped = if kind == crate::seccomp::ThreadKind::Devices {
                crate::confine::drop_all_in_this_thread().map_err(|e| e.to_string())
            } else {
                Ok(())
            };
            if let Err(e) = dropped
                .and_then(|()| crate::seccomp::confine_thread(kind).map_err(|e| e.to_string()))
            {
                // Fail closed: no device is served unconfined.
                tracing::error!("{} thread: {e}", kind.name());
                eprintln!("husk-vmm: {} thread: {e}", kind.name());
                std::process::exit(1);
            }
            if kind == crate::seccomp::ThreadKind::Devices {
                crate::seccomp::test_hook(crate::seccomp::HOOK_DEVICES);
            }
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = event_manager.run_with_timeout(-1) {
                    tracing::error!("{name} event loop failed: {e:?}");
                    break;
                }
            }
        })
        .map_err(|e| VmmError::Spawn(name, e))?;
    Ok((handle, evt))
}

fn spawn_vcpu_thread(
    mut vcpu: Vcpu,
    stops: Arc<StopReport>,
    timeline: Arc<TimelineRecorder>,
) -> Result<JoinHandle<Vcpu>, VmmError> {
    let index = vcpu.index();
    thread::Builder::new()
        .name(format!("husk-vcpu-{index}"))
        .spawn(move || {
            // A vCPU thread runs KVM and the devices' register handlers: no capability.
            if let Err(e) = crate::confine::drop_all_in_this_thread().and_then(|()| {
                crate::seccomp::confine_thread(crate::seccomp::ThreadKind::Vcpu).map_err(Into::into)
            }) {
                stops.report(VcpuStop::Confine(e));
                return vcpu;
            }
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
            vcpu
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
    control: &ControlChannel,
) -> Result<Ended, VmmError> {
    loop {
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(borrow_fd(reset_evt), PollFlags::POLLIN),
            PollFd::new(borrow_fd(&stops.evt), PollFlags::POLLIN),
            PollFd::new(borrow_fd(&control.evt), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(VmmError::Wait(e)),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[2]) {
            if let Some(stop) = stops.take() {
                return vcpu_stop_outcome(stop).map(Ended::Exit);
            }
        }
        if ready(&fds[1]) {
            tracing::debug!("guest reset through the i8042: shutting down");
            return Ok(Ended::Exit(VmmExit::GuestShutdown));
        }
        if ready(&fds[0]) {
            if let Ok(Some(info)) = signals.read_signal() {
                if info.ssi_signo == libc::SIGUSR2 as u32 {
                    crate::seccomp::test_hook(crate::seccomp::HOOK_SIGUSR2);
                    continue;
                }
                tracing::debug!("signal {}: shutting down", info.ssi_signo);
                return Ok(Ended::Exit(VmmExit::Signal(info.ssi_signo as i32)));
            }
        }
        if ready(&fds[3]) {
            let _ = control.evt.read();
            match control.take() {
                Some(Control::Snapshot) => return Ok(Ended::Snapshot),
                Some(Control::Fail(e)) => return Err(e),
                None => {}
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
        VcpuStop::Confine(e) => Err(VmmError::Confine(e)),
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
    fn a_template_waits_for_its_first_free_page_report_within_bounds() {
        let ms = Duration::from_millis;
        // Nothing reported yet: wait, up to the bound.
        assert!(!snapshot_due(ms(0), None));
        assert!(!snapshot_due(TEMPLATE_REPORT_WAIT - ms(1), None));
        assert!(snapshot_due(TEMPLATE_REPORT_WAIT, None));
        // A report under way (a discard less than the quiet time ago): wait.
        assert!(!snapshot_due(ms(3000), Some(ms(10))));
        assert!(!snapshot_due(ms(3000), Some(TEMPLATE_REPORT_QUIET - ms(1))));
        // Done: save.
        assert!(snapshot_due(ms(3000), Some(TEMPLATE_REPORT_QUIET)));
        // Still reporting at the bound: saved anyway (a guest cannot hold the build forever).
        assert!(snapshot_due(TEMPLATE_REPORT_WAIT, Some(ms(10))));
    }

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
