//! VM sizing from the spec.
//!
//! Memory: the annotation `io.husk.vm.mem_mib` if set; else the container's memory limit
//! (`linux.resources.memory.limit`) rounded up to MiB plus [`MEM_OVERHEAD_MIB`] for the guest
//! kernel, the agent and page cache; else the configured default. Guest memory is mapped
//! `MAP_NORESERVE`, so a large size costs the host only what the guest touches.
//!
//! vCPUs: the annotation `io.husk.vm.cpus` if set; else the smaller of the CPU quota
//! (`ceil(quota / period)`) and the number of CPUs in `linux.resources.cpu.cpus`, when given;
//! else the configured default. Always at least 1, at most the VMM's limit and the host's CPUs.

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
    let bad = || SizingError::BadCpuset(list.to_string());
    let mut count = 0u32;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad())?;
                let b: u32 = b.trim().parse().map_err(|_| bad())?;
                if b < a {
                    return Err(bad());
                }
                count = count.saturating_add(b - a + 1);
            }
            None => {
                part.parse::<u32>().map_err(|_| bad())?;
                count = count.saturating_add(1);
            }
        }
    }
    Ok(count)
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
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => u32::from(cfg.default_vcpus),
            }
        }
    };
    let cap = u32::from(MAX_VCPUS).min(host_cpus.max(1));
    let vcpus = u8::try_from(vcpus.clamp(1, cap)).unwrap_or(1);
    Ok(VmSize { vcpus, mem_mib })
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
        let both = json!({"linux": {"resources": {"cpu": {"quota": 100000, "cpus": "0-3"}}}});
        assert_eq!(size(both).vcpus, 1);
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
