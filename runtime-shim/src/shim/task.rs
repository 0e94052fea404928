//! The Task service: containerd's task API on top of one sandbox VM.
//!
//! Every RPC handler is a few lines: it logs, hands the request to a `do_*` function on a
//! blocking thread (agent calls are blocking socket I/O), and maps the error
//! ([`ShimError`] -> ttrpc status). The `do_*` functions hold the shim's state:
//! - the sandbox ([`Sandbox`]), booted by the first `Create`;
//! - its containers, each with its init and exec'd processes ([`Process`]).
//!
//! A process is created in the guest (`Create`/`Exec`) with its streams attached, and a waiter
//! thread then blocks in the agent's `WaitProcess` until it exits, so that a process killed
//! before it was started is reported too. The exit is recorded once ([`Shared::record_exit`]):
//! output drained and the FIFOs closed, the OOM and exit events published, then `Wait` callers
//! released. When the VMM itself dies, every process still alive is recorded as killed.

use super::io::{attach, IoPaths, ProcessIo};
use super::rootfs::{mount_rootfs, release_container_share, unmount_rootfs};
use super::sandbox::{sandbox_root, Sandbox};
use super::sandbox_id_of;
use super::translate::{
    exit_status_code, join_sandbox_namespaces, json_any, metrics, metrics_any, sizing_spec,
    timestamp, use_vm_network, ShimError,
};
use crate::agent::{call, call_ok, AGENT_CONNECT_TIMEOUT};
use crate::bundle::{translate_spec, Bundle, GUEST_SHARE};
use crate::container::validate_id;
use crate::hooks::{HookKind, Hooks};
use crate::share::bind_into_share;
use anyhow::Context as _;
use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult};
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::{CreateContainer, ExecProcess, ProcessRef, Request, Response};
use husk_vmm::supervisor::{wait_process, DRAIN_TIMEOUT};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How long a waiter whose agent connection failed waits for the VMM's watcher to see the VMM
/// exit before it calls the failure an agent error.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long `Delete` tries to reach the agent to remove the container there.
const DELETE_AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new shim server waits for containerd's first `Create` before it shuts itself
/// down (see [`TaskService::abandon_unless_adopted`]); containerd sends it at once.
pub const ADOPTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

/// How a process ended, as containerd records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exited {
    status: u32,
    at: SystemTime,
}

/// A container's init or exec'd process.
struct Process {
    container_id: String,
    exec_id: Option<String>,
    /// The guest pid (a pod member joins its sandbox init's namespaces through it).
    guest_pid: i32,
    paths: IoPaths,
    status: Mutex<ProcStatus>,
    exit: watch::Sender<Option<Exited>>,
    io: Mutex<Option<ProcessIo>>,
}

impl Process {
    fn reference(&self) -> ProcessRef {
        ProcessRef {
            id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        }
    }

    fn exited(&self) -> Option<Exited> {
        *self.exit.borrow()
    }

    fn status(&self) -> MutexGuard<'_, ProcStatus> {
        lock(&self.status)
    }

    fn describe(&self) -> String {
        match &self.exec_id {
            Some(exec) => format!("exec {exec} of {}", self.container_id),
            None => format!("task {}", self.container_id),
        }
    }
}

/// One container of the sandbox.
struct Container {
    bundle: PathBuf,
    /// The bundle's rootfs on which containerd's mounts were mounted (unmounted on delete).
    mounted_rootfs: Option<PathBuf>,
    init: Arc<Process>,
    execs: BTreeMap<String, Arc<Process>>,
    paused: bool,
    /// The OCI hooks of its `config.json` (see [`crate::hooks`]).
    hooks: Hooks,
    annotations: BTreeMap<String, String>,
}

/// The OCI state a hook of a shim container gets (its pid: the sandbox's VMM).
fn hook_state(
    id: &str,
    bundle: &std::path::Path,
    pid: u32,
    annotations: &BTreeMap<String, String>,
) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": crate::state::OCI_VERSION,
        "id": id,
        "status": "creating",
        "pid": pid,
        "bundle": bundle,
        "annotations": annotations,
    })
}

/// Runs the `poststop` hooks of a container that is gone (failures are warnings).
fn run_poststop(
    id: &str,
    hooks: &Hooks,
    bundle: &std::path::Path,
    annotations: &BTreeMap<String, String>,
) {
    let _ = hooks.run(
        HookKind::Poststop,
        &hook_state(id, bundle, 0, annotations),
        bundle,
        |m| log::warn!("task {id}: {m}"),
    );
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shim's state, shared by the RPC handlers and the waiter threads.
pub struct Shared {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    runtime: tokio::runtime::Handle,
    /// Held while the sandbox is being booted.
    boot: Mutex<()>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    /// The container a VM was booted for ahead of its `Create` (see [`TaskService::preboot`]);
    /// taken by that `Create`, which then owns the VM as if it had booted it.
    prebooted_for: Mutex<Option<String>>,
    containers: Mutex<BTreeMap<String, Container>>,
    /// Whether containerd took this server on (see [`TaskService::abandon_unless_adopted`]).
    adoption: AtomicU8,
}

/// [`Shared::adoption`]: no task created yet.
const AWAITING: u8 = 0;
/// A task was created: containerd knows this server and ends it with `Shutdown`.
const ADOPTED: u8 = 1;
/// No task came in time: the server is shutting down.
const ABANDONED: u8 = 2;

/// A `Create` takes the server on; false if it was abandoned first.
fn adopt(adoption: &AtomicU8) -> bool {
    adoption
        .compare_exchange(AWAITING, ADOPTED, Ordering::AcqRel, Ordering::Acquire)
        .map_or_else(|now| now == ADOPTED, |_| true)
}

/// The watchdog abandons the server; false if a `Create` took it on first.
fn abandon(adoption: &AtomicU8) -> bool {
    adoption
        .compare_exchange(AWAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// containerd's Task service.
pub struct TaskService {
    shared: Arc<Shared>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        runtime: tokio::runtime::Handle,
    ) -> TaskService {
        TaskService {
            shared: Arc::new(Shared {
                namespace: namespace.to_string(),
                publisher,
                exit,
                runtime,
                boot: Mutex::new(()),
                sandbox: Mutex::new(None),
                prebooted_for: Mutex::new(None),
                containers: Mutex::new(BTreeMap::new()),
                adoption: AtomicU8::new(AWAITING),
            }),
        }
    }

    /// Shuts this server down (its early-booted VM and state included) unless containerd
    /// creates a task in it within `after`. containerd sends `Create` as soon as the shim's
    /// `start` has printed the server's address; a `start` killed after spawning the server
    /// but before printing the address leaves a server nobody knows of, with a VM booting
    /// (see [`Self::preboot`]): without this it would run until the host reboots.
    pub fn abandon_unless_adopted(&self, after: Duration) {
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("husk-shim-adoption".into())
            .spawn(move || {
                std::thread::sleep(after);
                if abandon(&shared.adoption) {
                    log::warn!(
                        "containerd created no task within {after:?} of this shim's start (was \
                         its start cut short?): shutting down"
                    );
                    if let Err(e) = shared.do_shutdown(true) {
                        log::error!("shutting down the abandoned shim: {e}");
                        shared.exit.signal();
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("no adoption watchdog: {e}");
        }
    }

    /// Starts booting the VM of sandbox `id` now, before containerd's `Create` for it arrives,
    /// from `spec` (the bundle's `config.json`, which is in place when containerd starts the
    /// shim). The boot then overlaps containerd's connecting to the shim and sending `Create`
    /// (and, for a pod, the sandbox's rootfs mount). Only for a container that is its own
    /// sandbox; a spec that would not size a VM is left to `Create` to refuse. If the early boot
    /// fails, `Create` boots again and reports the error.
    pub fn preboot(&self, id: &str, spec: &serde_json::Value) {
        if sandbox_id_of(spec, id) != id {
            return;
        }
        let Ok(sized) = sizing_spec(spec) else {
            return;
        };
        let shared = self.shared.clone();
        let id = id.to_string();
        let spawned = std::thread::Builder::new()
            .name("husk-shim-preboot".into())
            .spawn(move || {
                if let Err(e) = shared.sandbox_for(&id, &id, &sized, true) {
                    log::info!("sandbox {id}: the early boot failed ({e}); Create boots again");
                }
            });
        if let Err(e) = spawned {
            log::warn!("sandbox: no early boot: {e}");
        }
    }

    /// Runs `f` on a blocking thread and maps its error to a ttrpc status.
    async fn blocking<T, F>(&self, what: &str, f: F) -> TtrpcResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Shared>) -> Result<T, ShimError> + Send + 'static,
    {
        let shared = self.shared.clone();
        let result = match tokio::task::spawn_blocking(move || f(&shared)).await {
            Ok(result) => result,
            Err(e) => Err(ShimError::Internal(anyhow::anyhow!("{what}: {e}"))),
        };
        if let Err(e) = &result {
            log::warn!("{what}: {e}");
        }
        result.map_err(Into::into)
    }
}

/// The guest's pids are meaningless on the host; containerd gets the VMM's pid for every
/// process (as for other VM runtimes), and `Pids` lists the guest pids.
fn host_pid(sandbox: &Sandbox) -> u32 {
    u32::try_from(sandbox.vmm_pid).unwrap_or(0)
}

impl Shared {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let publish = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event);
        if let Err(e) = self.runtime.block_on(publish) {
            log::warn!("publishing {topic}: {e}");
        }
    }

    fn sandbox(&self) -> Result<Arc<Sandbox>, ShimError> {
        lock(&self.sandbox)
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("the sandbox VM is not running".into()))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        let containers = lock(&self.containers);
        let container = containers
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("task {id} not found")))?;
        if exec_id.is_empty() {
            return Ok(container.init.clone());
        }
        container
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of task {id} not found")))
    }

    fn agent(&self, sandbox: &Sandbox) -> Result<AgentClient, ShimError> {
        sandbox
            .client()
            .map_err(|e| ShimError::Internal(anyhow::Error::from(e)))
    }

    /// The guest pid of the sandbox container's init, which pod members join.
    fn sandbox_init_pid(&self, sandbox_id: &str) -> Result<i32, ShimError> {
        let containers = lock(&self.containers);
        let init = &containers
            .get(sandbox_id)
            .ok_or_else(|| {
                ShimError::FailedPrecondition(format!(
                    "the sandbox container {sandbox_id} is gone; its pod cannot take new containers"
                ))
            })?
            .init;
        if *init.status() != ProcStatus::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "the sandbox container {sandbox_id} is not running"
            )));
        }
        Ok(init.guest_pid)
    }

    /// The sandbox `sandbox_id`, booting its VM (sized from `spec`) if this shim has none yet.
    /// Returns whether it was booted for this call. An `early` boot (no `Create` yet) marks the
    /// VM as booted for `container_id`'s coming `Create`, before anyone else can see it.
    fn sandbox_for(
        self: &Arc<Self>,
        sandbox_id: &str,
        container_id: &str,
        spec: &serde_json::Value,
        early: bool,
    ) -> Result<(Arc<Sandbox>, bool), ShimError> {
        let _boot = lock(&self.boot);
        if let Some(sandbox) = lock(&self.sandbox).clone() {
            if sandbox.id != sandbox_id {
                return Err(ShimError::FailedPrecondition(format!(
                    "this shim serves sandbox {}, not {sandbox_id}",
                    sandbox.id
                )));
            }
            if !sandbox.alive() {
                return Err(ShimError::FailedPrecondition(format!(
                    "the VM of sandbox {sandbox_id} has exited"
                )));
            }
            // The `Create` a VM was booted early for owns it as if it had booted it.
            let mut prebooted = lock(&self.prebooted_for);
            let owns = prebooted.as_deref() == Some(container_id);
            if owns {
                *prebooted = None;
            }
            return Ok((sandbox, owns));
        }
        if sandbox_id != container_id {
            return Err(ShimError::FailedPrecondition(format!(
                "sandbox {sandbox_id} does not run in this shim"
            )));
        }
        let sandbox = Arc::new(
            Sandbox::boot(&sandbox_root(&self.namespace), sandbox_id, spec)
                .with_context(|| format!("booting the VM of sandbox {sandbox_id}"))?,
        );
        *lock(&self.sandbox) = Some(sandbox.clone());
        if early {
            *lock(&self.prebooted_for) = Some(container_id.to_string());
        }
        let shared = self.clone();
        let monitored = sandbox.clone();
        std::thread::Builder::new()
            .name("husk-shim-vmm".into())
            .spawn(move || {
                let status = monitored.wait_exit(None);
                shared.on_vmm_exit(&monitored, status.as_deref().unwrap_or("?"));
            })
            .context("cannot start the VM watcher")?;
        Ok((sandbox, true))
    }

    /// The VMM is gone: every process not yet exited was killed with it.
    fn on_vmm_exit(&self, sandbox: &Sandbox, status: &str) {
        let processes: Vec<Arc<Process>> = lock(&self.containers)
            .values()
            .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
            .collect();
        let alive = processes.iter().filter(|p| p.exited().is_none()).count();
        if let Some(reason) = sandbox.dir.vmm_killed_by_seccomp() {
            log::error!("sandbox {}: {reason}", sandbox.id);
        }
        let ended_by = vmm_end_status(sandbox);
        if alive > 0 {
            log::warn!(
                "sandbox {}: husk-vmm exited ({status}) with {alive} processes alive",
                sandbox.id
            );
        }
        for process in processes {
            self.record_exit(sandbox, &process, ended_by, false);
        }
    }

    /// Records a process's exit once: drains and closes its output, publishes the OOM (for an
    /// init killed by the OOM killer) and exit events, then releases `Wait` callers.
    fn record_exit(&self, sandbox: &Sandbox, process: &Process, status: u32, oom: bool) {
        {
            let mut current = process.status();
            if *current == ProcStatus::Stopped {
                return;
            }
            *current = ProcStatus::Stopped;
        }
        let io = lock(&process.io).take();
        if let Some(io) = io {
            io.finish(DRAIN_TIMEOUT);
        }
        let at = SystemTime::now();
        if oom && process.exec_id.is_none() {
            self.publish(
                "/tasks/oom",
                Box::new(TaskOOM {
                    container_id: process.container_id.clone(),
                    ..Default::default()
                }),
            );
        }
        self.publish(
            "/tasks/exit",
            Box::new(TaskExit {
                container_id: process.container_id.clone(),
                id: process
                    .exec_id
                    .clone()
                    .unwrap_or_else(|| process.container_id.clone()),
                pid: host_pid(sandbox),
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            }),
        );
        log::info!("{} exited with {status}", process.describe());
        process.exit.send_replace(Some(Exited { status, at }));
    }

    /// Starts the thread that waits for `process` in the guest and records its exit.
    fn spawn_waiter(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        process: &Arc<Process>,
    ) -> Result<(), ShimError> {
        let shared = self.clone();
        let sandbox = sandbox.clone();
        let process = process.clone();
        std::thread::Builder::new()
            .name("husk-shim-wait".into())
            .spawn(move || {
                let waiter = AgentClient::connect(&sandbox.socket(), AGENT_CONNECT_TIMEOUT);
                let (status, oom) = match wait_process(waiter, &process.reference()) {
                    Ok(status) => (exit_status_code(&status), status.oom_killed),
                    Err(e) => {
                        // The VMM died or the agent failed. A dying VMM closes its connections
                        // a moment before its watcher reaps it: give the watcher that moment,
                        // so that the exit recorded below finds the sandbox dead (a `Delete`
                        // that follows the exit event must not wait for a dead agent).
                        if sandbox.wait_exit(Some(VMM_EXIT_GRACE)).is_none() {
                            log::error!("waiting for {}: {e}", process.describe());
                        }
                        (vmm_end_status(&sandbox), false)
                    }
                };
                shared.record_exit(&sandbox, &process, status, oom);
            })
            .map(drop)
            .context("cannot start a waiter thread")
            .map_err(ShimError::Internal)
    }

    fn do_create(self: &Arc<Self>, req: &CreateTaskRequest) -> Result<u32, ShimError> {
        let id = req.id.as_str();
        validate_id(id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring from a checkpoint is not supported by husk".into(),
            ));
        }
        if lock(&self.containers).contains_key(id) {
            return Err(ShimError::AlreadyExists(format!(
                "task {id} already exists"
            )));
        }
        let bundle_dir = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle_dir)?;
        let mut undo = CreateUndo::default();
        if !req.rootfs.is_empty() {
            let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
            let target = bundle_dir.join(root);
            mount_rootfs(&req.rootfs, &target).map_err(anyhow::Error::from)?;
            undo.rootfs = Some(target);
        }
        let bundle =
            Bundle::load(&bundle_dir).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let sandbox_id = sandbox_id_of(&bundle.spec, id);
        let (sandbox, booted) =
            self.sandbox_for(&sandbox_id, id, &sizing_spec(&bundle.spec)?, false)?;
        if booted {
            undo.sandbox = Some(sandbox.clone());
        }
        let paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut translation = translate_spec(&bundle, id);
        for note in &translation.notes {
            log::warn!("task {id}: {note}");
        }
        // blockIO is the pod VMM's, on the host (see `crate::host_cgroup`): the sandbox's
        // applied when its VM booted; a member container cannot have one of its own.
        let block_io = crate::host_cgroup::take_block_io(
            translation
                .spec
                .get_mut("linux")
                .and_then(|l| l.get_mut("resources")),
        );
        if block_io.is_some() && sandbox_id != id {
            return Err(ShimError::InvalidArgument(format!(
                "container {id}: linux.resources.blockIO is applied to the pod VM's host cgroup, \
                 from the pod sandbox's spec; a container in the pod cannot set its own"
            )));
        }
        translation.spec["process"]["terminal"] = serde_json::Value::Bool(req.terminal);
        if let Some(resources) = translation.spec["linux"]
            .get_mut("resources")
            .and_then(serde_json::Value::as_object_mut)
        {
            let notes = crate::sizing::map_cpuset(resources, u32::from(sandbox.vcpus))
                .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
            for note in notes {
                log::warn!("task {id}: {note}");
            }
        }
        if sandbox_id == id {
            if use_vm_network(&mut translation.spec) {
                // The pod's CNI interface, if it has one, was carried into the VM's network
                // namespace when the VM booted (see `crate::network`).
                log::info!("task {id}: the sandbox uses the microVM's network namespace");
            }
        } else {
            let sandbox_pid = self.sandbox_init_pid(&sandbox_id)?;
            join_sandbox_namespaces(&bundle.spec, &mut translation.spec, sandbox_pid)?;
        }
        let share = sandbox.dir.shared_dir().join(id);
        undo.share = Some(share.clone());
        let mut mounts = Vec::new();
        // Plain binds: a pod's husk-vmm runs as root (see `Sandbox::boot`).
        bind_into_share(&share, &translation.binds, &mut mounts, None)
            .context("preparing the container's share")?;
        let mut client = self.agent(&sandbox)?;
        let created = call(
            &mut client,
            "creating the container",
            &Request::CreateContainer(CreateContainer {
                id: id.to_string(),
                spec: translation.spec,
                bundle: format!("{GUEST_SHARE}/{id}"),
                stdio: paths.stdio_config(),
            }),
        )
        .map_err(anyhow::Error::from)?;
        let Response::Created { pid: guest_pid } = created else {
            return Err(ShimError::Internal(anyhow::anyhow!(
                "creating the container: unexpected {} reply",
                created.kind()
            )));
        };
        undo.guest = Some((sandbox.clone(), id.to_string()));
        if sandbox_id != id {
            sandbox.record_write_set();
        }
        // The container exists in the guest, its program not yet started: the create-time
        // hooks; one failing removes the container (`undo`), then the poststop hooks run.
        let hooks = Hooks::from_spec(&bundle.spec).map_err(ShimError::InvalidArgument)?;
        let annotations = bundle.annotations();
        let state = hook_state(id, &bundle_dir, host_pid(&sandbox), &annotations);
        let hooked = hooks.run_create(&state, &bundle_dir, |m| log::warn!("task {id}: {m}"));
        if let Err(e) = hooked {
            drop(undo);
            run_poststop(id, &hooks, &bundle_dir, &annotations);
            return Err(ShimError::Internal(e));
        }
        let reference = ProcessRef {
            id: id.to_string(),
            exec_id: None,
        };
        let io = attach(&sandbox.socket(), &reference, &paths).map_err(anyhow::Error::from)?;
        let init = new_process(id, None, guest_pid, paths.clone(), io);
        self.spawn_waiter(&sandbox, &init)?;
        lock(&self.containers).insert(
            id.to_string(),
            Container {
                bundle: bundle_dir,
                mounted_rootfs: undo.rootfs.take(),
                init,
                execs: BTreeMap::new(),
                paused: false,
                hooks,
                annotations,
            },
        );
        undo.disarm();
        self.publish(
            "/tasks/create",
            Box::new(TaskCreate {
                container_id: id.to_string(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: paths.stdin,
                    stdout: paths.stdout,
                    stderr: paths.stderr,
                    terminal: paths.terminal,
                    ..Default::default()
                })
                .into(),
                pid: host_pid(&sandbox),
                ..Default::default()
            }),
        );
        Ok(host_pid(&sandbox))
    }

    fn do_start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let process = self.process(id, exec_id)?;
        let sandbox = self.sandbox()?;
        // Held until the start event is out, so that the exit event cannot overtake it.
        let mut status = process.status();
        if *status != ProcStatus::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "{} is {:?}, not created",
                process.describe(),
                *status
            )));
        }
        let pid = host_pid(&sandbox);
        // A container's init: its startContainer hooks first, its poststart hooks after.
        let hooks = match &process.exec_id {
            None => lock(&self.containers)
                .get(id)
                .map(|c| (c.hooks.clone(), c.bundle.clone(), c.annotations.clone())),
            Some(_) => None,
        };
        if let Some((hooks, bundle, annotations)) = &hooks {
            let mut state = hook_state(id, bundle, pid, annotations);
            state["status"] = "created".into();
            if let Err(e) = hooks.run(HookKind::StartContainer, &state, bundle, |m| {
                log::warn!("task {id}: {m}")
            }) {
                // The lifecycle: a failed startContainer hook stops the container.
                drop(status);
                if let Err(kill) = self.kill_created(&sandbox, &process) {
                    log::warn!("task {id}: stopping it after its startContainer hook: {kill}");
                }
                return Err(ShimError::Internal(e));
            }
        }
        let mut client = self.agent(&sandbox)?;
        call_ok(
            &mut client,
            "starting the process",
            &Request::StartProcess(process.reference()),
        )
        .map_err(anyhow::Error::from)?;
        *status = ProcStatus::Running;
        if let Some((hooks, bundle, annotations)) = &hooks {
            let state = hook_state(id, bundle, pid, annotations);
            let _ = hooks.run(HookKind::Poststart, &state, bundle, |m| {
                log::warn!("task {id}: {m}")
            });
        }
        match &process.exec_id {
            None => self.publish(
                "/tasks/start",
                Box::new(TaskStart {
                    container_id: id.to_string(),
                    pid,
                    ..Default::default()
                }),
            ),
            Some(exec) => self.publish(
                "/tasks/exec-started",
                Box::new(TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec.clone(),
                    pid,
                    ..Default::default()
                }),
            ),
        }
        drop(status);
        Ok(pid)
    }

    /// Waits (blocking) up to `timeout` for `process` to be recorded as exited.
    fn wait_exited(process: &Process, timeout: Duration) -> Option<Exited> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exited) = process.exited() {
                return Some(exited);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills a created (never started) process so that it can be deleted.
    fn kill_created(&self, sandbox: &Sandbox, process: &Process) -> Result<Exited, ShimError> {
        if sandbox.alive() {
            let mut client = self.agent(sandbox)?;
            call_ok(
                &mut client,
                "killing the created process",
                &Request::SignalProcess {
                    process: process.reference(),
                    signal: libc::SIGKILL,
                    all: false,
                },
            )
            .map_err(anyhow::Error::from)?;
        }
        Self::wait_exited(process, Duration::from_secs(10)).ok_or_else(|| {
            ShimError::Internal(anyhow::anyhow!(
                "{} did not exit after SIGKILL",
                process.describe()
            ))
        })
    }

    fn do_delete(&self, id: &str, exec_id: &str) -> Result<DeleteResponse, ShimError> {
        let process = self.process(id, exec_id)?;
        let sandbox = self.sandbox()?;
        let status = *process.status();
        let exited = match status {
            ProcStatus::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "{} is running; kill it first",
                    process.describe()
                )))
            }
            ProcStatus::Created => self.kill_created(&sandbox, &process)?,
            ProcStatus::Stopped => {
                Self::wait_exited(&process, DRAIN_TIMEOUT * 2).ok_or_else(|| {
                    ShimError::Internal(anyhow::anyhow!("{} is still exiting", process.describe()))
                })?
            }
        };
        let pid = host_pid(&sandbox);
        let response = DeleteResponse {
            pid,
            exit_status: exited.status,
            exited_at: Some(timestamp(exited.at)).into(),
            ..Default::default()
        };
        if let Some(exec) = &process.exec_id {
            if let Some(container) = lock(&self.containers).get_mut(id) {
                container.execs.remove(exec);
            }
            return Ok(response);
        }
        if sandbox.alive() {
            // Bounded well inside containerd's 10 s for a `Delete`: an agent that does not
            // answer must not leave the task undeletable (the container's state in the guest
            // goes with the VM anyway).
            let removed = AgentClient::connect(&sandbox.socket(), DELETE_AGENT_TIMEOUT)
                .map_err(|e| ShimError::Internal(e.into()))
                .and_then(|(mut client, _)| {
                    client
                        .set_io_timeout(DELETE_AGENT_TIMEOUT)
                        .map_err(|e| ShimError::Internal(e.into()))?;
                    call_ok(
                        &mut client,
                        "removing the container",
                        &Request::RemoveContainer { id: id.to_string() },
                    )
                    .map_err(|e| ShimError::Internal(e.into()))
                });
            if let Err(e) = removed {
                log::warn!("task {id}: {e}");
            }
        }
        let container = lock(&self.containers).remove(id);
        let mut problems = Vec::new();
        if let Err(e) = release_container_share(&sandbox.dir.shared_dir().join(id)) {
            problems.push(format!("{e:#}"));
        }
        if let Some(rootfs) = container.as_ref().and_then(|c| c.mounted_rootfs.as_ref()) {
            if let Err(e) = unmount_rootfs(rootfs) {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(c) = &container {
            run_poststop(id, &c.hooks, &c.bundle, &c.annotations);
        }
        self.publish(
            "/tasks/delete",
            Box::new(TaskDelete {
                container_id: id.to_string(),
                pid,
                exit_status: exited.status,
                exited_at: Some(timestamp(exited.at)).into(),
                ..Default::default()
            }),
        );
        if !problems.is_empty() {
            return Err(ShimError::Internal(anyhow::anyhow!(
                "task {id} deleted, but its mounts could not all be released: {}",
                problems.join("; ")
            )));
        }
        Ok(response)
    }

    fn do_exec(self: &Arc<Self>, req: &ExecProcessRequest) -> Result<(), ShimError> {
        let id = req.id.as_str();
        let exec_id = req.exec_id.as_str();
        validate_id(exec_id).map_err(|e| ShimError::InvalidArgument(format!("exec id: {e}")))?;
        let sandbox = self.sandbox()?;
        {
            let containers = lock(&self.containers);
            let container = containers
                .get(id)
                .ok_or_else(|| ShimError::NotFound(format!("task {id} not found")))?;
            if *container.init.status() != ProcStatus::Running || container.paused {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot exec in task {id}: it is not running"
                )));
            }
            if container.execs.contains_key(exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {exec_id} of task {id} already exists"
                )));
            }
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        let mut process = json_any(spec, "exec process")?;
        if !process.is_object() {
            return Err(ShimError::InvalidArgument(
                "the exec process spec is not an object".into(),
            ));
        }
        process["terminal"] = serde_json::Value::Bool(req.terminal);
        let paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut client = self.agent(&sandbox)?;
        let created = call(
            &mut client,
            "creating the exec process",
            &Request::ExecProcess(ExecProcess {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                process,
                stdio: paths.stdio_config(),
            }),
        )
        .map_err(anyhow::Error::from)?;
        let Response::Created { pid: guest_pid } = created else {
            return Err(ShimError::Internal(anyhow::anyhow!(
                "creating the exec process: unexpected {} reply",
                created.kind()
            )));
        };
        let reference = ProcessRef {
            id: id.to_string(),
            exec_id: Some(exec_id.to_string()),
        };
        let io = attach(&sandbox.socket(), &reference, &paths).map_err(anyhow::Error::from)?;
        let exec = new_process(id, Some(exec_id.to_string()), guest_pid, paths, io);
        self.spawn_waiter(&sandbox, &exec)?;
        match lock(&self.containers).get_mut(id) {
            Some(container) => {
                container.execs.insert(exec_id.to_string(), exec);
            }
            None => {
                return Err(ShimError::NotFound(format!(
                    "task {id} was deleted during the exec"
                )))
            }
        }
        self.publish(
            "/tasks/exec-added",
            Box::new(TaskExecAdded {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    fn do_kill(&self, req: &KillRequest) -> Result<(), ShimError> {
        let process = self.process(&req.id, &req.exec_id)?;
        let sandbox = self.sandbox()?;
        if *process.status() == ProcStatus::Stopped || !sandbox.alive() {
            return Err(ShimError::NotFound(format!(
                "{} has already finished",
                process.describe()
            )));
        }
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| ShimError::InvalidArgument(format!("bad signal {}", req.signal)))?;
        let mut client = self.agent(&sandbox)?;
        call_ok(
            &mut client,
            "signalling the process",
            &Request::SignalProcess {
                process: process.reference(),
                signal,
                all: req.all,
            },
        )
        .map_err(anyhow::Error::from)?;
        Ok(())
    }

    fn do_state(&self, id: &str, exec_id: &str) -> Result<StateResponse, ShimError> {
        let process = self.process(id, exec_id)?;
        let (bundle, paused) = {
            let containers = lock(&self.containers);
            let container = containers
                .get(id)
                .ok_or_else(|| ShimError::NotFound(format!("task {id} not found")))?;
            (container.bundle.clone(), container.paused)
        };
        let sandbox = self.sandbox()?;
        let status = match *process.status() {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running if paused => Status::PAUSED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Stopped => Status::STOPPED,
        };
        let exited = process.exited();
        Ok(StateResponse {
            id: id.to_string(),
            bundle: bundle.display().to_string(),
            pid: host_pid(&sandbox),
            status: status.into(),
            stdin: process.paths.stdin.clone(),
            stdout: process.paths.stdout.clone(),
            stderr: process.paths.stderr.clone(),
            terminal: process.paths.terminal,
            exit_status: exited.map(|e| e.status).unwrap_or(0),
            exited_at: exited.map(|e| timestamp(e.at)).into(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        })
    }

    fn do_pids(&self, id: &str) -> Result<PidsResponse, ShimError> {
        self.process(id, "")?;
        let sandbox = self.sandbox()?;
        let mut client = self.agent(&sandbox)?;
        let reply = call(
            &mut client,
            "listing processes",
            &Request::ListProcesses { id: id.to_string() },
        )
        .map_err(anyhow::Error::from)?;
        let Response::Pids { pids } = reply else {
            return Err(ShimError::Internal(anyhow::anyhow!(
                "listing processes: unexpected {} reply",
                reply.kind()
            )));
        };
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .filter_map(|pid| u32::try_from(pid).ok().filter(|p| *p > 0))
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn do_stats(&self, id: &str) -> Result<StatsResponse, ShimError> {
        self.process(id, "")?;
        let sandbox = self.sandbox()?;
        let mut client = self.agent(&sandbox)?;
        let reply = call(
            &mut client,
            "reading stats",
            &Request::Stats { id: id.to_string() },
        )
        .map_err(anyhow::Error::from)?;
        let Response::Stats(stats) = reply else {
            return Err(ShimError::Internal(anyhow::anyhow!(
                "reading stats: unexpected {} reply",
                reply.kind()
            )));
        };
        Ok(StatsResponse {
            stats: Some(metrics_any(&metrics(&stats))?).into(),
            ..Default::default()
        })
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        let process = self.process(id, "")?;
        if *process.status() != ProcStatus::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "task {id} is not running"
            )));
        }
        let sandbox = self.sandbox()?;
        let mut client = self.agent(&sandbox)?;
        let (request, what) = if pause {
            (Request::Pause { id: id.to_string() }, "pausing")
        } else {
            (Request::Resume { id: id.to_string() }, "resuming")
        };
        call_ok(&mut client, what, &request).map_err(anyhow::Error::from)?;
        if let Some(container) = lock(&self.containers).get_mut(id) {
            container.paused = pause;
        }
        if pause {
            self.publish(
                "/tasks/paused",
                Box::new(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                "/tasks/resumed",
                Box::new(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }

    fn do_update(&self, req: &UpdateTaskRequest) -> Result<(), ShimError> {
        self.process(&req.id, "")?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        let mut resources = json_any(resources, "resources")?;
        if let Some(map) = resources.as_object_mut() {
            for note in crate::bundle::drop_ignored_resources(map, true) {
                log::warn!("task {}: update: {note}", req.id);
            }
        }
        if crate::host_cgroup::take_block_io(Some(&mut resources)).is_some() {
            return Err(ShimError::InvalidArgument(format!(
                "task {}: update: linux.resources.blockIO is applied to the pod VM's host \
                 cgroup when the pod starts, and cannot be changed",
                req.id
            )));
        }
        let sandbox = self.sandbox()?;
        if let Some(map) = resources.as_object_mut() {
            let notes = crate::sizing::map_cpuset(map, u32::from(sandbox.vcpus))
                .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
            for note in notes {
                log::warn!("task {}: update: {note}", req.id);
            }
        }
        let mut client = self.agent(&sandbox)?;
        call_ok(
            &mut client,
            "updating resources",
            &Request::Update {
                id: req.id.clone(),
                resources,
            },
        )
        .map_err(anyhow::Error::from)?;
        Ok(())
    }

    fn do_resize_pty(&self, req: &ResizePtyRequest) -> Result<(), ShimError> {
        let process = self.process(&req.id, &req.exec_id)?;
        if !process.paths.terminal {
            return Err(ShimError::FailedPrecondition(format!(
                "{} has no terminal",
                process.describe()
            )));
        }
        let sandbox = self.sandbox()?;
        let mut client = self.agent(&sandbox)?;
        call_ok(
            &mut client,
            "resizing the terminal",
            &Request::ResizePty {
                process: process.reference(),
                rows: u16::try_from(req.height).unwrap_or(u16::MAX),
                cols: u16::try_from(req.width).unwrap_or(u16::MAX),
            },
        )
        .map_err(anyhow::Error::from)?;
        Ok(())
    }

    fn do_close_io(&self, req: &CloseIORequest) -> Result<(), ShimError> {
        let process = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            if let Some(io) = lock(&process.io).as_ref() {
                io.close_stdin();
            }
        }
        Ok(())
    }

    /// `Shutdown`: once no container is left (or with `now`), stops the VM and ends the shim.
    /// The reply does not wait for the VM (containerd gives `Shutdown` a few seconds only): the
    /// VM is stopped and its state removed in the background, then the server stops.
    fn do_shutdown(&self, now: bool) -> Result<(), ShimError> {
        if !now && !lock(&self.containers).is_empty() {
            return Ok(());
        }
        // A boot in progress (an early one, see `TaskService::preboot`) finishes first, so that
        // its VM is stopped here rather than left behind by a shim that has gone.
        let sandbox = {
            let _boot = lock(&self.boot);
            lock(&self.sandbox).take()
        };
        let exit = self.exit.clone();
        std::thread::Builder::new()
            .name("husk-shim-shutdown".into())
            .spawn(move || {
                if let Some(sandbox) = sandbox {
                    if let Err(e) = sandbox.shutdown() {
                        log::error!("stopping sandbox {}: {e:#}", sandbox.id);
                    }
                }
                exit.signal();
            })
            .context("cannot start the shutdown thread")?;
        Ok(())
    }
}

fn new_process(
    id: &str,
    exec_id: Option<String>,
    guest_pid: i32,
    paths: IoPaths,
    io: ProcessIo,
) -> Arc<Process> {
    let (exit, _) = watch::channel(None);
    Arc::new(Process {
        container_id: id.to_string(),
        exec_id,
        guest_pid,
        paths,
        status: Mutex::new(ProcStatus::Created),
        exit,
        io: Mutex::new(Some(io)),
    })
}

pub(crate) fn read_spec(bundle: &std::path::Path) -> Result<serde_json::Value, ShimError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ShimError::InvalidArgument(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ShimError::InvalidArgument(format!("{}: invalid JSON: {e}", path.display())))
}

/// Undoes a failed `Create`: the guest container, the share binds, the rootfs mount, and the
/// VM when it was booted for this container.
#[derive(Default)]
struct CreateUndo {
    rootfs: Option<PathBuf>,
    share: Option<PathBuf>,
    guest: Option<(Arc<Sandbox>, String)>,
    sandbox: Option<Arc<Sandbox>>,
}

impl CreateUndo {
    /// Keeps everything (field by field: assigning a whole new value would drop, and so run,
    /// the armed one).
    fn disarm(&mut self) {
        self.rootfs = None;
        self.share = None;
        self.guest = None;
        self.sandbox = None;
    }
}

impl Drop for CreateUndo {
    fn drop(&mut self) {
        if let Some((sandbox, id)) = self.guest.take() {
            if let Ok(mut client) = sandbox.client() {
                let _ = call_ok(
                    &mut client,
                    "removing the container",
                    &Request::RemoveContainer { id },
                );
            }
        }
        if let Some(share) = self.share.take() {
            if let Err(e) = release_container_share(&share) {
                log::warn!("undoing a failed create: {e:#}");
            }
        }
        if let Some(rootfs) = self.rootfs.take() {
            if let Err(e) = unmount_rootfs(&rootfs) {
                log::warn!("undoing a failed create: {e:#}");
            }
        }
        if let Some(sandbox) = self.sandbox.take() {
            if let Err(e) = sandbox.shutdown() {
                log::warn!("undoing a failed create: {e:#}");
            }
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        if !adopt(&self.shared.adoption) {
            return Err(ShimError::FailedPrecondition(format!(
                "create {}: this shim is shutting down: no task came within \
                 {ADOPTION_TIMEOUT:?} of its start",
                req.id
            ))
            .into());
        }
        let (id, began) = (req.id.clone(), Instant::now());
        let pid = self.blocking("create", move |s| s.do_create(&req)).await?;
        log::info!("create {id}: done in {} ms", began.elapsed().as_millis());
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        log::info!("start {} {}", req.id, req.exec_id);
        let (id, began) = (req.id.clone(), Instant::now());
        let pid = self
            .blocking("start", move |s| s.do_start(&req.id, &req.exec_id))
            .await?;
        log::info!("start {id}: done in {} ms", began.elapsed().as_millis());
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        log::info!("delete {} {}", req.id, req.exec_id);
        self.blocking("delete", move |s| s.do_delete(&req.id, &req.exec_id))
            .await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        log::info!("exec {} {}", req.id, req.exec_id);
        self.blocking("exec", move |s| s.do_exec(&req)).await?;
        Ok(Empty::default())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        log::info!(
            "kill {} {} signal {} all {}",
            req.id,
            req.exec_id,
            req.signal,
            req.all
        );
        self.blocking("kill", move |s| s.do_kill(&req)).await?;
        Ok(Empty::default())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.blocking("state", move |s| s.do_state(&req.id, &req.exec_id))
            .await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        self.blocking("pids", move |s| s.do_pids(&req.id)).await
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        self.blocking("stats", move |s| s.do_stats(&req.id)).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        log::info!("pause {}", req.id);
        self.blocking("pause", move |s| s.do_pause(&req.id, true))
            .await?;
        Ok(Empty::default())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        log::info!("resume {}", req.id);
        self.blocking("resume", move |s| s.do_pause(&req.id, false))
            .await?;
        Ok(Empty::default())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        log::info!("update {}", req.id);
        self.blocking("update", move |s| s.do_update(&req)).await?;
        Ok(Empty::default())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.blocking("resize_pty", move |s| s.do_resize_pty(&req))
            .await?;
        Ok(Empty::default())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        log::info!("close_io {} {} stdin {}", req.id, req.exec_id, req.stdin);
        self.blocking("close_io", move |s| s.do_close_io(&req))
            .await?;
        Ok(Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented(format!(
            "checkpoint of {}: husk does not support checkpoint/restore of microVM containers",
            req.id
        ))
        .into())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let process = self
            .shared
            .process(&req.id, &req.exec_id)
            .map_err(ttrpc_error)?;
        let mut exits = process.exit.subscribe();
        let exited = exits
            .wait_for(Option::is_some)
            .await
            .map(|v| *v)
            .ok()
            .flatten()
            .ok_or_else(|| {
                ttrpc_error(ShimError::Internal(anyhow::anyhow!(
                    "the shim stopped waiting for {}",
                    process.describe()
                )))
            })?;
        Ok(WaitResponse {
            exit_status: exited.status,
            exited_at: Some(timestamp(exited.at)).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = lock(&self.shared.sandbox)
            .as_ref()
            .map(|s| host_pid(s))
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        log::info!("shutdown (now: {})", req.now);
        self.blocking("shutdown", move |s| s.do_shutdown(req.now))
            .await?;
        Ok(Empty::default())
    }
}

fn ttrpc_error(err: ShimError) -> containerd_shim::protos::ttrpc::Error {
    err.into()
}

/// The status of the processes a dead VMM took with it: 128 + SIGSYS when its seccomp filter
/// ended it (its report says which call), 128 + SIGKILL otherwise.
fn vmm_end_status(sandbox: &Sandbox) -> u32 {
    if sandbox.dir.vmm_killed_by_seccomp().is_some() {
        husk_vmm::seccomp::SECCOMP_EXIT as u32
    } else {
        128 + libc::SIGKILL as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shim_is_either_adopted_by_a_create_or_abandoned_never_both() {
        let adoption = AtomicU8::new(AWAITING);
        assert!(adopt(&adoption), "the first create adopts");
        assert!(adopt(&adoption), "later creates find it adopted");
        assert!(!abandon(&adoption), "an adopted shim is never abandoned");

        let adoption = AtomicU8::new(AWAITING);
        assert!(abandon(&adoption), "no create in time: abandoned");
        assert!(!adopt(&adoption), "a create after that is refused");
    }

    #[test]
    fn a_disarmed_create_undo_keeps_everything_and_an_armed_one_cleans_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kept = dir.path().join("kept");
        std::fs::create_dir_all(kept.join("rootfs")).expect("mkdir");
        let mut undo = CreateUndo::default();
        undo.share = Some(kept.clone());
        undo.disarm();
        drop(undo);
        assert!(kept.exists(), "disarmed: nothing undone");
        let removed = dir.path().join("removed");
        std::fs::create_dir_all(removed.join("rootfs")).expect("mkdir");
        let mut undo = CreateUndo::default();
        undo.share = Some(removed.clone());
        drop(undo);
        assert!(!removed.exists(), "armed: the share is released");
    }

    #[test]
    fn processes_describe_themselves_and_start_created() {
        let (exit, _) = watch::channel(None);
        let process = Process {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
            guest_pid: 5,
            paths: IoPaths::default(),
            status: Mutex::new(ProcStatus::Created),
            exit,
            io: Mutex::new(None),
        };
        assert_eq!(process.describe(), "exec e1 of c1");
        assert_eq!(*process.status(), ProcStatus::Created);
        assert_eq!(process.exited(), None);
        assert_eq!(
            process.reference(),
            ProcessRef {
                id: "c1".into(),
                exec_id: Some("e1".into())
            }
        );
    }
}
