//! Bad invocations of `husk-vmm`: each fails fast with a message naming the problem, exits
//! non-zero, and leaves nothing behind. Validation comes before KVM is touched, so most of these
//! run anywhere (no usable KVM needed); the /dev/kvm cases need a private mount namespace (root).

use husk_tests::{run_vmm, vmm_binary, TempDir};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A kernel that passes validation: the real one when the harness provides it, otherwise any
/// 64-bit ELF file (validation only checks the ELF header before KVM is opened).
/// husk-vmm's exit code for an error it names (bad files, sizes, sockets, /dev/kvm).
const REFUSED: i32 = 1;
/// clap's exit code for a malformed command-line argument.
const USAGE_ERROR: i32 = 2;

fn some_kernel() -> PathBuf {
    std::env::var_os("HUSK_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(vmm_binary)
}

struct Case {
    dir: TempDir,
}

impl Case {
    fn new() -> Case {
        Case {
            dir: TempDir::new("husk-bad-input").expect("temp dir"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Runs husk-vmm with the given overrides of a valid command line.
    fn run(&self, kernel: &Path, cpus: &str, mem: &str, socket: &Path) -> (i32, String) {
        let kernel = kernel.to_string_lossy().into_owned();
        let socket = socket.to_string_lossy().into_owned();
        let (status, stderr) = run_vmm(&[
            "--kernel",
            &kernel,
            "--cpus",
            cpus,
            "--mem-mib",
            mem,
            "--vsock-socket",
            &socket,
        ])
        .expect("run husk-vmm");
        (status.code().unwrap_or(-1), stderr)
    }

    /// Asserts a failure whose message contains every one of `needles`, and no leftovers.
    /// husk-vmm refused: exactly `expected` (never a panic's 101 or a crash's signal), its
    /// message on stderr naming every needle.
    fn assert_fails(&self, (code, stderr): (i32, String), expected: i32, needles: &[&str]) {
        assert_eq!(code, expected, "exit code; stderr: {stderr}");
        let prefix = if expected == USAGE_ERROR {
            "error: "
        } else {
            "husk-vmm: "
        };
        assert!(
            stderr.starts_with(prefix),
            "the message starts with {prefix:?}: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "stderr should mention {needle:?}: {stderr}"
            );
        }
        assert!(
            !stderr.contains("panicked"),
            "a clear error, not a panic: {stderr}"
        );
        assert!(!self.socket().exists(), "no socket left behind");
    }
}

#[test]
fn missing_kernel_is_named() {
    let case = Case::new();
    let missing = case.dir.path().join("no-such-vmlinux");
    let out = case.run(&missing, "1", "128", &case.socket());
    case.assert_fails(out, REFUSED, &["no-such-vmlinux", "no such file"]);
}

#[test]
fn unreadable_kernel_is_named() {
    let case = Case::new();
    // A directory can't be read as a file, even by root.
    let dir = case.dir.path().join("vmlinux-dir");
    std::fs::create_dir(&dir).expect("mkdir");
    let out = case.run(&dir, "1", "128", &case.socket());
    case.assert_fails(out, REFUSED, &["vmlinux-dir"]);
}

#[test]
fn a_file_that_is_not_an_elf_vmlinux_is_refused() {
    let case = Case::new();
    let bogus = case.dir.path().join("bzImage");
    std::fs::write(&bogus, b"MZ\x00\x00 not an ELF kernel").expect("write");
    let out = case.run(&bogus, "1", "128", &case.socket());
    case.assert_fails(out, REFUSED, &["bzImage", "not an ELF"]);
}

#[test]
fn zero_vcpus_is_refused() {
    let case = Case::new();
    let out = case.run(&some_kernel(), "0", "128", &case.socket());
    case.assert_fails(out, REFUSED, &["at least 1 vCPU"]);
}

#[test]
fn too_many_vcpus_is_refused() {
    let case = Case::new();
    let out = case.run(&some_kernel(), "200", "128", &case.socket());
    case.assert_fails(out, REFUSED, &["200 vCPUs", "at most"]);
}

#[test]
fn memory_below_the_minimum_is_refused() {
    let case = Case::new();
    let out = case.run(&some_kernel(), "1", "4", &case.socket());
    case.assert_fails(out, REFUSED, &["4 MiB", "at least"]);
}

#[test]
fn memory_above_host_memory_is_refused() {
    let case = Case::new();
    let out = case.run(&some_kernel(), "1", "4000000", &case.socket());
    case.assert_fails(out, REFUSED, &["4000000 MiB", "host has only"]);
}

#[test]
fn an_existing_socket_path_is_refused_and_kept() {
    let case = Case::new();
    let socket = case.socket();
    std::fs::write(&socket, b"someone else's").expect("write");
    let (code, stderr) = case.run(&some_kernel(), "1", "128", &socket);
    assert_eq!(code, REFUSED, "{stderr}");
    assert!(
        stderr.starts_with("husk-vmm: ") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&socket).expect("still there"),
        b"someone else's",
        "the existing file is not touched"
    );
}

#[test]
fn a_socket_in_a_missing_directory_is_refused() {
    let case = Case::new();
    let socket = case.dir.path().join("missing-dir").join("v.sock");
    let out = case.run(&some_kernel(), "1", "128", &socket);
    case.assert_fails(
        out,
        REFUSED,
        &["missing-dir", "parent directory does not exist"],
    );
}

fn have_root_and_unshare() -> bool {
    if !husk_tests::skip::have_root("a private mount namespace with its own /dev") {
        return false;
    }
    let unshare = Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !unshare {
        husk_tests::skip::skip("util-linux's unshare is missing");
    }
    unshare
}

/// Runs husk-vmm in a private mount namespace after `setup` (shell text) changed its /dev.
fn run_in_private_dev(case: &Case, setup: &str, as_nobody: bool) -> (i32, String) {
    let kernel = case.dir.path().join("vmlinux");
    std::fs::copy(some_kernel(), &kernel).expect("copy kernel");
    std::fs::set_permissions(case.dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let vmm = case.dir.path().join("husk-vmm");
    std::fs::copy(vmm_binary(), &vmm).expect("copy husk-vmm");
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let drop = if as_nobody {
        "setpriv --reuid=65534 --regid=65534 --clear-groups"
    } else {
        ""
    };
    let script = format!(
        "{setup}\nexec {drop} {vmm} --kernel {kernel} --cpus 1 --mem-mib 128 --vsock-socket {sock}",
        vmm = vmm.display(),
        kernel = kernel.display(),
        sock = case.socket().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn absent_dev_kvm_is_named() {
    if !have_root_and_unshare() {
        return;
    }
    let case = Case::new();
    let out = run_in_private_dev(
        &case,
        "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3",
        false,
    );
    case.assert_fails(out, REFUSED, &["/dev/kvm does not exist"]);
}

#[test]
fn inaccessible_dev_kvm_is_named() {
    if !have_root_and_unshare() {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        husk_tests::skip::skip("no /dev/kvm on this host to make inaccessible");
        return;
    }
    let case = Case::new();
    // /dev/kvm is root-only (0600) here or made so in the private namespace; run as nobody.
    let out = run_in_private_dev(
        &case,
        "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && mknod -m 666 /dev/null c 1 3",
        true,
    );
    case.assert_fails(out, REFUSED, &["/dev/kvm is not accessible"]);
}

/// Network card arguments: a malformed MAC or address is refused before anything starts, and a
/// descriptor that is not a TAP is named (this one needs a VM to get that far, so real KVM).
#[test]
fn bad_network_card_arguments_are_named() {
    let case = Case::new();
    let kernel = some_kernel().to_string_lossy().into_owned();
    let socket = case.socket().to_string_lossy().into_owned();
    let base = ["--kernel", &kernel, "--vsock-socket", &socket];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (status, stderr) = run_vmm(&args).expect("run husk-vmm");
        (status.code().unwrap_or(-1), stderr)
    };
    case.assert_fails(
        run(&["--net-tap-fd", "0", "--net-mac", "02:00:00:00:00"]),
        USAGE_ERROR,
        &["not a MAC address"],
    );
    case.assert_fails(
        run(&[
            "--net-tap-fd",
            "0",
            "--net-mac",
            "02:00:00:00:00:01",
            "--net-ip",
            "10.0.0.2",
        ]),
        USAGE_ERROR,
        &["prefix length"],
    );
    if husk_tests::vm_artifacts("bad_network_card_arguments_are_named").is_some() {
        // Descriptor 0 is /dev/null here (run_vmm's stdin).
        case.assert_fails(
            run(&["--net-tap-fd", "0", "--net-mac", "02:00:00:00:00:01"]),
            REFUSED,
            &["file descriptor 0 is not a TAP device"],
        );
    }
}
