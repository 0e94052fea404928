//! containerd drives husk through `containerd-shim-husk-v2`: a containerd of the test's own,
//! a busybox image the test builds and imports, and `ctr` as the client.
//!
//! Each test has its own containerd and namespace, and ends by checking that nothing of its
//! namespace is left: no shim, no VMM, no mount, no shim state.

use husk_tests::containerd::{processes_mentioning, Containerd, IMAGE, RUNTIME};
use husk_tests::oci::PtySession;
use husk_tests::wait_until;
use std::time::Duration;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clean(ctrd: &Containerd) {
    let clean = wait_until(Duration::from_secs(60), || ctrd.leftovers().is_empty());
    assert!(
        clean,
        "left behind: {:?}\ncontainerd log:\n{}",
        ctrd.leftovers(),
        ctrd.log_tail()
    );
}

#[test]
fn ctr_runs_containers_in_husk_microvms() {
    let Some(ctrd) = Containerd::start("ctr_runs_containers_in_husk_microvms", "husk-ctr") else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");

    // Output reaches ctr, and the container runs in the guest kernel, not the host's.
    let out = ctrd.ctr(
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            IMAGE,
            "hello",
            "echo",
            "hi",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "ctr run failed ({}): {}\n{}",
        out.status,
        stderr(&out),
        ctrd.log_tail()
    );
    assert_eq!(stdout(&out), "hi\n");

    // Exit codes reach ctr.
    let out = ctrd.ctr(
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            IMAGE,
            "code",
            "sh",
            "-c",
            "exit 42",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(42), "{}", stderr(&out));

    // stdin is relayed to the end (EOF included), then the output.
    let input: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let out = ctrd.ctr(
        &["run", "--runtime", RUNTIME, "--rm", IMAGE, "cat", "cat"],
        Some(input.as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), input, "stdin came back through cat");

    // Bulk output arrives whole and in order.
    let out = ctrd.ctr(
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            IMAGE,
            "bulk",
            "seq",
            "1",
            "200000",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert!(
        stdout(&out) == expected,
        "seq output differs ({} bytes of {})",
        out.stdout.len(),
        expected.len()
    );

    // A detached container: exec into it, list its processes, kill it.
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "web",
        "sleep",
        "100000",
    ]);
    let host_uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let out = ctrd.ctr(
        &[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "web",
            "sh",
            "-c",
            "uname -r; exit 3",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let guest_uname = stdout(&out);
    assert!(!guest_uname.trim().is_empty());
    assert_ne!(
        guest_uname.trim(),
        host_uname.trim(),
        "the exec ran in the guest kernel"
    );
    let ps = ctrd.ctr_ok(&["tasks", "ps", "web"]);
    assert!(
        ps.lines().count() >= 2,
        "ctr tasks ps lists the init: {ps:?}"
    );
    // Stats come from the guest cgroup, mapped to containerd's cgroup v2 metrics.
    let metrics = ctrd.ctr_ok(&["tasks", "metrics", "web"]);
    let metric = |name: &str| -> Option<u64> {
        metrics.lines().find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
        })
    };
    assert!(
        metric("memory.usage").is_some_and(|v| v > 0),
        "memory usage: {metrics}"
    );
    assert!(
        metric("pids.current").is_some_and(|v| v >= 1),
        "pids: {metrics}"
    );
    let task_status = |id: &str| -> String {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(task_status("web"), "RUNNING");
    // Pause freezes the guest cgroup; resume thaws it.
    ctrd.ctr_ok(&["tasks", "pause", "web"]);
    assert_eq!(task_status("web"), "PAUSED");
    ctrd.ctr_ok(&["tasks", "resume", "web"]);
    assert_eq!(task_status("web"), "RUNNING");
    // A detached exec, then a kill of every process of the container.
    ctrd.ctr_ok(&[
        "tasks",
        "exec",
        "-d",
        "--exec-id",
        "bg",
        "web",
        "sleep",
        "100000",
    ]);
    let ps = ctrd.ctr_ok(&["tasks", "ps", "web"]);
    assert!(ps.lines().count() >= 3, "the init and the exec: {ps:?}");
    ctrd.ctr_ok(&["tasks", "kill", "--all", "-s", "SIGKILL", "web"]);
    let stopped = wait_until(Duration::from_secs(60), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with("web") && l.contains("STOPPED"))
    });
    assert!(stopped, "{}", ctrd.ctr_ok(&["tasks", "ls"]));
    ctrd.ctr_ok(&["tasks", "delete", "web"]);
    ctrd.ctr_ok(&["containers", "delete", "web"]);

    assert_clean(&ctrd);
}

#[test]
fn ctr_run_with_a_terminal() {
    let Some(ctrd) = Containerd::start("ctr_run_with_a_terminal", "husk-tty") else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    // `stty size` shows the size ctr forwards from its terminal (80x24), which may arrive just
    // after the program started: poll it.
    // (Retried while it fails too: a `stty` at the very start of the program has been seen to
    // fail once, with a stale errno.)
    let script = "for i in $(seq 100); do s=$(stty size 2>/dev/null); \
                  case \"$s\" in [1-9]*' '[1-9]*) break;; esac; sleep 0.1; done; \
                  echo size=$s; [ -t 0 ] && [ -t 1 ] && echo on-a-terminal; exit 7";
    let cmd = ctrd.ctr_command(&[
        "run",
        "-t",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        "term",
        "sh",
        "-c",
        script,
    ]);
    let mut session = PtySession::spawn(cmd).expect("ctr on a pty");
    let status = session
        .wait(Duration::from_secs(300))
        .expect("ctr run -t exits");
    let output = session.output();
    assert_eq!(
        status.code(),
        Some(7),
        "output: {output:?}\n{}",
        ctrd.log_tail()
    );
    assert!(output.contains("size=24 80"), "{output:?}");
    assert!(output.contains("on-a-terminal"), "{output:?}");
    assert_clean(&ctrd);
}

/// A pod as the CRI plugin lays it out (the sandbox-type and sandbox-id annotations, members
/// naming the sandbox's namespaces), driven with `ctr`: both containers run in one microVM and
/// talk over the pod's localhost.
#[test]
fn a_pod_runs_its_containers_in_one_vm() {
    let Some(ctrd) = Containerd::start("a_pod_runs_its_containers_in_one_vm", "husk-pod") else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
        // The pod's summed memory (containerd 1.7's CRI sets it): 256 MiB + husk's overhead.
        "--annotation",
        "io.kubernetes.cri.sandbox-memory=268435456",
        IMAGE,
        "pod1",
        "sh",
        "-c",
        "mkdir -p /www && echo pong > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    let sandbox_boot_id = ctrd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "boot-id",
        "pod1",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    let meminfo = ctrd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "meminfo",
        "pod1",
        "cat",
        "/proc/meminfo",
    ]);
    let mem_total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    assert!(
        (256 * 1024..=320 * 1024).contains(&mem_total_kib),
        "the VM is sized from the pod's memory (default 128 MiB): MemTotal {mem_total_kib} kB"
    );
    // The shim spawns the pod's husk-vmm as pid 1 of a pid namespace of its own.
    let vmms = ctrd.vmm_pids();
    assert!(!vmms.is_empty(), "no husk-vmm for the pod");
    for &pid in &vmms {
        husk_tests::oci::assert_started_as_configured(pid, "the pod's husk-vmm");
    }
    for pid in vmms {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let nspid: Vec<&str> = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .expect("an NSpid line")
            .split_whitespace()
            .collect();
        assert_eq!(nspid, [pid.to_string().as_str(), "1"], "husk-vmm's pids");
    }
    let out = ctrd.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
            "--with-ns",
            "network:/proc/1/ns/net",
            "--with-ns",
            "ipc:/proc/1/ns/ipc",
            "--with-ns",
            "uts:/proc/1/ns/uts",
            IMAGE,
            "app",
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; test -e /www && echo shared-rootfs; \
             for i in $(seq 100); do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 0.2; done; exit 1",
        ],
        None,
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "the member failed ({}): {text:?} {}\n{}",
        out.status,
        stderr(&out),
        ctrd.log_tail()
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(sandbox_boot_id.trim()),
        "same guest boot id: {text:?}"
    );
    assert!(
        !text.contains("shared-rootfs"),
        "each container has its own rootfs: {text:?}"
    );
    assert_eq!(
        lines.last().copied(),
        Some("pong"),
        "the pod's localhost: {text:?}"
    );
    // The pod VM's log, guest console included when debug is on.
    let vmm_log =
        || std::fs::read_to_string("/run/husk-shim/husk-pod/pod1/vmm.log").unwrap_or_default();
    let vmms =
        husk_tests::containerd::processes_mentioning(&["husk-vmm", "/run/husk-shim/husk-pod/"]);
    assert_eq!(
        vmms.len(),
        1,
        "one VM for the pod: {vmms:?}; every husk-vmm: {:?}\n{}\nvmm.log: {}",
        husk_tests::containerd::processes_mentioning(&["husk-vmm"])
            .iter()
            .map(|pid| std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default())
            .collect::<Vec<_>>(),
        ctrd.log_tail(),
        vmm_log()
    );

    let kill = ctrd.ctr(&["tasks", "kill", "-s", "SIGKILL", "pod1"], None);
    assert!(
        kill.status.success(),
        "kill pod1 after its member's deletion ({}): {}\n{}\nvmm.log: {}",
        kill.status,
        stderr(&kill),
        ctrd.log_tail(),
        vmm_log()
    );
    let stopped = wait_until(Duration::from_secs(60), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with("pod1") && l.contains("STOPPED"))
    });
    assert!(stopped, "{}", ctrd.ctr_ok(&["tasks", "ls"]));
    ctrd.ctr_ok(&["tasks", "delete", "pod1"]);
    ctrd.ctr_ok(&["containers", "delete", "pod1"]);
    assert_clean(&ctrd);
}

/// Faults: the VMM killed (containerd sees the task exit and can delete it), the shim killed
/// (containerd's cleanup runs the shim's `delete`, which removes the VM), and an OOM kill in
/// the guest (an OOM event, then the exit).
#[test]
fn faults_end_tasks_and_leave_nothing() {
    let Some(ctrd) = Containerd::start("faults_end_tasks_and_leave_nothing", "husk-fault") else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    let state = |id: &str| format!("/run/husk-shim/husk-fault/{id}/");
    let kill9 = |pid: u32| {
        let pid = libc::pid_t::try_from(pid).expect("pid");
        // SAFETY: kill(2) of a process this test found by its command line; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    };

    // kill -9 of the VMM.
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "vmm-kill",
        "sleep",
        "100000",
    ]);
    let vmms = processes_mentioning(&["husk-vmm", &state("vmm-kill")]);
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    kill9(vmms[0]);
    let stopped = wait_until(Duration::from_secs(60), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with("vmm-kill") && l.contains("STOPPED"))
    });
    assert!(
        stopped,
        "{}\n{}",
        ctrd.ctr_ok(&["tasks", "ls"]),
        ctrd.log_tail()
    );
    ctrd.ctr_ok(&["tasks", "delete", "vmm-kill"]);
    ctrd.ctr_ok(&["containers", "delete", "vmm-kill"]);

    // kill -9 of the shim.
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "shim-kill",
        "sleep",
        "100000",
    ]);
    let socket = ctrd.socket.display().to_string();
    let shims = processes_mentioning(&["containerd-shim-husk-v2", "-id shim-kill", &socket]);
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(
        processes_mentioning(&["husk-vmm", &state("shim-kill")]).len(),
        1
    );
    let shim_socket = ctrd.shim_socket("shim-kill");
    assert!(shim_socket.exists(), "{}", shim_socket.display());
    kill9(shims[0]);
    let vm_gone = wait_until(Duration::from_secs(120), || {
        processes_mentioning(&["husk-vmm", &state("shim-kill")]).is_empty()
    });
    assert!(
        vm_gone,
        "containerd's cleanup removes the VM\n{}",
        ctrd.log_tail()
    );
    let task_gone = wait_until(Duration::from_secs(60), || {
        !ctrd
            .ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with("shim-kill"))
    });
    assert!(task_gone, "{}", ctrd.ctr_ok(&["tasks", "ls"]));
    ctrd.ctr_ok(&["containers", "delete", "shim-kill"]);
    assert!(
        !shim_socket.exists(),
        "the dead shim's socket is removed: {}",
        shim_socket.display()
    );

    // An OOM kill inside the guest: the event, then the exit.
    let events_out = ctrd.dir.path().join("events.out");
    let mut events = ctrd
        .ctr_command(&["events"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&events_out).expect("events file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ctr events");
    let out = ctrd.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--memory-limit",
            "33554432",
            IMAGE,
            "hog",
            "sh",
            "-c",
            "x=0123456789abcdef; while true; do x=\"$x$x\"; done",
        ],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "the hog is OOM-killed: {}",
        stderr(&out)
    );
    let saw_oom = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&events_out).is_ok_and(|e| e.contains("/tasks/oom"))
    });
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        saw_oom,
        "events: {}",
        std::fs::read_to_string(&events_out).unwrap_or_default()
    );
    assert_clean(&ctrd);
}

/// A spec with the resources husk ignores runs through the shim, and containerd's log carries
/// the shim's warning for each (`ctr run --config`: the spec as a file, with its own rootfs).
#[test]
fn ignored_resources_are_warned_by_the_shim() {
    let Some(ctrd) = Containerd::start("ignored_resources_are_warned_by_the_shim", "husk-ign")
    else {
        return;
    };
    let rootfs = ctrd.dir.path().join("rootfs");
    husk_tests::oci::make_busybox_rootfs(&rootfs).expect("busybox rootfs");
    let bundle = ctrd.dir.path().join("spec");
    std::fs::create_dir_all(&bundle).expect("mkdir");
    let out = std::process::Command::new(husk_tests::oci::husk_binary())
        .arg("spec")
        .arg("--bundle")
        .arg(&bundle)
        .output()
        .expect("husk spec");
    assert!(out.status.success(), "husk spec: {}", stderr(&out));
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("spec")).expect("JSON");
    spec["process"]["args"] = serde_json::json!(["echo", "ran"]);
    spec["process"]["terminal"] = false.into();
    spec["root"]["path"] = rootfs.display().to_string().into();
    spec["linux"]["resources"] = husk_tests::oci::ignored_resources();
    std::fs::write(&path, spec.to_string()).expect("write spec");
    let id = "ignored";
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--config",
        path.to_str().expect("utf-8"),
        id,
    ]);
    assert_eq!(out, "ran\n");
    let log = ctrd.log_mentioning(id);
    for field in husk_tests::oci::IGNORED_RESOURCE_WARNINGS {
        assert!(
            log.lines()
                .any(|l| l.contains("level=warn") && l.contains(field) && l.contains("is ignored")),
            "no warning names {field}: {log}"
        );
    }
    assert_clean(&ctrd);
}

/// Bad husk annotations fail the create with a message naming the problem, and leave nothing.
#[test]
fn bad_annotations_fail_the_create_clearly() {
    let Some(ctrd) = Containerd::start("bad_annotations_fail_the_create_clearly", "husk-bad")
    else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    for (id, annotation, expected) in [
        (
            "not-a-number",
            "io.husk.vm.mem_mib=abc",
            "io.husk.vm.mem_mib",
        ),
        ("too-large", "io.husk.vm.mem_mib=99999999", "memory"),
        ("no-cpus", "io.husk.vm.cpus=0", "io.husk.vm.cpus"),
    ] {
        let out = ctrd.ctr(
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--annotation",
                annotation,
                IMAGE,
                id,
                "true",
            ],
            None,
        );
        let message = stderr(&out);
        // ctr's own refusal of a failed create (exit 1), not a crash of anything.
        assert_eq!(out.status.code(), Some(1), "{annotation}: {message}");
        assert!(
            message.starts_with("ctr: ") && message.contains(expected),
            "{annotation}: the error names {expected}: {message}"
        );
        assert!(
            !ctrd
                .ctr_ok(&["tasks", "ls"])
                .lines()
                .any(|l| l.starts_with(id)),
            "no task {id} is left"
        );
    }
    assert_clean(&ctrd);
}

/// Through the test hook (`HUSK_VMM_TEST_FORBIDDEN_SYSCALL=sigusr2`, set for this containerd
/// and so for its shims' VMMs), a running task's husk-vmm makes a call outside its seccomp
/// lists: the task ends with 159 (128 + SIGSYS) in its exit event, the shim's log says which
/// call, and nothing is left.
#[test]
fn a_vmm_ended_by_its_seccomp_filter_is_reported_in_the_exit() {
    let Some(ctrd) = Containerd::start_with_env(
        "a_vmm_ended_by_its_seccomp_filter_is_reported_in_the_exit",
        "husk-seccomp",
        &[(
            husk_vmm::seccomp::TEST_HOOK_ENV,
            husk_vmm::seccomp::HOOK_SIGUSR2,
        )],
    ) else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    let out_file = ctrd.dir.path().join("run.out");
    let mut run = ctrd
        .ctr_command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "trap",
            "sleep",
            "100000",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("out file"))
        .stderr(std::fs::File::create(ctrd.dir.path().join("run.err")).expect("err file"))
        .spawn()
        .expect("ctr run");
    let state = "/run/husk-shim/husk-seccomp/trap/";
    let running = wait_until(Duration::from_secs(300), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with("trap") && l.contains("RUNNING"))
    });
    assert!(running, "{}", ctrd.log_tail());
    let vmms = processes_mentioning(&["husk-vmm", state]);
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    let pid = libc::pid_t::try_from(vmms[0]).expect("pid");
    // SAFETY: kill(2) of the VMM this test found by its command line.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    let ended = wait_until(Duration::from_secs(120), || {
        run.try_wait().ok().flatten().is_some()
    });
    if !ended {
        let _ = run.kill();
    }
    let status = run.wait().expect("ctr run");
    assert!(ended, "ctr run did not end: {}", ctrd.log_tail());
    assert_eq!(
        status.code(),
        Some(husk_vmm::seccomp::SECCOMP_EXIT),
        "the task's exit status\n{}",
        ctrd.log_tail()
    );
    let said = ctrd.log_mentioning("killed by its seccomp filter");
    assert!(
        said.contains("syscall 135 (personality) in a main thread"),
        "the shim's log: {said}\n{}",
        ctrd.log_tail()
    );
    assert_clean(&ctrd);
}

/// `ctr VERB... --runtime husk IMAGE ID sleep 100000`: a container that sleeps on.
fn sleeper<'a>(verb: &[&'a str], id: &'a str) -> Vec<&'a str> {
    let mut args = verb.to_vec();
    args.extend(["--runtime", RUNTIME, IMAGE, id, "sleep", "100000"]);
    args
}

/// The shim killed with SIGKILL at each lifecycle step: during the task's create (as soon as
/// the shim runs, and once its husk-vmm runs), during start, while an exec runs, and during
/// delete (once the VM is gone; or after the delete, when it was quicker). Each time the
/// client's call ends, the VM is gone, the task ends (containerd reports it gone, or it can be
/// deleted), the container can be removed, and nothing of the namespace is left: a shim
/// server whose `start` was killed before containerd learned its address ends by itself.
#[test]
fn killing_the_shim_at_each_step_leaves_nothing() {
    let Some(ctrd) = Containerd::start("killing_the_shim_at_each_step_leaves_nothing", "husk-sk")
    else {
        return;
    };
    ctrd.import_busybox().expect("import the busybox image");
    let socket = ctrd.socket.display().to_string();
    let state = |id: &str| format!("/run/husk-shim/husk-sk/{id}/");
    // The shim's processes (its `start` and its server), not the `delete` that containerd runs
    // to clean up after a shim that went away: that one is containerd's, and must live.
    let shims_of = |id: &str| {
        processes_mentioning(&["containerd-shim-husk-v2", &format!("-id {id} "), &socket])
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.split(|&b| b == 0).rfind(|a| !a.is_empty()) != Some(b"delete")
            })
            .collect::<Vec<_>>()
    };
    let vmms_of = |id: &str| processes_mentioning(&["husk-vmm", &state(id)]);
    // Kills the shim's processes; how many there were.
    let kill_shims = |id: &str| {
        let shims = shims_of(id);
        for &pid in &shims {
            let pid = libc::pid_t::try_from(pid).expect("pid");
            // SAFETY: kill(2) of a process this test found by its command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        shims.len()
    };
    let spawned = std::cell::Cell::new(0);
    let spawn_ctr = |args: &[&str]| {
        spawned.set(spawned.get() + 1);
        let out = ctrd
            .dir
            .path()
            .join(format!("killed-{}.out", spawned.get()));
        let file = std::fs::File::create(&out).expect("output file");
        let child = ctrd
            .ctr_command(args)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn ctr");
        (child, out)
    };
    // The client whose shim was killed ends (it may fail: its shim died under it).
    let client_ends = |mut child: std::process::Child, out: &std::path::Path, moment: &str| {
        let ended = wait_until(Duration::from_secs(120), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !ended {
            let _ = child.kill();
        }
        let status = child.wait().expect("wait for ctr");
        assert!(
            ended,
            "{moment}: ctr still waits two minutes after its shim died\n{}",
            ctrd.log_tail()
        );
        eprintln!(
            "{moment}: ctr {status}: {}",
            std::fs::read_to_string(out).unwrap_or_default().trim()
        );
    };
    // Afterwards: no VM, no task (containerd's cleanup of the dead shim ends it, or a delete
    // does), the container can be removed, the sandbox's state is gone.
    let settles = |id: &str, moment: &str| {
        let vm_gone = wait_until(Duration::from_secs(120), || vmms_of(id).is_empty());
        assert!(vm_gone, "{moment}: the VM is left\n{}", ctrd.log_tail());
        let task_listed = || {
            ctrd.ctr_ok(&["tasks", "ls"])
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id))
        };
        if !wait_until(Duration::from_secs(60), || !task_listed()) {
            let out = ctrd.ctr(&["tasks", "delete", "--force", id], None);
            assert!(
                !task_listed(),
                "{moment}: the task is left after delete --force ({}: {})\n{}",
                out.status,
                stderr(&out),
                ctrd.log_tail()
            );
        }
        if ctrd
            .ctr_ok(&["containers", "ls", "-q"])
            .lines()
            .any(|l| l.trim() == id)
        {
            ctrd.ctr_ok(&["containers", "delete", id]);
        }
        let state_gone = wait_until(Duration::from_secs(60), || {
            !std::path::Path::new(&state(id)).exists()
        });
        assert!(
            state_gone,
            "{moment}: the sandbox's state is left: {:?}",
            ctrd.leftovers()
        );
        // A server whose `start` was killed before containerd learned its address ends by
        // itself when no task comes (the shim's adoption timeout, 60 s).
        let shims_gone = wait_until(Duration::from_secs(120), || shims_of(id).is_empty());
        assert!(shims_gone, "{moment}: a shim of {id} is left");
    };

    // During create: as soon as the shim runs, then once its VMM runs.
    type Reached<'a> = Box<dyn Fn(&str) -> bool + 'a>;
    let moments: [(&str, &str, Reached); 2] = [
        (
            "kill-create-shim",
            "create, as soon as the shim runs",
            Box::new(|id| !shims_of(id).is_empty()),
        ),
        (
            "kill-create-vmm",
            "create, once its husk-vmm runs",
            Box::new(|id| !vmms_of(id).is_empty()),
        ),
    ];
    for (id, moment, reached) in &moments {
        let (mut child, out) = spawn_ctr(&sleeper(&["run", "-d"], id));
        let hit = wait_until(Duration::from_secs(120), || {
            reached(id) || child.try_wait().ok().flatten().is_some()
        });
        assert!(
            hit && reached(id),
            "{moment}: never reached\n{}",
            ctrd.log_tail()
        );
        assert!(kill_shims(id) > 0, "{moment}: no shim of {id} to kill");
        client_ends(child, &out, moment);
        settles(id, moment);
    }

    // During start: the container exists, `ctr tasks start` makes the task and starts it.
    let id = "kill-start";
    ctrd.ctr_ok(&sleeper(&["containers", "create"], id));
    let (mut child, out) = spawn_ctr(&["tasks", "start", "-d", id]);
    let moment = "start, once its husk-vmm runs";
    let hit = wait_until(Duration::from_secs(120), || {
        !vmms_of(id).is_empty() || child.try_wait().ok().flatten().is_some()
    });
    assert!(hit, "{moment}: never reached");
    assert!(kill_shims(id) > 0, "{moment}: no shim of {id} to kill");
    client_ends(child, &out, moment);
    settles(id, moment);

    // While an exec runs.
    let id = "kill-exec";
    ctrd.ctr_ok(&sleeper(&["run", "-d"], id));
    let (mut child, out) = spawn_ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo exec-started; exec sleep 1000",
    ]);
    let moment = "exec, while its process runs";
    let running = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
            || std::fs::read_to_string(&out).is_ok_and(|o| o.contains("exec-started"))
    });
    assert!(
        running && child.try_wait().ok().flatten().is_none(),
        "{moment}: the exec never ran: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    assert!(kill_shims(id) > 0, "{moment}: no shim of {id} to kill");
    client_ends(child, &out, moment);
    settles(id, moment);

    // During delete of a stopped task.
    let id = "kill-delete";
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "true"]);
    let stopped = wait_until(Duration::from_secs(60), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
    });
    assert!(stopped, "{}", ctrd.ctr_ok(&["tasks", "ls"]));
    assert_eq!(
        vmms_of(id).len(),
        1,
        "the stopped task's VM is up until its delete"
    );
    let (mut child, out) = spawn_ctr(&["tasks", "delete", id]);
    let moment = "delete, once the VM is gone";
    wait_until(Duration::from_secs(60), || {
        vmms_of(id).is_empty() || child.try_wait().ok().flatten().is_some()
    });
    // The shim may have finished the delete and exited by now: then there is none to kill.
    eprintln!("{moment}: {} shim(s) killed", kill_shims(id));
    client_ends(child, &out, moment);
    settles(id, moment);

    assert_clean(&ctrd);
}

/// A shim server that containerd never creates a task in (its `start` was killed after it
/// spawned the server, before containerd learned the address) stops the VM it booted early,
/// removes the sandbox's state and its socket, and exits, after the adoption timeout.
#[test]
fn a_shim_server_containerd_never_adopts_ends_by_itself() {
    let Some(ctrd) = Containerd::start(
        "a_shim_server_containerd_never_adopts_ends_by_itself",
        "husk-orphan",
    ) else {
        return;
    };
    let id = "orphan";
    let bundle = ctrd.dir.path().join("orphan-bundle");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let spec = std::process::Command::new(husk_tests::oci::husk_binary())
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .expect("husk spec");
    assert!(spec.status.success(), "husk spec: {spec:?}");
    let socket = ctrd.dir.path().join("orphan-shim.sock");
    let log = std::fs::File::create(ctrd.dir.path().join("orphan-shim.log")).expect("log");
    // The server as the shim's `start` spawns it; nobody ever connects to it.
    let mut server = std::process::Command::new("containerd-shim-husk-v2")
        .current_dir(&bundle)
        .args(["-namespace", "husk-orphan", "-id", id, "-address"])
        .arg(&ctrd.socket)
        .arg("-socket")
        .arg(format!("unix://{}", socket.display()))
        .env("TTRPC_ADDRESS", format!("{}.ttrpc", ctrd.socket.display()))
        .env("HUSK_CONFIG", ctrd.dir.path().join("husk.toml"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn the shim server");
    let state = format!("/run/husk-shim/husk-orphan/{id}/");
    let booted = wait_until(Duration::from_secs(60), || {
        !processes_mentioning(&["husk-vmm", &state]).is_empty()
    });
    let shim_log =
        || std::fs::read_to_string(ctrd.dir.path().join("orphan-shim.log")).unwrap_or_default();
    assert!(booted, "the server boots its VM early\n{}", shim_log());
    let ended = wait_until(Duration::from_secs(150), || {
        server.try_wait().ok().flatten().is_some()
    });
    if !ended {
        let _ = server.kill();
    }
    let status = server.wait().expect("wait for the server");
    assert!(ended, "the server still runs 150 s on\n{}", shim_log());
    assert!(status.success(), "{status}\n{}", shim_log());
    assert!(
        processes_mentioning(&["husk-vmm", &state]).is_empty(),
        "its VM is stopped"
    );
    assert!(
        !std::path::Path::new(&state).exists(),
        "its state is removed"
    );
    assert!(!socket.exists(), "its socket is removed");
    assert_clean(&ctrd);
}
