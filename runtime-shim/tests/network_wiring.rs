//! husk's network wiring in a real network namespace, without a VM: a namespace made as CNI
//! makes one (a veth end with IPv4 and IPv6 addresses and default routes), wired to a TAP over
//! rtnetlink and released again. What husk reads must be what `ip` shows, what it sets up must
//! be what `tc` shows for the redirect, and the namespace must be exactly as it was afterwards.
//! Needs root (namespaces, `/dev/net/tun`); iproute2 only prepares and inspects.

#[path = "../../tests/src/skip.rs"]
mod skip;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Runs `ip`/`tc` with `args`, returning stdout; panics with stderr on failure.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("husk-wiring-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
    fn ip(&self, args: &[&str]) -> String {
        run("ip", &[&["-n", &self.0], args].concat())
    }
    fn tc(&self, args: &[&str]) -> String {
        run("ip", &[&["netns", "exec", &self.0, "tc"], args].concat())
    }
    /// Everything the wiring may touch: links in detail, addresses, routes, qdiscs, filters.
    fn snapshot(&self) -> String {
        let mut all = self.ip(&["-d", "link", "show"]);
        all += &self.ip(&["addr", "show"]);
        all += &self.ip(&["route", "show"]);
        all += &self.ip(&["-6", "route", "show"]);
        all += &self.tc(&["qdisc", "show"]);
        all += &self.tc(&["filter", "show", "dev", "eth0", "ingress"]);
        if self.ip(&["link", "show"]).contains(" net1@") {
            all += &self.tc(&["filter", "show", "dev", "net1", "ingress"]);
        }
        all
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A namespace as CNI's bridge plugin leaves it: `eth0` (a veth whose peer is in a second
/// namespace, the "host" side), up, with an IPv4 and a global IPv6 address and both default
/// routes. Both namespaces go when the pair is dropped.
fn cni_like(tag: &str) -> (Netns, Netns) {
    let ns = Netns::new(tag);
    let host = Netns::new(&format!("{tag}-host"));
    ns.ip(&[
        "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "peer0", "netns",
        &host.0,
    ]);
    ns.ip(&["link", "set", "eth0", "address", "6e:f8:3a:b4:8c:90"]);
    ns.ip(&["addr", "add", "10.88.77.2/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "fd00:88::5/64", "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    host.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.88.77.1"]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:88::1",
        "dev",
        "eth0",
    ]);
    ns.ip(&["route", "add", "192.168.7.0/24", "via", "10.88.77.1"]);
    (ns, host)
}

#[test]
fn a_cni_namespace_is_wired_to_a_tap_and_left_as_it_was() {
    if !skip::have_root("network namespaces and /dev/net/tun") {
        return;
    }
    let (ns, _host) = cni_like("wire");
    let before = ns.snapshot();
    let state = tempfile::tempdir().expect("state dir");

    let started = Instant::now();
    let mut cards = husk::network::prepare(&ns.path()).expect("wiring");
    eprintln!("wired in {:?}", started.elapsed());
    assert_eq!(cards.len(), 1, "one interface to carry");
    husk::network::record(state.path(), &ns.path(), &cards).expect("record");
    let net = cards.remove(0);
    assert_eq!(net.interface, "eth0");
    assert_eq!(net.mac, "6e:f8:3a:b4:8c:90");
    assert_eq!(net.mtu, 1450);
    assert_eq!(net.ipv4.as_deref(), Some("10.88.77.2/24"));
    assert_eq!(net.gateway.as_deref(), Some("10.88.77.1"));
    assert_eq!(net.ipv6.as_deref(), Some("fd00:88::5/64"));
    assert_eq!(net.gateway6.as_deref(), Some("fd00:88::1"));
    // Besides the default routes and those the kernel made from the addresses: one route.
    assert_eq!(net.routes, ["192.168.7.0/24,10.88.77.1"]);

    // The TAP is up with the interface's MTU; each side's ingress goes to the other.
    let tap = ns.ip(&["link", "show", &husk::network::tap_name(0)]);
    assert!(tap.contains("mtu 1450"), "{tap}");
    assert!(tap.contains(",UP"), "{tap}");
    for (from, to) in [("eth0", "husk0"), ("husk0", "eth0")] {
        let filters = ns.tc(&["filter", "show", "dev", from, "ingress"]);
        assert_eq!(
            filters.matches("mirred").count(),
            1,
            "one redirect on {from}: {filters}"
        );
        assert!(
            filters.contains(&format!("Egress Redirect to device {to}")),
            "{from} redirects to {to}: {filters}"
        );
    }

    // A second VM for the same namespace is refused, naming the namespace.
    let second = husk::network::prepare(&ns.path()).expect_err("a second wiring");
    assert!(
        format!("{second:#}").contains("already has a husk0"),
        "{second:#}"
    );

    // The TAP goes with its descriptor (the VMM's end), the qdiscs with the release.
    drop(net);
    husk::network::release_recorded(state.path()).expect("release");
    assert_eq!(ns.snapshot(), before, "the namespace is as it was");
}

#[test]
fn a_leftover_qdisc_of_a_killed_vm_is_replaced_not_doubled() {
    if !skip::have_root("network namespaces and /dev/net/tun") {
        return;
    }
    let (ns, _host) = cni_like("left");
    let before = ns.snapshot();
    // What a VMM killed with `kill -9` before `delete` leaves: its TAP is gone with it, the
    // ingress qdisc and its redirect stay on eth0.
    let net = husk::network::prepare(&ns.path()).expect("wiring");
    assert_eq!(net.len(), 1);
    drop(net);
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.contains("mirred"), "{filters}");

    let state = tempfile::tempdir().expect("state dir");
    let net = husk::network::prepare(&ns.path()).expect("wiring again");
    assert_eq!(net.len(), 1);
    husk::network::record(state.path(), &ns.path(), &net).expect("record");
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert_eq!(filters.matches("mirred").count(), 1, "{filters}");
    drop(net);
    husk::network::release_recorded(state.path()).expect("release");
    assert_eq!(ns.snapshot(), before);
}

#[test]
fn a_namespace_without_an_ethernet_interface_has_nothing_to_carry() {
    if !skip::have_root("network namespaces") {
        return;
    }
    let ns = Netns::new("none");
    let before = ns.snapshot_lo();
    assert!(husk::network::prepare(&ns.path())
        .expect("nothing to wire")
        .is_empty());
    assert_eq!(ns.snapshot_lo(), before);
    let missing = PathBuf::from("/run/netns/husk-wiring-no-such-namespace");
    let err = husk::network::prepare(&missing).expect_err("no namespace");
    assert!(
        format!("{err:#}").contains("husk-wiring-no-such-namespace"),
        "the error names the path: {err:#}"
    );
}

impl Netns {
    fn snapshot_lo(&self) -> String {
        self.ip(&["-d", "link", "show"]) + &self.tc(&["qdisc", "show"])
    }
}

#[test]
fn every_interface_of_a_namespace_gets_a_tap_of_its_own() {
    if !skip::have_root("network namespaces and /dev/net/tun") {
        return;
    }
    // A second network, as podman's netavark adds one: `net1`, its default route told apart
    // from eth0's by a metric.
    let (ns, host) = cni_like("two");
    ns.ip(&[
        "link", "add", "net1", "mtu", "9000", "type", "veth", "peer", "name", "peer1", "netns",
        &host.0,
    ]);
    ns.ip(&["addr", "add", "10.89.0.2/24", "dev", "net1"]);
    ns.ip(&["link", "set", "net1", "up"]);
    host.ip(&["link", "set", "peer1", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.89.0.1",
        "dev",
        "net1",
        "metric",
        "101",
    ]);
    let before = ns.snapshot();
    let state = tempfile::tempdir().expect("state dir");

    let cards = husk::network::prepare(&ns.path()).expect("wiring");
    husk::network::record(state.path(), &ns.path(), &cards).expect("record");
    assert_eq!(
        cards
            .iter()
            .map(|c| (c.interface.as_str(), c.mtu))
            .collect::<Vec<_>>(),
        [("eth0", 1450), ("net1", 9000)]
    );
    assert_eq!(cards[0].gateway.as_deref(), Some("10.88.77.1"));
    assert_eq!(cards[1].ipv4.as_deref(), Some("10.89.0.2/24"));
    assert_eq!(cards[1].gateway, None);
    assert_eq!(cards[1].routes, ["0.0.0.0/0,10.89.0.1,metric=101"]);
    for (interface, tap, mtu) in [("eth0", "husk0", "1450"), ("net1", "husk1", "9000")] {
        let link = ns.ip(&["link", "show", tap]);
        assert!(link.contains(&format!("mtu {mtu}")), "{link}");
        for (from, to) in [(interface, tap), (tap, interface)] {
            let filters = ns.tc(&["filter", "show", "dev", from, "ingress"]);
            assert!(
                filters.contains(&format!("Egress Redirect to device {to}")),
                "{from} redirects to {to}: {filters}"
            );
        }
    }
    let second = husk::network::prepare(&ns.path()).expect_err("a second wiring");
    assert!(
        format!("{second:#}").contains("already has a husk"),
        "{second:#}"
    );
    drop(cards);
    husk::network::release_recorded(state.path()).expect("release");
    assert_eq!(ns.snapshot(), before, "the namespace is as it was");
}
