//! The boot recipe: [`build_microvm`] reads top to bottom, from checking KVM to creating the
//! vCPUs. Nothing here runs guest code; [`Vmm::run`](crate::vmm::Vmm::run) does.

use std::io;
use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use linux_loader::loader::{load_cmdline, Cmdline};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{
    self, CMDLINE_MAX_SIZE, CMDLINE_START, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN,
};
use crate::arch::{self, mptable, pvh, zero_page, BootProtocol, KernelEntry};
use crate::config::{ConfigError, NetConfig, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{I8042Device, I8042_RANGE_LEN};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::balloon::{Balloon, BalloonError};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::{
    MmioTransport, MMIO_REGION_SIZE, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_QUEUE_NOTIFY,
};
use crate::devices::virtio::net::{CardBackend, Net, NetError, Tap, TEMPLATE_CARD_MAC};
use crate::devices::virtio::rng::{Rng, RngError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::kvm_check;
use crate::snapshot::{self, FileStamp, Template, TemplateError, TemplateInputs};
use crate::timeline::{self, BootTimeline, TimelineRecorder};
use crate::vmm::{DeviceEventManager, TemplateJob, VmMode, Vmm, VmmParts};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// The guest CID of every microVM (each VM has its own vsock device and host socket).
pub const GUEST_CID: u64 = 3;

/// Kernel command line every guest gets.
/// - `reboot=t`: a reboot triple-faults, which ends the VM; `panic=-1`: reboot at once on a
///   panic (so a panic ends the VM as a crash instead of hanging).
/// - `quiet loglevel=1`: no console chatter (the console is off unless `--console`).
/// - `tsc=reliable`: skip the TSC watchdog (no reliable reference clock in a VM anyway).
/// - `no_timer_check`: skip the IO-APIC timer check (a busy wait for timer ticks at boot; the
///   in-kernel irqchip's timer works).
/// - `rdinit=/init`: the agent in the initramfs is PID 1.
///
/// Our kernel has no PCI, no modules and no i8042 driver, so `pci=off`, `nomodule` and
/// `i8042.*` are not passed: the kernel would not know them and would hand them to `/init`.
pub const BASE_CMDLINE: &str = "reboot=t panic=-1 quiet loglevel=1 tsc=reliable no_timer_check \
     rdinit=/init";
/// Added with `--console`.
pub const CONSOLE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial";
/// Added without `--console`: do not register any 8250 port (nothing at 0x3f8 anyway).
pub const NO_CONSOLE_CMDLINE: &str = "8250.nr_uarts=0";

/// Errors of [`build_microvm`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: KVM is not available on this host (run `husk check`)")]
    KvmAbsent,
    /// /dev/kvm is not accessible.
    #[error("/dev/kvm is not accessible to this user (add the user to the kvm group)")]
    KvmPermissionDenied,
    /// /dev/kvm is busy.
    #[error("/dev/kvm is busy (another hypervisor holds the virtualization extensions?)")]
    KvmBusy,
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// Wrong KVM API version.
    #[error("KVM API version {0} is not the supported {expected}", expected = kvm_check::KVM_API_VERSION)]
    KvmApiVersion(i32),
    /// The host's KVM is kvm_pvm, which cannot run Linux guests (refused before booting, since
    /// the guest would only fail later with a KVM internal error).
    #[error("KVM cannot run this guest: {reason}; run `husk check`", reason = kvm_check::KVM_PVM_REASON)]
    KvmPvm,
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("failed to read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("failed to create guest memory")]
    Memory(#[from] MemoryError),
    /// VM creation.
    #[error("failed to create the VM")]
    Vm(#[from] VmError),
    /// Kernel or initramfs loading.
    #[error("failed to load the guest images")]
    Load(#[from] arch::LoadError),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line ({0:?})")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("failed to write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// MP table.
    #[error("failed to write the MP table")]
    Mptable(#[from] mptable::MptableError),
    /// PVH boot structures.
    #[error("failed to write the PVH boot structures")]
    Pvh(#[from] pvh::PvhError),
    /// Zero page.
    #[error("failed to write the zero page")]
    ZeroPage(#[from] zero_page::ZeroPageError),
    /// Device address conflict.
    #[error("failed to place a device on the bus")]
    Bus(#[from] BusError),
    /// A device's eventfd or transport could not be created.
    #[error("failed to create the {0} device")]
    Device(&'static str, #[source] io::Error),
    /// No free virtio-mmio slot.
    #[error("no free virtio-mmio slot")]
    NoVirtioSlot,
    /// The vsock device.
    #[error("failed to create the vsock device")]
    Vsock(#[from] VsockError),
    /// The entropy device.
    #[error("failed to create the rng device")]
    Rng(#[from] RngError),
    /// The memory balloon.
    #[error("failed to create the balloon device")]
    Balloon(#[from] BalloonError),
    /// The virtio-fs device.
    #[error("failed to create the virtio-fs device")]
    Fs(#[from] FsError),
    /// The network card.
    #[error("failed to create the network device")]
    Net(#[from] NetError),
    /// The device event loop.
    #[error("failed to create the device event loop")]
    EventManager(event_manager::Error),
    /// vCPU creation or configuration.
    #[error("failed to set up the vCPUs")]
    Vcpu(#[from] VcpuError),
    /// A template cannot be made of this configuration.
    #[error("cannot make a template: {0}")]
    TemplateConfig(&'static str),
    /// A template's files.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Restoring a template failed (nothing of the guest ran): the caller boots instead.
    #[error("cannot restore the template {}", dir.display())]
    Restore {
        dir: std::path::PathBuf,
        #[source]
        source: Box<BuildError>,
    },
}

impl BuildError {
    /// Whether this is the refusal of a template (the sandbox can boot without it).
    pub fn is_template_refusal(&self) -> bool {
        matches!(self, BuildError::Restore { .. })
    }
}

/// Builds a microVM ready to run: validates `cfg`, then sets up KVM, memory, the kernel,
/// boot structures, devices and vCPUs.
pub fn build_microvm(cfg: &VmConfig) -> Result<Vmm, BuildError> {
    if let Some(dir) = &cfg.restore_from {
        return restore_microvm(cfg, dir).map_err(|source| BuildError::Restore {
            dir: dir.clone(),
            source: Box::new(source),
        });
    }
    cfg.validate()?;
    let template_job = match &cfg.template_out {
        Some(dir) => Some(template_job(cfg, dir)?),
        None => None,
    };
    let kvm = open_kvm()?;
    if kvm_check::kvm_pvm_loaded() {
        if !cfg.allow_kvm_pvm {
            return Err(BuildError::KvmPvm);
        }
        tracing::warn!(
            "this host's KVM is kvm_pvm: a Linux guest will stop with a KVM internal error \
             (run `husk check`)"
        );
    }

    let mem = memory::create_guest_memory(cfg.mem_size_mib)?;
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&mem)?;
    let vm_created_us = timeline::since_start_us();

    let mem_size = u64::from(cfg.mem_size_mib) << 20;
    let kernel = arch::load_kernel(&mem, &cfg.kernel)?;
    let kernel_read_us = timeline::since_start_us();
    let initramfs = cfg
        .initramfs
        .as_deref()
        .map(|path| arch::load_initramfs(&mem, mem_size, kernel.kernel_end, path))
        .transpose()?;
    tracing::debug!(
        kernel_us = kernel_read_us - vm_created_us,
        initramfs_us = timeline::since_start_us() - kernel_read_us,
        "guest images loaded"
    );
    let mut cmdline = base_cmdline(cfg.console)?;

    let mut pio_bus = Bus::new();
    let mut mmio = MmioDevices::new(&vm, &mem);
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Device("reset", e))?;
    attach_legacy_devices(&vm, &mut pio_bus, &reset_evt, cfg.console)?;

    let mut event_manager = DeviceEventManager::new().map_err(BuildError::EventManager)?;
    let (vsock, balloon, fs_event_manager) =
        attach_common_devices(cfg, &mut mmio, &mut event_manager, &mut cmdline)?;
    // The cards in order: the guest's driver names them eth0, eth1, ... as it finds them.
    for (card, net_cfg) in cfg.net.iter().enumerate() {
        let tap = CardBackend::Tap(take_tap(net_cfg)?);
        let net = Arc::new(Mutex::new(Net::new(tap, net_cfg.mac, net_cfg.mtu)?));
        mmio.attach_virtio_device("net", net, &mut event_manager, &mut cmdline)?;
        for param in net_cfg.boot_params(card) {
            cmdline.insert_str(&param).map_err(BuildError::Cmdline)?;
        }
    }
    if cfg.net.is_empty() && template_job.is_some() {
        for _ in 0..cfg.template_cards {
            attach_template_card(None, &mut mmio, &mut event_manager, &mut cmdline)?;
        }
    }

    if let Some(extra) = &cfg.cmdline_extra {
        cmdline.insert_str(extra).map_err(BuildError::Cmdline)?;
    }
    if template_job.is_some() {
        cmdline
            .insert_str(husk_agent_protocol::TEMPLATE_CMDLINE_FLAG)
            .map_err(BuildError::Cmdline)?;
    }
    setup_boot_structures(&mem, mem_size, cfg.vcpus, &kernel, initramfs, &cmdline)?;
    let kernel_loaded_us = timeline::since_start_us();

    let MmioDevices {
        bus: mmio_bus,
        transports,
        ..
    } = mmio;
    let (vcpus, cpuid_sha256) =
        create_vcpus(&kvm, &vm, &mem, cfg.vcpus, &kernel, pio_bus, mmio_bus)?;
    if let Some(vcpu) = vcpus.first() {
        // What every boot writes, copied into guest memory by the loader: the kernel's data,
        // init and bss, and the initramfs (unpacked, then freed and poisoned). Not the text and
        // read-only data, mapped from the file: only the pages the guest runs or reads need be
        // in its page tables (pre-faulting all of them put 5.3 MiB more of the file into a cold
        // boot's resident set, and so into a template's memory file).
        let mut written = vec![(
            GuestAddress(kernel.data_start),
            kernel.kernel_end.saturating_sub(kernel.data_start),
        )];
        written.extend(initramfs.map(|i| (GuestAddress(i.addr), i.size)));
        pre_fault(&kvm, vcpu, &written);
    }
    let mode = match template_job {
        Some((dir, mut inputs)) => {
            inputs.cpuid_sha256 = cpuid_sha256;
            inputs.devices = device_names(&transports);
            VmMode::Template(Box::new(TemplateJob {
                dir,
                inputs,
                balloon,
                // The text and read-only data, mapped from the kernel's file by the loader
                // (a superset: the partial pages at a segment's ends are copied).
                file_mapped: vec![(
                    GuestAddress(kernel.kernel_start),
                    kernel.mapped_end.saturating_sub(kernel.kernel_start),
                )],
            }))
        }
        None => VmMode::Boot,
    };

    let timeline = TimelineRecorder::new(BootTimeline {
        vcpus: cfg.vcpus,
        mem_size_mib: cfg.mem_size_mib,
        boot_protocol: format!("{:?}", kernel.protocol),
        vm_created_us,
        kernel_loaded_us,
        guest_memory_host_ranges: memory::host_ranges(&mem),
        ..Default::default()
    });
    tracing::debug!(
        vm_created_us,
        kernel_loaded_us,
        protocol = ?kernel.protocol,
        "microVM built"
    );
    Ok(Vmm::new(
        VmmParts {
            vm,
            mem,
            vcpus,
            event_manager,
            fs_event_manager,
            reset_evt,
            transports,
            vsock,
            mode,
        },
        cfg,
        Arc::new(timeline),
    ))
}

/// Takes over the TAP of the `--net-tap-fd` contract.
fn take_tap(net_cfg: &NetConfig) -> Result<Tap, BuildError> {
    // SAFETY: the descriptor was handed to this process for the network card alone (the
    // `--net-tap-fd` contract); nothing else in the VMM opens or uses it.
    Ok(unsafe { Tap::from_raw_fd(net_cfg.tap_fd) }?)
}

/// The card of a template's guest (`tap` `None`), or of a sandbox restored from it: one
/// device, the same in both, with the template's MAC address and no MTU in its configuration
/// space (the driver read them when the template booted; a restored guest's agent sets the
/// sandbox's own, [`NetConfig::renewal_params`]).
fn attach_template_card(
    tap: Option<Tap>,
    mmio: &mut MmioDevices,
    event_manager: &mut DeviceEventManager,
    cmdline: &mut Cmdline,
) -> Result<(), BuildError> {
    let backend = match tap {
        Some(tap) => CardBackend::Tap(tap),
        None => CardBackend::detached().map_err(|e| BuildError::Device("net", e))?,
    };
    let net = Arc::new(Mutex::new(Net::new(backend, TEMPLATE_CARD_MAC, None)?));
    mmio.attach_virtio_device("net", net, event_manager, cmdline)
}

/// The devices of [`attach_common_devices`] that the VMM keeps a hand on, and the file
/// server's event loop (with a shared directory).
type CommonDevices = (
    Arc<Mutex<Vsock>>,
    Arc<Mutex<Balloon>>,
    Option<DeviceEventManager>,
);

/// The devices every guest has, in slot order: vsock (held until the agent is ready), the
/// entropy source, the balloon (free page reporting) and, with a shared directory, virtio-fs.
/// Templates are made and restored with exactly these. virtio-fs gets an event loop of its
/// own, which the file server's thread runs (`Vmm::run`): its requests do not wait behind
/// the other devices', and that thread has a seccomp list of its own.
fn attach_common_devices(
    cfg: &VmConfig,
    mmio: &mut MmioDevices,
    event_manager: &mut DeviceEventManager,
    cmdline: &mut Cmdline,
) -> Result<CommonDevices, BuildError> {
    let mut vsock = Vsock::new(GUEST_CID, &cfg.vsock_socket)?;
    // Host clients wait, without reaching the guest, until the agent says it listens.
    vsock.hold_until_ready(husk_agent_protocol::AGENT_READY_PORT);
    if cfg.restore_from.is_some() {
        // The renewal of a restored guest passes the gate (see `husk_agent_protocol`).
        vsock.exempt_from_gate(husk_agent_protocol::AGENT_IDENTITY_PORT);
    }
    let vsock = Arc::new(Mutex::new(vsock));
    mmio.attach_virtio_device("vsock", vsock.clone(), event_manager, cmdline)?;
    let rng = Arc::new(Mutex::new(Rng::new()?));
    mmio.attach_virtio_device("rng", rng, event_manager, cmdline)?;
    let balloon = Arc::new(Mutex::new(Balloon::new()?));
    mmio.attach_virtio_device("balloon", balloon.clone(), event_manager, cmdline)?;
    if let Some(dir) = &cfg.shared_dir {
        let max_inodes = cfg
            .share_max_inodes
            .unwrap_or_else(|| crate::devices::virtio::fs::max_inodes_for(cfg.mem_size_mib.into()));
        raise_open_files(max_inodes);
        let fs = Arc::new(Mutex::new(Fs::with_options(
            dir,
            crate::devices::virtio::fs::DEFAULT_TAG,
            cfg.share_cache,
            max_inodes,
        )?));
        let mut fs_event_manager = DeviceEventManager::new().map_err(BuildError::EventManager)?;
        mmio.attach_virtio_device("fs", fs, &mut fs_event_manager, cmdline)?;
        return Ok((vsock, balloon, Some(fs_event_manager)));
    }
    Ok((vsock, balloon, None))
}

/// Descriptors husk-vmm needs beside the share's inodes: devices, vsock connections, logs.
const OWN_OPEN_FILES: usize = 4096;

/// Raises `RLIMIT_NOFILE` so that the guest's `max_inodes` share inodes (one descriptor each)
/// never take the descriptors the VMM needs for itself: the soft limit to the hard one, and
/// the hard one too where the VMM may (root). Where it cannot, a warning says so: the share then
/// runs out of descriptors first (`EMFILE` in the guest).
fn raise_open_files(max_inodes: usize) {
    let want = u64::try_from(max_inodes.saturating_add(OWN_OPEN_FILES)).unwrap_or(u64::MAX);
    let Ok((soft, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return;
    };
    if soft >= want {
        return;
    }
    let set = |soft, hard| {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
    };
    if hard >= want {
        let _ = set(want, hard);
    } else if set(want, want).is_err() {
        let _ = set(hard, hard);
        tracing::warn!(
            "RLIMIT_NOFILE is {hard} and cannot be raised: the share's {max_inodes} inodes may \
             run out of descriptors first"
        );
    }
}

fn device_names(transports: &[(&'static str, Arc<Mutex<MmioTransport>>)]) -> Vec<String> {
    transports
        .iter()
        .map(|(name, _)| name.to_string())
        .collect()
}

/// What a template of `cfg` is made from (the CPUID and devices are filled in once known).
fn sandbox_inputs(cfg: &VmConfig) -> Result<TemplateInputs, BuildError> {
    Ok(TemplateInputs {
        husk_version: env!("CARGO_PKG_VERSION").to_string(),
        vcpus: cfg.vcpus,
        mem_size_mib: cfg.mem_size_mib,
        kernel: FileStamp::of(&cfg.kernel)?,
        initramfs: cfg.initramfs.as_deref().map(FileStamp::of).transpose()?,
        cpuid_sha256: String::new(),
        devices: Vec::new(),
        console: cfg.console,
    })
}

/// Checks that `cfg` can make a template into `dir` (a new directory in an existing one).
fn template_job(
    cfg: &VmConfig,
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, TemplateInputs), BuildError> {
    if !cfg.net.is_empty() {
        return Err(BuildError::TemplateConfig(
            "a template has no network card on a TAP (the sandbox's cards are not in it)",
        ));
    }
    if cfg.shared_dir.is_none() {
        return Err(BuildError::TemplateConfig(
            "a template needs a (empty) shared directory: sandboxes restore its virtio-fs device",
        ));
    }
    if !dir.is_dir() {
        return Err(BuildError::TemplateConfig(
            "the template directory must exist (and be empty)",
        ));
    }
    Ok((dir.to_path_buf(), sandbox_inputs(cfg)?))
}

/// The SHA-256 of the CPUID each of `count` vCPUs gets.
fn cpuid_digest(supported: &[kvm_bindings::kvm_cpuid_entry2], count: u8) -> String {
    let mut all = Vec::new();
    for index in 0..count {
        let mut entries = supported.to_vec();
        crate::arch::cpuid::apply_cpuid_policy(&mut entries, index, count);
        all.push(entries);
    }
    crate::snapshot::sha256_hex(&serde_json::to_vec(&all).unwrap_or_default())
}

/// The guest-physical ranges of `ranges` of the template's memory file (split where a range
/// crosses from one region to the next; what lies in no region is left out).
fn file_ranges_to_guest(
    layout: &snapshot::MemoryLayout,
    ranges: &[(u64, u64)],
) -> Vec<(GuestAddress, u64)> {
    file_ranges_in_guest(layout, ranges)
        .into_iter()
        .map(|(addr, len, _)| (addr, len))
        .collect()
}

/// [`file_ranges_to_guest`], each range with its offset in the memory file.
fn file_ranges_in_guest(
    layout: &snapshot::MemoryLayout,
    ranges: &[(u64, u64)],
) -> Vec<(GuestAddress, u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len());
    for &(offset, len) in ranges {
        let end = offset.saturating_add(len);
        for region in &layout.regions {
            let region_end = region.file_offset.saturating_add(region.len);
            let start = offset.max(region.file_offset);
            let stop = end.min(region_end);
            if start < stop {
                out.push((
                    GuestAddress(region.guest_addr + (start - region.file_offset)),
                    stop - start,
                    start,
                ));
            }
        }
    }
    out
}

/// The write set of the template in `dir` as guest-physical ranges (see
/// [`crate::write_set`]); none when it has none yet, or when it does not check out (logged,
/// and the file removed).
fn template_write_set(
    dir: &std::path::Path,
    layout: &snapshot::MemoryLayout,
) -> Vec<(GuestAddress, u64)> {
    match crate::write_set::load(dir, layout, memory::page_size()) {
        Ok(Some(ranges)) => file_ranges_to_guest(layout, &ranges),
        Ok(None) => Vec::new(),
        Err(e) => {
            // Removed, so that the next sandbox records it anew.
            let path = dir.join(crate::write_set::WRITE_SET_FILE);
            let removed = std::fs::remove_file(&path).is_ok();
            tracing::warn!(
                "warm start: ignoring the template's write set{}: {e}",
                if removed { " (removed)" } else { "" }
            );
            Vec::new()
        }
    }
}

/// How [`populate`] faults a template's pages into the VMM's page tables ahead of the guest.
#[derive(Clone, Copy)]
enum Populate {
    /// The template's data pages, read-only (`MADV_POPULATE_READ`): still shared with the page
    /// cache, copied only when the guest writes. A restored guest otherwise takes a host page
    /// fault on the first touch of every page it had before, one at a time while it runs.
    Read,
    /// The write set's pages, writable (`MADV_POPULATE_WRITE`): copied now, where the guest
    /// would copy each on its first write, through a VM exit.
    Write,
}

/// Faults `ranges` of guest memory into the VMM's page tables as `how` says. Best effort: a
/// kernel without it (before 5.14) leaves the pages to be faulted in as the guest runs.
fn populate(mem: &GuestMemory, ranges: &[(GuestAddress, u64)], how: Populate) {
    const MADV_POPULATE_READ: libc::c_int = 22;
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let (advice, name) = match how {
        Populate::Read => (MADV_POPULATE_READ, "MADV_POPULATE_READ"),
        Populate::Write => (MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE"),
    };
    for &(addr, len) in ranges {
        let Ok(host) = vm_memory::GuestMemory::get_host_address(mem, addr) else {
            continue;
        };
        // SAFETY: [host, host + len) lies inside one guest memory mapping owned by `mem` (the
        // ranges were split at regions); both advices only fault pages in (the write one
        // copying them from the template), never changing their contents.
        let ret = unsafe { libc::madvise(host.cast(), len as usize, advice) };
        if ret != 0 {
            tracing::debug!(
                "{name} of the template's memory failed: {}",
                io::Error::last_os_error()
            );
            return;
        }
    }
}

/// Maps guest memory the guest is about to read into KVM's two-dimensional page tables before
/// it runs ([`Vcpu::pre_fault`]): a template's data pages and its write set when it is
/// restored, the kernel's writable part and the initramfs when it boots. The guest otherwise
/// takes a VM exit on its first touch of each such page (a restored guest some 1,400 while it
/// creates its first container). Pages that are copy-on-write on the host (a template's) are
/// mapped read-only and stay shared until the guest writes them; no host memory is added.
/// Pages the VMM has its own copy of (the write set's, the kernel's data, the initramfs) are
/// mapped writable.
/// Best effort: a KVM without `KVM_CAP_PRE_FAULT_MEMORY` (before Linux 6.10, or without
/// two-dimensional paging) leaves them to be faulted in as the guest runs.
fn pre_fault(kvm: &Kvm, vcpu: &Vcpu, ranges: &[(GuestAddress, u64)]) {
    if kvm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY)) <= 0 {
        tracing::debug!("KVM cannot pre-fault guest memory; the guest faults its pages in");
        return;
    }
    for &(addr, len) in ranges {
        if let Err(e) = vcpu.pre_fault(addr.0, len) {
            tracing::debug!(
                "KVM_PRE_FAULT_MEMORY of {len:#x} bytes at {:#x} failed: {e}",
                addr.0
            );
            return;
        }
    }
}

/// Restores the template in `dir` for `cfg` (see [`crate::snapshot`]): checks the template
/// against the sandbox, maps its memory copy-on-write, and puts back the VM, its devices and
/// its vCPUs as they were when it was taken. The guest has not run when this returns; an error
/// leaves nothing behind (the caller boots instead).
fn restore_microvm(cfg: &VmConfig, dir: &std::path::Path) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    let template = Template::load(dir)?;
    let kvm = open_kvm()?;
    if kvm_check::kvm_pvm_loaded() && !cfg.allow_kvm_pvm {
        return Err(BuildError::KvmPvm);
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let mut inputs = sandbox_inputs(cfg)?;
    inputs.cpuid_sha256 = cpuid_digest(supported.as_slice(), cfg.vcpus);
    inputs.devices = template.inputs.devices.clone();
    template.inputs.check(&inputs)?;

    let mem = memory::create_guest_memory(cfg.mem_size_mib)?;
    if snapshot::memory_regions(&mem) != template.memory.regions {
        return Err(TemplateError::Mismatch {
            what: "memory layout",
            template: format!("{:?}", template.memory.regions),
            sandbox: format!("{:?}", snapshot::memory_regions(&mem)),
        }
        .into());
    }
    snapshot::verify_memory(dir, &template.memory)?;
    let memory_path = dir.join(snapshot::MEMORY_FILE);
    let memory_file = std::fs::File::open(&memory_path).map_err(|source| TemplateError::Io {
        path: memory_path.clone(),
        what: "cannot open it",
        source,
    })?;
    // Only the runs of pages that hold data come from the file (a hundred or so mappings): the
    // rest, zeros, stays the region's anonymous memory, where a page the guest touches first is
    // a fresh zeroed page rather than a page-cache page of the file's hole and a copy of it.
    for &(addr, len, offset) in &file_ranges_in_guest(&template.memory, &template.memory.data) {
        memory::map_file_private(&mem, addr, len, &memory_file, offset)?;
    }
    // Brought in ahead: all but the lazy runs (kernel text the template's guest never ran,
    // which a guest may never run either).
    let data_ranges: Vec<(GuestAddress, u64)> =
        file_ranges_in_guest(&template.memory, &template.memory.eager())
            .iter()
            .map(|&(addr, len, _)| (addr, len))
            .collect();
    // The pages the guest will write first are copied before those it reads are mapped.
    let write_set = template_write_set(dir, &template.memory);
    populate(&mem, &write_set, Populate::Write);
    populate(&mem, &data_ranges, Populate::Read);
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&mem)?;
    vm.restore_state(&template.vm)?;
    let vm_created_us = timeline::since_start_us();

    // The command line is in the template's memory already; this one only numbers the slots.
    let mut cmdline = base_cmdline(false)?;
    let mut pio_bus = Bus::new();
    let mut mmio = MmioDevices::new(&vm, &mem);
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Device("reset", e))?;
    attach_legacy_devices(&vm, &mut pio_bus, &reset_evt, cfg.console)?;
    let mut event_manager = DeviceEventManager::new().map_err(BuildError::EventManager)?;
    let (vsock, _, fs_event_manager) =
        attach_common_devices(cfg, &mut mmio, &mut event_manager, &mut cmdline)?;
    for net_cfg in &cfg.net {
        // A template with another number of cards is refused below: its devices differ.
        let tap = take_tap(net_cfg)?;
        attach_template_card(Some(tap), &mut mmio, &mut event_manager, &mut cmdline)?;
    }
    let devices = device_names(&mmio.transports);
    if devices != template.inputs.devices {
        return Err(TemplateError::Mismatch {
            what: "devices",
            template: format!("{:?}", template.inputs.devices),
            sandbox: format!("{devices:?}"),
        }
        .into());
    }
    for ((name, transport), saved) in mmio.transports.iter().zip(&template.devices) {
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(saved)
            .map_err(|e| BuildError::Device(name, io::Error::other(e.to_string())))?;
    }
    if template.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(TemplateError::Mismatch {
            what: "saved vCPUs",
            template: template.vcpus.len().to_string(),
            sandbox: cfg.vcpus.to_string(),
        }
        .into());
    }
    let MmioDevices {
        bus: mmio_bus,
        transports,
        ..
    } = mmio;
    let pio_bus = Arc::new(pio_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let mut vcpus = Vec::with_capacity(template.vcpus.len());
    for (index, state) in (0..cfg.vcpus).zip(&template.vcpus) {
        let vcpu = Vcpu::new(&vm, index, pio_bus.clone(), mmio_bus.clone())?;
        vcpu.set_cpuid(&vcpu.policy_cpuid(supported.as_slice(), cfg.vcpus))?;
        vcpu.restore_state(state)?;
        vcpus.push(vcpu);
    }
    if let Some(vcpu) = vcpus.first() {
        // The write set first: its pages are private copies now, and KVM maps them writable.
        pre_fault(&kvm, vcpu, &write_set);
        pre_fault(&kvm, vcpu, &data_ranges);
    }
    let kernel_loaded_us = timeline::since_start_us();
    let timeline = TimelineRecorder::new(BootTimeline {
        vcpus: cfg.vcpus,
        mem_size_mib: cfg.mem_size_mib,
        boot_protocol: "restore".to_string(),
        vm_created_us,
        kernel_loaded_us,
        guest_memory_host_ranges: memory::host_ranges(&mem),
        ..Default::default()
    });
    tracing::debug!(vm_created_us, kernel_loaded_us, template = %dir.display(), "microVM restored");
    Ok(Vmm::new(
        VmmParts {
            vm,
            mem,
            vcpus,
            event_manager,
            fs_event_manager,
            reset_evt,
            transports,
            vsock,
            mode: VmMode::Restored,
        },
        cfg,
        Arc::new(timeline),
    ))
}

/// Opens /dev/kvm and checks the API version, with a clear error for each way it can fail.
pub fn open_kvm() -> Result<Kvm, BuildError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => BuildError::KvmAbsent,
        libc::EACCES | libc::EPERM => BuildError::KvmPermissionDenied,
        libc::EBUSY => BuildError::KvmBusy,
        _ => BuildError::KvmOpen(e),
    })?;
    let version = kvm.get_api_version();
    if version != kvm_check::KVM_API_VERSION {
        return Err(BuildError::KvmApiVersion(version));
    }
    Ok(kvm)
}

/// The default command line for a guest with or without the serial console.
pub fn base_cmdline(console: bool) -> Result<Cmdline, BuildError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(BuildError::Cmdline)?;
    let console_args = if console {
        CONSOLE_CMDLINE
    } else {
        NO_CONSOLE_CMDLINE
    };
    cmdline
        .insert_str(console_args)
        .map_err(BuildError::Cmdline)?;
    Ok(cmdline)
}

/// The i8042 (always: it carries the reset) and, with `console`, the COM1 UART on IRQ 4.
fn attach_legacy_devices(
    vm: &Vm,
    pio_bus: &mut Bus,
    reset_evt: &EventFd,
    console: bool,
) -> Result<(), BuildError> {
    let dup = |evt: &EventFd, name| evt.try_clone().map_err(|e| BuildError::Device(name, e));
    let new_evt = |name| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Device(name, e));

    let kbd_irq = new_evt("i8042")?;
    vm.register_irqfd(&kbd_irq, 1)?;
    let i8042 = I8042Device::new(
        EventFdTrigger::new(dup(reset_evt, "i8042")?),
        EventFdTrigger::new(kbd_irq),
    );
    pio_bus.insert(
        Arc::new(Mutex::new(i8042)),
        I8042_DATA_PORT,
        I8042_RANGE_LEN,
    )?;

    if console {
        let serial_irq = new_evt("serial")?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
        let serial = SerialDevice::new(serial_irq, Box::new(io::stdout()));
        pio_bus.insert(
            Arc::new(Mutex::new(serial)),
            SERIAL_PORT_BASE,
            SERIAL_PORT_LEN,
        )?;
    }
    Ok(())
}

/// The MMIO bus and the next free virtio-mmio slot.
struct MmioDevices<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemory,
    bus: Bus,
    next_slot: u64,
    /// Every transport with its device's name, in slot order (for templates).
    transports: Vec<(&'static str, Arc<Mutex<MmioTransport>>)>,
}

impl<'a> MmioDevices<'a> {
    fn new(vm: &'a Vm, mem: &'a GuestMemory) -> Self {
        MmioDevices {
            vm,
            mem,
            bus: Bus::new(),
            next_slot: 0,
            transports: Vec::new(),
        }
    }

    /// Puts `device` behind a virtio-mmio transport in the next slot: queue notifications
    /// become ioeventfds, the interrupt an irqfd, the device's events go to the device
    /// thread, and the kernel learns about it from the command line.
    fn attach_virtio_device<D>(
        &mut self,
        name: &'static str,
        device: Arc<Mutex<D>>,
        event_manager: &mut DeviceEventManager,
        cmdline: &mut Cmdline,
    ) -> Result<(), BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let (base, irq) =
            layout::virtio_mmio_slot(self.next_slot).ok_or(BuildError::NoVirtioSlot)?;
        let transport = MmioTransport::new(self.mem.clone(), device.clone())
            .map_err(|e| BuildError::Device("virtio-mmio", e))?;
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, index as u32)?;
        }
        // The guest's InterruptACK writes end inside KVM, in an eventfd nobody reads (its
        // descriptor is closed at once; KVM holds the eventfd): reading InterruptStatus
        // already cleared what they acknowledge (see `IrqTrigger`).
        let ack_sink =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Device("virtio-mmio", e))?;
        self.vm
            .register_mmio_ioevent_any(&ack_sink, base + VIRTIO_MMIO_INTERRUPT_ACK)?;
        drop(ack_sink);
        self.vm
            .register_irqfd(transport.irq_trigger().irq_evt(), irq)?;
        let transport = Arc::new(Mutex::new(transport));
        self.bus.insert(transport.clone(), base, MMIO_REGION_SIZE)?;
        self.transports.push((name, transport));
        event_manager.add_subscriber(device);
        cmdline
            .add_virtio_mmio_device(MMIO_REGION_SIZE, GuestAddress(base), irq, None)
            .map_err(BuildError::Cmdline)?;
        self.next_slot += 1;
        Ok(())
    }
}

/// Command line, MP table, and the PVH start info or the zero page.
fn setup_boot_structures(
    mem: &GuestMemory,
    mem_size: u64,
    vcpus: u8,
    kernel: &KernelEntry,
    initramfs: Option<arch::InitramfsPlacement>,
    cmdline: &Cmdline,
) -> Result<(), BuildError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BuildError::WriteCmdline)?;
    mptable::setup_mptable(mem, vcpus)?;
    match kernel.protocol {
        BootProtocol::Pvh => pvh::setup_pvh_boot(mem, mem_size, initramfs)?,
        BootProtocol::LinuxBoot => {
            let cmdline_len = cmdline
                .as_cstring()
                .map_err(BuildError::Cmdline)?
                .as_bytes()
                .len();
            zero_page::setup_zero_page(mem, mem_size, cmdline_len as u32, initramfs)?
        }
    }
    Ok(())
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    mem: &GuestMemory,
    count: u8,
    kernel: &KernelEntry,
    pio_bus: Bus,
    mmio_bus: Bus,
) -> Result<(Vec<Vcpu>, String), BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let pio_bus = Arc::new(pio_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let vcpus = (0..count)
        .map(|index| {
            let vcpu = Vcpu::new(vm, index, pio_bus.clone(), mmio_bus.clone())?;
            vcpu.configure(mem, supported.as_slice(), count, kernel)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    Ok((vcpus, cpuid_digest(supported.as_slice(), count)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{VmmError, VmmExit};
    use std::io::Write;
    use std::path::Path;

    const LOAD_ADDR: u64 = 0x100_0000;
    /// `mov al, 0xfe; out 0x64, al; 1: hlt; jmp 1b` (same bytes in 32- and 64-bit mode).
    const RESET_CODE: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
    /// `ud2` with no IDT: a triple fault.
    const CRASH_CODE: &[u8] = &[0x0f, 0x0b];

    #[test]
    fn memory_file_ranges_map_to_guest_addresses_across_regions() {
        let layout = snapshot::MemoryLayout {
            regions: vec![
                snapshot::MemRegion {
                    guest_addr: 0,
                    len: 0x3000,
                    file_offset: 0,
                },
                snapshot::MemRegion {
                    guest_addr: 0x1_0000_0000,
                    len: 0x2000,
                    file_offset: 0x3000,
                },
            ],
            file_len: 0x5000,
            data: Vec::new(),
            lazy: Vec::new(),
            sha256: String::new(),
        };
        assert_eq!(
            file_ranges_to_guest(
                &layout,
                &[(0x1000, 0x1000), (0x2000, 0x2000), (0x4000, 0x3000)]
            ),
            vec![
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x2000), 0x1000),
                (GuestAddress(0x1_0000_0000), 0x1000),
                (GuestAddress(0x1_0000_1000), 0x1000),
            ]
        );
    }

    /// A hand-made ELF64 "kernel": `code` loaded at 16 MiB, with a PVH note if `pvh`.
    fn tiny_kernel(code: &[u8], pvh: bool) -> Vec<u8> {
        let phnum: u16 = if pvh { 2 } else { 1 };
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
        elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, phnum, 64, 0, 0] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        let code_off = 0x1000u64;
        let note_off = 0x800u64;
        let phdr = |elf: &mut Vec<u8>, kind: u32, off: u64, addr: u64, size: u64| {
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size, 0x1000] {
                elf.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(&mut elf, 1, code_off, LOAD_ADDR, code.len() as u64);
        if pvh {
            phdr(&mut elf, 4, note_off, 0, 20);
        }
        elf.resize(note_off as usize, 0);
        for v in [4u32, 4, 18] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(b"Xen\0");
        elf.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
        elf.resize(code_off as usize, 0);
        elf.extend_from_slice(code);
        elf
    }

    fn kvm_usable() -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    }

    fn run_tiny_guest(
        code: &[u8],
        pvh: bool,
        vcpus: u8,
        mem_size_mib: u32,
    ) -> Result<VmmExit, VmmError> {
        let dir = tempfile::tempdir().expect("dir");
        let kernel = dir.path().join("vmlinux");
        std::fs::File::create(&kernel)
            .and_then(|mut f| f.write_all(&tiny_kernel(code, pvh)))
            .expect("write kernel");
        let cfg = VmConfig {
            vcpus,
            mem_size_mib,
            cmdline_extra: Some("husk.test=1".into()),
            agent_timeout: std::time::Duration::from_millis(100),
            allow_kvm_pvm: true,
            ..VmConfig::new(kernel, dir.path().join("v.sock"))
        };
        let vmm = build_microvm(&cfg).expect("build");
        let result = vmm.run();
        assert!(!Path::new(&cfg.vsock_socket).exists(), "socket removed");
        result
    }

    #[test]
    fn tiny_pvh_guest_reset_is_a_clean_exit() {
        if !kvm_usable() {
            return;
        }
        assert_eq!(
            run_tiny_guest(RESET_CODE, true, 1, 128).expect("run"),
            VmmExit::GuestShutdown
        );
        assert_eq!(
            run_tiny_guest(RESET_CODE, true, 4, 1024).expect("run"),
            VmmExit::GuestShutdown
        );
    }

    #[test]
    fn tiny_long_mode_guest_reset_is_a_clean_exit() {
        if !kvm_usable() {
            return;
        }
        assert_eq!(
            run_tiny_guest(RESET_CODE, false, 2, 64).expect("run"),
            VmmExit::GuestShutdown
        );
    }

    #[test]
    fn tiny_guest_triple_fault_is_a_crash() {
        if !kvm_usable() {
            return;
        }
        let err = run_tiny_guest(CRASH_CODE, true, 1, 64).expect_err("crash");
        assert!(matches!(err, VmmError::GuestCrashed(0)), "{err}");
    }

    #[test]
    fn kvm_pvm_host_is_refused_up_front() {
        if !kvm_usable() || !kvm_check::kvm_pvm_loaded() {
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, tiny_kernel(RESET_CODE, true)).expect("write");
        let cfg = VmConfig::new(kernel, dir.path().join("v.sock"));
        let err = build_microvm(&cfg).err().expect("refused");
        assert!(matches!(err, BuildError::KvmPvm));
        assert!(err
            .to_string()
            .starts_with("KVM cannot run this guest: this host's KVM is kvm_pvm"));
        assert!(!dir.path().join("v.sock").exists(), "nothing left behind");
    }

    #[test]
    fn tiny_kernel_is_loaded_with_the_right_protocol() {
        let mem = memory::create_guest_memory(32).expect("mem");
        let dir = tempfile::tempdir().expect("dir");
        for (pvh, protocol) in [(true, BootProtocol::Pvh), (false, BootProtocol::LinuxBoot)] {
            let path = dir.path().join(format!("k{pvh}"));
            std::fs::write(&path, tiny_kernel(RESET_CODE, pvh)).expect("write");
            let entry = arch::load_kernel(&mem, &path).expect("load");
            assert_eq!(entry.protocol, protocol);
            assert_eq!(entry.entry, LOAD_ADDR);
            assert_eq!(entry.kernel_start, LOAD_ADDR);
            assert_eq!(entry.kernel_end, LOAD_ADDR + RESET_CODE.len() as u64);
        }
    }

    #[test]
    fn boot_structures_for_pvh_guest() {
        let mem = memory::create_guest_memory(64).expect("mem");
        let kernel = KernelEntry {
            protocol: BootProtocol::Pvh,
            entry: LOAD_ADDR,
            kernel_start: LOAD_ADDR,
            kernel_end: LOAD_ADDR + 0x1000,
            data_start: LOAD_ADDR + 0x1000,
            mapped_end: LOAD_ADDR,
        };
        let mut cmdline = base_cmdline(false).expect("cmdline");
        cmdline
            .add_virtio_mmio_device(0x1000, GuestAddress(0xd000_0000), 5, None)
            .expect("device");
        setup_boot_structures(&mem, 64 << 20, 2, &kernel, None, &cmdline).expect("setup");
        let mut buf = vec![0u8; 300];
        vm_memory::Bytes::read_slice(&mem, &mut buf, GuestAddress(CMDLINE_START)).expect("read");
        let written = std::ffi::CStr::from_bytes_until_nul(&buf)
            .expect("nul")
            .to_str()
            .expect("utf8");
        assert!(written.starts_with("reboot=t panic=-1"));
        assert!(written.ends_with("8250.nr_uarts=0 virtio_mmio.device=4K@0xd0000000:5"));
        let magic: u32 =
            vm_memory::Bytes::read_obj(&mem, GuestAddress(layout::PVH_INFO_START)).expect("pvh");
        assert_eq!(magic, pvh::XEN_HVM_START_MAGIC_VALUE);
        let mpf: [u8; 4] =
            vm_memory::Bytes::read_obj(&mem, GuestAddress(layout::EBDA_START)).expect("mpf");
        assert_eq!(&mpf, b"_MP_");
    }

    #[test]
    fn console_cmdline_enables_ttys0() {
        let cmdline = base_cmdline(true).expect("cmdline");
        let s = cmdline
            .as_cstring()
            .expect("cstring")
            .into_string()
            .expect("utf8");
        assert!(s.starts_with("reboot=t panic=-1 quiet"));
        assert!(s.ends_with("rdinit=/init console=ttyS0 earlyprintk=serial"));
        assert!(!s.contains("pci=off"));
    }

    #[test]
    fn default_cmdline_has_no_uarts() {
        let cmdline = base_cmdline(false).expect("cmdline");
        let s = cmdline
            .as_cstring()
            .expect("cstring")
            .into_string()
            .expect("utf8");
        assert!(s.ends_with("rdinit=/init 8250.nr_uarts=0"));
        assert!(!s.contains("console="));
    }
}
