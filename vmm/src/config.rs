//! User input for one microVM, and its validation.
//!
//! [`VmConfig::validate`] runs before any KVM or socket resource exists, so a bad invocation
//! fails with a clear message and leaves nothing behind.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::arch::layout::MAX_VCPUS;

/// Smallest guest memory the VMM accepts.
pub const MIN_MEM_MIB: u32 = 32;

/// Default time to wait for the guest agent's handshake.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

const ELFMAG: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;

/// Errors of [`VmConfig::validate`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--cpus 0`.
    #[error("the VM needs at least 1 vCPU")]
    NoVcpus,
    /// More vCPUs than supported.
    #[error("{0} vCPUs requested, at most {MAX_VCPUS} are supported")]
    TooManyVcpus(u8),
    /// Less memory than the minimum.
    #[error("{0} MiB of memory requested, at least {MIN_MEM_MIB} MiB are needed")]
    MemoryTooSmall(u32),
    /// More memory than the host has.
    #[error("{requested_mib} MiB of memory requested, but the host has only {host_mib} MiB")]
    MemoryTooLarge { requested_mib: u32, host_mib: u64 },
    /// The host's memory size could not be read.
    #[error("cannot read the host memory size from /proc/meminfo")]
    HostMemory(#[source] std::io::Error),
    /// The kernel image does not exist.
    #[error("kernel {0}: no such file")]
    KernelMissing(PathBuf),
    /// The kernel image cannot be read.
    #[error("kernel {path}: cannot read it")]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not an ELF file.
    #[error("kernel {0}: not an ELF file (an uncompressed vmlinux is needed, not a bzImage)")]
    KernelNotElf(PathBuf),
    /// The kernel image is a 32-bit ELF.
    #[error("kernel {0}: not a 64-bit ELF file")]
    KernelNot64Bit(PathBuf),
    /// The initramfs does not exist or cannot be read.
    #[error("initramfs {path}: cannot read it")]
    InitramfsUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The vsock socket path exists already.
    #[error("vsock socket {0} already exists (another VM running, or a stale socket?)")]
    SocketExists(PathBuf),
    /// The vsock socket's directory does not exist.
    #[error("vsock socket {0}: its parent directory does not exist")]
    SocketParentMissing(PathBuf),
    /// The shared directory does not exist or is not a directory.
    #[error("shared directory {0}: no such directory")]
    SharedDirMissing(PathBuf),
    /// More network cards than a VM has.
    #[error("{0} network cards, at most {MAX_NET_CARDS} are supported")]
    TooManyCards(usize),
    /// More routes for the network card than the guest's command line holds.
    #[error("{0} routes for the network card, at most {MAX_NET_ROUTES} are supported")]
    TooManyRoutes(usize),
    /// More addresses for the network card than the guest's command line holds.
    #[error(
        "{0} further addresses for the network card, at most {MAX_NET_ADDRESSES} are supported"
    )]
    TooManyAddresses(usize),
}

/// Everything needed to build and run one microVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs (uncompressed newc cpio holding the agent as /init).
    pub initramfs: Option<PathBuf>,
    /// Number of vCPUs, 1..=MAX_VCPUS.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Host side of the guest's vsock: a Unix socket path the VMM creates.
    pub vsock_socket: PathBuf,
    /// Appended to the kernel command line.
    pub cmdline_extra: Option<String>,
    /// Attach the serial console and print the guest's console on stdout.
    pub console: bool,
    /// Write the boot timeline as JSON here.
    pub boot_report: Option<PathBuf>,
    /// How long to wait for the agent's handshake.
    pub agent_timeout: Duration,
    /// Run even on a kvm_pvm host (see [`crate::kvm_check`]), where a Linux guest stops with a
    /// KVM internal error after a while: only for VMM development with hand-made guests.
    pub allow_kvm_pvm: bool,
    /// Host directory shared with the guest through virtio-fs (tag `husk`).
    pub shared_dir: Option<PathBuf>,
    /// How long the guest may cache what it learns of the share, by place.
    pub share_cache: crate::devices::virtio::fs::CacheTimes,
    /// The most inodes of the share the guest may hold; `None`: by its memory
    /// ([`crate::devices::virtio::fs::max_inodes_for`]).
    pub share_max_inodes: Option<usize>,
    /// The network cards, each over an inherited TAP device (`eth0`, `eth1`, ... in the guest,
    /// in this order; at most [`MAX_NET_CARDS`]).
    pub net: Vec<NetConfig>,
    /// Boot the guest to its agent's readiness, save it as a template into this (new)
    /// directory and exit (see [`crate::snapshot`]).
    pub template_out: Option<PathBuf>,
    /// With `template_out`: the template's guest has this many network cards on no TAP, for
    /// sandboxes with as many cards to restore (their TAPs go under them, and the agent
    /// configures them from the renewal: [`NetConfig::renewal_params`]).
    pub template_cards: u8,
    /// Start by restoring the template in this directory instead of booting.
    pub restore_from: Option<PathBuf>,
    /// Where the seccomp trap writes which call ended the VMM (see [`crate::seccomp`]).
    pub seccomp_report: Option<PathBuf>,
    /// An inherited descriptor of the user namespace to run in, as an unprivileged uid, once
    /// the jail is built (see [`crate::userns`]).
    pub userns_fd: Option<i32>,
}

/// The guest's network card: the TAP it sits on, its MAC, and the IPv4 configuration the guest
/// kernel applies at boot (`ip=` on the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// An open TAP (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) the VMM inherits and takes over.
    pub tap_fd: i32,
    /// The card's MAC address.
    pub mac: [u8; 6],
    /// The guest's address and prefix length.
    pub ipv4: Option<(std::net::Ipv4Addr, u8)>,
    /// The default gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The guest's IPv6 address and prefix length (the agent configures it: the kernel's `ip=`
    /// is IPv4 only).
    pub ipv6: Option<(std::net::Ipv6Addr, u8)>,
    /// The IPv6 default gateway.
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// The card's MTU, given to the guest's driver in the configuration space
    /// (`VIRTIO_NET_F_MTU`); `None`: the driver's default, 1500.
    pub mtu: Option<u16>,
    /// Other routes through the card, in the order the agent adds them (a route on the link
    /// to a gateway before the routes through it).
    pub routes: Vec<NetRoute>,
    /// The card's further addresses (IPv4 or IPv6), each with its prefix length, beyond the
    /// first of each family above; the agent adds them before the routes.
    pub addresses: Vec<(std::net::IpAddr, u8)>,
}

/// A route through the network card: a destination with its prefix length, through a gateway
/// or (without one) on the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRoute {
    pub dst: std::net::IpAddr,
    pub prefix_len: u8,
    pub via: Option<std::net::IpAddr>,
    /// The route's metric; 0: the family's default (0 for IPv4, 1024 for IPv6).
    pub metric: u32,
}

impl std::fmt::Display for NetRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.dst, self.prefix_len)?;
        if let Some(via) = self.via {
            write!(f, ",{via}")?;
        }
        if self.metric != 0 {
            write!(f, ",metric={}", self.metric)?;
        }
        Ok(())
    }
}

/// The most routes a card carries besides its default ones: each is a parameter on the
/// guest's command line, which holds 2 KiB in all.
pub const MAX_NET_ROUTES: usize = 16;

/// The most further addresses a card carries (each a parameter on the guest's command line).
pub const MAX_NET_ADDRESSES: usize = 8;

/// The most network cards a VM has.
pub const MAX_NET_CARDS: usize = husk_agent_protocol::MAX_NET_CARDS;

/// The name of the agent's network parameter `key` for card `card` (see
/// [`husk_agent_protocol::net_param`]): `addr` (a further address, once per address:
/// `husk.addr=<address>/<prefix>`), `route` (once per route, in order:
/// `husk.route=<destination>/<prefix>[,<gateway>][,metric=<n>]`), `ip6`
/// (`husk.ip6=<address>/<prefix>[,<gateway>]`: the kernel's `ip=` is IPv4 only), and, where the
/// kernel's `ip=` and the card's configuration space do not serve (a restored guest, a card
/// other than the first), `mac`, `mtu` and `ip4`.
fn param(card: usize, key: &str) -> String {
    husk_agent_protocol::net_param(card, key)
}

/// Parses an IPv4 or IPv6 address with a prefix length, `10.0.0.3/24` or `fd00::3/64`.
pub fn parse_cidr(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let bad =
        || format!("{text:?} is not an address with a prefix length (10.0.0.3/24, fd00::3/64)");
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(bad)?;
    Ok((addr, prefix))
}

/// Parses a route, `10.0.0.0/8,169.254.1.1`, `169.254.1.1/32` or
/// `0.0.0.0/0,10.0.0.1,metric=100` (IPv4 or IPv6; a gateway of the destination's family).
pub fn parse_route(text: &str) -> Result<NetRoute, String> {
    let bad = || {
        format!(
            "{text:?} is not a route (destination/prefix, then ,gateway if there is one, then \
             ,metric=N if it has one: 10.0.0.0/8,169.254.1.1,metric=100)"
        )
    };
    let mut parts = text.split(',');
    let cidr = parts.next().ok_or_else(bad)?;
    let mut via = None;
    let mut metric = None;
    for part in parts {
        match part.strip_prefix("metric=") {
            Some(m) if metric.is_none() => metric = Some(m.parse::<u32>().map_err(|_| bad())?),
            None if via.is_none() && metric.is_none() => via = Some(part),
            _ => return Err(bad()),
        }
    }
    let metric = metric.unwrap_or(0);
    let (dst, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let dst: std::net::IpAddr = dst.parse().map_err(|_| bad())?;
    let max = if dst.is_ipv4() { 32 } else { 128 };
    let prefix_len: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(bad)?;
    let via = match via {
        Some(via) => {
            let via: std::net::IpAddr = via.parse().map_err(|_| bad())?;
            if via.is_ipv4() != dst.is_ipv4() {
                return Err(bad());
            }
            Some(via)
        }
        None => None,
    };
    Ok(NetRoute {
        dst,
        prefix_len,
        via,
        metric,
    })
}

fn ipv4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl NetConfig {
    /// Whether the IPv4 default gateway is in the card's subnet, where the kernel's IP
    /// autoconfiguration can route through it (it refuses any other: "Gateway not on directly
    /// connected network").
    fn gateway_on_subnet(&self) -> bool {
        match (self.ipv4, self.gateway) {
            (Some((addr, prefix)), Some(gateway)) => {
                (u32::from(addr) ^ u32::from(gateway)) & ipv4_mask(prefix) == 0
            }
            _ => false,
        }
    }

    /// The kernel's IP autoconfiguration parameter for the first card (`eth0`), if it has an
    /// address: `ip=<address>::<gateway>:<netmask>::eth0:off`. A gateway outside the subnet
    /// is left out here; the agent adds the default route through it
    /// ([`Self::kernel_route_params`]).
    pub fn kernel_ip_param(&self) -> Option<String> {
        let (addr, prefix) = self.ipv4?;
        let mask = std::net::Ipv4Addr::from(ipv4_mask(prefix));
        let gateway = match self.gateway {
            Some(g) if self.gateway_on_subnet() => g.to_string(),
            _ => String::new(),
        };
        Some(format!("ip={addr}::{gateway}:{mask}::eth0:off"))
    }

    /// The agent's route parameters for this card as card `card`: its routes in order, then
    /// the IPv4 default route if its gateway is outside the subnet (after the link route to
    /// it, which such a network has among its routes).
    pub fn kernel_route_params(&self, card: usize) -> Vec<String> {
        let mut routes = self.routes.clone();
        if let (Some(via), false) = (self.gateway, self.gateway_on_subnet()) {
            if self.ipv4.is_some() {
                routes.push(NetRoute {
                    dst: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0,
                    via: Some(std::net::IpAddr::V4(via)),
                    metric: 0,
                });
            }
        }
        let name = param(card, "route");
        routes.iter().map(|r| format!("{name}={r}")).collect()
    }

    /// The agent's parameters for this card's further addresses as card `card`, in order.
    pub fn kernel_addr_params(&self, card: usize) -> Vec<String> {
        let name = param(card, "addr");
        self.addresses
            .iter()
            .map(|(addr, prefix)| format!("{name}={addr}/{prefix}"))
            .collect()
    }

    /// The agent's IPv6 parameter for this card as card `card`, if it has an IPv6 address:
    /// `husk.ip6=<address>/<prefix>[,<gateway>]`.
    pub fn kernel_ip6_param(&self, card: usize) -> Option<String> {
        let (addr, prefix) = self.ipv6?;
        let gateway = self.gateway6.map(|g| format!(",{g}")).unwrap_or_default();
        Some(format!("{}={addr}/{prefix}{gateway}", param(card, "ip6")))
    }

    /// What a booted guest's command line carries for this card as card `card`. The first
    /// card (`eth0`): the kernel's `ip=` ([`Self::kernel_ip_param`]), then the agent's IPv6
    /// parameter, further addresses and routes. Any other: the whole card, as a renewal
    /// carries it ([`Self::renewal_params`]), since the kernel's `ip=` configures one device.
    pub fn boot_params(&self, card: usize) -> Vec<String> {
        if card > 0 {
            return self.renewal_params(card);
        }
        self.kernel_ip_param()
            .into_iter()
            .chain(self.kernel_ip6_param(card))
            .chain(self.kernel_addr_params(card))
            .chain(self.kernel_route_params(card))
            .collect()
    }

    /// The card's whole configuration as card `card` for the agent of a guest restored from a
    /// template with cards ([`husk_agent_protocol::Renewal::network`]): its MAC address, MTU,
    /// first IPv4 address, the IPv6 parameter, further addresses, then the routes: the IPv4
    /// default route first when its gateway is on the subnet (the kernel's `ip=` adds that one
    /// in a booted guest), then those of [`Self::kernel_route_params`].
    pub fn renewal_params(&self, card: usize) -> Vec<String> {
        let mac = self
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut params = vec![format!("{}={mac}", param(card, "mac"))];
        params.extend(self.mtu.map(|mtu| format!("{}={mtu}", param(card, "mtu"))));
        params.extend(
            self.ipv4
                .map(|(addr, prefix)| format!("{}={addr}/{prefix}", param(card, "ip4"))),
        );
        params.extend(self.kernel_ip6_param(card));
        params.extend(self.kernel_addr_params(card));
        if let (Some(gateway), true) = (self.gateway, self.gateway_on_subnet()) {
            params.push(format!("{}=0.0.0.0/0,{gateway}", param(card, "route")));
        }
        params.extend(self.kernel_route_params(card));
        params
    }
}

/// Parses an IPv6 address with a prefix length, `fd00::2/64`.
pub fn parse_ipv6_cidr(text: &str) -> Result<(std::net::Ipv6Addr, u8), String> {
    let bad = || format!("{text:?} is not an IPv6 address with a prefix length (fd00::2/64)");
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=128).contains(p))
        .ok_or_else(bad)?;
    Ok((addr, prefix))
}

/// The smallest MTU a card may have (IPv4's minimum, as Linux's `ETH_MIN_MTU`).
pub const MIN_MTU: u16 = 68;

/// Parses an MTU, [`MIN_MTU`] to 65535.
pub fn parse_mtu(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|m| *m >= MIN_MTU)
        .ok_or_else(|| format!("{text:?} is not an MTU ({MIN_MTU} to 65535)"))
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)
            .ok()
            .filter(|_| part.len() == 2)
            .ok_or_else(|| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    Ok(mac)
}

/// Parses an IPv4 address with a prefix length, `10.0.0.2/24`.
pub fn parse_ipv4_cidr(text: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let bad = || format!("{text:?} is not an IPv4 address with a prefix length (10.0.0.2/24)");
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(bad)?;
    Ok((addr, prefix))
}

impl VmConfig {
    /// A configuration with defaults: 1 vCPU, 128 MiB, no initramfs, no console, no report,
    /// the default agent timeout.
    pub fn new(kernel: impl Into<PathBuf>, vsock_socket: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            vcpus: 1,
            mem_size_mib: 128,
            vsock_socket: vsock_socket.into(),
            cmdline_extra: None,
            console: false,
            boot_report: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            allow_kvm_pvm: false,
            shared_dir: None,
            share_cache: Default::default(),
            share_max_inodes: None,
            net: Vec::new(),
            template_out: None,
            template_cards: 0,
            restore_from: None,
            seccomp_report: None,
            userns_fd: None,
        }
    }
}

/// Test-only: `HUSK_VMM_TEST_AGENT_HOOK=<hook>` in husk-vmm's environment arms a fault in the
/// agent of a booted guest ([`VmConfig::arm_agent_test_hook`]).
pub const AGENT_TEST_HOOK_ENV: &str = "HUSK_VMM_TEST_AGENT_HOOK";

impl VmConfig {
    /// Adds `husk.test_hook=<hook>` ([`husk_agent_protocol::TEST_HOOK_PARAM`]) to the guest's
    /// command line. Only a hook the agent knows, and only for a guest this VMM boots: a
    /// template's command line is fixed, and a template must never carry a hook.
    pub fn arm_agent_test_hook(&mut self, hook: &str) -> Result<(), String> {
        use husk_agent_protocol::{TEST_HOOK_EXIT_ON_EXEC, TEST_HOOK_PARAM};
        if hook != TEST_HOOK_EXIT_ON_EXEC {
            return Err(format!(
                "{AGENT_TEST_HOOK_ENV}={hook:?}: the agent knows only {TEST_HOOK_EXIT_ON_EXEC:?}"
            ));
        }
        if self.restore_from.is_some() || self.template_out.is_some() {
            return Err(format!(
                "{AGENT_TEST_HOOK_ENV} needs a guest that husk-vmm boots, not a template's \
                 (turn warm start off)"
            ));
        }
        let param = format!("{TEST_HOOK_PARAM}={hook}");
        self.cmdline_extra = Some(match self.cmdline_extra.take() {
            Some(extra) => format!("{extra} {param}"),
            None => param,
        });
        Ok(())
    }

    /// What this VM's jail holds (see [`crate::jail`]): the directories of the files husk-vmm
    /// still creates or connects to once it runs.
    pub fn jail_plan(&self) -> crate::jail::JailPlan {
        let mut plan = crate::jail::JailPlan::new();
        plan.dir_of(&self.vsock_socket);
        for file in [&self.boot_report, &self.seccomp_report]
            .into_iter()
            .flatten()
        {
            plan.dir_of(file);
        }
        if let Some(dir) = &self.template_out {
            plan.dir(dir);
        }
        plan.userns = self.userns_fd;
        plan
    }

    /// Checks the configuration against the host, without creating anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_kernel(&self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            File::open(initramfs).map_err(|source| ConfigError::InitramfsUnreadable {
                path: initramfs.clone(),
                source,
            })?;
        }
        validate_vcpus(self.vcpus)?;
        let host_mib = host_mem_total_kib().map_err(ConfigError::HostMemory)? / 1024;
        validate_memory(self.mem_size_mib, host_mib)?;
        if let Some(dir) = &self.shared_dir {
            validate_shared_dir(dir)?;
        }
        let cards = self.net.len().max(usize::from(self.template_cards));
        if cards > MAX_NET_CARDS {
            return Err(ConfigError::TooManyCards(cards));
        }
        for net in &self.net {
            if net.routes.len() > MAX_NET_ROUTES {
                return Err(ConfigError::TooManyRoutes(net.routes.len()));
            }
            if net.addresses.len() > MAX_NET_ADDRESSES {
                return Err(ConfigError::TooManyAddresses(net.addresses.len()));
            }
        }
        validate_socket_path(&self.vsock_socket)
    }
}

/// The shared directory must exist and be a directory (a symlink to one is resolved here,
/// by the host's own choice, once).
pub fn validate_shared_dir(path: &Path) -> Result<(), ConfigError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::SharedDirMissing(path.to_path_buf()))
    }
}

/// The kernel must exist, be readable, and be a 64-bit ELF.
pub fn validate_kernel(path: &Path) -> Result<(), ConfigError> {
    let mut file = File::open(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => ConfigError::KernelMissing(path.to_path_buf()),
        _ => ConfigError::KernelUnreadable {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut ident = [0u8; 5];
    match file.read_exact(&mut ident) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            return Err(ConfigError::KernelNotElf(path.to_path_buf()))
        }
        Err(source) => {
            return Err(ConfigError::KernelUnreadable {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    if ident[..4] != ELFMAG {
        return Err(ConfigError::KernelNotElf(path.to_path_buf()));
    }
    if ident[4] != ELFCLASS64 {
        return Err(ConfigError::KernelNot64Bit(path.to_path_buf()));
    }
    Ok(())
}

/// 1..=MAX_VCPUS.
pub fn validate_vcpus(vcpus: u8) -> Result<(), ConfigError> {
    match vcpus {
        0 => Err(ConfigError::NoVcpus),
        n if n > MAX_VCPUS => Err(ConfigError::TooManyVcpus(n)),
        _ => Ok(()),
    }
}

/// MIN_MEM_MIB..=host memory.
pub fn validate_memory(mem_size_mib: u32, host_mib: u64) -> Result<(), ConfigError> {
    if mem_size_mib < MIN_MEM_MIB {
        return Err(ConfigError::MemoryTooSmall(mem_size_mib));
    }
    if u64::from(mem_size_mib) > host_mib {
        return Err(ConfigError::MemoryTooLarge {
            requested_mib: mem_size_mib,
            host_mib,
        });
    }
    Ok(())
}

/// The socket must not exist, and its directory must.
pub fn validate_socket_path(path: &Path) -> Result<(), ConfigError> {
    if path.symlink_metadata().is_ok() {
        return Err(ConfigError::SocketExists(path.to_path_buf()));
    }
    let parent = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(ConfigError::SocketParentMissing(path.to_path_buf())),
    };
    if !parent.is_dir() {
        return Err(ConfigError::SocketParentMissing(path.to_path_buf()));
    }
    Ok(())
}

/// `MemTotal` of /proc/meminfo, in KiB.
pub fn host_mem_total_kib() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total_kib(&meminfo)
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "no MemTotal line"))
}

/// Parses the `MemTotal:   123 kB` line.
pub fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(bytes).expect("write");
        f
    }

    fn config(dir: &Path, kernel: &Path) -> VmConfig {
        VmConfig {
            mem_size_mib: 32,
            ..VmConfig::new(kernel, dir.join("v.sock"))
        }
    }

    #[test]
    fn the_agent_test_hook_goes_on_a_booted_guests_command_line_only() {
        let mut cfg = VmConfig::new("/k", "/v.sock");
        cfg.arm_agent_test_hook("exit-on-exec").expect("armed");
        assert_eq!(
            cfg.cmdline_extra.as_deref(),
            Some("husk.test_hook=exit-on-exec")
        );
        cfg.cmdline_extra = Some("quiet".into());
        cfg.arm_agent_test_hook("exit-on-exec").expect("armed");
        assert_eq!(
            cfg.cmdline_extra.as_deref(),
            Some("quiet husk.test_hook=exit-on-exec")
        );
        let err = cfg.arm_agent_test_hook("rm-rf").expect_err("unknown hook");
        assert!(err.contains("knows only \"exit-on-exec\""), "{err}");
        for (restore, out) in [(Some("/t"), None), (None, Some("/t"))] {
            let mut cfg = VmConfig::new("/k", "/v.sock");
            cfg.restore_from = restore.map(PathBuf::from);
            cfg.template_out = out.map(PathBuf::from);
            let err = cfg
                .arm_agent_test_hook("exit-on-exec")
                .expect_err("template");
            assert!(err.contains("turn warm start off"), "{err}");
            assert_eq!(cfg.cmdline_extra, None);
        }
    }

    #[test]
    fn network_parameters_parse_and_make_the_kernel_ip_parameter() {
        assert_eq!(
            parse_mac("02:aB:00:11:22:ff"),
            Ok([2, 0xab, 0, 0x11, 0x22, 0xff])
        );
        for bad in [
            "02:ab:00:11:22",
            "02:ab:00:11:22:gg",
            "2:ab:00:11:22:33",
            "",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let (addr, prefix) = parse_ipv4_cidr("10.88.0.5/24").expect("cidr");
        assert_eq!((addr.to_string(), prefix), ("10.88.0.5".to_string(), 24));
        for bad in ["10.88.0.5", "10.88.0.5/33", "10.88.0.5/0", "x/24"] {
            assert!(parse_ipv4_cidr(bad).is_err(), "{bad}");
        }
        let mut net = NetConfig {
            tap_fd: 3,
            mac: [2, 0, 0, 0, 0, 1],
            ipv4: Some((addr, prefix)),
            gateway: Some("10.88.0.1".parse().expect("ip")),
            ipv6: None,
            gateway6: None,
            mtu: None,
            routes: vec![],
            addresses: vec![],
        };
        assert_eq!(net.kernel_route_params(0), Vec::<String>::new());
        assert_eq!(net.kernel_addr_params(0), Vec::<String>::new());
        assert_eq!(parse_mtu("1450"), Ok(1450));
        for bad in ["67", "65536", "", "x", "-1"] {
            assert!(parse_mtu(bad).is_err(), "{bad}");
        }
        assert_eq!(
            net.kernel_ip_param().as_deref(),
            Some("ip=10.88.0.5::10.88.0.1:255.255.255.0::eth0:off")
        );
        net.gateway = None;
        net.ipv4 = Some((addr, 32));
        assert_eq!(
            net.kernel_ip_param().as_deref(),
            Some("ip=10.88.0.5:::255.255.255.255::eth0:off")
        );
        net.ipv4 = None;
        assert_eq!(net.kernel_ip_param(), None);
        assert_eq!(net.kernel_ip6_param(0), None);
        net.ipv6 = Some(parse_ipv6_cidr("fd00:88::5/64").expect("cidr"));
        assert_eq!(
            net.kernel_ip6_param(0).as_deref(),
            Some("husk.ip6=fd00:88::5/64")
        );
        net.gateway6 = Some("fd00:88::1".parse().expect("ip"));
        assert_eq!(
            net.kernel_ip6_param(0).as_deref(),
            Some("husk.ip6=fd00:88::5/64,fd00:88::1")
        );
        for bad in ["fd00::5", "fd00::5/129", "fd00::5/0", "10.0.0.1/24"] {
            assert!(parse_ipv6_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn further_addresses_parse_and_become_agent_parameters() {
        assert_eq!(
            parse_cidr("10.88.0.6/24"),
            Ok(("10.88.0.6".parse().expect("ip"), 24))
        );
        assert_eq!(
            parse_cidr("fd00:88::6/128"),
            Ok(("fd00:88::6".parse().expect("ip"), 128))
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "10.0.0.1/0",
            "fd00::1/129",
            "x/8",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let net = NetConfig {
            tap_fd: 3,
            mac: [2, 0, 0, 0, 0, 1],
            ipv4: Some(("10.88.0.5".parse().expect("ip"), 24)),
            gateway: None,
            ipv6: None,
            gateway6: None,
            mtu: None,
            routes: vec![],
            addresses: vec![
                parse_cidr("10.89.0.5/16").expect("cidr"),
                parse_cidr("fd00:88::6/64").expect("cidr"),
            ],
        };
        assert_eq!(
            net.kernel_addr_params(0),
            vec![
                "husk.addr=10.89.0.5/16".to_string(),
                "husk.addr=fd00:88::6/64".to_string()
            ]
        );
    }

    #[test]
    fn a_restored_guest_gets_the_whole_card_in_its_renewal() {
        let mut net = NetConfig {
            tap_fd: 3,
            mac: [2, 0, 0x0a, 0x58, 0, 5],
            ipv4: Some(("10.88.0.5".parse().expect("ip"), 16)),
            gateway: Some("10.88.0.1".parse().expect("ip")),
            ipv6: Some(parse_ipv6_cidr("fd00:88::5/64").expect("cidr")),
            gateway6: Some("fd00:88::1".parse().expect("ip")),
            mtu: Some(1450),
            routes: vec![parse_route("10.99.0.0/16,10.88.0.9").expect("route")],
            addresses: vec![parse_cidr("10.89.0.5/16").expect("cidr")],
        };
        assert_eq!(
            net.renewal_params(0),
            [
                "husk.mac=02:00:0a:58:00:05",
                "husk.mtu=1450",
                "husk.ip4=10.88.0.5/16",
                "husk.ip6=fd00:88::5/64,fd00:88::1",
                "husk.addr=10.89.0.5/16",
                // The default route through a gateway on the subnet, which ip= adds at boot.
                "husk.route=0.0.0.0/0,10.88.0.1",
                "husk.route=10.99.0.0/16,10.88.0.9",
            ]
        );
        // Off the subnet: after the card's routes, as on a booted guest's command line.
        net.ipv4 = Some(("10.244.1.5".parse().expect("ip"), 32));
        net.gateway = Some("169.254.1.1".parse().expect("ip"));
        net.routes = vec![parse_route("169.254.1.1/32").expect("route")];
        net.ipv6 = None;
        net.mtu = None;
        net.addresses.clear();
        assert_eq!(
            net.renewal_params(0),
            [
                "husk.mac=02:00:0a:58:00:05",
                "husk.ip4=10.244.1.5/32",
                "husk.route=169.254.1.1/32",
                "husk.route=0.0.0.0/0,169.254.1.1",
            ]
        );
    }

    #[test]
    fn a_card_other_than_the_first_carries_its_whole_configuration_by_name() {
        let net = NetConfig {
            tap_fd: 4,
            mac: [2, 0, 0x0a, 0x59, 0, 5],
            ipv4: Some(("10.89.0.5".parse().expect("ip"), 16)),
            gateway: Some("10.89.0.1".parse().expect("ip")),
            ipv6: Some(parse_ipv6_cidr("fd00:89::5/64").expect("cidr")),
            gateway6: None,
            mtu: Some(1400),
            routes: vec![parse_route("0.0.0.0/0,10.89.0.254,metric=101").expect("route")],
            addresses: vec![parse_cidr("10.90.0.5/16").expect("cidr")],
        };
        let expected = [
            "husk.eth1.mac=02:00:0a:59:00:05",
            "husk.eth1.mtu=1400",
            "husk.eth1.ip4=10.89.0.5/16",
            "husk.eth1.ip6=fd00:89::5/64",
            "husk.eth1.addr=10.90.0.5/16",
            "husk.eth1.route=0.0.0.0/0,10.89.0.1",
            "husk.eth1.route=0.0.0.0/0,10.89.0.254,metric=101",
        ];
        // Booted or restored alike: the kernel's ip= is the first card's only.
        assert_eq!(net.boot_params(1), expected);
        assert_eq!(net.renewal_params(1), expected);
        // As the first card, a booted guest's kernel takes the IPv4 address and gateway.
        assert_eq!(
            net.boot_params(0),
            [
                "ip=10.89.0.5::10.89.0.1:255.255.0.0::eth0:off",
                "husk.ip6=fd00:89::5/64",
                "husk.addr=10.90.0.5/16",
                "husk.route=0.0.0.0/0,10.89.0.254,metric=101",
            ]
        );
    }

    #[test]
    fn more_cards_than_a_vm_has_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let kernel = file_with(b"\x7fELF\x02");
        let mut cfg = VmConfig::new(kernel.path(), dir.path().join("v.sock"));
        cfg.template_cards = u8::try_from(MAX_NET_CARDS + 1).expect("small");
        let err = cfg.validate().expect_err("too many cards");
        assert!(matches!(err, ConfigError::TooManyCards(n) if n == MAX_NET_CARDS + 1));
        assert_eq!(
            err.to_string(),
            format!(
                "{} network cards, at most {MAX_NET_CARDS} are supported",
                MAX_NET_CARDS + 1
            )
        );
    }

    #[test]
    fn routes_parse_and_an_off_subnet_gateway_becomes_one() {
        let route = parse_route("10.0.0.0/8,169.254.1.1").expect("route");
        assert_eq!(route.to_string(), "10.0.0.0/8,169.254.1.1");
        assert_eq!(parse_route("169.254.1.1/32").expect("route").via, None);
        assert_eq!(
            parse_route("fd00:1::/64,fe80::1")
                .expect("route")
                .to_string(),
            "fd00:1::/64,fe80::1"
        );
        let route = parse_route("0.0.0.0/0,10.0.0.1,metric=100").expect("route");
        assert_eq!(
            (route.via, route.metric),
            (Some("10.0.0.1".parse().expect("ip")), 100)
        );
        assert_eq!(route.to_string(), "0.0.0.0/0,10.0.0.1,metric=100");
        let route = parse_route("fd00::/64,metric=7").expect("route");
        assert_eq!((route.via, route.metric), (None, 7));
        assert_eq!(route.to_string(), "fd00::/64,metric=7");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/8,fe80::1",
            "10.0.0.0/8,x",
            "x/8",
            "",
            "10.0.0.0/8,metric=1,10.0.0.1",
            "10.0.0.0/8,10.0.0.1,10.0.0.2",
            "10.0.0.0/8,metric=x",
            "10.0.0.0/8,metric=1,metric=2",
        ] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
        // Calico's way: a /32 address, a gateway outside it, a link route to the gateway.
        let net = NetConfig {
            tap_fd: 3,
            mac: [2, 0, 0, 0, 0, 1],
            ipv4: Some(("10.244.1.5".parse().expect("ip"), 32)),
            gateway: Some("169.254.1.1".parse().expect("ip")),
            ipv6: None,
            gateway6: None,
            mtu: None,
            routes: vec![parse_route("169.254.1.1/32").expect("route")],
            addresses: vec![],
        };
        assert_eq!(
            net.kernel_ip_param().as_deref(),
            Some("ip=10.244.1.5:::255.255.255.255::eth0:off")
        );
        assert_eq!(
            net.kernel_route_params(0),
            vec![
                "husk.route=169.254.1.1/32".to_string(),
                "husk.route=0.0.0.0/0,169.254.1.1".to_string()
            ]
        );
        // A gateway in the subnet stays the kernel's.
        let net = NetConfig {
            ipv4: Some(("169.254.1.5".parse().expect("ip"), 24)),
            routes: vec![],
            ..net
        };
        assert!(net
            .kernel_ip_param()
            .expect("ip=")
            .contains("::169.254.1.1:255.255.255.0:"));
        assert!(net.kernel_route_params(0).is_empty());
    }

    #[test]
    fn shared_dir_must_be_a_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let file = file_with(b"x");
        validate_shared_dir(dir.path()).expect("a directory is fine");
        let err = validate_shared_dir(file.path()).expect_err("a file is refused");
        assert!(matches!(&err, ConfigError::SharedDirMissing(p) if p == file.path()));
        let missing = dir.path().join("nope");
        assert_eq!(
            validate_shared_dir(&missing)
                .expect_err("missing is refused")
                .to_string(),
            format!("shared directory {}: no such directory", missing.display())
        );
    }

    #[test]
    fn valid_config_passes() {
        let dir = tempfile::tempdir().expect("dir");
        let kernel = file_with(b"\x7fELF\x02\x01\x01");
        config(dir.path(), kernel.path()).validate().expect("valid");
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = validate_kernel(Path::new("/nonexistent/vmlinux")).expect_err("must fail");
        assert!(
            matches!(&err, ConfigError::KernelMissing(p) if p == Path::new("/nonexistent/vmlinux"))
        );
        assert_eq!(err.to_string(), "kernel /nonexistent/vmlinux: no such file");
    }

    #[test]
    fn non_elf_and_32bit_kernels_are_rejected() {
        let bz = file_with(b"MZ\x00\x00 a bzImage");
        assert!(matches!(
            validate_kernel(bz.path()),
            Err(ConfigError::KernelNotElf(_))
        ));
        let short = file_with(b"\x7fE");
        assert!(matches!(
            validate_kernel(short.path()),
            Err(ConfigError::KernelNotElf(_))
        ));
        let elf32 = file_with(b"\x7fELF\x01\x01\x01");
        assert!(matches!(
            validate_kernel(elf32.path()),
            Err(ConfigError::KernelNot64Bit(_))
        ));
    }

    #[test]
    fn directory_as_kernel_is_unreadable() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(matches!(
            validate_kernel(dir.path()),
            Err(ConfigError::KernelUnreadable { .. })
        ));
    }

    #[test]
    fn vcpu_bounds() {
        assert!(matches!(validate_vcpus(0), Err(ConfigError::NoVcpus)));
        assert!(validate_vcpus(1).is_ok());
        assert!(validate_vcpus(MAX_VCPUS).is_ok());
        assert!(matches!(
            validate_vcpus(33),
            Err(ConfigError::TooManyVcpus(33))
        ));
    }

    #[test]
    fn memory_bounds() {
        assert!(matches!(
            validate_memory(31, 4096),
            Err(ConfigError::MemoryTooSmall(31))
        ));
        assert!(validate_memory(32, 4096).is_ok());
        assert!(validate_memory(4096, 4096).is_ok());
        assert!(matches!(
            validate_memory(4097, 4096),
            Err(ConfigError::MemoryTooLarge {
                requested_mib: 4097,
                host_mib: 4096
            })
        ));
    }

    #[test]
    fn socket_that_exists_or_lacks_a_parent_is_rejected() {
        let dir = tempfile::tempdir().expect("dir");
        let existing = file_with(b"");
        assert!(matches!(
            validate_socket_path(existing.path()),
            Err(ConfigError::SocketExists(_))
        ));
        assert!(matches!(
            validate_socket_path(&dir.path().join("nope/v.sock")),
            Err(ConfigError::SocketParentMissing(_))
        ));
        assert!(validate_socket_path(&dir.path().join("v.sock")).is_ok());
    }

    #[test]
    fn missing_initramfs_is_rejected() {
        let dir = tempfile::tempdir().expect("dir");
        let kernel = file_with(b"\x7fELF\x02");
        let mut cfg = config(dir.path(), kernel.path());
        cfg.initramfs = Some(dir.path().join("missing.cpio"));
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::InitramfsUnreadable { .. })
        ));
    }

    #[test]
    fn mem_total_is_parsed() {
        let meminfo = "MemFree:  10 kB\nMemTotal:       16308200 kB\n";
        assert_eq!(parse_mem_total_kib(meminfo), Some(16_308_200));
        assert_eq!(parse_mem_total_kib("MemFree: 1 kB\n"), None);
    }
}
