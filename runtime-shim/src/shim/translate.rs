//! Conversions at the containerd boundary: agent results to containerd's API types (status,
//! exit codes, cgroup v2 metrics, timestamps) and shim errors to ttrpc status codes.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::ttrpc;
use husk_agent_protocol::{ContainerStats, ExitStatus};
use std::time::SystemTime;

/// The type URL containerd's typeurl registry knows cgroup v2 metrics by.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Errors the Task service returns; each maps to the gRPC code containerd turns into its
/// `errdefs` kind.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> ttrpc::Error {
        let code = match &err {
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            ShimError::Internal(_) => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, err.to_string()))
    }
}

/// A protobuf timestamp.
pub fn timestamp(at: SystemTime) -> Timestamp {
    Timestamp::from(at)
}

/// The exit status containerd records: the code, or 128 + the signal (as runc's shim does).
pub fn exit_status_code(status: &ExitStatus) -> u32 {
    u32::try_from(husk_vmm::supervisor::exit_code_of(status)).unwrap_or(255)
}

/// The guest cgroup's usage as containerd's cgroup v2 metrics. `memory.usage` is the cgroup's
/// `memory.current`; `inactive_file` is what makes containerd's (and the kubelet's) working set,
/// `usage - inactive_file`, equal the agent's working set.
pub fn metrics(stats: &ContainerStats) -> Metrics {
    let inactive_file = stats
        .memory_current_bytes
        .saturating_sub(stats.memory_working_set_bytes);
    Metrics {
        pids: Some(PidsStat {
            current: stats.pids_current,
            limit: stats.pids_limit.unwrap_or(0),
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: stats.cpu_usage_usec,
            user_usec: stats.cpu_user_usec,
            system_usec: stats.cpu_system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: stats.memory_current_bytes,
            usage_limit: stats.memory_limit_bytes.unwrap_or(u64::MAX),
            inactive_file,
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            oom_kill: stats.oom_kills,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Packs metrics into the `Any` a `StatsResponse` carries.
pub fn metrics_any(metrics: &Metrics) -> Result<Any, ShimError> {
    Ok(Any {
        type_url: METRICS_V2_TYPE_URL.to_string(),
        value: metrics
            .write_to_bytes()
            .map_err(|e| ShimError::Internal(anyhow::anyhow!("encoding metrics: {e}")))?,
        ..Default::default()
    })
}

/// The namespaces a pod member shares with its sandbox when its spec names one by path:
/// OCI type -> `/proc/<pid>/ns/<name>`. The mount namespace is always the container's own.
const SHARED_NAMESPACES: &[(&str, &str)] = &[
    ("network", "net"),
    ("ipc", "ipc"),
    ("uts", "uts"),
    ("pid", "pid"),
    ("cgroup", "cgroup"),
];

/// Points a pod member's namespaces at its sandbox container's in the guest: every namespace
/// of `original` (the spec containerd wrote) given by a host path (the pause container's
/// `/proc/<pid>/ns/...`, a CNI netns) becomes the sandbox init's `/proc/<sandbox_pid>/ns/...`
/// in `translated` (where [`translate_spec`](crate::bundle::translate_spec) dropped the host
/// paths). Joining a user or mount namespace is refused.
pub fn join_sandbox_namespaces(
    original: &serde_json::Value,
    translated: &mut serde_json::Value,
    sandbox_pid: i32,
) -> Result<(), ShimError> {
    let Some(wanted) = original["linux"]["namespaces"].as_array() else {
        return Ok(());
    };
    let Some(namespaces) = translated["linux"]
        .get_mut("namespaces")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return Ok(());
    };
    for ns in wanted {
        let Some(kind) = ns["type"].as_str() else {
            continue;
        };
        if ns["path"].as_str().unwrap_or("").is_empty() {
            continue;
        }
        let name = SHARED_NAMESPACES
            .iter()
            .find(|(t, _)| *t == kind)
            .map(|(_, name)| *name)
            .ok_or_else(|| {
                ShimError::InvalidArgument(format!(
                    "joining a {kind} namespace by path is not supported in a husk pod"
                ))
            })?;
        for entry in namespaces.iter_mut() {
            if entry["type"].as_str() == Some(kind) {
                entry["path"] = serde_json::Value::String(format!("/proc/{sandbox_pid}/ns/{name}"));
            }
        }
    }
    Ok(())
}

/// Gives a sandbox's own container (a pod's pause container, or a container that is its own
/// sandbox) the VM's network namespace instead of a new one: the microVM is the pod's network,
/// its loopback is up, and a pod member joins it through the sandbox init. Returns whether the
/// spec asked for a network namespace.
pub fn use_vm_network(spec: &mut serde_json::Value) -> bool {
    let Some(namespaces) = spec["linux"]
        .get_mut("namespaces")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return false;
    };
    let before = namespaces.len();
    namespaces.retain(|ns| ns["type"].as_str() != Some("network"));
    namespaces.len() != before
}

/// CRI annotations (containerd 1.7 and later) with the pod's summed resources.
pub const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The spec the sandbox VM is sized from: the sandbox container's, with the pod's memory limit
/// and CPU quota from the CRI sandbox annotations where the spec sets none (a pause container
/// has no limits of its own). `io.husk.vm.*` annotations still win in
/// [`size_vm`](crate::sizing::size_vm).
pub fn sizing_spec(spec: &serde_json::Value) -> Result<serde_json::Value, ShimError> {
    let mut sized = spec.clone();
    let number = |key: &str| -> Result<Option<i64>, ShimError> {
        match spec["annotations"][key].as_str() {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(|n| (n > 0).then_some(n))
                .map_err(|_| {
                    ShimError::InvalidArgument(format!(
                        "annotation {key}={v:?}: expected an integer"
                    ))
                }),
        }
    };
    let resources = &spec["linux"]["resources"];
    if let Some(memory) = number(ANNOTATION_SANDBOX_MEMORY)? {
        if resources["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .is_none()
        {
            sized["linux"]["resources"]["memory"]["limit"] = memory.into();
        }
    }
    if let Some(quota) = number(ANNOTATION_SANDBOX_CPU_QUOTA)? {
        if resources["cpu"]["quota"]
            .as_i64()
            .filter(|q| *q > 0)
            .is_none()
        {
            sized["linux"]["resources"]["cpu"]["quota"] = quota.into();
            if let Some(period) = number(ANNOTATION_SANDBOX_CPU_PERIOD)? {
                sized["linux"]["resources"]["cpu"]["period"] = period.into();
            }
        }
    }
    Ok(sized)
}

/// Decodes an `Any` holding JSON (containerd's typeurl encodes OCI types such as
/// `specs.Process` and `specs.LinuxResources` as JSON).
pub fn json_any(any: &Any, what: &str) -> Result<serde_json::Value, ShimError> {
    serde_json::from_slice(&any.value).map_err(|e| {
        ShimError::InvalidArgument(format!("{what} ({}): invalid JSON: {e}", any.type_url))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_runc() {
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: false,
        };
        assert_eq!(exit_status_code(&killed), 137);
        let code = ExitStatus {
            code: Some(3),
            signal: None,
            oom_killed: false,
        };
        assert_eq!(exit_status_code(&code), 3);
    }

    #[test]
    fn metrics_carry_the_working_set_and_round_trip() {
        let stats = ContainerStats {
            cpu_usage_usec: 10,
            cpu_user_usec: 6,
            cpu_system_usec: 4,
            memory_current_bytes: 1000,
            memory_limit_bytes: Some(4096),
            memory_working_set_bytes: 700,
            pids_current: 2,
            pids_limit: None,
            oom_kills: 1,
        };
        let m = metrics(&stats);
        let memory = m.memory.as_ref().expect("memory");
        assert_eq!(memory.usage - memory.inactive_file, 700);
        assert_eq!(memory.usage_limit, 4096);
        assert_eq!(m.pids.as_ref().expect("pids").current, 2);
        assert_eq!(m.cpu.as_ref().expect("cpu").usage_usec, 10);
        let any = metrics_any(&m).expect("packed");
        assert_eq!(any.type_url, METRICS_V2_TYPE_URL);
        let back = Metrics::parse_from_bytes(&any.value).expect("decodes");
        assert_eq!(back, m);
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        let err: ttrpc::Error = ShimError::NotFound("no such task".into()).into();
        match err {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(status.message(), "no such task");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn pod_members_join_the_sandbox_namespaces_they_name() {
        let original = serde_json::json!({"linux": {"namespaces": [
            {"type": "mount"},
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
        ]}});
        let mut translated = serde_json::json!({"linux": {"namespaces": [
            {"type": "mount"},
            {"type": "pid"},
            {"type": "network"},
            {"type": "ipc"},
            {"type": "uts"},
        ]}});
        join_sandbox_namespaces(&original, &mut translated, 7).expect("joined");
        assert_eq!(
            translated["linux"]["namespaces"],
            serde_json::json!([
                {"type": "mount"},
                {"type": "pid"},
                {"type": "network", "path": "/proc/7/ns/net"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
            ])
        );
        let user = serde_json::json!({"linux": {"namespaces": [
            {"type": "user", "path": "/proc/1/ns/user"},
        ]}});
        assert!(matches!(
            join_sandbox_namespaces(&user, &mut translated, 7),
            Err(ShimError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_sandbox_container_uses_the_vm_network() {
        let mut spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
        ]}});
        assert!(use_vm_network(&mut spec));
        assert_eq!(
            spec["linux"]["namespaces"],
            serde_json::json!([{"type": "mount"}])
        );
        assert!(!use_vm_network(&mut spec));
        assert!(!use_vm_network(&mut serde_json::json!({})));
    }

    #[test]
    fn pod_resources_from_cri_annotations_size_the_vm() {
        let spec = serde_json::json!({
            "annotations": {
                ANNOTATION_SANDBOX_MEMORY: "268435456",
                ANNOTATION_SANDBOX_CPU_QUOTA: "150000",
                ANNOTATION_SANDBOX_CPU_PERIOD: "100000",
            },
            "linux": {"resources": {}},
        });
        let sized = sizing_spec(&spec).expect("valid");
        assert_eq!(sized["linux"]["resources"]["memory"]["limit"], 268435456);
        assert_eq!(sized["linux"]["resources"]["cpu"]["quota"], 150000);
        let size = crate::sizing::size_vm(&sized, &crate::config::HuskConfig::default(), 8)
            .expect("sized");
        assert_eq!(size.mem_mib, 256 + crate::sizing::MEM_OVERHEAD_MIB);
        assert_eq!(size.vcpus, 2);
        let own_limit = serde_json::json!({
            "annotations": {ANNOTATION_SANDBOX_MEMORY: "268435456"},
            "linux": {"resources": {"memory": {"limit": 1048576}}},
        });
        assert_eq!(
            sizing_spec(&own_limit).expect("valid")["linux"]["resources"]["memory"]["limit"],
            1048576
        );
        let bad = serde_json::json!({"annotations": {ANNOTATION_SANDBOX_MEMORY: "lots"}});
        assert!(matches!(
            sizing_spec(&bad),
            Err(ShimError::InvalidArgument(_))
        ));
    }

    #[test]
    fn json_anys_decode_or_say_why_not() {
        let any = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["sh"]}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(json_any(&any, "spec").expect("json")["args"][0], "sh");
        let bad = Any {
            value: b"\x08\x01".to_vec(),
            ..any
        };
        assert!(matches!(
            json_any(&bad, "spec"),
            Err(ShimError::InvalidArgument(_))
        ));
    }
}
