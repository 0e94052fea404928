//! Wire types and framing of the husk agent protocol, shared by `husk-agent` (in the guest) and
//! the host (`husk-vmm`, the runtime, tests).
//!
//! The agent listens on vsock port [`AGENT_VSOCK_PORT`]. Every message is one frame: a `u32`
//! big-endian body length followed by a JSON body (see [`frame`]). A connection starts with a
//! [`Request::Handshake`] answered by [`Response::Handshake`]; then the host sends requests and
//! reads one response for each.
//!
//! This crate depends only on std and serde: no guest-only code lives here. The host side
//! ([`client`]) treats every reply as untrusted (size limits, timeouts, exact types).

pub mod client;
pub mod frame;

use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use client::{AgentClient, ClientError};
pub use frame::{read_frame, read_frame_bytes, write_frame, FrameError, MAX_FRAME_LEN};

/// Version of the wire protocol. Bumped on every incompatible change; both sides compare it in
/// the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host vsock port the agent connects to once it listens on [`AGENT_VSOCK_PORT`], to say
/// so. husk-vmm holds host connections until then (no polling of a booting guest), refuses the
/// connection itself, and never forwards this port to a host socket.
pub const AGENT_READY_PORT: u32 = 1023;

/// The vsock port on which a guest restored from a template takes its new identity
/// ([`Request::Renew`]). husk-vmm lets host connections to it through while it holds every
/// other one (see [`AGENT_READY_PORT`]), so the restored guest is renewed before any other host
/// client reaches it. The agent serves the whole protocol there, to the host only.
pub const AGENT_IDENTITY_PORT: u32 = 1022;

/// On the kernel command line of a guest booted to become a template: the agent leaves the
/// host share unmounted until it is renewed ([`Request::Renew`]), so that every sandbox
/// restored from the template mounts its own share.
pub const TEMPLATE_CMDLINE_FLAG: &str = "husk.template=1";

/// Test-only: the kernel command-line parameter that arms a fault in the agent,
/// `husk.test_hook=<hook>`. husk-vmm adds it when its environment has
/// `HUSK_VMM_TEST_AGENT_HOOK=<hook>` (and only on a booted guest: a template's command line is
/// fixed). The command line is the host's: nothing in the guest can arm a hook.
pub const TEST_HOOK_PARAM: &str = "husk.test_hook";

/// The one hook [`TEST_HOOK_PARAM`] knows: asked to exec a process whose `args[0]` is
/// [`TEST_EXIT_COMMAND`], the agent exits instead, as if it had crashed. Being the guest's
/// init, its end panics the guest kernel, which ends the VM. The fault tests use it to kill
/// the agent from inside: no container can (none may share the agent's pid namespace).
pub const TEST_HOOK_EXIT_ON_EXEC: &str = "exit-on-exec";

/// The command that trips [`TEST_HOOK_EXIT_ON_EXEC`].
pub const TEST_EXIT_COMMAND: &str = "husk-test-agent-exit";

/// A request from the host to the agent.
///
/// Encoded as a JSON object tagged by `"op"`, e.g. `{"op":"handshake","protocol_version":1}`.
/// The agent answers a request it does not know (a newer host) with [`Response::Error`] and
/// keeps serving the connection.
///
/// Containers: `CreateContainer` prepares the container's init (namespaces, mounts, cgroup,
/// every part of the OCI spec) and leaves it waiting; the host then opens one connection per
/// standard stream and turns each into a raw byte pipe with `AttachStdio`; `StartProcess` lets
/// the process run. `ExecProcess` + `AttachStdio` + `StartProcess` do the same for an extra
/// process in a running container. `WaitProcess` blocks until the process exits, so the host
/// sends it on a connection of its own.
///
/// Identifiers (`id`, `exec_id`) are validated by the agent: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at
/// most 128 bytes. Paths in specs are guest paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First request of a connection; the agent answers with [`Response::Handshake`].
    Handshake {
        /// The protocol version the host speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u32,
    },
    /// Shut the guest down cleanly. The agent replies [`Response::Ok`], then syncs and resets
    /// the VM, which the VMM reports as a clean exit.
    Shutdown,
    /// A guest restored from a template takes its own identity: the kernel's random generator
    /// is reseeded from `entropy`, the wall clock set to `realtime_ns`, the hostname set, and
    /// the host share mounted; then the agent signals readiness on [`AGENT_READY_PORT`] again.
    /// Answered by [`Response::Ok`] once all of it is done.
    Renew(Renewal),
    /// Diagnostics: after the [`Response::Ok`] reply the connection stops carrying frames and
    /// becomes a raw byte echo until the host closes its write side. Tests and benchmarks use
    /// it to push bulk data through vsock.
    Echo,
    /// Create a container from an OCI runtime spec; answered by [`Response::Created`]. The
    /// container's init exists but has not run the user's program yet (OCI `created`).
    CreateContainer(CreateContainer),
    /// Create an extra process in a running container (OCI `exec`), not yet started; answered by
    /// [`Response::Created`].
    ExecProcess(ExecProcess),
    /// After [`Response::Ok`], this connection is the given standard stream of the process.
    AttachStdio(AttachStdio),
    /// Let a created process (the container's init when `exec_id` is `None`) run its program.
    StartProcess(ProcessRef),
    /// Block until the process exits; answered by [`Response::Exited`].
    WaitProcess(ProcessRef),
    /// Send a signal to the process, or with `all` to every process of the container.
    SignalProcess {
        #[serde(flatten)]
        process: ProcessRef,
        signal: i32,
        #[serde(default)]
        all: bool,
    },
    /// Set the size of the process's terminal.
    ResizePty {
        #[serde(flatten)]
        process: ProcessRef,
        rows: u16,
        cols: u16,
    },
    /// Close the process's stdin (the program reads EOF).
    CloseStdin(ProcessRef),
    /// The guest pids of the container's processes; answered by [`Response::Pids`].
    ListProcesses { id: String },
    /// Resource usage from the container's cgroup; answered by [`Response::Stats`].
    Stats { id: String },
    /// Apply new OCI `linux.resources` to the container's cgroup.
    Update {
        id: String,
        /// An OCI `LinuxResources` object.
        resources: serde_json::Value,
    },
    /// Freeze every process of the container (cgroup freezer).
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Remove a stopped container (kills what is left, unmounts, removes its cgroup).
    RemoveContainer { id: String },
    /// Every container the agent knows; answered by [`Response::Containers`].
    ListContainers,
}

/// How long the agent lets a new process's setup take, all of it: its helper's reports while the
/// process is created ([`Request::CreateContainer`], [`Request::ExecProcess`]), and the exec of
/// its program after [`Request::StartProcess`]. Past it the agent answers with an error that
/// says which step did not come.
pub const PROCESS_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the host waits for the reply to a request that sets a process up: the agent's own
/// bound ([`PROCESS_SETUP_TIMEOUT`]) and as much again, so that the agent's error, which names
/// the step, reaches the host before the host gives up. Kata waits 60 s for the same.
pub const SETUP_REPLY_TIMEOUT: Duration = Duration::from_secs(2 * PROCESS_SETUP_TIMEOUT.as_secs());

/// How long the host waits for the reply to a request whose work in the guest waits on the
/// container's processes or its cgroup (freezing, thawing, killing what is left, removing the
/// cgroup); each of those waits is bounded in the agent by a few seconds.
pub const CGROUP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the host waits for the reply to any other request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl Request {
    /// How long the host waits for this request's reply: the agent bounds the work behind every
    /// request, and the host waits longer than that bound, so that under load a slow guest
    /// answers late rather than being taken for a hung one. [`Request::WaitProcess`] is the
    /// exception: it blocks until the process exits, and its caller sets its own timeout.
    pub fn reply_timeout(&self) -> Duration {
        match self {
            Request::CreateContainer(_) | Request::ExecProcess(_) | Request::StartProcess(_) => {
                SETUP_REPLY_TIMEOUT
            }
            Request::Pause { .. }
            | Request::Resume { .. }
            | Request::Update { .. }
            | Request::RemoveContainer { .. }
            | Request::SignalProcess { all: true, .. } => CGROUP_REPLY_TIMEOUT,
            Request::Handshake { .. }
            | Request::Shutdown
            | Request::Renew(_)
            | Request::Echo
            | Request::AttachStdio(_)
            | Request::WaitProcess(_)
            | Request::SignalProcess { all: false, .. }
            | Request::ResizePty { .. }
            | Request::CloseStdin(_)
            | Request::ListProcesses { .. }
            | Request::Stats { .. }
            | Request::ListContainers => REPLY_TIMEOUT,
        }
    }
}

/// [`Request::CreateContainer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainer {
    pub id: String,
    /// The OCI runtime spec (`config.json`), with `root.path` and bind-mount sources as guest
    /// paths.
    pub spec: serde_json::Value,
    /// The bundle directory as seen by the guest (relative paths of the spec resolve here).
    pub bundle: String,
    pub stdio: StdioConfig,
}

/// [`Request::ExecProcess`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProcess {
    pub id: String,
    pub exec_id: String,
    /// An OCI `process` object.
    pub process: serde_json::Value,
    pub stdio: StdioConfig,
}

/// Which standard streams a process gets from the host. With `terminal`, one [`StreamKind::Pty`]
/// stream carries the terminal both ways and the other fields are ignored. A stream not
/// requested is `/dev/null` in the guest. Every requested stream must be attached
/// ([`Request::AttachStdio`]) before [`Request::StartProcess`], which otherwise fails; `terminal`
/// must equal the OCI `process.terminal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioConfig {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdout: bool,
    #[serde(default)]
    pub stderr: bool,
}

/// The new identity of a guest restored from a template ([`Request::Renew`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// Fresh randomness from the host, mixed into the guest's random pool (at least
    /// [`RENEWAL_MIN_ENTROPY`] bytes, at most [`RENEWAL_MAX_ENTROPY`]).
    pub entropy: Vec<u8>,
    /// The host's wall clock (CLOCK_REALTIME), in nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    /// The guest's hostname, if the host has one for it.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The sandbox's network cards, when the template has some: their configuration as the
    /// parameters a booted guest's command line would carry for the agent (`husk.mac=`,
    /// `husk.mtu=`, `husk.ip4=`, `husk.ip6=`, `husk.addr=`, `husk.route=` for `eth0`, named by
    /// [`net_param`] for the others; at most [`RENEWAL_MAX_NETWORK_PARAMS`] of them). The
    /// template's cards have no address and are down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<String>,
}

/// Most network parameters a [`Renewal`] carries: each card's addresses and routes with its
/// MAC, MTU and first address of each family, for up to [`MAX_NET_CARDS`] cards.
pub const RENEWAL_MAX_NETWORK_PARAMS: usize = 32 * MAX_NET_CARDS;

/// The most network cards a sandbox has: one virtio-net card per interface of the network
/// namespace the engine prepared, `eth0`, `eth1`, ... in the guest, in the order of the cards.
pub const MAX_NET_CARDS: usize = 4;

/// The name of the agent's network parameter `key` (`mac`, `mtu`, `ip4`, `ip6`, `addr`,
/// `route`) for card `card`: `husk.<key>` for the first card (`eth0`), `husk.eth<card>.<key>`
/// for the others. Parameters go on a booted guest's command line and in a [`Renewal`].
pub fn net_param(card: usize, key: &str) -> String {
    if card == 0 {
        format!("husk.{key}")
    } else {
        format!("husk.eth{card}.{key}")
    }
}

/// Fewest bytes of entropy a [`Renewal`] carries.
pub const RENEWAL_MIN_ENTROPY: usize = 32;
/// Most bytes of entropy a [`Renewal`] carries.
pub const RENEWAL_MAX_ENTROPY: usize = 512;

/// A container's init (`exec_id: None`) or one of its exec'd processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

/// [`Request::AttachStdio`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachStdio {
    #[serde(flatten)]
    pub process: ProcessRef,
    pub stream: StreamKind,
}

/// One standard stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Host -> guest.
    Stdin,
    /// Guest -> host.
    Stdout,
    /// Guest -> host.
    Stderr,
    /// The terminal, both ways.
    Pty,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when the process exited.
    pub code: Option<i32>,
    /// The signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed it (or a process of its cgroup).
    #[serde(default)]
    pub oom_killed: bool,
}

/// Resource usage of a container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_current_bytes: u64,
    /// `memory.max`, `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// `memory.current` less inactive file pages (what the kubelet calls the working set).
    pub memory_working_set_bytes: u64,
    pub pids_current: u64,
    pub pids_limit: Option<u64>,
    /// `oom_kill` from `memory.events`.
    pub oom_kills: u64,
}

/// OCI status of a container as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

/// One entry of [`Response::Containers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub status: ContainerStatus,
    /// Guest pid of the init process (0 once reaped).
    pub pid: i32,
}

/// A response from the agent to one [`Request`].
///
/// Encoded as a JSON object tagged by `"type"`, e.g. `{"type":"ok"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Handshake`].
    Handshake(Handshake),
    /// The request succeeded and has no result.
    Ok,
    /// A process was created (not started): its guest pid.
    Created { pid: i32 },
    /// A process exited.
    Exited(ExitStatus),
    /// Guest pids.
    Pids { pids: Vec<i32> },
    /// Container resource usage.
    Stats(ContainerStats),
    /// Known containers.
    Containers { containers: Vec<ContainerInfo> },
    /// The request failed (or was not understood); the connection stays usable.
    Error {
        /// What went wrong, for logs and users.
        message: String,
    },
}

impl Response {
    /// A short name of the variant, for error messages (never the untrusted payload).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Handshake(_) => "handshake",
            Response::Ok => "ok",
            Response::Created { .. } => "created",
            Response::Exited(_) => "exited",
            Response::Pids { .. } => "pids",
            Response::Stats(_) => "stats",
            Response::Containers { .. } => "containers",
            Response::Error { .. } => "error",
        }
    }
}

/// What the agent reports about itself and the guest in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The protocol version the agent speaks ([`PROTOCOL_VERSION`] of its build).
    pub protocol_version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// Guest time since boot (`CLOCK_BOOTTIME`), in microseconds, when the handshake was served.
    pub uptime_us: u64,
    /// Online guest CPUs.
    pub cpus: u32,
    /// `MemTotal` of the guest's `/proc/meminfo` (RAM the kernel manages), in KiB.
    pub mem_total_kib: u64,
    /// Sum of the "System RAM" ranges of the guest's `/proc/iomem`: the RAM the VMM gave the
    /// guest, in KiB.
    pub mem_phys_kib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_waits_longer_than_the_agent_lets_a_setup_take() {
        let process = ProcessRef {
            id: "c".into(),
            exec_id: None,
        };
        let setups = [
            Request::CreateContainer(CreateContainer {
                id: "c".into(),
                spec: serde_json::json!({}),
                bundle: "/b".into(),
                stdio: StdioConfig::default(),
            }),
            Request::ExecProcess(ExecProcess {
                id: "c".into(),
                exec_id: "e".into(),
                process: serde_json::json!({}),
                stdio: StdioConfig::default(),
            }),
            Request::StartProcess(process.clone()),
        ];
        for request in &setups {
            assert!(
                request.reply_timeout() > PROCESS_SETUP_TIMEOUT,
                "{request:?} gives up before the agent would"
            );
        }
        let cgroup_work = [
            Request::RemoveContainer { id: "c".into() },
            Request::Pause { id: "c".into() },
            Request::SignalProcess {
                process: process.clone(),
                signal: 9,
                all: true,
            },
        ];
        for request in &cgroup_work {
            assert!(request.reply_timeout() > REPLY_TIMEOUT, "{request:?}");
        }
        let quick = Request::SignalProcess {
            process,
            signal: 9,
            all: false,
        };
        assert_eq!(quick.reply_timeout(), REPLY_TIMEOUT);
        assert_eq!(Request::ListContainers.reply_timeout(), REPLY_TIMEOUT);
    }

    #[test]
    fn each_card_has_parameter_names_of_its_own() {
        assert_eq!(net_param(0, "ip4"), "husk.ip4");
        assert_eq!(net_param(1, "route"), "husk.eth1.route");
        assert_eq!(net_param(MAX_NET_CARDS - 1, "mac"), "husk.eth3.mac");
        // No card's name is the start of another's (`husk.eth1.` is not `husk.eth10.`'s).
        let names: Vec<String> = (0..MAX_NET_CARDS).map(|c| net_param(c, "mtu")).collect();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                assert!(
                    !a.starts_with(b.as_str()) && !b.starts_with(a.as_str()),
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn request_json_is_tagged_by_op() {
        let json = serde_json::to_string(&Request::Handshake {
            protocol_version: 1,
        })
        .expect("serializable");
        assert_eq!(json, r#"{"op":"handshake","protocol_version":1}"#);
        assert_eq!(
            serde_json::to_string(&Request::Shutdown).expect("serializable"),
            r#"{"op":"shutdown"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"echo"}"#).expect("valid"),
            Request::Echo
        );
    }

    #[test]
    fn container_requests_have_stable_json() {
        let signal = Request::SignalProcess {
            process: ProcessRef {
                id: "web".into(),
                exec_id: None,
            },
            signal: 15,
            all: true,
        };
        let json = serde_json::to_string(&signal).expect("serializable");
        assert_eq!(
            json,
            r#"{"op":"signal_process","id":"web","signal":15,"all":true}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&json).expect("valid"),
            signal
        );
        let attach = Request::AttachStdio(AttachStdio {
            process: ProcessRef {
                id: "web".into(),
                exec_id: Some("e1".into()),
            },
            stream: StreamKind::Stdout,
        });
        let json = serde_json::to_string(&attach).expect("serializable");
        assert_eq!(
            json,
            r#"{"op":"attach_stdio","id":"web","exec_id":"e1","stream":"stdout"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&json).expect("valid"),
            attach
        );
        let exited = Response::Exited(ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: false,
        });
        let json = serde_json::to_string(&exited).expect("serializable");
        assert_eq!(
            serde_json::from_str::<Response>(&json).expect("valid"),
            exited
        );
    }

    #[test]
    fn unknown_request_op_fails_to_decode() {
        let err =
            serde_json::from_str::<Request>(r#"{"op":"create","id":"x"}"#).expect_err("unknown op");
        assert!(err.to_string().contains("unknown variant"), "{err}");
    }

    #[test]
    fn handshake_response_round_trips_flat() {
        let resp = Response::Handshake(Handshake {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
            uptime_us: 12,
            cpus: 2,
            mem_total_kib: 100,
            mem_phys_kib: 128,
        });
        let json = serde_json::to_string(&resp).expect("serializable");
        assert_eq!(
            json,
            r#"{"type":"handshake","protocol_version":1,"agent_version":"0.1.0","uptime_us":12,"cpus":2,"mem_total_kib":100,"mem_phys_kib":128}"#
        );
        assert_eq!(
            serde_json::from_str::<Response>(&json).expect("valid"),
            resp
        );
        assert_eq!(
            serde_json::to_string(&Response::Error {
                message: "no".into()
            })
            .expect("serializable"),
            r#"{"type":"error","message":"no"}"#
        );
    }
}
