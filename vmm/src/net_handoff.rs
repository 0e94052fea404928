//! The network card handed to a VMM that is already running, before it builds the microVM.
//!
//! docker configures a container's network in a prestart hook: the runtime makes a new network
//! namespace, and the hook (libnetwork's `setkey`) moves a veth into the namespace of the
//! container's pid and gives it its address. For husk that pid is `husk-vmm`, so the runtime
//! starts `husk-vmm` in a new network namespace with `--net-from-fd`, runs the hooks, carries
//! whatever interface they made into a TAP, and only then tells the waiting VMM its card: one
//! message on an inherited Unix socket, text plus the TAP as an `SCM_RIGHTS` descriptor.
//!
//! The message is `none`, or the cards separated by ` ; ` (at most
//! [`crate::config::MAX_NET_CARDS`]), each `mac=<aa:bb:cc:dd:ee:ff>` followed by optional
//! `mtu=<n>`, `ip=<a.b.c.d/n>`, `gateway=<a.b.c.d>`, `ip6=<addr/n>` and `gateway6=<addr>`, and
//! any number (up to [`crate::config::MAX_NET_ROUTES`]) of
//! `route=<destination/prefix[,gateway][,metric=n]>` and (up to
//! [`crate::config::MAX_NET_ADDRESSES`]) of `addr=<address/prefix>` (further addresses, either
//! family), separated by spaces. The TAPs come as `SCM_RIGHTS` descriptors, one per card in
//! the cards' order. The VMM waits a bounded time, reads at most [`MAX_MESSAGE`] bytes, takes
//! exactly one descriptor per card and none with `none`, and refuses anything else by name.
//! `husk-vmm --net-card` takes one card in the same words, with its TAP as `tap=<fd>`.

use crate::config::{
    parse_cidr, parse_ipv4_cidr, parse_ipv6_cidr, parse_mac, parse_mtu, parse_route, NetConfig,
    MAX_NET_ADDRESSES, MAX_NET_CARDS, MAX_NET_ROUTES,
};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The longest message accepted: every card with every route it may have, each IPv6 with a
/// gateway, fits.
pub const MAX_MESSAGE: usize = 4096 * MAX_NET_CARDS;

/// What separates the cards of a message.
pub const CARD_SEPARATOR: &str = " ; ";

/// Errors of the handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("waiting for the network card: {0}")]
    Io(#[from] nix::Error),
    #[error("the runtime did not hand over the network cards within {0:?}")]
    Timeout(Duration),
    #[error("the runtime closed the network socket without handing over its cards")]
    Closed,
    #[error("bad network cards message {message:?}: {problem}")]
    Bad { message: String, problem: String },
}

/// The text of the message for a card with `mac` and `mtu`, an address with its prefix
/// length and a default gateway of each family (`10.0.0.2/24`, `fd00::2/64`) where there are
/// some, its other routes and its further addresses.
pub fn message(
    mac: &str,
    mtu: Option<u16>,
    ipv4: Option<(&str, Option<&str>)>,
    ipv6: Option<(&str, Option<&str>)>,
    routes: &[String],
    addresses: &[String],
) -> String {
    let mut text = format!("mac={mac}");
    if let Some(mtu) = mtu {
        text.push_str(&format!(" mtu={mtu}"));
    }
    for (addr, suffix) in [(ipv4, ""), (ipv6, "6")] {
        if let Some((ip, gateway)) = addr {
            text.push_str(&format!(" ip{suffix}={ip}"));
            if let Some(gw) = gateway {
                text.push_str(&format!(" gateway{suffix}={gw}"));
            }
        }
    }
    for route in routes {
        text.push_str(&format!(" route={route}"));
    }
    for address in addresses {
        text.push_str(&format!(" addr={address}"));
    }
    text
}

/// Sends `text` on `socket`, with `taps` as its descriptors (`none` has none).
pub fn send(socket: BorrowedFd<'_>, text: &str, taps: &[BorrowedFd<'_>]) -> nix::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let fds: Vec<RawFd> = taps.iter().map(|t| t.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = match fds.is_empty() {
        true => Vec::new(),
        false => vec![ControlMessage::ScmRights(&fds)],
    };
    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Parses one card's words (see the module docs); `tap=<fd>` only where `with_tap`, and then
/// it must be there. Without it the card's `tap_fd` is -1.
pub fn parse_card(text: &str, with_tap: bool) -> Result<NetConfig, String> {
    let (mut mac, mut mtu, mut ipv4, mut gateway) = (None, None, None, None);
    let mut routes = Vec::new();
    let mut addresses = Vec::new();
    let (mut ipv6, mut gateway6) = (None, None);
    let mut tap = None;
    for field in text.split(' ').filter(|f| !f.is_empty()) {
        match field.split_once('=') {
            Some(("tap", v)) if with_tap && tap.is_none() => {
                tap = Some(
                    v.parse::<i32>()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| format!("{v:?} is not a file descriptor"))?,
                )
            }
            Some(("mac", v)) if mac.is_none() => mac = Some(parse_mac(v)?),
            Some(("mtu", v)) if mtu.is_none() => mtu = Some(parse_mtu(v)?),
            Some(("route", v)) if routes.len() < MAX_NET_ROUTES => routes.push(parse_route(v)?),
            Some(("route", _)) => return Err(format!("more than {MAX_NET_ROUTES} routes")),
            Some(("addr", v)) if addresses.len() < MAX_NET_ADDRESSES => {
                addresses.push(parse_cidr(v)?)
            }
            Some(("addr", _)) => {
                return Err(format!("more than {MAX_NET_ADDRESSES} further addresses"))
            }
            Some(("ip", v)) if ipv4.is_none() => ipv4 = Some(parse_ipv4_cidr(v)?),
            Some(("gateway", v)) if gateway.is_none() => {
                gateway = Some(
                    v.parse::<std::net::Ipv4Addr>()
                        .map_err(|_| format!("{v:?} is not an IPv4 address"))?,
                )
            }
            Some(("ip6", v)) if ipv6.is_none() => ipv6 = Some(parse_ipv6_cidr(v)?),
            Some(("gateway6", v)) if gateway6.is_none() => {
                gateway6 = Some(
                    v.parse::<std::net::Ipv6Addr>()
                        .map_err(|_| format!("{v:?} is not an IPv6 address"))?,
                )
            }
            _ => return Err(format!("unexpected field {field:?}")),
        }
    }
    let mac = mac.ok_or("no mac=")?;
    if gateway.is_some() && ipv4.is_none() {
        return Err("gateway= without ip=".into());
    }
    if gateway6.is_some() && ipv6.is_none() {
        return Err("gateway6= without ip6=".into());
    }
    let tap_fd = match (with_tap, tap) {
        (true, Some(fd)) => fd,
        (true, None) => return Err("no tap=".into()),
        (false, _) => -1,
    };
    Ok(NetConfig {
        tap_fd,
        mac,
        ipv4,
        gateway,
        ipv6,
        gateway6,
        mtu,
        routes,
        addresses,
    })
}

/// Parses a message and the descriptors that came with it into the cards (none for `none`),
/// each with its TAP. Every descriptor is owned here: those not taken are closed on return.
pub fn parse(text: &str, fds: Vec<OwnedFd>) -> Result<Vec<(NetConfig, OwnedFd)>, String> {
    let text = text.trim();
    if text == "none" {
        return match fds.is_empty() {
            true => Ok(Vec::new()),
            false => Err("`none` came with a descriptor".into()),
        };
    }
    let cards: Vec<&str> = text.split(CARD_SEPARATOR.trim()).map(str::trim).collect();
    if cards.len() > MAX_NET_CARDS {
        return Err(format!("{} cards, at most {MAX_NET_CARDS}", cards.len()));
    }
    let cards = cards
        .into_iter()
        .map(|card| parse_card(card, false))
        .collect::<Result<Vec<_>, _>>()?;
    if fds.len() != cards.len() {
        return Err(format!(
            "{} descriptors for {} cards, not a TAP each",
            fds.len(),
            cards.len()
        ));
    }
    Ok(cards
        .into_iter()
        .zip(fds)
        .map(|(card, tap)| {
            (
                NetConfig {
                    tap_fd: tap.as_raw_fd(),
                    ..card
                },
                tap,
            )
        })
        .collect())
}

/// Waits up to `timeout` on `socket` for the message, and returns the cards (their TAP
/// descriptors owned by the caller from here on), none for `none`.
pub fn receive(socket: RawFd, timeout: Duration) -> Result<Vec<NetConfig>, HandoffError> {
    // SAFETY: `socket` is the inherited descriptor the command line named; it is borrowed for
    // the poll only.
    let borrowed = unsafe { BorrowedFd::borrow_raw(socket) };
    let mut pfd = [nix::poll::PollFd::new(
        borrowed,
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(HandoffError::Timeout(timeout));
        }
        let wait = u16::try_from(left.as_millis()).unwrap_or(ms).min(ms);
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(wait)) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    // Room for one descriptor more than the most cards: too many is seen, and refused.
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_NET_CARDS + 1]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: SCM_RIGHTS gave this process these new descriptors; nothing else
                // owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 && fds.is_empty() {
        return Err(HandoffError::Closed);
    }
    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
    match parse(&text, fds) {
        Ok(cards) => Ok(cards
            .into_iter()
            .map(|(cfg, tap)| {
                // The builder takes the descriptor over by number.
                std::mem::forget(tap);
                cfg
            })
            .collect()),
        Err(problem) => Err(HandoffError::Bad {
            message: text,
            problem,
        }),
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn file_fd() -> OwnedFd {
        OwnedFd::from(tempfile::tempfile().unwrap())
    }

    #[test]
    fn messages_parse_into_the_card() {
        let text = message(
            "6e:f8:3a:b4:8c:90",
            Some(1450),
            Some(("172.17.0.2/16", Some("172.17.0.1"))),
            Some(("fd00::2/64", Some("fd00::1"))),
            &[
                "10.9.0.0/16,172.17.0.9".to_string(),
                "172.17.0.9/32".to_string(),
            ],
            &["172.18.0.2/16".to_string(), "fd00::3/64".to_string()],
        );
        assert_eq!(
            text,
            "mac=6e:f8:3a:b4:8c:90 mtu=1450 ip=172.17.0.2/16 gateway=172.17.0.1 ip6=fd00::2/64 \
             gateway6=fd00::1 route=10.9.0.0/16,172.17.0.9 route=172.17.0.9/32 \
             addr=172.18.0.2/16 addr=fd00::3/64"
        );
        let mut cards = parse(&text, vec![file_fd()]).unwrap();
        assert_eq!(cards.len(), 1);
        let (cfg, _tap) = cards.remove(0);
        assert_eq!(cfg.mac, [0x6e, 0xf8, 0x3a, 0xb4, 0x8c, 0x90]);
        assert_eq!(cfg.ipv4, Some(("172.17.0.2".parse().unwrap(), 16)));
        assert_eq!(cfg.gateway, Some("172.17.0.1".parse().unwrap()));
        assert_eq!(cfg.ipv6, Some(("fd00::2".parse().unwrap(), 64)));
        assert_eq!(cfg.gateway6, Some("fd00::1".parse().unwrap()));
        assert_eq!(cfg.mtu, Some(1450));
        assert_eq!(
            cfg.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["10.9.0.0/16,172.17.0.9", "172.17.0.9/32"]
        );
        assert_eq!(
            cfg.addresses,
            [
                ("172.18.0.2".parse().unwrap(), 16),
                ("fd00::3".parse().unwrap(), 64)
            ]
        );
        let (cfg, _tap) = parse("mac=6e:f8:3a:b4:8c:90", vec![file_fd()])
            .unwrap()
            .remove(0);
        assert_eq!(cfg.mtu, None);
        assert!(parse("none", vec![]).unwrap().is_empty());
        // Two cards, a TAP each, in order.
        let text = format!(
            "{}{CARD_SEPARATOR}{}",
            message(
                "6e:f8:3a:b4:8c:90",
                None,
                Some(("10.0.0.2/24", None)),
                None,
                &[],
                &[]
            ),
            message(
                "6e:f8:3a:b4:8c:91",
                Some(9000),
                Some(("10.1.0.2/24", Some("10.1.0.1"))),
                None,
                &["0.0.0.0/0,10.1.0.1,metric=101".to_string()],
                &[]
            )
        );
        let (first, second) = (file_fd(), file_fd());
        let (first_fd, second_fd) = (first.as_raw_fd(), second.as_raw_fd());
        let cards = parse(&text, vec![first, second]).unwrap();
        assert_eq!(cards.len(), 2);
        assert_eq!((cards[0].0.mac[5], cards[0].0.tap_fd), (0x90, first_fd));
        assert_eq!((cards[1].0.mac[5], cards[1].0.tap_fd), (0x91, second_fd));
        assert_eq!(cards[1].0.mtu, Some(9000));
        assert_eq!(cards[1].0.routes[0].metric, 101);
        // `husk-vmm --net-card`: the same words, with the TAP by number.
        let card = parse_card("tap=7 mac=6e:f8:3a:b4:8c:90 ip=10.0.0.2/24", true).unwrap();
        assert_eq!((card.tap_fd, card.ipv4.unwrap().1), (7, 24));
    }

    #[test]
    fn bad_messages_are_refused_by_name() {
        for (text, fds, problem) in [
            ("none", 1, "`none` came with a descriptor"),
            ("mac=6e:f8:3a:b4:8c:90", 0, "0 descriptors for 1 cards"),
            ("mac=6e:f8:3a:b4:8c:90", 2, "2 descriptors for 1 cards"),
            (
                "mac=6e:f8:3a:b4:8c:90 ; mac=6e:f8:3a:b4:8c:91",
                1,
                "1 descriptors for 2 cards",
            ),
            ("mac=6e:f8:3a:b4:8c:90 ; ", 2, "no mac="),
            (
                "mac=6e:f8:3a:b4:8c:90 ; mac=6e:f8:3a:b4:8c:91 ; mac=6e:f8:3a:b4:8c:92 ; \
                 mac=6e:f8:3a:b4:8c:93 ; mac=6e:f8:3a:b4:8c:94",
                5,
                "5 cards, at most 4",
            ),
            ("tap=3 mac=6e:f8:3a:b4:8c:90", 1, "unexpected field"),
            ("ip=10.0.0.2/24", 1, "no mac="),
            ("mac=zz", 1, "not a MAC address"),
            (
                "mac=6e:f8:3a:b4:8c:90 gateway=10.0.0.1",
                1,
                "gateway= without ip=",
            ),
            (
                "mac=6e:f8:3a:b4:8c:90 mac=6e:f8:3a:b4:8c:90",
                1,
                "unexpected field",
            ),
            ("mac=6e:f8:3a:b4:8c:90 dns=1.1.1.1", 1, "unexpected field"),
            ("mac=6e:f8:3a:b4:8c:90 ip=10.0.0.2/40", 1, "prefix length"),
            (
                "mac=6e:f8:3a:b4:8c:90 gateway6=fd00::1",
                1,
                "gateway6= without ip6=",
            ),
            ("mac=6e:f8:3a:b4:8c:90 ip6=fd00::1/200", 1, "prefix length"),
            ("mac=6e:f8:3a:b4:8c:90 mtu=20", 1, "not an MTU"),
            (
                "mac=6e:f8:3a:b4:8c:90 route=10.0.0.0/8,fd00::1",
                1,
                "not a route",
            ),
            (
                "mac=6e:f8:3a:b4:8c:90 mtu=1500 mtu=1500",
                1,
                "unexpected field",
            ),
            ("mac=6e:f8:3a:b4:8c:90 addr=10.0.0.3", 1, "prefix length"),
            (
                "mac=6e:f8:3a:b4:8c:90 addr=1.0.0.1/8 addr=1.0.0.2/8 addr=1.0.0.3/8 \
                 addr=1.0.0.4/8 addr=1.0.0.5/8 addr=1.0.0.6/8 addr=1.0.0.7/8 addr=1.0.0.8/8 \
                 addr=1.0.0.9/8",
                1,
                "more than 8 further addresses",
            ),
        ] {
            let fds = (0..fds).map(|_| file_fd()).collect();
            let err = parse(text, fds).unwrap_err();
            assert!(err.contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn a_card_crosses_a_socket_with_its_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let tap = file_fd();
        let text = message(
            "6e:f8:3a:b4:8c:90",
            None,
            Some(("10.0.0.2/24", None)),
            None,
            &[],
            &[],
        );
        send(a.as_fd(), &text, &[tap.as_fd()]).unwrap();
        let cards = receive(b.as_raw_fd(), Duration::from_secs(5)).unwrap();
        assert_eq!(cards.len(), 1);
        assert_ne!(cards[0].tap_fd, tap.as_raw_fd(), "a descriptor of its own");
        // SAFETY: the descriptor `receive` handed over, closed here once.
        drop(unsafe { OwnedFd::from_raw_fd(cards[0].tap_fd) });
        let two = format!("{text}{CARD_SEPARATOR}{text}");
        let other = file_fd();
        send(a.as_fd(), &two, &[tap.as_fd(), other.as_fd()]).unwrap();
        let cards = receive(b.as_raw_fd(), Duration::from_secs(5)).unwrap();
        assert_eq!(cards.len(), 2);
        for card in cards {
            // SAFETY: as above.
            drop(unsafe { OwnedFd::from_raw_fd(card.tap_fd) });
        }
        send(a.as_fd(), "none", &[]).unwrap();
        assert!(receive(b.as_raw_fd(), Duration::from_secs(5))
            .unwrap()
            .is_empty());
        drop(a);
        assert!(matches!(
            receive(b.as_raw_fd(), Duration::from_secs(5)),
            Err(HandoffError::Closed)
        ));
        let (_a, b) = UnixStream::pair().unwrap();
        assert!(matches!(
            receive(b.as_raw_fd(), Duration::from_millis(50)),
            Err(HandoffError::Timeout(_))
        ));
    }
}
