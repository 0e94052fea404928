//! `husk create`: validate the bundle, prepare the share, boot the container's microVM in a
//! detached `husk-vmm --supervise`, and return once the container exists in the guest.

use crate::bundle::{translate_spec, Bundle};
use crate::config::HuskConfig;
use crate::container::{process_start_time, vmm_command, StateDir, VmRollback};
use crate::hooks::{HookKind, Hooks};
use crate::host_cgroup::{self, HostCgroup, HostLimits};
use crate::share::{bind_into_share, mount_share, FsCache, ShareError};
use crate::sizing::{host_cpus, size_vm};
use crate::state::{now_rfc3339, write_atomic, ContainerState, Status};
use crate::template::{self, Templates};
use crate::{logging, Globals};
use anyhow::{bail, Context, Result};
use husk_vmm::supervisor::SupervisorPlan;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Options of `husk create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// The bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket that receives the pty master (with process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the container's pid (the husk-vmm process) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Not supported: the container always pivots into its rootfs inside the microVM.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (the guest has its own keyrings anyway).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds passed to the container: not supported (only 0 is accepted).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container id.
    pub id: String,
}

/// A container just created: its supervisor (our child) and its state.
pub struct Created {
    pub child: Child,
    pub dir: StateDir,
    /// `running` when the init's program runs already ([`Then::Start`] was granted): only
    /// the poststart hooks are left to run.
    pub state: ContainerState,
}

/// What [`create_container`] does once the container exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing: `husk create`, whose caller starts the container later.
    Wait,
    /// Start the init's program at once, in husk-vmm, when no hook has to run between the
    /// creation and the start (`husk run`); otherwise as [`Then::Wait`].
    Start,
}

/// `husk create`.
pub fn create(globals: &Globals, args: &CreateArgs) -> Result<()> {
    create_container(globals, args, Then::Wait)?;
    Ok(())
}

/// Checks the console socket the engine gave: it must exist and be a Unix socket.
pub fn validate_console_socket(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("console socket {}: cannot stat it", path.display()))?;
    if !meta.file_type().is_socket() {
        bail!("console socket {}: not a Unix socket", path.display());
    }
    Ok(())
}

/// Everything `create` does; `run` uses it too.
pub fn create_container(globals: &Globals, args: &CreateArgs, then: Then) -> Result<Created> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    if args.no_pivot {
        bail!("--no-pivot is not supported: husk always pivots into the rootfs inside the microVM");
    }
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported by husk");
    }
    let bundle = Bundle::load(&args.bundle)?;
    match (&args.console_socket, bundle.terminal()) {
        (Some(socket), true) => validate_console_socket(socket)?,
        (None, true) => {
            bail!("process.terminal is set: a --console-socket is needed to receive the pty master")
        }
        (Some(_), false) => {
            bail!("--console-socket was given but process.terminal is false in config.json")
        }
        (None, false) => {}
    }
    let mut cfg = HuskConfig::load()?;
    // `--debug` on the command line is the configuration's `debug` for this sandbox: its guest
    // keeps the console, so it restores from (and builds) the console's template, never
    // another's, which it would refuse and throw away.
    cfg.debug |= globals.debug;
    let size = size_vm(&bundle.spec, &cfg, host_cpus())?;
    let fs_cache = FsCache::wanted(&cfg, &bundle.spec)?;
    let kernel = cfg.kernel_path()?;
    let initramfs = cfg.initramfs_path()?;
    let mut translation = translate_spec(&bundle, &args.id);
    if let Some(resources) = translation.spec["linux"]
        .get_mut("resources")
        .and_then(serde_json::Value::as_object_mut)
    {
        let notes = crate::sizing::map_cpuset(resources, u32::from(size.vcpus))?;
        translation.notes.extend(notes);
    }
    for note in &translation.notes {
        logging::warn(note);
    }
    let affinity = host_affinity(&bundle.spec)?;
    let block_io = host_cgroup::take_block_io(
        translation
            .spec
            .get_mut("linux")
            .and_then(|l| l.get_mut("resources")),
    );
    let cgroup_path = host_cgroup::plan(
        &bundle.spec,
        &globals.root,
        &args.id,
        block_io.as_ref(),
        &logging::warn,
    )?;

    let _lock = dir.create_locked()?;
    let mut rollback = VmRollback::new(&dir, logging::warn);
    let mut mounts = Vec::new();
    mount_share(&dir, &mut mounts).context("preparing the share")?;
    let mut userns = crate::container::vmm_userns(&cfg, &dir, &logging::warn);
    let bundle_share = dir.shared_bundle();
    let binds = &translation.binds;
    match bind_into_share(
        &bundle_share,
        binds,
        &mut mounts,
        userns.as_ref().map(AsFd::as_fd),
    ) {
        // Nothing was made: husk-vmm runs as root, and the binds are plain.
        Err(e @ ShareError::Idmap { .. }) => {
            logging::warn(&format!(
                "husk-vmm runs as root: {}",
                husk_vmm::supervisor::chain(&e)
            ));
            userns = None;
            bind_into_share(&bundle_share, binds, &mut mounts, None)
        }
        result => result,
    }
    .context("preparing the share")?;
    let cgroup = HostCgroup::prepare_planned(
        cgroup_path.as_deref(),
        HostLimits {
            guest_mem_mib: u64::from(size.mem_mib),
            block_io,
        },
        &dir.dir,
        &logging::warn,
    )?;
    let network = carry_network(&bundle.spec, &dir, &mut translation.spec)?;
    let hooks = Hooks::from_spec(&bundle.spec).map_err(crate::bundle::BundleError::Invalid)?;
    // docker's way: a new network namespace that a prestart hook configures. husk-vmm starts
    // in a namespace of its own, the hooks run, and what they made is handed to the waiting VMM.
    let hooked_network = network.is_empty() && network_by_hooks(&bundle.spec, &hooks);
    if hooked_network {
        crate::shim::translate::use_vm_network(&mut translation.spec);
    }

    let debug = cfg.debug;
    let templates = Templates::new(&cfg);
    let warm = template::wanted(&cfg, &bundle.spec)?;
    let mut template = if warm && !hooked_network {
        let cards = u8::try_from(network.len()).context("too many network cards")?;
        templates.get(&cfg, &kernel, &initramfs, size, cards, logging::warn)
    } else {
        if warm {
            logging::debug(
                "warm start: the network that the engine's hooks make is not known before the \
                 VM is built; booting",
            );
        }
        None
    };
    let mut state = ContainerState {
        id: args.id.clone(),
        status: Status::Creating,
        pid: 0,
        pid_start_time: 0,
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: now_rfc3339(),
        annotations: bundle.annotations(),
        mounts,
        exit: None,
        vcpus: size.vcpus,
        hooks,
    };
    // Nothing of the engine's may run between the creation and the start.
    let hooks_before_start = [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::CreateContainer,
        HookKind::StartContainer,
    ]
    .iter()
    .any(|kind| !state.hooks.get(*kind).is_empty());
    let (pid, guest_pid, started) = loop {
        // A template's first restore records its write set right after the creation: a start
        // before it would make the program's own pages part of every later restore's copy.
        let unrecorded = template
            .as_ref()
            .is_some_and(|t| !t.join(husk_vmm::write_set::WRITE_SET_FILE).exists());
        let start = then == Then::Start && !hooks_before_start && !unrecorded;
        if then == Then::Start && !start {
            logging::debug(&format!(
                "container {} is started after its creation, not with it: {}",
                args.id,
                if hooks_before_start {
                    "hooks run in between"
                } else {
                    "its template's write set is recorded first"
                }
            ));
        }
        let (ready_read, ready_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the ready pipe")?;
        fcntl(ready_write.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .context("preparing the ready pipe")?;
        let plan = SupervisorPlan {
            id: args.id.clone(),
            spec: translation.spec.clone(),
            bundle: format!("{}/{}", crate::bundle::GUEST_SHARE, args.id),
            terminal: bundle.terminal(),
            console_socket: args.console_socket.clone(),
            ready_fd: Some(ready_write.as_raw_fd()),
            exit_file: dir.exit_file(),
            log_file: Some(dir.log_file()),
            start,
        };
        write_atomic(&dir.plan_file(), &serde_json::to_vec_pretty(&plan)?)?;

        // In supervisor mode the VMM's stdout (the guest console with `debug`) is vmm.log.
        let mut cmd = vmm_command(&cfg, &kernel, &initramfs, size, fs_cache, &dir, debug)
            .with_context(|| format!("preparing {}", dir.vsock_socket().display()))?;
        cmd.arg("--supervise").arg(dir.plan_file());
        let mut tap_fds = Vec::with_capacity(network.len());
        for net in &network {
            // Inherited under its own number, as the ready pipe is.
            fcntl(net.tap.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
                .context("passing the TAP to husk-vmm")?;
            tap_fds.push(net.tap.as_raw_fd());
        }
        cmd.args(crate::network::vmm_args(&network, &tap_fds));
        let handoff = if hooked_network {
            let (ours, vmm_end) =
                std::os::unix::net::UnixStream::pair().context("creating the network socket")?;
            fcntl(vmm_end.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
                .context("passing the network socket to husk-vmm")?;
            cmd.arg("--net-from-fd")
                .arg(vmm_end.as_raw_fd().to_string());
            // SAFETY: unshare(2) is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
            Some((ours, vmm_end))
        } else {
            None
        };
        if let Some(template) = &template {
            cmd.arg("--restore").arg(template);
        }
        if let Some(userns) = &userns {
            crate::container::pass_userns(&mut cmd, userns);
        }
        if let Some(cgroup) = &cgroup {
            cgroup.join_on_exec(&mut cmd);
        }
        if let Some(set) = affinity {
            // SAFETY: sched_setaffinity(2) is async-signal-safe; `set` is a plain copy.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .map_err(std::io::Error::from)
                });
            }
        }
        logging::debug(&format!("spawning {cmd:?}"));
        let child = crate::container::in_new_pid_namespace(|| cmd.spawn(), &logging::warn)
            .with_context(|| format!("cannot start {}", cfg.vmm_path().display()))?;
        drop(ready_write);
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        rollback.child = Some(child);
        // Recorded at once, still `creating`: a `husk create` killed from here on leaves a VMM
        // that `husk delete --force` finds (by pid and start time) and kills.
        state.pid = pid;
        state.pid_start_time = process_start_time(pid).unwrap_or(0);
        state.save(&dir)?;
        if let Some((socket, vmm_end)) = handoff {
            drop(vmm_end);
            state.pid = pid;
            state.pid_start_time = process_start_time(pid).unwrap_or(0);
            let handed = hand_over_network(&state, &bundle.dir, &socket).map_err(|e| {
                // A VMM that died meanwhile is the cause to report, not its missing namespace.
                match rollback
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    Some(status) => anyhow::anyhow!(
                        "husk-vmm exited ({status}) while the network hooks ran{}",
                        log_tail(&dir.log_file())
                    ),
                    None => e,
                }
            });
            if let Err(e) = handed {
                // The lifecycle: stop and remove the container, then the poststop hooks.
                drop(rollback);
                run_poststop(&state);
                return Err(e);
            }
        }

        let deadline = Instant::now() + cfg.agent_timeout + Duration::from_secs(10);
        let line = read_ready(&ready_read, deadline)?;
        match line.split_once(' ') {
            Some(("created", guest_pid)) => break (pid, guest_pid.trim().to_string(), false),
            Some(("started", guest_pid)) if start => {
                break (pid, guest_pid.trim().to_string(), true)
            }
            Some(("refused", why)) if template.is_some() => {
                // The template could not be used: nothing of the container exists yet.
                logging::warn(&format!("warm start: {why}; booting"));
                if let Some(mut child) = rollback.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = std::fs::remove_file(dir.vsock_socket());
                if let Some(dir) = template.take() {
                    templates.discard(&dir);
                }
            }
            Some(("error", message)) => {
                debug_vmm_log(&dir);
                bail!("{message}")
            }
            _ if line.is_empty() => {
                debug_vmm_log(&dir);
                bail!(
                    "husk-vmm exited before the container was created{}",
                    log_tail(&dir.log_file())
                )
            }
            _ => bail!("husk-vmm reported {line:?}"),
        }
    };
    logging::debug(&format!(
        "container {} {}, guest pid {guest_pid}",
        args.id,
        if started {
            "created and started in one step"
        } else {
            "created"
        }
    ));
    state.pid = pid;
    state.pid_start_time = process_start_time(pid)
        .with_context(|| format!("husk-vmm (pid {pid}) died right after creating the container"))?;
    if let Some(template) = &template {
        // Once per template: what this restore wrote up to here, later restores copy ahead.
        match template::record_write_set(template, pid) {
            Ok(Some(pages)) => logging::debug(&format!(
                "recorded the write set of template {} ({pages} pages)",
                template.display()
            )),
            Ok(None) => {}
            Err(e) => logging::debug(&format!("no write set recorded for the template: {e:#}")),
        }
    }
    // The container exists in the guest, its program not yet started: the create-time hooks
    // (those that configured the network ran before the VM was built).
    let hooked = if hooked_network {
        state.hooks.run(
            HookKind::CreateContainer,
            &state.oci_state(),
            &bundle.dir,
            logging::warn,
        )
    } else {
        state
            .hooks
            .run_create(&state.oci_state(), &bundle.dir, logging::warn)
    };
    if let Err(e) = hooked {
        // The lifecycle: stop and remove the container, then the poststop hooks.
        drop(rollback);
        run_poststop(&state);
        return Err(e);
    }
    state.status = if started {
        Status::Running
    } else {
        Status::Created
    };
    state.save(&dir)?;
    if let Some(pid_file) = &args.pid_file {
        let pid_file = std::path::absolute(pid_file).unwrap_or_else(|_| pid_file.clone());
        write_atomic(&pid_file, pid.to_string().as_bytes())?;
    }
    rollback.armed = false;
    let child = rollback
        .child
        .take()
        .context("the supervisor handle is gone")?;
    drop(rollback);
    Ok(Created { child, dir, state })
}

/// The network namespace the spec names (podman's, made by CNI or netavark), carried into the
/// microVM (see [`crate::network`]): its interfaces wired to TAPs, recorded in `dir` so that
/// every way the state directory goes undoes it, and the guest spec given the VM's own network
/// namespace (where the cards are). Empty, and a namespace of the guest's own with loopback
/// only, when the spec names no namespace or the namespace has no Ethernet interface.
fn carry_network(
    spec: &serde_json::Value,
    dir: &StateDir,
    guest_spec: &mut serde_json::Value,
) -> Result<Vec<crate::network::PodNetwork>> {
    let Some(netns) = crate::network::netns_path(spec) else {
        return Ok(Vec::new());
    };
    let cards = crate::network::prepare(&netns)
        .with_context(|| format!("carrying the network namespace {}", netns.display()))?;
    if cards.is_empty() {
        logging::debug(&format!(
            "network namespace {} has no Ethernet interface: the container gets loopback only",
            netns.display()
        ));
        return Ok(cards);
    }
    crate::network::record(&dir.dir, &netns, &cards)?;
    crate::shim::translate::use_vm_network(guest_spec);
    for (card, net) in cards.iter().enumerate() {
        logging::debug(&format!(
            "{} of {} ({}, {}) goes to the microVM's eth{card} through {}",
            net.interface,
            netns.display(),
            net.mac,
            net.ipv4.as_deref().unwrap_or("no IPv4 address"),
            crate::network::tap_name(card)
        ));
    }
    Ok(cards)
}

/// Whether the spec asks for a new network namespace (no `path`) and has hooks that run before
/// the container's program, which is how docker's libnetwork configures a container's network
/// (its `libnetwork-setkey` prestart hook moves a veth into the namespace of the container's
/// pid). Then husk-vmm, that pid, starts in a network namespace of its own and waits for its
/// card until the hooks have run ([`hand_over_network`]).
fn network_by_hooks(spec: &serde_json::Value, hooks: &Hooks) -> bool {
    let new_netns = spec["linux"]["namespaces"].as_array().is_some_and(|all| {
        all.iter()
            .any(|ns| ns["type"] == "network" && ns.get("path").and_then(|p| p.as_str()).is_none())
    });
    new_netns
        && !(hooks.get(HookKind::Prestart).is_empty()
            && hooks.get(HookKind::CreateRuntime).is_empty())
}

/// Runs the `prestart` and `createRuntime` hooks with husk-vmm (waiting in its own network
/// namespace) as the container's pid, then carries the interfaces they made there into TAPs
/// and hands the cards to husk-vmm over `socket` (`none` when they made none). The namespace
/// is husk-vmm's own (docker keeps it with a bind mount of its own): the TAP and the qdiscs go
/// with it, so nothing is recorded for `delete`.
fn hand_over_network(
    state: &ContainerState,
    bundle: &Path,
    socket: &std::os::unix::net::UnixStream,
) -> Result<()> {
    let oci_state = state.oci_state();
    for kind in [HookKind::Prestart, HookKind::CreateRuntime] {
        state.hooks.run(kind, &oci_state, bundle, logging::warn)?;
    }
    let netns = PathBuf::from(format!("/proc/{}/ns/net", state.pid));
    let net = crate::network::prepare(&netns).with_context(|| {
        format!(
            "carrying the network the hooks made in {} (husk-vmm's namespace)",
            netns.display()
        )
    })?;
    for (card, net) in net.iter().enumerate() {
        logging::debug(&format!(
            "{} ({}, {}) made by the hooks goes to the microVM's eth{card}",
            net.interface,
            net.mac,
            net.ipv4.as_deref().unwrap_or("no IPv4 address")
        ));
    }
    let taps: Vec<_> = net.iter().map(|n| n.tap.as_fd()).collect();
    husk_vmm::net_handoff::send(
        socket.as_fd(),
        &crate::network::handoff_message(&net),
        &taps,
    )
    .context("handing the network cards to husk-vmm")
}

/// The host CPUs the container's `husk-vmm` is pinned to: its cpuset
/// (`linux.resources.cpu.cpus`), each CPU of which must be online here (as runc refuses a
/// cpuset the host does not have).
fn host_affinity(spec: &serde_json::Value) -> Result<Option<nix::sched::CpuSet>> {
    let Some(list) = spec["linux"]["resources"]["cpu"]["cpus"]
        .as_str()
        .filter(|s| !s.trim().is_empty())
    else {
        return Ok(None);
    };
    let wanted = crate::sizing::parse_cpuset(list)?;
    let online_text = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let online = crate::sizing::parse_cpuset(online_text.trim())?;
    let mut set = nix::sched::CpuSet::new();
    for cpu in wanted {
        if !online.contains(&cpu) {
            bail!(
                "linux.resources.cpu.cpus {list}: CPU {cpu} is not online on this host \
                 (online: {})",
                online_text.trim()
            );
        }
        set.set(cpu as usize)
            .with_context(|| format!("linux.resources.cpu.cpus {list}: CPU {cpu}"))?;
    }
    Ok(Some(set))
}

/// Runs the `poststop` hooks of a container that is gone (failures are warnings).
pub fn run_poststop(state: &ContainerState) {
    let mut stopped = state.clone();
    stopped.status = Status::Stopped;
    let _ = stopped.hooks.run(
        HookKind::Poststop,
        &stopped.oci_state(),
        &stopped.bundle,
        logging::warn,
    );
}

/// Reads the supervisor's one-line report (empty when it exited without one).
fn read_ready(fd: &OwnedFd, deadline: Instant) -> Result<String> {
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(fd.try_clone()?);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for the microVM to create the container");
        }
        let ms = u16::try_from(left.as_millis().min(10_000)).unwrap_or(10_000);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the microVM"),
        }
        let mut chunk = [0u8; 4096];
        let n = file.read(&mut chunk)?;
        if n == 0 || chunk[..n].contains(&b'\n') {
            buf.extend_from_slice(&chunk[..n]);
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// With `--debug`, the whole of a failed sandbox's VMM log (its guest console: an oops, a
/// warning) into husk's log, before the rollback removes it with the state directory.
fn debug_vmm_log(dir: &StateDir) {
    if let Ok(text) = std::fs::read_to_string(dir.log_file()) {
        logging::debug(&format!(
            "husk-vmm's log and the guest console so far:\n{text}"
        ));
    }
}

/// The last lines of the VMM log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("; its log says: {}", tail.join(" | "))
}
