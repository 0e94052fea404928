//! Containers run by the real agent binary in `--serve-unix` mode on this host, driven by the
//! real `AgentClient`, with a busybox root file system (Debian's `busybox-static`).
//!
//! Needs root (namespaces, mounts, pivot_root), `/bin/busybox` and a cgroup v2 hierarchy
//! (with the memory controller for the OOM test). Where one is missing the tests skip with a
//! loud message naming each test, or fail under `HUSK_REQUIRE_KVM=1` (CI, `cargo xtask test`),
//! through the skip helper every husk test crate shares.

use husk_agent_protocol::{
    AgentClient, AttachStdio, CreateContainer, ExecProcess, ExitStatus, ProcessRef, Request,
    Response, StdioConfig, StreamKind,
};
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[path = "../../tests/src/skip.rs"]
mod skip;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "hostname", "mkdir", "sleep", "ls", "grep", "touch", "wc", "pwd",
    "true", "false", "head", "stty", "tty", "mount",
];

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    bundle: PathBuf,
    cgroup_root: Option<PathBuf>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(root) = &self.cgroup_root {
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// The cgroup v2 hierarchy of this host: pure v2 or the hybrid `unified` mount.
fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

fn start_agent() -> Option<Agent> {
    start_agent_with(&[])
}

fn start_agent_with(env: &[(&str, &str)]) -> Option<Agent> {
    if !skip::have_root("namespaces, mounts and pivot_root") {
        return None;
    }
    if !Path::new(BUSYBOX).exists() {
        skip::skip(&format!(
            "{BUSYBOX} is missing (apt-get install busybox-static)"
        ));
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("bundle");
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).expect("rootfs");
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink");
    }
    std::fs::create_dir_all(bundle.join("rootfs/etc")).expect("etc");
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let cgroup_root =
        cgroup2_mount().map(|m| m.join(format!("husk-test-{}-{n}", std::process::id())));
    let socket = dir.path().join("agent.sock");
    // `cargo xtask test` runs these tests in the rig, with the agent it carries there.
    let agent = std::env::var_os("HUSK_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_husk-agent")));
    let mut cmd = Command::new(agent);
    cmd.arg("--serve-unix").arg(&socket).stdin(Stdio::null());
    match &cgroup_root {
        Some(root) => cmd.env("HUSK_AGENT_CGROUP_ROOT", root),
        None => cmd.env("HUSK_AGENT_CGROUP_ROOT", dir.path().join("no-cgroup")),
    };
    cmd.envs(env.iter().copied());
    let child = cmd.spawn().expect("spawn agent");
    Some(Agent {
        child,
        _dir: dir,
        socket,
        bundle,
        cgroup_root,
    })
}

impl Agent {
    fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket, Duration::from_secs(10))
            .expect("connect")
            .0
    }

    fn request(&self, request: &Request) -> Response {
        let mut client = self.client();
        client
            .set_io_timeout(Duration::from_secs(30))
            .expect("timeout");
        client.request(request).expect("request")
    }

    fn ok(&self, request: &Request) {
        let resp = self.request(request);
        assert_eq!(resp, Response::Ok, "{request:?}");
    }

    fn attach(&self, id: &str, exec_id: Option<&str>, stream: StreamKind) -> UnixStream {
        self.client()
            .into_stdio(AttachStdio {
                process: pref(id, exec_id),
                stream,
            })
            .expect("attach")
    }

    fn create(&self, id: &str, spec: Value, stdio: StdioConfig) -> Response {
        self.request(&Request::CreateContainer(CreateContainer {
            id: id.into(),
            spec,
            bundle: self.bundle.display().to_string(),
            stdio,
        }))
    }

    fn wait(&self, id: &str, exec_id: Option<&str>) -> ExitStatus {
        match self.request(&Request::WaitProcess(pref(id, exec_id))) {
            Response::Exited(status) => status,
            other => panic!("wait: {other:?}"),
        }
    }

    /// Create, attach stdout and stderr, start, collect output, wait, remove.
    fn run(&self, id: &str, spec: Value) -> (String, String, ExitStatus) {
        let stdio = StdioConfig {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let resp = self.create(id, spec, stdio);
        assert!(
            matches!(resp, Response::Created { pid } if pid > 1),
            "{resp:?}"
        );
        let out = self.attach(id, None, StreamKind::Stdout);
        let err = self.attach(id, None, StreamKind::Stderr);
        self.ok(&Request::StartProcess(pref(id, None)));
        let out = read_all(out);
        let err = read_all(err);
        let status = self.wait(id, None);
        self.ok(&Request::RemoveContainer { id: id.into() });
        (out, err, status)
    }
}

fn read_all(mut stream: UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read stream");
    text
}

fn pref(id: &str, exec_id: Option<&str>) -> ProcessRef {
    ProcessRef {
        id: id.into(),
        exec_id: exec_id.map(str::to_owned),
    }
}

fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "husky",
        "process": {
            "args": args,
            "cwd": "/",
            "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    })
}

fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
        oom_killed: false,
    }
}

#[test]
fn exit_code_and_output_reach_the_host() {
    let Some(agent) = start_agent() else { return };
    let (out, err, status) = agent.run(
        "c1",
        spec(&["sh", "-c", "echo hello; echo oops >&2; exit 42"]),
    );
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(status, exited(42));
}

#[test]
fn killed_process_reports_its_signal() {
    let Some(agent) = start_agent() else { return };
    let resp = agent.create("k", spec(&["sleep", "100"]), StdioConfig::default());
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    agent.ok(&Request::StartProcess(pref("k", None)));
    agent.ok(&Request::SignalProcess {
        process: pref("k", None),
        signal: 9,
        all: false,
    });
    assert_eq!(
        agent.wait("k", None),
        ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: false
        }
    );
    // A stopped container lists as such, then goes away.
    match agent.request(&Request::ListContainers) {
        Response::Containers { containers } => {
            assert_eq!(containers.len(), 1);
            assert_eq!(containers[0].id, "k");
            assert_eq!(containers[0].pid, 0);
        }
        other => panic!("{other:?}"),
    }
    agent.ok(&Request::RemoveContainer { id: "k".into() });
    assert_eq!(
        agent.request(&Request::ListContainers),
        Response::Containers { containers: vec![] }
    );
}

#[test]
fn exec_joins_a_running_container() {
    let Some(agent) = start_agent() else { return };
    let resp = agent.create("e", spec(&["sleep", "100"]), StdioConfig::default());
    let Response::Created { pid: init_pid } = resp else {
        panic!("{resp:?}")
    };
    agent.ok(&Request::StartProcess(pref("e", None)));
    let stdio = StdioConfig {
        stdout: true,
        ..Default::default()
    };
    let process = json!({
        "args": ["sh", "-c", "hostname; cat /proc/1/comm; echo $$; exit 3"],
        "cwd": "/tmp", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    let resp = agent.request(&Request::ExecProcess(ExecProcess {
        id: "e".into(),
        exec_id: "x1".into(),
        process,
        stdio,
    }));
    assert!(
        matches!(resp, Response::Created { pid } if pid > 1 && pid != init_pid),
        "{resp:?}"
    );
    let out = agent.attach("e", Some("x1"), StreamKind::Stdout);
    agent.ok(&Request::StartProcess(pref("e", Some("x1"))));
    let out = read_all(out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "husky");
    assert_eq!(lines[1], "sleep");
    let inner_pid: i32 = lines[2].parse().expect("pid");
    assert!(
        inner_pid > 1,
        "exec'd shell is inside the pid namespace: {inner_pid}"
    );
    assert_eq!(agent.wait("e", Some("x1")), exited(3));

    match agent.request(&Request::ListProcesses { id: "e".into() }) {
        Response::Pids { pids } => assert!(pids.contains(&init_pid), "{pids:?}"),
        other => panic!("{other:?}"),
    }
    agent.ok(&Request::SignalProcess {
        process: pref("e", None),
        signal: 9,
        all: true,
    });
    let status = agent.wait("e", None);
    assert_eq!(status.signal, Some(9));
    agent.ok(&Request::RemoveContainer { id: "e".into() });
}

#[test]
fn spec_process_attributes_apply_inside_the_container() {
    let Some(agent) = start_agent() else { return };
    let script = r#"
echo "host=$(hostname)"
echo "foo=$FOO"
echo "cwd=$(pwd)"
echo "ids=$(id -u):$(id -g):$(id -G)"
echo "nofile=$(ulimit -n):$(ulimit -Hn)"
grep CapEff /proc/self/status
grep -qE '^[^ ]+ / [^ ]+ ro' /proc/mounts && echo rootfs=ro
grep -qE '^[^ ]+ /proc/sys [^ ]+ ro' /proc/mounts && echo procsys=ro
echo "kmsg=$(wc -c < /proc/kmsg)"
echo "bus=$(ls -A /proc/bus | wc -l)"
touch /proc/bus/x 2>/dev/null || echo bus=ro
echo x > /tmp/f && echo "tmp=$(cat /tmp/f)"
[ -c /dev/null ] && [ -c /dev/urandom ] && [ -L /dev/fd ] && echo devices=ok
echo "umask=$(umask)"
echo "forward=$(cat /proc/sys/net/ipv4/ip_forward)"
"#;
    let mut s = spec(&["sh", "-c", script]);
    s["root"]["readonly"] = json!(true);
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 63});
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 1234, "hard": 2345}]);
    let kill = json!(["CAP_KILL"]);
    s["process"]["capabilities"] = json!({
        "bounding": kill, "effective": kill, "permitted": kill,
        "inheritable": kill, "ambient": kill
    });
    s["process"]["noNewPrivileges"] = json!(true);
    s["linux"]["maskedPaths"] = json!(["/proc/kmsg", "/proc/bus", "/proc/nonexistent"]);
    s["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    s["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}
    ]);
    let (out, err, status) = agent.run("attrs", s);
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    let expected = "host=husky\nfoo=bar\ncwd=/tmp\nids=1000:1000:1000 2000\n\
                    nofile=1234:2345\nCapEff:\t0000000000000020\nrootfs=ro\nprocsys=ro\n\
                    kmsg=0\nbus=0\nbus=ro\ntmp=x\ndevices=ok\numask=0077\nforward=1\n";
    assert_eq!(out, expected, "stderr: {err}");
}

#[test]
fn seccomp_rule_denies_mkdir_with_eperm() {
    let Some(agent) = start_agent() else { return };
    let mut s = spec(&["sh", "-c", "mkdir /tmp/d || exit 7; echo made"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (out, err, status) = agent.run("sc", s);
    assert_eq!(status, exited(7), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(out, "");
}

#[test]
fn real_deny_by_default_profile_runs_a_shell() {
    let Some(agent) = start_agent() else { return };
    let profile: Value =
        serde_json::from_str(include_str!("fixtures/podman-seccomp-amd64.json")).expect("fixture");
    let mut s = spec(&["sh", "-c", "echo ok; mkdir /tmp/d && echo made"]);
    s["linux"]["seccomp"] = profile;
    let (out, err, status) = agent.run("podman", s);
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "ok\nmade\n");
}

#[test]
fn bad_requests_fail_clearly_and_the_agent_keeps_serving() {
    let Some(agent) = start_agent() else { return };
    // A stream asked for must be attached before start.
    let stdio = StdioConfig {
        stdout: true,
        ..Default::default()
    };
    let resp = agent.create("b", spec(&["true"]), stdio);
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    match agent.request(&Request::StartProcess(pref("b", None))) {
        Response::Error { message } => {
            assert!(message.contains("stdout not attached"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Removing a created container kills its waiting init.
    agent.ok(&Request::RemoveContainer { id: "b".into() });
    // A program that does not exist fails the start.
    let resp = agent.create("n", spec(&["/bin/nope"]), StdioConfig::default());
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    match agent.request(&Request::StartProcess(pref("n", None))) {
        Response::Error { message } => assert!(message.contains("exec /bin/nope"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Unsupported spec parts fail the create.
    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}]);
    match agent.create("p", s, StdioConfig::default()) {
        Response::Error { message } => assert!(message.contains("pid namespace"), "{message}"),
        other => panic!("{other:?}"),
    }
    match agent.request(&Request::WaitProcess(pref("ghost", None))) {
        Response::Error { message } => assert_eq!(message, "no container ghost"),
        other => panic!("{other:?}"),
    }
    match agent.create("../x", spec(&["true"]), StdioConfig::default()) {
        Response::Error { message } => assert!(message.contains("bad identifier"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Still serving.
    let (out, _, status) = agent.run("after", spec(&["echo", "still here"]));
    assert_eq!((out.as_str(), status), ("still here\n", exited(0)));
}

#[test]
fn memory_limit_oom_kills_a_hog() {
    let Some(agent) = start_agent() else { return };
    let memory_ok = agent.cgroup_root.as_ref().is_some_and(|root| {
        root.parent()
            .and_then(|p| std::fs::read_to_string(p.join("cgroup.controllers")).ok())
            .is_some_and(|c| c.split_whitespace().any(|x| x == "memory"))
    });
    if !memory_ok {
        skip::skip(&format!(
            "no cgroup v2 memory controller on this host ({:?})",
            agent.cgroup_root
        ));
        return;
    }
    let mut s = spec(&["sh", "-c", "x=aaaaaaaa; while true; do x=$x$x; done"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 33554432, "swap": 33554432}});
    let (_, _, status) = agent.run("oom", s);
    assert_eq!(
        status,
        ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: true
        }
    );
}

#[test]
fn terminal_process_gets_a_pty_with_the_requested_size() {
    let Some(agent) = start_agent() else { return };
    let mut s = spec(&[
        "sh",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo tty; tty; stty size; read line; echo got=$line",
    ]);
    s["process"]["terminal"] = json!(true);
    let stdio = StdioConfig {
        terminal: true,
        ..Default::default()
    };
    let resp = agent.create("t", s, stdio);
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    let mut pty = agent.attach("t", None, StreamKind::Pty);
    agent.ok(&Request::ResizePty {
        process: pref("t", None),
        rows: 30,
        cols: 100,
    });
    agent.ok(&Request::StartProcess(pref("t", None)));
    std::io::Write::write_all(&mut pty, b"hi\n").expect("type");
    pty.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut out = Vec::new();
    // The stream ends when the process is gone and the pty reports EIO.
    let _ = pty.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).replace('\r', "");
    // The terminal echoes the typed line somewhere in between.
    assert!(out.contains("tty\n"), "{out:?}");
    // The pty is the first of the container's own devpts instance (as runc makes it), so
    // ttyname() finds it inside the container.
    assert!(out.contains("\n/dev/pts/0\n"), "{out:?}");
    assert!(out.contains("30 100\n"), "{out:?}");
    assert!(out.contains("got=hi\n"), "{out:?}");
    assert_eq!(agent.wait("t", None), exited(0));
    agent.ok(&Request::RemoveContainer { id: "t".into() });
}

/// `linux.resources.devices` holds: with CAP_MKNOD and "deny all" (`runc spec`'s rules), any node
/// can be made but only the runtime's default devices opened; a rule of the spec opens one more.
#[test]
fn device_rules_decide_which_nodes_open() {
    let Some(agent) = start_agent() else { return };
    if agent.cgroup_root.is_none() {
        skip::skip("no cgroup v2 hierarchy on this host");
        return;
    }
    // Writing to /dev/kmsg needs no privilege of its own (reading does): a refusal is the
    // device program's.
    let script = "mknod /tmp/null2 c 1 3 && echo x > /tmp/null2 && echo null-ok; \
                  mknod /tmp/kmsg2 c 1 11 && echo made; echo husk-test > /tmp/kmsg2; echo rc=$?; \
                  mknod /tmp/zero2 c 1 5 && head -c 1 /tmp/zero2 | wc -c";
    let mut s = spec(&["sh", "-c", script]);
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_MKNOD"], "effective": ["CAP_MKNOD"], "permitted": ["CAP_MKNOD"]
    });
    s["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
    let (out, err, status) = agent.run("dev", s.clone());
    assert_eq!(status, exited(0), "stdout {out}\nstderr {err}");
    assert_eq!(out, "null-ok\nmade\nrc=1\n1\n", "stderr {err}");
    assert!(err.contains("/tmp/kmsg2: Operation not permitted"), "{err}");

    // A rule of the spec that allows writing to /dev/kmsg's numbers, and the same script.
    s["linux"]["resources"]["devices"] = json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}
    ]);
    let (out, err, status) = agent.run("dev2", s);
    assert_eq!(status, exited(0), "stdout {out}\nstderr {err}");
    assert!(
        out.contains("rc=0\n"),
        "the spec's rule opens it: {out} {err}"
    );
}

#[test]
fn pause_resume_and_stats_use_the_cgroup() {
    let Some(agent) = start_agent() else { return };
    if agent.cgroup_root.is_none() {
        skip::skip("no cgroup v2 hierarchy on this host");
        return;
    }
    let resp = agent.create("p", spec(&["sleep", "100"]), StdioConfig::default());
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    agent.ok(&Request::StartProcess(pref("p", None)));
    agent.ok(&Request::Pause { id: "p".into() });
    let status = |agent: &Agent| match agent.request(&Request::ListContainers) {
        Response::Containers { containers } => containers[0].status,
        other => panic!("{other:?}"),
    };
    assert_eq!(status(&agent), husk_agent_protocol::ContainerStatus::Paused);
    agent.ok(&Request::Resume { id: "p".into() });
    assert_eq!(
        status(&agent),
        husk_agent_protocol::ContainerStatus::Running
    );
    assert!(matches!(
        agent.request(&Request::Stats { id: "p".into() }),
        Response::Stats(_)
    ));
    agent.ok(&Request::SignalProcess {
        process: pref("p", None),
        signal: 9,
        all: false,
    });
    assert_eq!(agent.wait("p", None).signal, Some(9));
    agent.ok(&Request::RemoveContainer { id: "p".into() });
}

#[test]
fn without_pivot_root_the_container_root_is_moved_and_the_host_hidden() {
    // The road an initramfs root takes (pivot_root refuses rootfs).
    let Some(agent) = start_agent_with(&[("HUSK_AGENT_NO_PIVOT", "1")]) else {
        return;
    };
    let script = "ls /; cat /proc/self/mountinfo | wc -l; [ -e /bundle ] || echo no-bundle";
    let (out, err, status) = agent.run("np", spec(&["sh", "-c", script]));
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"bin") && lines.contains(&"proc"), "{out}");
    assert!(
        !lines.contains(&"usr"),
        "the host root shows through: {out}"
    );
    assert_eq!(lines.last(), Some(&"no-bundle"), "{out}");
}

#[test]
fn a_container_can_join_another_containers_namespaces() {
    let Some(agent) = start_agent() else { return };
    // The pod's first container ("pause") owns the namespaces.
    let resp = agent.create("pause", spec(&["sleep", "100"]), StdioConfig::default());
    let Response::Created { pid } = resp else {
        panic!("{resp:?}")
    };
    agent.ok(&Request::StartProcess(pref("pause", None)));
    let mut s = spec(&["sh", "-c", "hostname; cat /proc/1/comm; echo $$"]);
    s.as_object_mut().expect("object").remove("hostname");
    s["linux"]["namespaces"] = json!([
        {"type": "mount"},
        {"type": "pid", "path": format!("/proc/{pid}/ns/pid")},
        {"type": "uts", "path": format!("/proc/{pid}/ns/uts")},
        {"type": "ipc", "path": format!("/proc/{pid}/ns/ipc")},
    ]);
    let (out, err, status) = agent.run("app", s);
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "husky", "the pause container's hostname");
    assert_eq!(lines[1], "sleep", "the pause container's init is PID 1");
    assert_ne!(lines[2], "1");
    agent.ok(&Request::SignalProcess {
        process: pref("pause", None),
        signal: 9,
        all: false,
    });
    assert_eq!(agent.wait("pause", None).signal, Some(9));
    agent.ok(&Request::RemoveContainer { id: "pause".into() });
}

#[test]
fn stdin_reaches_the_process_and_close_stdin_ends_it() {
    let Some(agent) = start_agent() else { return };
    let stdio = StdioConfig {
        stdin: true,
        stdout: true,
        ..Default::default()
    };
    let resp = agent.create("in", spec(&["cat"]), stdio);
    assert!(matches!(resp, Response::Created { .. }), "{resp:?}");
    let mut input = agent.attach("in", None, StreamKind::Stdin);
    let mut output = agent.attach("in", None, StreamKind::Stdout);
    agent.ok(&Request::StartProcess(pref("in", None)));
    std::io::Write::write_all(&mut input, b"abc").expect("write stdin");
    output
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut echoed = [0u8; 3];
    output.read_exact(&mut echoed).expect("cat echoes");
    assert_eq!(&echoed, b"abc");
    // The stdin connection stays open: only CloseStdin gives cat its EOF.
    agent.ok(&Request::CloseStdin(pref("in", None)));
    assert_eq!(read_all(output), "");
    assert_eq!(agent.wait("in", None), exited(0));
    drop(input);
    agent.ok(&Request::RemoveContainer { id: "in".into() });
}

/// The optional fields (`shared:N`, `master:N`, `unbindable`, ...) of the mountinfo line of the
/// mount at `point`, or `None` when no line has that mount point.
fn optional_fields<'a>(mountinfo: &'a str, point: &str) -> Option<Vec<&'a str>> {
    mountinfo.lines().find_map(|line| {
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
}

/// What the propagation of the root mount and of `/proc` (a mount below it) looks like for each
/// `linux.rootfsPropagation`: the root is made private to be pivoted to (or moved), then the
/// configured propagation is applied to it, to the mounts below it for the `r` forms (runc
/// skips private; a slave of nothing is private).
fn assert_root_propagation(value: &str, mountinfo: &str) {
    let fields = |point: &str| {
        optional_fields(mountinfo, point)
            .unwrap_or_else(|| panic!("{value}: no {point} mount in\n{mountinfo}"))
    };
    let (root, proc) = (fields("/"), fields("/proc"));
    let shared = |f: &[&str]| f.iter().any(|f| f.starts_with("shared:"));
    let unbindable = |f: &[&str]| f.contains(&"unbindable");
    let what = format!("{value}: / {root:?}, /proc {proc:?}\n{mountinfo}");
    match value {
        "shared" => assert!(shared(&root) && proc.is_empty(), "{what}"),
        "rshared" => assert!(shared(&root) && shared(&proc), "{what}"),
        "unbindable" => assert!(unbindable(&root) && proc.is_empty(), "{what}"),
        "runbindable" => assert!(unbindable(&root) && unbindable(&proc), "{what}"),
        _ => assert!(root.is_empty() && proc.is_empty(), "{what}"),
    }
}

const PROPAGATIONS: &[&str] = &[
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
];

#[test]
fn every_rootfs_propagation_runs_with_pivot_root_and_without() {
    for env in [&[][..], &[("HUSK_AGENT_NO_PIVOT", "1")][..]] {
        let Some(agent) = start_agent_with(env) else {
            return;
        };
        for (n, value) in PROPAGATIONS.iter().enumerate() {
            let mut s = spec(&["cat", "/proc/self/mountinfo"]);
            s["linux"]["rootfsPropagation"] = json!(value);
            // Masked and read-only paths are bind mounts inside /proc: they must work under an
            // unbindable root too.
            s["linux"]["maskedPaths"] = json!(["/proc/kcore", "/proc/acpi"]);
            s["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
            let (out, err, status) = agent.run(&format!("prop{n}"), s);
            assert_eq!(status, exited(0), "{value} {env:?}: {out}\nstderr: {err}");
            assert_root_propagation(value, &out);
        }
    }
}

#[test]
fn a_mount_under_an_rshared_root_joins_a_peer_group() {
    let Some(agent) = start_agent_with(&[("HUSK_AGENT_NO_PIVOT", "1")]) else {
        return;
    };
    let mut s = spec(&[
        "sh",
        "-c",
        "mkdir /mnt/sub && mount -t tmpfs none /mnt/sub && cat /proc/self/mountinfo",
    ]);
    s["linux"]["rootfsPropagation"] = json!("rshared");
    s["mounts"].as_array_mut().expect("mounts").push(
        json!({"destination": "/mnt", "type": "tmpfs", "source": "tmpfs",
                     "options": ["private"]}),
    );
    let (out, err, status) = agent.run("rshared", s);
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    for point in ["/", "/mnt", "/mnt/sub"] {
        let fields = optional_fields(&out, point).unwrap_or_else(|| panic!("no {point}: {out}"));
        assert!(
            fields.iter().any(|f| f.starts_with("shared:")),
            "{point}: {fields:?}\n{out}"
        );
    }
}

#[test]
fn runc_spec_ambient_capabilities_without_inheritable_ones_are_skipped() {
    let Some(agent) = start_agent() else { return };
    let mut s = spec(&["grep", "Cap", "/proc/self/status"]);
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    s["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
    });
    s["process"]["noNewPrivileges"] = json!(true);
    let (out, err, status) = agent.run("runcspec", s);
    assert_eq!(status, exited(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out,
        "CapInh:\t0000000000000000\nCapPrm:\t0000000020000420\nCapEff:\t0000000020000420\n\
         CapBnd:\t0000000020000420\nCapAmb:\t0000000000000000\n"
    );
}
