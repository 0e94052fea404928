//! What PID 1 sets up before serving: the guest's pseudo and temporary file systems.
//!
//! The root file system is the initramfs itself (the kernel's rootfs, a tmpfs or ramfs), which
//! holds only `/init` and a few empty directories; everything else is mounted here.

use crate::sys::Syscall;
use nix::errno::Errno;
use nix::mount::MsFlags;
use std::path::PathBuf;

/// Errors of setting up the guest's file systems. None is fatal: PID 1 logs it and carries on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    /// A mount point could not be created.
    #[error("creating mount point {} failed", path.display())]
    MountPoint {
        path: PathBuf,
        #[source]
        errno: Errno,
    },
    /// A file system could not be mounted.
    #[error("mounting {fstype} on {} failed", target.display())]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        errno: Errno,
    },
}

/// One file system PID 1 mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

/// The guest's mounts, parents before children.
pub fn guest_mounts() -> Vec<MountSpec> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_nodev_noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    vec![
        MountSpec {
            fstype: "proc",
            target: "/proc",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        MountSpec {
            fstype: "sysfs",
            target: "/sys",
            flags: nosuid_nodev_noexec,
            data: None,
        },
        MountSpec {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        MountSpec {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // Its own instance, so /dev/pts/ptmx opens ptys of this instance for anyone.
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        MountSpec {
            fstype: "tmpfs",
            target: "/dev/shm",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
        MountSpec {
            fstype: "tmpfs",
            target: "/run",
            flags: nosuid_nodev,
            data: Some("mode=0755"),
        },
        MountSpec {
            fstype: "tmpfs",
            target: "/tmp",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
        MountSpec {
            fstype: "cgroup2",
            target: "/sys/fs/cgroup",
            flags: nosuid_nodev_noexec,
            data: None,
        },
    ]
}

/// Mounts every file system of [`guest_mounts`], creating the mount points first.
///
/// An existing mount point (`EEXIST`) and an already mounted file system (`EBUSY`) are fine.
/// Other failures do not stop the remaining mounts; they are returned (and should be logged).
pub fn setup_mounts(sys: &dyn Syscall) -> Vec<InitError> {
    let mut errors = Vec::new();
    for spec in guest_mounts() {
        let target = PathBuf::from(spec.target);
        match sys.mkdir(&target, 0o755) {
            Ok(()) | Err(Errno::EEXIST) => {}
            // Reported, but the mount is still tried: it tells the real story.
            Err(errno) => errors.push(InitError::MountPoint {
                path: target.clone(),
                errno,
            }),
        }
        match sys.mount(
            Some(spec.fstype),
            &target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => errors.push(InitError::Mount {
                fstype: spec.fstype,
                target,
                errno,
            }),
        }
    }
    errors
}

/// Where the host's shared directory (virtio-fs tag [`SHARE_TAG`]) is mounted.
pub const SHARE_MOUNT_POINT: &str = "/run/husk/shared";

/// The virtio-fs tag of husk-vmm's shared directory.
pub const SHARE_TAG: &str = "husk";

/// Mounts the host's shared directory when the VM has one. Returns whether it is mounted; a VM
/// without the device (the kernel reports no such tag: `ENOENT`/`ENODEV`) has no share, which
/// is not an error.
pub fn mount_share(sys: &dyn Syscall) -> Result<bool, InitError> {
    for dir in ["/run/husk", SHARE_MOUNT_POINT] {
        match sys.mkdir(std::path::Path::new(dir), 0o755) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => {
                return Err(InitError::MountPoint {
                    path: dir.into(),
                    errno,
                })
            }
        }
    }
    match sys.mount(
        Some(SHARE_TAG),
        std::path::Path::new(SHARE_MOUNT_POINT),
        Some("virtiofs"),
        MsFlags::empty(),
        None,
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(true),
        Err(Errno::ENOENT | Errno::ENODEV | Errno::EINVAL) => Ok(false),
        Err(errno) => Err(InitError::Mount {
            fstype: "virtiofs",
            target: SHARE_MOUNT_POINT.into(),
            errno,
        }),
    }
}

/// Readahead of the share, in KiB: 1 MiB, one full request (a FUSE mount starts at the
/// kernel's 128 KiB, and the FUSE handshake can only lower it).
pub const SHARE_READAHEAD_KIB: u32 = 1024;

/// Sets the readahead of the file system mounted at `mount_point` to `kib`, through its
/// backing device's `read_ahead_kb` in sysfs (`/sys/class/bdi/<major>:<minor>`). Files opened
/// afterwards read ahead that far.
pub fn set_readahead(mount_point: &std::path::Path, kib: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mount_point)?.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(&knob, kib.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{knob}: {e}")))
}

/// After the share is mounted: its readahead widened (a failure costs only speed, so it is
/// logged, not returned).
pub fn tune_share() {
    if let Err(e) = set_readahead(std::path::Path::new(SHARE_MOUNT_POINT), SHARE_READAHEAD_KIB) {
        crate::log_warn!("the share's readahead stays at the kernel's default: {e}");
    }
}

/// Where the guest kernel takes the smallest free block it reports to the balloon, as a page
/// order (its `page_reporting_order`; 6.1 sets it when the balloon registers, so a kernel
/// command-line value would be overwritten).
pub const PAGE_REPORTING_ORDER_KNOB: &str =
    "/sys/module/page_reporting/parameters/page_reporting_order";

/// The smallest free block the guest reports to husk-vmm's balloon: order 9, 2 MiB. The
/// kernel's default for a guest without huge pages is order 10, 4 MiB, and it reports nothing
/// unless 32 blocks of that order (128 MiB) are free above its low watermark: a 128 MiB guest
/// would never hand a page back. 2 MiB blocks need 64 MiB free, and catch the initramfs image
/// and init sections the kernel frees after booting.
pub const PAGE_REPORTING_ORDER: u32 = 9;

/// Sets the guest's free page reporting order to [`PAGE_REPORTING_ORDER`], then has the kernel
/// look for free blocks once. A guest without the balloon's page reporting has no such knob;
/// that only costs host memory, so failures are logged, not returned.
///
/// The kernel looks for blocks to report only when a block of the reporting order is freed
/// (2 s later); what the booting kernel freed before this order was set (the initramfs image,
/// init sections) was checked against the old one. So the agent frees such a block itself: it
/// maps and touches 4 MiB, then unmaps it.
pub fn tune_page_reporting() {
    let knob = std::path::Path::new(PAGE_REPORTING_ORDER_KNOB);
    if !knob.exists() {
        return;
    }
    if let Err(e) = std::fs::write(knob, PAGE_REPORTING_ORDER.to_string()) {
        crate::log_warn!(
            "free page reporting keeps the kernel's block size: {PAGE_REPORTING_ORDER_KNOB}: {e}"
        );
        return;
    }
    let len = 4 << 20;
    // SAFETY: a fresh private anonymous mapping, populated, and unmapped right away; no Rust
    // reference into it is made.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        );
        if addr != libc::MAP_FAILED {
            libc::munmap(addr, len);
        }
    }
}

// The network parameters a booted guest's command line and a renewal carry for each card,
// named by `husk_agent_protocol::net_param` (`husk.ip6=` for the first card, `husk.eth1.ip6=`
// for the second, ...): `ip6=<address>/<prefix>[,<gateway>]` (the kernel's `ip=` is IPv4
// only), `addr=<address>/<prefix>` once per further address, `route=<destination>/<prefix>
// [,<gateway>][,metric=<n>]` once per route in the order to add them, and where the card's
// configuration space and the kernel's `ip=` do not serve (a renewal; a booted guest's cards
// other than the first) `mac=`, `mtu=` and `ip4=<address>/<prefix>`.

/// An IPv6 address, its prefix length, and the default gateway if there is one.
pub type Ipv6Config = (std::net::Ipv6Addr, u8, Option<std::net::Ipv6Addr>);

/// The IPv6 configuration of card `card` a kernel command line carries, if any.
pub fn ipv6_from_cmdline(cmdline: &str, card: usize) -> Option<Result<Ipv6Config, String>> {
    let name = husk_agent_protocol::net_param(card, "ip6");
    let value = param_values(cmdline, &name).next()?;
    let parse = || -> Option<Ipv6Config> {
        let (cidr, gateway) = match value.split_once(',') {
            Some((cidr, gw)) => (cidr, Some(gw.parse().ok()?)),
            None => (value, None),
        };
        let (addr, prefix) = cidr.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (1..=128).contains(p))?;
        Some((addr.parse().ok()?, prefix, gateway))
    };
    Some(parse().ok_or_else(|| format!("bad {name}={value}")))
}

/// The values of every `name=value` parameter of a kernel command line, in order.
fn param_values<'a>(cmdline: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> {
    cmdline
        .split_whitespace()
        .filter_map(move |p| p.strip_prefix(name)?.strip_prefix('='))
}

/// The test hook armed on the kernel command line
/// ([`husk_agent_protocol::TEST_HOOK_PARAM`]), read once; `None` in every real guest.
pub fn test_hook() -> Option<&'static str> {
    static HOOK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOOK.get_or_init(|| {
        read_cmdline()
            .ok()
            .and_then(|c| test_hook_from_cmdline(&c).map(str::to_owned))
    })
    .as_deref()
}

/// The value of [`husk_agent_protocol::TEST_HOOK_PARAM`] in `cmdline` (the last, as the
/// kernel's own parameters).
pub fn test_hook_from_cmdline(cmdline: &str) -> Option<&str> {
    param_values(cmdline, husk_agent_protocol::TEST_HOOK_PARAM).last()
}

/// `/proc/cmdline`, or why it cannot be read.
fn read_cmdline() -> Result<String, String> {
    std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))
}

/// The further addresses of card `card` a kernel command line carries, in order; a malformed
/// one is an error in its place.
pub fn addresses_from_cmdline(
    cmdline: &str,
    card: usize,
) -> Vec<Result<(std::net::IpAddr, u8), String>> {
    let name = husk_agent_protocol::net_param(card, "addr");
    param_values(cmdline, &name)
        .map(|value| {
            let parse = || -> Option<(std::net::IpAddr, u8)> {
                let (addr, prefix) = value.split_once('/')?;
                let addr: std::net::IpAddr = addr.parse().ok()?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = prefix.parse().ok().filter(|p| (1..=max).contains(p))?;
                Some((addr, prefix))
            };
            parse().ok_or_else(|| format!("bad {name}={value}"))
        })
        .collect()
}

/// A route: destination, prefix length, gateway (none: on the link), metric (0: the
/// family's default).
pub type Route = (std::net::IpAddr, u8, Option<std::net::IpAddr>, u32);

/// The routes through card `card` a kernel command line carries, in order; a malformed one is
/// an error in its place.
pub fn routes_from_cmdline(cmdline: &str, card: usize) -> Vec<Result<Route, String>> {
    let name = husk_agent_protocol::net_param(card, "route");
    param_values(cmdline, &name)
        .map(|value| {
            // `<destination>/<prefix>[,<gateway>][,metric=<n>]`
            let parse = || -> Option<Route> {
                let mut parts = value.split(',');
                let (dst, prefix) = parts.next()?.split_once('/')?;
                let mut via = None;
                let mut metric = None;
                for part in parts {
                    match part.strip_prefix("metric=") {
                        Some(m) if metric.is_none() => metric = Some(m.parse::<u32>().ok()?),
                        None if via.is_none() && metric.is_none() => {
                            via = Some(part.parse::<std::net::IpAddr>().ok()?)
                        }
                        _ => return None,
                    }
                }
                let dst: std::net::IpAddr = dst.parse().ok()?;
                let max = if dst.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max)?;
                if via.is_some_and(|v: std::net::IpAddr| v.is_ipv4() != dst.is_ipv4()) {
                    return None;
                }
                Some((dst, prefix, via, metric.unwrap_or(0)))
            };
            parse().ok_or_else(|| format!("bad {name}={value}"))
        })
        .collect()
}

/// One card's configuration as parameters carry it: from the kernel command line at boot, from
/// the renewal in a restored guest.
#[derive(Debug, Default, PartialEq)]
pub struct NetParams {
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub ipv4: Option<(std::net::Ipv4Addr, u8)>,
    pub ipv6: Option<Ipv6Config>,
    pub addresses: Vec<(std::net::IpAddr, u8)>,
    pub routes: Vec<Route>,
}

impl NetParams {
    fn is_empty(&self) -> bool {
        *self == NetParams::default()
    }
}

/// The configuration of card `card` (`eth<card>` in the guest) that `text` (a kernel command
/// line, or a renewal's parameters joined by spaces) carries; each malformed parameter is an
/// error in the list.
pub fn net_params(text: &str, card: usize) -> (NetParams, Vec<String>) {
    let name = |key: &str| husk_agent_protocol::net_param(card, key);
    let mut errors = Vec::new();
    let mut params = NetParams::default();
    let mac_name = name("mac");
    if let Some(value) = param_values(text, &mac_name).last() {
        match parse_mac(value) {
            Some(mac) => params.mac = Some(mac),
            None => errors.push(format!("bad {mac_name}={value}")),
        }
    }
    let mtu_name = name("mtu");
    if let Some(value) = param_values(text, &mtu_name).last() {
        match value.parse::<u32>() {
            Ok(mtu) if (68..=65535).contains(&mtu) => params.mtu = Some(mtu),
            _ => errors.push(format!("bad {mtu_name}={value}")),
        }
    }
    let ip4_name = name("ip4");
    if let Some(value) = param_values(text, &ip4_name).last() {
        let parse = || -> Option<(std::net::Ipv4Addr, u8)> {
            let (addr, prefix) = value.split_once('/')?;
            let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p))?;
            Some((addr.parse().ok()?, prefix))
        };
        match parse() {
            Some(v) => params.ipv4 = Some(v),
            None => errors.push(format!("bad {ip4_name}={value}")),
        }
    }
    match ipv6_from_cmdline(text, card) {
        Some(Ok(v)) => params.ipv6 = Some(v),
        Some(Err(e)) => errors.push(e),
        None => {}
    }
    for item in addresses_from_cmdline(text, card) {
        match item {
            Ok(v) => params.addresses.push(v),
            Err(e) => errors.push(e),
        }
    }
    for item in routes_from_cmdline(text, card) {
        match item {
            Ok(v) => params.routes.push(v),
            Err(e) => errors.push(e),
        }
    }
    (params, errors)
}

/// Every card's configuration that `text` carries (see [`net_params`]), with the malformed
/// parameters of all of them.
pub fn all_net_params(text: &str) -> (Vec<NetParams>, Vec<String>) {
    let mut errors = Vec::new();
    let cards = (0..husk_agent_protocol::MAX_NET_CARDS)
        .map(|card| {
            let (params, mut malformed) = net_params(text, card);
            errors.append(&mut malformed);
            params
        })
        .collect();
    (cards, errors)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Configures every card from the parameters in `text` (see [`net_params`]): for each card
/// with parameters, `eth<card>` in order: MAC and MTU, up, the first IPv4 address, the IPv6
/// address and gateway, the further addresses (IPv4 ones as the aliases `eth0:1`, `eth0:2`,
/// ...), then the routes. The cards go in order, so that a route through a gateway another
/// card reaches comes after that card's addresses. Every step is tried; returns what failed,
/// malformed parameters included. Nothing is done for a card `text` carries no parameter of.
pub fn configure_network(text: &str) -> Vec<String> {
    let (cards, mut failed) = all_net_params(text);
    for (card, params) in cards.into_iter().enumerate() {
        if !params.is_empty() {
            configure_card(&format!("eth{card}"), params, &mut failed);
        }
    }
    failed
}

/// Configures interface `dev` from `params` (see [`configure_network`]), adding what failed to
/// `failed`.
fn configure_card(dev: &str, params: NetParams, failed: &mut Vec<String>) {
    if let Some(mac) = params.mac {
        if let Err(e) = crate::sys::set_mac(dev, mac) {
            failed.push(format!("setting {dev}'s MAC address: {e}"));
        }
    }
    if let Some(mtu) = params.mtu {
        if let Err(e) = crate::sys::set_mtu(dev, mtu) {
            failed.push(format!("setting {dev}'s MTU to {mtu}: {e}"));
        }
    }
    if let Err(e) = crate::sys::bring_up(dev) {
        failed.push(format!("bringing up {dev}: {e}"));
    }
    if let Some((addr, prefix)) = params.ipv4 {
        if let Err(e) = crate::sys::add_ipv4(dev, 0, addr, prefix) {
            failed.push(format!("adding {addr}/{prefix} to {dev}: {e}"));
        }
    }
    if let Some((addr, prefix, gateway)) = params.ipv6 {
        if let Err(e) = crate::sys::add_ipv6(dev, addr, prefix, gateway) {
            failed.push(format!(
                "adding {addr}/{prefix} (gateway {gateway:?}) to {dev}: {e}"
            ));
        }
    }
    let mut alias = 0;
    for (addr, prefix) in params.addresses {
        let result = match addr {
            std::net::IpAddr::V4(addr) => {
                alias += 1;
                crate::sys::add_ipv4(dev, alias, addr, prefix)
                    .map_err(|e| format!("adding {addr}/{prefix} to {dev} as {dev}:{alias}: {e}"))
            }
            std::net::IpAddr::V6(addr) => crate::sys::add_ipv6(dev, addr, prefix, None)
                .map_err(|e| format!("adding {addr}/{prefix} to {dev}: {e}")),
        };
        if let Err(e) = result {
            failed.push(e);
        }
    }
    for (dst, prefix, via, metric) in params.routes {
        if let Err(e) = crate::sys::add_route(dev, dst, prefix, via, metric) {
            let via = via.map(|v| format!(" via {v}")).unwrap_or_default();
            failed.push(format!(
                "adding {dst}/{prefix}{via} metric {metric} on {dev}: {e}"
            ));
        }
    }
}

/// Configures the cards from the kernel command line, where husk-vmm put what the kernel's own
/// `ip=` does not do (see [`configure_network`]); returns what failed.
pub fn configure_network_from_cmdline() -> Vec<String> {
    match read_cmdline() {
        Ok(cmdline) => configure_network(&cmdline),
        Err(e) => vec![e],
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_hook_comes_from_the_command_line() {
        use super::test_hook_from_cmdline;
        assert_eq!(test_hook_from_cmdline("console=ttyS0 quiet"), None);
        assert_eq!(
            test_hook_from_cmdline("quiet husk.test_hook=exit-on-exec"),
            Some("exit-on-exec")
        );
        assert_eq!(
            test_hook_from_cmdline("husk.test_hooks=x husk.test_hook"),
            None
        );
    }

    #[test]
    fn routes_come_from_the_command_line_in_order() {
        use super::routes_from_cmdline;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(routes_from_cmdline("quiet husk.ip6=fd00::5/64", 0).is_empty());
        assert_eq!(
            routes_from_cmdline(
                "ip=10.244.1.5:::255.255.255.255::eth0:off husk.route=169.254.1.1/32 \
                 husk.route=0.0.0.0/0,169.254.1.1 husk.route=fd00:1::/64,fe80::1 \
                 husk.route=0.0.0.0/0,10.0.0.1,metric=100 husk.route=10.8.0.0/16,metric=7",
                0
            ),
            vec![
                Ok((ip("169.254.1.1"), 32, None, 0)),
                Ok((ip("0.0.0.0"), 0, Some(ip("169.254.1.1")), 0)),
                Ok((ip("fd00:1::"), 64, Some(ip("fe80::1")), 0)),
                Ok((ip("0.0.0.0"), 0, Some(ip("10.0.0.1")), 100)),
                Ok((ip("10.8.0.0"), 16, None, 7)),
            ]
        );
        for bad in [
            "husk.route=10.0.0.0",
            "husk.route=10.0.0.0/33",
            "husk.route=10.0.0.0/8,fe80::1",
            "husk.route=x/8",
            "husk.route=10.0.0.0/8,metric=1,10.0.0.1",
            "husk.route=10.0.0.0/8,10.0.0.1,10.0.0.2",
            "husk.route=10.0.0.0/8,metric=1,metric=2",
            "husk.route=10.0.0.0/8,metric=-1",
        ] {
            let got = routes_from_cmdline(bad, 0);
            assert_eq!(got.len(), 1, "{bad}");
            assert!(got[0].is_err(), "{bad}");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_renewal_carries_the_whole_card() {
        use super::net_params;
        let (params, errors) = net_params(
            "husk.mac=02:00:0a:58:00:05 husk.mtu=1450 husk.ip4=10.88.0.5/16 \
             husk.ip6=fd00::5/64,fd00::1 husk.addr=10.88.0.6/16 husk.route=0.0.0.0/0,10.88.0.1",
            0,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(params.mac, Some([2, 0, 0x0a, 0x58, 0, 5]));
        assert_eq!(params.mtu, Some(1450));
        assert_eq!(params.ipv4, Some(("10.88.0.5".parse().unwrap(), 16)));
        assert_eq!(
            params.ipv6,
            Some((
                "fd00::5".parse().unwrap(),
                64,
                Some("fd00::1".parse().unwrap())
            ))
        );
        assert_eq!(params.addresses, [("10.88.0.6".parse().unwrap(), 16)]);
        assert_eq!(
            params.routes,
            [(
                "0.0.0.0".parse().unwrap(),
                0,
                Some("10.88.0.1".parse().unwrap()),
                0
            )]
        );
        // A booted guest's command line: the kernel's ip= is not the agent's.
        let (params, errors) = net_params("quiet ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off", 0);
        assert!(errors.is_empty() && params == Default::default());
        for bad in [
            "husk.mac=02:00:0a:58:00",
            "husk.mac=02:00:0a:58:00:05:06",
            "husk.mac=02:00:0a:58:00:zz",
            "husk.mtu=67",
            "husk.mtu=65536",
            "husk.ip4=10.0.0.2",
            "husk.ip4=10.0.0.2/33",
            "husk.ip4=fd00::2/64",
        ] {
            let (_, errors) = net_params(bad, 0);
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn each_card_has_parameters_of_its_own() {
        use super::{all_net_params, net_params};
        let text = "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off husk.route=10.9.0.0/16,10.0.0.1 \
                    husk.eth1.mac=02:00:0a:59:00:05 husk.eth1.ip4=10.89.0.5/16 \
                    husk.eth1.addr=fd00:89::5/64 husk.eth1.route=0.0.0.0/0,10.89.0.1,metric=101 \
                    husk.eth3.mtu=9000";
        let (cards, errors) = all_net_params(text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cards.len(), husk_agent_protocol::MAX_NET_CARDS);
        assert_eq!(cards[0].ipv4, None);
        assert_eq!(
            cards[0].routes,
            [(
                "10.9.0.0".parse().unwrap(),
                16,
                Some("10.0.0.1".parse().unwrap()),
                0
            )]
        );
        assert_eq!(cards[1].mac, Some([2, 0, 0x0a, 0x59, 0, 5]));
        assert_eq!(cards[1].ipv4, Some(("10.89.0.5".parse().unwrap(), 16)));
        assert_eq!(cards[1].addresses, [("fd00:89::5".parse().unwrap(), 64)]);
        assert_eq!(
            cards[1].routes,
            [(
                "0.0.0.0".parse().unwrap(),
                0,
                Some("10.89.0.1".parse().unwrap()),
                101
            )]
        );
        assert!(cards[2].is_empty());
        assert_eq!(cards[3].mtu, Some(9000));
        // A bad parameter of another card is named as that card's.
        let (_, errors) = all_net_params("husk.eth2.ip4=10.0.0.2");
        assert_eq!(errors, ["bad husk.eth2.ip4=10.0.0.2"]);
        // Card 1's parameters are not card 0's, nor card 10's card 1's.
        let (params, _) = net_params("husk.eth1.ip4=10.0.0.2/8 husk.eth10.mtu=1400", 1);
        assert_eq!(params.ipv4, Some(("10.0.0.2".parse().unwrap(), 8)));
        assert_eq!(params.mtu, None);
        assert!(net_params("husk.eth1.ip4=10.0.0.2/8", 0).0.is_empty());
    }

    #[test]
    fn further_addresses_come_from_the_command_line_in_order() {
        use super::addresses_from_cmdline;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(addresses_from_cmdline("quiet husk.ip6=fd00::5/64", 0).is_empty());
        assert_eq!(
            addresses_from_cmdline(
                "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off husk.addr=10.0.0.3/24 \
                 husk.addr=fd00::6/64 husk.route=10.9.0.0/16,10.0.0.1 husk.addr=192.168.5.2/16",
                0
            ),
            vec![
                Ok((ip("10.0.0.3"), 24)),
                Ok((ip("fd00::6"), 64)),
                Ok((ip("192.168.5.2"), 16)),
            ]
        );
        for bad in [
            "husk.addr=10.0.0.3",
            "husk.addr=10.0.0.3/33",
            "husk.addr=10.0.0.3/0",
            "husk.addr=fd00::6/129",
            "husk.addr=x/8",
        ] {
            let got = addresses_from_cmdline(bad, 0);
            assert_eq!(got.len(), 1, "{bad}");
            assert!(got[0].is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ipv6_configuration_comes_from_the_command_line() {
        assert!(
            ipv6_from_cmdline("quiet ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off", 0).is_none()
        );
        assert_eq!(
            ipv6_from_cmdline("quiet husk.ip6=fd00:88::5/64,fd00:88::1 rdinit=/init", 0),
            Some(Ok((
                "fd00:88::5".parse().expect("ip"),
                64,
                Some("fd00:88::1".parse().expect("ip"))
            )))
        );
        assert_eq!(
            ipv6_from_cmdline("husk.ip6=fd00::5/128", 0),
            Some(Ok(("fd00::5".parse().expect("ip"), 128, None)))
        );
        for bad in [
            "husk.ip6=fd00::5",
            "husk.ip6=fd00::5/0",
            "husk.ip6=x/64",
            "husk.ip6=fd00::5/64,zz",
        ] {
            assert!(matches!(ipv6_from_cmdline(bad, 0), Some(Err(_))), "{bad}");
        }
    }

    use super::*;
    use crate::sys::test_utils::{Call, RecordingSyscall};

    fn mount_targets(calls: &[Call]) -> Vec<String> {
        calls
            .iter()
            .filter_map(|call| match call {
                Call::Mount { target, .. } => Some(target.display().to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn mounts_everything_in_order_with_mount_points_first() {
        let sys = RecordingSyscall::new();
        assert_eq!(setup_mounts(&sys), Vec::new());
        let calls = sys.calls();
        assert_eq!(
            mount_targets(&calls),
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/tmp",
                "/sys/fs/cgroup"
            ]
        );
        assert_eq!(calls.len(), 16);
        assert_eq!(
            calls[0],
            Call::Mkdir {
                path: "/proc".into(),
                mode: 0o755
            }
        );
        assert_eq!(
            calls[7],
            Call::Mount {
                source: Some("devpts".into()),
                target: "/dev/pts".into(),
                fstype: Some("devpts".into()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                data: Some("newinstance,ptmxmode=0666,mode=0620".into()),
            }
        );
        assert_eq!(
            calls[15],
            Call::Mount {
                source: Some("cgroup2".into()),
                target: "/sys/fs/cgroup".into(),
                fstype: Some("cgroup2".into()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                data: None,
            }
        );
    }

    #[test]
    fn existing_mount_points_and_busy_mounts_are_fine() {
        let sys = RecordingSyscall::new();
        sys.fail_mkdir("/proc", Errno::EEXIST);
        sys.fail_mount("/dev", Errno::EBUSY);
        assert_eq!(setup_mounts(&sys), Vec::new());
    }

    #[test]
    fn a_failed_mount_is_reported_and_the_rest_still_mounted() {
        let sys = RecordingSyscall::new();
        sys.fail_mkdir("/sys/fs/cgroup", Errno::EPERM);
        sys.fail_mount("/sys/fs/cgroup", Errno::ENOENT);
        sys.fail_mount("/dev/pts", Errno::ENODEV);
        assert_eq!(
            setup_mounts(&sys),
            vec![
                InitError::Mount {
                    fstype: "devpts",
                    target: "/dev/pts".into(),
                    errno: Errno::ENODEV
                },
                InitError::MountPoint {
                    path: "/sys/fs/cgroup".into(),
                    errno: Errno::EPERM
                },
                InitError::Mount {
                    fstype: "cgroup2",
                    target: "/sys/fs/cgroup".into(),
                    errno: Errno::ENOENT
                },
            ]
        );
        assert_eq!(mount_targets(&sys.calls()).len(), 8);
    }

    #[test]
    fn share_is_mounted_by_tag_and_a_missing_device_is_fine() {
        let sys = RecordingSyscall::new();
        assert_eq!(mount_share(&sys), Ok(true));
        assert_eq!(
            sys.calls().last(),
            Some(&Call::Mount {
                source: Some("husk".into()),
                target: "/run/husk/shared".into(),
                fstype: Some("virtiofs".into()),
                flags: MsFlags::empty(),
                data: None,
            })
        );
        let sys = RecordingSyscall::new();
        sys.fail_mount("/run/husk/shared", Errno::ENOENT);
        assert_eq!(mount_share(&sys), Ok(false));
        let sys = RecordingSyscall::new();
        sys.fail_mount("/run/husk/shared", Errno::EIO);
        assert_eq!(
            mount_share(&sys),
            Err(InitError::Mount {
                fstype: "virtiofs",
                target: "/run/husk/shared".into(),
                errno: Errno::EIO
            })
        );
    }
}
