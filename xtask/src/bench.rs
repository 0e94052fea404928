//! `cargo xtask bench <what>`: benchmarks run where VM tests run (the rig on machines without
//! hardware KVM), each runtime against its peers in the same run. Results land in `target/bench/`.

use crate::rig::{self, RigRun};
use crate::testing::{self, VmPlace};
use crate::util::{run, target_dir, workspace_root};
use anyhow::{bail, Result};
use std::process::Command;

/// Runs one benchmark suite.
pub fn bench(what: &str, runs: usize) -> Result<()> {
    if what != "boot" {
        bail!("unknown benchmark {what:?}; available: boot");
    }
    let (place, why) = testing::decide_vm_place()?;
    eprintln!("xtask: benchmarks run: {place:?} ({why})");
    let artifacts = testing::build_vm_artifacts()?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "-p",
                "husk-tests",
                "--bin",
                "husk-bench",
            ]),
    )?;
    let bench_bin = target_dir().join("release/husk-bench");
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let runs = runs.to_string();
    match place {
        VmPlace::Skip => bail!("HUSK_TEST_VM=skip: benchmarks need a VM"),
        VmPlace::Host => run(Command::new(&bench_bin)
            .args([what, "--runs", &runs, "--out"])
            .arg(&out)
            .env("HUSK_VMM_BIN", artifacts.bin_dir.join("husk-vmm"))
            .env("HUSK_KERNEL", &artifacts.kernel)
            .env("HUSK_INITRAMFS", &artifacts.initramfs))?,
        VmPlace::Rig => {
            let image = rig::build()?;
            let (mut inputs, env) = testing::rig_vm_inputs(&artifacts);
            inputs.push((bench_bin, "bin/husk-bench".into()));
            let outcome = rig::run_in_rig(
                &image,
                &RigRun {
                    inputs,
                    script: Some(format!("husk-bench {what} --runs {runs}")),
                    env,
                    out_dir: Some(out.clone()),
                    timeout: testing::rig_timeout(),
                },
            )?;
            if outcome.exit_code != 0 {
                bail!(
                    "the benchmark failed in the rig (exit code {})",
                    outcome.exit_code
                );
            }
        }
    }
    eprintln!("xtask: results in {}", out.display());
    Ok(())
}
