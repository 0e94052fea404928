//! The OCI runtime CLI end to end: `husk` drives real microVMs the way podman and docker drive
//! runc (lifecycle, exit statuses, bad input, concurrency, a VMM killed under a container).

use husk_tests::oci::OciEnv;
use husk_tests::{process_alive, wait_until};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
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
    let pid_file = env.work.path().join("c1.pid");
    let out = env.run(&[
        "create",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "--pid-file",
        pid_file.to_str().expect("utf-8"),
        "c1",
    ]);
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
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
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
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

#[test]
fn killing_the_vmm_means_stopped_and_delete_cleans_up() {
    let Some(env) = OciEnv::new("killing_the_vmm_means_stopped_and_delete_cleans_up") else {
        return;
    };
    let bundle = env.bundle("sleep", &["sleep", "1000"], |_| {});
    let out = env.run(&[
        "run",
        "-d",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "k9",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    let state = env.state("k9").expect("state");
    assert_eq!(state["status"], "running");
    let pid = state["pid"].as_i64().expect("pid") as i32;
    // SAFETY: kill(2) with a pid we read from the state; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(env.wait_status("k9", "stopped", T));
    let out = env.run(&["delete", "k9"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    assert!(env.root_entries().is_empty());
    assert!(env.mounts_left().is_empty(), "{:?}", env.mounts_left());
}

/// podman drives husk exactly as it drives runc (conmon, pid file, stdio pipes, exit status of
/// the husk-vmm pid): an image imported from a tarball (no registry), `run --rm`, exit codes,
/// `exec`, `stop` (SIGTERM, then SIGKILL after the timeout), `rm -f`.
#[test]
fn podman_runs_an_imported_image() {
    let Some(env) = OciEnv::new("podman_runs_an_imported_image") else {
        return;
    };
    if std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("!!! SKIPPED podman_runs_an_imported_image: podman is not installed !!!");
        return;
    }
    let podman = env.podman();
    let tarball = env.work.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(env.work.path().join("rootfs"))
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success());
    let out = podman.run(&[
        "import",
        tarball.to_str().expect("utf-8"),
        "localhost/bb:latest",
    ]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));

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
