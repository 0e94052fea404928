//! `husk update`: new cgroup resources for a running container (applied inside the guest;
//! `blockIO` to husk-vmm's host cgroup, see [`crate::host_cgroup`]).
//! The microVM's own size does not change: memory above the VM's size cannot be used.

use crate::agent::{call_ok, connect};
use crate::container::StateDir;
use crate::state::ContainerState;
use crate::Globals;
use anyhow::{bail, Context, Result};
use husk_agent_protocol::Request;
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;

/// Options of `husk update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// A JSON file of OCI `linux.resources` (`-` for stdin).
    #[arg(long, short = 'r')]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long, short = 'm')]
    pub memory: Option<i64>,
    /// Memory reservation in bytes.
    #[arg(long)]
    pub memory_reservation: Option<i64>,
    /// Memory plus swap limit in bytes.
    #[arg(long)]
    pub memory_swap: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds.
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    /// CPUs to use (cpuset list).
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes to use.
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Maximum number of pids.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Block I/O weight, 10 to 1000 (applied to husk-vmm's host cgroup).
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// The container id.
    pub id: String,
}

/// The `linux.resources` object the flags describe (`-r` first, flags on top).
pub fn build_resources(args: &UpdateArgs) -> Result<Value> {
    let mut r = match &args.resources {
        Some(path) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            serde_json::from_str(&text).context("invalid resources JSON")?
        }
        None => json!({}),
    };
    if !r.is_object() {
        bail!("resources must be a JSON object");
    }
    let mut set = |section: &str, key: &str, v: Value| {
        if !r[section].is_object() {
            r[section] = json!({});
        }
        r[section][key] = v;
    };
    if let Some(v) = args.memory {
        set("memory", "limit", v.into());
    }
    if let Some(v) = args.memory_reservation {
        set("memory", "reservation", v.into());
    }
    if let Some(v) = args.memory_swap {
        set("memory", "swap", v.into());
    }
    if let Some(v) = args.cpu_period {
        set("cpu", "period", v.into());
    }
    if let Some(v) = args.cpu_quota {
        set("cpu", "quota", v.into());
    }
    if let Some(v) = args.cpu_share {
        set("cpu", "shares", v.into());
    }
    if let Some(v) = &args.cpuset_cpus {
        set("cpu", "cpus", v.clone().into());
    }
    if let Some(v) = &args.cpuset_mems {
        set("cpu", "mems", v.clone().into());
    }
    if let Some(v) = args.pids_limit {
        set("pids", "limit", v.into());
    }
    if let Some(v) = args.blkio_weight {
        set("blockIO", "weight", v.into());
    }
    Ok(r)
}

/// `husk update`.
pub fn update(globals: &Globals, args: &UpdateArgs) -> Result<()> {
    let mut resources = build_resources(args)?;
    if let Some(map) = resources.as_object_mut() {
        for note in crate::bundle::drop_ignored_resources(map, true) {
            crate::logging::warn(&note);
        }
    }
    let block_io = crate::host_cgroup::take_block_io(Some(&mut resources));
    let dir = StateDir::new(&globals.root, &args.id)?;
    let _lock = dir.lock()?;
    let state = ContainerState::load(&dir)?;
    if !state.can_kill() {
        bail!("container {} is not running", args.id);
    }
    if let Some(block_io) = block_io {
        // The container's file I/O is husk-vmm's on the host: its host cgroup takes blockIO.
        let Some(cgroup) = crate::host_cgroup::recorded(&dir.dir)? else {
            bail!(
                "linux.resources.blockIO: container {} has no host cgroup to apply it to (its \
                 host has no cgroup v2)",
                args.id
            );
        };
        let limits = crate::host_cgroup::HostLimits {
            guest_mem_mib: 0,
            block_io: Some(block_io),
        };
        crate::host_cgroup::set_limits(&cgroup, &limits, &crate::logging::warn)?;
    }
    if let Some(map) = resources.as_object_mut() {
        // A new cpuset is in host numbering, like the one at create: onto the VM's vCPUs.
        let vcpus = if state.vcpus == 0 {
            crate::sizing::host_cpus()
        } else {
            u32::from(state.vcpus)
        };
        for note in crate::sizing::map_cpuset(map, vcpus)? {
            crate::logging::warn(&note);
        }
    }
    let mut client = connect(&dir)?;
    call_ok(
        &mut client,
        "updating resources",
        &Request::Update {
            id: args.id.clone(),
            resources,
        },
    )?;
    Ok(())
}
