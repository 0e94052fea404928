//! `cargo xtask test`: unit tests on the host, then the VM-level tests wherever real KVM can run a
//! Linux guest: on the host when its KVM can, otherwise inside the test rig.

use crate::rig::{self, RigImage, RigRun};
use crate::util::{self, run, workspace_root};
use anyhow::{bail, Context, Result};
use kvm_check::KvmUsability;

/// The same host check `husk check` and the VM tests use, compiled in from the VMM's source file
/// rather than through the `husk-vmm` crate, so that xtask (and with it the rig) keeps building
/// while the VMM is in the middle of a change.
#[path = "../../vmm/src/kvm_check.rs"]
#[allow(dead_code)]
mod kvm_check;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the VM-level tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmPlace {
    /// The host's KVM can run Linux guests.
    Host,
    /// Inside the rig's L2, whose emulated SVM gives real KVM.
    Rig,
    /// Not at all (only by explicit request).
    Skip,
}

/// Decides where VM-level work runs, and says why. `HUSK_TEST_VM=host|rig|skip` overrides.
pub fn decide_vm_place() -> Result<(VmPlace, String)> {
    if let Ok(forced) = std::env::var("HUSK_TEST_VM") {
        let place = match forced.as_str() {
            "host" => VmPlace::Host,
            "rig" => VmPlace::Rig,
            "skip" => VmPlace::Skip,
            other => bail!("HUSK_TEST_VM={other}: expected host, rig or skip"),
        };
        return Ok((place, format!("HUSK_TEST_VM={forced}")));
    }
    // The same verdict `husk check` and the VM tests use.
    let report = kvm_check::check_host();
    Ok(match report.usability {
        KvmUsability::Usable => (
            VmPlace::Host,
            "the host's KVM can run Linux guests (husk check: usable)".into(),
        ),
        KvmUsability::Unusable(why) => (VmPlace::Rig, why),
    })
}

/// Everything a VM-level test or run needs, built for release.
pub struct VmArtifacts {
    pub bin_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds the release binaries, the guest kernel and the initramfs.
pub fn build_vm_artifacts() -> Result<VmArtifacts> {
    run(Command::new(cargo()).current_dir(workspace_root()).args([
        "build",
        "--release",
        "--bins",
        "-p",
        "husk-vmm",
        "-p",
        "husk",
    ]))?;
    let kernel = crate::kernel::build()?;
    let initramfs = crate::initramfs::build()?;
    Ok(VmArtifacts {
        bin_dir: util::target_dir().join("release"),
        kernel,
        initramfs,
    })
}

/// Files to bring into the rig (`(host path, path under /work)`) and environment for the run.
pub type RigInputs = (Vec<(PathBuf, String)>, Vec<(String, String)>);

/// The binaries a VM-level run takes along.
pub const VM_BINARIES: &[&str] = &["husk-vmm", "husk", "containerd-shim-husk-v2"];

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Debian packages that building `husk-tests` needs on the host: `protoc`, for the CRI client
/// the `k8s-cri` crate generates from the Kubernetes protobuf definitions at build time.
const TEST_BUILD_PACKAGES: &[&str] = &["protobuf-compiler"];

/// Installs what building `husk-tests` (its tests and `husk-bench`) needs.
pub fn install_test_build_packages() -> Result<()> {
    util::apt_install(TEST_BUILD_PACKAGES)
}

/// Builds the integration-test executables of `husk-tests` (release) and returns their paths.
fn build_vm_test_binaries() -> Result<Vec<PathBuf>> {
    install_test_build_packages()?;
    let out = util::output(Command::new(cargo()).current_dir(workspace_root()).args([
        "test",
        "--release",
        "-p",
        "husk-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            if let Some(exe) = msg["executable"].as_str() {
                bins.push(PathBuf::from(exe));
            }
        }
    }
    if bins.is_empty() {
        bail!("cargo built no test executables for husk-tests");
    }
    Ok(bins)
}

/// What `cargo xtask test` runs: everything by default; a subset while working on one test.
pub struct TestSelection {
    /// Skip the host unit tests and the rig's L3 smoke check.
    pub vm_only: bool,
    /// VM-level test binaries by name (`oci` for `tests/tests/oci.rs`); empty means all.
    pub bins: Vec<String>,
    /// Extra arguments for every selected test binary (a name filter, `--exact`, ...).
    pub test_args: Vec<String>,
}

/// `cargo xtask test`.
pub fn test(sel: &TestSelection) -> Result<()> {
    let (place, why) = decide_vm_place()?;
    eprintln!("xtask: VM-level tests will run: {place:?} ({why})");

    // Unit tests and everything that needs no KVM, on the host.
    if !sel.vm_only {
        run(Command::new(cargo()).current_dir(workspace_root()).args([
            "test",
            "--workspace",
            "--exclude",
            "husk-tests",
        ]))?;
    }

    if place == VmPlace::Skip {
        let msg = "VM-LEVEL TESTS SKIPPED (HUSK_TEST_VM=skip): nothing booted a guest";
        if require_kvm() {
            bail!("{msg}, but HUSK_REQUIRE_KVM=1 requires them");
        }
        eprintln!("xtask: !!! {msg} !!!");
        return Ok(());
    }

    let artifacts = build_vm_artifacts()?;
    let mut tests = build_vm_test_binaries()?;
    if !sel.bins.is_empty() {
        tests.retain(|t| sel.bins.iter().any(|b| test_binary_name(t) == b.as_str()));
        if tests.is_empty() {
            bail!("no VM-level test binary is named {}", sel.bins.join(" or "));
        }
    }
    match place {
        VmPlace::Host => run_tests_on_host(&artifacts, &tests, &sel.test_args),
        VmPlace::Rig => run_tests_in_rig(&artifacts, &tests, !sel.vm_only, &sel.test_args),
        VmPlace::Skip => unreachable!("handled above"),
    }
}

fn require_kvm() -> bool {
    std::env::var("HUSK_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// `oci` for cargo's `target/release/deps/oci-0123abcd`.
fn test_binary_name(exe: &Path) -> &str {
    let file = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    file.rsplit_once('-').map_or(file, |(name, _hash)| name)
}

/// Quotes `arg` for the rig's POSIX shell.
pub fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn run_tests_on_host(artifacts: &VmArtifacts, tests: &[PathBuf], args: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for test in tests {
        let status = Command::new(test)
            .args(args)
            .env("HUSK_VMM_BIN", artifacts.bin_dir.join("husk-vmm"))
            .env("HUSK_BIN", artifacts.bin_dir.join("husk"))
            .env("HUSK_KERNEL", &artifacts.kernel)
            .env("HUSK_INITRAMFS", &artifacts.initramfs)
            .env("HUSK_REQUIRE_KVM", "1")
            .status()
            .with_context(|| format!("running {}", test.display()))?;
        if !status.success() {
            failed.push(test.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("VM-level tests failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask run`: boots one husk microVM (through `husk check`'s probe guest) and prints the
/// agent's handshake and the boot timeline; on a host whose KVM cannot run guests, in the rig.
pub fn run_demo() -> Result<()> {
    let (place, why) = decide_vm_place()?;
    let artifacts = build_vm_artifacts()?;
    let bundle = crate::bundle::busybox_bundle(
        &artifacts.bin_dir.join("husk"),
        &util::target_dir().join("bundles/busybox"),
        &["uname", "-a"],
    )?;
    match place {
        VmPlace::Host | VmPlace::Skip => {
            eprintln!("xtask: running `uname -a` in a busybox container in a husk microVM on this host ({why})");
            run(Command::new(artifacts.bin_dir.join("husk"))
                .env("HUSK_KERNEL", &artifacts.kernel)
                .env("HUSK_INITRAMFS", &artifacts.initramfs)
                .arg("run")
                .arg("--bundle")
                .arg(&bundle)
                .arg(format!("demo-{}", std::process::id())))
        }
        VmPlace::Rig => {
            eprintln!(
                "xtask: this host cannot run husk microVMs itself ({why});\n\
                 xtask: running the container inside the test rig instead (a Debian VM under QEMU's emulator \
                 with real KVM; everything there runs ~20x slower than on hardware)"
            );
            let image = rig::build()?;
            let (mut inputs, env) = rig_vm_inputs(&artifacts);
            inputs.push((bundle, "bundles/busybox".into()));
            let outcome = rig::run_in_rig(
                &image,
                &RigRun {
                    inputs,
                    script: Some("husk run --bundle /work/bundles/busybox demo".into()),
                    env,
                    out_dir: None,
                    timeout: rig_timeout(),
                },
            )?;
            if outcome.exit_code != 0 {
                bail!(
                    "the container did not run in the rig (exit code {})",
                    outcome.exit_code
                );
            }
            Ok(())
        }
    }
}

/// The files every rig run of VM-level work carries, and the environment that finds them.
pub fn rig_vm_inputs(artifacts: &VmArtifacts) -> RigInputs {
    let mut inputs = Vec::new();
    for bin in VM_BINARIES {
        let path = artifacts.bin_dir.join(bin);
        if path.exists() {
            inputs.push((path, format!("bin/{bin}")));
        }
    }
    inputs.push((artifacts.kernel.clone(), "husk/vmlinux".into()));
    inputs.push((artifacts.initramfs.clone(), "husk/initramfs.cpio".into()));
    let env = vec![
        (
            "PATH".into(),
            "/work/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HUSK_VMM_BIN".into(), "/work/bin/husk-vmm".into()),
        ("HUSK_BIN".into(), "/work/bin/husk".into()),
        ("HUSK_KERNEL".into(), "/work/husk/vmlinux".into()),
        ("HUSK_INITRAMFS".into(), "/work/husk/initramfs.cpio".into()),
    ];
    (inputs, env)
}

/// The rig's own check: inside L2, Debian's QEMU boots an L3 Linux guest (L2's kernel and a
/// busybox initramfs) under L2's KVM to user space. It proves the rig gives real KVM before any
/// husk test relies on it. Returns the shell text to run in the rig, and the files it needs.
fn l3_smoke_inputs(image: &RigImage, scratch: &Path) -> Result<(Vec<(PathBuf, String)>, String)> {
    util::apt_install(&["busybox-static"])?;
    let mut w = crate::cpio::CpioWriter::new(Vec::new());
    for dir in ["bin", "dev", "proc"] {
        w.dir(dir, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    w.file("init", 0o755, L3_SMOKE_INIT.as_bytes())?;
    let initrd = scratch.join("l3-initrd.cpio");
    std::fs::write(&initrd, w.finish()?)?;
    let inputs = vec![
        (image.vmlinux.clone(), "l3/vmlinux".into()),
        (initrd, "l3/initrd.cpio".into()),
    ];
    Ok((inputs, L3_SMOKE_SCRIPT.to_string()))
}

const L3_SMOKE_INIT: &str = "#!/bin/busybox sh\n\
/bin/busybox mount -t proc proc /proc\n\
/bin/busybox echo \"HUSK-L3-USERSPACE-OK pid=$$ kernel=$(/bin/busybox uname -r) uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n\
/bin/busybox reboot -f\n";

const L3_SMOKE_SCRIPT: &str = r#"
echo "husk-rig smoke: booting an L3 guest under L2's KVM with QEMU"
[ -e /dev/kvm ] || { echo "husk-rig smoke: FAILED: no /dev/kvm in L2"; exit 1; }
start=$(date +%s.%N)
out=$(timeout 300 qemu-system-x86_64 -M microvm,x-option-roms=off,isa-serial=on,rtc=on \
    -enable-kvm -cpu host -smp 1 -m 256 -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -kernel /work/l3/vmlinux -initrd /work/l3/initrd.cpio \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t" </dev/null 2>&1)
end=$(date +%s.%N)
line=$(printf '%s\n' "$out" | grep -a HUSK-L3-USERSPACE-OK | tr -d '\r')
if [ -z "$line" ]; then
    printf '%s\n' "$out" | tail -n 30
    echo "husk-rig smoke: FAILED: the L3 guest did not reach user space"
    exit 1
fi
echo "husk-rig smoke: $line (QEMU round trip $(awk "BEGIN{printf \"%.2f\", $end - $start}") s)"
echo "husk-rig smoke: 1 passed, 0 failed"
"#;

/// `cargo xtask rig smoke`: only the L3 boot check, no husk build needed.
pub fn rig_smoke() -> Result<()> {
    let image = rig::build()?;
    let scratch = rig::tempdir("husk-xtask-smoke")?;
    let result = (|| {
        let (inputs, script) = l3_smoke_inputs(&image, &scratch)?;
        let outcome = rig::run_in_rig_retrying_fault(
            &image,
            &RigRun {
                inputs,
                script: Some(script),
                env: Vec::new(),
                out_dir: None,
                timeout: rig_timeout(),
            },
        )?;
        if outcome.exit_code != 0 {
            bail!(
                "the rig's L3 smoke test failed (exit code {})",
                outcome.exit_code
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_tests_in_rig(
    artifacts: &VmArtifacts,
    tests: &[PathBuf],
    smoke: bool,
    args: &[String],
) -> Result<()> {
    let image = rig::build()?;
    let scratch = rig::tempdir("husk-xtask-test")?;
    let extra: String = args.iter().map(|a| format!(" {}", sh_quote(a))).collect();
    let result = (|| {
        let (mut inputs, env) = rig_vm_inputs(artifacts);
        let mut script = String::from("rc=0\n");
        if smoke {
            let (smoke_inputs, smoke) = l3_smoke_inputs(&image, &scratch)?;
            inputs.extend(smoke_inputs);
            script.push_str(&format!("( {smoke} ) || rc=1\n"));
        }
        for test in tests {
            let name = test
                .file_name()
                .context("test executable has a file name")?
                .to_string_lossy()
                .into_owned();
            inputs.push((test.clone(), format!("tests/{name}")));
            script.push_str(&format!(
                "echo \"== husk-rig: running {name}\"\n\
                 run_test {limit} /work/tests/{name} --test-threads=1{extra} || {{ echo \"== husk-rig: {name} FAILED\"; rc=1; }}\n",
                limit = test_binary_timeout().as_secs(),
            ));
        }
        script.push_str("exit $rc\n");
        let script = format!("{RUN_TEST_FN}{script}");
        let mut env = env;
        env.push(("HUSK_REQUIRE_KVM".into(), "1".into()));
        env.push(("RUST_BACKTRACE".into(), "1".into()));
        let outcome = rig::run_in_rig_retrying_fault(
            &image,
            &RigRun {
                inputs,
                script: Some(script),
                env,
                out_dir: None,
                timeout: rig_timeout(),
            },
        )?;
        if outcome.exit_code != 0 {
            bail!(
                "VM-level tests failed inside the rig (exit code {}); their output is above",
                outcome.exit_code
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// How long one VM-level test binary may run in the rig before it is killed with a report
/// (`HUSK_TEST_BINARY_TIMEOUT_S`, default 10 min; the slowest binary takes about 2 in the rig).
pub fn test_binary_timeout() -> Duration {
    secs_from_env("HUSK_TEST_BINARY_TIMEOUT_S", 600)
}

/// Seconds from the environment variable `name`, else `default`.
fn secs_from_env(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// `run_test LIMIT CMD...` for the rig's script: runs one test binary, its output to the
/// console and to `/work/out/tests.log`. If it is still running after LIMIT seconds it is a
/// hang, so the report says where everything is stuck (every process's state and kernel wait
/// channel, the kernel stacks of the test's and husk's threads, the serial port's counters,
/// the kernel log's tail) before the binary is killed and counted as failed. The report goes
/// to the work disk (`out/hang-report.txt`, which the host prints after the run) and to
/// `/dev/kmsg`, whose lines reach the console even when the console's tty is stuck. The test's
/// own output names the test that hung (`--test-threads=1` prints `test NAME ...` first).
const RUN_TEST_FN: &str = r#"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
hang_report() {
    echo "== husk-rig: HANG: $1 still running after $2 s; where everything is:"
    ps -eo pid,ppid,stat,wchan:32,etime,args
    for p in $(pgrep -f -- "$1") $(pgrep -f husk-vmm) $(pgrep -f containerd-shim-husk) $(pgrep -x husk); do
        for t in /proc/$p/task/*; do
            echo "-- pid $p task ${t##*/} ($(cat $t/comm 2>/dev/null)) $(cut -d' ' -f3 $t/stat 2>/dev/null):"
            cat $t/stack 2>/dev/null
        done
    done
    echo "-- serial ports:"
    cat /proc/tty/driver/serial 2>/dev/null
    echo "-- kernel log tail:"
    dmesg | tail -n 60
}
run_test() {
    limit=$1; shift
    "$@" > >(tee -a /work/out/tests.log) 2>&1 &
    tp=$!
    ( sleep "$limit"
      if kill -0 "$tp" 2>/dev/null; then
          hang_report "$1" "$limit" > /work/out/hang-report.txt 2>&1
          sync
          while IFS= read -r l; do echo "<2>husk-rig: $l" > /dev/kmsg; done < /work/out/hang-report.txt
          kill -KILL "$tp"
      fi ) &
    wp=$!
    wait "$tp"
    trc=$?
    kill "$wp" 2>/dev/null
    return $trc
}
"#;

/// How long one rig run may take before it is killed (`HUSK_RIG_TIMEOUT_S`, default 40 min).
pub fn rig_timeout() -> Duration {
    secs_from_env("HUSK_RIG_TIMEOUT_S", 2400)
}
