//! `cargo xtask test`: unit tests on the host, then the VM-level tests wherever real KVM can run a
//! Linux guest: on the host when its KVM can, otherwise inside the test rig.

use crate::rig::{self, RigImage, RigRun};
use crate::util::{self, run, workspace_root};
use anyhow::{bail, ensure, Context, Result};
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
    /// The static agent the initramfs holds.
    pub agent: PathBuf,
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
    // Built already by the initramfs: cargo only confirms it is up to date.
    let agent = crate::initramfs::build_agent()?;
    Ok(VmArtifacts {
        bin_dir: util::target_dir().join("release"),
        kernel,
        initramfs,
        agent,
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

/// Builds the agent's container tests (`guest-agent/tests/containers.rs`) and returns the
/// executable, which the rig runs with the static agent of the initramfs (`HUSK_AGENT_BIN`).
fn build_agent_container_tests() -> Result<PathBuf> {
    let out = util::output(Command::new(cargo()).current_dir(workspace_root()).args([
        "test",
        "-p",
        "husk-agent",
        "--test",
        "containers",
        "--no-run",
        "--message-format=json",
    ]))?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo built no executable for husk-agent's container tests")
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

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECS_IN_TEST: u32 = 20;

/// `cargo xtask test`.
pub fn test(sel: &TestSelection) -> Result<()> {
    let (place, why) = decide_vm_place()?;
    eprintln!("xtask: VM-level tests will run: {place:?} ({why})");

    // Unit tests and everything that needs no KVM, on the host. The agent's container tests
    // need a host with a pure cgroup v2 hierarchy and its controllers (a rig host is a VM like
    // this one, whose cgroups may be v1 or hybrid): where VM tests run in the rig, so do they.
    if !sel.vm_only {
        let mut host = Command::new(cargo());
        host.current_dir(workspace_root())
            .args(["test", "--workspace", "--exclude", "husk-tests"]);
        if place == VmPlace::Rig {
            host.args(["--exclude", "husk-agent"]);
        }
        run(&mut host)?;
        // Every fuzz target, briefly: a crash, hang or leak fails the suite.
        crate::fuzz::fuzz(&[], FUZZ_SECS_IN_TEST)?;
        if place == VmPlace::Rig {
            run(Command::new(cargo()).current_dir(workspace_root()).args([
                "test",
                "-p",
                "husk-agent",
                "--lib",
                "--bins",
                "--test",
                "serve_unix",
            ]))?;
        }
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
    if place == VmPlace::Rig {
        tests.push(build_agent_container_tests()?);
    }
    if !sel.bins.is_empty() {
        tests.retain(|t| sel.bins.iter().any(|b| test_binary_name(t) == b.as_str()));
        if tests.is_empty() {
            bail!("no VM-level test binary is named {}", sel.bins.join(" or "));
        }
    }
    match place {
        VmPlace::Host => run_tests_on_host(&artifacts, &tests, &sel.test_args)?,
        VmPlace::Rig => run_tests_in_rig(&artifacts, &tests, !sel.vm_only, &sel.test_args)?,
        VmPlace::Skip => unreachable!("handled above"),
    }
    // The whole suite ends with every benchmark at small sizes, which fails unless each figure
    // and the report are produced (in the rig, which has runc and crun; on a host with its own
    // KVM, where runc is installed).
    let runc_here = Command::new("runc").arg("--version").output().is_ok();
    if sel.bins.is_empty() && sel.test_args.is_empty() && (place == VmPlace::Rig || runc_here) {
        eprintln!("xtask: every benchmark at small sizes (cargo xtask bench --quick)");
        crate::bench::bench(None, None, true)?;
    }
    Ok(())
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
            let job = RigRun::new(
                inputs,
                Some("husk run --bundle /work/bundles/busybox demo".into()),
                env,
            );
            let code = rig::run_in_rig(&image, &job)?.exit_code()?;
            if code != 0 {
                bail!("the container did not run in the rig (exit code {code})");
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
    inputs.push((artifacts.agent.clone(), "bin/husk-agent".into()));
    let env = vec![
        (
            "PATH".into(),
            "/work/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HUSK_VMM_BIN".into(), "/work/bin/husk-vmm".into()),
        ("HUSK_BIN".into(), "/work/bin/husk".into()),
        ("HUSK_KERNEL".into(), "/work/husk/vmlinux".into()),
        ("HUSK_INITRAMFS".into(), "/work/husk/initramfs.cpio".into()),
        ("HUSK_AGENT_BIN".into(), "/work/bin/husk-agent".into()),
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
        let plan = vec![RigStep::Script {
            name: SMOKE_NAME.into(),
            text: script,
        }];
        run_steps_in_rig(&image, &plan, inputs, Vec::new(), None)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The L3 smoke check's name among the test binaries' in a rig run's results.
const SMOKE_NAME: &str = "l3-smoke";
/// The suites that run a second time, as `NAME-cold`, with warm start off
/// (`HUSK_TEST_WARM_START=0`): the OCI suite, and the network suite (a booted guest's card is
/// configured by its kernel command line, a restored guest's by its renewal).
const COLD_TOO: &[&str] = &["oci", "net"];

/// Test binaries that need two host CPUs (`tests/tests/cpus.rs`): they run in a rig of their
/// own whose L2 has two ([`rig::RigRun::l2_cpus`]); every other one in the one-CPU L2.
const TWO_CPU_BINARIES: &[&str] = &["cpus"];

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
        let (base_inputs, mut env) = rig_vm_inputs(artifacts);
        env.push(("HUSK_REQUIRE_KVM".into(), "1".into()));
        env.push(("RUST_BACKTRACE".into(), "1".into()));
        if let Ok(debug) = std::env::var("HUSK_TEST_DEBUG") {
            env.push(("HUSK_TEST_DEBUG".into(), debug));
        }
        // (L2's CPUs, its steps, its inputs): one rig run each, one CPU first.
        let mut runs = [
            (None, Vec::new(), base_inputs.clone()),
            (Some(2), Vec::new(), base_inputs),
        ];
        if smoke {
            let (smoke_inputs, text) = l3_smoke_inputs(&image, &scratch)?;
            runs[0].2.extend(smoke_inputs);
            runs[0].1.push(RigStep::Script {
                name: SMOKE_NAME.into(),
                text,
            });
        }
        for test in tests {
            let file = test
                .file_name()
                .context("test executable has a file name")?
                .to_string_lossy()
                .into_owned();
            let name = test_binary_name(test).to_string();
            let (_, plan, inputs) =
                &mut runs[usize::from(TWO_CPU_BINARIES.contains(&name.as_str()))];
            inputs.push((test.clone(), format!("tests/{file}")));
            if COLD_TOO.contains(&name.as_str()) {
                // These suites run a second time with warm start off: every sandbox boots.
                let cold = format!("{name}-cold");
                plan.push(RigStep::Script {
                    text: format!(
                        "export HUSK_TEST_WARM_START=0; run_test {limit} {cold} \
                         /work/tests/{file} --test-threads=1{extra}",
                        limit = test_binary_timeout().as_secs(),
                    ),
                    name: cold,
                });
            }
            plan.push(RigStep::Binary {
                name,
                file,
                extra: extra.clone(),
            });
        }
        let mut failures = Vec::new();
        for (cpus, plan, inputs) in runs {
            if plan.is_empty() {
                continue;
            }
            if let Err(e) = run_steps_in_rig(&image, &plan, inputs, env.clone(), cpus) {
                failures.push(format!("{e:#}"));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// One step of a rig test run: a test binary, or shell text (the L3 smoke check).
#[derive(Clone, Debug)]
enum RigStep {
    Binary {
        name: String,
        /// The executable's file name under /work/tests.
        file: String,
        /// Arguments for it, quoted for the shell, each with a leading space.
        extra: String,
    },
    Script {
        name: String,
        text: String,
    },
}

impl RigStep {
    fn name(&self) -> &str {
        match self {
            RigStep::Binary { name, .. } | RigStep::Script { name, .. } => name,
        }
    }

    /// Shell text that runs the step and records its exit code and seconds in
    /// `out/results/NAME` (synced, so that it survives an L2 that dies after it).
    fn script(&self) -> String {
        let name = self.name();
        let body = match self {
            RigStep::Binary { file, extra, .. } => format!(
                "run_test {limit} {name} /work/tests/{file} --test-threads=1{extra}",
                limit = test_binary_timeout().as_secs(),
            ),
            RigStep::Script { text, .. } => format!("( {text} )"),
        };
        format!(
            "echo \"== husk-rig: running {name}\"\n\
             t0=$(date +%s.%N)\n\
             {body}\n\
             trc=$?\n\
             echo \"$trc $(awk \"BEGIN{{printf \\\"%.1f\\\", $(date +%s.%N) - $t0}}\")\" > /work/out/results/{name}\n\
             sync\n\
             [ $trc = 0 ] || {{ echo \"== husk-rig: {name} FAILED ($trc)\"; rc=1; }}\n"
        )
    }
}

/// How one step ended in one rig run.
#[derive(Clone, Debug, PartialEq)]
enum StepEnd {
    Passed {
        secs: f64,
    },
    Failed {
        code: i32,
        secs: f64,
    },
    /// Killed at its time limit; `rig_fault` says whether L2's kernel log (in the hang report)
    /// shows a fault inside its KVM, the only hang that is retried.
    Hung {
        rig_fault: Option<String>,
    },
    /// L2 died or wedged while it ran; `rig_fault` as for `Hung`, from L2's console.
    L2Failed {
        rig_fault: Option<String>,
        how: String,
    },
    /// Never started: L2 failed before it.
    NotRun,
}

/// What to do about one step after a rig run.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    Final(StepEnd),
    /// Run it again in a fresh L2, for this reason (a rig fault, or not run yet).
    Again(Option<String>),
}

/// How many times one step is run again after a proven rig fault.
const RIG_FAULT_RETRIES: usize = 2;

/// Judges every step of `plan` after a rig run, from the results the steps wrote (`name ->
/// (exit code, seconds)`), their hang reports, and how the run ended. The rules: a step that
/// finished keeps its result; a hang is retried only when the hang report's kernel log shows
/// L2's own fault inside its KVM; a step during which L2 died or wedged is retried only when
/// L2's console showed such a fault; steps after it had not run and run now. Everything else
/// (a husk hang, a silent wedge) fails the run.
fn judge(
    plan: &[RigStep],
    results: &std::collections::BTreeMap<String, (i32, f64)>,
    hang_reports: &[(String, String)],
    report_end: &rig::RigReport,
    retries: &std::collections::BTreeMap<String, usize>,
) -> Vec<(String, Verdict)> {
    let mut verdicts = Vec::new();
    let mut l2_failure_seen = false;
    for step in plan {
        let name = step.name().to_string();
        let hang = hang_reports
            .iter()
            .find(|(file, _)| *file == format!("hang-{name}.txt"))
            .map(|(_, text)| text);
        let end = if let Some(text) = hang {
            StepEnd::Hung {
                rig_fault: kvm_fault_in_kernel_log(text),
            }
        } else if let Some(&(code, secs)) = results.get(&name) {
            if code == 0 {
                StepEnd::Passed { secs }
            } else {
                StepEnd::Failed { code, secs }
            }
        } else if !l2_failure_seen {
            l2_failure_seen = true;
            StepEnd::L2Failed {
                rig_fault: report_end.rig_fault(),
                how: report_end.describe(),
            }
        } else {
            StepEnd::NotRun
        };
        let used = retries.get(&name).copied().unwrap_or(0);
        let verdict = match &end {
            StepEnd::NotRun => Verdict::Again(None),
            StepEnd::Hung {
                rig_fault: Some(why),
            }
            | StepEnd::L2Failed {
                rig_fault: Some(why),
                ..
            } if used < RIG_FAULT_RETRIES => Verdict::Again(Some(why.clone())),
            _ => Verdict::Final(end),
        };
        verdicts.push((name, verdict));
    }
    verdicts
}

/// The first fault of L2's kernel inside its KVM in a hang report's kernel log, if any.
fn kvm_fault_in_kernel_log(report: &str) -> Option<String> {
    let mut scan = crate::rig_console::ConsoleScan::new(None);
    for line in report.lines() {
        scan.line(line);
    }
    (scan.faults.any() && scan.faults.in_kvm).then(|| scan.faults.summary())
}

/// Runs the steps in the rig, each step's result kept across L2s: after a rig run, steps that
/// finished are done, steps that L2's failure cut short are run again in a fresh L2 only
/// where the rig's fault is proven (see [`judge`]), and every retry is listed with its cause
/// in the final report.
fn run_steps_in_rig(
    image: &RigImage,
    plan: &[RigStep],
    inputs: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    l2_cpus: Option<u32>,
) -> Result<()> {
    let mut pending: Vec<RigStep> = plan.to_vec();
    let mut finals: Vec<(String, StepEnd)> = Vec::new();
    let mut retries: std::collections::BTreeMap<String, usize> = Default::default();
    let mut retry_log: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    let mut l2_times = Vec::new();
    let seccomp_log = seccomp_log_mode();
    let mut env = env;
    if seccomp_log {
        env.push(("HUSK_VMM_SECCOMP".into(), "log".into()));
    }
    let mut audit_lines = Vec::new();
    while !pending.is_empty() {
        let mut script = format!("{RUN_TEST_FN}mkdir -p /work/out/results\nrc=0\n");
        if seccomp_log {
            // Every logged call reaches the kernel log (audit lines are rate-limited).
            script.push_str("sysctl -qw kernel.printk_ratelimit=0\n");
        }
        for step in &pending {
            script.push_str(&step.script());
        }
        if seccomp_log {
            script.push_str("dmesg | grep 'type=1326' > /work/out/seccomp-audit.txt\n");
        }
        script.push_str("exit $rc\n");
        let out = rig::tempdir("husk-xtask-results")?;
        let mut job = RigRun::new(inputs.clone(), Some(script), env.clone());
        job.out_dir = Some(out.clone());
        job.l2_cpus = l2_cpus;
        let report = rig::run_in_rig(image, &job);
        let results = read_results(&out.join("results"));
        if let Ok(text) = std::fs::read_to_string(out.join("seccomp-audit.txt")) {
            audit_lines.extend(text.lines().map(str::to_string));
        }
        let _ = std::fs::remove_dir_all(&out);
        let report = report?;
        for why in &report.failed_boots {
            retry_log.push(format!("L2 booted again: {why}"));
        }
        l2_times.push(format!(
            "L2 up after {}, run {:.0} s",
            report.l2_up_s.map_or("?".into(), |s| format!("{s:.1} s")),
            report.elapsed.as_secs_f64()
        ));
        if let rig::RigEnd::TimedOut = report.end {
            bail!(
                "the rig did not finish within {} s; QEMU was killed (see the console above)",
                job.timeout.as_secs()
            );
        }
        let verdicts = judge(&pending, &results, &report.hang_reports, &report, &retries);
        let mut next = Vec::new();
        for (step, (name, verdict)) in pending.iter().zip(verdicts) {
            match verdict {
                Verdict::Final(end) => finals.push((name, end)),
                Verdict::Again(None) => next.push(step.clone()),
                Verdict::Again(Some(why)) => {
                    *retries.entry(name.clone()).or_default() += 1;
                    let line = format!("{name}: run again after a rig fault: {why}");
                    eprintln!("xtask: !!! {line} !!!");
                    retry_log.push(line);
                    next.push(step.clone());
                }
            }
        }
        pending = next;
    }
    // The report: every step's end, in plan order, and every retry with its cause.
    eprintln!(
        "\nxtask: VM-level test results ({} s in all; {}):",
        started.elapsed().as_secs_f64().round(),
        l2_times.join("; ")
    );
    let mut failed = Vec::new();
    for step in plan {
        let Some((_, end)) = finals.iter().find(|(n, _)| n == step.name()) else {
            continue;
        };
        let text = match end {
            StepEnd::Passed { secs } => format!("passed ({secs:.0} s)"),
            StepEnd::Failed { code, secs } => format!("FAILED, exit code {code} ({secs:.0} s)"),
            StepEnd::Hung { rig_fault: None } => {
                "FAILED: hung, and L2's kernel reported no fault of its own: a hang of husk's or the test's (hang report above)".into()
            }
            StepEnd::Hung { rig_fault: Some(why) } => {
                format!("FAILED: hung after {RIG_FAULT_RETRIES} retries, each a rig fault: {why}")
            }
            StepEnd::L2Failed { rig_fault: None, how } => format!(
                "FAILED: {how} while it ran, with no fault inside L2's KVM to show the rig caused it"
            ),
            StepEnd::L2Failed { rig_fault: Some(_), how } => {
                format!("FAILED: {how} while it ran, also on its last retry")
            }
            StepEnd::NotRun => "not run".into(),
        };
        if !matches!(end, StepEnd::Passed { .. }) {
            failed.push(step.name().to_string());
        }
        eprintln!("xtask:   {:<12} {text}", step.name());
    }
    if seccomp_log {
        report_seccomp_audit(&audit_lines);
    }
    if retry_log.is_empty() {
        eprintln!("xtask: retries: none");
    } else {
        eprintln!("xtask: retries ({}):", retry_log.len());
        for line in &retry_log {
            eprintln!("xtask:   {line}");
        }
    }
    if !failed.is_empty() {
        bail!(
            "VM-level tests failed inside the rig: {}",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `out/results/NAME` files: `EXIT_CODE SECONDS`.
/// The VMM's table of system call names (one source for both).
#[path = "../../vmm/src/seccomp/names.rs"]
mod syscall_names;

/// `HUSK_VMM_SECCOMP=log cargo xtask test`: husk-vmm logs calls outside its seccomp lists
/// instead of trapping them, and the run ends with the list of those calls, by thread.
fn seccomp_log_mode() -> bool {
    std::env::var("HUSK_VMM_SECCOMP").is_ok_and(|v| v == "log")
}

/// Prints the distinct (thread, system call) pairs of the kernel's seccomp audit lines
/// (`comm="husk-vcpu-0" ... syscall=16`).
fn report_seccomp_audit(lines: &[String]) {
    let mut seen = std::collections::BTreeMap::<(String, String), usize>::new();
    for line in lines {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|v| v.trim_matches('"').to_string())
        };
        if !field("exe=").is_some_and(|e| e.ends_with("husk-vmm")) {
            continue;
        }
        let comm = field("comm=").unwrap_or_default();
        // vCPU threads by kind, not number.
        let comm = match comm.strip_prefix("husk-vcpu-") {
            Some(_) => "husk-vcpu-N".to_string(),
            None => comm,
        };
        let nr = field("syscall=").unwrap_or_default();
        *seen.entry((comm, nr)).or_default() += 1;
    }
    if seen.is_empty() {
        eprintln!("xtask: seccomp (log mode): no call outside the lists");
        return;
    }
    eprintln!("xtask: seccomp (log mode): calls outside the lists (thread, call, times):");
    for ((comm, nr), n) in seen {
        let name = nr
            .parse::<i64>()
            .ok()
            .and_then(syscall_names::syscall_name)
            .unwrap_or("?");
        eprintln!("xtask:   {comm:<18} {nr:>4} {name:<20} {n}");
    }
}

fn read_results(dir: &Path) -> std::collections::BTreeMap<String, (i32, f64)> {
    let mut results = std::collections::BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut words = text.split_whitespace();
            if let Some(code) = words.next().and_then(|c| c.parse().ok()) {
                let secs = words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                results.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    (code, secs),
                );
            }
        }
    }
    results
}

/// How long one VM-level test binary may run in the rig before it is killed with a report
/// (`HUSK_TEST_BINARY_TIMEOUT_S`, default 10 min; the slowest binary takes about 2 in the rig).
pub fn test_binary_timeout() -> Duration {
    secs_from_env("HUSK_TEST_BINARY_TIMEOUT_S", 600)
}

/// Seconds from the environment variable `name`, else `default`.
pub fn secs_from_env(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// `run_test LIMIT NAME CMD...` for the rig's script: runs one test binary, its output to the
/// console and to `/work/out/tests.log`. If it is still running after LIMIT seconds it is a
/// hang, so the report says where everything is stuck (every process's state and kernel wait
/// channel, the kernel stacks of the test's and husk's threads, the serial port's counters,
/// the kernel log's tail) before the binary is killed and counted as failed. The report goes
/// to the work disk (`out/hang-NAME.txt`, which the host prints after the run and reads to
/// judge whether L2's kernel failed) and to `/dev/kmsg`, whose lines reach the console even
/// when the console's tty is stuck. The test's own output names the test that hung
/// (`--test-threads=1` prints `test NAME ...` first).
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
    limit=$1; name=$2; shift 2
    "$@" > >(tee -a /work/out/tests.log) 2>&1 &
    tp=$!
    ( sleep "$limit"
      if kill -0 "$tp" 2>/dev/null; then
          hang_report "$1" "$limit" > /work/out/hang-$name.txt 2>&1
          sync
          while IFS= read -r l; do echo "<2>husk-rig: $l" > /dev/kmsg; done < /work/out/hang-$name.txt
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rig::{RigEnd, RigReport};
    use crate::rig_console::L2Faults;
    use std::collections::BTreeMap;

    fn step(name: &str) -> RigStep {
        RigStep::Binary {
            name: name.into(),
            file: format!("{name}-0123"),
            extra: String::new(),
        }
    }

    fn report(end: RigEnd, faults: L2Faults) -> RigReport {
        RigReport {
            end,
            faults,
            l2_up_s: None,
            elapsed: Duration::from_secs(1),
            collected: Vec::new(),
            hang_reports: Vec::new(),
            nmi_unanswered: false,
            lost_wakeup: false,
            failed_boots: Vec::new(),
        }
    }

    const HUSK_HANG: &str = "== husk-rig: HANG: /work/tests/oci still running after 600 s\n\
        -- kernel log tail:\n[  700.1] husk-rig: alive 700.1\n[  701.0] tap0: entered promiscuous mode\n";
    const KVM_HANG: &str = "-- kernel log tail:\n\
        [  650.0] INFO: task husk-vcpu:812 blocked for more than 120 seconds.\n\
        [  650.1] Call Trace:\n[  650.2]  kvm_vcpu_ioctl+0x2a0/0x6b0 [kvm]\n";

    /// `judge` after a run that finished, in which `oci` hung with `hang` as its report.
    fn judge_oci_hang(
        plan: &[RigStep],
        results: &BTreeMap<String, (i32, f64)>,
        hang: &str,
        retries: &BTreeMap<String, usize>,
    ) -> Vec<(String, Verdict)> {
        let hangs = vec![("hang-oci.txt".to_string(), hang.to_string())];
        let end = report(RigEnd::Finished(1), L2Faults::default());
        judge(plan, results, &hangs, &end, retries)
    }

    #[test]
    fn a_hang_without_a_kvm_fault_fails_and_is_never_retried() {
        // The harness's own acceptance: a test binary that hangs (one time in three, say) fails
        // the run every time it hangs, whatever the other binaries did.
        let plan = [step("boot"), step("oci"), step("share")];
        let results = BTreeMap::from([
            ("boot".to_string(), (0, 30.0)),
            ("oci".to_string(), (137, 600.0)),
            ("share".to_string(), (0, 20.0)),
        ]);
        let v = judge_oci_hang(&plan, &results, HUSK_HANG, &BTreeMap::new());
        assert_eq!(v[0].1, Verdict::Final(StepEnd::Passed { secs: 30.0 }));
        assert_eq!(v[1].1, Verdict::Final(StepEnd::Hung { rig_fault: None }));
        assert_eq!(v[2].1, Verdict::Final(StepEnd::Passed { secs: 20.0 }));
    }

    #[test]
    fn a_hang_with_l2s_own_fault_inside_kvm_is_run_again_alone() {
        let plan = [step("boot"), step("oci")];
        let results = BTreeMap::from([
            ("boot".to_string(), (0, 30.0)),
            ("oci".to_string(), (137, 600.0)),
        ]);
        let v = judge_oci_hang(&plan, &results, KVM_HANG, &BTreeMap::new());
        assert_eq!(v[0].1, Verdict::Final(StepEnd::Passed { secs: 30.0 }));
        assert!(matches!(&v[1].1, Verdict::Again(Some(why)) if why.contains("hung tasks 1")));
        // ... but not for ever.
        let used = BTreeMap::from([("oci".to_string(), RIG_FAULT_RETRIES)]);
        let v = judge_oci_hang(&plan, &results, KVM_HANG, &used);
        assert!(matches!(
            &v[1].1,
            Verdict::Final(StepEnd::Hung { rig_fault: Some(_) })
        ));
    }

    #[test]
    fn an_l2_death_is_retried_only_with_a_kvm_trace_and_later_steps_run_anyway() {
        let plan = [step("boot"), step("oci"), step("share")];
        let results = BTreeMap::from([("boot".to_string(), (0, 30.0))]);
        let proven = L2Faults {
            soft_lockups: 1,
            panicked: true,
            in_kvm: true,
            ..L2Faults::default()
        };
        let v = judge(
            &plan,
            &results,
            &[],
            &report(RigEnd::Died, proven),
            &BTreeMap::new(),
        );
        assert_eq!(v[0].1, Verdict::Final(StepEnd::Passed { secs: 30.0 }));
        assert!(matches!(&v[1].1, Verdict::Again(Some(_))));
        assert_eq!(
            v[2].1,
            Verdict::Again(None),
            "never ran: runs now, not a retry"
        );

        // An L2 that wedged and did not even take an NMI is stuck below anything husk runs.
        let mut deaf = report(RigEnd::Wedged, L2Faults::default());
        deaf.nmi_unanswered = true;
        let v = judge(&plan, &results, &[], &deaf, &BTreeMap::new());
        assert!(matches!(&v[1].1, Verdict::Again(Some(why)) if why.contains("NMI")));

        // An L2 that panicked on the NMI, but was found halted with interrupts enabled and
        // its periodic timer due: the emulator lost the wakeup.
        let mut idle = report(
            RigEnd::Wedged,
            L2Faults {
                panicked: true,
                ..L2Faults::default()
            },
        );
        idle.lost_wakeup = true;
        let v = judge(&plan, &results, &[], &idle, &BTreeMap::new());
        assert!(matches!(&v[1].1, Verdict::Again(Some(why)) if why.contains("lost the wakeup")));

        // A wedge that proves nothing (L2 panicked on the NMI, no trace in its KVM): the step
        // that was running fails (husk could have livelocked L2), and the ones after it run.
        let mut silent = report(
            RigEnd::Wedged,
            L2Faults {
                panicked: true,
                ..L2Faults::default()
            },
        );
        silent.nmi_unanswered = false;
        let v = judge(&plan, &results, &[], &silent, &BTreeMap::new());
        assert!(matches!(
            &v[1].1,
            Verdict::Final(StepEnd::L2Failed {
                rig_fault: None,
                ..
            })
        ));
        assert_eq!(v[2].1, Verdict::Again(None));
    }

    #[test]
    fn a_step_that_failed_before_a_wedge_stays_failed() {
        // As CI saw it: the containerd suite failed (its pod's guest crashed), and L2's
        // heartbeat, misread, looked stopped: the failure is the step's, whatever the wedge.
        let plan = [step("containerd"), step("oci")];
        let results = BTreeMap::from([("containerd".to_string(), (101, 126.0))]);
        let wedged = report(
            RigEnd::Wedged,
            L2Faults {
                nmi_survived: true,
                ..L2Faults::default()
            },
        );
        let v = judge(&plan, &results, &[], &wedged, &BTreeMap::new());
        assert!(matches!(
            v[0].1,
            Verdict::Final(StepEnd::Failed { code: 101, .. })
        ));
        assert!(
            matches!(&v[1].1, Verdict::Again(Some(why)) if why.contains("took the host's NMI")),
            "{:?}",
            v[1].1
        );
    }

    #[test]
    fn a_failing_step_is_final() {
        let plan = [step("oci")];
        let results = BTreeMap::from([("oci".to_string(), (101, 40.0))]);
        let v = judge(
            &plan,
            &results,
            &[],
            &report(RigEnd::Finished(1), L2Faults::default()),
            &BTreeMap::new(),
        );
        assert_eq!(
            v[0].1,
            Verdict::Final(StepEnd::Failed {
                code: 101,
                secs: 40.0
            })
        );
    }

    #[test]
    fn step_scripts_record_results_under_their_names() {
        let text = step("oci").script();
        assert!(
            text.contains("run_test 600 oci /work/tests/oci-0123 --test-threads=1"),
            "{text}"
        );
        assert!(text.contains("> /work/out/results/oci"), "{text}");
        assert!(text.contains("sync"), "{text}");
    }
}
