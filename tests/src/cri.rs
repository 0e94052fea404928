//! Harness for the Kubernetes tests and `husk-bench cri`: the kubelet's path into husk.
//!
//! A containerd of the test's own (see [`Containerd`]) with its CRI plugin on, configured as
//! `docs/kubernetes.md` says (a `husk` runtime handler of type `io.containerd.husk.v2` passing
//! `io.husk.vm.*` and `io.husk.fs.*` pod annotations, and `runc` beside it for comparison), a pause image the test
//! builds as the sandbox image (containerd cannot pull here), and a CNI bridge network of the
//! test's own from Debian's CNI plugins. [`Cri`] speaks CRI v1 to it with the generated client
//! of the `k8s-cri` crate, as the kubelet does; every call is bounded in time.

use crate::containerd::{Containerd, IMAGE};
use crate::{wait_until, Artifacts};
use anyhow::{bail, Context, Result};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest,
    LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StopContainerRequest, StopPodSandboxRequest,
};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// The containerd namespace CRI works in.
pub const NAMESPACE: &str = "k8s.io";
/// husk's runtime handler (a pod's `runtimeClassName` names it through a RuntimeClass).
pub const HANDLER: &str = "husk";
/// The runc handler beside it, for comparisons.
pub const RUNC_HANDLER: &str = "runc";
/// The sandbox ("pause") image the test builds and configures.
pub const PAUSE_IMAGE: &str = "docker.io/husk/pause:test";
/// The CNI bridge of the test network.
const BRIDGE: &str = "husk-cni0";
/// Longest a single CRI call may take (a pod start in the rig takes seconds, not minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The CRI plugin's configuration; `{dir}` is the containerd's own directory.
const CRI_CONFIG: &str = r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/husk/pause:test"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
      pod_annotations = ["io.husk.vm.*", "io.husk.fs.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{dir}/cni"
"#;

/// A containerd with CRI on, and a CRI client of it.
pub struct Cri {
    pub ctrd: Containerd,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Starts containerd with CRI for `test`, or `None` (loudly) where the containerd tests
    /// cannot run (see [`Containerd::available`]); also needs Debian's CNI plugins.
    pub fn start(test: &str) -> Option<Cri> {
        let artifacts = Containerd::available(test)?;
        if !Path::new("/usr/lib/cni/bridge").exists() {
            crate::skip::skip(&format!(
                "{test}: no CNI plugins in /usr/lib/cni (containernetworking-plugins)"
            ));
            return None;
        }
        Some(Cri::launch(artifacts).expect("start containerd with CRI"))
    }

    /// Starts containerd with CRI, a CNI network and the test images; waits until CRI says the
    /// runtime and the network are ready.
    pub fn launch(artifacts: Artifacts) -> Result<Cri> {
        crate::load_tun()?;
        let ctrd = Containerd::launch(artifacts, NAMESPACE, Some(CRI_CONFIG))?;
        let dir = ctrd.dir.path().to_path_buf();
        std::fs::create_dir_all(dir.join("cni"))?;
        let network = json!({
            "cniVersion": "0.4.0",
            "name": "husk-test",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.88.77.0/24"}], [{"subnet": "fd00:88:77::/64"}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }, {"type": "loopback"}],
        });
        std::fs::write(dir.join("cni/10-husk-test.conflist"), network.to_string())?;
        ctrd.import_busybox()?;
        ctrd.import_image(
            PAUSE_IMAGE,
            json!({
                "Env": ["PATH=/bin"],
                "Entrypoint": ["/bin/sleep"],
                "Cmd": ["2147483647"],
                "WorkingDir": "/",
            }),
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = ctrd.socket.clone();
        let channel = rt.block_on(async move {
            Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
        })?;
        let cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            ctrd,
            rt,
        };
        cri.wait_ready()?;
        Ok(cri)
    }

    /// Waits until CRI reports RuntimeReady and NetworkReady (the CNI configuration is loaded)
    /// and knows both test images.
    fn wait_ready(&self) -> Result<()> {
        let timeout = Duration::from_secs(120);
        let mut last = String::new();
        let ready = wait_until(timeout, || {
            match self.call("Status", |mut c| async move {
                c.status(StatusRequest { verbose: false }).await
            }) {
                Ok(status) => {
                    let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
                    last = format!("{conditions:?}");
                    conditions.len() >= 2 && conditions.iter().all(|c| c.status)
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if !ready {
            bail!(
                "CRI is not ready within {timeout:?}: {last}\n{}",
                self.ctrd.log_tail()
            );
        }
        for image in [IMAGE, PAUSE_IMAGE] {
            let known = wait_until(timeout, || {
                let mut images = self.images.clone();
                let spec = ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                };
                self.block(async move {
                    images
                        .image_status(ImageStatusRequest {
                            image: Some(spec),
                            verbose: false,
                        })
                        .await
                })
                .is_ok_and(|r| r.into_inner().image.is_some())
            });
            if !known {
                bail!("CRI does not know the imported image {image}");
            }
        }
        Ok(())
    }

    fn block<F: Future>(&self, future: F) -> F::Output {
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await })
        {
            Ok(output) => output,
            Err(_) => panic!(
                "a CRI call did not answer within {CALL_TIMEOUT:?}\ncontainerd log:\n{}",
                self.ctrd.log_tail()
            ),
        }
    }

    /// One call of the runtime service, e.g.
    /// `cri.call("ExecSync", |mut c| async move { c.exec_sync(req).await })`.
    pub fn call<T, F, Fut>(&self, _what: &str, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.runtime.clone();
        self.block(f(client)).map(tonic::Response::into_inner)
    }

    /// A pod's configuration as the kubelet writes it (pod network, IPC and UTS shared; a pid
    /// namespace per container), with `annotations`.
    pub fn pod_config(&self, name: &str, annotations: &[(&str, &str)]) -> PodSandboxConfig {
        let log_directory = self.ctrd.dir.path().join("logs").join(name);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}"),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_directory.display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            labels: HashMap::from([("app".to_string(), name.to_string())]),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with `handler`; the pod's id.
    pub fn run_pod(
        &self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(request).await
        })
        .map(|r| r.pod_sandbox_id)
    }

    /// CreateContainer (of the busybox image, running `command`, logging to `<name>.log`) and
    /// StartContainer; the container's id. `memory_limit` is in bytes (0: none).
    pub fn start_container(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        command: &[&str],
        memory_limit: i64,
    ) -> Result<String, tonic::Status> {
        let config = container_config(name, command, memory_limit);
        self.start_container_with(pod, pod_config, config)
    }

    /// CreateContainer of `config` in pod `pod`, then StartContainer; the container's id.
    pub fn start_container_with(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        let id = self
            .call("CreateContainer", |mut c| async move {
                c.create_container(request).await
            })?
            .container_id;
        let request = StartContainerRequest {
            container_id: id.clone(),
        };
        self.call("StartContainer", |mut c| async move {
            c.start_container(request).await
        })?;
        Ok(id)
    }

    /// ExecSync of `cmd` in container `id` (no timeout of its own; the call is bounded).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse, tonic::Status> {
        let request = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 0,
        };
        self.call(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        )
    }

    /// ContainerStatus of `id`.
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        let request = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.call("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })?
        .status
        .ok_or_else(|| tonic::Status::not_found(format!("no status for {id}")))
    }

    /// Whether container `id` is in `state`.
    pub fn container_in(&self, id: &str, state: ContainerState) -> bool {
        self.container_status(id)
            .is_ok_and(|s| s.state == state as i32)
    }

    /// StopContainer with a grace period of `timeout_s`, then RemoveContainer.
    pub fn stop_and_remove_container(&self, id: &str, timeout_s: i64) -> Result<(), tonic::Status> {
        let request = StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_s,
        };
        self.call("StopContainer", |mut c| async move {
            c.stop_container(request).await
        })?;
        let request = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.call("RemoveContainer", |mut c| async move {
            c.remove_container(request).await
        })?;
        Ok(())
    }

    /// StopPodSandbox, then RemovePodSandbox (which removes the pod's containers too).
    pub fn stop_and_remove_pod(&self, pod: &str) -> Result<(), tonic::Status> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(request).await
        })?;
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(request).await
        })?;
        Ok(())
    }

    /// The log file CRI writes for container `name` of pod `pod_name`.
    pub fn log_path(&self, pod_name: &str, name: &str) -> PathBuf {
        self.ctrd
            .dir
            .path()
            .join("logs")
            .join(pod_name)
            .join(format!("{name}.log"))
    }

    /// The host's view of pod `pod`'s VM: its husk-vmm processes.
    pub fn vmms_of(&self, pod: &str) -> Vec<u32> {
        crate::containerd::processes_mentioning(&[
            "husk-vmm",
            &format!("{}/{NAMESPACE}/{pod}/", crate::containerd::SHIM_ROOT),
        ])
    }

    /// Everything left of the pods: what [`Containerd::leftovers`] finds (shims, VMMs, mounts,
    /// shim state), CRI's sandbox and container directories, and pods CRI still lists.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = self.ctrd.leftovers();
        let cri_root = self.ctrd.dir.path().join("root/io.containerd.grpc.v1.cri");
        let cri_state = self.ctrd.dir.path().join("state/io.containerd.grpc.v1.cri");
        for dir in [
            cri_root.join("sandboxes"),
            cri_root.join("containers"),
            cri_state.join("sandboxes"),
            cri_state.join("containers"),
        ] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                left.push(format!("CRI state {}", entry.path().display()));
            }
        }
        match self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
                .await
        }) {
            Ok(list) => left.extend(list.items.iter().map(|p| format!("pod {}", p.id))),
            Err(e) => left.push(format!("ListPodSandbox failed: {e}")),
        }
        left
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Best effort: remove whatever pods the test left, then (through `Containerd`'s drop)
        // containerd; the test network's bridge goes last.
        if let Ok(list) = self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
                .await
        }) {
            for pod in list.items {
                let _ = self.stop_and_remove_pod(&pod.id);
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A container of the busybox image running `command`, logging to `<name>.log`, with a memory
/// limit of `memory_limit` bytes (0: none), as the kubelet would ask for it.
pub fn container_config(name: &str, command: &[&str], memory_limit: i64) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: memory_limit,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads the CRI log file at `path` (lines `<time> <stream> <tag> <text>`) as the text the
/// container wrote, stream by stream: `(stdout, stderr)`.
pub fn read_cri_log(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let (mut out, mut err) = (String::new(), String::new());
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (_time, stream, tag) = (fields.next(), fields.next(), fields.next());
        let body = fields.next().unwrap_or("");
        let target = match stream {
            Some("stdout") => &mut out,
            Some("stderr") => &mut err,
            _ => bail!("not a CRI log line: {line:?}"),
        };
        target.push_str(body);
        // `F`: the line ended; `P`: a partial line, continued by the next entry.
        if tag == Some("F") {
            target.push('\n');
        }
    }
    Ok((out, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_rejoin_partial_lines_per_stream() {
        let dir = crate::TempDir::new("husk-cri-log").expect("tempdir");
        let path = dir.path().join("c.log");
        std::fs::write(
            &path,
            "2026-11-29T10:00:00.1Z stdout P hel\n\
             2026-11-29T10:00:00.2Z stderr F oops\n\
             2026-11-29T10:00:00.3Z stdout F lo world\n\
             2026-11-29T10:00:00.4Z stdout F \n",
        )
        .expect("write");
        let (out, err) = read_cri_log(&path).expect("parse");
        assert_eq!(out, "hello world\n\n");
        assert_eq!(err, "oops\n");
        std::fs::write(&path, "garbage\n").expect("write");
        assert!(read_cri_log(&path).is_err());
    }
}
