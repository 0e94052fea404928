//! What the host side of `husk` does of the OCI runtime spec, end to end: hooks (all six
//! kinds, once each, in lifecycle order, with the container's state on stdin; a failing
//! prestart hook fails `create` and leaves nothing; a failing poststart hook is a warning),
//! namespace paths checked for their type, and what
//! the guest sees of files the host changes under a running container (the share's caching:
//! a bind mount within its second, the rootfs not until the container ends, unless
//! `io.husk.fs.cache=short`), what `husk-vmm` keeps of root's power while it serves the
//! guest, that a system call outside its seccomp lists ends it and is reported, the host
//! cgroup it runs in (its memory cap, blockIO), that memory the guest frees goes back to the
//! host (the balloon's free page reporting), and that 100 lifecycles, 8 at once, leave
//! nothing behind.

use husk_tests::oci::OciEnv;
use husk_tests::wait_until;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A hook that appends `KIND <state JSON>` as one line to `log`, then runs `extra`.
fn logging_hook(kind: &str, log: &Path, extra: &str) -> Value {
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!(
            "{{ printf '%s ' {kind}; cat; echo; }} >> {log}; {extra}",
            log = log.display()
        )],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "timeout": 60
    })
}

/// The `(kind, state)` lines a hook log holds.
fn hook_log(log: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (kind, state) = line.split_once(' ').expect("KIND STATE");
            let state = serde_json::from_str(state)
                .unwrap_or_else(|e| panic!("hook state of {kind} is not JSON ({e}): {state}"));
            (kind.to_string(), state)
        })
        .collect()
}

#[test]
fn every_hook_kind_runs_once_in_order_with_its_state() {
    let Some(env) = OciEnv::new("every_hook_kind_runs_once_in_order_with_its_state") else {
        return;
    };
    let log = env.work.path().join("hooks.log");
    let marker = env.work.path().join("rootfs/created-by-hook");
    let bundle = env.bundle("hooked", &["sleep", "1000"], |spec| {
        spec["hooks"] = json!({
            "prestart": [logging_hook("prestart", &log, "")],
            "createRuntime": [logging_hook("createRuntime", &log, "")],
            // What a createContainer hook writes into the rootfs is in the container.
            "createContainer": [logging_hook(
                "createContainer",
                &log,
                &format!("echo from-the-hook > {}", marker.display()),
            )],
            "startContainer": [logging_hook("startContainer", &log, "")],
            "poststart": [logging_hook("poststart", &log, "")],
            "poststop": [logging_hook("poststop", &log, "")],
        });
    });
    let bundle_text = bundle.to_str().expect("utf-8");
    let pid = u64::from(env.create_with_pid("c1", &bundle));
    let seen = hook_log(&log);
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["prestart", "createRuntime", "createContainer"]);
    for (kind, state) in &seen {
        assert_eq!(state["status"], "creating", "{kind}: {state}");
        assert_eq!(state["id"], "c1", "{kind}: {state}");
        assert_eq!(state["pid"], pid, "{kind}: the container's pid, husk-vmm");
        assert_eq!(state["bundle"], bundle_text, "{kind}: {state}");
    }

    let out = env.run(&["start", "c1"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let seen = hook_log(&log);
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart"
        ]
    );
    assert_eq!(seen[3].1["status"], "created");
    assert_eq!(seen[4].1["status"], "running");
    assert_eq!(seen[4].1["pid"], pid);

    let out = env.run(&["exec", "c1", "cat", "/created-by-hook"]);
    assert_eq!(
        text(&out.stdout),
        "from-the-hook\n",
        "exec: {}",
        text(&out.stderr)
    );

    let out = env.run(&["kill", "c1", "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert!(env.wait_status("c1", "stopped", T), "stopped after SIGKILL");
    assert_eq!(hook_log(&log).len(), 5, "no hook runs on kill");
    let out = env.run(&["delete", "c1"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let seen = hook_log(&log);
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(seen[5].0, "poststop");
    assert_eq!(seen[5].1["status"], "stopped");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

#[test]
fn a_failing_prestart_hook_fails_create_and_leaves_nothing() {
    let Some(env) = OciEnv::new("a_failing_prestart_hook_fails_create_and_leaves_nothing") else {
        return;
    };
    let log = env.work.path().join("hooks.log");
    let bundle = env.bundle("broken", &["true"], |spec| {
        spec["hooks"] = json!({
            "prestart": [logging_hook("prestart", &log, "echo no network for you >&2; exit 4")],
            "createRuntime": [logging_hook("createRuntime", &log, "")],
            "poststop": [logging_hook("poststop", &log, "")],
        });
    });
    let out = env.run(&["create", "--bundle", bundle.to_str().expect("utf-8"), "c2"]);
    assert!(!out.status.success(), "create must fail");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("prestart hook 0 (/bin/sh)")
            && stderr.contains("exit status: 4")
            && stderr.contains("no network for you"),
        "the error names the hook and quotes it: {stderr}"
    );
    let kinds: Vec<String> = hook_log(&log).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        ["prestart", "poststop"],
        "the hooks after the failed one do not run; poststop does"
    );
    assert!(env.state("c2").is_none(), "no container is left");
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "no husk-vmm is left: {:?}",
        env.vmms_left()
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.mounts_left().is_empty(), "{:?}", env.mounts_left());
}

#[test]
fn a_failing_poststart_hook_warns_and_the_container_runs() {
    let Some(env) = OciEnv::new("a_failing_poststart_hook_warns_and_the_container_runs") else {
        return;
    };
    let log = env.work.path().join("hooks.log");
    let bundle = env.bundle("warned", &["sh", "-c", "echo ran; exit 3"], |spec| {
        spec["hooks"] = json!({
            "poststart": [
                logging_hook("poststart", &log, "exit 1"),
                logging_hook("poststart", &log, ""),
            ],
            "poststop": [logging_hook("poststop", &log, "exit 1")],
        });
    });
    let out = env.run(&["run", "--bundle", bundle.to_str().expect("utf-8"), "c3"]);
    assert_eq!(out.status.code(), Some(3), "run: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\n");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("poststart hook 0") && stderr.contains("poststop hook 0"),
        "each failure is a warning: {stderr}"
    );
    let kinds: Vec<String> = hook_log(&log).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["poststart", "poststart", "poststop"]);
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

#[test]
fn a_namespace_path_of_the_wrong_type_fails_create() {
    let Some(env) = OciEnv::new("a_namespace_path_of_the_wrong_type_fails_create") else {
        return;
    };
    let bundle = env.bundle("wrongns", &["true"], |spec| {
        let namespaces = spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces");
        namespaces.retain(|ns| ns["type"] != "network");
        namespaces.push(json!({"type": "network", "path": "/proc/self/ns/ipc"}));
    });
    let out = env.run(&["create", "--bundle", bundle.to_str().expect("utf-8"), "c4"]);
    assert!(!out.status.success(), "create must fail");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("namespace network path /proc/self/ns/ipc")
            && stderr.contains("a namespace of type ipc, not network"),
        "{stderr}"
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.vmms_left().is_empty());
}

#[test]
fn podman_oci_hooks_run_through_husk() {
    let test = "podman_oci_hooks_run_through_husk";
    let Some(env) = OciEnv::new(test) else {
        return;
    };
    if !husk_tests::oci::client_available(test, "podman") {
        return;
    }
    let podman = env.podman_with_busybox();
    // A hook as tools ship them: a JSON file in a hooks directory, added by podman to the
    // spec of every container it runs.
    let hooks_dir = env.work.path().join("hooks.d");
    std::fs::create_dir_all(&hooks_dir).expect("hooks dir");
    let log = env.work.path().join("podman-hooks.log");
    for (name, stage) in [("a-prestart", "prestart"), ("b-poststop", "poststop")] {
        let hook = json!({
            "version": "1.0.0",
            "hook": logging_hook(stage, &log, ""),
            "when": {"always": true},
            "stages": [stage],
        });
        std::fs::write(hooks_dir.join(format!("{name}.json")), hook.to_string())
            .expect("hook file");
    }
    let hooks_flag = format!("--hooks-dir={}", hooks_dir.display());
    let out = podman.run(&[
        &hooks_flag,
        "run",
        "--rm",
        "--network=none",
        "localhost/bb",
        "echo",
        "hooked",
    ]);
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hooked\n");
    let seen = hook_log(&log);
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["prestart", "poststop"], "{seen:?}");
    assert_eq!(seen[0].1["status"], "creating");
    assert_eq!(seen[1].1["status"], "stopped");
    assert_eq!(seen[0].1["id"], seen[1].1["id"]);
}

/// Runs a container that prints its share's readahead (KiB), `/data/f` and `/etc/probe` (one a
/// bind mount of a host directory, the other in the rootfs), then polls `/data/f` until it reads `v2` (printing
/// `bind-seen`), waits 3 s and prints `/etc/probe` again. Once the first two lines are out,
/// the host rewrites both files. Returns the output and how long after the host's write
/// `bind-seen` appeared.
fn watch_host_changes(env: &OciEnv, name: &str, annotations: Value) -> (String, Duration) {
    let data = env.work.path().join(format!("data-{name}"));
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("f"), "v1\n").expect("write f");
    let probe = env.rootfs().join("etc/probe");
    std::fs::write(&probe, "r1\n").expect("write probe");
    let script = "echo readahead $(cat /sys/class/bdi/0:$(stat -c %d /)/read_ahead_kb); \
        cat /data/f /etc/probe; i=0; \
        while [ $i -lt 600 ]; do i=$((i+1)); \
        if [ \"$(cat /data/f)\" = v2 ]; then echo bind-seen; break; fi; sleep 0.05; done; \
        sleep 3; echo probe-now $(cat /etc/probe)";
    let data_str = data.display().to_string();
    let bundle = env.bundle(name, &["sh", "-c", script], |spec| {
        spec["annotations"] = annotations;
        spec["mounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"destination": "/data", "type": "bind", "source": data_str, "options": ["rbind", "rw"]}));
    });
    let out_path = env.work.path().join(format!("{name}.out"));
    let mut child = env
        .husk(&["run", "--bundle", bundle.to_str().expect("utf-8"), name])
        .stdout(std::fs::File::create(&out_path).expect("out file"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("husk run");
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        wait_until(T, || read().contains("r1")),
        "{name}: the container never printed its files: {:?}\n{}",
        read(),
        env.logs()
    );
    // Same sizes, new contents (and mtimes), same inodes.
    std::fs::write(data.join("f"), "v2\n").expect("rewrite f");
    std::fs::write(&probe, "r2\n").expect("rewrite probe");
    let written = std::time::Instant::now();
    let seen = wait_until(T, || read().contains("bind-seen"));
    let after = written.elapsed();
    assert!(
        seen,
        "{name}: the bind mount's change was never seen: {:?}",
        read()
    );
    let status = child.wait().expect("wait husk run");
    assert!(
        status.success(),
        "{name}: {status}: {:?}\n{}",
        read(),
        env.logs()
    );
    (read(), after)
}

#[test]
fn host_changes_are_seen_as_the_cache_policy_says() {
    let Some(env) = OciEnv::new("host_changes_are_seen_as_the_cache_policy_says") else {
        return;
    };
    // The default (`auto`): a bind mount is cached for 1 s, the rootfs for a day.
    let (out, after) = watch_host_changes(&env, "auto", json!({}));
    // The documented second, plus the rig's slow polling loop (each round forks `cat`).
    assert!(
        after < Duration::from_secs(5),
        "the bind mount's change took {after:?} to be seen (1 s documented): {out}"
    );
    // The share reads ahead 1 MiB (the agent widens the kernel's 128 KiB).
    assert!(out.contains("readahead 1024"), "{out}");
    assert!(
        out.contains("probe-now r1"),
        "the rootfs is cached: a change the host made under the running container is not seen: {out}"
    );
    // `short`: the rootfs too is revalidated after a second.
    let (out, _) = watch_host_changes(&env, "short", json!({"io.husk.fs.cache": "short"}));
    assert!(
        out.contains("probe-now r2"),
        "with io.husk.fs.cache=short the rootfs change is seen: {out}"
    );
    // A value that is neither fails `create` by name.
    let bundle = env.bundle("bad-cache", &["true"], |spec| {
        spec["annotations"] = json!({"io.husk.fs.cache": "forever"});
    });
    let out = env.run(&[
        "run",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "bad-cache",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("io.husk.fs.cache=\"forever\": expected auto or short"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        env.root_entries().is_empty(),
        "nothing is left: {:?}",
        env.root_entries()
    );
}

/// The value of `key` in `/proc/<pid>/status` (or a task's).
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_string()
}

/// The names in directory `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// husk-vmm runs in its jail (husk_vmm::jail): mount, ipc and uts namespaces of its own, no
/// reach to the host's abstract sockets (Landlock scopes or a network namespace of its own:
/// through the test hook, it tries to connect to one the test listens on), a pid namespace
/// where it is pid 1 (the runtime spawns it there), a root that holds only its state
/// directory and /dev/kvm, none of the container's files (it serves them through descriptors
/// opened before), and the container still works.
#[test]
fn the_vmm_runs_in_its_jail() {
    use std::os::linux::net::SocketAddrExt;
    let Some(env) = OciEnv::new("the_vmm_runs_in_its_jail") else {
        return;
    };
    let bundle = env.bundle("jailed", &["sleep", "1000"], |spec| {
        spec["root"]["readonly"] = json!(false);
    });
    let socket_name = format!("husk-test-jail-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&socket_name).expect("name");
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).expect("abstract socket");
    listener.set_nonblocking(true).expect("non-blocking");
    let pid_file = env.work.path().join("jailed.pid");
    let out = create_with_hook(
        &env,
        "jailed",
        &bundle,
        Some(&pid_file),
        (husk_vmm::jail::TEST_ABSTRACT_SOCKET_ENV, &socket_name),
    );
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let pid: u32 = husk_tests::oci::pid_in(&pid_file);
    let out = env.run(&["start", "jailed"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let ns = |pid: &str, kind: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("namespace link")
    };
    for kind in ["mnt", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "husk-vmm's {kind} namespace is the host's"
        );
    }
    // The host's abstract socket: husk-vmm tried it once confined, and did not get through.
    let log = std::fs::read_to_string(env.root.path().join("jailed/vmm.log")).expect("vmm.log");
    assert!(
        log.contains(husk_vmm::jail::TEST_ABSTRACT_SOCKET_REFUSED),
        "husk-vmm did not say its test hook was refused: {log}"
    );
    assert_eq!(
        listener.accept().map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "husk-vmm reached the host's abstract socket"
    );
    // Its own pid namespace, where it is pid 1 and sees no other process.
    assert_ne!(ns(&pid.to_string(), "pid"), ns("self", "pid"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("an NSpid line");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "husk-vmm's pids, outside and inside"
    );

    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let state = env.root.path().join("jailed");
    let first = state
        .components()
        .nth(1)
        .expect("an absolute state directory")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let mut top = vec!["dev".to_string(), first];
    top.sort();
    assert_eq!(names_in(&root), top, "the jail's root");
    assert_eq!(names_in(&root.join("dev")), ["kvm"], "the jail's /dev");
    assert!(!root.join("etc/passwd").exists());
    // The state directory as on the host...
    let inside = root.join(state.strip_prefix("/").expect("absolute"));
    assert_eq!(names_in(&inside), names_in(&state), "the state directory");
    // ...but not the container's files mounted below it.
    let rootfs = Path::new("shared/jailed/rootfs/bin/busybox");
    assert!(state.join(rootfs).exists(), "the share on the host");
    assert!(!inside.join(rootfs).exists(), "the rootfs is in the jail");
    // Mounts: the root, the state directory, /dev/kvm.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    assert_eq!(mounts.lines().count(), 3, "{mounts}");
    assert!(
        mounts
            .lines()
            .any(|m| m.contains(" / / ro,") && m.contains(" - tmpfs ")),
        "no read-only tmpfs root: {mounts}"
    );

    // The file server still serves the rootfs, reads and writes.
    let out = env.run(&[
        "exec",
        "jailed",
        "sh",
        "-c",
        "echo jailed > /tmp/f && cat /tmp/f && ls /bin/busybox",
    ]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "jailed\n/bin/busybox\n");
    let out = env.run(&["delete", "--force", "jailed"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_nothing_left("after the jailed container");
}

/// The whole disk (`major:minor`) that holds `path`, or `None` for a file system on no block
/// device (tmpfs).
fn disk_of(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).expect("stat").dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let disk = if sys.join("partition").exists() {
        sys.join("..")
    } else {
        sys
    };
    let text = std::fs::read_to_string(disk.join("dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// husk-vmm runs in the host cgroup the spec names (where runc puts the container's
/// processes): its memory capped at the guest's plus husk's overhead, the spec's blockIO written
/// as runc writes it on cgroup v2 and biting on the container's file reads (they are the VMM's
/// on the host), `husk update --blkio-weight` reaching it, and the cgroup gone after delete.
/// Without a path, husk's own place. A blockIO the kernel refuses fails create, naming it, and
/// leaves nothing.
#[test]
fn the_vmm_runs_in_its_host_cgroup_with_its_limits() {
    let Some(env) = OciEnv::new("the_vmm_runs_in_its_host_cgroup_with_its_limits") else {
        return;
    };
    let cgroups = Path::new(husk::host_cgroup::CGROUP_ROOT);
    let parent = format!("husk-test-{}", std::process::id());
    let leaf = format!("{parent}/limited");
    // The data the container reads lies on a disk (the rig's work disk; tmpfs has none).
    let data = [
        std::env::var_os("HUSK_RIG_OUT").map(std::path::PathBuf::from),
        Some(env.work.path().to_path_buf()),
        Some(std::path::PathBuf::from("/var/tmp")),
    ]
    .into_iter()
    .flatten()
    .find_map(|dir| {
        let data = dir.join(format!("cgroup-data-{}", std::process::id()));
        std::fs::create_dir_all(&data).ok()?;
        match disk_of(&data) {
            Some(disk) => Some((data, disk)),
            None => {
                let _ = std::fs::remove_dir(&data);
                None
            }
        }
    });
    let (data_dir, (major, minor)) = data.unwrap_or_else(|| {
        eprintln!("NOTE: no directory on a block device: the throttle is checked on 1:0 only");
        (env.work.path().join("data"), (1, 0))
    });
    std::fs::create_dir_all(&data_dir).expect("data dir");
    {
        use std::io::Write;
        let mut blob = std::fs::File::create(data_dir.join("blob")).expect("8 MiB file");
        blob.write_all(&vec![7u8; 8 << 20]).expect("8 MiB file");
        // On the disk, not dirty in the page cache, which dropping caches would keep.
        blob.sync_all().expect("sync the 8 MiB file");
    }
    let bundle = env.bundle("limited", &["sleep", "1000"], |spec| {
        spec["linux"]["cgroupsPath"] = json!(format!("/{leaf}"));
        spec["annotations"]["io.husk.vm.mem_mib"] = json!("160");
        spec["linux"]["resources"]["blockIO"] = json!({
            "weight": 300,
            "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1048576}],
            "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 100}]
        });
        spec["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/data",
            "type": "bind",
            "source": data_dir,
            "options": ["rbind", "ro"]
        }));
    });
    let pid = env.create_with_pid("limited", &bundle);
    let cgroup = cgroups.join(&leaf);
    let read = |file: &str| {
        std::fs::read_to_string(cgroup.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", cgroup.display()))
    };
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of husk-vmm"),
        format!("0::/{leaf}\n")
    );
    // The guest's 160 MiB, the VMM's overhead, and 4 KiB for each of the 96 inodes per guest
    // MiB its share may hold.
    let cap = ((160 + husk::host_cgroup::VMM_MEM_OVERHEAD_MIB) << 20) + 160 * 96 * 4096;
    assert_eq!(read("memory.max").trim(), cap.to_string());
    let io_max = read("io.max");
    assert!(
        io_max.contains(&format!(
            "{major}:{minor} rbps=1048576 wbps=max riops=max wiops=100"
        )),
        "io.max: {io_max}"
    );
    // runc's way: BFQ's weight where the disk's scheduler is BFQ, else io.weight converted.
    let weight = |bfq: u64| {
        if cgroup.join("io.bfq.weight").exists() {
            (read("io.bfq.weight"), bfq)
        } else {
            (read("io.weight"), 1 + (bfq - 10) * 9999 / 990)
        }
    };
    let (set, want) = weight(300);
    assert!(set.contains(&format!("default {want}")), "{set}");
    let out = env.run(&["start", "limited"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));

    // The container's first read of the file is the VMM's read of the disk: throttled.
    if major != 1 {
        // SAFETY: sync(2) takes no arguments and only flushes.
        unsafe { libc::sync() };
        let drop = std::fs::write("/proc/sys/vm/drop_caches", "3");
        assert!(drop.is_ok(), "dropping the host's page cache: {drop:?}");
        let began = std::time::Instant::now();
        let out = env.run(&["exec", "limited", "sh", "-c", "cat /data/blob | wc -c"]);
        let took = began.elapsed();
        assert!(out.status.success(), "exec: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), (8u64 << 20).to_string());
        // 8 MiB at 1 MiB/s: at least 4 s even with the throttle's first slices.
        assert!(
            took >= Duration::from_secs(4),
            "8 MiB read in {took:?} under a 1 MiB/s read throttle"
        );
    }

    let out = env.run(&["update", "--blkio-weight", "500", "limited"]);
    assert!(out.status.success(), "update: {}", text(&out.stderr));
    let (set, want) = weight(500);
    assert!(
        set.contains(&format!("default {want}")),
        "after update: {set}"
    );

    // Without a path: husk's own place, gone with the container too.
    let bundle = env.bundle("unplaced", &["sleep", "1000"], |_| {});
    let unplaced = env.create_with_pid("unplaced", &bundle);
    let own = std::fs::read_to_string(format!("/proc/{unplaced}/cgroup")).expect("cgroup");
    assert!(
        own.starts_with("0::/husk/") && own.trim_end().ends_with("-unplaced"),
        "{own}"
    );
    assert_eq!(env.cgroups_left().len(), 1, "{:?}", env.cgroups_left());

    for id in ["limited", "unplaced"] {
        let out = env.run(&["delete", "--force", id]);
        assert!(out.status.success(), "delete {id}: {}", text(&out.stderr));
    }
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    env.assert_nothing_left("after the limited containers");

    // A device the kernel does not have: create fails naming it, and leaves nothing.
    let bundle = env.bundle("nodisk", &["sleep", "1000"], |spec| {
        spec["linux"]["cgroupsPath"] = json!(format!("/{parent}/nodisk"));
        spec["linux"]["resources"]["blockIO"] = json!({
            "throttleReadBpsDevice": [{"major": 4000, "minor": 4000, "rate": 1}]
        });
    });
    let out = env.run(&[
        "create",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "nodisk",
    ]);
    assert!(
        !out.status.success(),
        "create with a missing disk succeeded"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("blockIO") && err.contains("4000:4000"),
        "{err}"
    );
    assert!(!cgroups.join(&parent).join("nodisk").exists());
    env.assert_nothing_left("after the refused blockIO");
    let _ = std::fs::remove_dir(cgroups.join(&parent));
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn the_vmm_keeps_only_the_file_servers_capabilities() {
    use std::os::unix::fs::MetadataExt;
    let Some(env) = OciEnv::new("the_vmm_keeps_only_the_file_servers_capabilities") else {
        return;
    };
    let bundle = env.bundle("caps", &["sleep", "1000"], |spec| {
        spec["root"]["readonly"] = json!(false);
        // Root in the container may chown and override permissions, as under docker's defaults.
        let caps = json!([
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_SETUID",
            "CAP_SETGID"
        ]);
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = caps.clone();
        }
    });
    let pid = env.create_with_pid("caps", &bundle);
    let out = env.run(&["start", "caps"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, SETGID, SETUID: see husk_vmm::confine.
    let kept = format!("{:016x}", husk_vmm::confine::kept_mask());
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(status_field(&status, set), kept, "{set} of husk-vmm");
    }
    for set in ["CapInh:", "CapAmb:"] {
        assert_eq!(
            status_field(&status, set),
            "0000000000000000",
            "{set} of husk-vmm"
        );
    }
    // An unprivileged uid and gid on the host (real, effective, saved, file system), root of a
    // user namespace of its own that maps 2^28 ids onto them (husk_vmm::userns).
    let base = husk_vmm::userns::DEFAULT_UID_BASE.to_string();
    for ids in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(ids)).expect(ids);
        let values: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(values, [base.as_str(); 4], "{line}");
    }
    assert_eq!(status_field(&status, "Groups:"), "", "{status}");
    for map in ["uid_map", "gid_map"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{map}")).expect(map);
        let fields: Vec<&str> = text.split_whitespace().collect();
        let count = husk_vmm::userns::ID_COUNT.to_string();
        assert_eq!(
            fields,
            ["0", base.as_str(), count.as_str()],
            "{map} of husk-vmm"
        );
    }
    let mut vcpus = 0;
    let mut devices = 0;
    let mut file_servers = 0;
    let mut relays = 0;
    let mut supervisors = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm.starts_with("kvm-") {
            continue; // KVM's own worker (kvm-nx-lpage-recovery) runs no code of husk's
        }
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        // Every thread is under seccomp (mode 2, filters): the process list (which answers
        // clone3 itself); the main thread, the device, file server and vCPU threads and the
        // agent's clients (the supervisor, the readiness or renewal watcher) their own list
        // on top; the stdio relays theirs on the supervisor's, which starts them
        // (husk_vmm::seccomp).
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{comm}");
        let main_thread = task.file_name() == Some(std::ffi::OsStr::new(&pid.to_string()));
        let filters = match comm {
            _ if main_thread => "2",
            "husk-devices" | "husk-fs" | "husk-supervisor" | "husk-ready" | "husk-renew" => "2",
            vcpu if vcpu.starts_with("husk-vcpu-") => "2",
            "husk-stdin" | "husk-stdout" | "husk-stderr" => {
                relays += 1;
                "3"
            }
            other => panic!("a husk-vmm thread of an unknown kind: {other}"),
        };
        assert_eq!(status_field(&status, "Seccomp_filters:"), filters, "{comm}");
        if comm == "husk-supervisor" {
            supervisors += 1;
        }
        if comm == "husk-fs" {
            file_servers += 1;
        }
        if comm == "husk-devices" {
            devices += 1;
        }
        // Only the file server's thread (and the main thread and the agent's clients, which
        // start none that serves the guest) keep capabilities: the vCPU and device threads
        // drop them.
        if comm.starts_with("husk-vcpu-") || comm == "husk-devices" {
            assert_eq!(
                status_field(&status, "CapEff:"),
                "0000000000000000",
                "{comm}"
            );
            assert_eq!(
                status_field(&status, "CapPrm:"),
                "0000000000000000",
                "{comm}"
            );
            if comm != "husk-devices" {
                vcpus += 1;
            }
        }
    }
    assert!(vcpus >= 1, "no vCPU thread found under /proc/{pid}/task");
    assert_eq!(devices, 1, "the device thread under /proc/{pid}/task");
    assert_eq!(
        file_servers, 1,
        "the file server's thread under /proc/{pid}/task"
    );
    assert_eq!(supervisors, 1, "the supervisor under /proc/{pid}/task");
    // stdin's relay ends at the end of its input (here /dev/null); stdout's and stderr's last.
    assert!(
        relays >= 2,
        "the stdout and stderr relays under /proc/{pid}/task"
    );

    // What the guest's root does on the share still works with what is left: a directory that
    // only its (other) owner may enter, written into as root; chown; chmod of another's file.
    let script = "mkdir /d && chown 1234:1234 /d && chmod 700 /d && echo x > /d/f && \
                  chown 4321:4321 /d/f && chmod 640 /d/f && cat /d/f && ls -ln /d/f";
    let out = env.run(&["exec", "caps", "sh", "-c", script]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "exec: {shown} {}", text(&out.stderr));
    assert!(
        shown.starts_with("x\n-rw-r-----    1 4321     4321"),
        "{shown}"
    );
    // On the host the files have the ids the guest gave them, not husk-vmm's: the share is an
    // idmapped mount through its namespace. A file the guest's root makes is root's.
    let out = env.run(&["exec", "caps", "touch", "/r"]);
    assert!(out.status.success(), "touch: {}", text(&out.stderr));
    for (path, ids) in [("d", (1234, 1234)), ("d/f", (4321, 4321)), ("r", (0, 0))] {
        let rootfs = env.work.path().join("rootfs");
        let meta = std::fs::metadata(rootfs.join(path)).expect(path);
        assert_eq!((meta.uid(), meta.gid()), ids, "owner of {path} on the host");
    }
    // And the permission checks are still the guest user's: another user is refused.
    let out = env.run(&["exec", "--user", "65534:65534", "caps", "cat", "/d/f"]);
    assert!(
        !out.status.success(),
        "uid 65534 read /d/f: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["delete", "--force", "caps"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
}

/// `husk create --bundle BUNDLE [--pid-file FILE] ID` with a test hook armed: `hook_env=hook`
/// in its environment (husk-vmm inherits it).
fn create_with_hook(
    env: &OciEnv,
    id: &str,
    bundle: &Path,
    pid_file: Option<&Path>,
    (hook_env, hook): (&str, &str),
) -> std::process::Output {
    let mut args = vec!["create", "--bundle", bundle.to_str().expect("utf-8")];
    if let Some(file) = pid_file {
        args.extend(["--pid-file", file.to_str().expect("utf-8")]);
    }
    args.push(id);
    let mut create = env.husk(&args);
    create.env(hook_env, hook);
    husk_tests::oci::output_of(create, env.work.path())
}

/// Through the test hook (`HUSK_VMM_TEST_FORBIDDEN_SYSCALL=sigusr2`), a running container's
/// husk-vmm calls `personality(2)` on SIGUSR2: the seccomp filter ends it, `husk state` says
/// stopped and why, the report names the call, and `delete` leaves nothing.
#[test]
fn a_call_outside_the_seccomp_lists_ends_the_vmm_and_is_reported() {
    let Some(env) = OciEnv::new("a_call_outside_the_seccomp_lists_ends_the_vmm_and_is_reported")
    else {
        return;
    };
    let bundle = env.bundle("trap", &["sleep", "1000"], |_| {});
    let pid_file = env.work.path().join("trap.pid");
    let out = create_with_hook(
        &env,
        "trap",
        &bundle,
        Some(&pid_file),
        (
            husk_vmm::seccomp::TEST_HOOK_ENV,
            husk_vmm::seccomp::HOOK_SIGUSR2,
        ),
    );
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let pid: libc::pid_t = husk_tests::oci::pid_in(&pid_file);
    let out = env.run(&["start", "trap"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    assert!(env.wait_status("trap", "running", T), "{}", env.logs());
    // SAFETY: kill(2) with plain integers.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR2) };
    assert_eq!(
        rc,
        0,
        "SIGUSR2 to husk-vmm: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        env.wait_status("trap", "stopped", T),
        "the VMM outlived its forbidden call: {}",
        env.logs()
    );
    let out = env.run(&["state", "trap"]);
    assert!(out.status.success(), "state: {}", text(&out.stderr));
    let expected =
        "husk-vmm was killed by its seccomp filter: syscall 135 (personality) in a main \
                    thread";
    assert!(
        text(&out.stderr).contains(expected),
        "husk state does not say why: {}",
        text(&out.stderr)
    );
    let report = env.root.path().join("trap").join("seccomp-report");
    assert_eq!(
        std::fs::read_to_string(&report).expect("report").trim(),
        expected
    );
    assert!(env.logs().contains(expected), "vmm.log: {}", env.logs());
    let out = env.run(&["delete", "trap"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_nothing_left("after delete");
}

/// The device thread's own list: with the hook at `devices`, the device thread's forbidden
/// call ends husk-vmm while the guest boots, and `husk create` fails naming it, leaving
/// nothing behind.
#[test]
fn a_forbidden_call_on_the_device_thread_fails_create_naming_it() {
    let Some(env) = OciEnv::new("a_forbidden_call_on_the_device_thread_fails_create_naming_it")
    else {
        return;
    };
    let bundle = env.bundle("trapdev", &["true"], |_| {});
    let out = create_with_hook(
        &env,
        "trapdev",
        &bundle,
        None,
        (
            husk_vmm::seccomp::TEST_HOOK_ENV,
            husk_vmm::seccomp::HOOK_DEVICES,
        ),
    );
    assert!(!out.status.success(), "create succeeded");
    let expected = "husk-vmm was killed by its seccomp filter: syscall 135 (personality) in a \
                    devices thread";
    assert!(
        text(&out.stderr).contains(expected),
        "create does not say why: {}",
        text(&out.stderr)
    );
    env.assert_nothing_left("after the failed create");
}

/// The agent ended from inside the guest: with the agent's test hook
/// (`HUSK_VMM_TEST_AGENT_HOOK=exit-on-exec`; no container can reach the agent), an exec of
/// `husk-test-agent-exit` makes the agent exit as if it crashed. The guest kernel panics (the
/// agent is its init) and the VM ends: the exec fails, `husk state` says stopped, husk-vmm
/// is gone and says why in its log, and `delete` leaves nothing.
#[test]
fn the_agent_ending_inside_the_guest_stops_the_container() {
    let Some(env) = OciEnv::new("the_agent_ending_inside_the_guest_stops_the_container") else {
        return;
    };
    // The hook goes on a booted guest's command line: a template's is fixed.
    let bundle = env.bundle("agentend", &["sleep", "1000"], |spec| {
        spec["annotations"] = json!({"io.husk.vm.warm_start": "false"});
    });
    let pid_file = env.work.path().join("agentend.pid");
    let out = create_with_hook(
        &env,
        "agentend",
        &bundle,
        Some(&pid_file),
        (
            husk_vmm::config::AGENT_TEST_HOOK_ENV,
            husk_agent_protocol::TEST_HOOK_EXIT_ON_EXEC,
        ),
    );
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let pid: u32 = husk_tests::oci::pid_in(&pid_file);
    let out = env.run(&["start", "agentend"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    assert!(env.wait_status("agentend", "running", T), "{}", env.logs());
    let out = env.run(&["exec", "agentend", "true"]);
    assert!(
        out.status.success(),
        "an exec before: {}",
        text(&out.stderr)
    );

    let out = env.run(&["exec", "agentend", husk_agent_protocol::TEST_EXIT_COMMAND]);
    assert!(
        !out.status.success(),
        "the exec that ends the agent succeeded"
    );
    assert!(
        env.wait_status("agentend", "stopped", T),
        "the container outlived its agent: {}",
        env.logs()
    );
    assert!(
        wait_until(T, || !husk_tests::process_alive(pid)),
        "husk-vmm {pid} outlived its guest"
    );
    assert!(
        env.logs().contains("guest crashed"),
        "vmm.log does not say the guest ended: {}",
        env.logs()
    );
    let out = env.run(&["exec", "agentend", "true"]);
    assert!(!out.status.success(), "an exec into the stopped container");
    let out = env.run(&["delete", "agentend"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_nothing_left("after the agent ended");
}

/// How many lifecycles [`a_hundred_parallel_lifecycles_leave_nothing`] runs
/// (`HUSK_TEST_LIFECYCLES`, default 100), and how many at once.
fn lifecycles() -> usize {
    std::env::var("HUSK_TEST_LIFECYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}
const LIFECYCLES_IN_FLIGHT: usize = 8;

/// The steps of [`lifecycle`], in order.
const LIFECYCLE_STEPS: [&str; 5] = ["create", "start", "exec", "kill", "delete"];

/// Each step's times in seconds, with the container's id, by [`LIFECYCLE_STEPS`] index.
type StepTimes = std::sync::Mutex<[Vec<(f64, String)>; LIFECYCLE_STEPS.len()]>;

/// One container's whole life through the CLI: create, start, exec, kill, delete. Each step's
/// time goes into `times`.
fn lifecycle(env: &OciEnv, bundle: &str, id: &str, times: &StepTimes) -> Result<(), String> {
    let step = |args: &[&str]| {
        let began = std::time::Instant::now();
        let out = env.run(args);
        let took = began.elapsed().as_secs_f64();
        let index = LIFECYCLE_STEPS
            .iter()
            .position(|s| *s == args[0])
            .expect("a lifecycle step");
        times.lock().unwrap_or_else(|p| p.into_inner())[index].push((took, id.to_string()));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} after {took:.1} s: {}",
                args[0],
                text(&out.stderr).trim()
            ))
        }
    };
    step(&["create", "--bundle", bundle, id])?;
    step(&["start", id])?;
    step(&["exec", id, "true"])?;
    step(&["kill", id, "KILL"])?;
    if !env.wait_status(id, "stopped", T) {
        return Err(format!("not stopped after kill: {:?}", env.state(id)));
    }
    step(&["delete", id])
}

/// 100 lifecycles (create, start, exec, kill, delete), 8 in flight: every step of every one
/// works, and afterwards nothing is left: no state (sockets included), mount or husk-vmm.
#[test]
fn a_hundred_parallel_lifecycles_leave_nothing() {
    let Some(env) = OciEnv::new("a_hundred_parallel_lifecycles_leave_nothing") else {
        return;
    };
    let bundle = env.bundle("life", &["sleep", "1000"], |_| {});
    let bundle = bundle.to_str().expect("utf-8").to_string();
    let total = lifecycles();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    let times = StepTimes::default();
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..LIFECYCLES_IN_FLIGHT {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let id = format!("life{i}");
                if let Err(e) = lifecycle(&env, &bundle, &id, &times) {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{id}: {e}"));
                }
            });
        }
    });
    eprintln!(
        "{total} lifecycles, {LIFECYCLES_IN_FLIGHT} in flight: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // How each step's times spread, so that a step creeping towards a timeout shows before it
    // fails, and a stall stands apart from the rest.
    let times = times.into_inner().unwrap_or_else(|p| p.into_inner());
    for (step, mut times) in LIFECYCLE_STEPS.iter().zip(times) {
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].0;
        if let Some(slowest) = times
            .iter()
            .rev()
            .take(5)
            .map(|(t, id)| format!("{t:.1} ({id})"))
            .reduce(|a, b| format!("{a}, {b}"))
        {
            eprintln!(
                "  {step}: median {:.1} s, p90 {:.1} s; slowest: {slowest}",
                at(0.5),
                at(0.9)
            );
        }
    }
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        failures.is_empty(),
        "{} of {total} lifecycles failed: {failures:#?}\n{}",
        failures.len(),
        env.logs()
    );
    env.assert_nothing_left(&format!("after {total} lifecycles"));
}

/// `husk-vmm`'s resident memory in MiB (`VmRSS`; guest memory the guest touched is most of it).
fn vmm_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("VMM status");
    let kib: u64 = status_field(&status, "VmRSS:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmRSS in kB");
    kib >> 10
}

#[test]
fn a_guest_hands_back_the_memory_it_frees() {
    let Some(env) = OciEnv::new("a_guest_hands_back_the_memory_it_frees") else {
        return;
    };
    let bundle = env.bundle("freeing", &["sleep", "1000"], |spec| {
        spec["annotations"]["io.husk.vm.mem_mib"] = json!("512");
        spec["mounts"].as_array_mut().expect("mounts").push(json!({
            "destination": "/fill",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["size=300m"]
        }));
    });
    let pid = env.create_with_pid("freeing", &bundle);
    let out = env.run(&["start", "freeing"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let idle = vmm_rss_mib(pid);
    // 200 MiB of guest memory taken (tmpfs pages) and still held.
    let out = env.run(&[
        "exec",
        "freeing",
        "dd",
        "if=/dev/zero",
        "of=/fill/blob",
        "bs=1048576",
        "count=200",
    ]);
    assert!(out.status.success(), "dd: {}", text(&out.stderr));
    let full = vmm_rss_mib(pid);
    assert!(
        full >= idle + 190,
        "the guest's 200 MiB did not reach the host: VMM RSS {idle} -> {full} MiB"
    );
    let out = env.run(&["exec", "freeing", "rm", "/fill/blob"]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    let freed = std::time::Instant::now();
    let mut last = full;
    let given_back = wait_until(Duration::from_secs(10), || {
        last = vmm_rss_mib(pid);
        full - last.min(full) >= 150
    });
    eprintln!(
        "VMM RSS: idle {idle} MiB, holding 200 MiB {full} MiB, {last} MiB after {:.1} s",
        freed.elapsed().as_secs_f64()
    );
    assert!(
        given_back,
        "the guest freed 200 MiB and the host got {} MiB back in 10 s (VMM RSS {full} -> {last} MiB)",
        full - last.min(full)
    );
    let out = env.run(&["delete", "--force", "freeing"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_nothing_left("after the freeing container");
}
