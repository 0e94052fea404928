//! The virtio-fs share from inside a real guest: a busybox container whose rootfs lives in the
//! share (`husk-vmm --shared-dir`) tries, as root with every capability, each way out of the
//! share it can think of; the host then checks that nothing outside the share was reached or
//! changed and that the policy's traces (stripped setuid bits, refused device nodes) are there.
//!
//! Needs the VM artifacts (see `husk_tests::vm_artifacts`), root, and `/bin/busybox`
//! (Debian's `busybox-static`, in the rig's image); skips loudly otherwise.

use husk_agent_protocol::{
    AgentClient, AttachStdio, CreateContainer, ProcessRef, Request, Response, StdioConfig,
    StreamKind,
};
use husk_tests::{vm_artifacts, TempDir, TestVmBuilder, BOOT_TIMEOUT};
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const BUSYBOX: &str = "/bin/busybox";
const SECRET: &str = "host secret\n";
const GRANTED: &str = "granted\n";

/// Every trick prints `PASS <name>` or `FAIL <name>: <detail>`; `no NAME CMD...` expects the
/// command to fail.
const ESCAPES: &str = r#"
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; }
no() { n="$1"; shift; if out=$("$@" 2>&1); then fail "$n" "succeeded: $out"; else pass "$n"; fi; }

no abs-symlink cat /abs
no rel-symlink cat /rel
no dir-symlink cat /dirlink/secret
no dotdot-from-root cat /../../../outside/secret
no dotdot-from-subdir cat /inside/../../../../outside/secret
no proc-root cat /proc/self/root/../../../outside/secret
no proc-cwd sh -c 'cd /inside && cat /proc/self/cwd/../../../outside/secret'
exec 3</granted
no proc-fd-dotdot cat /proc/self/fd/3/../secret
[ "$(cat /proc/self/fd/3)" = "granted" ] && pass proc-fd-granted || fail proc-fd-granted "cannot read the granted file"
exec 3<&-
exec 4</
no proc-fd-root-dotdot ls /proc/self/fd/4/../outside
exec 4<&-
no mknod-char mknod /newchar c 1 1
no mknod-block mknod /newblock b 8 0
mkfifo /newfifo && pass mkfifo || fail mkfifo "refused"
echo x > /suid && chmod 6755 /suid
m=$(stat -c %a /suid); [ "$m" = 755 ] && pass chmod-setuid-stripped || fail chmod-setuid-stripped "mode $m"
echo appended >> /hostsuid
m=$(stat -c %a /hostsuid); [ "$m" = 755 ] && pass write-clears-setuid || fail write-clears-setuid "mode $m"
ln /abs /hardabs && [ -L /hardabs ] && pass hardlink-of-symlink || fail hardlink-of-symlink "not a symlink"
no hardlink-dotdot ln /../../outside/secret /stolen
mv /inside /../../moved && [ -d /moved ] && pass rename-dotdot || fail rename-dotdot "not moved"
mkdir -p /r1/r2/r3
( i=0; while [ $i -lt 60 ]; do mv /r1/r2 /r2x; mv /r2x /r1/r2; i=$((i+1)); done ) 2>/dev/null &
i=0; leaked=""
while [ $i -lt 60 ]; do
    out=$(cat /r1/r2/r3/../../../../outside/secret /r2x/r3/../../../outside/secret 2>/dev/null) && leaked="$out"
    i=$((i+1))
done
wait
[ -z "$leaked" ] && pass rename-race || fail rename-race "$leaked"
echo DONE
"#;

/// The names of all checks, in order.
const CHECKS: &[&str] = &[
    "abs-symlink",
    "rel-symlink",
    "dir-symlink",
    "dotdot-from-root",
    "dotdot-from-subdir",
    "proc-root",
    "proc-cwd",
    "proc-fd-dotdot",
    "proc-fd-granted",
    "proc-fd-root-dotdot",
    "mknod-char",
    "mknod-block",
    "mkfifo",
    "chmod-setuid-stripped",
    "write-clears-setuid",
    "hardlink-of-symlink",
    "hardlink-dotdot",
    "rename-dotdot",
    "rename-race",
];

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_SYS_CHROOT",
    "CAP_SYS_ADMIN",
    "CAP_MKNOD",
    "CAP_SYS_PTRACE",
];

fn spec(id: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": format!("/run/husk/shared/{id}/rootfs")},
        "hostname": "escape",
        "process": {
            "args": ["sh", "/escapes.sh"],
            "cwd": "/",
            "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": false,
            "capabilities": {
                "bounding": ALL_CAPS, "effective": ALL_CAPS, "permitted": ALL_CAPS,
                "inheritable": ALL_CAPS, "ambient": ALL_CAPS
            }
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=1024k"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    })
}

/// The host side: `base/share/<id>/rootfs` (busybox, symlinks out, a host setuid file, a hard
/// link the host granted) next to `base/outside` (the secret).
fn prepare(base: &Path, id: &str) {
    let outside = base.join("outside");
    let rootfs = base.join("share").join(id).join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs");
    std::fs::create_dir_all(&outside).expect("outside");
    for dir in ["proc", "dev", "inside"] {
        std::fs::create_dir(rootfs.join(dir)).expect("dir");
    }
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
    for applet in [
        "sh", "cat", "ls", "mknod", "mkfifo", "chmod", "stat", "ln", "mv", "mkdir", "echo",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet");
    }
    std::fs::write(outside.join("secret"), SECRET).expect("secret");
    std::fs::write(outside.join("granted"), GRANTED).expect("granted");
    std::fs::hard_link(outside.join("granted"), rootfs.join("granted")).expect("hard link");
    std::os::unix::fs::symlink(outside.join("secret"), rootfs.join("abs")).expect("abs");
    // From share/<id>/rootfs on the host, this names base/outside/secret.
    std::os::unix::fs::symlink("../../../outside/secret", rootfs.join("rel")).expect("rel");
    std::os::unix::fs::symlink(&outside, rootfs.join("dirlink")).expect("dirlink");
    let hostsuid = rootfs.join("hostsuid");
    std::fs::write(&hostsuid, "#!/bin/sh\n").expect("hostsuid");
    std::fs::set_permissions(&hostsuid, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    std::fs::write(rootfs.join("escapes.sh"), ESCAPES).expect("script");
}

fn client(socket: &Path) -> AgentClient {
    let (mut client, _) = AgentClient::connect(socket, BOOT_TIMEOUT).expect("agent connection");
    client
        .set_io_timeout(Duration::from_secs(300))
        .expect("timeout");
    client
}

fn request(socket: &Path, request: &Request) -> Response {
    client(socket).request(request).expect("request")
}

fn read_all(mut stream: UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .expect("timeout");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read stream");
    text
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The VM artifacts and a prepared share ([`prepare`]) for test `test`'s container `id`; `None`
/// (with a loud skip) without the artifacts, root (the share's owners and bind mounts) or
/// busybox.
fn setup(test: &str, id: &str) -> Option<(husk_tests::Artifacts, TempDir)> {
    let artifacts = vm_artifacts(test)?;
    if !husk_tests::skip::have_root("the share's owners and bind mounts") {
        return None;
    }
    if !Path::new(BUSYBOX).exists() {
        husk_tests::skip::skip(&format!("{BUSYBOX} is missing (busybox-static)"));
        return None;
    }
    let base = TempDir::new("husk-share-test").expect("temp dir");
    prepare(base.path(), id);
    Some((artifacts, base))
}

/// Creates container `id` from `spec` in the VM, runs it to its end and returns its stdout and
/// stderr.
fn run_container(
    vm: &husk_tests::TestVm,
    socket: &Path,
    id: &str,
    spec: Value,
) -> (String, String) {
    let created = request(
        socket,
        &Request::CreateContainer(CreateContainer {
            id: id.into(),
            spec,
            bundle: format!("/run/husk/shared/{id}"),
            stdio: StdioConfig {
                stdout: true,
                stderr: true,
                ..Default::default()
            },
        }),
    );
    assert!(
        matches!(created, Response::Created { pid } if pid > 1),
        "{created:?}; husk-vmm stderr: {}",
        vm.stderr()
    );
    let process = ProcessRef {
        id: id.into(),
        exec_id: None,
    };
    let attach = |stream| {
        client(socket)
            .into_stdio(AttachStdio {
                process: process.clone(),
                stream,
            })
            .expect("attach")
    };
    let out = attach(StreamKind::Stdout);
    let err = attach(StreamKind::Stderr);
    assert_eq!(
        request(socket, &Request::StartProcess(process.clone())),
        Response::Ok
    );
    let out = read_all(out);
    let err = read_all(err);
    let status = request(socket, &Request::WaitProcess(process.clone()));
    eprintln!("container stdout:\n{out}\ncontainer stderr:\n{err}\nstatus: {status:?}");
    (out, err)
}

/// Removes container `id` and shuts the VM down; it must exit cleanly.
fn remove_and_shut_down(vm: &mut husk_tests::TestVm, socket: &Path, id: &str) {
    assert_eq!(
        request(socket, &Request::RemoveContainer { id: id.into() }),
        Response::Ok
    );
    client(socket).shutdown().expect("shutdown acknowledged");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("husk-vmm exits after the agent's shutdown");
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn container_in_the_share_cannot_escape_it() {
    let id = "esc";
    let Some((artifacts, base)) = setup("container_in_the_share_cannot_escape_it", id) else {
        return;
    };
    let share = base.path().join("share");
    let rootfs = share.join(id).join("rootfs");
    let mut vm = TestVmBuilder::new(&artifacts)
        .mem_mib(256)
        .shared_dir(&share)
        .spawn()
        .expect("spawn husk-vmm");
    drop(vm.connect().expect("agent handshake"));
    let socket = vm.socket.clone();

    let (out, err) = run_container(&vm, &socket, id, spec(id));

    // Inside: every trick ran and failed.
    assert!(
        out.contains("DONE"),
        "the script did not finish: {out}\n{err}"
    );
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "escapes: {failed:#?}");
    for check in CHECKS {
        assert!(
            out.lines().any(|l| l == format!("PASS {check}")),
            "{check} did not run: {out}"
        );
    }

    // Outside: nothing reached, nothing changed.
    assert_eq!(names(base.path()), ["outside", "share"]);
    assert_eq!(names(&base.path().join("outside")), ["granted", "secret"]);
    let secret = base.path().join("outside/secret");
    assert_eq!(std::fs::read_to_string(&secret).expect("secret"), SECRET);
    assert_eq!(std::fs::metadata(&secret).expect("secret").nlink(), 1);
    // The share shows the policy's traces.
    let mode = |name: &str| {
        std::fs::symlink_metadata(rootfs.join(name))
            .expect(name)
            .mode()
    };
    assert_eq!(mode("suid") & 0o7777, 0o755, "setuid from chmod stripped");
    assert_eq!(
        mode("hostsuid") & 0o7777,
        0o755,
        "setuid cleared by the write"
    );
    assert!(!rootfs.join("newchar").exists() && !rootfs.join("newblock").exists());
    let fifo = std::fs::symlink_metadata(rootfs.join("newfifo")).expect("fifo");
    assert!(fifo.file_type().is_fifo());
    assert!(std::fs::symlink_metadata(rootfs.join("hardabs"))
        .expect("hardabs")
        .file_type()
        .is_symlink());
    assert!(rootfs.join("moved").is_dir() && !rootfs.join("inside").exists());

    remove_and_shut_down(&mut vm, &socket, id);
}

/// Fills the share's inode budget (`--share-max-inodes`), then frees it.
const INODES: &str = r#"
mkdir /many
made=0; refused=0; i=0
while [ $i -lt 100 ]; do
    if (echo x > /many/f$i) 2>/dev/null; then made=$((made+1)); else refused=$((refused+1)); fi
    i=$((i+1))
done
echo "MADE $made REFUSED $refused"
echo "ERROR $( (echo x > /many/more) 2>&1 )"
echo 2 > /proc/sys/vm/drop_caches
(echo x > /many/after) 2>/dev/null && echo "AFTER ok" || echo "AFTER refused"
echo DONE
"#;

/// The guest holds at most `--share-max-inodes` inodes of the share: past it, creates fail with
/// ENFILE (and the VMM says why), nothing else breaks, and what the guest forgets is room again.
#[test]
fn the_guest_holds_at_most_its_share_inodes() {
    const MAX_INODES: usize = 64;
    let id = "inodes";
    let Some((artifacts, base)) = setup("the_guest_holds_at_most_its_share_inodes", id) else {
        return;
    };
    let share = base.path().join("share");
    let rootfs = share.join(id).join("rootfs");
    std::fs::write(rootfs.join("inodes.sh"), INODES).expect("script");
    let mut vm = TestVmBuilder::new(&artifacts)
        .shared_dir(&share)
        .arg("--share-max-inodes")
        .arg(&MAX_INODES.to_string())
        .spawn()
        .expect("spawn husk-vmm");
    drop(vm.connect().expect("agent handshake"));
    let socket = vm.socket.clone();
    let mut spec = spec(id);
    spec["process"]["args"] = json!(["sh", "/inodes.sh"]);
    let (out, err) = run_container(&vm, &socket, id, spec);
    assert!(
        out.contains("DONE"),
        "the script did not finish: {out}\n{err}"
    );

    let counts: Vec<usize> = out
        .lines()
        .find_map(|l| l.strip_prefix("MADE "))
        .expect("counts")
        .split(" REFUSED ")
        .map(|n| n.parse().expect("count"))
        .collect();
    let (made, refused) = (counts[0], counts[1]);
    assert!(made > 0 && refused > 0, "{out}");
    assert!(
        made < MAX_INODES,
        "{made} files made under a budget of {MAX_INODES}"
    );
    assert!(
        out.contains("Too many open files in system"),
        "no ENFILE: {out}"
    );
    assert!(out.contains("AFTER ok"), "forgetting made no room: {out}");
    assert!(
        vm.stderr().contains("the most this VM may"),
        "the VMM did not say why: {}",
        vm.stderr()
    );
    // On the host: what the guest was told was made, and nothing it was refused.
    let on_host = names(&rootfs.join("many"));
    assert_eq!(on_host.len(), made + 1, "{on_host:?}");
    assert!(!rootfs.join("many/more").exists());

    remove_and_shut_down(&mut vm, &socket, id);
}
