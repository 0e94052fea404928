//! What the guest agent does of the OCI runtime spec, checked the way runc behaves: a config as
//! `runc spec` writes it (ambient capabilities without inheritable ones) runs with the sets runc
//! gives it, and every `linux.rootfsPropagation` creates and starts, with the root mount's
//! propagation visible in the container's `/proc/self/mountinfo`; a container in a user
//! namespace runs with its mapped ids, and what it makes is owned accordingly on the host.

use husk_tests::oci::OciEnv;
use serde_json::{json, Value};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the bundle in the foreground as container `id`; returns its stdout, after checking that
/// it exited 0.
fn run_ok(env: &OciEnv, bundle: &std::path::Path, id: &str) -> String {
    let out = env.run(&["run", "--bundle", bundle.to_str().expect("utf-8"), id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{id}: stdout {:?}\nstderr {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        env.logs()
    );
    text(&out.stdout)
}

/// The `process` and `linux` sections of runc 1.1's `runc spec` (from 1.1.2 on: ambient
/// capabilities, no inheritable ones), with `args` for the test.
fn runc_spec_sections(args: &[&str]) -> (Value, Value) {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let process = json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "TERM=xterm"
        ],
        "cwd": "/",
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    });
    let linux = json!({
        "resources": {"devices": [{"allow": false, "access": "rwm"}]},
        "namespaces": [
            {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
            {"type": "mount"}, {"type": "cgroup"}
        ],
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
            "/proc/scsi"
        ],
        "readonlyPaths": [
            "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
        ]
    });
    (process, linux)
}

/// runc applies the bounding, effective and permitted sets exactly and warns about an ambient
/// capability the kernel will not raise (one not in the inheritable set): the container runs as
/// root with AUDIT_WRITE (29), KILL (5) and NET_BIND_SERVICE (10), nothing inheritable, nothing
/// ambient - what runc gives this config.
#[test]
fn runc_spec_config_runs_with_its_ambient_capabilities_skipped() {
    let Some(env) = OciEnv::new("runc_spec_config_runs_with_its_ambient_capabilities_skipped")
    else {
        return;
    };
    let (process, linux) = runc_spec_sections(&["sh", "-c", "grep Cap /proc/self/status"]);
    let bundle = env.bundle("runc-spec", &[], |s| {
        s["process"] = process;
        s["linux"] = linux;
    });
    let out = run_ok(&env, &bundle, "runc-spec");
    assert_eq!(
        out,
        "CapInh:\t0000000000000000\n\
         CapPrm:\t0000000020000420\n\
         CapEff:\t0000000020000420\n\
         CapBnd:\t0000000020000420\n\
         CapAmb:\t0000000000000000\n"
    );
}

/// The optional fields (`shared:N`, `master:N`, `unbindable`, ...) of the mountinfo line whose
/// mount point is `point`.
fn optional_fields<'a>(mountinfo: &'a str, point: &str) -> Vec<&'a str> {
    mountinfo
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&point)).then(|| {
                fields
                    .iter()
                    .skip(6)
                    .take_while(|f| **f != "-")
                    .copied()
                    .collect()
            })
        })
        .unwrap_or_else(|| panic!("no mount at {point} in\n{mountinfo}"))
}

fn is_shared(fields: &[&str]) -> bool {
    fields.iter().any(|f| f.starts_with("shared:"))
}

/// Each of the eight values creates and starts. As under runc, the container's root is made
/// private to be pivoted to (the agent moves it over the initramfs), then gets the configured
/// propagation, and the mounts below it too for the `r` forms (`/proc` here): shared joins a
/// peer group of the container's own, unbindable shows as such, private needs nothing. A slave
/// of no master is private: nothing in the guest's mount namespace is shared, so
/// `[r]slave` shows no `master:N` (runc shows none either once it has made the root's parent
/// mount private) - the point is that nothing the container mounts propagates out.
#[test]
fn every_rootfs_propagation_creates_and_starts() {
    let Some(env) = OciEnv::new("every_rootfs_propagation_creates_and_starts") else {
        return;
    };
    for value in [
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
    ] {
        let bundle = env.bundle(
            &format!("prop-{value}"),
            &["cat", "/proc/self/mountinfo"],
            |s| {
                s["linux"]["rootfsPropagation"] = json!(value);
            },
        );
        let out = run_ok(&env, &bundle, &format!("prop-{value}"));
        let root = optional_fields(&out, "/");
        let proc = optional_fields(&out, "/proc");
        let what = format!("{value}: / {root:?}, /proc {proc:?}\n{out}");
        match value {
            "shared" => assert!(is_shared(&root) && proc.is_empty(), "{what}"),
            "rshared" => assert!(is_shared(&root) && is_shared(&proc), "{what}"),
            "unbindable" => assert!(root == ["unbindable"] && proc.is_empty(), "{what}"),
            "runbindable" => {
                assert!(root == ["unbindable"] && proc == ["unbindable"], "{what}")
            }
            _ => assert!(root.is_empty() && proc.is_empty(), "{what}"),
        }
    }
}

/// Under an `rshared` root, a mount the container makes inside a mount of its spec (a tmpfs at
/// /mnt, with a `private` option that the root's propagation overrides, as under runc) joins a
/// peer group of its own.
#[test]
fn a_mount_made_under_an_rshared_root_is_shared() {
    let Some(env) = OciEnv::new("a_mount_made_under_an_rshared_root_is_shared") else {
        return;
    };
    let script = "mkdir /mnt/sub && mount -t tmpfs none /mnt/sub && cat /proc/self/mountinfo";
    let bundle = env.bundle("rshared-mount", &["sh", "-c", script], |s| {
        s["linux"]["rootfsPropagation"] = json!("rshared");
        let caps = json!(["CAP_SYS_ADMIN", "CAP_KILL"]);
        s["process"]["capabilities"] = json!({
            "bounding": caps, "effective": caps, "permitted": caps
        });
        s["mounts"].as_array_mut().expect("mounts").push(
            json!({"destination": "/mnt", "type": "tmpfs", "source": "tmpfs",
                         "options": ["nosuid", "nodev", "private"]}),
        );
    });
    let out = run_ok(&env, &bundle, "rshared-mount");
    for point in ["/", "/mnt", "/mnt/sub"] {
        let fields = optional_fields(&out, point);
        assert!(is_shared(&fields), "{point}: {fields:?}\n{out}");
    }
    let sub = out
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/mnt/sub"))
        .expect("the /mnt/sub line");
    assert!(sub.contains(" - tmpfs "), "{sub}");
}

/// Adds a user namespace: `size` uids from `first_uid`, and `size` gids from 0, are 100000 and
/// up outside.
fn with_user_namespace(spec: &mut Value, first_uid: u32, size: u32) {
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(json!({"type": "user"}));
    spec["linux"]["uidMappings"] =
        json!([{"containerID": first_uid, "hostID": 100000, "size": size}]);
    spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": size}]);
}

#[test]
fn a_user_namespaced_container_runs_with_the_mapped_ids() {
    let Some(env) = OciEnv::new("a_user_namespaced_container_runs_with_the_mapped_ids") else {
        return;
    };
    // As podman --userns=auto prepares an image: the rootfs owned by the range's first id.
    let rootfs = env.work.path().join("rootfs");
    let chown = std::process::Command::new("chown")
        .args(["-R", "100000:100000"])
        .arg(&rootfs)
        .status()
        .expect("chown");
    assert!(chown.success());
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
                  touch /made-by-root; stat -c '%u:%g' /made-by-root /bin";
    let bundle = env.bundle("userns", &["sh", "-c", script], |spec| {
        with_user_namespace(spec, 0, 65536);
        spec["root"]["readonly"] = json!(false);
    });
    let out = run_ok(&env, &bundle, "userns");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["0", "100000", "65536"],
            vec!["0", "100000", "65536"],
            vec!["0"],
            vec!["0"],
            vec!["0:0"],
            vec!["0:0"],
        ],
        "inside: {out}"
    );
    let made = std::fs::metadata(rootfs.join("made-by-root")).expect("the file reached the host");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (made.uid(), made.gid()),
        (100000, 100000),
        "the container's root is uid 100000 on the host"
    );

    // A process user inside the range: uid 1000 in the container is 101000 outside.
    let bundle = env.bundle("userns-user", &["sh", "-c", "id -u; touch /tmp/x; stat -c %u /tmp/x"], |spec| {
        with_user_namespace(spec, 0, 65536);
        spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        spec["mounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}));
    });
    let out = run_ok(&env, &bundle, "userns-user");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["1000", "1000"],
        "{out}"
    );

    // An exec joins the container's user namespace too.
    let bundle = env.bundle("userns-exec", &["sleep", "1000"], |spec| {
        with_user_namespace(spec, 0, 65536);
    });
    let out = env.run(&[
        "run",
        "-d",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "userns-exec",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let out = env.run(&[
        "exec",
        "userns-exec",
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u",
    ]);
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536", "0"],
        "exec: {}",
        text(&out.stderr)
    );
    let out = env.run(&["delete", "--force", "userns-exec"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));

    // Maps the kernel would refuse are refused by name, and nothing is left.
    let bundle = env.bundle("userns-bad", &["true"], |spec| {
        with_user_namespace(spec, 1, 10);
    });
    let out = env.run(&[
        "run",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "userns-bad",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("uidMappings: the container's root (id 0) is not mapped"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

#[test]
fn podman_passes_user_namespaces_and_cpusets_through() {
    let test = "podman_passes_user_namespaces_and_cpusets_through";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    if !husk_tests::oci::client_available(test, "podman") {
        return;
    }
    let podman = env.podman_with_busybox();

    // `--uidmap`: podman gives the container an id-shifted copy of the image and the maps.
    let out = podman.run(&[
        "run",
        "--rm",
        "--network=none",
        "--uidmap=0:100000:65536",
        "--gidmap=0:100000:65536",
        "localhost/bb",
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u; stat -c %u /bin",
    ]);
    assert!(out.status.success(), "run --uidmap: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536", "0", "0"],
        "{}",
        text(&out.stderr)
    );

    // `--cpuset-cpus` with a quota: the guest cgroup has guest CPU 0 and the quota.
    let out = podman.run(&[
        "run",
        "--rm",
        "--network=none",
        "--cpuset-cpus=0",
        "--cpus=0.5",
        "localhost/bb",
        "cat",
        "/sys/fs/cgroup/cpuset.cpus",
        "/sys/fs/cgroup/cpu.max",
    ]);
    assert!(
        out.status.success(),
        "run --cpuset-cpus: {}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "0\n50000 100000\n",
        "{}",
        text(&out.stderr)
    );
}
