//! `husk`: husk's OCI runtime command line. args -> command function.

use clap::{Parser, Subcommand};
use husk::commands::check::{check, CheckArgs};
use std::process::ExitCode;

/// A hardware-isolated container runtime: every container in its own KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "husk", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Report whether this host can run husk microVMs, and why not.
    Check(CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Check(args) => check(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("husk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
