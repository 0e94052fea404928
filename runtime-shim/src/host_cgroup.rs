//! The host cgroup of a container's `husk-vmm`.
//!
//! runc puts a container's processes into the cgroup that `linux.cgroupsPath` names. Under husk
//! the container's one host process is its `husk-vmm` (the pid the engine sees), so that is what
//! goes there, as with Kata's `sandbox_cgroup_only`. The container's own limits (memory, CPU,
//! pids, devices) apply in the guest's cgroup, to the guest's processes. On the host, the
//! cgroup does three things:
//!
//! - **It caps the VMM's memory** (`memory.max`, [`memory_cap_bytes`]) at the guest's memory,
//!   plus [`VMM_MEM_OVERHEAD_MIB`] for the VMM's own heap, stacks and buffers (about 5 MiB),
//!   KVM's structures and page tables and a working set of the page cache of the files it
//!   serves (which the kernel reclaims before it would kill), plus the host kernel memory that
//!   the share's inodes the guest holds pin (their number is bounded by the guest's memory:
//!   [`husk_vmm::devices::virtio::fs::max_inodes_for`], each counted at
//!   [`husk_vmm::devices::virtio::fs::HELD_INODE_HOST_BYTES`]; 192 MiB for a 512 MiB guest).
//!   So a VMM cannot take more of the host than that, whatever the guest makes it do; a guest
//!   that fills its memory and walks tens of thousands of files stays under it.
//! - **It carries `linux.resources.blockIO`.** The container's file I/O reaches the host's disks
//!   as the VMM's own reads and writes (virtio-fs), so the weights and throttles apply here,
//!   written as runc writes them on cgroup v2 ([`io_files`]). The guest has no block device for
//!   an io controller of its own.
//! - **It is where engines look** for a container's host usage.
//!
//! The path is `linux.cgroupsPath` as runc reads it ([`relative_path`]): a cgroupfs path, or
//! systemd's `slice:prefix:name`, which becomes the directory systemd itself would use
//! (`machine.slice:libpod:ID` is `machine.slice/libpod-ID.scope`; no systemd unit is made).
//! Without a path it is `husk/<id>` (`husk/<root tag>-<id>` for a state root other than the
//! default, so that two roots with the same id do not share a cgroup).
//!
//! The leaf is made if missing, with the controllers enabled in the levels above. The VMM
//! enters it between fork and exec ([`HostCgroup::join_on_exec`]), so every page it touches is
//! charged there. The leaf is recorded in the state directory ([`record`]). Every way the
//! state directory goes removes it ([`release_recorded`]), killing what is left in it first,
//! as runc's `delete` does.
//!
//! This needs cgroup v2. On a host without it (cgroup v1 or hybrid), the VMM stays where husk
//! runs, with a warning, and a `blockIO` then fails `create`, naming why.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Host memory a VMM may use beyond its guest's memory and its share's held inodes (see the
/// module docs).
pub const VMM_MEM_OVERHEAD_MIB: u64 = 64;

/// The memory cap of the VMM of a guest of `guest_mem_mib` MiB (see the module docs).
pub fn memory_cap_bytes(guest_mem_mib: u64) -> u64 {
    use husk_vmm::devices::virtio::fs::{max_inodes_for, HELD_INODE_HOST_BYTES};
    let inodes = u64::try_from(max_inodes_for(guest_mem_mib)).unwrap_or(u64::MAX);
    (guest_mem_mib + VMM_MEM_OVERHEAD_MIB)
        .saturating_mul(1 << 20)
        .saturating_add(inodes.saturating_mul(HELD_INODE_HOST_BYTES))
}

/// The controllers enabled on the way down to a VMM's cgroup: `memory` for the cap, `io` for
/// `blockIO`, `cpu` and `pids` for what engines report. A controller the host lacks is left
/// out; the write that needs it then fails, naming it.
const CONTROLLERS: [&str; 4] = ["memory", "io", "cpu", "pids"];

/// The file in the state directory that names the VMM's cgroup.
const RECORD_FILE: &str = "host-cgroup";

/// How long a cgroup may take to empty (its processes killed) and be removed.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether [`CGROUP_ROOT`] is a cgroup v2 hierarchy.
pub fn available() -> bool {
    nix::sys::statfs::statfs(CGROUP_ROOT)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The VMM's cgroup, relative to [`CGROUP_ROOT`], for a container `id` whose state root is
/// `root` (see the module docs).
pub fn relative_path(spec: &Value, root: &Path, id: &str) -> Result<PathBuf> {
    let Some(path) = spec["linux"]["cgroupsPath"]
        .as_str()
        .filter(|p| !p.is_empty())
    else {
        let leaf = if root == Path::new(crate::container::DEFAULT_ROOT) {
            id.to_string()
        } else {
            let tag = crate::container::fnv1a(root.as_os_str().as_encoded_bytes()) as u32;
            format!("{tag:08x}-{id}")
        };
        return Ok(Path::new("husk").join(leaf));
    };
    let raw = if !path.starts_with('/') && path.matches(':').count() == 2 {
        systemd_path(path)?
    } else {
        PathBuf::from(path)
    };
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                bail!("linux.cgroupsPath {path:?}: '..' is not allowed")
            }
        }
    }
    if out.as_os_str().is_empty() {
        bail!("linux.cgroupsPath {path:?}: names the root cgroup, which cannot hold a container");
    }
    Ok(out)
}

/// Takes `blockIO` out of `linux.resources` bound for the guest (it applies to the VMM's host
/// cgroup, see the module docs); `None` when there is none or it sets nothing (docker sends
/// `{"weight": 0}` and the like).
pub fn take_block_io(resources: Option<&mut Value>) -> Option<Value> {
    resources
        .and_then(Value::as_object_mut)
        .and_then(|r| r.remove("blockIO"))
        .filter(|b| !crate::bundle::is_unset(b))
}

/// Where the VMM of container `id` (state root `root`) runs, checked before anything is made:
/// the path ([`relative_path`]) and `block_io` ([`io_files`]). `None` on a host without cgroup
/// v2, with a warning; a `block_io` then fails, naming why.
pub fn plan(
    spec: &Value,
    root: &Path,
    id: &str,
    block_io: Option<&Value>,
    warn: &dyn Fn(&str),
) -> Result<Option<PathBuf>> {
    let relative = relative_path(spec, root, id)?;
    if let Some(block_io) = block_io {
        io_files(block_io, false)?;
    }
    if available() {
        return Ok(Some(relative));
    }
    if block_io.is_some() {
        bail!(
            "linux.resources.blockIO needs a cgroup v2 host: husk applies it to husk-vmm's host \
             cgroup, and {CGROUP_ROOT} is not a cgroup2 mount"
        );
    }
    warn(&format!(
        "{CGROUP_ROOT} is not a cgroup v2 mount: husk-vmm runs in husk's own cgroup, its memory \
         not capped"
    ));
    Ok(None)
}

/// systemd's `slice:prefix:name` as the directory systemd gives the unit: the slice's
/// ancestors in turn (`a-b.slice` lies in `a.slice`), then `prefix-name.scope`. An empty slice
/// is `system.slice`, as with runc.
fn systemd_path(path: &str) -> Result<PathBuf> {
    let mut parts = path.splitn(3, ':');
    let (slice, prefix, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(slice), Some(prefix), Some(name)) => (slice, prefix, name),
        _ => bail!("linux.cgroupsPath {path:?}: expected slice:prefix:name"),
    };
    let bad = |why: &str| anyhow::anyhow!("linux.cgroupsPath {path:?} (systemd form): {why}");
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return Err(bad("the name must be set and no part may contain '/'"));
    }
    if name.ends_with(".slice") {
        return Err(bad("a slice as the unit is not supported; name a scope"));
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let Some(stem) = slice.strip_suffix(".slice").filter(|s| !s.contains('/')) else {
        return Err(bad("the slice must end in .slice"));
    };
    let mut dir = PathBuf::new();
    if stem != "-" {
        let mut name_so_far = String::new();
        for part in stem.split('-') {
            if part.is_empty() {
                return Err(bad("the slice name has an empty part"));
            }
            if !name_so_far.is_empty() {
                name_so_far.push('-');
            }
            name_so_far.push_str(part);
            dir.push(format!("{name_so_far}.slice"));
        }
    }
    dir.push(if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Ok(dir)
}

/// A cgroup file and the value written to it.
pub type FileWrite = (String, String);

/// The cgroup v2 files and values that carry an OCI `blockIO`, as runc writes them, and notes
/// on what cgroup v2 cannot carry (as runc, those are ignored):
/// - `weight` goes to `io.bfq.weight` where the BFQ scheduler offers it (`bfq`), else to
///   `io.weight`, converted from blkio's 10..1000 to 1..10000 as runc does;
/// - `weightDevice` goes to `io.bfq.weight` as `MAJ:MIN WEIGHT`, with BFQ only;
/// - the four throttles go to `io.max` as `MAJ:MIN rbps=N` (`wbps`, `riops`, `wiops`);
/// - `leafWeight` (in both places) has no cgroup v2 file.
pub fn io_files(block_io: &Value, bfq: bool) -> Result<(Vec<FileWrite>, Vec<String>)> {
    let Some(obj) = block_io.as_object() else {
        bail!("linux.resources.blockIO: expected an object");
    };
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let weight = |what: &str, v: &Value| -> Result<Option<u64>> {
        match v {
            Value::Null => Ok(None),
            v => match v.as_u64() {
                Some(0) => Ok(None),
                Some(w @ 10..=1000) => Ok(Some(w)),
                _ => bail!("linux.resources.blockIO.{what} {v}: must be 10 to 1000"),
            },
        }
    };
    let device = |what: &str, entry: &Value| -> Result<String> {
        match (entry["major"].as_u64(), entry["minor"].as_u64()) {
            (Some(major), Some(minor)) => Ok(format!("{major}:{minor}")),
            _ => bail!("linux.resources.blockIO.{what}: an entry without major and minor: {entry}"),
        }
    };
    let entries = |what: &str| -> Result<&[Value]> {
        match &obj.get(what) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(all)) => Ok(all),
            Some(v) => bail!("linux.resources.blockIO.{what}: expected a list, got {v}"),
        }
    };
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "weight"
                | "leafWeight"
                | "weightDevice"
                | "throttleReadBpsDevice"
                | "throttleWriteBpsDevice"
                | "throttleReadIOPSDevice"
                | "throttleWriteIOPSDevice"
        ) {
            bail!("linux.resources.blockIO.{key}: not an OCI blockIO field");
        }
    }
    if let Some(w) = weight("weight", obj.get("weight").unwrap_or(&Value::Null))? {
        if bfq {
            files.push(("io.bfq.weight".to_string(), w.to_string()));
        } else {
            files.push((
                "io.weight".to_string(),
                (1 + (w - 10) * 9999 / 990).to_string(),
            ));
        }
    }
    if obj
        .get("leafWeight")
        .is_some_and(|v| v.as_u64() != Some(0) && !v.is_null())
    {
        notes.push(
            "linux.resources.blockIO.leafWeight is ignored: cgroup v2 has no leaf weights (as runc)"
                .to_string(),
        );
    }
    for entry in entries("weightDevice")? {
        let dev = device("weightDevice", entry)?;
        if entry["leafWeight"].as_u64().is_some_and(|w| w != 0) {
            notes.push(format!(
                "linux.resources.blockIO.weightDevice {dev}: leafWeight is ignored: cgroup v2 \
                 has no leaf weights (as runc)"
            ));
        }
        let Some(w) = weight("weightDevice.weight", &entry["weight"])? else {
            continue;
        };
        if bfq {
            files.push(("io.bfq.weight".to_string(), format!("{dev} {w}")));
        } else {
            notes.push(format!(
                "linux.resources.blockIO.weightDevice {dev}: ignored: a weight per device needs \
                 the BFQ scheduler's io.bfq.weight, which this host's cgroup lacks (as runc)"
            ));
        }
    }
    for (what, key) in [
        ("throttleReadBpsDevice", "rbps"),
        ("throttleWriteBpsDevice", "wbps"),
        ("throttleReadIOPSDevice", "riops"),
        ("throttleWriteIOPSDevice", "wiops"),
    ] {
        for entry in entries(what)? {
            let dev = device(what, entry)?;
            let Some(rate) = entry["rate"].as_u64() else {
                bail!(
                    "linux.resources.blockIO.{what} {dev}: rate must be a number, got {}",
                    entry["rate"]
                );
            };
            // 0 is "no limit" in cgroup v1; cgroup v2 says that with "max".
            let rate = if rate == 0 {
                "max".to_string()
            } else {
                rate.to_string()
            };
            files.push(("io.max".to_string(), format!("{dev} {key}={rate}")));
        }
    }
    Ok((files, notes))
}

/// What a VMM's cgroup gets.
#[derive(Debug, Clone, Default)]
pub struct HostLimits {
    /// The guest's memory, which the cap is worked out from ([`memory_cap_bytes`]).
    pub guest_mem_mib: u64,
    /// `linux.resources.blockIO`, if any.
    pub block_io: Option<Value>,
}

/// A VMM's cgroup, made and limited.
#[derive(Debug)]
pub struct HostCgroup {
    /// Its directory under [`CGROUP_ROOT`].
    pub path: PathBuf,
    procs: File,
}

impl HostCgroup {
    /// Makes the cgroup `relative` (under [`CGROUP_ROOT`]) if it is missing, records it in
    /// state directory `state_dir` (so that removing the state directory removes it, on every
    /// path), and sets `limits`; `warn` gets what is ignored or missing.
    pub fn prepare(
        relative: &Path,
        limits: &HostLimits,
        state_dir: &Path,
        warn: &dyn Fn(&str),
    ) -> Result<HostCgroup> {
        // Recorded first: a `husk create` killed from here on leaves it to `delete --force`.
        record(state_dir, &Path::new(CGROUP_ROOT).join(relative))?;
        let mut dir = PathBuf::from(CGROUP_ROOT);
        for component in relative.components() {
            enable_controllers(&dir);
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating the cgroup {}", dir.display()))
                }
            }
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?;
        let cgroup = HostCgroup { path: dir, procs };
        cgroup.set(limits, warn)?;
        Ok(cgroup)
    }

    /// [`HostCgroup::prepare`] of what [`plan`] returned (nothing where it returned `None`),
    /// with the error named as husk-vmm's host cgroup.
    pub fn prepare_planned(
        planned: Option<&Path>,
        limits: HostLimits,
        state_dir: &Path,
        warn: &dyn Fn(&str),
    ) -> Result<Option<HostCgroup>> {
        planned
            .map(|relative| {
                HostCgroup::prepare(relative, &limits, state_dir, warn)
                    .context("preparing husk-vmm's host cgroup")
            })
            .transpose()
    }

    /// Writes `limits` into the cgroup (at `create`, and `blockIO` again at `update`).
    pub fn set(&self, limits: &HostLimits, warn: &dyn Fn(&str)) -> Result<()> {
        set_limits(&self.path, limits, warn)
    }

    /// Makes the process that `cmd` spawns enter this cgroup before it runs anything: it writes
    /// `0` (itself) into `cgroup.procs`, opened beforehand, between fork and exec. `self` must
    /// outlive the spawn.
    pub fn join_on_exec(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fd: RawFd = self.procs.as_raw_fd();
        // SAFETY: between fork and exec the closure calls only write(2), async-signal-safe, on
        // a descriptor open in the child (it is close-on-exec, so the VMM does not keep it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

/// Writes the memory cap and `blockIO` of `limits` into the cgroup `path`.
pub fn set_limits(path: &Path, limits: &HostLimits, warn: &dyn Fn(&str)) -> Result<()> {
    if limits.guest_mem_mib > 0 {
        let max = path.join("memory.max");
        if max.exists() {
            let bytes = memory_cap_bytes(limits.guest_mem_mib);
            std::fs::write(&max, bytes.to_string())
                .with_context(|| format!("writing {bytes} to {}", max.display()))?;
        } else {
            warn(&format!(
                "husk-vmm's memory is not capped: {} has no memory controller",
                path.display()
            ));
        }
    }
    if let Some(block_io) = &limits.block_io {
        let (files, notes) = io_files(block_io, path.join("io.bfq.weight").exists())?;
        for note in notes {
            warn(&note);
        }
        for (file, value) in files {
            let target = path.join(&file);
            if !target.exists() {
                bail!(
                    "linux.resources.blockIO: {} is missing (is the io controller enabled, and \
                     does the kernel have it?)",
                    target.display()
                );
            }
            std::fs::write(&target, &value).with_context(|| {
                format!(
                    "linux.resources.blockIO: writing {value:?} to {}",
                    target.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Enables [`CONTROLLERS`] for the children of `dir` where it offers them (best effort: a
/// level that holds processes cannot, and the write that needs the controller then says so).
fn enable_controllers(dir: &Path) {
    let Ok(offered) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|c| c == controller);
        if has(&offered) && !has(&enabled) {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
        }
    }
}

fn record_file(dir: &Path) -> PathBuf {
    dir.join(RECORD_FILE)
}

/// Records the VMM's cgroup in state directory `dir`, for [`release_recorded`].
pub fn record(dir: &Path, cgroup: &Path) -> Result<()> {
    crate::state::write_atomic(&record_file(dir), cgroup.as_os_str().as_encoded_bytes())
        .with_context(|| format!("recording the VMM's cgroup {}", cgroup.display()))
}

/// The cgroup recorded in state directory `dir`, if any.
pub fn recorded(dir: &Path) -> Result<Option<PathBuf>> {
    match std::fs::read_to_string(record_file(dir)) {
        Ok(text) => Ok(Some(PathBuf::from(text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", record_file(dir).display())),
    }
}

/// Removes the cgroup recorded in state directory `dir` (its VMM is gone), and the record.
pub fn release_recorded(dir: &Path) -> Result<()> {
    let Some(path) = recorded(dir)? else {
        return Ok(());
    };
    release(&path)?;
    let _ = std::fs::remove_file(record_file(dir));
    Ok(())
}

/// Removes cgroup `path`. What still runs in it is killed first, as runc's `delete` kills
/// what is left in a container's cgroup: the container's VMM is gone by then (the callers saw to
/// it), so anything left is a VMM whose `husk create` died before it recorded the pid. A cgroup
/// that is gone already is fine.
pub fn release(path: &Path) -> Result<()> {
    let inside = path.starts_with(CGROUP_ROOT)
        && path != Path::new(CGROUP_ROOT)
        && path.components().all(|c| c != Component::ParentDir);
    if !inside {
        bail!(
            "refusing to remove {}: not a cgroup below {CGROUP_ROOT}",
            path.display()
        );
    }
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    kill_all(path, &procs);
                }
                if Instant::now() >= deadline {
                    return Err(e).with_context(|| {
                        format!(
                            "removing the cgroup {} (processes in it: {})",
                            path.display(),
                            procs.split_whitespace().collect::<Vec<_>>().join(" ")
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("removing the cgroup {}", path.display()))
            }
        }
    }
}

/// SIGKILLs every process of cgroup `path` (`cgroup.kill`, or each pid of `procs` on a kernel
/// older than 5.14).
fn kill_all(path: &Path, procs: &str) {
    if std::fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in procs
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_memory_cap_is_the_guest_the_overhead_and_the_held_inodes() {
        // 512 MiB guest: 49,152 inodes at 4 KiB are 192 MiB.
        assert_eq!(memory_cap_bytes(512), (512 + 64 + 192) << 20);
        // 64 MiB guest: the floor of 8192 inodes, 32 MiB.
        assert_eq!(memory_cap_bytes(64), (64 + 64 + 32) << 20);
    }

    fn path_of(cgroups_path: &str) -> Result<PathBuf> {
        relative_path(
            &json!({"linux": {"cgroupsPath": cgroups_path}}),
            Path::new("/run/husk"),
            "c1",
        )
    }

    #[test]
    fn cgroupfs_paths_are_taken_below_the_root() {
        assert_eq!(
            path_of("/libpod_parent/libpod-abc").unwrap(),
            Path::new("libpod_parent/libpod-abc")
        );
        assert_eq!(
            path_of("kubepods/pod1/c1").unwrap(),
            Path::new("kubepods/pod1/c1")
        );
        let err = path_of("/a/../../etc").unwrap_err().to_string();
        assert!(err.contains("'..' is not allowed"), "{err}");
        let err = path_of("/").unwrap_err().to_string();
        assert!(err.contains("root cgroup"), "{err}");
    }

    #[test]
    fn systemd_paths_become_the_units_directory() {
        assert_eq!(
            path_of("machine.slice:libpod:abc").unwrap(),
            Path::new("machine.slice/libpod-abc.scope")
        );
        assert_eq!(
            path_of("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            path_of(":runc:abc").unwrap(),
            Path::new("system.slice/runc-abc.scope")
        );
        assert_eq!(path_of("-.slice::abc").unwrap(), Path::new("abc.scope"));
        for bad in [
            "machine:libpod:abc",
            "a--b.slice:p:abc",
            "m.slice:p:",
            "m.slice:p:x.slice",
        ] {
            let err = path_of(bad).unwrap_err().to_string();
            assert!(err.contains("systemd form"), "{bad}: {err}");
        }
    }

    #[test]
    fn without_a_path_the_cgroup_is_huskss_and_per_root() {
        let spec = json!({"linux": {}});
        assert_eq!(
            relative_path(&spec, Path::new("/run/husk"), "c1").unwrap(),
            Path::new("husk/c1")
        );
        let other = relative_path(&spec, Path::new("/tmp/root-a"), "c1").unwrap();
        let another = relative_path(&spec, Path::new("/tmp/root-b"), "c1").unwrap();
        assert!(other.starts_with("husk"), "{}", other.display());
        assert!(
            other.to_string_lossy().ends_with("-c1"),
            "{}",
            other.display()
        );
        assert_ne!(other, another);
    }

    #[test]
    fn block_io_is_written_as_runc_writes_it_on_cgroup_v2() {
        let block_io = json!({
            "weight": 500,
            "leafWeight": 300,
            "weightDevice": [{"major": 8, "minor": 0, "weight": 200, "leafWeight": 10}],
            "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
            "throttleWriteBpsDevice": [{"major": 8, "minor": 16, "rate": 0}],
            "throttleReadIOPSDevice": [{"major": 8, "minor": 0, "rate": 100}],
            "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 50}]
        });
        let (files, notes) = io_files(&block_io, true).unwrap();
        let pairs: Vec<(&str, &str)> = files
            .iter()
            .map(|(f, v)| (f.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("io.bfq.weight", "500"),
                ("io.bfq.weight", "8:0 200"),
                ("io.max", "8:0 rbps=1048576"),
                ("io.max", "8:16 wbps=max"),
                ("io.max", "8:0 riops=100"),
                ("io.max", "8:0 wiops=50"),
            ]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes.iter().all(|n| n.contains("leafWeight")), "{notes:?}");

        // Without BFQ: io.weight with runc's conversion (1 + (w - 10) * 9999 / 990), and no
        // weight per device.
        let (files, notes) = io_files(&block_io, false).unwrap();
        assert_eq!(files[0], ("io.weight".to_string(), "4950".to_string()));
        assert!(files.iter().all(|(f, _)| f != "io.bfq.weight"));
        assert!(notes.iter().any(|n| n.contains("BFQ")), "{notes:?}");
        let (files, _) = io_files(&json!({"weight": 10}), false).unwrap();
        assert_eq!(files, [("io.weight".to_string(), "1".to_string())]);
        let (files, _) = io_files(&json!({"weight": 1000}), false).unwrap();
        assert_eq!(files, [("io.weight".to_string(), "10000".to_string())]);
    }

    #[test]
    fn bad_block_io_is_refused_by_name() {
        for (bad, says) in [
            (json!({"weight": 5}), "must be 10 to 1000"),
            (json!({"weight": 2000}), "must be 10 to 1000"),
            (
                json!({"throttleReadBpsDevice": [{"major": 8, "rate": 1}]}),
                "without major and minor",
            ),
            (
                json!({"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": -1}]}),
                "rate must be",
            ),
            (
                json!({"throttleReadBpsDevice": {"major": 8}}),
                "expected a list",
            ),
            (json!({"weigth": 100}), "not an OCI blockIO field"),
            (json!([1]), "expected an object"),
        ] {
            let err = io_files(&bad, true).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn only_cgroups_below_the_root_are_removed() {
        for path in [
            "/sys/fs/cgroup",
            "/tmp/x",
            "/sys/fs/cgroupx/y",
            "/sys/fs/cgroup/../../tmp",
        ] {
            let err = release(Path::new(path)).unwrap_err().to_string();
            assert!(err.contains("refusing"), "{path}: {err}");
        }
    }
}
