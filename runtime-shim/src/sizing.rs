//! VM sizing from the spec.
//!
//! Memory: the annotation `io.husk.vm.mem_mib` if set; else the container's memory limit
//! (`linux.resources.memory.limit`) rounded up to MiB plus [`MEM_OVERHEAD_MIB`] for the guest
//! kernel, the agent and page cache; else the configured default. Guest memory is mapped
//! `MAP_NORESERVE`, so a large size costs the host only what the guest touches.
//!
//! vCPUs: the annotation `io.husk.vm.cpus` if set; else the number of CPUs in
//! `linux.resources.cpu.cpus` when given (so that the guest has a CPU for each CPU of the
//! cpuset; the quota still limits how much of them the container uses); else the CPU quota
//! (`ceil(quota / period)`); else the configured default. Always at least 1, at most the VMM's
//! limit and the host's CPUs.
//!
//! CPU sets ([`map_cpuset`]): the guest numbers its CPUs 0..n. The k-th CPU of the host cpuset
//! (in ascending order) is the guest's CPU k, so the container's guest cgroup gets `0-(n-1)`
//! for a cpuset of n CPUs (fewer when the VM has fewer vCPUs), and `cpuset.mems` becomes `0`,
//! the guest's one memory node. The `husk` CLI pins the container's `husk-vmm` (its vCPU
//! threads) to the host cpuset, so the workload runs on the CPUs asked for.

use crate::config::HuskConfig;
use husk_vmm::arch::layout::MAX_VCPUS;
use husk_vmm::config::MIN_MEM_MIB;
use serde_json::Value;

/// Annotation that sets the guest memory in MiB.
pub const ANNOTATION_MEM_MIB: &str = "io.husk.vm.mem_mib";
/// Annotation that sets the number of vCPUs.
pub const ANNOTATION_CPUS: &str = "io.husk.vm.cpus";
/// Guest memory added to a container's memory limit: the guest kernel (~20 MiB with its page
/// tables and slab), the agent, and room for page cache so that the limit, not the VM, is what
/// the container hits first.
pub const MEM_OVERHEAD_MIB: u32 = 64;

/// Errors of sizing.
#[derive(Debug, thiserror::Error)]
pub enum SizingError {
    #[error("annotation {key}={value:?}: expected a positive integer")]
    BadAnnotation { key: &'static str, value: String },
    #[error("linux.resources.cpu.cpus {0:?}: not a CPU list")]
    BadCpuset(String),
}

/// The VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub mem_mib: u32,
}

fn annotation(spec: &Value, key: &'static str) -> Result<Option<u64>, SizingError> {
    match spec["annotations"][key].as_str() {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .map(Some)
            .ok_or_else(|| SizingError::BadAnnotation {
                key,
                value: value.to_string(),
            }),
    }
}

/// Counts the CPUs of a cpuset list like `0-3,6`.
pub fn count_cpuset(list: &str) -> Result<u32, SizingError> {
    Ok(parse_cpuset(list)?.len() as u32)
}

/// Sizes the VM for `spec` (see the module docs); `host_cpus` caps the vCPUs.
pub fn size_vm(spec: &Value, cfg: &HuskConfig, host_cpus: u32) -> Result<VmSize, SizingError> {
    let resources = &spec["linux"]["resources"];
    let mem_mib = match annotation(spec, ANNOTATION_MEM_MIB)? {
        Some(mib) => u32::try_from(mib).unwrap_or(u32::MAX),
        None => match resources["memory"]["limit"].as_i64().filter(|l| *l > 0) {
            Some(limit) => {
                let mib = (limit as u64).div_ceil(1024 * 1024);
                u32::try_from(mib)
                    .unwrap_or(u32::MAX)
                    .saturating_add(MEM_OVERHEAD_MIB)
            }
            None => cfg.default_mem_mib,
        },
    }
    .max(MIN_MEM_MIB);
    let vcpus = match annotation(spec, ANNOTATION_CPUS)? {
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        None => {
            let cpu = &resources["cpu"];
            let quota = cpu["quota"].as_i64().filter(|q| *q > 0);
            let period = cpu["period"].as_u64().filter(|p| *p > 0).unwrap_or(100_000);
            let from_quota = quota.map(|q| (q as u64).div_ceil(period) as u32);
            let from_cpuset = match cpu["cpus"].as_str().filter(|s| !s.trim().is_empty()) {
                Some(list) => Some(count_cpuset(list)?),
                None => None,
            };
            match (from_quota, from_cpuset) {
                (_, Some(n)) | (Some(n), None) => n,
                (None, None) => u32::from(cfg.default_vcpus),
            }
        }
    };
    let cap = u32::from(MAX_VCPUS).min(host_cpus.max(1));
    let vcpus = u8::try_from(vcpus.clamp(1, cap)).unwrap_or(1);
    Ok(VmSize { vcpus, mem_mib })
}

/// The CPUs of a cpuset list like `0-3,6`, ascending, without repeats.
pub fn parse_cpuset(list: &str) -> Result<Vec<u32>, SizingError> {
    let bad = || SizingError::BadCpuset(list.to_string());
    let mut cpus = std::collections::BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        // Bounded like the kernel's own limit, so that "0-4000000000" cannot eat memory.
        if b < a || b >= 8192 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus.into_iter().collect())
}

/// Rewrites `cpu.cpus` and `cpu.mems` of `resources` (OCI `linux.resources`) from host to
/// guest numbering for a VM of `vcpus` vCPUs (see the module docs); returns a note for the log
/// when something could not be kept as asked.
pub fn map_cpuset(
    resources: &mut serde_json::Map<String, Value>,
    vcpus: u32,
) -> Result<Vec<String>, SizingError> {
    let mut notes = Vec::new();
    let Some(cpu) = resources.get_mut("cpu").and_then(Value::as_object_mut) else {
        return Ok(notes);
    };
    if let Some(list) = cpu
        .get("cpus")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
    {
        let host = parse_cpuset(&list)?;
        let n = (host.len() as u32).min(vcpus.max(1));
        if (host.len() as u32) > n {
            notes.push(format!(
                "linux.resources.cpu.cpus {list}: the microVM has {n} vCPUs, so the container \
                 gets guest CPUs 0-{} for these {} host CPUs",
                n - 1,
                host.len()
            ));
        }
        let guest = if n == 1 {
            "0".to_string()
        } else {
            format!("0-{}", n - 1)
        };
        cpu.insert("cpus".into(), Value::String(guest));
    }
    if let Some(mems) = cpu
        .get("mems")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
    {
        if mems.trim() != "0" {
            notes.push(format!(
                "linux.resources.cpu.mems {mems}: the guest has one memory node, node 0"
            ));
        }
        cpu.insert("mems".into(), Value::String("0".into()));
    }
    Ok(notes)
}

/// Online CPUs of the host.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size(spec: Value) -> VmSize {
        size_vm(&spec, &HuskConfig::default(), 8).expect("sized")
    }

    #[test]
    fn defaults_apply_without_limits() {
        assert_eq!(
            size(json!({})),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
    }

    #[test]
    fn memory_limit_adds_the_overhead() {
        let spec = json!({"linux": {"resources": {"memory": {"limit": 100 * 1024 * 1024 + 1}}}});
        assert_eq!(size(spec).mem_mib, 101 + MEM_OVERHEAD_MIB);
    }

    #[test]
    fn cpu_quota_and_cpuset_give_vcpus() {
        let quota = json!({"linux": {"resources": {"cpu": {"quota": 150000, "period": 100000}}}});
        assert_eq!(size(quota).vcpus, 2);
        let cpuset = json!({"linux": {"resources": {"cpu": {"cpus": "0-2,5"}}}});
        assert_eq!(size(cpuset).vcpus, 4);
        // --cpus 0.5 --cpuset-cpus 0-1: a guest CPU for each CPU of the set, the quota kept.
        let both = json!({"linux": {"resources": {"cpu": {"quota": 50000, "cpus": "0-1"}}}});
        assert_eq!(size(both).vcpus, 2);
        let many = json!({"linux": {"resources": {"cpu": {"cpus": "0-63"}}}});
        assert_eq!(size(many).vcpus, 8, "capped at the host's CPUs");
    }

    #[test]
    fn annotations_win() {
        let spec = json!({
            "annotations": {"io.husk.vm.mem_mib": "1024", "io.husk.vm.cpus": "3"},
            "linux": {"resources": {"memory": {"limit": 1048576}}}
        });
        assert_eq!(
            size(spec),
            VmSize {
                vcpus: 3,
                mem_mib: 1024
            }
        );
        let bad = json!({"annotations": {"io.husk.vm.cpus": "many"}});
        assert!(matches!(
            size_vm(&bad, &HuskConfig::default(), 8),
            Err(SizingError::BadAnnotation {
                key: ANNOTATION_CPUS,
                ..
            })
        ));
    }

    #[test]
    fn cpusets_map_to_guest_cpus() {
        let map = |cpu: Value, vcpus: u32| {
            let mut resources = json!({ "cpu": cpu });
            let notes =
                map_cpuset(resources.as_object_mut().expect("object"), vcpus).expect("valid");
            (resources["cpu"].clone(), notes)
        };
        // --cpuset-cpus=1: one vCPU, the guest's CPU 0.
        let (cpu, notes) = map(json!({"cpus": "1"}), 1);
        assert_eq!(cpu["cpus"], "0");
        assert!(notes.is_empty());
        let (cpu, _) = map(json!({"cpus": "0-1", "quota": 50000, "period": 100000}), 2);
        assert_eq!(
            cpu,
            json!({"cpus": "0-1", "quota": 50000, "period": 100000})
        );
        let (cpu, _) = map(json!({"cpus": "2,5,7", "mems": "0"}), 3);
        assert_eq!(cpu, json!({"cpus": "0-2", "mems": "0"}));
        let (cpu, notes) = map(json!({"cpus": "0-7", "mems": "1"}), 2);
        assert_eq!(cpu, json!({"cpus": "0-1", "mems": "0"}));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("has 2 vCPUs"), "{notes:?}");
        let (cpu, notes) = map(json!({"shares": 512}), 2);
        assert_eq!(cpu, json!({"shares": 512}));
        assert!(notes.is_empty());
        let mut bad = json!({"cpu": {"cpus": "3-1"}});
        assert!(map_cpuset(bad.as_object_mut().expect("object"), 2).is_err());
    }

    #[test]
    fn cpuset_lists_are_parsed() {
        assert_eq!(parse_cpuset("5,0-2, 2").expect("valid"), [0, 1, 2, 5]);
        assert!(parse_cpuset("0-99999").is_err(), "bounded");
        assert!(parse_cpuset("").expect("empty").is_empty());
    }

    #[test]
    fn cpuset_lists_are_counted() {
        assert_eq!(count_cpuset("0").expect("valid"), 1);
        assert_eq!(count_cpuset("0-3,6, 8-9").expect("valid"), 7);
        assert!(matches!(
            count_cpuset("3-1"),
            Err(SizingError::BadCpuset(_))
        ));
        assert!(matches!(count_cpuset("x"), Err(SizingError::BadCpuset(_))));
    }
}
