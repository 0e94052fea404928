//! Can this host run husk guests? Used by `husk check`, by the builder's error messages and
//! by tests that decide whether to boot real VMs.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;

use kvm_ioctls::Kvm;

/// The KVM API version every supported kernel reports.
pub const KVM_API_VERSION: i32 = 12;

/// Why this host's KVM is unusable, in one sentence.
pub const KVM_PVM_REASON: &str = "this host's KVM is kvm_pvm, a paravirtual nested KVM that \
     cannot run a Linux guest's user space; use the test rig (cargo xtask rig)";

/// State of /dev/kvm.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DevKvm {
    /// Opened read/write.
    Accessible,
    /// Not there.
    Absent,
    /// Present but not accessible to this user.
    PermissionDenied,
    /// Open failed for another reason (the message).
    Error(String),
}

/// Hardware virtualization flag of the host CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VirtFlag {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
}

/// The verdict.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum KvmUsability {
    /// husk can run guests here.
    Usable,
    /// It cannot, and why.
    Unusable(String),
}

/// What [`check_host`] found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostReport {
    /// /dev/kvm state.
    pub dev_kvm: DevKvm,
    /// KVM_GET_API_VERSION, when /dev/kvm could be opened.
    pub api_version: Option<i32>,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm: bool,
    /// vmx/svm in /proc/cpuinfo.
    pub virt_flag: Option<VirtFlag>,
    /// Overall verdict.
    pub usability: KvmUsability,
}

impl HostReport {
    /// A human-readable multi-line summary.
    pub fn message(&self) -> String {
        let dev = match &self.dev_kvm {
            DevKvm::Accessible => "accessible".to_string(),
            DevKvm::Absent => "absent".to_string(),
            DevKvm::PermissionDenied => "permission denied".to_string(),
            DevKvm::Error(e) => format!("error: {e}"),
        };
        let api = self
            .api_version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        let flag = match self.virt_flag {
            Some(VirtFlag::Vmx) => "vmx (Intel VT-x)",
            Some(VirtFlag::Svm) => "svm (AMD-V)",
            None => "none",
        };
        let verdict = match &self.usability {
            KvmUsability::Usable => "usable: husk can run microVMs on this host".to_string(),
            KvmUsability::Unusable(why) => format!("NOT usable: {why}"),
        };
        format!(
            "/dev/kvm: {dev}\nKVM API version: {api}\nkvm_pvm module: {}\nCPU virtualization flag: {flag}\nverdict: {verdict}",
            if self.kvm_pvm { "loaded" } else { "not loaded" }
        )
    }
}

/// Classifies an error opening /dev/kvm.
pub fn classify_open_error(kind: ErrorKind, message: String) -> DevKvm {
    match kind {
        ErrorKind::NotFound => DevKvm::Absent,
        ErrorKind::PermissionDenied => DevKvm::PermissionDenied,
        _ => DevKvm::Error(message),
    }
}

/// Finds vmx or svm among the `flags` lines of /proc/cpuinfo.
pub fn parse_virt_flag(cpuinfo: &str) -> Option<VirtFlag> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
        .find_map(|f| match f {
            "vmx" => Some(VirtFlag::Vmx),
            "svm" => Some(VirtFlag::Svm),
            _ => None,
        })
}

/// The verdict from the facts. The CPU flag is informational: a nested guest may have working
/// KVM without advertising vmx/svm.
pub fn verdict(dev_kvm: &DevKvm, api_version: Option<i32>, kvm_pvm: bool) -> KvmUsability {
    let unusable = |s: &str| KvmUsability::Unusable(s.to_string());
    match dev_kvm {
        DevKvm::Absent => {
            return unusable(
                "/dev/kvm does not exist (KVM module not loaded, or no hardware virtualization)",
            )
        }
        DevKvm::PermissionDenied => {
            return unusable("/dev/kvm is not accessible to this user (add it to the kvm group)")
        }
        DevKvm::Error(e) => return KvmUsability::Unusable(format!("cannot open /dev/kvm: {e}")),
        DevKvm::Accessible => {}
    }
    if kvm_pvm {
        return unusable(KVM_PVM_REASON);
    }
    match api_version {
        Some(KVM_API_VERSION) => KvmUsability::Usable,
        Some(v) => KvmUsability::Unusable(format!(
            "KVM API version {v} is not the supported {KVM_API_VERSION}"
        )),
        None => unusable("the KVM API version could not be read"),
    }
}

/// Whether the `kvm_pvm` module is loaded.
pub fn kvm_pvm_loaded() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Inspects this host.
pub fn check_host() -> HostReport {
    let (dev_kvm, api_version) = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => {
            let api = Kvm::new().ok().map(|kvm| kvm.get_api_version());
            (DevKvm::Accessible, api)
        }
        Err(e) => (classify_open_error(e.kind(), e.to_string()), None),
    };
    let kvm_pvm = kvm_pvm_loaded();
    let virt_flag = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| parse_virt_flag(&c));
    let usability = verdict(&dev_kvm, api_version, kvm_pvm);
    HostReport {
        dev_kvm,
        api_version,
        kvm_pvm,
        virt_flag,
        usability,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr vmx smx est\nbugs\t\t: spectre_v1\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm extapic\n";
    const NONE: &str =
        "processor\t: 0\nflags\t\t: fpu vme hypervisor\nbugs\t\t: svm_in_bugs_line_is_ignored\n";

    #[test]
    fn cpu_flags_are_parsed() {
        assert_eq!(parse_virt_flag(INTEL), Some(VirtFlag::Vmx));
        assert_eq!(parse_virt_flag(AMD), Some(VirtFlag::Svm));
        assert_eq!(parse_virt_flag(NONE), None);
    }

    #[test]
    fn open_errors_are_classified() {
        assert_eq!(
            classify_open_error(ErrorKind::NotFound, String::new()),
            DevKvm::Absent
        );
        assert_eq!(
            classify_open_error(ErrorKind::PermissionDenied, String::new()),
            DevKvm::PermissionDenied
        );
        assert_eq!(
            classify_open_error(ErrorKind::Other, "busy".into()),
            DevKvm::Error("busy".into())
        );
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(&DevKvm::Accessible, Some(12), false),
            KvmUsability::Usable
        );
        assert_eq!(
            verdict(&DevKvm::Accessible, Some(12), true),
            KvmUsability::Unusable(KVM_PVM_REASON.to_string())
        );
        assert!(
            matches!(verdict(&DevKvm::Absent, None, false), KvmUsability::Unusable(m) if m.contains("does not exist"))
        );
        assert!(
            matches!(verdict(&DevKvm::PermissionDenied, None, false), KvmUsability::Unusable(m) if m.contains("not accessible"))
        );
        assert!(
            matches!(verdict(&DevKvm::Accessible, Some(11), false), KvmUsability::Unusable(m) if m.contains("11"))
        );
    }

    #[test]
    fn host_report_is_consistent() {
        let report = check_host();
        assert_eq!(
            report.usability,
            verdict(&report.dev_kvm, report.api_version, report.kvm_pvm)
        );
        assert_eq!(
            report.api_version.is_some(),
            report.dev_kvm == DevKvm::Accessible
        );
    }

    #[test]
    fn message_names_the_verdict() {
        let report = HostReport {
            dev_kvm: DevKvm::Accessible,
            api_version: Some(12),
            kvm_pvm: true,
            virt_flag: None,
            usability: verdict(&DevKvm::Accessible, Some(12), true),
        };
        let msg = report.message();
        assert!(msg.contains("kvm_pvm module: loaded"));
        assert!(msg.contains("NOT usable: this host's KVM is kvm_pvm"));
    }
}
