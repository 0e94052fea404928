//! Translation of an OCI runtime spec into a [`Plan`]: everything the container's init process
//! has to do, already checked and in kernel terms (mount flags, rlimit resources, capability
//! numbers, seccomp BPF). The translation runs in the agent, so a bad spec fails the create
//! request before any process exists; the plan then travels to the init helper as JSON.

use super::seccomp::{self, SockFilter};
use nix::mount::MsFlags;
use oci_spec::runtime::{
    LinuxCapabilities, LinuxDevice, LinuxDeviceType, LinuxNamespaceType, PosixRlimitType, Process,
    Spec,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

/// Most entries of any list in a spec (mounts, env, args, rules, ...): bounds what the host can
/// make the agent do.
pub const MAX_LIST_LEN: usize = 4096;

/// Errors of translating a spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The JSON is not an OCI spec (or process).
    #[error("invalid OCI {what}: {message}")]
    Invalid { what: &'static str, message: String },
    /// A required part is missing.
    #[error("the spec has no {0}")]
    Missing(&'static str),
    /// Something the agent does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A mount option is unknown.
    #[error("mount {destination}: unknown option {option:?}")]
    MountOption { destination: String, option: String },
    /// A path is not acceptable.
    #[error("bad path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    /// A list is longer than [`MAX_LIST_LEN`].
    #[error("{what} has {len} entries (limit {MAX_LIST_LEN})")]
    TooLong { what: &'static str, len: usize },
    /// The seccomp profile cannot be translated.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// A namespace of the container: a new one, or one to join (`path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacePlan {
    /// The `CLONE_NEW*` flag.
    pub flag: i32,
    /// `/proc/<pid>/ns/<kind>` of the namespace to join; `None`: a new one.
    pub path: Option<PathBuf>,
}

/// One mount, in `mount(2)` terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Absolute path inside the container.
    pub destination: PathBuf,
    pub source: Option<PathBuf>,
    pub fstype: Option<String>,
    /// `MsFlags` bits (without propagation flags).
    pub flags: u64,
    /// Propagation changes (`MS_SHARED`, `MS_PRIVATE`, ..., with `MS_REC` for the `r` forms), in
    /// the order of the options: each is one `mount(2)` after the mount, as runc applies them
    /// (the kernel takes one propagation type per call).
    pub propagation: Vec<u64>,
    /// File system specific options (`mode=755,size=65536k`).
    pub data: Option<String>,
}

impl MountPlan {
    /// A bind mount (`MS_BIND`).
    pub fn is_bind(&self) -> bool {
        self.flags & MsFlags::MS_BIND.bits() != 0
    }
}

/// One device node to create in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlan {
    pub path: PathBuf,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    pub kind: u32,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Capability sets as capability numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsPlan {
    pub bounding: Vec<u8>,
    pub effective: Vec<u8>,
    pub inheritable: Vec<u8>,
    pub permitted: Vec<u8>,
    pub ambient: Vec<u8>,
}

impl CapsPlan {
    /// Which ambient capabilities to raise and which to skip with a warning, as runc applies
    /// them: the kernel raises an ambient capability only when it is in both the permitted and
    /// the inheritable set (`PR_CAP_AMBIENT_RAISE` fails with `EPERM` otherwise), and runc warns
    /// about one it cannot raise and carries on; every other set is applied exactly.
    pub fn ambient_split(&self) -> AmbientSplit {
        let (raise, skip) = self
            .ambient
            .iter()
            .partition(|cap| self.permitted.contains(cap) && self.inheritable.contains(cap));
        AmbientSplit { raise, skip }
    }
}

/// The ambient set split by [`CapsPlan::ambient_split`] (capability numbers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmbientSplit {
    /// In the permitted and inheritable sets: raised.
    pub raise: Vec<u8>,
    /// Missing from one of them: the kernel would refuse, so skipped with a warning.
    pub skip: Vec<u8>,
}

/// One rlimit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RlimitPlan {
    /// `RLIMIT_*`.
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

/// The process to run (a container's init or an exec'd process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub terminal: bool,
    pub caps: Option<CapsPlan>,
    pub rlimits: Vec<RlimitPlan>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

/// Everything the init helper does for a new container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The container's root file system (absolute guest path).
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    /// `linux.rootfsPropagation` (`MsFlags` bits); `None`: not set, and `/` is made `rslave`
    /// before the container's root is prepared, as runc does.
    pub rootfs_propagation: Option<u64>,
    pub namespaces: Vec<NamespacePlan>,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// `(key, value)`, key in dotted form (`net.ipv4.ip_forward`).
    pub sysctls: Vec<(String, String)>,
    /// Seccomp filters to install, in order (see [`seccomp`]).
    pub seccomp: Vec<Vec<SockFilter>>,
    pub process: ProcessPlan,
    /// A new user namespace and its maps (`linux.uidMappings` / `gidMappings`), written by the
    /// agent (see the helper's setup); `None`: no new one (a joined one is in `namespaces`).
    #[serde(default)]
    pub user_namespace: Option<UserNamespacePlan>,
}

impl Plan {
    /// Whether the container is in a user namespace of its own (new or joined).
    pub fn in_user_namespace(&self) -> bool {
        self.namespaces
            .iter()
            .any(|ns| ns.flag == libc::CLONE_NEWUSER)
    }
}

/// One line of a uid or gid map: `size` ids from `container_id` in the container are `host_id`
/// and up in the agent's namespace (the guest's, whose ids are the host's through the share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// The maps of a new user namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespacePlan {
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
}

impl UserNamespacePlan {
    /// The text of `/proc/<pid>/uid_map` (`uid`) or `gid_map`.
    pub fn map_text(maps: &[IdMap]) -> String {
        maps.iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
            .collect()
    }
}

/// The kernel's limit on the lines of one id map.
const MAX_ID_MAP_LINES: usize = 340;

/// Checks one of `linux.uidMappings` / `gidMappings`: 1 to 340 ranges, none empty or past
/// 2^32, none overlapping another on either side, and the container's root (id 0) mapped (the
/// helper becomes the container's root to set it up, as runc's init does).
fn translate_id_maps(
    what: &'static str,
    maps: &[oci_spec::runtime::LinuxIdMapping],
) -> Result<Vec<IdMap>, SpecError> {
    let bad = |why: String| SpecError::Unsupported(format!("linux.{what}: {why}"));
    if maps.is_empty() {
        return Err(bad("a new user namespace needs at least one range".into()));
    }
    if maps.len() > MAX_ID_MAP_LINES {
        return Err(bad(format!(
            "{} ranges, the kernel takes at most {MAX_ID_MAP_LINES}",
            maps.len()
        )));
    }
    let out: Vec<IdMap> = maps
        .iter()
        .map(|m| IdMap {
            container_id: m.container_id(),
            host_id: m.host_id(),
            size: m.size(),
        })
        .collect();
    for (i, m) in out.iter().enumerate() {
        let end = |start: u32| u64::from(start) + u64::from(m.size);
        if m.size == 0 || end(m.container_id) > 1 << 32 || end(m.host_id) > 1 << 32 {
            return Err(bad(format!(
                "range {} {} {} is empty or runs past 2^32",
                m.container_id, m.host_id, m.size
            )));
        }
        for other in &out[..i] {
            let overlaps = |a: u32, b: u32| {
                u64::from(a) < u64::from(b) + u64::from(other.size)
                    && u64::from(b) < u64::from(a) + u64::from(m.size)
            };
            if overlaps(m.container_id, other.container_id) || overlaps(m.host_id, other.host_id) {
                return Err(bad(format!(
                    "ranges {} {} {} and {} {} {} overlap",
                    other.container_id,
                    other.host_id,
                    other.size,
                    m.container_id,
                    m.host_id,
                    m.size
                )));
            }
        }
    }
    if !out.iter().any(|m| m.container_id == 0) {
        return Err(bad("the container's root (id 0) is not mapped".into()));
    }
    Ok(out)
}

/// Parses a spec from JSON.
pub fn parse_spec(json: &serde_json::Value) -> Result<Spec, SpecError> {
    serde_json::from_value(json.clone()).map_err(|err| SpecError::Invalid {
        what: "spec",
        message: err.to_string(),
    })
}

/// Parses a process object from JSON.
pub fn parse_process(json: &serde_json::Value) -> Result<Process, SpecError> {
    serde_json::from_value(json.clone()).map_err(|err| SpecError::Invalid {
        what: "process",
        message: err.to_string(),
    })
}

fn check_len<T>(what: &'static str, list: &[T]) -> Result<(), SpecError> {
    if list.len() > MAX_LIST_LEN {
        return Err(SpecError::TooLong {
            what,
            len: list.len(),
        });
    }
    Ok(())
}

/// An absolute, normalised container path (no `..` escaping above `/`).
pub fn container_path(path: &Path) -> Result<PathBuf, SpecError> {
    let bad = |why| SpecError::BadPath {
        path: path.display().to_string(),
        why,
    };
    if !path.is_absolute() {
        return Err(bad("not absolute"));
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::Prefix(_) => return Err(bad("has a prefix")),
        }
    }
    Ok(out)
}

/// Translates a container's spec. `bundle` resolves a relative `root.path`.
pub fn translate_spec(spec: &Spec, bundle: &Path) -> Result<Plan, SpecError> {
    let root = spec.root().as_ref().ok_or(SpecError::Missing("root"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    let process = spec
        .process()
        .as_ref()
        .ok_or(SpecError::Missing("process"))?;
    let linux = spec.linux().as_ref().ok_or(SpecError::Missing("linux"))?;
    let namespaces = translate_namespaces(linux.namespaces().as_deref().unwrap_or(&[]))?;
    let new_user = namespaces
        .iter()
        .any(|ns| ns.flag == libc::CLONE_NEWUSER && ns.path.is_none());
    let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
    let user_namespace = match (new_user, has_maps) {
        (true, _) => Some(UserNamespacePlan {
            uid_map: translate_id_maps(
                "uidMappings",
                linux.uid_mappings().as_deref().unwrap_or(&[]),
            )?,
            gid_map: translate_id_maps(
                "gidMappings",
                linux.gid_mappings().as_deref().unwrap_or(&[]),
            )?,
        }),
        (false, true) => {
            return Err(SpecError::Unsupported(
                "linux.uidMappings / gidMappings without a new user namespace".into(),
            ))
        }
        (false, false) => None,
    };
    let mut mounts = Vec::new();
    if let Some(spec_mounts) = spec.mounts() {
        check_len("mounts", spec_mounts)?;
        for mount in spec_mounts {
            let destination = container_path(mount.destination())?;
            let options = mount.options().as_deref().unwrap_or(&[]);
            let (flags, propagation, data) =
                parse_mount_options(&destination.display().to_string(), options)?;
            let mut fstype = mount.typ().clone();
            let mut flags = flags;
            if fstype.as_deref() == Some("bind") {
                fstype = None;
                flags |= MsFlags::MS_BIND.bits();
            }
            // The guest has cgroup v2 only.
            if fstype.as_deref() == Some("cgroup") {
                fstype = Some("cgroup2".into());
            }
            let source = mount.source().as_ref().map(|source| {
                if source.is_relative() && flags & MsFlags::MS_BIND.bits() != 0 {
                    bundle.join(source)
                } else {
                    source.clone()
                }
            });
            mounts.push(MountPlan {
                destination,
                source,
                fstype,
                flags,
                propagation,
                data: (!data.is_empty()).then_some(data),
            });
        }
    }
    let mut devices = Vec::new();
    for device in linux.devices().as_deref().unwrap_or(&[]) {
        devices.push(translate_device(device)?);
    }
    check_len("devices", &devices)?;
    let paths = |what, list: &Option<Vec<String>>| -> Result<Vec<PathBuf>, SpecError> {
        let list = list.as_deref().unwrap_or(&[]);
        check_len(what, list)?;
        list.iter().map(|p| container_path(Path::new(p))).collect()
    };
    let masked_paths = paths("maskedPaths", linux.masked_paths())?;
    let readonly_paths = paths("readonlyPaths", linux.readonly_paths())?;
    let new_uts = namespaces
        .iter()
        .any(|ns| ns.flag == libc::CLONE_NEWUTS && ns.path.is_none());
    if spec.hostname().is_some() && !new_uts {
        return Err(SpecError::Unsupported(
            "a hostname without a new uts namespace".into(),
        ));
    }
    let mut sysctls: Vec<(String, String)> = linux
        .sysctl()
        .as_ref()
        .map(|map| map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    sysctls.sort();
    check_len("sysctl", &sysctls)?;
    for (key, _) in &sysctls {
        if key.is_empty() || key.contains('/') || key.split('.').any(|part| part == "..") {
            return Err(SpecError::BadPath {
                path: key.clone(),
                why: "not a sysctl name",
            });
        }
    }
    let seccomp = match linux.seccomp() {
        Some(profile) => seccomp::compile(profile)?,
        None => Vec::new(),
    };
    if linux.intel_rdt().is_some() || linux.personality().is_some() {
        return Err(SpecError::Unsupported(
            "linux.intelRdt / linux.personality".into(),
        ));
    }
    if linux.mount_label().as_ref().is_some_and(|l| !l.is_empty()) {
        return Err(SpecError::Unsupported(
            "linux.mountLabel (the guest kernel has no LSM)".into(),
        ));
    }
    if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(SpecError::Unsupported("linux.timeOffsets".into()));
    }
    Ok(Plan {
        rootfs,
        readonly_rootfs: root.readonly().unwrap_or(false),
        rootfs_propagation: parse_rootfs_propagation(linux.rootfs_propagation().as_deref())?,
        namespaces,
        mounts,
        devices,
        masked_paths,
        readonly_paths,
        hostname: spec.hostname().clone(),
        domainname: spec.domainname().clone(),
        sysctls,
        seccomp,
        process: translate_process(process)?,
        user_namespace,
    })
}

/// The flags of a mount propagation name (runc's `mountPropagationMapping`): the `r` forms
/// add `MS_REC`. `None` for anything else.
pub fn propagation_flags(name: &str) -> Option<MsFlags> {
    let (recursive, kind) = match name.strip_prefix('r') {
        Some(kind @ ("shared" | "slave" | "private" | "unbindable")) => (true, kind),
        _ => (false, name),
    };
    let flag = match kind {
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "private" => MsFlags::MS_PRIVATE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(if recursive {
        flag | MsFlags::MS_REC
    } else {
        flag
    })
}

/// `linux.rootfsPropagation`; unset or empty is `None` (runc's default applies).
fn parse_rootfs_propagation(value: Option<&str>) -> Result<Option<u64>, SpecError> {
    match value {
        None | Some("") => Ok(None),
        Some(name) => propagation_flags(name)
            .map(|flags| Some(flags.bits()))
            .ok_or_else(|| SpecError::Unsupported(format!("rootfsPropagation {name:?}"))),
    }
}

/// The namespaces of the spec. A mount and a pid namespace are required: a container sharing
/// the agent's pid namespace could signal PID 1, one sharing its mounts could unmount the guest.
pub fn translate_namespaces(
    namespaces: &[oci_spec::runtime::LinuxNamespace],
) -> Result<Vec<NamespacePlan>, SpecError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for ns in namespaces {
        let flag = match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            LinuxNamespaceType::User => libc::CLONE_NEWUSER,
            other => {
                return Err(SpecError::Unsupported(format!("namespace {other:?}")));
            }
        };
        if !seen.insert(flag) {
            return Err(SpecError::Unsupported(format!(
                "namespace {:?} listed twice",
                ns.typ()
            )));
        }
        if let Some(path) = ns.path() {
            if !path.is_absolute() {
                return Err(SpecError::BadPath {
                    path: path.display().to_string(),
                    why: "namespace path not absolute",
                });
            }
        }
        out.push(NamespacePlan {
            flag,
            path: ns.path().clone(),
        });
    }
    for (flag, name) in [(libc::CLONE_NEWNS, "mount"), (libc::CLONE_NEWPID, "pid")] {
        if !seen.contains(&flag) {
            return Err(SpecError::Unsupported(format!(
                "a container without its own {name} namespace (it would share the agent's)"
            )));
        }
    }
    Ok(out)
}

fn translate_device(device: &LinuxDevice) -> Result<DevicePlan, SpecError> {
    let kind = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
        LinuxDeviceType::B => libc::S_IFBLK,
        LinuxDeviceType::P => libc::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(SpecError::Unsupported("device type 'a'".into()));
        }
    };
    let path = container_path(device.path())?;
    if !path.starts_with("/dev") {
        return Err(SpecError::BadPath {
            path: path.display().to_string(),
            why: "devices must live under /dev",
        });
    }
    let number = |n: i64| {
        u64::try_from(n).map_err(|_| SpecError::Invalid {
            what: "device",
            message: format!("negative device number {n}"),
        })
    };
    Ok(DevicePlan {
        path,
        kind,
        major: number(device.major())?,
        minor: number(device.minor())?,
        mode: device.file_mode().unwrap_or(0o666) & 0o7777,
        uid: device.uid().unwrap_or(0),
        gid: device.gid().unwrap_or(0),
    })
}

/// Translates a process object.
pub fn translate_process(process: &Process) -> Result<ProcessPlan, SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::Missing("process.args"));
    }
    check_len("process.args", &args)?;
    let env = process.env().clone().unwrap_or_default();
    check_len("process.env", &env)?;
    if args.iter().chain(&env).any(|s| s.contains('\0')) {
        return Err(SpecError::Invalid {
            what: "process",
            message: "args or env contain a NUL byte".into(),
        });
    }
    let cwd = container_path(process.cwd())?;
    let user = process.user();
    let additional_gids = user.additional_gids().clone().unwrap_or_default();
    check_len("additionalGids", &additional_gids)?;
    let mut rlimits = Vec::new();
    for rlimit in process.rlimits().as_deref().unwrap_or(&[]) {
        rlimits.push(RlimitPlan {
            resource: rlimit_resource(rlimit.typ())?,
            soft: rlimit.soft(),
            hard: rlimit.hard(),
        });
    }
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        return Err(SpecError::Unsupported(
            "apparmorProfile / selinuxLabel (the guest kernel has no LSM)".into(),
        ));
    }
    if process.io_priority().is_some()
        || process.scheduler().is_some()
        || process.exec_cpu_affinity().is_some()
    {
        return Err(SpecError::Unsupported(
            "process.ioPriority / process.scheduler / process.execCPUAffinity".into(),
        ));
    }
    Ok(ProcessPlan {
        args,
        env,
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids,
        umask: user.umask(),
        terminal: process.terminal().unwrap_or(false),
        caps: process
            .capabilities()
            .as_ref()
            .map(translate_caps)
            .transpose()?,
        rlimits,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        oom_score_adj: process.oom_score_adj(),
    })
}

/// The `RLIMIT_*` resource of an OCI rlimit type.
pub fn rlimit_resource(typ: PosixRlimitType) -> Result<i32, SpecError> {
    let resource = match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
        #[allow(unreachable_patterns)]
        other => {
            return Err(SpecError::Unsupported(format!("rlimit {other:?}")));
        }
    };
    // The RLIMIT_* constants are small non-negative numbers.
    i32::try_from(resource).map_err(|_| SpecError::Unsupported(format!("rlimit {typ:?}")))
}

/// Capability numbers of an OCI capability set (names like `CAP_NET_ADMIN`).
fn cap_numbers(set: Option<&oci_spec::runtime::Capabilities>) -> Result<Vec<u8>, SpecError> {
    let mut numbers = Vec::new();
    for cap in set.into_iter().flatten() {
        // oci-spec displays `KILL` for `CAP_KILL`.
        let shown = cap.to_string();
        let name = if shown.starts_with("CAP_") {
            shown
        } else {
            format!("CAP_{shown}")
        };
        let parsed: caps::Capability = name
            .parse()
            .map_err(|_| SpecError::Unsupported(format!("capability {name}")))?;
        numbers.push(parsed.index());
    }
    numbers.sort_unstable();
    numbers.dedup();
    Ok(numbers)
}

/// Translates the five capability sets.
pub fn translate_caps(caps: &LinuxCapabilities) -> Result<CapsPlan, SpecError> {
    Ok(CapsPlan {
        bounding: cap_numbers(caps.bounding().as_ref())?,
        effective: cap_numbers(caps.effective().as_ref())?,
        inheritable: cap_numbers(caps.inheritable().as_ref())?,
        permitted: cap_numbers(caps.permitted().as_ref())?,
        ambient: cap_numbers(caps.ambient().as_ref())?,
    })
}

/// Parses OCI mount options into `(flags, propagation changes in order, data)`.
pub fn parse_mount_options(
    destination: &str,
    options: &[String],
) -> Result<(u64, Vec<u64>, String), SpecError> {
    let mut flags = MsFlags::empty();
    let mut propagation = Vec::new();
    let mut data: Vec<&str> = Vec::new();
    for option in options {
        let option = option.as_str();
        if let Some(change) = propagation_flags(option) {
            propagation.push(change.bits());
            continue;
        }
        let (set, clear) = match option {
            "defaults" | "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            // Options of the mount API that runc maps to ID-mapped or recursive-attr mounts.
            "idmap" | "ridmap" | "rro" | "rrw" | "rnosuid" | "rnodev" | "rnoexec" | "tmpcopyup" => {
                return Err(SpecError::MountOption {
                    destination: destination.to_owned(),
                    option: option.to_owned(),
                });
            }
            // Anything with '=' or not a known flag belongs to the file system (mode=, size=,
            // newinstance, ...): the kernel rejects what it does not know.
            other => {
                if other.is_empty() || other.contains(',') {
                    return Err(SpecError::MountOption {
                        destination: destination.to_owned(),
                        option: other.to_owned(),
                    });
                }
                data.push(other);
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    Ok((flags.bits(), propagation, data.join(",")))
}

/// The devices every container gets (OCI "default devices"), when `/dev` does not already have
/// them: `(path, major, minor)`, all character devices with mode 0666.
pub const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// The symlinks of a container's `/dev`: `(link, target)`.
pub const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base_spec() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "process": {
                "args": ["sh"], "cwd": "/work/../tmp", "env": ["A=1"],
                "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 18},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}],
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"]},
                "noNewPrivileges": true, "oomScoreAdj": 100
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/data", "type": "bind", "source": "mounts/0",
                 "options": ["rbind", "ro", "rprivate"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                               {"type": "network", "path": "/proc/7/ns/net"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": {"net.ipv4.ip_forward": "1"}
            }
        })
    }

    #[test]
    fn full_spec_translates_to_kernel_terms() {
        let spec = parse_spec(&base_spec()).expect("valid spec");
        let plan = translate_spec(&spec, Path::new("/run/husk/shared/c1")).expect("translates");
        assert_eq!(plan.rootfs, PathBuf::from("/run/husk/shared/c1/rootfs"));
        assert!(plan.readonly_rootfs);
        assert_eq!(
            plan.namespaces,
            vec![
                NamespacePlan {
                    flag: libc::CLONE_NEWPID,
                    path: None
                },
                NamespacePlan {
                    flag: libc::CLONE_NEWNS,
                    path: None
                },
                NamespacePlan {
                    flag: libc::CLONE_NEWUTS,
                    path: None
                },
                NamespacePlan {
                    flag: libc::CLONE_NEWNET,
                    path: Some("/proc/7/ns/net".into())
                },
            ]
        );
        assert_eq!(plan.mounts.len(), 3);
        assert_eq!(
            plan.mounts[1],
            MountPlan {
                destination: "/dev".into(),
                source: Some("tmpfs".into()),
                fstype: Some("tmpfs".into()),
                flags: (MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME).bits(),
                propagation: Vec::new(),
                data: Some("mode=755,size=65536k".into()),
            }
        );
        assert_eq!(
            plan.mounts[2],
            MountPlan {
                destination: "/data".into(),
                source: Some("/run/husk/shared/c1/mounts/0".into()),
                fstype: None,
                flags: (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY).bits(),
                propagation: vec![(MsFlags::MS_PRIVATE | MsFlags::MS_REC).bits()],
                data: None,
            }
        );
        assert_eq!(plan.masked_paths, vec![PathBuf::from("/proc/kcore")]);
        assert_eq!(plan.readonly_paths, vec![PathBuf::from("/proc/sys")]);
        assert_eq!(
            plan.sysctls,
            vec![("net.ipv4.ip_forward".into(), "1".into())]
        );
        assert_eq!(plan.hostname.as_deref(), Some("box"));
        let p = &plan.process;
        assert_eq!(p.cwd, PathBuf::from("/tmp"));
        assert_eq!((p.uid, p.gid, p.umask), (1000, 100, Some(18)));
        assert_eq!(p.additional_gids, vec![5, 6]);
        assert_eq!(
            p.rlimits,
            vec![RlimitPlan {
                resource: libc::RLIMIT_NOFILE as i32,
                soft: 100,
                hard: 200
            }]
        );
        let caps = p.caps.as_ref().expect("caps");
        assert_eq!(caps.bounding, vec![0, 5]);
        assert_eq!(caps.effective, vec![5]);
        assert!(caps.ambient.is_empty());
        assert!(p.no_new_privileges);
        assert_eq!(p.oom_score_adj, Some(100));
    }

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let opts: Vec<String> = [
            "ro",
            "nosuid",
            "nodev",
            "rw",
            "rshared",
            "mode=1777",
            "newinstance",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (flags, propagation, data) = parse_mount_options("/x", &opts).expect("parses");
        assert_eq!(flags, (MsFlags::MS_NOSUID | MsFlags::MS_NODEV).bits());
        assert_eq!(
            propagation,
            vec![(MsFlags::MS_SHARED | MsFlags::MS_REC).bits()]
        );
        assert_eq!(data, "mode=1777,newinstance");
        let err = parse_mount_options("/x", &["idmap".to_string()]).expect_err("unsupported");
        assert_eq!(
            err,
            SpecError::MountOption {
                destination: "/x".into(),
                option: "idmap".into()
            }
        );
    }

    #[test]
    fn propagation_names_map_to_one_flag_and_rec_for_the_r_forms() {
        for (name, flags) in [
            ("shared", MsFlags::MS_SHARED),
            ("rshared", MsFlags::MS_SHARED | MsFlags::MS_REC),
            ("slave", MsFlags::MS_SLAVE),
            ("rslave", MsFlags::MS_SLAVE | MsFlags::MS_REC),
            ("private", MsFlags::MS_PRIVATE),
            ("rprivate", MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            ("unbindable", MsFlags::MS_UNBINDABLE),
            ("runbindable", MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
        ] {
            assert_eq!(propagation_flags(name), Some(flags), "{name}");
        }
        for name in ["", "r", "rro", "rrshared", "Shared", "bind", "relatime"] {
            assert_eq!(propagation_flags(name), None, "{name}");
        }
    }

    #[test]
    fn rootfs_propagation_is_kept_as_given_and_unset_means_runc_default() {
        let mut json = base_spec();
        let plan = |json: &serde_json::Value| {
            translate_spec(&parse_spec(json).expect("valid"), Path::new("/b"))
        };
        assert_eq!(plan(&json).expect("plan").rootfs_propagation, None);
        json["linux"]["rootfsPropagation"] = json!("");
        assert_eq!(plan(&json).expect("plan").rootfs_propagation, None);
        json["linux"]["rootfsPropagation"] = json!("shared");
        assert_eq!(
            plan(&json).expect("plan").rootfs_propagation,
            Some(MsFlags::MS_SHARED.bits())
        );
        json["linux"]["rootfsPropagation"] = json!("runbindable");
        assert_eq!(
            plan(&json).expect("plan").rootfs_propagation,
            Some((MsFlags::MS_UNBINDABLE | MsFlags::MS_REC).bits())
        );
        json["linux"]["rootfsPropagation"] = json!("sideways");
        assert_eq!(
            plan(&json),
            Err(SpecError::Unsupported(
                "rootfsPropagation \"sideways\"".into()
            ))
        );
    }

    #[test]
    fn each_propagation_option_is_its_own_change_in_order_not_data() {
        let opts: Vec<String> = ["rbind", "private", "rw", "rslave", "unbindable"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, propagation, data) = parse_mount_options("/x", &opts).expect("parses");
        assert_eq!(flags, (MsFlags::MS_BIND | MsFlags::MS_REC).bits());
        assert_eq!(
            propagation,
            vec![
                MsFlags::MS_PRIVATE.bits(),
                (MsFlags::MS_SLAVE | MsFlags::MS_REC).bits(),
                MsFlags::MS_UNBINDABLE.bits(),
            ]
        );
        assert_eq!(data, "");
    }

    #[test]
    fn ambient_capabilities_outside_inheritable_or_permitted_are_skipped() {
        // `runc spec` of runc 1.1: ambient = permitted, no inheritable set.
        let runc_spec = CapsPlan {
            bounding: vec![5, 10, 29],
            effective: vec![5, 10, 29],
            inheritable: Vec::new(),
            permitted: vec![5, 10, 29],
            ambient: vec![5, 10, 29],
        };
        assert_eq!(
            runc_spec.ambient_split(),
            AmbientSplit {
                raise: Vec::new(),
                skip: vec![5, 10, 29]
            }
        );
        let mixed = CapsPlan {
            inheritable: vec![5, 7, 10],
            permitted: vec![0, 5, 10],
            ambient: vec![0, 5, 7, 10],
            ..CapsPlan::default()
        };
        assert_eq!(
            mixed.ambient_split(),
            AmbientSplit {
                raise: vec![5, 10],
                skip: vec![0, 7]
            }
        );
        assert_eq!(CapsPlan::default().ambient_split(), AmbientSplit::default());
    }

    #[test]
    fn missing_pid_or_mount_namespace_is_refused() {
        let mut json = base_spec();
        json["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}]);
        let spec = parse_spec(&json).expect("valid");
        let err = translate_spec(&spec, Path::new("/b")).expect_err("no pid ns");
        assert!(err.to_string().contains("own pid namespace"), "{err}");
    }

    #[test]
    fn a_user_namespace_gets_its_maps() {
        let mut json = base_spec();
        json["linux"]["namespaces"] =
            json!([{"type": "mount"}, {"type": "pid"}, {"type": "uts"}, {"type": "user"}]);
        json["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        json["linux"]["gidMappings"] = json!([
            {"containerID": 0, "hostID": 200000, "size": 1},
            {"containerID": 1, "hostID": 300000, "size": 10}
        ]);
        let plan = translate_spec(&parse_spec(&json).expect("valid"), Path::new("/b"))
            .expect("a user namespace");
        assert!(plan.in_user_namespace());
        let userns = plan.user_namespace.expect("new user namespace");
        assert_eq!(
            UserNamespacePlan::map_text(&userns.uid_map),
            "0 100000 65536\n"
        );
        assert_eq!(
            UserNamespacePlan::map_text(&userns.gid_map),
            "0 200000 1\n1 300000 10\n"
        );
    }

    #[test]
    fn user_namespace_maps_are_checked() {
        let with = |ns: serde_json::Value, uid: serde_json::Value, gid: serde_json::Value| {
            let mut json = base_spec();
            json["linux"]["namespaces"] = ns;
            json["linux"]["uidMappings"] = uid;
            json["linux"]["gidMappings"] = gid;
            translate_spec(&parse_spec(&json).expect("valid"), Path::new("/b"))
                .expect_err("refused")
                .to_string()
        };
        let userns = json!([{"type": "mount"}, {"type": "pid"}, {"type": "uts"}, {"type": "user"}]);
        let no_userns = json!([{"type": "mount"}, {"type": "pid"}, {"type": "uts"}]);
        let root = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        for (ns, uid, gid, needle) in [
            (
                &userns,
                json!([]),
                root.clone(),
                "uidMappings: a new user namespace needs",
            ),
            (
                &userns,
                root.clone(),
                json!(null),
                "gidMappings: a new user namespace needs",
            ),
            (
                &no_userns,
                root.clone(),
                root.clone(),
                "without a new user namespace",
            ),
            (
                &userns,
                json!([{"containerID": 1, "hostID": 1000, "size": 5}]),
                root.clone(),
                "root (id 0) is not mapped",
            ),
            (
                &userns,
                json!([{"containerID": 0, "hostID": 1000, "size": 0}]),
                root.clone(),
                "is empty or runs past 2^32",
            ),
            (
                &userns,
                json!([{"containerID": 0, "hostID": 4294967295u64, "size": 2}]),
                root.clone(),
                "is empty or runs past 2^32",
            ),
            (
                &userns,
                json!([
                    {"containerID": 0, "hostID": 1000, "size": 10},
                    {"containerID": 5, "hostID": 5000, "size": 10}
                ]),
                root.clone(),
                "overlap",
            ),
            (
                &userns,
                root.clone(),
                json!([
                    {"containerID": 0, "hostID": 1000, "size": 10},
                    {"containerID": 100, "hostID": 1005, "size": 10}
                ]),
                "overlap",
            ),
        ] {
            let err = with(ns.clone(), uid, gid);
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn fields_the_guest_cannot_apply_are_refused_by_name() {
        for (path, value, named) in [
            (
                "mountLabel",
                json!("system_u:object_r:container_file_t:s0"),
                "linux.mountLabel",
            ),
            (
                "timeOffsets",
                json!({"monotonic": {"secs": 1}}),
                "linux.timeOffsets",
            ),
            (
                "ioPriority",
                json!({"class": "IOPRIO_CLASS_IDLE", "priority": 0}),
                "process.ioPriority",
            ),
            (
                "scheduler",
                json!({"policy": "SCHED_IDLE"}),
                "process.scheduler",
            ),
        ] {
            let mut json = base_spec();
            let place = if path == "ioPriority" || path == "scheduler" {
                "process"
            } else {
                "linux"
            };
            json[place][path] = value;
            let spec = parse_spec(&json).expect("valid");
            let err = translate_spec(&spec, Path::new("/b")).expect_err("refused");
            assert!(
                matches!(&err, SpecError::Unsupported(m) if m.contains(named)),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn unknown_capability_fails_parsing() {
        let mut json = base_spec();
        json["process"]["capabilities"]["effective"] = json!(["CAP_FLY"]);
        assert!(matches!(parse_spec(&json), Err(SpecError::Invalid { .. })));
    }

    #[test]
    fn container_paths_cannot_climb_above_root() {
        assert_eq!(
            container_path(Path::new("/a/../../etc/./x")).expect("ok"),
            PathBuf::from("/etc/x")
        );
        assert!(container_path(Path::new("rel")).is_err());
    }

    #[test]
    fn empty_args_are_refused() {
        let mut json = base_spec();
        json["process"]["args"] = json!([]);
        let spec = parse_spec(&json).expect("valid");
        assert_eq!(
            translate_spec(&spec, Path::new("/b")),
            Err(SpecError::Missing("process.args"))
        );
    }

    #[test]
    fn rlimit_types_map_to_resources() {
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitCore),
            Ok(libc::RLIMIT_CORE as i32)
        );
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitRttime),
            Ok(libc::RLIMIT_RTTIME as i32)
        );
    }
}
