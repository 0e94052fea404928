//! `husk`: husk's OCI runtime command line (runc-compatible). args -> command function.

use clap::{Parser, Subcommand};
use husk::commands::{
    check, create, delete, events, exec, features, kill, list, pause, ps, resume, run, spec, start,
    state, template, unsupported, update,
};
use husk::logging::{self, LogFormat};
use husk::Globals;
use std::path::PathBuf;
use std::process::ExitCode;

/// A hardware-isolated container runtime: every container in its own KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "husk", version, args_override_self = true)]
struct Cli {
    /// State root.
    #[arg(long, global = true, default_value = husk::container::DEFAULT_ROOT)]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility: a cgroupsPath of systemd's form (slice:prefix:name)
    /// is recognized by its shape.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (`true`, `false`, `auto`); ignored.
    #[arg(long, global = true)]
    rootless: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Report whether this host can run husk microVMs, and why not.
    Check(check::CheckArgs),
    /// Create a container (its microVM boots; the process waits for `start`).
    Create(create::CreateArgs),
    /// Start a created container.
    Start(start::StartArgs),
    /// Print a container's OCI state.
    State(state::StateArgs),
    /// Send a signal to a container.
    Kill(kill::KillArgs),
    /// Delete a container and everything made for it.
    Delete(delete::DeleteArgs),
    /// Create and start a container.
    Run(run::RunArgs),
    /// Run a process in a running container.
    Exec(exec::ExecArgs),
    /// The background half of `exec -d`.
    #[command(hide = true)]
    ExecAttach(exec::ExecAttachArgs),
    /// List a container's processes (guest pids).
    Ps(ps::PsArgs),
    /// List containers.
    List(list::ListArgs),
    /// Freeze a container.
    Pause(pause::PauseArgs),
    /// Thaw a paused container.
    Resume(resume::ResumeArgs),
    /// Print container statistics.
    Events(events::EventsArgs),
    /// Change a container's resources.
    Update(update::UpdateArgs),
    /// Print the features this runtime supports.
    Features,
    /// Write a starter config.json.
    Spec(spec::SpecArgs),
    /// Manage the templates sandboxes start from (warm start).
    Template {
        #[command(subcommand)]
        cmd: template::TemplateCmd,
    },
    /// Not supported.
    Checkpoint(unsupported::UnsupportedArgs),
    /// Not supported.
    Restore(unsupported::UnsupportedArgs),
}

fn dispatch(cli: &Cli, globals: &Globals) -> anyhow::Result<i32> {
    let ok = |r: anyhow::Result<()>| r.map(|()| 0);
    if !matches!(cli.cmd, Cmd::Features | Cmd::Spec(_)) {
        husk::limits::ensure_open_files()?;
    }
    match &cli.cmd {
        Cmd::Check(args) => check::check(args).map(|usable| if usable { 0 } else { 1 }),
        Cmd::Create(args) => ok(create::create(globals, args)),
        Cmd::Start(args) => ok(start::start(globals, args)),
        Cmd::State(args) => ok(state::state(globals, args)),
        Cmd::Kill(args) => ok(kill::kill(globals, args)),
        Cmd::Delete(args) => ok(delete::delete(globals, args)),
        Cmd::Run(args) => run::run(globals, args),
        Cmd::Exec(args) => exec::exec(globals, args),
        Cmd::ExecAttach(args) => exec::exec_attach(globals, args),
        Cmd::Ps(args) => ok(ps::ps(globals, args)),
        Cmd::List(args) => ok(list::list(globals, args)),
        Cmd::Pause(args) => ok(pause::pause(globals, args)),
        Cmd::Resume(args) => ok(resume::resume(globals, args)),
        Cmd::Events(args) => ok(events::events(globals, args)),
        Cmd::Update(args) => ok(update::update(globals, args)),
        Cmd::Features => ok(features::features()),
        Cmd::Spec(args) => ok(spec::spec(args)),
        Cmd::Template { cmd } => ok(template::template(globals, cmd)),
        Cmd::Checkpoint(_) => ok(unsupported::unsupported("checkpoint")),
        Cmd::Restore(_) => ok(unsupported::unsupported("restore")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log.clone(), cli.log_format, cli.debug);
    if cli.systemd_cgroup {
        logging::debug(
            "--systemd-cgroup: husk-vmm's host cgroup is made where systemd would put the unit \
             that cgroupsPath names, without a systemd unit (see husk::host_cgroup)",
        );
    }
    let globals = Globals {
        root: cli.root.clone(),
        debug: cli.debug,
    };
    match dispatch(&cli, &globals) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            let msg = format!("{e:#}");
            if cli.log.is_some() {
                logging::log("error", &msg);
            }
            eprintln!("husk: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn engine_invocations_parse() {
        for args in [
            &[
                "husk",
                "--root",
                "/r",
                "--log",
                "/l",
                "--log-format",
                "json",
                "--systemd-cgroup",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "--console-socket",
                "/s",
                "id",
            ][..],
            &["husk", "--root", "/r", "start", "id"],
            &["husk", "--root", "/r", "--root", "/s", "state", "id"],
            &["husk", "state", "id"],
            &["husk", "kill", "--all", "id", "KILL"],
            &["husk", "kill", "id", "15"],
            &["husk", "delete", "--force", "id"],
            &[
                "husk",
                "exec",
                "--pid-file",
                "/p",
                "--process",
                "/x.json",
                "--detach",
                "--preserve-fds",
                "0",
                "id",
            ],
            &["husk", "exec", "-t", "id", "sh", "-c", "ls -l"],
            &["husk", "run", "-d", "--bundle", "/b", "id"],
            &["husk", "ps", "--format", "json", "id"],
            &["husk", "list", "-q"],
            &["husk", "events", "--stats", "id"],
            &["husk", "update", "--memory", "1000000", "id"],
            &["husk", "checkpoint", "--image-path", "/x", "id"],
        ] {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
    }
}
