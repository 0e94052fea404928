//! What the guest agent does of the OCI runtime spec, checked the way runc behaves: a config as
//! `runc spec` writes it (ambient capabilities without inheritable ones) runs with the sets runc
//! gives it, and every `linux.rootfsPropagation` creates and starts, with the root mount's
//! propagation visible in the container's `/proc/self/mountinfo`.

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
