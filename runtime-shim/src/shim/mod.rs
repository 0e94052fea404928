//! `containerd-shim-husk-v2`: husk's containerd shim v2 (runtime type `io.containerd.husk.v2`).
//!
//! One shim process and one microVM per sandbox: a Kubernetes pod (every container whose
//! `io.kubernetes.cri.sandbox-id` annotation names the pod joins the pod's shim and VM), or a
//! container started without CRI annotations (`ctr run`), which is a sandbox of its own.
//!
//! The shim v2 contract (containerd's `runtime/v2` README):
//! - `start` ([`start::start`]): finds or spawns the shim server of the sandbox and prints its
//!   ttrpc address;
//! - `delete` ([`start::delete`]): cleans up after a shim that died (kills its VM, unmounts);
//! - no action: serve the Task API on `-socket` ([`serve`]);
//! - `-v` prints the version, `-info` the runtime info.
//!
//! The Task API is served under both `containerd.task.v2.Task` (containerd 1.6 and 1.7) and
//! `containerd.task.v3.Task` (containerd 2.x): v3 is a renamed copy of v2, the messages are
//! the same. `start` replies with the bare address, which every containerd since 1.6 reads (2.x
//! then talks task API v2).
//!
//! Inside the server ([`task::TaskService`]): the first `Create` boots the VM
//! ([`sandbox::Sandbox`], a plain `husk-vmm` child with the sandbox's share), later ones add
//! containers to it. Each container's rootfs (containerd's overlay mounts) is mounted on the
//! bundle's rootfs and bind-mounted into the share ([`rootfs`]); containerd's stdio FIFOs are
//! relayed to the guest streams ([`io`]). Everything else reaches the agent through the VM's
//! vsock socket, reusing the OCI CLI's pieces (`bundle`, `share`, `sizing`, `agent`).

pub mod io;
pub mod rootfs;
pub mod sandbox;
pub mod start;
pub mod task;
pub mod translate;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::asynchronous::Server;
use containerd_shim::publisher::RemotePublisher;
use std::io::Write;
use std::sync::Arc;

/// The runtime type containerd selects this shim by.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";

/// Where the shim keeps each sandbox's state: `<SHIM_ROOT>/<namespace>/<sandbox id>/` (a
/// [`StateDir`](crate::container::StateDir) of the OCI CLI's layout plus `sandbox.json`).
pub const SHIM_ROOT: &str = "/run/husk-shim";

/// CRI annotation: `sandbox` for a pod's sandbox (pause) container, `container` for the others.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the pod sandbox a container belongs to.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Service names the Task API is registered under (see the module docs).
const TASK_V3: &str = "containerd.task.v3.Task";
const TASK_V2: &str = "containerd.task.v2.Task";

/// The sandbox a container spec belongs to: its `io.kubernetes.cri.sandbox-id` when it is a pod
/// member (`container-type` = `container`), else the container itself (`id`).
pub fn sandbox_id_of(spec: &serde_json::Value, id: &str) -> String {
    let annotations = &spec["annotations"];
    match (
        annotations[ANNOTATION_CONTAINER_TYPE].as_str(),
        annotations[ANNOTATION_SANDBOX_ID].as_str(),
    ) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => sandbox.to_string(),
        _ => id.to_string(),
    }
}

/// The shim binary's main: parses containerd's flags and runs the action; returns the exit code.
pub fn main_entry() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            return 2;
        }
    };
    if flags.version {
        println!("containerd-shim-husk-v2:");
        println!("  Version: {}", env!("CARGO_PKG_VERSION"));
        println!("  Runtime: {RUNTIME_ID}");
        return 0;
    }
    let result = if flags.info {
        print_info()
    } else {
        match flags.action.as_str() {
            "start" => start::start(&flags),
            "delete" => start::delete(&flags),
            "" => serve(&flags),
            other => Err(anyhow::anyhow!(
                "unknown action {other:?} (expected start, delete, or none to serve)"
            )),
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e:#}");
            1
        }
    }
}

/// `-info`: the runtime's name and version as a `RuntimeInfo` protobuf on stdout.
fn print_info() -> anyhow::Result<()> {
    use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
    let info = RuntimeInfo {
        name: RUNTIME_ID.to_string(),
        version: Some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    out.write_all(&info.write_to_bytes()?)?;
    out.flush()?;
    Ok(())
}

/// The shim server: serves the Task API on `-socket` until the sandbox is shut down.
pub fn serve(flags: &containerd_shim::Flags) -> anyhow::Result<()> {
    use anyhow::Context;
    if flags.socket.is_empty() {
        anyhow::bail!("-socket is required to serve");
    }
    if flags.namespace.is_empty() || flags.id.is_empty() {
        anyhow::bail!("-namespace and -id are required");
    }
    crate::container::validate_id(&flags.namespace).context("namespace")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // containerd reads the shim's log from the `log` FIFO in the bundle (our cwd).
        if let Err(e) =
            containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
        {
            eprintln!("containerd-shim-husk-v2: no shim log: {e}");
        }
        let ttrpc_address = std::env::var("TTRPC_ADDRESS")
            .context("TTRPC_ADDRESS is not set (containerd sets it for its shims)")?;
        let publisher = RemotePublisher::new(&ttrpc_address)
            .await
            .with_context(|| format!("connecting to containerd's events at {ttrpc_address}"))?;
        let exit = Arc::new(containerd_shim::ExitSignal::default());
        let service = Arc::new(task::TaskService::new(
            &flags.namespace,
            publisher,
            exit.clone(),
            tokio::runtime::Handle::current(),
        ));
        // containerd starts the shim in the bundle of the container it was started for.
        if let Ok(spec) = task::read_spec(&std::env::current_dir().unwrap_or_default()) {
            service.preboot(&flags.id, &spec);
        }
        let mut services = create_task(service.clone());
        let v2 = create_task(service.clone())
            .remove(TASK_V3)
            .context("the generated Task service has an unexpected name")?;
        services.insert(TASK_V2.to_string(), v2);
        let path = start::socket_path(&flags.socket);
        if let Some(parent) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut server = Server::new()
            .bind(&flags.socket)
            .with_context(|| format!("cannot listen on {}", flags.socket))?
            .register_service(services);
        server.start().await.context("starting the ttrpc server")?;
        service.abandon_unless_adopted(task::ADOPTION_TIMEOUT);
        log::info!("husk shim serving {} on {}", flags.id, flags.socket);
        exit.wait().await;
        log::info!("husk shim shutting down");
        let _ = server.shutdown().await;
        let _ = std::fs::remove_file(path);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_members_group_by_sandbox_id_and_others_stand_alone() {
        let member = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "container",
            ANNOTATION_SANDBOX_ID: "pod1",
        }});
        assert_eq!(sandbox_id_of(&member, "c1"), "pod1");
        let sandbox = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "sandbox",
            ANNOTATION_SANDBOX_ID: "pod1",
        }});
        assert_eq!(sandbox_id_of(&sandbox, "pod1"), "pod1");
        assert_eq!(sandbox_id_of(&json!({}), "c2"), "c2");
        let empty = json!({"annotations": {
            ANNOTATION_CONTAINER_TYPE: "container",
            ANNOTATION_SANDBOX_ID: "",
        }});
        assert_eq!(sandbox_id_of(&empty, "c3"), "c3");
    }
}
