//! Networks from the engines, end to end: a container whose spec names a network namespace
//! (as podman's does, with the namespace CNI prepared) gets that namespace's interfaces in its
//! microVM, same addresses (IPv4 and IPv6), routes and MACs, and is reached and reaches out through it;
//! whatever husk wired in the namespace goes with the container on every path (delete, a
//! failed create, `kill -9` of the VMM), leaving the namespace exactly as the engine made it;
//! and podman's own bridge network with `-p` publishes a port of a husk container, and so does
//! docker's (whose network a prestart hook configures).

use husk_tests::oci::{client_available, logs_under, Dockerd, OciEnv};
use husk_tests::{http_get, wait_until};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a host command that must succeed; returns its stdout.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A network namespace as an engine leaves it for the runtime: a veth end named `eth0` with
/// an address and a default route, its peer on the host; MTU 1400, as an overlay network's
/// (VXLAN) is below Ethernet's 1500.
struct TestNetns {
    name: String,
    host_if: String,
    host_ip: String,
    guest_ip: String,
    host_ip6: String,
    guest_ip6: String,
}

impl TestNetns {
    fn new(name: &str, subnet: u8) -> TestNetns {
        let ns = TestNetns {
            name: name.to_string(),
            host_if: format!("hv-{name}"),
            host_ip: format!("10.201.{subnet}.1"),
            guest_ip: format!("10.201.{subnet}.2"),
            host_ip6: format!("fd00:201:{subnet}::1"),
            guest_ip6: format!("fd00:201:{subnet}::2"),
        };
        ns.remove();
        sh("ip", &["netns", "add", &ns.name]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "mtu",
                "1400",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                "1400",
                "netns",
                &ns.name,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.host_if,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/64", ns.host_ip6),
                "dev",
                &ns.host_if,
            ],
        );
        sh("ip", &["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        inside(&["addr", "add", &format!("{}/24", ns.guest_ip), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &ns.host_ip]);
        inside(&[
            "addr",
            "add",
            &format!("{}/64", ns.guest_ip6),
            "dev",
            "eth0",
        ]);
        inside(&["-6", "route", "add", "default", "via", &ns.host_ip6]);
        // Settled: carrier up, the IPv6 link-local address through duplicate detection.
        let settled = wait_until(Duration::from_secs(30), || {
            let addr = sh("ip", &["-n", &ns.name, "addr", "show", "eth0"]);
            !addr.contains("NO-CARRIER")
                && addr.contains("inet6 fe80")
                && !addr.contains("tentative")
        });
        assert!(settled, "the test namespace's eth0 did not settle");
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Everything the acceptance names of the namespace: links (with details), addresses,
    /// qdiscs, and the filters of every link.
    fn snapshot(&self) -> String {
        let n = self.name.as_str();
        let mut s = sh("ip", &["-n", n, "-d", "link"]);
        s += &sh("ip", &["-n", n, "addr"]);
        s += &sh("tc", &["-n", n, "qdisc"]);
        let links: Value =
            serde_json::from_str(&sh("ip", &["-n", n, "-j", "link"])).expect("ip -j link");
        for link in links.as_array().expect("links") {
            let dev = link["ifname"].as_str().expect("ifname");
            for parent in ["ingress", "egress"] {
                let out = Command::new("tc")
                    .args(["-n", n, "filter", "show", "dev", dev, parent])
                    .output()
                    .expect("tc filter");
                s += &format!("{dev} {parent}: {}{}", text(&out.stdout), text(&out.stderr));
            }
        }
        s
    }

    fn remove(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Fails with the lines that differ when the namespace's `after` snapshot is not `before`.
fn assert_same(before: &str, after: &str, when: &str) {
    if before == after {
        return;
    }
    let gone: Vec<&str> = before.lines().filter(|l| !after.contains(l)).collect();
    let new: Vec<&str> = after.lines().filter(|l| !before.contains(l)).collect();
    panic!("the namespace {when} is not as it was: gone {gone:#?}, new {new:#?}\n{after}");
}

/// A spec patch naming the network namespace at `path`.
fn in_netns(spec: &mut Value, path: &str) {
    let namespaces = spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces");
    namespaces.retain(|ns| ns["type"] != "network");
    namespaces.push(json!({"type": "network", "path": path}));
}

/// The body `GET /` from `ip:port` gets, polled until the server answers (the container's VM
/// boots and its `httpd` starts in the meantime) or `timeout` passes.
fn fetch(ip: &str, port: u16, timeout: Duration) -> Option<String> {
    let mut body = None;
    wait_until(timeout, || {
        body = http_get(ip, port)
            .ok()
            .and_then(|reply| reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()));
        body.is_some()
    });
    body
}

const HTTPD: &str =
    "mkdir -p /www && echo hello-from-husk > /www/index.html && exec httpd -f -p 80 -h /www";

#[test]
fn a_container_gets_the_network_namespace_it_is_given() {
    let test = "a_container_gets_the_network_namespace_it_is_given";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    husk_tests::load_tun().expect("/dev/net/tun");
    let ns = TestNetns::new("husknet1", 71);
    // Further addresses, carried by the agent: a second IPv4 address in the subnet (the
    // kernel's secondary), one in a subnet of its own (the host has an address there too), and
    // a second global IPv6 address.
    let further = ["10.201.71.3", "10.202.71.2", "fd00:201:71::3"];
    sh("ip", &["addr", "add", "10.202.71.1/24", "dev", &ns.host_if]);
    for (address, prefix) in further.iter().zip(["24", "24", "64"]) {
        sh(
            "ip",
            &[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{address}/{prefix}"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
    }
    let netns = ns.path().display().to_string();
    let before = ns.snapshot();
    let mac_line = sh("ip", &["-n", &ns.name, "-j", "link", "show", "eth0"]);
    let mac: Value = serde_json::from_str(&mac_line).expect("ip -j link");
    let mac = mac[0]["address"].as_str().expect("mac").to_string();

    let web = env.bundle("web", &["sh", "-c", HTTPD], |spec| {
        in_netns(spec, &netns);
        spec["root"]["readonly"] = json!(false);
        // For ping (runc's default set has no CAP_NET_RAW).
        for set in ["bounding", "effective", "permitted"] {
            if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
                caps.push(json!("CAP_NET_RAW"));
            }
        }
    });
    let out = env.run(&["run", "-d", "--bundle", web.to_str().expect("utf-8"), "web"]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let vmm = env.state("web").expect("state")["pid"]
        .as_u64()
        .expect("pid");
    // Warm: the template's card, configured by the agent from the renewal.
    husk_tests::oci::assert_started_as_configured(vmm as u32, "web's husk-vmm");
    let diagnose = || {
        let inside = env.run(&[
            "exec",
            "web",
            "sh",
            "-c",
            "ip addr; ip route; ps; cat /proc/net/dev /proc/net/snmp; netstat -tan; ip neigh",
        ]);
        let n = ns.name.as_str();
        let run = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .map(|o| format!("{}{}", text(&o.stdout), text(&o.stderr)))
                .unwrap_or_default()
        };
        format!(
            "host: {}{}{}\nin the guest: {}{}\nnamespace links:\n{}\nfilters:\n{}{}\n{}",
            run("ip", &["-s", "link", "show", &ns.host_if]),
            run("ip", &["neigh"]),
            run("cat", &["/proc/net/snmp"]),
            text(&inside.stdout),
            text(&inside.stderr),
            run("ip", &["-s", "-n", n, "link"]),
            run(
                "tc",
                &["-s", "-n", n, "filter", "show", "dev", "eth0", "ingress"]
            ),
            run(
                "tc",
                &["-s", "-n", n, "filter", "show", "dev", "husk0", "ingress"]
            ),
            env.logs()
        )
    };
    // The host reaches the container at the namespace's address.
    let body = fetch(&ns.guest_ip, 80, Duration::from_secs(120));
    assert_eq!(
        body.as_deref(),
        Some("hello-from-husk\n"),
        "httpd in the microVM at {}: {}",
        ns.guest_ip,
        diagnose()
    );
    // IPv6 too: the namespace's global address, configured by the agent.
    let body = fetch(&ns.guest_ip6, 80, Duration::from_secs(60));
    assert_eq!(
        body.as_deref(),
        Some("hello-from-husk\n"),
        "httpd in the microVM at {}: {}",
        ns.guest_ip6,
        diagnose()
    );
    for address in further {
        let body = fetch(address, 80, Duration::from_secs(60));
        assert_eq!(
            body.as_deref(),
            Some("hello-from-husk\n"),
            "httpd in the microVM at its further address {address}: {}",
            diagnose()
        );
    }
    // Inside: the namespace's addresses and MAC on eth0, and the host answers a ping.
    let out = env.run(&["exec", "web", "ip", "addr", "show", "eth0"]);
    let addr = text(&out.stdout);
    assert!(out.status.success(), "exec ip: {}", text(&out.stderr));
    assert!(addr.contains(&format!("inet {}/24", ns.guest_ip)), "{addr}");
    assert!(addr.contains(&mac), "the card has eth0's MAC {mac}: {addr}");
    assert!(
        addr.contains(&format!("inet6 {}/64", ns.guest_ip6)),
        "{addr}"
    );
    for (address, prefix) in further.iter().zip(["24", "24", "64"]) {
        assert!(addr.contains(&format!("{address}/{prefix}")), "{addr}");
    }
    let out = env.run(&["exec", "web", "ip", "-6", "route"]);
    assert!(
        text(&out.stdout).contains(&format!("default via {}", ns.host_ip6)),
        "{}",
        text(&out.stdout)
    );
    let out = env.run(&["exec", "web", "ping", "-c", "1", "-W", "10", &ns.host_ip]);
    assert!(
        out.status.success(),
        "ping from the container: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The card has the interface's MTU: a packet bigger than it leaves the guest in fragments
    // that fit (with the card's default 1500, the 1478-byte packet is dropped by the veth).
    assert!(
        addr.contains("mtu 1400"),
        "the card has eth0's MTU 1400: {addr}"
    );
    let out = env.run(&[
        "exec",
        "web",
        "ping",
        "-c",
        "1",
        "-W",
        "10",
        "-s",
        "1450",
        &ns.host_ip,
    ]);
    assert!(
        out.status.success(),
        "a 1450-byte ping from the container: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // A second microVM cannot take the same interface: create fails naming why, leaves
    // nothing, and the first keeps its network.
    let other = env.bundle("other", &["true"], |spec| in_netns(spec, &netns));
    let out = env.run(&[
        "create",
        "--bundle",
        other.to_str().expect("utf-8"),
        "other",
    ]);
    assert!(!out.status.success(), "a second VM on one namespace");
    assert!(
        text(&out.stderr).contains("already has a husk0"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(env.root_entries(), vec!["web".to_string()]);
    assert!(fetch(&ns.guest_ip, 80, T).is_some());

    let out = env.run(&["delete", "--force", "web"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert_same(&before, &ns.snapshot(), "after delete");

    // Create and delete, many times, and once with the VMM killed -9 in between: the
    // namespace ends exactly as it began.
    let idle = env.bundle("idle", &["sleep", "1000"], |spec| in_netns(spec, &netns));
    for round in 0..20 {
        let id = format!("c{round}");
        let out = env.run(&["create", "--bundle", idle.to_str().expect("utf-8"), &id]);
        assert!(
            out.status.success(),
            "create {id}: {}{}",
            text(&out.stderr),
            env.logs()
        );
        if round == 10 {
            let pid = env.state(&id).expect("state")["pid"].as_i64().expect("pid") as i32;
            // SAFETY: kill(2) with the pid the state names; no memory is involved.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            assert!(env.wait_status(&id, "stopped", T));
        }
        let out = env.run(&["delete", "--force", &id]);
        assert!(out.status.success(), "delete {id}: {}", text(&out.stderr));
        assert_same(&before, &ns.snapshot(), &format!("after round {round}"));
    }
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "{:?}",
        env.vmms_left()
    );

    // A namespace path that does not exist fails create, naming it, and leaves nothing.
    let gone = env.bundle("gone", &["true"], |spec| {
        in_netns(spec, "/run/netns/husk-no-such-namespace")
    });
    let out = env.run(&["create", "--bundle", gone.to_str().expect("utf-8"), "gone"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/run/netns/husk-no-such-namespace"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

/// A veth pair from the host into `ns`'s namespace: `host_if` on the host with `host_cidr`,
/// `inner` in the namespace with `inner_cidr`, both up.
fn add_veth(ns: &TestNetns, host_if: &str, host_cidr: &str, inner: &str, inner_cidr: &str) {
    let _ = Command::new("ip").args(["link", "del", host_if]).output();
    sh(
        "ip",
        &[
            "link", "add", host_if, "type", "veth", "peer", "name", inner, "netns", &ns.name,
        ],
    );
    sh("ip", &["addr", "add", host_cidr, "dev", host_if]);
    sh("ip", &["link", "set", host_if, "up"]);
    sh(
        "ip",
        &["-n", &ns.name, "addr", "add", inner_cidr, "dev", inner],
    );
    sh("ip", &["-n", &ns.name, "link", "set", inner, "up"]);
    // Settled (as `TestNetns::new` waits for its eth0), so that snapshots taken from here on
    // compare.
    let settled = wait_until(Duration::from_secs(30), || {
        let addr = sh("ip", &["-n", &ns.name, "addr", "show", inner]);
        !addr.contains("NO-CARRIER") && addr.contains("inet6 fe80") && !addr.contains("tentative")
    });
    assert!(settled, "the test namespace's {inner} did not settle");
}

/// A container on two networks, as podman's netavark makes one (`--network a --network b`):
/// the namespace has `eth0` and `net1`, each with its address, and a default route through
/// each, told apart by a metric. The microVM gets a card for each (`eth0` and `eth1`), with
/// the interfaces' MACs, addresses and routes, warm (restored from a template with two cards)
/// and cold (booted, where the kernel's `ip=` configures `eth0` and the agent `eth1`); the
/// host reaches the container on both; delete leaves the namespace as it was. More interfaces
/// than a microVM takes are refused, naming them.
#[test]
fn a_container_gets_every_interface_of_its_namespace() {
    let test = "a_container_gets_every_interface_of_its_namespace";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    husk_tests::load_tun().expect("/dev/net/tun");
    let ns = TestNetns::new("husknet3", 73);
    let second_host = "hv2-husknet3";
    add_veth(&ns, second_host, "10.202.73.1/24", "net1", "10.202.73.2/24");
    sh(
        "ip",
        &[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            "10.202.73.1",
            "dev",
            "net1",
            "metric",
            "101",
        ],
    );
    let netns = ns.path().display().to_string();
    let before = ns.snapshot();
    let mac_of = |dev: &str| -> String {
        let line = sh("ip", &["-n", &ns.name, "-j", "link", "show", dev]);
        let link: Value = serde_json::from_str(&line).expect("ip -j link");
        link[0]["address"].as_str().expect("mac").to_string()
    };
    let (mac0, mac1) = (mac_of("eth0"), mac_of("net1"));

    for warm in [true, false] {
        let id = if warm { "warm" } else { "cold" };
        let web = env.bundle(id, &["sh", "-c", HTTPD], |spec| {
            in_netns(spec, &netns);
            spec["root"]["readonly"] = json!(false);
            if !warm {
                spec["annotations"]["io.husk.vm.warm_start"] = json!("false");
            }
        });
        let out = env.run(&["run", "-d", "--bundle", web.to_str().expect("utf-8"), id]);
        assert!(out.status.success(), "run -d {id}: {}", text(&out.stderr));
        let diagnose = || {
            let inside = env.run(&["exec", id, "sh", "-c", "ip addr; ip route"]);
            format!(
                "in the guest: {}{}\n{}",
                text(&inside.stdout),
                text(&inside.stderr),
                env.logs()
            )
        };
        for address in [&ns.guest_ip, "10.202.73.2"] {
            let body = fetch(address, 80, Duration::from_secs(120));
            assert_eq!(
                body.as_deref(),
                Some("hello-from-husk\n"),
                "httpd in the {id} microVM at {address}: {}",
                diagnose()
            );
        }
        let out = env.run(&["exec", id, "ip", "addr"]);
        assert!(out.status.success(), "exec ip: {}", text(&out.stderr));
        let addr = text(&out.stdout);
        let section = |dev: &str| -> String {
            addr.split_inclusive('\n')
                .skip_while(|l| !l.contains(&format!(": {dev}:")))
                .take_while({
                    let mut first = true;
                    move |l| std::mem::replace(&mut first, false) || l.starts_with(' ')
                })
                .collect()
        };
        let (eth0, eth1) = (section("eth0"), section("eth1"));
        assert!(
            eth0.contains(&mac0),
            "{id}: eth0 has eth0's MAC {mac0}: {addr}"
        );
        assert!(
            eth0.contains(&format!("inet {}/24", ns.guest_ip)),
            "{id}: {addr}"
        );
        assert!(
            eth1.contains(&mac1),
            "{id}: eth1 has net1's MAC {mac1}: {addr}"
        );
        assert!(eth1.contains("inet 10.202.73.2/24"), "{id}: {addr}");
        let out = env.run(&["exec", id, "ip", "route"]);
        let routes = text(&out.stdout);
        assert!(
            routes.contains(&format!("default via {} dev eth0", ns.host_ip)),
            "{id}: {routes}"
        );
        // busybox prints `metric` after the device, spaced its own way.
        assert!(
            routes.lines().any(|l| {
                l.starts_with("default via 10.202.73.1 dev eth1 ")
                    && l.split_whitespace()
                        .collect::<Vec<_>>()
                        .ends_with(&["metric", "101"])
            }),
            "{id}: {routes}"
        );
        let out = env.run(&["delete", "--force", id]);
        assert!(out.status.success(), "delete {id}: {}", text(&out.stderr));
        assert_same(&before, &ns.snapshot(), &format!("after delete of {id}"));
    }

    // More interfaces than a microVM takes: create fails naming them, rather than the
    // container starting with part of its network missing, and leaves the namespace as it was.
    for n in 2..=4 {
        add_veth(
            &ns,
            &format!("hv{}-husknet3", n + 1),
            &format!("10.20{}.73.1/24", n + 1),
            &format!("net{n}"),
            &format!("10.20{}.73.2/24", n + 1),
        );
    }
    let with_five = ns.snapshot();
    let idle = env.bundle("idle", &["sleep", "1000"], |spec| in_netns(spec, &netns));
    let out = env.run(&["create", "--bundle", idle.to_str().expect("utf-8"), "five"]);
    assert!(!out.status.success(), "a namespace with five interfaces");
    assert!(
        text(&out.stderr)
            .contains("has 5 interfaces (eth0, net1, net2, net3, net4); husk carries at most 4"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert_same(&with_five, &ns.snapshot(), "after the refused create");
}

/// A CNI that gives the pod a /32 address and a gateway outside it, as Calico and Cilium do:
/// the namespace has a link route to the gateway, the default route through it and here one
/// more network through it. The guest gets them all (the kernel's IP autoconfiguration
/// refuses such a gateway; the agent adds the routes, the link route first), so the host
/// reaches the container and the container reaches addresses on both routes.
#[test]
fn a_host_address_with_a_gateway_outside_it_routes_through_the_gateway() {
    let test = "a_host_address_with_a_gateway_outside_it_routes_through_the_gateway";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    husk_tests::load_tun().expect("/dev/net/tun");
    let ns = TestNetns::new("husknet3", 73);
    let inside = |args: &[&str]| {
        let mut all = vec!["-n", ns.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all);
    };
    inside(&["route", "del", "default"]);
    inside(&["addr", "del", &format!("{}/24", ns.guest_ip), "dev", "eth0"]);
    inside(&["addr", "add", &format!("{}/32", ns.guest_ip), "dev", "eth0"]);
    inside(&["route", "add", &ns.host_ip, "dev", "eth0", "scope", "link"]);
    inside(&["route", "add", "default", "via", &ns.host_ip, "dev", "eth0"]);
    inside(&[
        "route",
        "add",
        "10.231.0.0/16",
        "via",
        &ns.host_ip,
        "dev",
        "eth0",
    ]);
    // The host answers on an address of that network and on one only the default route reaches.
    for addr in ["10.231.73.1/32", "10.232.73.1/32"] {
        sh("ip", &["addr", "add", addr, "dev", &ns.host_if]);
    }
    let netns = ns.path().display().to_string();
    let web = env.bundle("web3", &["sh", "-c", HTTPD], |spec| {
        in_netns(spec, &netns);
        spec["root"]["readonly"] = json!(false);
        for set in ["bounding", "effective", "permitted"] {
            if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
                caps.push(json!("CAP_NET_RAW"));
            }
        }
    });
    let out = env.run(&[
        "run",
        "-d",
        "--bundle",
        web.to_str().expect("utf-8"),
        "web3",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let body = fetch(&ns.guest_ip, 80, Duration::from_secs(120));
    let out = env.run(&["exec", "web3", "ip", "route"]);
    let routes = text(&out.stdout);
    assert_eq!(
        body.as_deref(),
        Some("hello-from-husk\n"),
        "httpd at {}; the guest's routes: {routes}{}\n{}",
        ns.guest_ip,
        text(&out.stderr),
        env.logs()
    );
    for route in [
        format!("default via {}", ns.host_ip),
        format!("10.231.0.0/16 via {}", ns.host_ip),
        format!("{} dev eth0", ns.host_ip),
    ] {
        assert!(
            routes.contains(&route),
            "no {route:?} in the guest: {routes}"
        );
    }
    for target in ["10.231.73.1", "10.232.73.1"] {
        let out = env.run(&["exec", "web3", "ping", "-c", "1", "-W", "10", target]);
        assert!(
            out.status.success(),
            "ping {target} from the container: {}{}\nroutes: {routes}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let out = env.run(&["delete", "--force", "web3"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
}

/// podman with its default bridge network: `-p 8080:80` publishes the port of a husk
/// container on the host, and a second husk container reaches the first by its address.
/// The engine's container `web` (an httpd on port 80, published on the host's 8080) answers at
/// its address on the engine's bridge and on the published port; returns its address.
/// `engine` runs the engine's CLI; `diagnose` says what the engine knows, for a failure.
fn assert_published(
    engine: impl Fn(&[&str]) -> std::process::Output,
    diagnose: impl Fn() -> String,
) -> String {
    let out = engine(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        "web",
    ]);
    let ip = text(&out.stdout).trim().to_string();
    assert!(!ip.is_empty(), "web's address: {}", text(&out.stderr));
    let body = fetch(&ip, 80, Duration::from_secs(120));
    assert_eq!(
        body.as_deref(),
        Some("hello-from-husk\n"),
        "httpd at {ip}: {}",
        diagnose()
    );
    let body = fetch("127.0.0.1", 8080, Duration::from_secs(30));
    assert_eq!(
        body.as_deref(),
        Some("hello-from-husk\n"),
        "the published port: {}",
        diagnose()
    );
    ip
}

/// A podman test's environment, podman with the busybox image, and `/dev/net/tun`; `None`
/// where the test cannot run (it says so). podman goes first when the pair does (its
/// containers before the environment's state).
fn podman_test(test: &str) -> Option<(OciEnv, husk_tests::oci::Podman)> {
    let env = OciEnv::new(test)?;
    if !client_available(test, "podman") {
        return None;
    }
    husk_tests::load_tun().expect("/dev/net/tun");
    let podman = env.podman_with_busybox();
    Some((env, podman))
}

#[test]
fn podman_publishes_a_port_of_a_husk_container() {
    let Some((env, podman)) = podman_test("podman_publishes_a_port_of_a_husk_container") else {
        return;
    };
    let out = podman.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "8080:80",
        "localhost/bb",
        "sh",
        "-c",
        HTTPD,
    ]);
    assert!(out.status.success(), "podman run -p: {}", text(&out.stderr));
    let diagnose = || {
        let logs = podman.run(&["logs", "web"]);
        let nat = Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .map(|o| text(&o.stdout))
            .unwrap_or_default();
        format!(
            "podman logs: {}{}\niptables nat:\n{nat}\n{}",
            text(&logs.stdout),
            text(&logs.stderr),
            env.logs()
        )
    };
    let ip = assert_published(|args| podman.run(args), diagnose);
    let out = podman.run(&[
        "run",
        "--rm",
        // busybox's ping needs a raw socket; podman's default set has no CAP_NET_RAW.
        "--cap-add",
        "NET_RAW",
        "localhost/bb",
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 80 && ping -c 1 -W 10 {ip}"),
    ]);
    assert!(
        out.status.success(),
        "a second container reaching {ip}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("hello-from-husk"),
        "{}",
        text(&out.stdout)
    );
    let out = podman.run(&["rm", "-f", "-t", "2", "web"]);
    assert!(out.status.success(), "rm -f: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "{:?}",
        env.vmms_left()
    );
}

/// Two podman networks, one container on both (`--network a --network b`): the namespace podman
/// prepares has an interface for each, the microVM a card for each, and the host reaches the
/// container at both of its addresses. Nothing of husk is left once the container is gone.
#[test]
fn podman_runs_a_husk_container_on_two_networks() {
    let Some((env, podman)) = podman_test("podman_runs_a_husk_container_on_two_networks") else {
        return;
    };
    /// podman's networks are the host's, not of its `--root`: removed however the test ends.
    struct Networks<'a>(&'a husk_tests::oci::Podman, [&'static str; 2]);
    impl Drop for Networks<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["rm", "-f", "-t", "2", "multi"]);
            for name in self.1 {
                let _ = self.0.run(&["network", "rm", "-f", name]);
            }
        }
    }
    let networks = Networks(&podman, ["husk-test-net-a", "husk-test-net-b"]);
    for (name, subnet) in networks.1.iter().zip(["10.210.1.0/24", "10.210.2.0/24"]) {
        let _ = podman.run(&["network", "rm", "-f", name]);
        let out = podman.run(&["network", "create", "--subnet", subnet, name]);
        assert!(
            out.status.success(),
            "network create {name}: {}",
            text(&out.stderr)
        );
    }
    let out = podman.run(&[
        "run",
        "-d",
        "--name",
        "multi",
        "--network",
        networks.1[0],
        "--network",
        networks.1[1],
        "localhost/bb",
        "sh",
        "-c",
        HTTPD,
    ]);
    assert!(
        out.status.success(),
        "podman run on two networks: {}{}",
        text(&out.stderr),
        env.logs()
    );
    let out = podman.run(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        "multi",
    ]);
    let ips: Vec<String> = text(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        ips.len(),
        2,
        "multi's addresses: {:?} {}",
        ips,
        text(&out.stderr)
    );
    for ip in &ips {
        let body = fetch(ip, 80, Duration::from_secs(120));
        assert_eq!(
            body.as_deref(),
            Some("hello-from-husk\n"),
            "httpd at {ip}: {}{}",
            text(&podman.run(&["exec", "multi", "ip", "addr"]).stdout),
            env.logs()
        );
    }
    drop(networks);
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "{:?}",
        env.vmms_left()
    );
}

/// docker with its default bridge: libnetwork's prestart hook configures the namespace of the
/// container's pid (husk-vmm, waiting in a namespace of its own), husk carries what it made
/// into the microVM, and `-p 8080:80` answers on the host. The host's own namespace is never
/// touched, and nothing of husk is left once the container is gone.
#[test]
fn docker_publishes_a_port_of_a_husk_container() {
    let test = "docker_publishes_a_port_of_a_husk_container";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    for client in ["dockerd", "docker"] {
        if !client_available(test, client) {
            return;
        }
    }
    husk_tests::load_tun().expect("/dev/net/tun");
    let host_links = sh("ip", &["-o", "link"]);
    let dir = env.work.path().join("d");
    let wrapper = env.runtime_wrapper(&env.work.path().join("husk-runtime"));
    let mut dockerd = Dockerd::start_with(&dir, &wrapper, T, true).expect("dockerd");
    let host_links_with_docker = sh("ip", &["-o", "link"]);
    let tarball = env.rootfs_tarball();
    let out = dockerd.docker(&["import", tarball.to_str().expect("utf-8"), "bb:latest"]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    let out = dockerd.docker(&[
        "run",
        "--runtime",
        "husk",
        "-d",
        "--name",
        "web",
        "-p",
        "8080:80",
        "bb",
        "sh",
        "-c",
        HTTPD,
    ]);
    let logs = |dockerd: &Dockerd| {
        format!(
            "dockerd log:\n{}\nhusk logs:\n{}",
            dockerd.log_tail(),
            logs_under(&dockerd.exec_root)
        )
    };
    assert!(
        out.status.success(),
        "docker run -p: {}\n{}",
        text(&out.stderr),
        logs(&dockerd)
    );
    assert_published(|args| dockerd.docker(args), || logs(&dockerd));
    // The host's namespace has docker's links only: none was moved or renamed into it.
    let running = sh("ip", &["-o", "link"]);
    for line in host_links_with_docker.lines() {
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        assert!(
            running.contains(name),
            "{name} is gone from the host: {running}"
        );
    }
    assert!(
        !running
            .lines()
            .any(|l| l.contains(": eth0") && !host_links.contains(": eth0")),
        "an eth0 appeared in the host's namespace: {running}"
    );
    let out = dockerd.docker(&["rm", "-f", "web"]);
    assert!(out.status.success(), "rm -f: {}", text(&out.stderr));
    dockerd.stop_and_assert_clean(T);
}
