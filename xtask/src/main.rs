//! `cargo xtask`: builds husk's guest kernel, agent initramfs and test rig, and runs its tests.

mod bench;
mod bench_oci;
mod bundle;
mod cpio;
mod debian;
mod fuzz;
mod initramfs;
mod install;
mod kernel;
mod rig;
mod rig_console;
mod soak;
mod testing;
mod util;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "husk build and test driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or fetch from the cache) the guest kernel `vmlinux`.
    Kernel {
        /// Regenerate kernel-config/config-6.1-x86_64 from the fragments instead (then commit it).
        #[arg(long)]
        regen_config: bool,
    },
    /// Build the static guest agent and the initramfs holding it as /init.
    Initramfs,
    /// The test rig: a Debian VM under QEMU's emulator whose emulated SVM gives real KVM.
    Rig {
        #[command(subcommand)]
        cmd: RigCmd,
    },
    /// Run every test: unit tests on the host, VM-level tests where KVM can run Linux guests.
    Test {
        /// Only the VM-level tests (no host unit tests, no L3 smoke check): for working on one.
        #[arg(long)]
        vm_only: bool,
        /// Only these VM-level test binaries (`boot`, `oci`, ...); repeatable. Implies --vm-only.
        #[arg(long = "bin")]
        bins: Vec<String>,
        /// Passed to each test binary (a name filter, `--exact`, ...). Implies --vm-only.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Fuzz everything the guest hands the VMM and the agent's replies to the host (the targets
    /// in `fuzz/`, with cargo fuzz on the nightly toolchain), each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Build and install husk-vmm, husk, containerd-shim-husk-v2 (PREFIX/bin) and the guest
    /// kernel and initramfs (PREFIX/share/husk).
    Install {
        /// Installation prefix.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Boot a husk microVM and show the agent's handshake and the boot timeline (on this host
    /// when its KVM can run guests, in the test rig otherwise).
    Run,
    /// Run every benchmark suite and write the report (BENCHMARKS.md, docs/bench/), or one
    /// suite (`boot`, `oci`, `cri`, `fs`, `net`, `density`, `boot-trace`): husk against its
    /// peers in the same place.
    Bench {
        /// Which suite (default: all of them, and the report).
        what: Option<String>,
        /// Runs per runtime, for one suite (default: 20; `fs`, `net`: 3).
        #[arg(long)]
        runs: Option<usize>,
        /// Small sizes, to check that every figure is produced; the report of a whole quick
        /// run goes to target/bench/BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Subcommand)]
enum RigCmd {
    /// Build the rig image (cached outside the clone, keyed by its inputs).
    Build,
    /// Boot the rig and run a command inside it, with the release binaries, guest kernel and
    /// initramfs under /work; files written to $HUSK_RIG_OUT come back to --out.
    Run {
        /// Host folder receiving what the command wrote to $HUSK_RIG_OUT.
        #[arg(long, default_value = "target/rig-out")]
        out: PathBuf,
        /// Extra host files or folders to bring in, as SRC[:DEST] (DEST relative to /work).
        #[arg(long = "include")]
        include: Vec<String>,
        /// Skip building the husk binaries, kernel and initramfs.
        #[arg(long)]
        no_husk: bool,
        /// Free space on the rig's /work disk, MiB.
        #[arg(long, default_value_t = 1024)]
        work_free_mib: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Check the rig itself: QEMU inside it boots an L3 Linux guest to user space under its KVM.
    Smoke,
    /// Boot L3 guests back to back (1 and 4 vCPUs, `husk run` containers) with a CPU hog on the
    /// host, and count how the rig holds up: boots, L2 wedges, soft lockups, RCU stalls, oopses.
    Soak {
        /// Stop after this many L3 boots.
        #[arg(long, default_value_t = 300)]
        boots: usize,
        /// Stop starting boots after this many minutes.
        #[arg(long, default_value_t = 40.0)]
        minutes: f64,
        /// Leave the host's CPUs alone (no hog).
        #[arg(long)]
        no_hog: bool,
    },
    /// Boot the rig with an interactive shell on its console (exit the shell to power off).
    Shell {
        /// Skip building the husk binaries, kernel and initramfs.
        #[arg(long)]
        no_husk: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Kernel { regen_config: true } => kernel::regen_config()?,
        Cmd::Kernel {
            regen_config: false,
        } => println!("{}", kernel::build()?.display()),
        Cmd::Initramfs => println!("{}", initramfs::build()?.display()),
        Cmd::Fuzz { secs, targets } => fuzz::fuzz(&targets, secs)?,
        Cmd::Rig { cmd } => rig_command(cmd)?,
        Cmd::Test {
            vm_only,
            bins,
            test_args,
        } => testing::test(&testing::TestSelection {
            vm_only: vm_only || !bins.is_empty() || !test_args.is_empty(),
            bins,
            test_args,
        })?,
        Cmd::Run => testing::run_demo()?,
        Cmd::Install { prefix } => install::install(&prefix)?,
        Cmd::Bench { what, runs, quick } => bench::bench(what.as_deref(), runs, quick)?,
    }
    Ok(())
}

fn rig_command(cmd: RigCmd) -> Result<()> {
    match cmd {
        RigCmd::Build => {
            let image = rig::build()?;
            println!("{}", image.root.display());
        }
        RigCmd::Run {
            out,
            include,
            no_husk,
            work_free_mib,
            cmd,
        } => {
            let (mut inputs, env) = husk_inputs(no_husk)?;
            for spec in include {
                let (src, dest) = match spec.split_once(':') {
                    Some((s, d)) => (PathBuf::from(s), d.to_string()),
                    None => {
                        let src = PathBuf::from(&spec);
                        let name = src
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| spec.clone());
                        (src, name)
                    }
                };
                inputs.push((src, dest));
            }
            let image = rig::build()?;
            let script = cmd
                .iter()
                .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
                .collect::<Vec<_>>()
                .join(" ");
            let mut job = rig::RigRun::new(inputs, Some(script), env);
            job.out_dir = Some(out);
            job.work_free_mib = work_free_mib;
            let code = rig::run_in_rig(&image, &job)?.exit_code()?;
            if code != 0 {
                eprintln!("xtask: the command exited {code} inside the rig");
                std::process::exit(code.clamp(1, 255));
            }
        }
        RigCmd::Smoke => testing::rig_smoke()?,
        RigCmd::Soak {
            boots,
            minutes,
            no_hog,
        } => soak::soak(&soak::SoakArgs {
            boots,
            minutes,
            hog: !no_hog,
        })?,
        RigCmd::Shell { no_husk } => {
            let (inputs, env) = husk_inputs(no_husk)?;
            let image = rig::build()?;
            let code =
                rig::run_in_rig(&image, &rig::RigRun::new(inputs, None, env))?.exit_code()?;
            if code != 0 {
                bail!("the rig shell exited {code}");
            }
        }
    }
    Ok(())
}

fn husk_inputs(no_husk: bool) -> Result<testing::RigInputs> {
    if no_husk {
        return Ok((Vec::new(), Vec::new()));
    }
    Ok(testing::rig_vm_inputs(&testing::build_vm_artifacts()?))
}
