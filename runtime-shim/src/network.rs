//! Networking: the network namespace an engine or CNI prepared, carried into the microVM.
//!
//! containerd's CRI plugin (for a pod) and podman (for a container, through CNI or netavark)
//! create a network namespace and put an interface in it (a veth end, `eth0`, with the
//! address) before the runtime's `create`, and name the namespace's path in the spec. The VM
//! cannot join a host namespace, so husk wires the interface to the VM's network card the way
//! Kata Containers does: in that namespace it creates a TAP device (`husk0`) and mirrors every
//! frame between the two with `tc` (an ingress qdisc on each, whose filter redirects
//! everything to the other's egress). husk-vmm gets the TAP's file descriptor, and a virtio-net
//! card with the interface's MAC address and MTU; the guest kernel configures the IPv4 address
//! and default route on its `eth0` at boot. A namespace with several interfaces (a container
//! on several podman networks, a pod with Multus's `net1`) gets a TAP and a card for each, up
//! to [`MAX_CARDS`], in the order of their link indexes: `husk0` and `eth0` for the first,
//! `husk1` and `eth1` for the next, and so on, each configured by the agent as the first card
//! is (below). To the host network the guest is the container:
//! same MAC, same address, so the engine's port forwarding (`-p`) and its bridge reach it
//! unchanged.
//!
//! Departure from DESIGN.md, which has the agent configure the guest's interface: the MAC is
//! the virtio-net card's own (its configuration space), and the address and default route are
//! applied by the guest kernel's IP autoconfiguration (`ip=` on the command line, which
//! husk-vmm adds for its card). That costs no agent round trip, is in place before `/init`
//! runs, and keeps netlink code out of the agent. The kernel's `ip=` is IPv4 only: the
//! interface's global IPv6 address and the IPv6 default route go on the command line as
//! `husk.ip6=`, which the agent applies at boot. The interface's other routes (up to
//! [`MAX_ROUTES`]; those the kernel made from its addresses it makes again in the guest) go as
//! `husk.route=`, which the agent adds in order, those on the link first; so does the IPv4
//! default route when its gateway is outside the address's subnet, as with Calico's and
//! Cilium's /32 addresses, which the kernel's `ip=` cannot route through. The interface's
//! further addresses (a second IPv4 or global IPv6 address, up to [`MAX_ADDRESSES`] in all) go
//! as `husk.addr=`, which the agent adds before the routes. A route's metric goes with it,
//! so that the default routes of several cards stay apart as in the namespace. A namespace with
//! more interfaces than [`MAX_CARDS`] is refused, naming them, rather than carried in part.
//!
//! One microVM owns a namespace's interfaces: a second one finds `husk0` there and is refused
//! (containers sharing a network namespace belong in one VM, which is what the shim's pods
//! are). The TAPs go with the VMM's descriptors. The ingress qdiscs stay on the interfaces until
//! they are removed: the CLI records what it wired in the container's state directory
//! ([`record`]), and every way the state directory goes (a failed `create`, `delete`,
//! `delete --force` after a `kill -9`) removes them ([`release_recorded`]), so the namespace is
//! left as the engine made it. A pod's namespace goes with the pod (CNI tears it down).
//! Links, qdiscs and filters are read and set up in-process over rtnetlink ([`crate::netlink`]),
//! from a thread that entered the namespace: no `ip` or `tc` is spawned.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::netlink::{self, Netlink};

/// The most interfaces carried into one microVM (a card each).
pub const MAX_CARDS: usize = husk_vmm::config::MAX_NET_CARDS;

/// The name of the TAP of card `card` in the pod's namespace: `husk0`, `husk1`, ...
pub fn tap_name(card: usize) -> String {
    format!("husk{card}")
}

/// Whether `name` is one of husk's TAPs (`husk` and a card number).
fn is_tap_name(name: &str) -> bool {
    name.strip_prefix("husk")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// One interface of the pod's network as the VM gets it: a card.
#[derive(Debug)]
pub struct PodNetwork {
    /// The TAP, open, for husk-vmm's `--net-card`.
    pub tap: File,
    /// The CNI interface it mirrors, and that interface's MAC and MTU (the guest card's).
    pub interface: String,
    pub mac: String,
    pub mtu: u16,
    /// The pod's IPv4 address with its prefix length (`10.88.0.5/16`), if CNI gave one.
    pub ipv4: Option<String>,
    /// The default gateway, if the namespace has a default route.
    pub gateway: Option<String>,
    /// The interface's global IPv6 address with its prefix length, if it has one, and the
    /// namespace's IPv6 default gateway.
    pub ipv6: Option<String>,
    pub gateway6: Option<String>,
    /// The interface's other routes, `destination/prefix[,gateway]`: those on the link first,
    /// then those through a gateway (the agent adds them in this order).
    pub routes: Vec<String>,
    /// The interface's further addresses, `address/prefix`, either family, in the kernel's
    /// order: those after the first IPv4 and the first global IPv6 address.
    pub addresses: Vec<String>,
}

impl PodNetwork {
    /// This card's words for husk-vmm (see `husk_vmm::net_handoff`), without its TAP.
    pub fn handoff_message(&self) -> String {
        fn with_gateway<'a>(
            ip: &'a Option<String>,
            gateway: &'a Option<String>,
        ) -> Option<(&'a str, Option<&'a str>)> {
            ip.as_deref().map(|ip| (ip, gateway.as_deref()))
        }
        husk_vmm::net_handoff::message(
            &self.mac,
            Some(self.mtu),
            with_gateway(&self.ipv4, &self.gateway),
            with_gateway(&self.ipv6, &self.gateway6),
            &self.routes,
            &self.addresses,
        )
    }
}

/// husk-vmm's arguments for `cards`, in order, the TAP of each as descriptor `fds[i]` in the
/// VMM: one `--net-card` each.
pub fn vmm_args(cards: &[PodNetwork], fds: &[i32]) -> Vec<String> {
    cards
        .iter()
        .zip(fds)
        .flat_map(|(card, fd)| {
            [
                "--net-card".to_string(),
                format!("tap={fd} {}", card.handoff_message()),
            ]
        })
        .collect()
}

/// The message of `husk_vmm::net_handoff` for `cards` (their TAPs go beside it, in order).
pub fn handoff_message(cards: &[PodNetwork]) -> String {
    if cards.is_empty() {
        return "none".to_string();
    }
    cards
        .iter()
        .map(PodNetwork::handoff_message)
        .collect::<Vec<_>>()
        .join(husk_vmm::net_handoff::CARD_SEPARATOR)
}

/// An interface to carry.
#[derive(Debug, PartialEq, Eq)]
struct Found {
    index: u32,
    name: String,
    mac: String,
    mtu: u32,
    /// The first IPv4 address and the first global IPv6 address, each `address/prefix`.
    ipv4: Option<String>,
    ipv6: Option<String>,
    /// Its other IPv4 and global IPv6 addresses, in the kernel's order.
    further: Vec<String>,
}

/// The interfaces to carry: the namespace's Ethernet interfaces other than loopback and our
/// own TAPs, in the order of their link indexes, each with its MAC, MTU and addresses (listed
/// in the kernel's order).
fn carryable_interfaces(links: &[netlink::Link], addresses: &[netlink::Address]) -> Vec<Found> {
    links
        .iter()
        .filter_map(|link| {
            if link.name == "lo" || is_tap_name(&link.name) || !link.ether {
                return None;
            }
            // The guest makes its own link-local IPv6 address from the MAC, as the host did.
            let carried = |ipv6: bool| {
                addresses
                    .iter()
                    .filter(move |a| {
                        a.index == link.index && a.ip.is_ipv6() == ipv6 && (!ipv6 || a.global)
                    })
                    .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            };
            let mut ipv4 = carried(false);
            let mut ipv6 = carried(true);
            let (first4, first6) = (ipv4.next(), ipv6.next());
            Some(Found {
                index: link.index,
                name: link.name.clone(),
                mac: link.mac.clone()?,
                mtu: link.mtu.unwrap_or(1500),
                ipv4: first4,
                ipv6: first6,
                further: ipv4.chain(ipv6).collect(),
            })
        })
        .collect()
}

/// The interfaces to carry (see [`carryable_interfaces`]), in the order of their link
/// indexes (the order the engine added them): an error naming them when there are more than
/// a microVM takes, rather than a container started with part of its network missing.
fn pick_interfaces(
    netns: &Path,
    links: &[netlink::Link],
    addresses: &[netlink::Address],
) -> Result<Vec<Found>> {
    let mut found = carryable_interfaces(links, addresses);
    found.sort_by_key(|f| f.index);
    if found.len() > MAX_CARDS {
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        bail!(
            "the network namespace {} has {} interfaces ({}); husk carries at most {MAX_CARDS} \
             network interfaces into a microVM",
            netns.display(),
            found.len(),
            names.join(", ")
        );
    }
    Ok(found)
}

/// The most routes carried besides the default ones (each goes on the guest kernel's command
/// line, which is 2 KiB in all).
pub const MAX_ROUTES: usize = husk_vmm::config::MAX_NET_ROUTES;

/// The most further addresses carried (likewise on the command line).
pub const MAX_ADDRESSES: usize = husk_vmm::config::MAX_NET_ADDRESSES;

/// The routes of the interface that the guest gets.
#[derive(Debug, PartialEq, Eq)]
struct Carried {
    /// The default gateways, IPv4 and IPv6.
    gateway: Option<String>,
    gateway6: Option<String>,
    /// Every other route through the interface the kernel did not make from an address
    /// (`destination/prefix[,gateway]`), those on the link before those through a gateway:
    /// a CNI that gives a pod a /32 address and a gateway outside it (Calico, Cilium) adds a
    /// link route to the gateway, which must be there before a route through it.
    routes: Vec<String>,
}

/// The highest IPv4 metric the guest's agent can give a route (`struct rtentry` holds it,
/// plus one, in a `short`).
pub const MAX_IPV4_METRIC: u32 = 32766;

/// Picks the routes of the interface with index `index` from the namespace's `routes`.
/// A default route with a metric other than its family's default (0 for IPv4, 1024 for IPv6),
/// as netavark gives each network's default route when a container has several, goes among the
/// routes with its metric rather than as the default gateway, so that the guest tells the
/// cards' default routes apart as the namespace does.
fn carried_routes(index: u32, routes: &[netlink::Route]) -> Result<Carried> {
    let ours = || routes.iter().filter(|r| r.oif == Some(index));
    // The metric as the guest's agent takes it: 0 for the family's default.
    let metric = |r: &netlink::Route| match (r.dst.is_ipv6(), r.metric) {
        (true, 1024) | (false, 0) => 0,
        (_, m) => m,
    };
    let is_default = |r: &netlink::Route, ipv6: bool| {
        r.prefix_len == 0 && r.dst.is_ipv6() == ipv6 && r.gateway.is_some()
    };
    let default = |ipv6: bool| {
        ours()
            .find(|r| is_default(r, ipv6) && metric(r) == 0)
            .and_then(|r| r.gateway)
            .map(|gw| gw.to_string())
    };
    // As husk-vmm's `--net-route` reads it.
    let text = |r: &netlink::Route| {
        husk_vmm::config::NetRoute {
            dst: r.dst,
            prefix_len: r.prefix_len,
            via: r.gateway,
            metric: metric(r),
        }
        .to_string()
    };
    if let Some(r) = ours().find(|r| r.dst.is_ipv4() && r.metric > MAX_IPV4_METRIC) {
        bail!(
            "the network namespace's route to {}/{} has metric {}; husk carries IPv4 routes \
             with metrics up to {MAX_IPV4_METRIC} into a microVM",
            r.dst,
            r.prefix_len,
            r.metric
        );
    }
    let others: Vec<&netlink::Route> = ours()
        .filter(|r| !r.kernel)
        .filter(|r| r.prefix_len != 0 || (metric(r) != 0 && r.gateway.is_some()))
        .collect();
    let mut carried: Vec<String> = others
        .iter()
        .filter(|r| r.gateway.is_none())
        .map(|r| text(r))
        .collect();
    carried.extend(
        others
            .iter()
            .filter(|r| r.gateway.is_some())
            .map(|r| text(r)),
    );
    if carried.len() > MAX_ROUTES {
        bail!(
            "the network namespace's interface has {} routes besides its default ones; husk \
             carries at most {MAX_ROUTES} into a microVM",
            carried.len()
        );
    }
    Ok(Carried {
        gateway: default(false),
        gateway6: default(true),
        routes: carried,
    })
}

/// Opens a TAP named `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) in the calling thread's
/// network namespace.
fn open_tap(name: &str) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun (is the tun module loaded? `modprobe tun`)")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    // Our names are short ASCII (`husk` and a card number); IFNAMSIZ holds 15 bytes and a NUL.
    let len = name.len().min(15);
    req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: TUNSETIFF reads (and updates) a `struct ifreq`, which `req` is, valid for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("TUNSETIFF for the pod's TAP {name}"));
    }
    Ok(file)
}

/// Runs `f` in the network namespace at `netns`: setns(2) changes the calling thread only, so
/// a thread of its own enters the namespace, and the netlink sockets it opens belong to it.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let netns: PathBuf = netns.to_path_buf();
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || -> Result<T> {
            let ns = File::open(&netns).with_context(|| {
                format!("cannot open the network namespace {}", netns.display())
            })?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| {
                format!("cannot enter the network namespace {}", netns.display())
            })?;
            f()
        })
        .context("cannot start the network namespace thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the network namespace thread panicked"))?
}

/// Wires each interface of the network namespace at `netns` to a new TAP (see the module
/// docs), in order. Empty when the namespace has no Ethernet interface to carry (a pod without
/// CNI networking, a container run with `--network=none`). On an error nothing stays wired.
pub fn prepare(netns: &Path) -> Result<Vec<PodNetwork>> {
    let path = netns.to_path_buf();
    in_netns(netns, move || -> Result<Vec<PodNetwork>> {
        let mut nl = Netlink::open()?;
        let links = nl.links()?;
        if let Some(tap) = links.iter().find(|l| is_tap_name(&l.name)) {
            bail!(
                "{} already has a {}: its interfaces are carried into another microVM \
                 (each microVM has a network namespace of its own; containers that share one \
                 belong in one VM, as a pod through containerd-shim-husk-v2)",
                path.display(),
                tap.name
            );
        }
        let found = pick_interfaces(&path, &links, &nl.addresses()?)?;
        let mut all_routes = Vec::new();
        if found.iter().any(|f| f.ipv4.is_some()) {
            all_routes.extend(nl.routes(false)?);
        }
        if found.iter().any(|f| f.ipv6.is_some()) {
            all_routes.extend(nl.routes(true)?);
        }
        // Everything checked before anything is wired.
        let planned = found
            .into_iter()
            .map(|f| plan(&path, f, &all_routes))
            .collect::<Result<Vec<_>>>()?;
        let mut cards = Vec::with_capacity(planned.len());
        for (card, planned) in planned.into_iter().enumerate() {
            match wire(&mut nl, card, planned) {
                Ok(net) => cards.push(net),
                Err(e) => {
                    // The TAPs go with their descriptors; the wired interfaces' qdiscs by hand.
                    for net in &cards {
                        let _ = remove_ingress(&mut nl, &net.interface);
                    }
                    return Err(e);
                }
            }
        }
        Ok(cards)
    })
}

/// An interface to carry, checked, with the routes it carries.
struct Planned {
    found: Found,
    carried: Carried,
}

/// Checks `found` (an interface of the namespace at `netns`) and picks its routes from
/// `all_routes`.
fn plan(netns: &Path, found: Found, all_routes: &[netlink::Route]) -> Result<Planned> {
    if found.further.len() > MAX_ADDRESSES {
        bail!(
            "{} in {} has {} addresses besides its first IPv4 and IPv6 one; husk carries at \
             most {MAX_ADDRESSES} more into the microVM",
            found.name,
            netns.display(),
            found.further.len()
        );
    }
    let carried = carried_routes(found.index, all_routes)
        .with_context(|| format!("carrying {}", found.name))?;
    Ok(Planned { found, carried })
}

/// Wires `planned`, the interface of card `card`, to a new TAP in `nl`'s namespace.
fn wire(nl: &mut Netlink, card: usize, planned: Planned) -> Result<PodNetwork> {
    let Planned {
        found:
            Found {
                index,
                name: interface,
                mac,
                mtu,
                ipv4,
                ipv6,
                further,
            },
        carried: Carried {
            gateway,
            gateway6,
            routes,
        },
    } = planned;
    let tap_name = tap_name(card);
    let tap = open_tap(&tap_name)?;
    let wired = (|| -> Result<()> {
        let tap_index = netlink::find(&nl.links()?, &tap_name)?.index;
        nl.set_mtu_up(tap_index, mtu)?;
        for (from, to) in [(index, tap_index), (tap_index, index)] {
            // `replace` and no filter but ours: the qdisc of a VMM killed before its
            // container was deleted may still be there.
            nl.replace_ingress_qdisc(from)?;
            match nl.delete_ingress_filters(from) {
                Err(e) if !netlink::is_absent(&e) => return Err(e),
                _ => {}
            }
            nl.redirect_ingress(from, to)?;
        }
        Ok(())
    })();
    if let Err(e) = wired {
        // The TAP goes with its descriptor; the interface's qdisc must go by hand.
        let _ = remove_ingress(nl, &interface);
        return Err(e.context(format!("wiring {interface} to {tap_name}")));
    }
    Ok(PodNetwork {
        tap,
        interface,
        mac,
        // An Ethernet link's MTU is at most 65535 (ETH_MAX_MTU).
        mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        ipv4,
        gateway,
        ipv6,
        gateway6,
        routes,
        addresses: further,
    })
}

/// Removes `interface`'s ingress qdisc (and so its filters) in `nl`'s namespace, if the
/// interface and the qdisc are there.
fn remove_ingress(nl: &mut Netlink, interface: &str) -> Result<()> {
    let Some(link) = nl.links()?.into_iter().find(|l| l.name == interface) else {
        return Ok(());
    };
    if nl.has_ingress_qdisc(link.index)? {
        nl.delete_ingress_qdisc(link.index)?;
    }
    Ok(())
}

/// What husk wired in a network namespace for one microVM: enough to undo it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiring {
    /// The namespace (the path the spec named).
    pub netns: PathBuf,
    /// The interfaces whose frames go to the TAPs.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// The one interface of a record an earlier husk wrote, which carried one.
    #[serde(default, skip_serializing)]
    pub interface: Option<String>,
}

/// The record of a container's wiring in its state directory.
fn wiring_file(dir: &Path) -> PathBuf {
    dir.join("network.json")
}

/// Records in state directory `dir` that `cards` were wired in `netns`, for
/// [`release_recorded`]. On failure the wiring is undone at once.
pub fn record(dir: &Path, netns: &Path, cards: &[PodNetwork]) -> Result<()> {
    let wiring = Wiring {
        netns: netns.to_path_buf(),
        interfaces: cards.iter().map(|c| c.interface.clone()).collect(),
        interface: None,
    };
    let written = serde_json::to_vec(&wiring)
        .map_err(anyhow::Error::from)
        .and_then(|json| {
            crate::state::write_atomic(&wiring_file(dir), &json).map_err(anyhow::Error::from)
        });
    if let Err(e) = written {
        let _ = release(&wiring);
        return Err(e.context("recording the container's network wiring"));
    }
    Ok(())
}

/// Undoes what [`record`] recorded in state directory `dir`, if anything: the interfaces'
/// ingress qdiscs go (the TAPs went with the VMM). A namespace or interface that is gone
/// already (the engine tore its network down first) took the qdisc with it.
pub fn release_recorded(dir: &Path) -> Result<()> {
    let file = wiring_file(dir);
    let json = match std::fs::read(&file) {
        Ok(json) => json,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let wiring: Wiring =
        serde_json::from_slice(&json).with_context(|| format!("parsing {}", file.display()))?;
    release(&wiring)?;
    std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))
}

fn release(wiring: &Wiring) -> Result<()> {
    // Gone, or no longer a network namespace (the engine unmounted it and left the file):
    // the interface and its qdisc went with the namespace.
    let spec = serde_json::json!({"linux": {"namespaces": [
        {"type": "network", "path": wiring.netns}]}});
    if crate::bundle::check_namespace_paths(&spec).is_err() {
        return Ok(());
    }
    let interfaces: Vec<String> = wiring
        .interfaces
        .iter()
        .chain(&wiring.interface)
        .cloned()
        .collect();
    let names = interfaces.join(", ");
    in_netns(&wiring.netns, move || {
        let mut nl = Netlink::open()?;
        // Every one is tried; the first failure is reported.
        let mut result = Ok(());
        for interface in &interfaces {
            let removed = remove_ingress(&mut nl, interface);
            if result.is_ok() {
                result = removed;
            }
        }
        result
    })
    .with_context(|| {
        format!(
            "removing the ingress qdiscs of {names} in {}",
            wiring.netns.display()
        )
    })
}

/// The network namespace path of an OCI spec, if it names one.
pub fn netns_path(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_cni_interface_is_picked_with_its_addresses() {
        let link = |index: u32, name: &str, ether: bool, mtu: u32| netlink::Link {
            index,
            name: name.into(),
            ether,
            mac: Some(format!("6e:f8:3a:b4:8c:{index:02x}")),
            mtu: Some(mtu),
        };
        let address = |index: u32, ip: &str, prefix_len: u8, global: bool| netlink::Address {
            index,
            ip: ip.parse().expect("ip"),
            prefix_len,
            global,
        };
        let links = [
            link(1, "lo", false, 65536),
            link(2, &tap_name(0), true, 1500),
            link(3, "eth0", true, 1450),
        ];
        let addresses = [
            address(1, "127.0.0.1", 8, false),
            address(2, "10.99.0.1", 24, true),
            address(3, "10.88.77.2", 24, true),
            address(3, "10.88.77.3", 24, true),
            address(3, "fe80::1", 64, false),
            address(3, "fd00:88::5", 64, true),
            address(3, "fd00:88::6", 64, true),
            address(3, "192.168.5.2", 16, true),
        ];
        let ns = Path::new("/var/run/netns/cni-1");
        let pick = |links: &[netlink::Link], addresses: &[netlink::Address]| {
            let mut found = pick_interfaces(ns, links, addresses).expect("few interfaces");
            assert!(found.len() <= 1, "{found:?}");
            found.pop()
        };
        assert_eq!(
            pick(&links, &addresses),
            Some(Found {
                index: 3,
                name: "eth0".to_string(),
                mac: "6e:f8:3a:b4:8c:03".to_string(),
                mtu: 1450,
                ipv4: Some("10.88.77.2/24".to_string()),
                ipv6: Some("fd00:88::5/64".to_string()),
                further: vec![
                    "10.88.77.3/24".to_string(),
                    "192.168.5.2/16".to_string(),
                    "fd00:88::6/64".to_string(),
                ],
            })
        );
        // Loopback and our own TAP are never carried; nor is a link without a MAC.
        assert_eq!(pick(&links[..2], &addresses), None);
        let mut no_mac = links.clone();
        no_mac[2].mac = None;
        assert_eq!(pick(&no_mac, &addresses), None);
        // An interface without addresses is still carried (the guest has its MAC).
        assert_eq!(
            pick(&links, &addresses[..2]).map(|f| (f.ipv4, f.ipv6)),
            Some((None, None))
        );
        // A second interface (a second network, Multus's net1) is carried too, in the order
        // of the link indexes; another TAP of ours is not.
        let mut two = links.to_vec();
        two.insert(0, link(9, "net1", true, 1500));
        two.push(link(5, "husk1", true, 1500));
        let found = pick_interfaces(ns, &two, &addresses).expect("two interfaces");
        assert_eq!(
            found.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["eth0", "net1"]
        );
        // More than a microVM takes: refused, naming them, rather than the container starting
        // without some.
        let mut many = links.to_vec();
        for index in 4..=(3 + MAX_CARDS as u32) {
            many.push(link(index, &format!("net{index}"), true, 1500));
        }
        let err = pick_interfaces(ns, &many, &addresses).expect_err("too many interfaces");
        assert_eq!(
            format!("{err}"),
            "the network namespace /var/run/netns/cni-1 has 5 interfaces (eth0, net4, net5, \
             net6, net7); husk carries at most 4 network interfaces into a microVM"
        );
        assert!(is_tap_name("husk0") && is_tap_name("husk12"));
        assert!(!is_tap_name("husk") && !is_tap_name("husky") && !is_tap_name("husk0a"));
        assert_eq!(tap_name(2), "husk2");
    }

    #[test]
    fn the_interfaces_routes_are_carried_links_first() {
        let route = |dst: &str, prefix_len: u8, gateway: Option<&str>, oif: u32, kernel: bool| {
            netlink::Route {
                dst: dst.parse().expect("ip"),
                prefix_len,
                gateway: gateway.map(|g| g.parse().expect("ip")),
                oif: Some(oif),
                kernel,
                metric: if dst.contains(':') { 1024 } else { 0 },
            }
        };
        // Calico's way: a /32 address, a link route to a gateway outside it, the default
        // route through it; and a route of another link, and one the kernel made.
        let routes = [
            route("0.0.0.0", 0, Some("169.254.1.1"), 3, false),
            route("10.0.0.0", 8, Some("169.254.1.1"), 3, false),
            route("169.254.1.1", 32, None, 3, false),
            route("10.244.0.0", 16, None, 3, true),
            route("192.168.0.0", 16, None, 4, false),
            route("::", 0, Some("fe80::1"), 3, false),
            route("fd00:1::", 64, Some("fe80::1"), 3, false),
        ];
        assert_eq!(
            carried_routes(3, &routes).expect("routes"),
            Carried {
                gateway: Some("169.254.1.1".into()),
                gateway6: Some("fe80::1".into()),
                routes: vec![
                    "169.254.1.1/32".into(),
                    "10.0.0.0/8,169.254.1.1".into(),
                    "fd00:1::/64,fe80::1".into(),
                ],
            }
        );
        // Too many to put on the guest's command line: refused, saying so.
        let many: Vec<netlink::Route> = (0..=MAX_ROUTES as u8)
            .map(|i| route(&format!("10.{i}.0.0"), 16, None, 3, false))
            .collect();
        let err = carried_routes(3, &many).expect_err("too many");
        assert!(format!("{err}").contains("at most 16"), "{err}");
        // netavark's way with two networks: each link's default route has a metric of its
        // own, carried with it; a route's other metric likewise.
        let with_metric = |mut r: netlink::Route, metric: u32| {
            r.metric = metric;
            r
        };
        let two = [
            with_metric(route("0.0.0.0", 0, Some("10.88.0.1"), 3, false), 100),
            with_metric(route("0.0.0.0", 0, Some("10.89.0.1"), 4, false), 101),
            with_metric(route("10.9.0.0", 16, Some("10.89.0.1"), 4, false), 7),
            with_metric(route("::", 0, Some("fd00:89::1"), 4, false), 1024),
        ];
        assert_eq!(
            carried_routes(4, &two).expect("routes"),
            Carried {
                gateway: None,
                gateway6: Some("fd00:89::1".into()),
                routes: vec![
                    "0.0.0.0/0,10.89.0.1,metric=101".into(),
                    "10.9.0.0/16,10.89.0.1,metric=7".into(),
                ],
            }
        );
        let err = carried_routes(
            3,
            &[with_metric(route("10.0.0.0", 8, None, 3, false), 40000)],
        )
        .expect_err("metric");
        assert!(format!("{err}").contains("metrics up to 32766"), "{err}");
    }

    #[test]
    fn vmm_arguments_carry_what_cni_gave() {
        let net = PodNetwork {
            tap: tempfile::tempfile().expect("file"),
            interface: "eth0".into(),
            mac: "6e:f8:3a:b4:8c:90".into(),
            mtu: 1450,
            ipv4: Some("10.88.77.2/24".into()),
            gateway: Some("10.88.77.1".into()),
            ipv6: Some("fd00:88::5/64".into()),
            gateway6: Some("fd00:88::1".into()),
            routes: vec!["10.88.0.1/32".into(), "192.168.0.0/16,10.88.0.1".into()],
            addresses: vec!["10.88.77.3/24".into(), "fd00:88::6/64".into()],
        };
        let words = "mac=6e:f8:3a:b4:8c:90 mtu=1450 ip=10.88.77.2/24 gateway=10.88.77.1 \
                     ip6=fd00:88::5/64 gateway6=fd00:88::1 route=10.88.0.1/32 \
                     route=192.168.0.0/16,10.88.0.1 addr=10.88.77.3/24 addr=fd00:88::6/64";
        assert_eq!(net.handoff_message(), words);
        let second = PodNetwork {
            tap: tempfile::tempfile().expect("file"),
            interface: "net1".into(),
            mac: "6e:f8:3a:b4:8c:91".into(),
            mtu: 1500,
            ipv4: Some("10.89.0.2/24".into()),
            gateway: None,
            ipv6: None,
            gateway6: None,
            routes: vec!["0.0.0.0/0,10.89.0.1,metric=101".into()],
            addresses: vec![],
        };
        let second_words = "mac=6e:f8:3a:b4:8c:91 mtu=1500 ip=10.89.0.2/24 \
                            route=0.0.0.0/0,10.89.0.1,metric=101";
        let cards = [net, second];
        assert_eq!(
            vmm_args(&cards, &[3, 4]),
            [
                "--net-card".to_string(),
                format!("tap=3 {words}"),
                "--net-card".to_string(),
                format!("tap=4 {second_words}"),
            ]
        );
        assert_eq!(handoff_message(&cards), format!("{words} ; {second_words}"));
        assert_eq!(handoff_message(&[]), "none");
        // What husk-vmm reads back is what CNI gave.
        let card = husk_vmm::net_handoff::parse_card(&format!("tap=4 {second_words}"), true)
            .expect("card");
        assert_eq!(card.routes[0].to_string(), "0.0.0.0/0,10.89.0.1,metric=101");
    }

    #[test]
    fn the_wiring_record_goes_with_its_release() {
        let dir = tempfile::tempdir().expect("dir");
        // Nothing recorded: nothing to do.
        release_recorded(dir.path()).expect("no record");
        let net = PodNetwork {
            tap: tempfile::tempfile().expect("file"),
            interface: "eth0".into(),
            mac: "6e:f8:3a:b4:8c:90".into(),
            mtu: 1500,
            ipv4: None,
            gateway: None,
            ipv6: None,
            gateway6: None,
            routes: vec![],
            addresses: vec![],
        };
        // A namespace that is gone took the interface's qdisc with it.
        let netns = dir.path().join("no-such-netns");
        record(dir.path(), &netns, std::slice::from_ref(&net)).expect("record");
        let wiring: Wiring =
            serde_json::from_slice(&std::fs::read(wiring_file(dir.path())).expect("record"))
                .expect("json");
        assert_eq!(
            wiring,
            Wiring {
                netns: netns.clone(),
                interfaces: vec!["eth0".into()],
                interface: None,
            }
        );
        release_recorded(dir.path()).expect("released");
        assert!(!wiring_file(dir.path()).exists());
        // A file that is not a network namespace (one an engine unmounted) is the same.
        std::fs::write(&netns, "").expect("file");
        record(dir.path(), &netns, std::slice::from_ref(&net)).expect("record");
        release_recorded(dir.path()).expect("released");
        // A record an earlier husk wrote, of its one interface, reads as that interface.
        let old: Wiring = serde_json::from_str(r#"{"netns": "/run/netns/x", "interface": "eth0"}"#)
            .expect("an earlier record");
        assert_eq!(old.interface.as_deref(), Some("eth0"));
        assert!(old.interfaces.is_empty());
    }

    #[test]
    fn the_netns_path_comes_from_the_spec() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        assert_eq!(
            netns_path(&json!({"linux": {"namespaces": [{"type": "network"}]}})),
            None
        );
    }
}
