//! `husk-agent`: the init (PID 1) of a husk guest; see the library for what it does.

use husk_agent::sysinfo::AGENT_VERSION;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "\
usage: husk-agent                    run as PID 1 (init) of a husk guest VM
       husk-agent --serve-unix PATH  serve the agent protocol on a Unix socket that speaks
                                     husk-vmm's CONNECT preamble (testing on the host)
       husk-agent --version";

fn main() -> ExitCode {
    // A container's init helper is PID 1 of its pid namespace: check for it first.
    if std::env::args().nth(1).as_deref() == Some(husk_agent::container::child::INIT_ARG) {
        husk_agent::container::child::run();
    }
    if nix::unistd::getpid().as_raw() == 1 {
        // The kernel may pass unknown command-line words as arguments to init: ignore them.
        let err = husk_agent::run_init();
        husk_agent::log_error!("fatal: {:#}", anyhow::Error::from(err));
        // Returning from PID 1 panics the kernel; see the library docs for why that is right.
        return ExitCode::FAILURE;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["--version" | "-V"] => {
            println!("husk-agent {AGENT_VERSION}");
            ExitCode::SUCCESS
        }
        ["--serve-unix", path] => {
            let err = husk_agent::run_unix(Path::new(path));
            eprintln!("husk-agent: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
        [] => {
            eprintln!(
                "husk-agent: not PID 1: this is the init of a husk guest VM \
                 (use --serve-unix PATH to test it on the host)\n{USAGE}"
            );
            ExitCode::from(2)
        }
        _ => {
            eprintln!("husk-agent: bad arguments\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
