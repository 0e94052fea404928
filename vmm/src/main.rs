//! `husk-vmm`: args -> config -> build -> run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use husk_vmm::builder::build_microvm;
use husk_vmm::config::VmConfig;
use husk_vmm::{timeline, vmm};

/// Runs one husk microVM.
#[derive(Debug, Parser)]
#[command(name = "husk-vmm", version)]
struct Args {
    /// Uncompressed ELF kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (newc cpio) holding the agent as /init.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u32,
    /// Unix socket to create for the guest's vsock.
    #[arg(long)]
    vsock_socket: PathBuf,
    /// Appended to the kernel command line.
    #[arg(long)]
    cmdline_extra: Option<String>,
    /// Attach the serial console and print the guest console on stdout.
    #[arg(long)]
    console: bool,
    /// Write the boot timeline as JSON to this file.
    #[arg(long)]
    boot_report: Option<PathBuf>,
    /// How long to wait for the agent's handshake, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    agent_timeout_ms: u64,
    /// Run even though this host's KVM is kvm_pvm (Linux guests then stop with a KVM internal
    /// error): for VMM development with hand-made guests only.
    #[arg(long)]
    allow_kvm_pvm: bool,
    /// Container supervisor mode: run the container described by this plan (written by
    /// `husk create`) and exit with its init's status.
    #[arg(long)]
    supervise: Option<PathBuf>,
    /// Share this host directory with the guest through virtio-fs (tag `husk`).
    #[arg(long)]
    shared_dir: Option<PathBuf>,
    /// How long, in seconds, the guest may cache entries and attributes under the share's
    /// `<id>/rootfs` directories (at most a day).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=86_400), requires = "shared_dir")]
    share_rootfs_cache_secs: u32,
    /// The same for everywhere else in the share (bind mounts, the share's own directories).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=86_400), requires = "shared_dir")]
    share_cache_secs: u32,
    /// The most inodes of the share the guest may hold at once (default: by guest memory, 96
    /// per MiB, at least 8192); past it new ones fail with ENFILE.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), requires = "shared_dir")]
    share_max_inodes: Option<u64>,
    /// A network card over this inherited TAP file descriptor (opened with IFF_TAP, IFF_NO_PI
    /// and IFF_VNET_HDR; husk-vmm takes it over).
    #[arg(long, requires = "net_mac")]
    net_tap_fd: Option<i32>,
    /// The network card's MAC address.
    #[arg(long, value_parser = husk_vmm::config::parse_mac, requires = "net_tap_fd")]
    net_mac: Option<[u8; 6]>,
    /// The guest's IPv4 address on the card, with its prefix length (10.0.0.2/24): the guest
    /// kernel configures eth0 with it at boot.
    #[arg(long, value_parser = husk_vmm::config::parse_ipv4_cidr, requires = "net_tap_fd")]
    net_ip: Option<(std::net::Ipv4Addr, u8)>,
    /// The guest's default gateway on the card.
    #[arg(long, requires = "net_ip")]
    net_gateway: Option<std::net::Ipv4Addr>,
    /// The guest's IPv6 address on the card, with its prefix length (fd00::2/64): the guest
    /// agent configures eth0 with it at boot.
    #[arg(long, value_parser = husk_vmm::config::parse_ipv6_cidr, requires = "net_tap_fd")]
    net_ip6: Option<(std::net::Ipv6Addr, u8)>,
    /// The guest's IPv6 default gateway on the card.
    #[arg(long, requires = "net_ip6")]
    net_gateway6: Option<std::net::Ipv6Addr>,
    /// The card's MTU (the guest's driver takes it from the card); default 1500.
    #[arg(long, value_parser = husk_vmm::config::parse_mtu, requires = "net_tap_fd")]
    net_mtu: Option<u16>,
    /// A route through the card besides the default ones, `destination/prefix[,gateway]`
    /// (10.0.0.0/8,169.254.1.1; without a gateway, on the link); repeatable, added by the agent
    /// in the order given.
    #[arg(long, value_parser = husk_vmm::config::parse_route, requires = "net_tap_fd")]
    net_route: Vec<husk_vmm::config::NetRoute>,
    /// A further address of the card beyond --net-ip and --net-ip6, with its prefix length
    /// (10.0.0.3/24, fd00::3/64); repeatable, added by the agent.
    #[arg(long, value_parser = husk_vmm::config::parse_cidr, requires = "net_tap_fd")]
    net_addr: Vec<(std::net::IpAddr, u8)>,
    /// A network card, in the words of `husk_vmm::net_handoff` with its inherited TAP as
    /// `tap=<fd>`: "tap=5 mac=02:00:0a:58:00:05 mtu=1450 ip=10.88.0.5/16 gateway=10.88.0.1
    /// route=10.9.0.0/16,10.88.0.1"; repeatable, one card each (eth0, eth1, ... in the guest,
    /// in this order; at most 4). The --net-* options above are the first card's in options of
    /// their own.
    #[arg(long = "net-card", value_parser = parse_net_card, conflicts_with = "net_tap_fd")]
    net_cards: Vec<husk_vmm::config::NetConfig>,
    /// Before building the microVM, wait (up to the agent timeout) for the network cards on
    /// this inherited Unix socket: the runtime sends them once the engine's hooks have
    /// configured this process's network namespace (see `husk_vmm::net_handoff`).
    #[arg(long, conflicts_with_all = ["net_tap_fd", "net_cards", "template_out", "restore"])]
    net_from_fd: Option<i32>,
    /// Boot the guest until its agent is ready, save it as a template into this directory
    /// (which must exist and be empty), and exit 0. Needs --shared-dir (an empty directory);
    /// no TAP (see --template-net-cards).
    #[arg(long, conflicts_with_all = ["restore", "supervise", "net_tap_fd", "net_cards", "net_from_fd"])]
    template_out: Option<PathBuf>,
    /// The template's guest has this many network cards on no TAP, down and without an
    /// address: for sandboxes with as many cards (--net-card, --net-tap-fd) to restore.
    #[arg(long, default_value_t = 0, requires = "template_out")]
    template_net_cards: u8,
    /// Start by restoring the template in this directory instead of booting. Exits with
    /// status 3 when the template cannot be used (nothing of the guest ran).
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Where to write the line that says which system call the seccomp filter stopped, if
    /// it ends the VMM (created empty at confinement).
    #[arg(long)]
    seccomp_report: Option<PathBuf>,
    /// Run as an unprivileged uid: once in its jail, join the user namespace of this inherited
    /// descriptor and become its root (see `husk_vmm::userns`). The share and the jail's
    /// directories must be idmapped mounts through it.
    #[arg(long)]
    userns_fd: Option<i32>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn run(args: Args) -> anyhow::Result<i32> {
    let mut cfg = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        vcpus: args.cpus,
        mem_size_mib: args.mem_mib,
        vsock_socket: args.vsock_socket,
        cmdline_extra: args.cmdline_extra,
        console: args.console,
        boot_report: args.boot_report,
        agent_timeout: Duration::from_millis(args.agent_timeout_ms),
        allow_kvm_pvm: args.allow_kvm_pvm,
        shared_dir: args.shared_dir,
        share_cache: husk_vmm::devices::virtio::fs::CacheTimes {
            rootfs: Duration::from_secs(args.share_rootfs_cache_secs.into()),
            other: Duration::from_secs(args.share_cache_secs.into()),
        },
        share_max_inodes: args
            .share_max_inodes
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        net: match (args.net_tap_fd, args.net_mac) {
            (Some(tap_fd), Some(mac)) => vec![husk_vmm::config::NetConfig {
                tap_fd,
                mac,
                ipv4: args.net_ip,
                gateway: args.net_gateway,
                ipv6: args.net_ip6,
                gateway6: args.net_gateway6,
                mtu: args.net_mtu,
                routes: args.net_route,
                addresses: args.net_addr,
            }],
            _ => args.net_cards,
        },
        template_out: args.template_out,
        template_cards: args.template_net_cards,
        restore_from: args.restore,
        seccomp_report: args.seccomp_report,
        userns_fd: args.userns_fd,
    };
    if let Ok(hook) = std::env::var(husk_vmm::config::AGENT_TEST_HOOK_ENV) {
        cfg.arm_agent_test_hook(&hook).map_err(anyhow::Error::msg)?;
        tracing::warn!("test hook armed in the agent: {hook}");
    }
    if let Some(fd) = args.net_from_fd {
        cfg.net = husk_vmm::net_handoff::receive(fd, cfg.agent_timeout)?;
        // SAFETY: the socket was inherited for this one message; nothing else uses it.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    if let Some(plan) = &args.supervise {
        return match husk_vmm::supervisor::run_supervised(&cfg, plan) {
            Err(e) if e.is_template_refusal() => Ok(refused(&e)),
            result => result.context("container supervision failed"),
        };
    }
    let vmm = match build_microvm(&cfg) {
        Err(e) if e.is_template_refusal() => return Ok(refused(&e)),
        result => result.context("failed to build the microVM")?,
    };
    husk_vmm::confine::confine(&cfg.jail_plan(), cfg.seccomp_report.as_deref())
        .context("failed to confine husk-vmm")?
        .record(vmm.timeline());
    let exit = match vmm.run() {
        Err(e) if e.is_template_refusal() => return Ok(refused(&e)),
        result => result.context("the microVM failed")?,
    };
    Ok(exit.exit_code())
}

/// `--net-card`'s value: one card's words with its TAP (see `husk_vmm::net_handoff`).
fn parse_net_card(text: &str) -> Result<husk_vmm::config::NetConfig, String> {
    husk_vmm::net_handoff::parse_card(text, true)
}

/// Reports a template that could not be used; the exit status tells the runtime to boot.
fn refused(err: &dyn std::error::Error) -> i32 {
    eprintln!("husk-vmm: {}", husk_vmm::supervisor::chain(err));
    vmm::TEMPLATE_REFUSED_EXIT
}

fn main() -> ExitCode {
    timeline::mark_process_start();
    vmm::single_malloc_arena();
    if let Err(e) = vmm::block_exit_signals() {
        eprintln!("husk-vmm: failed to block SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        // Exit at once: vCPU threads may still be inside KVM_RUN.
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("husk-vmm: {e:#}");
            std::process::exit(1)
        }
    }
}
