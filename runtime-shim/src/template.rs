//! Warm start: sandboxes restored from templates, for the CLI and the shim.
//!
//! A template is a guest booted to its agent's readiness and saved by `husk-vmm
//! --template-out` (see `husk_vmm::snapshot`). One exists per shape of sandbox: it is keyed
//! by everything that shapes the guest (husk version, the `husk-vmm` binary, the kernel and
//! initramfs files, vCPUs, memory, the host kernel, and `debug`: a debug sandbox's guest has
//! the serial console, so its template is booted with it), built on first use (or by `husk template
//! build`), and kept root-only under [`DEFAULT_TEMPLATE_DIR`] (`template_dir` in
//! config.toml). husk-vmm verifies a template before each restore (its digests and inputs,
//! CPUID included) and refuses one that does not match, exiting with
//! [`husk_vmm::vmm::TEMPLATE_REFUSED_EXIT`]; the runtime then logs why, throws the template
//! away (the next sandbox rebuilds it) and boots the sandbox. A user never sees a failure
//! because of a template.
//!
//! On by default; off with `warm_start = false` in config.toml, or per sandbox with the
//! annotation `io.husk.vm.warm_start=false`. Sandboxes with network cards restore templates
//! of their own, whose guest has as many cards on no TAP (down, without an address): the
//! sandbox's TAPs go under them, and the agent sets their MAC addresses, MTUs, addresses and
//! routes from the renewal. The network that docker's hooks make in a namespace husk-vmm is already in (see
//! `commands::create`) is not known when the VM is built: such a sandbox boots.
//!
//! Builds are serialized per key by a lock file; a build is made in a directory of its own and
//! renamed into place once complete, so a build killed half-way (even with `kill -9`) leaves
//! nothing a restore would use; its leftovers are removed by the next build.

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::HuskConfig;
use crate::sizing::VmSize;

/// Where templates live unless config.toml says otherwise.
pub const DEFAULT_TEMPLATE_DIR: &str = "/var/lib/husk/templates";
/// Annotation that turns warm start off (`false`) or on (`true`) for one sandbox.
pub const ANNOTATION_WARM_START: &str = "io.husk.vm.warm_start";

/// Whether the sandbox of `spec` is to start from a template: the configuration, overridden
/// by the annotation.
pub fn wanted(cfg: &HuskConfig, spec: &serde_json::Value) -> Result<bool> {
    match spec["annotations"][ANNOTATION_WARM_START].as_str() {
        None => Ok(cfg.warm_start),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => {
            bail!("annotation {ANNOTATION_WARM_START}={other:?}: expected true or false")
        }
    }
}

/// The templates of one host.
pub struct Templates {
    root: PathBuf,
}

/// A file's identity in a key.
fn stamp(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(format!(
        "{}:{}:{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

fn host_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {}",
                u.release().to_string_lossy(),
                u.version().to_string_lossy()
            )
        })
        .unwrap_or_default()
}

impl Templates {
    /// The templates under the configured directory.
    pub fn new(cfg: &HuskConfig) -> Templates {
        Templates {
            root: cfg
                .template_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TEMPLATE_DIR)),
        }
    }

    /// The directory of the template for a sandbox of `size` booted from these images, with
    /// `cards` network cards.
    pub fn dir_for(
        &self,
        cfg: &HuskConfig,
        kernel: &Path,
        initramfs: &Path,
        size: VmSize,
        cards: u8,
    ) -> Result<PathBuf> {
        let vmm = resolve(&cfg.vmm_path());
        let mut hasher = Sha256::new();
        for part in [
            env!("CARGO_PKG_VERSION").to_string(),
            stamp(&vmm)?,
            stamp(kernel)?,
            stamp(initramfs)?,
            host_kernel(),
            // A debug sandbox's guest keeps its console, so its template is booted with it.
            crate::container::debug_vmm_args(cfg.debug).join(" "),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let digest: String = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(self
            .root
            .join(format!("{}{digest}", shape_prefix(size, cards, cfg.debug))))
    }

    /// The template for a sandbox of `size` with `cards` network cards, built first
    /// if there is none. `None` (after a log line through `log` saying why) when none can be
    /// had: the sandbox boots.
    pub fn get(
        &self,
        cfg: &HuskConfig,
        kernel: &Path,
        initramfs: &Path,
        size: VmSize,
        cards: u8,
        log: fn(&str),
    ) -> Option<PathBuf> {
        let result = self
            .dir_for(cfg, kernel, initramfs, size, cards)
            .and_then(|dir| {
                self.ensure(cfg, kernel, initramfs, size, cards, &dir)
                    .map(|()| dir)
            });
        match result {
            Ok(dir) => Some(dir),
            Err(e) => {
                log(&format!("warm start: no template ({e:#}); booting"));
                None
            }
        }
    }

    /// Builds the template at `dir` unless it exists.
    pub fn ensure(
        &self,
        cfg: &HuskConfig,
        kernel: &Path,
        initramfs: &Path,
        size: VmSize,
        cards: u8,
        dir: &Path,
    ) -> Result<()> {
        if dir.join(husk_vmm::snapshot::STATE_FILE).exists() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let name = dir
            .file_name()
            .context("a template directory has a name")?
            .to_string_lossy()
            .into_owned();
        let lock_path = self.root.join(format!(".{name}.lock"));
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        if dir.join(husk_vmm::snapshot::STATE_FILE).exists() {
            return Ok(());
        }
        self.remove_stale_builds(&name);
        let build = self
            .root
            .join(format!(".build-{name}-{}", std::process::id()));
        let result = build_into(cfg, kernel, initramfs, size, cards, &build, dir);
        remove_dir(&build);
        if result.is_ok() {
            self.remove_superseded(size, cards, cfg.debug, &name);
        }
        result
    }

    /// Removes the other templates of this shape (and console): made from inputs that changed
    /// since (a new kernel, initramfs or husk), they would never be restored again. A sandbox
    /// restoring one right now keeps its mapping; one about to is refused and boots.
    fn remove_superseded(&self, size: VmSize, cards: u8, console: bool, keep: &str) {
        let prefix = shape_prefix(size, cards, console);
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The prefix then the digest alone: `1cpu-128mib-` is not the shape of
            // `1cpu-128mib-console-...`, a debug sandbox's template, which lives beside it.
            let same_shape = name.strip_prefix(&prefix).is_some_and(|digest| {
                !digest.is_empty() && digest.chars().all(|c| c.is_ascii_hexdigit())
            });
            if name != keep && same_shape && entry.path().is_dir() {
                log::info!(
                    "removing the superseded template {}",
                    entry.path().display()
                );
                self.discard(&entry.path());
            }
        }
    }

    /// Removes build directories of `name` whose builder is gone (killed half-way).
    fn remove_stale_builds(&self, name: &str) {
        let prefix = format!(".build-{name}-");
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name.strip_prefix(&prefix) else {
                continue;
            };
            let alive = pid
                .parse::<i32>()
                .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                remove_dir(&entry.path());
            }
        }
    }

    /// Throws a template away (it was refused): the next sandbox of its shape rebuilds it.
    pub fn discard(&self, dir: &Path) {
        let Some(name) = dir.file_name() else {
            return;
        };
        let trash = self.root.join(format!(
            ".discard-{}-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if std::fs::rename(dir, &trash).is_ok() {
            remove_dir(&trash);
        }
    }

    /// Removes every template.
    pub fn clear(&self) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.root.display()))
            }
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                remove_dir(&entry.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Records the write set of the template in `dir` (see `husk_vmm::write_set`) if it has none
/// yet: the guest pages that husk-vmm `pid`, restored from it, has its own copies of now (its
/// `/proc/PID/pagemap`). Called once a sandbox's first container is created, so that later
/// restores copy those pages ahead of the guest. Returns how many pages it holds, or `None`
/// when the template has a write set already.
///
/// Where guest memory lies in husk-vmm is read off its mappings of the memory file: a restore
/// maps the file's runs of data over each region's anonymous memory, so a mapping at `addr` of
/// file offset `o` in the region that starts at file offset `f` puts the region at
/// `addr - (o - f)`.
pub fn record_write_set(dir: &Path, pid: i32) -> Result<Option<u64>> {
    use husk_vmm::write_set;
    use std::os::unix::fs::FileExt;
    if dir.join(write_set::WRITE_SET_FILE).exists() {
        return Ok(None);
    }
    let template = husk_vmm::snapshot::Template::load(dir)?;
    let memory = dir.join(husk_vmm::snapshot::MEMORY_FILE);
    let meta =
        std::fs::metadata(&memory).with_context(|| format!("cannot stat {}", memory.display()))?;
    let maps_path = format!("/proc/{pid}/maps");
    let maps =
        std::fs::read_to_string(&maps_path).with_context(|| format!("cannot read {maps_path}"))?;
    let file_mappings: Vec<MapsLine> = maps
        .lines()
        .filter_map(parse_maps_line)
        .filter(|m| m.dev == dev_pair(meta.dev()) && m.inode == meta.ino())
        .collect();
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = std::fs::File::open(&pagemap_path)
        .with_context(|| format!("cannot open {pagemap_path}"))?;
    let page = husk_vmm::vstate::memory::page_size();
    let mut ranges = Vec::new();
    for region in &template.memory.regions {
        let Some(host) = region_host_start(&file_mappings, region.file_offset, region.len) else {
            continue;
        };
        let mut raw = vec![0u8; usize::try_from(region.len / page * 8)?];
        pagemap
            .read_exact_at(&mut raw, host / page * 8)
            .with_context(|| format!("cannot read {pagemap_path}"))?;
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        ranges.extend(write_set::written_in_mapping(
            region.file_offset,
            page,
            &entries,
        ));
    }
    let ranges = write_set::normalize(ranges);
    if ranges.is_empty() {
        bail!(
            "husk-vmm (pid {pid}) maps no written page of {}",
            memory.display()
        );
    }
    // Every later sandbox holds a copy of each page from its start: a set larger than a
    // create writes (a guest that wrote much more before its container existed) is not kept.
    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
    let memory_bytes: u64 = template.memory.regions.iter().map(|r| r.len).sum();
    if bytes > memory_bytes / WRITE_SET_MAX_SHARE {
        bail!(
            "husk-vmm (pid {pid}) wrote {} MiB, more than 1/{WRITE_SET_MAX_SHARE} of guest memory",
            bytes >> 20
        );
    }
    write_set::write(dir, &template.memory, &ranges)?;
    Ok(Some(bytes / page))
}

/// A write set is kept only if it is at most this share of guest memory (a create writes
/// about 7 MiB, a twentieth of a 128 MiB guest).
const WRITE_SET_MAX_SHARE: u64 = 4;

/// Where the region of `len` bytes at `file_offset` in the memory file starts in the VMM, from
/// its mappings of that file; `None` when none lies in the region (or they disagree).
fn region_host_start(mappings: &[MapsLine], file_offset: u64, len: u64) -> Option<u64> {
    let mut starts = mappings
        .iter()
        .filter(|m| m.offset >= file_offset && m.offset < file_offset + len)
        .map(|m| m.start.checked_sub(m.offset - file_offset));
    let first = starts.next()??;
    starts.all(|s| s == Some(first)).then_some(first)
}

/// One line of `/proc/PID/maps`: the range, the file offset, the device and the inode.
#[derive(Debug, PartialEq)]
struct MapsLine {
    start: u64,
    end: u64,
    offset: u64,
    dev: (u64, u64),
    inode: u64,
}

fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let _perms = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let (start, end) = (hex(start)?, hex(end)?);
    (start < end).then_some(())?;
    Some(MapsLine {
        start,
        end,
        offset: hex(offset)?,
        dev: (hex(major)?, hex(minor)?),
        inode,
    })
}

/// A `st_dev` as the (major, minor) pair `/proc/PID/maps` shows.
fn dev_pair(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The start of the directory names of a shape's templates (`1cpu-128mib-`), of those with
/// network cards (`1cpu-128mib-net-` with one, `1cpu-128mib-net2-` with two, ...), and of
/// those booted with the serial console for debug sandboxes (`1cpu-128mib-console-`); the
/// digest of the inputs follows.
fn shape_prefix(size: VmSize, cards: u8, console: bool) -> String {
    let card = match cards {
        0 => String::new(),
        1 => "net-".to_string(),
        n => format!("net{n}-"),
    };
    let console = if console { "console-" } else { "" };
    format!("{}cpu-{}mib-{card}{console}", size.vcpus, size.mem_mib)
}

/// The `husk-vmm` binary as a path (searched in `$PATH` if it is a bare name).
fn resolve(vmm: &Path) -> PathBuf {
    if vmm.components().count() > 1 {
        return vmm.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(vmm))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| vmm.to_path_buf())
}

fn remove_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Boots a template guest in `build` (its share, socket and output) and renames the result
/// to `dest` once husk-vmm wrote all of it.
fn build_into(
    cfg: &HuskConfig,
    kernel: &Path,
    initramfs: &Path,
    size: VmSize,
    cards: u8,
    build: &Path,
    dest: &Path,
) -> Result<()> {
    let out = build.join("template");
    let share = build.join("share");
    for dir in [&out, &share] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut cmd = Command::new(cfg.vmm_path());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .arg("--cpus")
        .arg(size.vcpus.to_string())
        .arg("--mem-mib")
        .arg(size.mem_mib.to_string())
        .arg("--vsock-socket")
        .arg(build.join("v.sock"))
        .arg("--shared-dir")
        .arg(&share)
        .arg("--template-out")
        .arg(&out)
        .arg("--agent-timeout-ms")
        .arg(cfg.agent_timeout.as_millis().to_string())
        .arg("--log-level")
        .arg("warn")
        .args(crate::container::debug_vmm_args(cfg.debug))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if cards > 0 {
        cmd.arg("--template-net-cards").arg(cards.to_string());
    }
    // SAFETY: prctl with integer arguments is async-signal-safe. The template guest dies with
    // the runtime that builds it (a killed build is never renamed into place).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    // Spawned and waited for in one thread: the child's parent, whose end would SIGKILL it.
    let run = || -> Result<(std::process::ExitStatus, std::process::Child)> {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", cfg.vmm_path().display()))?;
        let deadline = started + cfg.agent_timeout + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, child));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("husk-vmm did not save the template in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (status, mut child) =
        crate::container::in_new_pid_namespace(run, &|w: &str| log::warn!("template build: {w}"))?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        bail!(
            "husk-vmm --template-out exited {status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    std::fs::rename(&out, dest)
        .with_context(|| format!("cannot move the template to {}", dest.display()))?;
    log::info!(
        "template {} built in {} ms",
        dest.display(),
        started.elapsed().as_millis()
    );
    Ok(())
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_range_offset_device_and_inode() {
        assert_eq!(
            parse_maps_line(
                "7f0000000000-7f0008000000 rw-p 00200000 fe:01 1234   /var/lib/husk/templates/x/memory"
            ),
            Some(MapsLine {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0800_0000,
                offset: 0x20_0000,
                dev: (0xfe, 1),
                inode: 1234,
            })
        );
        assert_eq!(
            parse_maps_line("7ffd1000-7ffd2000 r-xp 00000000 00:00 0  [vdso]").map(|m| m.inode),
            Some(0)
        );
        assert_eq!(parse_maps_line("garbage"), None);
        assert_eq!(parse_maps_line("2000-1000 r--p 0 00:00 0"), None);
    }

    #[test]
    fn a_region_is_found_from_its_mappings_of_the_file() {
        let line = |start: u64, offset: u64| MapsLine {
            start,
            end: start + 0x1000,
            offset,
            dev: (0, 0),
            inode: 1,
        };
        let region = 0x7f00_0000_0000;
        let mappings = [line(region + 0x5000, 0x5000), line(region + 0x9000, 0x9000)];
        assert_eq!(region_host_start(&mappings, 0, 0x10_0000), Some(region));
        // A second region, later in the file, mapped elsewhere.
        let second = [line(0x7e00_0000_2000, 0x10_2000)];
        assert_eq!(
            region_host_start(&second, 0x10_0000, 0x10_0000),
            Some(0x7e00_0000_0000)
        );
        assert_eq!(region_host_start(&second, 0, 0x10_0000), None);
        let disagree = [line(region, 0), line(region + 0x9000, 0x8000)];
        assert_eq!(region_host_start(&disagree, 0, 0x10_0000), None);
    }

    #[test]
    fn devices_split_as_the_kernel_prints_them() {
        let meta = std::fs::metadata("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let line = maps
            .lines()
            .filter_map(|l| Some((parse_maps_line(l)?, l)))
            .find(|(_, l)| l.ends_with(&*exe.to_string_lossy()))
            .expect("the test binary is mapped")
            .0;
        assert_eq!(line.inode, meta.ino());
        assert_eq!(line.dev, dev_pair(meta.dev()));
        assert_eq!(dev_pair(0xfe01), (0xfe, 1));
        assert_eq!(dev_pair((259 << 8) | 3), (259, 3));
    }

    #[test]
    fn the_annotation_overrides_the_configuration() {
        let on = HuskConfig::default();
        assert!(on.warm_start);
        let off = HuskConfig {
            warm_start: false,
            ..HuskConfig::default()
        };
        let spec = |v: &str| serde_json::json!({"annotations": {ANNOTATION_WARM_START: v}});
        assert!(wanted(&on, &serde_json::json!({})).unwrap());
        assert!(!wanted(&off, &serde_json::json!({})).unwrap());
        assert!(!wanted(&on, &spec("false")).unwrap());
        assert!(wanted(&off, &spec("true")).unwrap());
        let err = wanted(&on, &spec("no")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation io.husk.vm.warm_start=\"no\": expected true or false"
        );
    }

    #[test]
    fn keys_change_with_the_images_and_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initramfs = dir.path().join("initramfs");
        let vmm = dir.path().join("husk-vmm");
        for f in [&kernel, &initramfs, &vmm] {
            std::fs::write(f, b"x").unwrap();
        }
        let cfg = HuskConfig {
            vmm: Some(vmm),
            template_dir: Some(dir.path().join("t")),
            ..HuskConfig::default()
        };
        let templates = Templates::new(&cfg);
        let size = VmSize {
            vcpus: 1,
            mem_mib: 128,
        };
        let a = templates
            .dir_for(&cfg, &kernel, &initramfs, size, 0)
            .unwrap();
        assert!(a.starts_with(dir.path().join("t")));
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("1cpu-128mib-"));
        assert_eq!(
            a,
            templates
                .dir_for(&cfg, &kernel, &initramfs, size, 0)
                .unwrap()
        );
        let bigger = VmSize {
            vcpus: 2,
            mem_mib: 128,
        };
        assert_ne!(
            a,
            templates
                .dir_for(&cfg, &kernel, &initramfs, bigger, 0)
                .unwrap()
        );
        // A sandbox with a network card has its own, with a card on no TAP.
        let card = templates
            .dir_for(&cfg, &kernel, &initramfs, size, 1)
            .unwrap();
        assert_ne!(a, card);
        assert!(card
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("1cpu-128mib-net-"));
        // With two cards, another template again.
        let two = templates
            .dir_for(&cfg, &kernel, &initramfs, size, 2)
            .unwrap();
        assert_ne!(two, card);
        assert!(two
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("1cpu-128mib-net2-"));
        // A debug sandbox's template is booted with the serial console: another template.
        let debug = HuskConfig {
            debug: true,
            ..cfg.clone()
        };
        assert_ne!(
            a,
            templates
                .dir_for(&debug, &kernel, &initramfs, size, 0)
                .unwrap()
        );
        // A new kernel (replaced by rename, as builds do) is a new template.
        std::fs::write(dir.path().join("new"), b"y").unwrap();
        std::fs::rename(dir.path().join("new"), &kernel).unwrap();
        assert_ne!(
            a,
            templates
                .dir_for(&cfg, &kernel, &initramfs, size, 0)
                .unwrap()
        );
    }

    #[test]
    fn a_new_template_supersedes_the_others_of_its_shape_and_console_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HuskConfig {
            template_dir: Some(dir.path().to_path_buf()),
            ..HuskConfig::default()
        };
        let templates = Templates::new(&cfg);
        for name in [
            "1cpu-128mib-0123456789abcdef",
            "1cpu-128mib-fedcba9876543210",
            "1cpu-128mib-console-0123456789abcdef",
            "1cpu-128mib-console-00000000000000ff",
            "1cpu-128mib-net-00000000000000ff",
            "2cpu-128mib-0123456789abcdef",
            "1cpu-1280mib-0123456789abcdef",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let size = VmSize {
            vcpus: 1,
            mem_mib: 128,
        };
        let left = || {
            let mut left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            left
        };
        // A new template of the shape: the shape's old one goes, the debug ones stay.
        templates.remove_superseded(size, 0, false, "1cpu-128mib-fedcba9876543210");
        assert_eq!(
            left(),
            [
                "1cpu-1280mib-0123456789abcdef",
                "1cpu-128mib-console-00000000000000ff",
                "1cpu-128mib-console-0123456789abcdef",
                "1cpu-128mib-fedcba9876543210",
                "1cpu-128mib-net-00000000000000ff",
                "2cpu-128mib-0123456789abcdef",
            ]
        );
        // A new debug template: the old debug one goes, the shape's stays.
        templates.remove_superseded(size, 0, true, "1cpu-128mib-console-00000000000000ff");
        assert_eq!(
            left(),
            [
                "1cpu-1280mib-0123456789abcdef",
                "1cpu-128mib-console-00000000000000ff",
                "1cpu-128mib-fedcba9876543210",
                "1cpu-128mib-net-00000000000000ff",
                "2cpu-128mib-0123456789abcdef",
            ]
        );
        // One with a card supersedes only those with a card.
        templates.remove_superseded(size, 1, false, "1cpu-128mib-net-0123456789abcdef");
        assert!(!left().contains(&"1cpu-128mib-net-00000000000000ff".to_string()));
        assert_eq!(left().len(), 4);
    }

    #[test]
    fn stale_builds_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HuskConfig {
            template_dir: Some(dir.path().to_path_buf()),
            ..HuskConfig::default()
        };
        let templates = Templates::new(&cfg);
        let dead = dir.path().join(".build-x-999999999");
        let live = dir.path().join(format!(".build-x-{}", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
        templates.remove_stale_builds("x");
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
