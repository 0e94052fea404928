//! The OCI runtime CLI end to end: `husk` drives real microVMs the way podman and docker drive
//! runc (lifecycle, exit statuses, bad input, concurrency, a VMM killed under a container).

use husk_tests::oci::{
    client_available, husk_state_dirs, logs_under, output_of, vmms_mentioning, with_nofile_limit,
    Dockerd, OciEnv, PtySession,
};
use husk_tests::{process_alive, wait_until};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn lifecycle_create_start_kill_delete() {
    let Some(env) = OciEnv::new("lifecycle_create_start_kill_delete") else {
        return;
    };
    let bundle = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let pid = env.create_with_pid("c1", &bundle);
    assert!(process_alive(pid), "the container's pid lives");
    let state = env.state("c1").expect("state");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], "c1");
    assert_eq!(state["bundle"], bundle.to_str().expect("utf-8"));

    let out = env.run(&["start", "c1"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    assert_eq!(env.state("c1").expect("state")["status"], "running");

    let out = env.run(&["ps", "--format", "json", "c1"]);
    assert!(out.status.success(), "ps: {}", text(&out.stderr));
    let pids: Vec<i32> = serde_json::from_slice(&out.stdout).expect("pid list");
    assert!(!pids.is_empty());

    let out = env.run(&["exec", "c1", "sh", "-c", "echo inside; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "inside\n");

    let out = env.run(&["list", "-q"]);
    assert_eq!(text(&out.stdout), "c1\n");

    let out = env.run(&["kill", "c1", "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert!(env.wait_status("c1", "stopped", T), "stopped after SIGKILL");
    assert_eq!(env.state("c1").expect("state")["pid"], 0);
    assert!(wait_until(T, || !process_alive(pid)), "husk-vmm exits");

    let out = env.run(&["delete", "c1"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert!(env.state("c1").is_none());
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.mounts_left().is_empty(), "{:?}", env.mounts_left());
}

#[test]
fn run_mirrors_exit_codes_stdio_and_signals() {
    let Some(env) = OciEnv::new("run_mirrors_exit_codes_stdio_and_signals") else {
        return;
    };
    let exit42 = env.bundle(
        "exit42",
        &["sh", "-c", "echo out; echo err >&2; exit 42"],
        |_| {},
    );
    let out = env.run(&["run", "--bundle", exit42.to_str().expect("utf-8"), "r42"]);
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    assert!(env.root_entries().is_empty(), "run deletes the container");

    // stdin reaches the container and EOF ends it.
    let cat = env.bundle("cat", &["sh", "-c", "cat; echo done"], |_| {});
    let mut child = env
        .husk(&["run", "--bundle", cat.to_str().expect("utf-8"), "rcat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "hello\ndone\n");

    // runc: a container killed by SIGKILL makes `run` exit 137. (The container's init is pid 1
    // of its pid namespace, so the signal comes from outside, through `husk kill`.)
    let sleep = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let child = env
        .husk(&["run", "--bundle", sleep.to_str().expect("utf-8"), "rkill"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(env.wait_status("rkill", "running", T));
    let out = env.run(&["kill", "rkill", "SIGKILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(out.status.signal().is_none());
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

#[test]
fn output_arrives_while_the_container_runs() {
    let Some(env) = OciEnv::new("output_arrives_while_the_container_runs") else {
        return;
    };
    let bundle = env.bundle("talk", &["sh", "-c", "echo first; sleep 1000"], |_| {});
    let log = env.work.path().join("talk.out");
    let status = env
        .husk(&[
            "run",
            "-d",
            "--bundle",
            bundle.to_str().expect("utf-8"),
            "talk",
        ])
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::null())
        .status()
        .expect("run -d");
    assert!(status.success());
    assert!(
        wait_until(T, || std::fs::read_to_string(&log)
            .is_ok_and(|t| t == "first\n")),
        "output while running: {:?}",
        std::fs::read_to_string(&log)
    );
    let out = env.run(&["delete", "--force", "talk"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn foreground_run_forwards_sigterm() {
    let Some(env) = OciEnv::new("foreground_run_forwards_sigterm") else {
        return;
    };
    let bundle = env.bundle(
        "trap",
        &[
            "sh",
            "-c",
            "trap 'exit 12' TERM; echo ready; while true; do sleep 1; done",
        ],
        |_| {},
    );
    let child = env
        .husk(&["run", "--bundle", bundle.to_str().expect("utf-8"), "trap"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(env.wait_status("trap", "running", T));
    // Give the shell time to install its trap (it prints "ready" first; the pipe is read below).
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ready\n");
}

#[test]
fn bad_input_fails_clearly_and_changes_nothing() {
    let Some(env) = OciEnv::new("bad_input_fails_clearly_and_changes_nothing") else {
        return;
    };
    let good = env.bundle("good", &["sleep", "1000"], |_| {});
    let good_s = good.to_str().expect("utf-8").to_string();
    let fails = |args: &[&str], needle: &str| {
        let out = env.run(args);
        let err = text(&out.stderr);
        // Exactly husk's refusal (exit 1 with its message), never a panic's 101 or a signal.
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} must be refused: {err}"
        );
        assert!(
            err.starts_with("husk: ") && err.contains(needle),
            "{args:?}: stderr {err:?} is not husk's refusal naming {needle:?}"
        );
    };
    let before = env.root_entries();
    fails(
        &["create", "--bundle", "/nonexistent", "x1"],
        "no such directory",
    );
    let empty = env.work.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    fails(
        &["create", "--bundle", empty.to_str().expect("utf-8"), "x1"],
        "no config.json",
    );
    let bad_json = env.work.path().join("badjson");
    std::fs::create_dir_all(&bad_json).expect("mkdir");
    std::fs::write(bad_json.join("config.json"), "{oops").expect("write");
    fails(
        &[
            "create",
            "--bundle",
            bad_json.to_str().expect("utf-8"),
            "x1",
        ],
        "not valid JSON",
    );
    let no_args = env.bundle("noargs", &["true"], |s| {
        s["process"].as_object_mut().expect("object").remove("args");
    });
    fails(
        &["create", "--bundle", no_args.to_str().expect("utf-8"), "x1"],
        "process.args",
    );
    let v2 = env.bundle("v2", &["true"], |s| s["ociVersion"] = "2.0.0".into());
    fails(
        &["create", "--bundle", v2.to_str().expect("utf-8"), "x1"],
        "unsupported ociVersion",
    );
    let no_rootfs = env.bundle("norootfs", &["true"], |s| {
        s["root"]["path"] = "/nonexistent/rootfs".into()
    });
    fails(
        &[
            "create",
            "--bundle",
            no_rootfs.to_str().expect("utf-8"),
            "x1",
        ],
        "rootfs",
    );
    for id in ["a/b", "..", "a..b", ""] {
        fails(&["create", "--bundle", &good_s, id], "container id");
    }
    let not_socket = env.work.path().join("not-a-socket");
    std::fs::write(&not_socket, "").expect("write");
    let tty = env.bundle("tty", &["sh"], |s| s["process"]["terminal"] = true.into());
    fails(
        &[
            "create",
            "--bundle",
            tty.to_str().expect("utf-8"),
            "--console-socket",
            not_socket.to_str().expect("utf-8"),
            "x1",
        ],
        "not a Unix socket",
    );
    fails(
        &["create", "--no-pivot", "--bundle", &good_s, "x1"],
        "--no-pivot",
    );
    fails(&["checkpoint", "x1"], "does not support");
    assert_eq!(env.root_entries(), before, "no state change");

    // The cases that need a container.
    let out = env.run(&["create", "--bundle", &good_s, "dup"]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    fails(&["create", "--bundle", &good_s, "dup"], "already exists");
    assert_eq!(env.state("dup").expect("state")["status"], "created");
    let out = env.run(&["start", "dup"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    fails(&["start", "dup"], "cannot start");
    fails(&["delete", "dup"], "not stopped");
    assert_eq!(env.state("dup").expect("state")["status"], "running");
    let out = env.run(&["kill", "dup", "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert!(env.wait_status("dup", "stopped", T));
    fails(&["exec", "dup", "true"], "cannot exec");
    fails(&["kill", "dup"], "not running");
    fails(&["state", "nope"], "does not exist");
    let out = env.run(&["delete", "dup"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty());
}

#[test]
fn twenty_concurrent_runs_leave_nothing_behind() {
    let Some(env) = OciEnv::new("twenty_concurrent_runs_leave_nothing_behind") else {
        return;
    };
    let bundle = env.bundle("true", &["true"], |s| {
        s["annotations"] = serde_json::json!({"io.husk.vm.mem_mib": "128"});
    });
    let bundle = bundle.to_str().expect("utf-8").to_string();
    let children: Vec<_> = (0..20)
        .map(|i| {
            env.husk(&["run", "--bundle", &bundle, &format!("par{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "par{i}: {}", text(&out.stderr));
    }
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.mounts_left().is_empty(), "{:?}", env.mounts_left());
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "{:?}",
        env.vmms_left()
    );
}

/// `run -d` of a container that sleeps; its pid (husk-vmm's), once it runs.
fn run_sleeping(env: &OciEnv, id: &str) -> i32 {
    let bundle = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let out = env.run(&["run", "-d", "--bundle", bundle.to_str().expect("utf-8"), id]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let state = env.state(id).expect("state");
    assert_eq!(state["status"], "running");
    state["pid"].as_i64().expect("pid") as i32
}

#[test]
fn killing_the_vmm_means_stopped_and_delete_cleans_up() {
    let Some(env) = OciEnv::new("killing_the_vmm_means_stopped_and_delete_cleans_up") else {
        return;
    };
    let pid = run_sleeping(&env, "k9");
    // SAFETY: kill(2) with a pid we read from the state; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(env.wait_status("k9", "stopped", T));
    let out = env.run(&["delete", "k9"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty());
    assert!(env.mounts_left().is_empty(), "{:?}", env.mounts_left());
}

/// A VMM stopped and continued (SIGSTOP and SIGCONT, as a debugger attaching or an operator's
/// `kill -STOP` does) carries on: the sleeps and waits the stop interrupted resume through
/// `restart_syscall`, which its seccomp filters must allow.
#[test]
fn a_vmm_stopped_and_continued_carries_on() {
    let Some(env) = OciEnv::new("a_vmm_stopped_and_continued_carries_on") else {
        return;
    };
    let pid = run_sleeping(&env, "stopcont");
    for _ in 0..2 {
        // SAFETY: kill(2) with a pid we read from the state; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = env.run(&["exec", "stopcont", "echo", "still here"]);
    assert!(
        out.status.success(),
        "exec after SIGSTOP and SIGCONT: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "still here");
    let state = env.state("stopcont").expect("state");
    assert_eq!(state["status"], "running", "{state}");
    let out = env.run(&["delete", "--force", "stopcont"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty());
}

/// A container cannot reach the agent, the guest's PID 1: one that asks for the guest's own pid
/// namespace (where it could signal or trace the agent, or reboot the guest with
/// `CAP_SYS_BOOT`) is refused at `create`, naming why, and leaves nothing behind. (The guest
/// kernel has no magic SysRq either, so no container can take the guest down under the others.)
#[test]
fn a_container_cannot_share_the_agents_pid_namespace() {
    let Some(env) = OciEnv::new("a_container_cannot_share_the_agents_pid_namespace") else {
        return;
    };
    let bundle = env.bundle(
        "near-agent",
        &["sh", "-c", "reboot -f; kill -9 1"],
        |spec| {
            if let Some(all) = spec["linux"]["namespaces"].as_array_mut() {
                all.retain(|ns| ns["type"] != "pid");
            }
            for set in ["bounding", "effective", "permitted"] {
                if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
                    caps.push(serde_json::json!("CAP_SYS_BOOT"));
                }
            }
        },
    );
    let out = env.run(&[
        "create",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "near-agent",
    ]);
    assert!(
        !out.status.success(),
        "create without a pid namespace succeeded"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("without its own pid namespace"),
        "create: {err}"
    );
    env.assert_nothing_left("after the refused container");
}

/// `husk` killed with SIGKILL at each lifecycle step: `create` at four moments (at once, once
/// its state directory exists, once its husk-vmm runs, once the guest's vsock socket exists),
/// `start` (at once and 50 ms on), `exec` (while its process runs) and `delete` (at once, 10
/// and 40 ms on; a command that ended first is said so on stderr). Whatever was done,
/// `husk state` answers, `husk delete --force` succeeds and leaves nothing (no state, mount or
/// husk-vmm), and a container whose `exec` was killed still runs and takes another `exec`.
#[test]
fn killing_husk_at_each_step_leaves_nothing_after_delete_force() {
    let Some(env) = OciEnv::new("killing_husk_at_each_step_leaves_nothing_after_delete_force")
    else {
        return;
    };
    let bundle_path = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let bundle = bundle_path.to_str().expect("utf-8").to_string();
    let root = env.root.path().to_path_buf();
    // Output to files: a pipe would be held open by the husk-vmm the command starts.
    let spawned = std::cell::Cell::new(0);
    let spawn = |args: &[&str]| {
        spawned.set(spawned.get() + 1);
        let log = env
            .work
            .path()
            .join(format!("killed-{}.out", spawned.get()));
        let file = std::fs::File::create(&log).expect("output file");
        env.husk(args)
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn husk")
    };
    let kill = |child: &mut std::process::Child, what: &str| {
        let ended = child.try_wait().expect("try_wait");
        let _ = child.kill();
        let status = child.wait().expect("wait");
        eprintln!(
            "{what}: {}",
            match ended {
                Some(s) => format!("had ended by itself ({s})"),
                None => format!("killed ({status})"),
            }
        );
    };
    let assert_clean_after_delete = |id: &str, what: &str| {
        let out = env.run(&["delete", "--force", id]);
        assert!(
            out.status.success(),
            "{what}: delete --force: {}",
            text(&out.stderr)
        );
        env.assert_nothing_left(what);
    };

    type Moment<'a> = (&'a str, Box<dyn Fn(&Path) -> bool + 'a>);
    let moments: Vec<Moment> = vec![
        ("at once", Box::new(|_| true)),
        (
            "once its state directory exists",
            Box::new(|dir| dir.exists()),
        ),
        (
            "once its husk-vmm runs",
            Box::new(|dir| !vmms_mentioning(dir).is_empty()),
        ),
        (
            "once the guest's vsock socket exists",
            Box::new(|dir| dir.join("vsock.sock").exists()),
        ),
    ];
    for (i, (moment, reached)) in moments.iter().enumerate() {
        let id = format!("kc{i}");
        let dir = root.join(&id);
        let mut child = spawn(&["create", "--bundle", &bundle, &id]);
        wait_until(T, || {
            reached(&dir) || child.try_wait().ok().flatten().is_some()
        });
        kill(&mut child, &format!("create killed {moment}"));
        // Whatever is there, `state` answers (or says there is no such container).
        let state = env.run(&["state", &id]);
        assert!(
            state.status.code().is_some(),
            "state after create killed {moment}: {:?}",
            state.status
        );
        assert_clean_after_delete(&id, &format!("create killed {moment}"));
    }

    for (i, delay) in [0u64, 50].into_iter().enumerate() {
        let id = format!("ks{i}");
        env.create_with_pid(&id, &bundle_path);
        let mut child = spawn(&["start", &id]);
        std::thread::sleep(Duration::from_millis(delay));
        kill(&mut child, &format!("start killed after {delay} ms"));
        let state = env.state(&id).expect("state after a killed start");
        assert!(
            state["status"] == "created" || state["status"] == "running",
            "start killed after {delay} ms: {state}"
        );
        assert_clean_after_delete(&id, &format!("start killed after {delay} ms"));
    }

    let id = "ke";
    env.create_with_pid(id, &bundle_path);
    let out = env.run(&["start", id]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    let mut child = spawn(&["exec", id, "sleep", "1000"]);
    std::thread::sleep(Duration::from_secs(2));
    kill(&mut child, "exec killed while its process runs");
    assert_eq!(env.state(id).expect("state")["status"], "running");
    let out = env.run(&["exec", id, "true"]);
    assert!(
        out.status.success(),
        "exec after a killed exec: {}",
        text(&out.stderr)
    );
    assert_clean_after_delete(id, "exec killed");

    // `delete` takes well under 100 ms in the rig: it is killed early or not at all.
    for (i, delay) in [0u64, 10, 40].into_iter().enumerate() {
        let id = format!("kd{i}");
        env.create_with_pid(&id, &bundle_path);
        let out = env.run(&["start", &id]);
        assert!(out.status.success(), "start: {}", text(&out.stderr));
        let mut child = spawn(&["delete", "--force", &id]);
        std::thread::sleep(Duration::from_millis(delay));
        kill(&mut child, &format!("delete killed after {delay} ms"));
        assert_clean_after_delete(&id, &format!("delete killed after {delay} ms"));
    }
}

/// Asserts that a `create` of `id` either worked (and then that `delete --force` cleans it
/// up) or failed as a refusal (exit code 1, a message, never a panic or a signal), and that
/// either way nothing is left: no state, no mount but `keep`, no husk-vmm. Returns whether
/// the create worked.
fn assert_create_clean(env: &OciEnv, id: &str, out: &std::process::Output, keep: &str) -> bool {
    let created = out.status.success();
    if created {
        let del = env.run(&["delete", "--force", id]);
        assert!(
            del.status.success(),
            "delete --force: {}",
            text(&del.stderr)
        );
    } else {
        assert_eq!(
            out.status.code(),
            Some(1),
            "a failed create exits 1: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("husk"),
            "the failure is named: {}",
            text(&out.stderr)
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "husk-vmm left: {:?} ({})",
        env.vmms_left(),
        text(&out.stderr)
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    let mounts: Vec<_> = env
        .mounts_left()
        .into_iter()
        .filter(|m| m != keep)
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    created
}

/// The processes with a file or working directory under `dir`, as `pid comm: path`.
fn users_of(dir: &str) -> Vec<String> {
    let mut users = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_entry.path();
        let comm = std::fs::read_to_string(pid.join("comm")).unwrap_or_default();
        let fds = std::fs::read_dir(pid.join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        let links = fds
            .map(|fd| fd.path())
            .chain([pid.join("cwd")])
            .filter_map(|link| std::fs::read_link(link).ok());
        for target in links {
            if target.starts_with(dir) {
                users.push(format!(
                    "{} {}: {}",
                    proc_entry.file_name().to_string_lossy(),
                    comm.trim(),
                    target.display()
                ));
            }
        }
    }
    users
}

/// husk's state directory on a file system that fills up: each `create` either works or
/// fails naming the error, and leaves nothing behind (a tmpfs of a few pages as `--root`).
#[test]
fn a_full_state_disk_fails_create_and_leaves_nothing() {
    let Some(env) = OciEnv::new("a_full_state_disk_fails_create_and_leaves_nothing") else {
        return;
    };
    let bundle = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let root = env.root.path().to_str().expect("utf-8").to_string();
    let mut outcomes = Vec::new();
    for kib in [4, 8, 16, 32, 64, 256, 4096] {
        let mount = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
                &root,
            ])
            .status()
            .expect("mount");
        assert!(mount.success(), "mount a tmpfs of {kib} KiB on {root}");
        let id = format!("full{kib}");
        let out = env.run(&["create", "--bundle", bundle.to_str().expect("utf-8"), &id]);
        let created = assert_create_clean(&env, &id, &out, &root);
        outcomes.push((kib, created, text(&out.stderr)));
        // A husk-vmm whose memory is gone (no command line any more) may still be closing its
        // files for a moment.
        let unmounted = wait_until(Duration::from_secs(30), || {
            std::process::Command::new("umount")
                .arg(&root)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            unmounted,
            "umount {root}: still used by {:?}",
            users_of(&root)
        );
    }
    eprintln!("tmpfs size, created, stderr: {outcomes:#?}");
    assert!(!outcomes[0].1, "4 KiB of state is not enough: {outcomes:?}");
    assert!(
        outcomes[0].2.contains("No space left on device"),
        "the error says the disk is full: {}",
        outcomes[0].2
    );
    assert!(
        outcomes.last().is_some_and(|o| o.1),
        "4 MiB is enough: {outcomes:?}"
    );
}

/// `husk create` (and the husk-vmm it starts) with few file descriptors: below husk's minimum
/// it is refused by name, from it on it works, and either way nothing is left behind.
#[test]
fn too_few_file_descriptors_fail_create_and_leave_nothing() {
    let Some(env) = OciEnv::new("too_few_file_descriptors_fail_create_and_leave_nothing") else {
        return;
    };
    let bundle = env.bundle("sleep", &["sleep", "1000"], |_| {});
    // husk's `limits::MIN_OPEN_FILES`.
    const MIN_OPEN_FILES: u64 = 96;
    let mut outcomes = Vec::new();
    for limit in [5, 16, 95, 96, 1024] {
        let id = format!("fds{limit}");
        let mut cmd = env.husk(&["create", "--bundle", bundle.to_str().expect("utf-8"), &id]);
        cmd.stdin(Stdio::null());
        with_nofile_limit(&mut cmd, limit, limit);
        let out = output_of(cmd, env.work.path());
        let created = assert_create_clean(&env, &id, &out, "");
        outcomes.push((limit, created, text(&out.stderr)));
    }
    eprintln!("fd limit, created, stderr: {outcomes:#?}");
    // Below husk's minimum, refused by name before anything is made; from it on, created.
    for (limit, created, stderr) in &outcomes {
        if *limit < MIN_OPEN_FILES {
            assert!(!created, "{limit} descriptors: {outcomes:?}");
            assert!(
                stderr.contains("too few open files allowed"),
                "{limit}: {stderr}"
            );
        } else {
            assert!(created, "{limit} descriptors are enough: {outcomes:?}");
        }
    }
}

/// podman drives husk exactly as it drives runc (conmon, pid file, stdio pipes, exit status of
/// the husk-vmm pid): an image imported from a tarball (no registry), `run --rm`, exit codes,
/// the VMM in the container's cgroup (`stats`), `exec`, `stop` (SIGTERM, then SIGKILL after the
/// timeout), `rm -f`.
#[test]
fn podman_runs_an_imported_image() {
    let Some(env) = OciEnv::new("podman_runs_an_imported_image") else {
        return;
    };
    if !client_available("podman_runs_an_imported_image", "podman") {
        return;
    }
    let podman = env.podman_with_busybox();

    let out = podman.run(&[
        "run",
        "--rm",
        "--network=none",
        "localhost/bb",
        "echo",
        "hi",
    ]);
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    let out = podman.run(&[
        "run",
        "--rm",
        "--network=none",
        "localhost/bb",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));

    let out = podman.run(&[
        "run",
        "-d",
        "--name",
        "s1",
        "--network=none",
        "--log-driver=k8s-file",
        "localhost/bb",
        "sh",
        "-c",
        "echo logged; sleep 1000",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    // The container's pid is husk-vmm's, in the cgroup podman gave the container (where
    // `podman stats` reads the container's usage: the VMM's).
    let out = podman.run(&["inspect", "--format", "{{.State.Pid}} {{.Id}}", "s1"]);
    let inspected = text(&out.stdout);
    let (pid, id) = inspected.trim().split_once(' ').expect("pid and id");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cgroup.contains(id), "husk-vmm (pid {pid}) runs in {cgroup}");
    let out = podman.run(&["stats", "--no-stream", "--format", "{{.MemUsage}}", "s1"]);
    assert!(out.status.success(), "stats: {}", text(&out.stderr));
    let usage = text(&out.stdout);
    assert!(
        !usage.trim().is_empty() && !usage.starts_with("0B"),
        "podman stats: {usage:?}"
    );
    let out = podman.run(&["exec", "s1", "sh", "-c", "echo in-exec; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in-exec\n");
    let out = podman.run(&["logs", "s1"]);
    assert_eq!(text(&out.stdout), "logged\n", "{}", text(&out.stderr));
    let out = podman.run(&["stop", "-t", "2", "s1"]);
    assert!(out.status.success(), "stop: {}", text(&out.stderr));
    let out = podman.run(&["inspect", "--format", "{{.State.ExitCode}}", "s1"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "137",
        "killed after the stop timeout"
    );
    let out = podman.run(&["rm", "-f", "s1"]);
    assert!(out.status.success(), "rm -f: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        wait_until(Duration::from_secs(30), || env.vmms_left().is_empty()),
        "{:?}",
        env.vmms_left()
    );
}

/// What the spec test's container prints about itself, one `key=value` per line, then `END`.
/// `try CMD` prints `rc=<exit code> <output>` on one line.
const SELF_REPORT: &str = r#"try() { out=$("$@" 2>&1); echo "rc=$? $out"; }
echo "args=[$0][$1][$2]"
echo "env=[$HUSK_SPEC_VAR]"
echo "cwd=$(pwd)"
echo "hostname=$(hostname)"
while read -r k v; do
  case "$k" in Uid:|Gid:|Groups:|CapInh:|CapPrm:|CapEff:|CapBnd:|CapAmb:|NoNewPrivs:|Seccomp:) echo "$k" $v;; esac
done < /proc/self/status
while read -r line; do
  case "$line" in "Max open files"*|"Max core file size"*) echo "limit:" $line;; esac
done < /proc/self/limits
echo "rootfs_write=$(try touch /scratch/x)"
echo "masked_file=[$(cat /proc/version)]"
echo "masked_dir=[$(ls -A /etc/masked)]"
echo "bind_read=[$(cat /data/hello.txt)]"
echo "bind_write=$(try sh -c 'echo from-guest > /data/written')"
echo "ro_path=$(try touch /data/ro/x)"
echo "tmpfs=$(grep ' /tmp ' /proc/self/mountinfo | sed 's/.* - //')"
echo "tmpfs_write=$(try sh -c 'echo t > /tmp/t && cat /tmp/t')"
echo "seccomp=$(try mkdir /tmp/d)"
echo END
exec sleep 1000
"#;

/// The spec is applied inside the guest, each item checked from inside the container: args,
/// env, cwd, uid/gid/additional groups, hostname, rlimits, all five capability sets,
/// noNewPrivileges, a read-only rootfs, masked and read-only paths, a bind mount from the
/// bundle, a tmpfs, a seccomp rule (mkdir -> EPERM), and a memory limit whose OOM kill of a hog
/// `exec` is reported as runc reports it (137) while the VM and the container live on.
///
/// husk runs with RLIMIT_NOFILE capped at 20000 (as on this project's host); the spec asks
/// for 1048576 (podman's default), which the container must get all the same.
#[test]
fn spec_is_applied_inside_the_guest() {
    let Some(env) = OciEnv::new("spec_is_applied_inside_the_guest") else {
        return;
    };
    let rootfs = env.rootfs().to_path_buf();
    std::fs::create_dir_all(rootfs.join("scratch")).expect("mkdir");
    std::fs::set_permissions(
        rootfs.join("scratch"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .expect("chmod");
    std::fs::create_dir_all(rootfs.join("etc/masked")).expect("mkdir");
    std::fs::write(rootfs.join("etc/masked/secret"), "secret\n").expect("write");

    // Capabilities (numbers): CHOWN 0, KILL 5, SETUID 7, NET_BIND_SERVICE 10, AUDIT_WRITE 29.
    let bundle = env.bundle(
        "spec",
        &["sh", "-c", SELF_REPORT, "argzero", "one", "two words"],
        |s| {
            s["hostname"] = "spec-host".into();
            let p = &mut s["process"];
            p["env"] = serde_json::json!([
                "PATH=/bin",
                "HUSK_SPEC_VAR=hello spec"
            ]);
            p["cwd"] = "/root".into();
            p["user"] = serde_json::json!({"uid": 1000, "gid": 1001, "additionalGids": [1002, 1003]});
            p["rlimits"] = serde_json::json!([
                {"type": "RLIMIT_NOFILE", "soft": 1048576, "hard": 1048576},
                {"type": "RLIMIT_CORE", "soft": 1024, "hard": 4096}
            ]);
            p["capabilities"] = serde_json::json!({
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "inheritable": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_KILL", "CAP_NET_BIND_SERVICE"]
            });
            p["noNewPrivileges"] = true.into();
            s["root"]["readonly"] = true.into();
            let mounts = s["mounts"].as_array_mut().expect("mounts");
            mounts.push(serde_json::json!({
                "destination": "/data", "type": "bind", "source": "data",
                "options": ["rbind", "rw"]
            }));
            mounts.push(serde_json::json!({
                "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", "size=1m"]
            }));
            let linux = &mut s["linux"];
            linux["maskedPaths"] = serde_json::json!(["/proc/version", "/etc/masked"]);
            linux["readonlyPaths"] = serde_json::json!(["/proc/sys", "/data/ro"]);
            linux["resources"]["memory"] = serde_json::json!({"limit": 32 * 1024 * 1024});
            linux["seccomp"] = serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            });
        },
    );
    let data = bundle.join("data");
    std::fs::create_dir_all(data.join("ro")).expect("mkdir");
    std::fs::write(data.join("hello.txt"), "hello from the bundle\n").expect("write");
    for dir in [&data, &data.join("ro")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }

    let log = env.work.path().join("spec.out");
    let errlog = env.work.path().join("spec.err");
    let mut cmd = env.husk(&[
        "run",
        "-d",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "spec",
    ]);
    cmd.stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(&errlog).expect("log"));
    with_nofile_limit(&mut cmd, 1024, 20000);
    let status = cmd.status().expect("run -d");
    assert!(
        status.success(),
        "run -d: {:?}",
        std::fs::read_to_string(&errlog)
    );
    let done = wait_until(T, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\nEND\n"))
    });
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(done, "no full report: {report:?}");
    let lines: Vec<&str> = report.lines().collect();
    let has = |line: &str| {
        assert!(
            lines.contains(&line),
            "the container's report lacks {line:?}:\n{report}"
        )
    };
    let value = |key: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {key} in the report:\n{report}"))
            .to_string()
    };
    has("args=[argzero][one][two words]");
    has("env=[hello spec]");
    has("cwd=/root");
    has("hostname=spec-host");
    has("Uid: 1000 1000 1000 1000");
    has("Gid: 1001 1001 1001 1001");
    has("Groups: 1002 1003");
    // After execve as a non-root user without file capabilities, the kernel makes the
    // permitted and effective sets the ambient set (as under runc); CHOWN, permitted but not
    // ambient, is gone. Raising the ambient set needed KILL and NET_BIND_SERVICE in both the
    // permitted and inheritable sets the agent set.
    has("CapInh: 0000000000000420");
    has("CapPrm: 0000000000000420");
    has("CapEff: 0000000000000420");
    has("CapBnd: 00000000200004a1");
    has("CapAmb: 0000000000000420");
    has("NoNewPrivs: 1");
    has("Seccomp: 2");
    has("limit: Max open files 1048576 1048576 files");
    has("limit: Max core file size 1024 4096 bytes");
    let rootfs_write = value("rootfs_write");
    assert!(
        rootfs_write.starts_with("rc=1 ") && rootfs_write.contains("Read-only file system"),
        "{rootfs_write}"
    );
    has("masked_file=[]");
    has("masked_dir=[]");
    has("bind_read=[hello from the bundle]");
    has("bind_write=rc=0 ");
    let ro_path = value("ro_path");
    assert!(
        ro_path.starts_with("rc=1 ") && ro_path.contains("Read-only file system"),
        "{ro_path}"
    );
    let tmpfs = value("tmpfs");
    assert!(
        tmpfs.starts_with("tmpfs ") && tmpfs.contains("size=1024k"),
        "/tmp: {tmpfs}"
    );
    has("tmpfs_write=rc=0 t");
    let seccomp = value("seccomp");
    assert!(
        seccomp.starts_with("rc=1 ") && seccomp.contains("Operation not permitted"),
        "{seccomp}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("written")).expect("the guest's write"),
        "from-guest\n"
    );
    assert!(!rootfs.join("scratch/x").exists());

    // The memory limit: a hog exec'd into the container is OOM-killed (runc: 137)...
    let out = env.run(&[
        "exec",
        "spec",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "hog: {}", text(&out.stderr));
    // ...and the container and its VM live on.
    assert_eq!(env.state("spec").expect("state")["status"], "running");
    let out = env.run(&[
        "exec",
        "spec",
        "sh",
        "-c",
        "echo alive; cat /sys/fs/cgroup/memory.max; grep '^oom_kill ' /sys/fs/cgroup/memory.events",
    ]);
    assert!(
        out.status.success(),
        "exec after the OOM: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "alive\n33554432\noom_kill 1\n");
    let out = env.run(&["delete", "--force", "spec"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

/// The spec's device rules hold in the guest: a container with CAP_MKNOD whose spec allows only
/// the default devices (`runc spec`'s "deny all") can make any node, but opens only those on its
/// list (a made /dev/null works, writing to a made /dev/kmsg is EPERM). And the resources husk ignores are
/// named in a warning on `husk run`'s stderr, one per field, while the container still runs.
#[test]
fn device_rules_hold_and_ignored_resources_are_named() {
    let Some(env) = OciEnv::new("device_rules_hold_and_ignored_resources_are_named") else {
        return;
    };
    // Writing to /dev/kmsg needs no privilege of its own: a refusal is the device program's.
    let script = "mknod /dev/null2 c 1 3 && echo x > /dev/null2 && echo null-ok; \
                  mknod /dev/kmsg2 c 1 11 && echo made-kmsg; echo husk-test > /dev/kmsg2; echo rc=$?";
    let bundle = env.bundle("devices", &["sh", "-c", script], |s| {
        for set in ["bounding", "permitted", "effective"] {
            s["process"]["capabilities"][set] = serde_json::json!(["CAP_MKNOD"]);
        }
        s["process"]["capabilities"]
            .as_object_mut()
            .expect("capabilities")
            .remove("ambient");
        let mut resources = husk_tests::oci::ignored_resources();
        resources["devices"] = serde_json::json!([{"allow": false, "access": "rwm"}]);
        s["linux"]["resources"] = resources;
    });
    let out = env.run(&[
        "run",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "devices",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert!(
        stdout.contains("null-ok\n"),
        "an allowed device opens: {stdout} {stderr}"
    );
    assert!(
        stdout.contains("made-kmsg\n"),
        "mknod of any node is allowed: {stdout}"
    );
    assert!(
        stderr.contains("/dev/kmsg2: Operation not permitted") && stdout.contains("rc=1"),
        "a device off the list is EPERM: stdout {stdout} stderr {stderr}"
    );
    for field in husk_tests::oci::IGNORED_RESOURCE_WARNINGS {
        assert!(
            stderr.contains(field) && stderr.contains("is ignored"),
            "a warning names {field}: {stderr}"
        );
    }
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

/// `podman run -it` at a terminal: the test is the user at a pty. The container's shell has a
/// tty of its own, answers what is typed, and its exit code is podman's. podman is started
/// with its RLIMIT_NOFILE hard limit at 20000 (as root it raises its own limit at start-up) and
/// asks for 1048576 in the spec: the container gets it.
#[test]
fn podman_run_it_with_a_tty() {
    let Some(env) = OciEnv::new("podman_run_it_with_a_tty") else {
        return;
    };
    if !client_available("podman_run_it_with_a_tty", "podman") {
        return;
    }
    let podman = env.podman_with_busybox();

    let mut cmd = podman.command(&[
        "run",
        "-it",
        "--rm",
        "--network=none",
        "--ulimit",
        "nofile=1048576:1048576",
        "localhost/bb",
        "sh",
    ]);
    with_nofile_limit(&mut cmd, 1024, 20000);
    let mut session = PtySession::spawn(cmd).expect("podman on a pty");
    eprintln!("podman run -it started");
    // busybox sh's prompt for root is "/ # ".
    assert!(
        session.wait_for("# ", T),
        "no shell prompt: {:?}\nhusk state: {:?}\n{}",
        session.output(),
        env.root_entries(),
        env.logs()
    );
    eprintln!("prompt seen");
    session
        .write("tty; echo $((6*7)); ulimit -n; ulimit -Hn; exit 5\n")
        .expect("type");
    let status = session
        .wait(T)
        .unwrap_or_else(|e| panic!("{e:#}\nhusk logs:\n{}", env.logs()));
    let output = session.output();
    assert_eq!(
        status.code(),
        Some(5),
        "podman's exit code; output {output:?}"
    );
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "tty names a pty: {output:?}"
    );
    assert!(lines.contains(&"42"), "the shell computed: {output:?}");
    assert_eq!(
        lines.iter().filter(|l| **l == "1048576").count(),
        2,
        "soft and hard RLIMIT_NOFILE in the container: {output:?}"
    );
    assert!(
        wait_until(Duration::from_secs(60), || env.root_entries().is_empty()),
        "{:?}",
        env.root_entries()
    );
}

/// dockerd (started here, with its own roots and socket) with husk registered as a runtime:
/// `docker run --runtime husk` prints, mirrors exit codes, and `rm -f` of a running container
/// works. Once dockerd is stopped nothing of husk is left: no husk-vmm, no state, no mount.
#[test]
fn docker_runs_containers_with_husk() {
    let Some(env) = OciEnv::new("docker_runs_containers_with_husk") else {
        return;
    };
    for client in ["dockerd", "docker"] {
        if !client_available("docker_runs_containers_with_husk", client) {
            return;
        }
    }
    let dir = env.work.path().join("d");
    let wrapper = env.runtime_wrapper(&env.work.path().join("husk-runtime"));
    let mut dockerd = Dockerd::start(&dir, &wrapper, T).expect("dockerd");
    let version = dockerd.docker(&["version", "--format", "{{.Server.Version}}"]);
    eprintln!("dockerd version {}", text(&version.stdout).trim());
    let diag = |what: &str, out: &std::process::Output| {
        let roots: std::collections::BTreeSet<_> = husk_state_dirs(&dockerd.exec_root)
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        format!(
            "{what}: status {}, stdout {:?}, stderr {:?}\ndockerd log:\n{}\nhusk logs:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            dockerd.log_tail(),
            roots.iter().map(|r| logs_under(r)).collect::<String>()
        )
    };

    let tarball = env.rootfs_tarball();
    let out = dockerd.docker(&["import", tarball.to_str().expect("utf-8"), "bb:latest"]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));

    let out = dockerd.docker(&[
        "run",
        "--runtime",
        "husk",
        "--rm",
        "--network",
        "none",
        "bb",
        "echo",
        "hi",
    ]);
    assert!(out.status.success(), "{}", diag("docker run", &out));
    assert_eq!(text(&out.stdout), "hi\n", "{}", diag("docker run", &out));
    eprintln!("docker run echo hi: ok");
    let out = dockerd.docker(&[
        "run",
        "--runtime",
        "husk",
        "--rm",
        "--network",
        "none",
        "bb",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", diag("exit 3", &out));
    eprintln!("docker run exit 3: ok");

    // A running container: its husk state is where docker's shim keeps runc's.
    let out = dockerd.docker(&[
        "run",
        "-d",
        "--runtime",
        "husk",
        "--network",
        "none",
        "bb",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", diag("run -d", &out));
    let id = text(&out.stdout).trim().to_string();
    // Docker's shim passes runc's --root; husk keeps its state there.
    let state_dirs = husk_state_dirs(&dockerd.exec_root);
    assert!(
        state_dirs.len() == 1 && state_dirs[0].ends_with(&id),
        "husk state of {id} under {}: {state_dirs:?}",
        dockerd.exec_root.display()
    );
    let state_root = state_dirs[0].parent().expect("state root").to_path_buf();
    eprintln!("husk state root under docker: {}", state_root.display());
    assert_eq!(vmms_mentioning(&dockerd.exec_root).len(), 1);
    let out = dockerd.docker(&["exec", &id, "sh", "-c", "echo in-exec; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", diag("exec", &out));
    assert_eq!(text(&out.stdout), "in-exec\n");
    let out = dockerd.docker(&["rm", "-f", &id]);
    assert!(out.status.success(), "{}", diag("rm -f", &out));
    eprintln!("docker run -d, exec, rm -f: ok");

    dockerd.stop_and_assert_clean(T);
    let left: Vec<_> = std::fs::read_dir(&state_root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "husk state left: {left:?}");
}
