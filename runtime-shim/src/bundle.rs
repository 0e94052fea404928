//! OCI bundles: loading and validating `config.json`, and translating the spec to the paths
//! the guest sees through the share.
//!
//! The spec is handled as JSON (not a typed struct) so that every field husk does not rewrite
//! reaches the agent unchanged, including fields newer than this code.
//!
//! Guest view (see the share contract): the share is mounted at [`GUEST_SHARE`] in the guest,
//! the container's bundle is `GUEST_SHARE/<id>`, its rootfs `GUEST_SHARE/<id>/rootfs`, and the
//! n-th host bind-mount source `GUEST_SHARE/<id>/mounts/<n>`.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE: &str = "/run/husk/shared";

/// The OCI spec major version husk understands.
pub const SUPPORTED_OCI_MAJOR: u64 = 1;

/// Errors of bundle validation and spec translation.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {0}: no such directory")]
    Missing(PathBuf),
    #[error("bundle {0}: no config.json")]
    NoConfig(PathBuf),
    #[error("bundle {0}: cannot read config.json")]
    Unreadable(PathBuf, #[source] std::io::Error),
    #[error("bundle {0}: config.json is not valid JSON")]
    InvalidJson(PathBuf, #[source] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
    #[error("config.json: unsupported ociVersion {0:?} (husk supports {SUPPORTED_OCI_MAJOR}.x)")]
    UnsupportedVersion(String),
    #[error("rootfs {0}: no such directory")]
    RootfsMissing(PathBuf),
    #[error("config.json: namespace {kind} path {path}: {problem}")]
    NamespacePath {
        kind: String,
        path: String,
        problem: String,
    },
}

/// A validated bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// Absolute rootfs directory on the host.
    pub rootfs: PathBuf,
    /// `config.json`.
    pub spec: Value,
}

impl Bundle {
    /// Loads and validates the bundle at `dir`.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !dir.is_dir() {
            return Err(BundleError::Missing(dir));
        }
        let config = dir.join("config.json");
        let text = match std::fs::read_to_string(&config) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::NoConfig(dir))
            }
            Err(e) => return Err(BundleError::Unreadable(dir, e)),
        };
        let spec: Value =
            serde_json::from_str(&text).map_err(|e| BundleError::InvalidJson(dir.clone(), e))?;
        validate_spec(&spec)?;
        let root = spec["root"]["path"].as_str().unwrap_or_default();
        let rootfs = dir.join(root);
        if !rootfs.is_dir() {
            return Err(BundleError::RootfsMissing(rootfs));
        }
        check_namespace_paths(&spec)?;
        Ok(Bundle { dir, rootfs, spec })
    }

    /// `process.terminal`.
    pub fn terminal(&self) -> bool {
        self.spec["process"]["terminal"].as_bool().unwrap_or(false)
    }

    /// `annotations` as strings.
    pub fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        annotations(&self.spec)
    }
}

/// `annotations` of a spec as strings (non-string values are skipped).
pub fn annotations(spec: &Value) -> std::collections::BTreeMap<String, String> {
    spec["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks what husk relies on: an object, a supported `ociVersion`, `process.args` a non-empty
/// list of strings, `root.path` a string.
pub fn validate_spec(spec: &Value) -> Result<(), BundleError> {
    let obj = spec
        .as_object()
        .ok_or_else(|| BundleError::Invalid("the top level must be an object".into()))?;
    let version = obj
        .get("ociVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| BundleError::Invalid("missing field ociVersion".into()))?;
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u64>().ok());
    if major != Some(SUPPORTED_OCI_MAJOR) {
        return Err(BundleError::UnsupportedVersion(version.to_string()));
    }
    let process = obj
        .get("process")
        .and_then(Value::as_object)
        .ok_or_else(|| BundleError::Invalid("missing field process".into()))?;
    let args = process
        .get("args")
        .ok_or_else(|| BundleError::Invalid("missing field process.args".into()))?
        .as_array()
        .ok_or_else(|| BundleError::Invalid("process.args must be a list of strings".into()))?;
    if args.is_empty() {
        return Err(BundleError::Invalid(
            "process.args must not be empty".into(),
        ));
    }
    if !args.iter().all(Value::is_string) {
        return Err(BundleError::Invalid(
            "process.args must be a list of strings".into(),
        ));
    }
    obj.get("root")
        .and_then(|r| r.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| BundleError::Invalid("missing field root.path".into()))?;
    crate::hooks::Hooks::from_spec(spec).map_err(BundleError::Invalid)?;
    Ok(())
}

/// The `CLONE_NEW*` flag of an OCI namespace type.
fn namespace_flag(kind: &str) -> Option<libc::c_int> {
    Some(match kind {
        "pid" => libc::CLONE_NEWPID,
        "network" => libc::CLONE_NEWNET,
        "mount" => libc::CLONE_NEWNS,
        "ipc" => libc::CLONE_NEWIPC,
        "uts" => libc::CLONE_NEWUTS,
        "user" => libc::CLONE_NEWUSER,
        "cgroup" => libc::CLONE_NEWCGROUP,
        "time" => libc::CLONE_NEWTIME,
        _ => return None,
    })
}

/// `NS_GET_NSTYPE` (linux/nsfs.h): the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The runtime spec: "If a path is specified, the runtime MUST ... fail if the file is not a
/// namespace of the given type". Each namespace `path` must open and be a namespace of its
/// entry's type. (The guest cannot join a host namespace: [`translate_spec`] then makes a new
/// one and says so; the network namespace's interfaces are carried into the VM by the pod
/// network code.)
pub fn check_namespace_paths(spec: &Value) -> Result<(), BundleError> {
    let Some(namespaces) = spec["linux"]["namespaces"].as_array() else {
        return Ok(());
    };
    for ns in namespaces {
        let kind = ns["type"].as_str().unwrap_or("?").to_string();
        let Some(path) = ns.get("path").and_then(Value::as_str) else {
            continue;
        };
        let problem = |problem: String| BundleError::NamespacePath {
            kind: kind.clone(),
            path: path.to_string(),
            problem,
        };
        let Some(want) = namespace_flag(&kind) else {
            return Err(problem("unknown namespace type".into()));
        };
        let file =
            std::fs::File::open(path).map_err(|e| problem(format!("cannot open it: {e}")))?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only returns an integer; the fd is open
        // for the duration of the call.
        let got = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE) };
        if got < 0 {
            return Err(problem(format!(
                "not a namespace file ({})",
                std::io::Error::last_os_error()
            )));
        }
        if got != want {
            let actual = [
                "pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time",
            ]
            .into_iter()
            .find(|k| namespace_flag(k) == Some(got))
            .unwrap_or("unknown");
            return Err(problem(format!("a namespace of type {actual}, not {kind}")));
        }
    }
    Ok(())
}

/// One host bind mount the share needs: `source` (host) onto `shared/<id>/<target>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindPlan {
    pub source: PathBuf,
    /// Relative to `shared/<id>/`.
    pub target: PathBuf,
    /// Whether the source is a directory (else a file: the mount point is a file).
    pub is_dir: bool,
}

/// The spec the guest gets, and the host binds that make its paths exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Translation {
    pub spec: Value,
    /// The rootfs first, then one per bind mount of the spec.
    pub binds: Vec<BindPlan>,
    /// What was dropped or changed, for the log.
    pub notes: Vec<String>,
}

/// Whether an OCI mount is a bind mount (type `bind`, or a `bind`/`rbind` option).
fn is_bind(mount: &Value) -> bool {
    mount["type"].as_str() == Some("bind")
        || mount["options"].as_array().is_some_and(|o| {
            o.iter()
                .any(|v| matches!(v.as_str(), Some("bind" | "rbind")))
        })
}

/// Rewrites host paths of `bundle`'s spec to guest paths:
/// - `root.path` -> `GUEST_SHARE/<id>/rootfs`;
/// - bind-mount sources -> `GUEST_SHARE/<id>/mounts/<n>` (relative sources resolve in the
///   bundle);
/// - `hooks` are removed (husk runs them on the host, see [`crate::hooks`]; the guest never
///   sees them);
/// - namespace `path`s are dropped (host namespaces cannot be joined from the guest; the guest
///   makes new ones). A network namespace's path is the caller's to report: its interface is
///   carried into the VM ([`crate::network`]) or the guest makes a namespace with loopback only.
pub fn translate_spec(bundle: &Bundle, id: &str) -> Translation {
    let mut spec = bundle.spec.clone();
    let guest_bundle = format!("{GUEST_SHARE}/{id}");
    let mut binds = vec![BindPlan {
        source: bundle.rootfs.clone(),
        target: "rootfs".into(),
        is_dir: true,
    }];
    let mut notes = Vec::new();
    spec["root"]["path"] = Value::String(format!("{guest_bundle}/rootfs"));
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        let mut n = 0usize;
        for mount in mounts.iter_mut() {
            if !is_bind(mount) {
                continue;
            }
            let Some(source) = mount["source"].as_str() else {
                continue;
            };
            let source = bundle.dir.join(source);
            let target = PathBuf::from(format!("mounts/{n}"));
            n += 1;
            mount["source"] = Value::String(format!("{guest_bundle}/{}", target.display()));
            binds.push(BindPlan {
                is_dir: source.is_dir(),
                source,
                target,
            });
        }
    }
    if let Some(resources) = spec["linux"]
        .get_mut("resources")
        .and_then(Value::as_object_mut)
    {
        // docker sends `"blockIO": {"weight": 0}` and the like: settings that set nothing.
        if resources.get("blockIO").is_some_and(is_unset) {
            resources.remove("blockIO");
        }
        notes.extend(drop_ignored_resources(resources, false));
    }
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("hooks");
    }
    if let Some(namespaces) = spec["linux"]
        .get_mut("namespaces")
        .and_then(Value::as_array_mut)
    {
        for ns in namespaces.iter_mut() {
            if let Some(obj) = ns.as_object_mut() {
                let kind = obj
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                if let Some(path) = obj.remove("path").filter(|_| kind != "network") {
                    notes.push(format!(
                        "namespace {kind} path {path} cannot be joined from the microVM; a new one is made"
                    ));
                }
            }
        }
    }
    Translation { spec, binds, notes }
}

/// Removes the resources husk ignores, each with a note (a warning the user sees, from the
/// CLI and from the shim): those runc ignores on cgroup v2 (`memory.kernel`,
/// `memory.kernelTCP`, `network`, i.e. net_cls / net_prio), and those the microVM meets by
/// construction (`memory.swappiness` and `hugepageLimits`: the guest kernel has neither swap
/// nor huge pages). Everything else reaches the agent, which applies it or refuses it by name.
/// For an update (`husk update`, the shim's Update), `devices` too: a container's device rules
/// are set when it is created and stay, as with `runc update`.
pub fn drop_ignored_resources(
    resources: &mut serde_json::Map<String, Value>,
    updating: bool,
) -> Vec<String> {
    let mut notes = Vec::new();
    if updating && resources.remove("devices").is_some_and(|v| !is_unset(&v)) {
        notes.push(
            "linux.resources.devices is ignored by an update: device rules are set when the \
             container is created (as runc update does)"
                .into(),
        );
    }
    if let Some(memory) = resources.get_mut("memory").and_then(Value::as_object_mut) {
        for (key, why) in [
            ("kernel", "deprecated, and ignored on cgroup v2 (as runc does)"),
            ("kernelTCP", "deprecated, and ignored on cgroup v2 (as runc does)"),
            (
                "swappiness",
                "the guest has no swap, so there is nothing to tune (cgroup v2 has no such file either)",
            ),
        ] {
            if memory.remove(key).is_some_and(|v| !v.is_null()) {
                notes.push(format!("linux.resources.memory.{key} is ignored: {why}"));
            }
        }
    }
    if resources.remove("network").is_some_and(|v| !is_unset(&v)) {
        notes.push(
            "linux.resources.network (net_cls / net_prio) is ignored: cgroup v2 has neither \
             controller (as runc does)"
                .into(),
        );
    }
    if resources
        .remove("hugepageLimits")
        .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    {
        notes.push(
            "linux.resources.hugepageLimits is ignored: the guest kernel has no huge pages, so \
             every limit holds"
                .into(),
        );
    }
    notes
}

/// Whether a JSON value sets nothing: null, zero, false, or containers of such.
pub(crate) fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.iter().all(is_unset),
        Value::Object(o) => o.values().all(is_unset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind"]},
                {"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind", "ro"]}
            ],
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "linux": {
                "namespaces": [{"type": "network", "path": "/proc/self/ns/net"}, {"type": "mount"}],
                "resources": {"blockIO": {"weight": 0, "weightDevice": []}, "cpu": {"shares": 2}}
            }
        })
    }

    fn bundle_dir(spec: &Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("rootfs");
        std::fs::create_dir(dir.path().join("data")).expect("data");
        std::fs::write(dir.path().join("config.json"), spec.to_string()).expect("config");
        dir
    }

    #[test]
    fn a_valid_bundle_loads() {
        let dir = bundle_dir(&spec());
        let bundle = Bundle::load(dir.path()).expect("valid");
        assert_eq!(bundle.rootfs, dir.path().join("rootfs"));
        assert!(!bundle.terminal());
    }

    #[test]
    fn bad_bundles_are_refused_with_the_reason() {
        let missing = Bundle::load(Path::new("/nonexistent/bundle"));
        assert!(matches!(missing, Err(BundleError::Missing(_))));
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            Bundle::load(dir.path()),
            Err(BundleError::NoConfig(_))
        ));
        std::fs::write(dir.path().join("config.json"), "{not json").expect("write");
        assert!(matches!(
            Bundle::load(dir.path()),
            Err(BundleError::InvalidJson(..))
        ));
        let mut no_rootfs = spec();
        no_rootfs["root"]["path"] = json!("nope");
        let dir = bundle_dir(&no_rootfs);
        assert!(matches!(
            Bundle::load(dir.path()),
            Err(BundleError::RootfsMissing(_))
        ));
    }

    #[test]
    fn spec_problems_are_named() {
        let mut s = spec();
        s["process"].as_object_mut().expect("object").remove("args");
        let err = validate_spec(&s).expect_err("no args");
        assert_eq!(err.to_string(), "config.json: missing field process.args");
        s["process"]["args"] = json!([]);
        assert!(matches!(validate_spec(&s), Err(BundleError::Invalid(m)) if m.contains("empty")));
        let mut v2 = spec();
        v2["ociVersion"] = json!("2.0.0");
        assert!(matches!(
            validate_spec(&v2),
            Err(BundleError::UnsupportedVersion(v)) if v == "2.0.0"
        ));
        let mut no_root = spec();
        no_root.as_object_mut().expect("object").remove("root");
        assert!(
            matches!(validate_spec(&no_root), Err(BundleError::Invalid(m)) if m.contains("root.path"))
        );
    }

    #[test]
    fn namespace_paths_must_be_namespaces_of_their_type() {
        let with = |kind: &str, path: &str| json!({"linux": {"namespaces": [{"type": "pid"}, {"type": kind, "path": path}]}});
        check_namespace_paths(&with("ipc", "/proc/self/ns/ipc")).expect("an ipc namespace");
        check_namespace_paths(&with("network", "/proc/self/ns/net")).expect("a net namespace");
        let err = check_namespace_paths(&with("network", "/proc/self/ns/ipc"))
            .expect_err("wrong type")
            .to_string();
        assert_eq!(
            err,
            "config.json: namespace network path /proc/self/ns/ipc: a namespace of type ipc, not \
             network"
        );
        let err = check_namespace_paths(&with("uts", "/nonexistent/ns"))
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("uts path /nonexistent/ns: cannot open it"),
            "{err}"
        );
        let err = check_namespace_paths(&with("ipc", "/proc/self/status"))
            .expect_err("a plain file")
            .to_string();
        assert!(err.contains("not a namespace file"), "{err}");
        let err = check_namespace_paths(&with("bogus", "/proc/self/ns/ipc"))
            .expect_err("unknown type")
            .to_string();
        assert!(err.contains("unknown namespace type"), "{err}");
    }

    #[test]
    fn malformed_hooks_are_refused_by_name() {
        let mut s = spec();
        s["hooks"] = json!({"prestart": [{"path": "relative/hook"}]});
        let err = validate_spec(&s).expect_err("relative path").to_string();
        assert!(err.contains("hooks.prestart[0]: path"), "{err}");
    }

    #[test]
    fn translation_rewrites_paths_to_the_share() {
        let dir = bundle_dir(&spec());
        let bundle = Bundle::load(dir.path()).expect("valid");
        let t = translate_spec(&bundle, "c1");
        assert_eq!(t.spec["root"]["path"], "/run/husk/shared/c1/rootfs");
        assert_eq!(t.spec["mounts"][0]["source"], "proc");
        assert_eq!(
            t.spec["mounts"][1]["source"],
            "/run/husk/shared/c1/mounts/0"
        );
        assert_eq!(
            t.spec["mounts"][2]["source"],
            "/run/husk/shared/c1/mounts/1"
        );
        assert_eq!(
            t.binds,
            vec![
                BindPlan {
                    source: dir.path().join("rootfs"),
                    target: "rootfs".into(),
                    is_dir: true
                },
                BindPlan {
                    source: dir.path().join("data"),
                    target: "mounts/0".into(),
                    is_dir: true
                },
                BindPlan {
                    source: "/etc/hosts".into(),
                    target: "mounts/1".into(),
                    is_dir: false
                },
            ]
        );
        assert!(t.spec.get("hooks").is_none());
        assert!(t.spec["linux"]["resources"].get("blockIO").is_none());
        assert_eq!(t.spec["linux"]["resources"]["cpu"]["shares"], 2);
        assert!(t.spec["linux"]["namespaces"][0].get("path").is_none());
        // The network namespace's path is the caller's to report (`crate::network`).
        assert!(t.notes.is_empty(), "{:?}", t.notes);
    }

    #[test]
    fn ignored_resources_are_dropped_each_with_a_warning() {
        let mut s = spec();
        s["linux"]["resources"] = json!({
            "memory": {"limit": 1048576, "kernel": 1, "kernelTCP": 2, "swappiness": 60},
            "network": {"classID": 1048577},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "devices": [{"allow": false, "access": "rwm"}]
        });
        let dir = bundle_dir(&s);
        let bundle = Bundle::load(dir.path()).expect("valid");
        let t = translate_spec(&bundle, "c1");
        let r = &t.spec["linux"]["resources"];
        assert_eq!(
            r["memory"],
            json!({"limit": 1048576}),
            "only the limit is left"
        );
        assert!(r.get("network").is_none() && r.get("hugepageLimits").is_none());
        assert_eq!(
            r["devices"],
            json!([{"allow": false, "access": "rwm"}]),
            "applied in the guest"
        );
        for field in [
            "memory.kernel ",
            "memory.kernelTCP ",
            "memory.swappiness ",
            "resources.network ",
            "hugepageLimits ",
        ] {
            assert!(
                t.notes
                    .iter()
                    .any(|n| n.contains(field) && n.contains("ignored")),
                "a warning names {field}: {:?}",
                t.notes
            );
        }
    }
}
