//! `husk kill`: send a signal to the container's init (or, with `--all`, every process).

use crate::agent::{call_ok, connect, init_process};
use crate::container::StateDir;
use crate::state::ContainerState;
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::Request;

/// Options of `husk kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// The container id.
    pub id: String,
    /// Signal name (`TERM`, `SIGKILL`) or number; SIGTERM by default.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGPOLL),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// Parses `KILL`, `SIGKILL`, `kill` or `9` (1..=64).
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// `husk kill`.
pub fn kill(globals: &Globals, args: &KillArgs) -> Result<()> {
    let Some(signal) = parse_signal(&args.signal) else {
        bail!("unknown signal {:?}", args.signal);
    };
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let state = ContainerState::load(&dir)?;
    if !state.can_kill() {
        bail!("container not running");
    }
    let request = Request::SignalProcess {
        process: init_process(&args.id),
        signal,
        all: args.all,
    };
    let sent =
        connect(&dir).and_then(|mut c| call_ok(&mut c, "signalling the container", &request));
    match sent {
        Ok(()) => Ok(()),
        // A guest that cannot be reached still dies with its VM.
        Err(e) if signal == libc::SIGKILL => {
            crate::logging::warn(&format!("{e}; killing the microVM instead"));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(state.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("KILL"), Some(9));
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("sigusr1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("65"), None);
        assert_eq!(parse_signal("NOPE"), None);
    }
}
