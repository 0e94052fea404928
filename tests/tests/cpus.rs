//! CPU sets that need more than one host CPU, through the `husk` CLI and podman: the microVM
//! gets a vCPU for each CPU of the set, the guest cgroup the guest's CPU numbers and the
//! container's quota, and the CLI's `husk-vmm` runs on the set's CPUs. `cargo xtask test` runs
//! this binary in a rig of its own whose L2 has two CPUs (the others run in a one-CPU L2); on a
//! host with fewer than two online CPUs every test here skips loudly (and fails under
//! `HUSK_REQUIRE_KVM=1`).

use husk_tests::oci::OciEnv;
use husk_tests::skip::skip;
use serde_json::json;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The host's online CPUs.
fn online_cpus() -> Vec<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online CPUs");
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<u32>().expect("cpu")..=b.parse::<u32>().expect("cpu"));
    }
    cpus
}

#[test]
fn a_cpuset_becomes_the_guests_cpus_and_pins_the_vmm() {
    let Some(online) = two_cpus() else {
        return;
    };
    let Some(env) = OciEnv::new("a_cpuset_becomes_the_guests_cpus_and_pins_the_vmm") else {
        return;
    };
    let last = *online.last().expect("a CPU");
    let show = "cat /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max; nproc; sleep 1000";
    // One host CPU, the last one (`--cpuset-cpus=N`) with half a CPU of quota.
    let bundle = env.bundle("one", &["sh", "-c", show], |spec| {
        spec["linux"]["resources"]["cpu"] =
            json!({"cpus": last.to_string(), "quota": 50000, "period": 100000});
    });
    let pid = env.create_with_pid("one", &bundle);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string();
    assert_eq!(
        allowed,
        last.to_string(),
        "husk-vmm runs on the cpuset's CPU"
    );
    let out = env.run(&["start", "one"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let out = env.run(&[
        "exec",
        "one",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max; nproc",
    ]);
    assert_eq!(
        text(&out.stdout),
        "0\n50000 100000\n1\n",
        "the guest cgroup has guest CPU 0 and the quota: {}",
        text(&out.stderr)
    );
    let out = env.run(&["delete", "--force", "one"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));

    // `--cpus 0.5 --cpuset-cpus 0-1`: a guest CPU for each, the quota kept.
    {
        let pair = format!("{}-{}", online[0], online[1]);
        let bundle = env.bundle("two", &["sh", "-c", show], |spec| {
            spec["linux"]["resources"]["cpu"] =
                json!({"cpus": pair, "quota": 50000, "period": 100000});
        });
        let out = env.run(&[
            "run",
            "--bundle",
            bundle.to_str().expect("utf-8"),
            "-d",
            "two",
        ]);
        assert!(out.status.success(), "run: {}", text(&out.stderr));
        let out = env.run(&[
            "exec",
            "two",
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max; nproc",
        ]);
        assert_eq!(
            text(&out.stdout),
            "0-1\n50000 100000\n2\n",
            "{}",
            text(&out.stderr)
        );
        let out = env.run(&["delete", "--force", "two"]);
        assert!(out.status.success(), "delete: {}", text(&out.stderr));
    }

    // A CPU this host does not have: refused by name, nothing made.
    let missing = last + 1;
    let bundle = env.bundle("none", &["true"], |spec| {
        spec["linux"]["resources"]["cpu"] = json!({"cpus": missing.to_string()});
    });
    let out = env.run(&[
        "create",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "none",
    ]);
    assert!(!out.status.success(), "create must fail");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("CPU {missing} is not online on this host")),
        "{stderr}"
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.vmms_left().is_empty());
}

/// The host's online CPUs when there are at least two; otherwise the running test is skipped.
fn two_cpus() -> Option<Vec<u32>> {
    let online = online_cpus();
    if online.len() < 2 {
        skip(&format!(
            "needs two online host CPUs, this host has {online:?} (cargo xtask test runs it in a two-CPU rig)"
        ));
        return None;
    }
    Some(online)
}

#[test]
fn podman_runs_containers_on_a_second_cpu_and_across_two() {
    let test = "podman_runs_containers_on_a_second_cpu_and_across_two";
    let Some(online) = two_cpus() else {
        return;
    };
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    if !husk_tests::oci::client_available(test, "podman") {
        return;
    }
    let podman = env.podman_with_busybox();
    let show = "cat /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max; nproc";

    // `--cpuset-cpus=1 --cpus=0.5`: the host's second CPU is the guest's only one.
    // `--cpus 0.5 --cpuset-cpus 0-1`: two vCPUs, the quota of half a CPU across them.
    let cases = [
        (online[1].to_string(), "0\n50000 100000\n1\n"),
        (
            format!("{}-{}", online[0], online[1]),
            "0-1\n50000 100000\n2\n",
        ),
    ];
    for (cpuset, expected) in cases {
        let out = podman.run(&[
            "run",
            "--rm",
            "--network=none",
            "--cpus=0.5",
            &format!("--cpuset-cpus={cpuset}"),
            "localhost/bb",
            "sh",
            "-c",
            show,
        ]);
        assert!(
            out.status.success(),
            "run --cpuset-cpus={cpuset}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), expected, "{}", text(&out.stderr));
    }
}
