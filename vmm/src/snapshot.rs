//! Templates: a guest booted to its agent's readiness, saved to files, and restored by every
//! sandbox of the same shape instead of a boot (see DESIGN.md "Warm start").
//!
//! A template is a directory with these files:
//! - `state`: [`STATE_MAGIC`], the format version ([`TEMPLATE_FORMAT`], little-endian `u32`), the
//!   length of a JSON body (`u64`), the body (a [`Template`]: what the template was made from,
//!   the VM's and every vCPU's KVM state, every virtio transport, the memory layout) and the
//!   SHA-256 of the body. Anything that does not parse, or whose digest differs, is refused.
//! - `memory`: guest RAM, its regions one after another, sparse: only the pages the guest had
//!   touched and that are not zero are written, the rest are holes. A restore maps its runs of
//!   data `MAP_PRIVATE` over guest memory ([`crate::vstate::memory::map_file_private`]), the
//!   holes staying anonymous zero memory: sandboxes share its page-cache pages until they
//!   write to them, and the file never changes. [`MemoryLayout`] records the ranges that hold
//!   data and their SHA-256. Guest memory the boot mapped from a file (the kernel's text and
//!   read-only data, see [`write_memory`]) is written wherever it is not zero, touched or not:
//!   what the guest never touched there holds the file's bytes, which a restore, mapping only
//!   this file, must find in it. Those untouched pages are the layout's lazy runs, which a
//!   restore maps without bringing them in ahead.
//! - `write-set` (once a sandbox was restored from it): the pages a restore writes first,
//!   copied ahead of the guest ([`crate::write_set`]).
//!
//! Verification before a restore ([`Template::load`] and [`verify_memory`]): the state's
//! digest, every input ([`TemplateInputs`]) against the sandbox's own (husk version, vCPUs,
//! memory, kernel and initramfs files, the CPUID the vCPUs get, the device list), and the
//! memory file: its length, the digest of its data ranges, and that it holds nothing but zeros
//! outside them. The memory file is read whole only when it changed since it was last verified:
//! a `verified` file records the digest with the file's identity (device, inode, size,
//! modification and change times), which any write to the file changes.
//!
//! What a template holds, and what it must not: it is taken after the agent signalled
//! readiness, with no vsock connection open (so no host-side connection state is lost), no
//! container, and the host share not mounted (the agent of a template boot leaves it to the
//! renewal, [`husk_agent_protocol::Request::Renew`]), so no sandbox data is ever in it. Every
//! sandbox restored from it gets its own randomness, clock and share through that renewal
//! before any other host client reaches the agent.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{GuestMemory as _, GuestMemoryRegion as _};

use crate::devices::virtio::mmio::TransportSnapshot;
use crate::vstate::memory::{self, GuestMemory};

/// First bytes of a template's state file.
pub const STATE_MAGIC: &[u8; 8] = b"HUSKTPL\0";
/// Version of the template format; a template of another version is refused. Format 1 had no
/// lazy runs, and its memory files made since the kernel's text was mapped from its file
/// lacked the text the template's guest had not run: format 2 refuses them, so they are built
/// again.
pub const TEMPLATE_FORMAT: u32 = 2;
/// The state file's name in a template directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a template directory.
pub const MEMORY_FILE: &str = "memory";
/// Where the memory file's last verification is recorded.
pub const VERIFIED_FILE: &str = "verified";
/// Largest state file read (a few vCPUs' state is well under 1 MiB).
const MAX_STATE_LEN: u64 = 16 << 20;

/// Errors of writing, reading and checking templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a husk template (bad magic)")]
    Magic { path: PathBuf },
    #[error("{path}: template format {found}, this husk-vmm reads format {TEMPLATE_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path}: truncated ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: corrupt ({what})")]
    Corrupt { path: PathBuf, what: String },
    #[error("template made for {what} {template}, this sandbox has {sandbox}")]
    Mismatch {
        what: &'static str,
        template: String,
        sandbox: String,
    },
    #[error("guest memory cannot be saved: {0}")]
    Memory(String),
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// A file's identity: changes when the file is replaced or written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file at `path`.
    pub fn of(path: &Path) -> Result<FileStamp, TemplateError> {
        let meta = std::fs::metadata(path).map_err(io_err(path, "cannot stat it"))?;
        Ok(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// Everything that shapes a template's guest; a restore requires all of it to be the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInputs {
    /// husk-vmm's version.
    pub husk_version: String,
    pub vcpus: u8,
    pub mem_size_mib: u32,
    pub kernel: FileStamp,
    pub initramfs: Option<FileStamp>,
    /// SHA-256 of the CPUID every vCPU is given (KVM's supported CPUID after husk's policy).
    pub cpuid_sha256: String,
    /// The virtio devices, in slot order.
    pub devices: Vec<String>,
    /// Whether the guest has the serial console (`--console`): its kernel registered the UART
    /// at boot, so only a template booted with the console can print a restored guest's
    /// messages, and one booted without it must not be restored with a UART it never probed.
    #[serde(default)]
    pub console: bool,
}

impl TemplateInputs {
    /// Compares a template's inputs (`self`) with a sandbox's; the first difference is the
    /// error.
    pub fn check(&self, sandbox: &TemplateInputs) -> Result<(), TemplateError> {
        fn differ<T: std::fmt::Debug + PartialEq>(
            what: &'static str,
            template: &T,
            sandbox: &T,
        ) -> Result<(), TemplateError> {
            if template == sandbox {
                return Ok(());
            }
            Err(TemplateError::Mismatch {
                what,
                template: format!("{template:?}"),
                sandbox: format!("{sandbox:?}"),
            })
        }
        differ(
            "husk-vmm version",
            &self.husk_version,
            &sandbox.husk_version,
        )?;
        differ("vCPU count", &self.vcpus, &sandbox.vcpus)?;
        differ("memory (MiB)", &self.mem_size_mib, &sandbox.mem_size_mib)?;
        differ("kernel file", &self.kernel, &sandbox.kernel)?;
        differ("initramfs file", &self.initramfs, &sandbox.initramfs)?;
        differ("CPUID", &self.cpuid_sha256, &sandbox.cpuid_sha256)?;
        differ("devices", &self.devices, &sandbox.devices)?;
        differ("serial console", &self.console, &sandbox.console)
    }
}

/// The VM-wide KVM state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// One vCPU's KVM state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC's frequency, when KVM tells it.
    pub tsc_khz: Option<u32>,
}

/// One guest RAM region and where it lies in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The memory file: its regions, the ranges `(offset, len)` that hold data (sorted, disjoint),
/// and their digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<MemRegion>,
    pub file_len: u64,
    pub data: Vec<(u64, u64)>,
    /// The runs of `data` the template's guest never touched (file-mapped memory it did not
    /// run or read): a restore maps them but does not bring them in ahead.
    pub lazy: Vec<(u64, u64)>,
    pub sha256: String,
}

impl MemoryLayout {
    /// The runs of `data` that are not lazy: what a restore brings in ahead.
    pub fn eager(&self) -> Vec<(u64, u64)> {
        self.data
            .iter()
            .copied()
            .filter(|run| !self.lazy.contains(run))
            .collect()
    }
}

/// A template's state file body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Template {
    pub inputs: TemplateInputs,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<TransportSnapshot>,
    pub memory: MemoryLayout,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

impl Template {
    /// Writes the state file into `dir` (created 0600, synced).
    pub fn write(&self, dir: &Path) -> Result<(), TemplateError> {
        let path = dir.join(STATE_FILE);
        let body = serde_json::to_vec(self).map_err(|e| TemplateError::Corrupt {
            path: path.clone(),
            what: format!("cannot encode the state: {e}"),
        })?;
        let mut out = Vec::with_capacity(body.len() + 52);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&TEMPLATE_FORMAT.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&Sha256::digest(&body));
        let mut file = create_private(&path)?;
        file.write_all(&out)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path, "cannot write it"))
    }

    /// Reads and checks the state file of the template in `dir`.
    pub fn load(dir: &Path) -> Result<Template, TemplateError> {
        let path = dir.join(STATE_FILE);
        let mut file = File::open(&path).map_err(io_err(&path, "cannot open it"))?;
        let mut data = Vec::new();
        (&mut file)
            .take(MAX_STATE_LEN + 52)
            .read_to_end(&mut data)
            .map_err(io_err(&path, "cannot read it"))?;
        Self::decode(&path, &data)
    }

    fn decode(path: &Path, data: &[u8]) -> Result<Template, TemplateError> {
        let truncated = |what: &str| TemplateError::Truncated {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let corrupt = |what: String| TemplateError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if data.len() < 20 {
            if STATE_MAGIC.starts_with(data) || data.starts_with(STATE_MAGIC) {
                return Err(truncated("no header"));
            }
            return Err(TemplateError::Magic {
                path: path.to_path_buf(),
            });
        }
        if &data[..8] != STATE_MAGIC {
            return Err(TemplateError::Magic {
                path: path.to_path_buf(),
            });
        }
        let format = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
        if format != TEMPLATE_FORMAT {
            return Err(TemplateError::Format {
                path: path.to_path_buf(),
                found: format,
            });
        }
        let len = u64::from_le_bytes(data[12..20].try_into().unwrap_or_default());
        if len > MAX_STATE_LEN {
            return Err(corrupt(format!("a body of {len} bytes")));
        }
        let len = len as usize;
        let rest = &data[20..];
        if rest.len() < len + 32 {
            return Err(truncated(&format!("{} of {} bytes", data.len(), len + 52)));
        }
        if rest.len() > len + 32 {
            return Err(corrupt(format!(
                "{} bytes after the digest",
                rest.len() - len - 32
            )));
        }
        let (body, digest) = rest.split_at(len);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("the state's digest does not match".into()));
        }
        serde_json::from_slice(body).map_err(|e| corrupt(format!("cannot decode the state: {e}")))
    }
}

fn create_private(path: &Path) -> Result<File, TemplateError> {
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path, "cannot create it"))
}

/// The guest RAM regions, each at its offset in the memory file.
pub fn memory_regions(mem: &GuestMemory) -> Vec<MemRegion> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let region = MemRegion {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect()
}

/// Writes guest RAM into `dir/memory` (0600, synced): only resident, non-zero pages (read
/// through `mincore`), as runs of pages; returns the layout with their digest. The guest must
/// be paused (no vCPU runs and the device thread is stopped).
///
/// `file_mapped` are the guest ranges mapped `MAP_PRIVATE` from a file (the kernel's text and
/// read-only data). There a page the guest never touched is not zero but the file's, and
/// `mincore` does not say whether the guest touched it (it reports the file's page cache), so
/// every non-zero page of them is written; those `mincore` calls absent are lazy runs. (Taking
/// them for zeros, as anonymous memory's absent pages are, restored guests ran zeros where
/// kernel code they had not yet run should have been, and crashed when they reached it.)
pub fn write_memory(
    dir: &Path,
    mem: &GuestMemory,
    file_mapped: &[(vm_memory::GuestAddress, u64)],
) -> Result<MemoryLayout, TemplateError> {
    let path = dir.join(MEMORY_FILE);
    let file = create_private(&path)?;
    let regions = memory_regions(mem);
    let file_len = regions.iter().map(|r| r.len).sum();
    file.set_len(file_len)
        .map_err(io_err(&path, "cannot size it"))?;
    let page = memory::page_size();
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut lazy: Vec<(u64, u64)> = Vec::new();
    let mut hasher = Sha256::new();
    for region in &regions {
        let host = mem
            .get_host_address(vm_memory::GuestAddress(region.guest_addr))
            .map_err(|e| TemplateError::Memory(e.to_string()))?;
        let len = usize::try_from(region.len).map_err(|e| TemplateError::Memory(e.to_string()))?;
        let pages = len.div_ceil(page as usize);
        let mut resident = vec![0u8; pages];
        // SAFETY: [host, host + len) is one live mapping owned by `mem`; mincore only writes
        // `pages` bytes into `resident`.
        let ret = unsafe { libc::mincore(host.cast(), len, resident.as_mut_ptr()) };
        if ret != 0 {
            return Err(TemplateError::Memory(format!(
                "mincore: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the region's mapping lives as long as `mem`; the guest is paused and the
        // device thread stopped, so nothing writes to it while this slice exists.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        // Offsets in the region of its file-mapped pages.
        let mapped: Vec<(usize, usize)> = file_mapped
            .iter()
            .filter_map(|&(addr, size)| {
                let start = addr.0.max(region.guest_addr);
                let end = addr
                    .0
                    .saturating_add(size)
                    .min(region.guest_addr + region.len);
                (start < end).then(|| {
                    (
                        (start - region.guest_addr) as usize,
                        (end - region.guest_addr) as usize,
                    )
                })
            })
            .collect();
        // A run: start, end, lazy.
        let mut run: Option<(usize, usize, bool)> = None;
        let mut flush = |run: (usize, usize, bool)| -> Result<(), TemplateError> {
            let chunk = &bytes[run.0..run.1];
            let offset = region.file_offset + run.0 as u64;
            file.write_all_at(chunk, offset)
                .map_err(io_err(&path, "cannot write it"))?;
            hasher.update(offset.to_le_bytes());
            hasher.update((chunk.len() as u64).to_le_bytes());
            hasher.update(chunk);
            data.push((offset, chunk.len() as u64));
            if run.2 {
                lazy.push((offset, chunk.len() as u64));
            }
            Ok(())
        };
        for (index, flags) in resident.iter().enumerate() {
            let start = index * page as usize;
            let end = (start + page as usize).min(len);
            let touched = flags & 1 == 1;
            let from_file = mapped.iter().any(|&(s, e)| start < e && s < end);
            // Some(lazy) for a page to write.
            let keep = ((touched || from_file) && bytes[start..end].iter().any(|b| *b != 0))
                .then_some(!touched);
            run = match (run, keep) {
                (Some((s, _, l)), Some(lazy)) if l == lazy => Some((s, end, l)),
                (Some(r), Some(lazy)) => {
                    flush(r)?;
                    Some((start, end, lazy))
                }
                (None, Some(lazy)) => Some((start, end, lazy)),
                (Some(r), None) => {
                    flush(r)?;
                    None
                }
                (None, None) => None,
            };
        }
        if let Some(r) = run {
            flush(r)?;
        }
    }
    file.sync_all().map_err(io_err(&path, "cannot sync it"))?;
    let layout = MemoryLayout {
        regions,
        file_len,
        data,
        lazy,
        sha256: hex(&hasher.finalize()),
    };
    // The digest was taken of the very bytes just written: the file is verified as it is.
    record_verified(dir, &layout)?;
    Ok(layout)
}

/// Records that the memory file, as it is now, has the digest of `layout`.
fn record_verified(dir: &Path, layout: &MemoryLayout) -> Result<(), TemplateError> {
    let record = format!(
        "{} {}\n",
        memory_identity(&dir.join(MEMORY_FILE))?,
        layout.sha256
    );
    crate::atomic_file::write_atomic(&dir.join(VERIFIED_FILE), record.as_bytes()).map_err(|e| {
        TemplateError::Io {
            path: dir.join(VERIFIED_FILE),
            what: "cannot write it",
            source: e,
        }
    })
}

/// The identity of the memory file, as the `verified` record keeps it.
fn memory_identity(path: &Path) -> Result<String, TemplateError> {
    let meta = std::fs::metadata(path).map_err(io_err(path, "cannot stat it"))?;
    Ok(format!(
        "{} {} {} {}.{} {}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

/// Checks the memory file of the template in `dir` against `layout` (see the module docs):
/// length, the digest of its data ranges, zeros elsewhere. Skips the reading when the
/// `verified` record says this very file (same identity) was verified with this digest.
pub fn verify_memory(dir: &Path, layout: &MemoryLayout) -> Result<(), TemplateError> {
    let path = dir.join(MEMORY_FILE);
    let identity = memory_identity(&path)?;
    let record = format!("{identity} {}\n", layout.sha256);
    if std::fs::read_to_string(dir.join(VERIFIED_FILE)).is_ok_and(|r| r == record) {
        return Ok(());
    }
    let file = File::open(&path).map_err(io_err(&path, "cannot open it"))?;
    let len = file
        .metadata()
        .map_err(io_err(&path, "cannot stat it"))?
        .len();
    let corrupt = |what: String| TemplateError::Corrupt {
        path: path.clone(),
        what,
    };
    if len < layout.file_len {
        return Err(TemplateError::Truncated {
            path: path.clone(),
            what: format!("{len} of {} bytes", layout.file_len),
        });
    }
    if len > layout.file_len {
        return Err(corrupt(format!(
            "{len} bytes where the template has {}",
            layout.file_len
        )));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut expected_end = 0;
    for &(offset, run_len) in &layout.data {
        if offset < expected_end || offset.saturating_add(run_len) > len {
            return Err(corrupt("the layout's data ranges are out of order".into()));
        }
        check_zero(&file, expected_end, offset, &mut buf).map_err(&corrupt)?;
        hasher.update(offset.to_le_bytes());
        hasher.update(run_len.to_le_bytes());
        let mut at = offset;
        while at < offset + run_len {
            let n = ((offset + run_len - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)
                .map_err(io_err(&path, "cannot read it"))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        expected_end = offset + run_len;
    }
    check_zero(&file, expected_end, len, &mut buf).map_err(&corrupt)?;
    if hex(&hasher.finalize()) != layout.sha256 {
        return Err(corrupt("the memory's digest does not match".into()));
    }
    // Best effort: a record that cannot be written only means the next restore reads again.
    if let Err(e) = record_verified(dir, layout) {
        tracing::debug!("{e}");
    }
    Ok(())
}

/// Checks that `file` holds only zeros in `[start, end)`, reading only the extents the file
/// system has data for (`SEEK_DATA` / `SEEK_HOLE`).
fn check_zero(file: &File, start: u64, end: u64, buf: &mut [u8]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an open descriptor, plain integers.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `at`.
            return Ok(());
        }
        let data = data as u64;
        if data >= end {
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        let mut pos = data;
        while pos < hole {
            let n = ((hole - pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], pos)
                .map_err(|e| format!("cannot read at {pos:#x}: {e}"))?;
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(format!("data at {pos:#x} outside the template's ranges"));
            }
            pos += n as u64;
        }
        at = hole.max(at + 1);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn inputs() -> TemplateInputs {
        TemplateInputs {
            husk_version: "1".into(),
            vcpus: 1,
            mem_size_mib: 2,
            kernel: FileStamp {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
            },
            initramfs: None,
            cpuid_sha256: "abc".into(),
            devices: vec!["vsock".into()],
            console: false,
        }
    }

    fn template(mem: &GuestMemory, dir: &Path) -> Template {
        Template {
            inputs: inputs(),
            vm: VmState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            vcpus: vec![],
            devices: vec![],
            memory: write_memory(dir, mem, &[]).unwrap(),
        }
    }

    #[test]
    fn memory_file_holds_touched_pages_only_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(2).unwrap();
        mem.write_obj(0xdead_beef_u32, vm_memory::GuestAddress(0x3000))
            .unwrap();
        mem.write_obj(0x55_u8, vm_memory::GuestAddress(0x4fff))
            .unwrap();
        // Touched but zero: not written.
        mem.write_obj(0_u64, vm_memory::GuestAddress(0x10000))
            .unwrap();
        let layout = write_memory(dir.path(), &mem, &[]).unwrap();
        assert_eq!(layout.file_len, 2 << 20);
        assert_eq!(layout.data, vec![(0x3000, 0x2000)]);
        assert!(dir.path().join(VERIFIED_FILE).exists());
        verify_memory(dir.path(), &layout).unwrap();
        // Read whole without the record.
        std::fs::remove_file(dir.path().join(VERIFIED_FILE)).unwrap();
        verify_memory(dir.path(), &layout).unwrap();
        assert!(dir.path().join(VERIFIED_FILE).exists());
    }

    #[test]
    fn file_mapped_memory_is_written_touched_or_not_and_untouched_is_lazy() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(2).unwrap();
        // A "kernel image" of four pages mapped at 0x8000: pages of 1s, 2s, zeros, 4s.
        let image = tempfile::tempfile_in(".").unwrap();
        let mut content = Vec::new();
        for byte in [1u8, 2, 0, 4] {
            content.extend(std::iter::repeat_n(byte, 0x1000));
        }
        image.write_all_at(&content, 0).unwrap();
        let at = vm_memory::GuestAddress(0x8000);
        memory::map_file_private(&mem, at, 0x4000, &image, 0).unwrap();
        // The guest wrote the second page (a copy-on-write break: now anonymous and touched).
        mem.write_obj(9_u8, vm_memory::GuestAddress(0x9000))
            .unwrap();
        // And anonymous memory elsewhere.
        mem.write_obj(5_u8, vm_memory::GuestAddress(0x1000))
            .unwrap();
        // Out of the page cache, as a kernel file's pages no guest ran are (the
        // write read the file ahead into it).
        image.sync_all().unwrap();
        // SAFETY: posix_fadvise on an open descriptor, plain integers.
        let evicted = unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fadvise(image.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(evicted, 0);
        let layout = write_memory(dir.path(), &mem, &[(at, 0x4000)]).unwrap();
        // The first and last image pages, which nothing touched (absent unless in the page
        // cache), are written anyway: they hold the file's bytes. The zero page is not.
        let file = std::fs::File::open(dir.path().join(MEMORY_FILE)).unwrap();
        let mut back = vec![0u8; 0x4000];
        file.read_exact_at(&mut back, 0x8000).unwrap();
        let mut expected = content.clone();
        expected[0x1000] = 9;
        assert_eq!(back, expected);
        let written: u64 = layout.data.iter().map(|(_, len)| len).sum();
        assert_eq!(written, 0x4000, "{:?}", layout.data);
        assert!(layout.data.contains(&(0x1000, 0x1000)));
        assert!(!layout
            .data
            .iter()
            .any(|&(o, l)| o < 0xb000 && 0xa000 < o + l));
        // The untouched image pages are lazy; what the guest wrote is not.
        assert_eq!(layout.lazy, vec![(0x8000, 0x1000), (0xb000, 0x1000)]);
        assert_eq!(layout.eager(), vec![(0x1000, 0x1000), (0x9000, 0x1000)]);
        verify_memory(dir.path(), &layout).unwrap();
    }

    #[test]
    fn a_changed_memory_file_is_refused_even_after_a_verification() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(2).unwrap();
        mem.write_obj(7_u8, vm_memory::GuestAddress(0x1000))
            .unwrap();
        let layout = write_memory(dir.path(), &mem, &[]).unwrap();
        verify_memory(dir.path(), &layout).unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A byte flipped inside the data.
        file.write_all_at(&[8], 0x1000).unwrap();
        let err = verify_memory(dir.path(), &layout).unwrap_err();
        assert!(err.to_string().contains("digest does not match"), "{err}");
        // Data written into a hole.
        file.write_all_at(&[7], 0x1000).unwrap();
        file.write_all_at(&[1], 0x8000).unwrap();
        let err = verify_memory(dir.path(), &layout).unwrap_err();
        assert!(
            err.to_string().contains("outside the template's ranges"),
            "{err}"
        );
        file.write_all_at(&[0], 0x8000).unwrap();
        verify_memory(dir.path(), &layout).unwrap();
        // Truncated.
        file.set_len(0x4000).unwrap();
        let err = verify_memory(dir.path(), &layout).unwrap_err();
        assert!(matches!(err, TemplateError::Truncated { .. }), "{err}");
    }

    #[test]
    fn state_file_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(2).unwrap();
        let t = template(&mem, dir.path());
        t.write(dir.path()).unwrap();
        let back = Template::load(dir.path()).unwrap();
        assert_eq!(back.inputs, t.inputs);
        assert_eq!(back.memory, t.memory);

        let path = dir.path().join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 1;
        let err = Template::decode(&path, &flipped).unwrap_err();
        assert!(matches!(err, TemplateError::Corrupt { .. }), "{err}");
        let err = Template::decode(&path, &good[..good.len() - 10]).unwrap_err();
        assert!(matches!(err, TemplateError::Truncated { .. }), "{err}");
        let err = Template::decode(&path, &good[..5]).unwrap_err();
        assert!(matches!(err, TemplateError::Truncated { .. }), "{err}");
        let err = Template::decode(&path, b"not a template at all").unwrap_err();
        assert!(matches!(err, TemplateError::Magic { .. }), "{err}");
        let mut other = good.clone();
        other[8] = 9;
        let err = Template::decode(&path, &other).unwrap_err();
        assert!(
            matches!(err, TemplateError::Format { found: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn inputs_name_the_first_difference() {
        let a = inputs();
        assert!(a.check(&a.clone()).is_ok());
        let mut b = a.clone();
        b.mem_size_mib = 256;
        let err = a.check(&b).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template made for memory (MiB) 2, this sandbox has 256"
        );
        let mut c = a.clone();
        c.kernel.mtime_ns = 5;
        assert!(a.check(&c).unwrap_err().to_string().contains("kernel file"));
        let mut d = a.clone();
        d.console = true;
        assert_eq!(
            a.check(&d).unwrap_err().to_string(),
            "template made for serial console false, this sandbox has true"
        );
    }
}
