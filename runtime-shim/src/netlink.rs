//! The few rtnetlink requests husk's network wiring needs, made in-process on a `NETLINK_ROUTE`
//! socket: list links, addresses and default routes; set a link's MTU and bring it up; add,
//! list and delete an interface's ingress qdisc; add the `u32` filter whose `mirred` action
//! redirects every frame to another interface's egress. Messages are built and parsed with
//! `netlink-packet-route` (the rust-netlink project's types, which `rtnetlink` is built on);
//! the requests are synchronous, one at a time, so a thread that entered a network namespace
//! can make them without an async runtime (a netlink socket belongs to the namespace it was
//! opened in).
//!
//! What each request does is what iproute2 does for the command named in its docs, so the
//! namespace ends up as `ip` and `tc` would leave it. The peer is the host's kernel.

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::net::IpAddr;

/// `ETH_P_ALL` in network byte order, as a tc filter's protocol (`protocol all`).
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`, which is also its filters' parent.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// A link, as `ip link show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Whether its link layer is Ethernet (`link/ether`).
    pub ether: bool,
    /// Its hardware address, `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    pub mtu: Option<u32>,
}

/// An address of a link, as `ip addr show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The link's index.
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
    /// Scope global (as opposed to link or host).
    pub global: bool,
}

/// A unicast route of the main table, as `ip route show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination and its prefix length (`0.0.0.0/0`, `::/0` for a default route).
    pub dst: IpAddr,
    pub prefix_len: u8,
    /// The next hop, if the route has one (else the destination is on the link).
    pub gateway: Option<IpAddr>,
    /// The outgoing link's index.
    pub oif: Option<u32>,
    /// Whether the kernel made it from an address (`proto kernel`): the guest's kernel makes
    /// it too when it gets the address.
    pub kernel: bool,
    /// The route's metric (`RTA_PRIORITY`; 0 when it has none).
    pub metric: u32,
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
        socket
            .bind_auto()
            .context("cannot bind the netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("cannot connect the netlink socket to the kernel")?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` with `flags` (beside `NLM_F_REQUEST`) and collects the kernel's answer:
    /// the messages of a dump (`NLM_F_DUMP`), or nothing once the acknowledgement
    /// (`NLM_F_ACK`) arrives. A kernel error is returned as the matching OS error.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        request.header.sequence_number = sequence;
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answer = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map_err(invalid_data)?
                    .length() as usize;
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                    .map_err(invalid_data)?;
                offset += len.next_multiple_of(4);
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => answer.push(inner),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    // The acknowledgement of a request that is not a dump.
                    NetlinkPayload::Error(_) if !dump => return Ok(answer),
                    NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::Overrun(_) => {
                        return Err(std::io::Error::other("netlink overrun"))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Dumps what `query` asks for (`what` names it in an error) and keeps what `pick` takes
    /// of each message, in the kernel's order.
    fn dump<T>(
        &mut self,
        query: RouteNetlinkMessage,
        what: &str,
        pick: impl Fn(&RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        let messages = self
            .request(query, NLM_F_DUMP)
            .with_context(|| format!("listing the {what}"))?;
        Ok(messages.iter().filter_map(pick).collect())
    }

    /// The namespace's links (`ip link show`).
    pub fn links(&mut self) -> Result<Vec<Link>> {
        self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "links (RTM_GETLINK)",
            |m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            },
        )
    }

    /// The namespace's addresses (`ip addr show`), in the kernel's order.
    pub fn addresses(&mut self) -> Result<Vec<Address>> {
        self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "addresses (RTM_GETADDR)",
            |m| match m {
                RouteNetlinkMessage::NewAddress(address) => address_of(address),
                _ => None,
            },
        )
    }

    /// The main table's unicast routes of a family (`ip -4 route show`, or `-6`), in the
    /// kernel's order.
    pub fn routes(&mut self, ipv6: bool) -> Result<Vec<Route>> {
        let mut query = RouteMessage::default();
        query.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        self.dump(
            RouteNetlinkMessage::GetRoute(query),
            "routes (RTM_GETROUTE)",
            |m| match m {
                RouteNetlinkMessage::NewRoute(route) => route_of(route),
                _ => None,
            },
        )
    }

    /// `ip link set dev INDEX mtu MTU up`.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        link.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
            .with_context(|| format!("setting link {index}'s MTU to {mtu} and up (RTM_SETLINK)"))?;
        Ok(())
    }

    /// `tc qdisc replace dev INDEX ingress`.
    pub fn replace_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .with_context(|| format!("adding link {index}'s ingress qdisc (RTM_NEWQDISC)"))?;
        Ok(())
    }

    /// Whether link `index` has an ingress qdisc (`tc qdisc show dev INDEX`).
    pub fn has_ingress_qdisc(&mut self, index: u32) -> Result<bool> {
        let ingress = self.dump(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            "qdiscs (RTM_GETQDISC)",
            |m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q)
                    if q.header.index == index as i32
                        && q.attributes.contains(&TcAttribute::Kind("ingress".into())) =>
                {
                    Some(())
                }
                _ => None,
            },
        )?;
        Ok(!ingress.is_empty())
    }

    /// `tc qdisc del dev INDEX ingress` (its filters go with it).
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            NLM_F_ACK,
        )
        .with_context(|| format!("removing link {index}'s ingress qdisc (RTM_DELQDISC)"))?;
        Ok(())
    }

    /// `tc filter del dev INDEX parent ffff:`: every filter of the ingress qdisc.
    pub fn delete_ingress_filters(&mut self, index: u32) -> Result<()> {
        let mut filter = TcMessage::with_index(index as i32);
        filter.header.parent = TcHandle::from(INGRESS_HANDLE);
        self.request(RouteNetlinkMessage::DelTrafficFilter(filter), NLM_F_ACK)
            .with_context(|| format!("removing link {index}'s ingress filters (RTM_DELTFILTER)"))?;
        Ok(())
    }

    /// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action mirred egress
    /// redirect dev TO`: every frame arriving on `from` leaves through `to`.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to)),
            NLM_F_ACK | NLM_F_CREATE,
        )
        .with_context(|| {
            format!("redirecting link {from}'s ingress to link {to} (RTM_NEWTFILTER)")
        })?;
        Ok(())
    }
}

fn invalid_data(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("malformed netlink message: {e}"),
    )
}

fn link_of(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        ether: message.header.link_layer_type == LinkLayerType::Ether,
        mac: None,
        mtu: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(mac) => {
                link.mac = Some(
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                )
            }
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            _ => {}
        }
    }
    link
}

/// An address as `ip` shows it: the local address (`IFA_LOCAL`) where there is one (IPv4;
/// on a point-to-point link `IFA_ADDRESS` is the peer's), else `IFA_ADDRESS` (IPv6).
fn address_of(message: &AddressMessage) -> Option<Address> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(Address {
        index: message.header.index,
        ip: local.or(address)?,
        prefix_len: message.header.prefix_len,
        global: message.header.scope == AddressScope::Universe,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// `route` if it is a unicast route of the main table of IPv4 or IPv6 (a route with several
/// next hops is not one husk carries: `None` too).
fn route_of(route: &RouteMessage) -> Option<Route> {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    if route.header.kind != RouteType::Unicast || table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut found = Route {
        dst: match route.header.address_family {
            AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => return None,
        },
        prefix_len: route.header.destination_prefix_length,
        gateway: None,
        oif: None,
        kernel: route.header.protocol == RouteProtocol::Kernel,
        metric: 0,
    };
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(dst) => found.dst = ip_of(dst)?,
            RouteAttribute::Gateway(gateway) => found.gateway = Some(ip_of(gateway)?),
            RouteAttribute::Oif(index) => found.oif = Some(*index),
            RouteAttribute::Priority(metric) => found.metric = *metric,
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    Some(found)
}

/// The ingress qdisc of link `index`: handle `ffff:`, parent `ffff:fff1`.
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut qdisc = TcMessage::with_index(index as i32);
    qdisc.header.parent = TcHandle::INGRESS;
    qdisc.header.handle = TcHandle::from(INGRESS_HANDLE);
    qdisc.attributes.push(TcAttribute::Kind("ingress".into()));
    qdisc
}

/// The filter of [`Netlink::redirect_ingress`]: a `u32` selector with one key that matches
/// every frame (mask 0), terminal, whose one action is `mirred` egress redirect (stolen: the
/// frame goes nowhere else).
fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut filter = TcMessage::with_index(from as i32);
    filter.header.parent = TcHandle::from(INGRESS_HANDLE);
    // Priority 0 (the kernel picks one) and `protocol all`.
    filter.header.info = u32::from(PROTOCOL_ALL);
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    filter
        .attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
    filter.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
        TcOption::U32(TcFilterU32Option::Selector(selector)),
    ]));
    filter
}

/// Whether `e` (from a [`Netlink`] request) is the kernel's "there is no such thing" answer
/// (`ENOENT`, or `EINVAL` for a filter list of a qdisc that is not there).
pub fn is_absent(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOENT || code == libc::EINVAL)
    })
}

/// The link named `name` in `links`, or an error naming it.
pub fn find<'a>(links: &'a [Link], name: &str) -> Result<&'a Link> {
    match links.iter().find(|l| l.name == name) {
        Some(link) => Ok(link),
        None => bail!("no link named {name} in the network namespace"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The body of the message `tc filter add dev va parent ffff: protocol all u32 match u8 0 0
    /// action mirred egress redirect dev vb` sends (iproute2 6.1, `va` link 3, `vb` link 2;
    /// captured with `strace -e write=all`).
    const TC_REDIRECT_3_TO_2: [u8; 0x7c] = [
        0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff,
        0xff, 0x00, 0x03, 0x00, 0x00, 0x08, 0x00, 0x01, 0x00, 0x75, 0x33, 0x32, 0x00, 0x60, 0x00,
        0x02, 0x00, 0x38, 0x00, 0x07, 0x00, 0x34, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x01, 0x00, 0x6d,
        0x69, 0x72, 0x72, 0x65, 0x64, 0x00, 0x00, 0x24, 0x00, 0x02, 0x80, 0x20, 0x00, 0x02, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x24, 0x00,
        0x05, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn the_redirect_filter_is_the_one_tc_makes() {
        let filter = redirect_filter(3, 2);
        let mut bytes = vec![0; filter.buffer_len()];
        filter.emit(&mut bytes);
        assert_eq!(bytes, TC_REDIRECT_3_TO_2);
    }

    #[test]
    fn an_address_is_the_local_one_where_there_is_one() {
        let mut message = AddressMessage::default();
        message.header.index = 3;
        message.header.prefix_len = 24;
        message.header.scope = AddressScope::Universe;
        // A point-to-point IPv4 address: IFA_ADDRESS is the peer's.
        message.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))),
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
        ];
        assert_eq!(
            address_of(&message),
            Some(Address {
                index: 3,
                ip: "10.0.0.2".parse().expect("ip"),
                prefix_len: 24,
                global: true,
            })
        );
        message.header.scope = AddressScope::Link;
        message.attributes = vec![AddressAttribute::Address(IpAddr::V6(Ipv6Addr::new(
            0xfe80, 0, 0, 0, 0, 0, 0, 1,
        )))];
        let link_local = address_of(&message).expect("address");
        assert_eq!(link_local.ip, "fe80::1".parse::<IpAddr>().expect("ip"));
        assert!(!link_local.global);
        message.attributes.clear();
        assert_eq!(address_of(&message), None);
    }

    #[test]
    fn main_table_unicast_routes_are_read_whole() {
        let route = |prefix: u8, table: u8, kind: RouteType| {
            let mut route = RouteMessage::default();
            route.header.address_family = AddressFamily::Inet;
            route.header.destination_prefix_length = prefix;
            route.header.table = table;
            route.header.kind = kind;
            route.header.protocol = RouteProtocol::Boot;
            route.attributes = vec![
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 88, 0, 1))),
                RouteAttribute::Oif(3),
            ];
            route
        };
        let main = RouteHeader::RT_TABLE_MAIN;
        let default = Route {
            dst: "0.0.0.0".parse().expect("ip"),
            prefix_len: 0,
            gateway: Some("10.88.0.1".parse().expect("ip")),
            oif: Some(3),
            kernel: false,
            metric: 0,
        };
        assert_eq!(
            route_of(&route(0, main, RouteType::Unicast)),
            Some(default.clone())
        );
        // netavark's way with a second network: default routes told apart by their metric.
        let mut second = route(0, main, RouteType::Unicast);
        second.attributes.push(RouteAttribute::Priority(101));
        assert_eq!(
            route_of(&second),
            Some(Route {
                metric: 101,
                ..default.clone()
            })
        );
        assert_eq!(route_of(&route(0, 255, RouteType::Unicast)), None);
        assert_eq!(route_of(&route(0, main, RouteType::Local)), None);
        // A table id above 255 is given as an attribute.
        let mut other = route(0, main, RouteType::Unicast);
        other.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(route_of(&other), None);
        // A link route the kernel made for an address: destination, no gateway.
        let mut link = route(16, main, RouteType::Unicast);
        link.header.protocol = RouteProtocol::Kernel;
        link.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 88, 0, 0))),
            RouteAttribute::Oif(3),
        ];
        assert_eq!(
            route_of(&link),
            Some(Route {
                dst: "10.88.0.0".parse().expect("ip"),
                prefix_len: 16,
                gateway: None,
                oif: Some(3),
                kernel: true,
                metric: 0,
            })
        );
        // IPv6.
        let mut v6 = RouteMessage::default();
        v6.header.address_family = AddressFamily::Inet6;
        v6.header.table = main;
        v6.header.kind = RouteType::Unicast;
        v6.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet6(Ipv6Addr::new(
            0xfe80, 0, 0, 0, 0, 0, 0, 1,
        )))];
        let v6 = route_of(&v6).expect("route");
        assert_eq!(v6.dst, "::".parse::<IpAddr>().expect("ip"));
        assert_eq!(v6.gateway, Some("fe80::1".parse().expect("ip")));
    }
}
