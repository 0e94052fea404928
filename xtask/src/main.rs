//! `cargo xtask`: builds husk's guest kernel, agent initramfs and test rig, and runs its tests.

mod cpio;
mod initramfs;
mod kernel;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "husk build and test driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or fetch from the cache) the guest kernel `vmlinux`.
    Kernel,
    /// Build the static guest agent and the initramfs holding it as /init.
    Initramfs,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Kernel => {
            let path = kernel::build()?;
            println!("{}", path.display());
        }
        Cmd::Initramfs => {
            let path = initramfs::build()?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
