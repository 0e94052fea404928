//! `husk events`: container resource statistics, once (`--stats`) or every `--interval` until
//! the container stops. Events have runc's shape: `{"type":"stats","id":..,"data":{..}}`.

use crate::agent::{call, connect};
use crate::container::StateDir;
use crate::state::{ContainerState, Status};
use crate::Globals;
use anyhow::{bail, Result};
use husk_agent_protocol::{ContainerStats, Request, Response};
use serde_json::{json, Value};
use std::time::Duration;

/// Options of `husk events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Print one stats event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between stats events (`5s`, `500ms`, `1m`).
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    pub interval: Duration,
    /// The container id.
    pub id: String,
}

/// Parses `500ms`, `5s`, `1m` or a plain number of seconds.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid interval {text:?} (use e.g. 500ms, 5s, 1m)");
    let (num, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

/// The stats event of runc's `events` for `stats`.
pub fn stats_event(id: &str, s: &ContainerStats) -> Value {
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {
                "total": s.cpu_usage_usec.saturating_mul(1000),
                "kernel": s.cpu_system_usec.saturating_mul(1000),
                "user": s.cpu_user_usec.saturating_mul(1000),
            }},
            "memory": {
                "usage": {"usage": s.memory_current_bytes, "limit": s.memory_limit_bytes.unwrap_or(0)},
                "stats": {"working_set": s.memory_working_set_bytes},
                "oom_kill": s.oom_kills,
            },
            "pids": {"current": s.pids_current, "limit": s.pids_limit.unwrap_or(0)},
        }
    })
}

/// `husk events`.
pub fn events(globals: &Globals, args: &EventsArgs) -> Result<()> {
    let dir = StateDir::new(&globals.root, &args.id)?;
    loop {
        let stats = {
            let _lock = dir.lock()?;
            let state = ContainerState::load(&dir)?;
            if state.status == Status::Stopped {
                if args.stats {
                    bail!("container {} is not running", args.id);
                }
                return Ok(());
            }
            let mut client = connect(&dir)?;
            match call(
                &mut client,
                "reading stats",
                &Request::Stats {
                    id: args.id.clone(),
                },
            )? {
                Response::Stats(s) => s,
                other => bail!("reading stats: unexpected {} reply", other.kind()),
            }
        };
        crate::outln!("{}", stats_event(&args.id, &stats));
        if args.stats {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_units() {
        assert_eq!(parse_interval("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("3"), Ok(Duration::from_secs(3)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("5h").is_err());
    }

    #[test]
    fn stats_events_have_runc_shape() {
        let s = ContainerStats {
            cpu_usage_usec: 2,
            memory_current_bytes: 100,
            memory_limit_bytes: Some(200),
            pids_current: 3,
            ..ContainerStats::default()
        };
        let e = stats_event("c1", &s);
        assert_eq!(e["type"], "stats");
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 2000);
        assert_eq!(e["data"]["memory"]["usage"]["limit"], 200);
        assert_eq!(e["data"]["pids"]["current"], 3);
    }
}
