//! The kubelet's path: a CRI client against containerd's CRI plugin with runtime handler `husk`
//! (see `husk_tests::cri`): a pod's lifecycle, faults, and bad annotations.

use husk_tests::cri::{container_config, read_cri_log, Cri, HANDLER};
use husk_tests::http_get;
use husk_tests::wait_until;
use k8s_cri::v1::{ContainerState, Mount};
use std::time::Duration;

fn kill9(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill(2) of a process this test found by its command line; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_clean(cri: &Cri) {
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(60), || {
        left = cri.leftovers();
        left.is_empty()
    });
    if !clean {
        // The log of each sandbox something is left of.
        let mut logs = String::new();
        for item in &left {
            if let Some(id) = item.rsplit('/').find(|part| part.len() == 64) {
                logs.push_str(&format!("--- {id}:\n{}\n", cri.ctrd.log_mentioning(id)));
            }
        }
        panic!("left behind: {left:#?}\n{logs}\n{}", cri.ctrd.log_tail());
    }
}

/// RunPodSandbox, two containers that share the pod's VM and localhost, ExecSync, stats, logs,
/// then the kubelet's teardown; nothing is left.
#[test]
fn a_pod_through_cri_runs_its_containers_in_one_vm() {
    let Some(cri) = Cri::start("a_pod_through_cri_runs_its_containers_in_one_vm") else {
        return;
    };
    let pod_config = cri.pod_config("web", &[]);
    let pod = cri
        .run_pod(&pod_config, HANDLER)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", cri.ctrd.log_tail()));
    let vmms = cri.vmms_of(&pod);
    assert_eq!(vmms.len(), 1, "one VM for the pod: {vmms:?}");
    // Warm: a template with a card, the CNI interface's TAP under it.
    husk_tests::oci::assert_started_as_configured(vmms[0], "the pod's husk-vmm");

    let server = cri
        .start_container(
            &pod,
            &pod_config,
            "server",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo pong > /www/index.html && echo serving && echo warming >&2 \
                 && exec httpd -f -p 8080 -h /www",
            ],
            0,
        )
        .unwrap_or_else(|e| panic!("server container: {e}\n{}", cri.ctrd.log_tail()));
    // The pod's first member container is created: its template has a write set, which this
    // pod recorded if an earlier one had not, and later pods copy ahead.
    if let Some(template) = husk_tests::oci::restored_from(vmms[0]) {
        assert!(
            template.join("write-set").is_file(),
            "no write set in {} after the pod's first member container was created\n{}",
            template.display(),
            cri.ctrd.log_mentioning("write set")
        );
    }
    // The client has a volume: a host directory bind-mounted at /data.
    let volume = cri.ctrd.dir.path().join("volume");
    std::fs::create_dir_all(&volume).expect("volume dir");
    std::fs::write(volume.join("from-host"), "host data\n").expect("volume file");
    let mut client_config = container_config("client", &["sleep", "100000"], 0);
    client_config.mounts.push(Mount {
        container_path: "/data".into(),
        host_path: volume.display().to_string(),
        ..Default::default()
    });
    let client = cri
        .start_container_with(&pod, &pod_config, client_config)
        .unwrap_or_else(|e| panic!("client container: {e}\n{}", cri.ctrd.log_tail()));
    assert_eq!(
        cri.vmms_of(&pod),
        vmms,
        "the containers joined the pod's VM"
    );
    for id in [&server, &client] {
        assert!(
            cri.container_in(id, ContainerState::ContainerRunning),
            "{id}: {:?}",
            cri.container_status(id)
        );
    }

    // Both containers run in the same guest, which is not the host.
    let boot_id = |id: &str| {
        let r = cri
            .exec_sync(id, &["cat", "/proc/sys/kernel/random/boot_id"])
            .expect("ExecSync boot_id");
        assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
        text(&r.stdout).trim().to_string()
    };
    let server_boot = boot_id(&server);
    assert_eq!(server_boot.len(), 36, "{server_boot:?}");
    assert_eq!(boot_id(&client), server_boot, "same guest boot id");
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    assert_ne!(server_boot, host_boot.trim(), "the pod runs in a VM");

    // The pod's localhost, and each container its own rootfs.
    let r = cri
        .exec_sync(
            &client,
            &[
                "sh",
                "-c",
                "test -e /www && echo shared-rootfs; \
                 for i in $(seq 100); do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 0.2; done; exit 1",
            ],
        )
        .expect("ExecSync wget");
    assert_eq!(
        (r.exit_code, text(&r.stdout)),
        (0, "pong\n".to_string()),
        "the pod's localhost: {}",
        text(&r.stderr)
    );

    // The volume, both ways.
    let r = cri
        .exec_sync(
            &client,
            &[
                "sh",
                "-c",
                "cat /data/from-host && echo guest data > /data/from-guest",
            ],
        )
        .expect("ExecSync on the volume");
    assert_eq!(
        (r.exit_code, text(&r.stdout)),
        (0, "host data\n".to_string()),
        "{}",
        text(&r.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(volume.join("from-guest")).expect("written in the guest"),
        "guest data\n"
    );

    // The pod's own address, from the host: CNI's interface carried into the VM.
    let network = cri
        .call("PodSandboxStatus", |mut c| {
            let request = k8s_cri::v1::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            };
            async move { c.pod_sandbox_status(request).await }
        })
        .expect("PodSandboxStatus")
        .status
        .and_then(|s| s.network)
        .unwrap_or_default();
    let pod_ips: Vec<String> = std::iter::once(network.ip.clone())
        .chain(network.additional_ips.iter().map(|ip| ip.ip.clone()))
        .filter(|ip| !ip.is_empty())
        .collect();
    // The CNI network is dual-stack: an IPv4 and an IPv6 address, both reachable.
    assert!(
        pod_ips.iter().any(|ip| ip.contains('.')) && pod_ips.iter().any(|ip| ip.contains(':')),
        "CNI gave the pod an IPv4 and an IPv6 address: {pod_ips:?}"
    );
    for pod_ip in &pod_ips {
        let mut reply = String::new();
        let served = wait_until(Duration::from_secs(60), || {
            reply = http_get(pod_ip, 8080).unwrap_or_else(|e| e.to_string());
            reply.ends_with("\r\n\r\npong\n")
        });
        assert!(
            served,
            "GET http://{pod_ip}:8080/ from the host: {reply:?}\n{}",
            cri.ctrd.log_tail()
        );
    }
    let r = cri
        .exec_sync(&client, &["cat", "/sys/class/net/eth0/address"])
        .expect("ExecSync eth0");
    assert_eq!(r.exit_code, 0, "the guest has eth0: {}", text(&r.stderr));

    // ExecSync carries both streams and the exit code.
    let r = cri
        .exec_sync(&client, &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .expect("ExecSync");
    assert_eq!(r.exit_code, 3);
    assert_eq!(text(&r.stdout), "out\n");
    assert_eq!(text(&r.stderr), "err\n");

    // Stats from the guest's cgroups.
    let stats = cri
        .call("ContainerStats", |mut c| {
            let request = k8s_cri::v1::ContainerStatsRequest {
                container_id: server.clone(),
            };
            async move { c.container_stats(request).await }
        })
        .expect("ContainerStats")
        .stats
        .expect("stats");
    let memory = stats.memory.expect("memory stats");
    let working_set = memory.working_set_bytes.map_or(0, |v| v.value);
    let usage = memory.usage_bytes.map_or(0, |v| v.value);
    assert!(
        working_set > 0 && usage >= working_set,
        "memory: {memory:?}"
    );
    let cpu = stats.cpu.expect("cpu stats");
    assert!(
        cpu.usage_core_nano_seconds.map_or(0, |v| v.value) > 0,
        "cpu: {cpu:?}"
    );

    // UpdateContainerResources reaches the container's cgroup in the guest.
    let memory_max = |id: &str| {
        let r = cri
            .exec_sync(id, &["cat", "/sys/fs/cgroup/memory.max"])
            .expect("ExecSync memory.max");
        assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
        text(&r.stdout).trim().to_string()
    };
    assert_eq!(memory_max(&server), "max");
    cri.call("UpdateContainerResources", |mut c| {
        let request = k8s_cri::v1::UpdateContainerResourcesRequest {
            container_id: server.clone(),
            linux: Some(k8s_cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        async move { c.update_container_resources(request).await }
    })
    .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", cri.ctrd.log_tail()));
    assert_eq!(memory_max(&server), (64u64 << 20).to_string());

    // The container's output reached CRI's log file, stream by stream.
    let log = cri.log_path("web", "server");
    let logged = wait_until(Duration::from_secs(30), || {
        read_cri_log(&log).is_ok_and(|(out, err)| out == "serving\n" && err == "warming\n")
    });
    assert!(logged, "{}: {:?}", log.display(), read_cri_log(&log));

    // The kubelet's teardown.
    cri.stop_and_remove_container(&server, 10)
        .expect("stop and remove the server");
    cri.stop_and_remove_container(&client, 10)
        .expect("stop and remove the client");
    let netns = cri
        .call("PodSandboxStatus", |mut c| {
            let request = k8s_cri::v1::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            };
            async move { c.pod_sandbox_status(request).await }
        })
        .expect("PodSandboxStatus")
        .info
        .get("info")
        .and_then(|info| serde_json::from_str::<serde_json::Value>(info).ok())
        .and_then(|info| {
            info["runtimeSpec"]["linux"]["namespaces"]
                .as_array()
                .cloned()
        })
        .and_then(|ns| {
            ns.iter()
                .find(|n| n["type"] == "network")
                .and_then(|n| n["path"].as_str().map(String::from))
        })
        .expect("the pod's network namespace path");
    let shim_socket = cri.ctrd.shim_socket(&pod);
    assert!(shim_socket.exists(), "{}", shim_socket.display());
    assert!(std::path::Path::new(&netns).exists(), "{netns}");
    cri.stop_and_remove_pod(&pod)
        .expect("stop and remove the pod");
    assert_clean(&cri);
    assert!(
        !shim_socket.exists(),
        "the shim's socket is removed: {}",
        shim_socket.display()
    );
    assert!(
        !std::path::Path::new(&netns).exists(),
        "the pod's network namespace is removed: {netns}"
    );
}

/// `kill -9` of a pod's VMM ends every container and the pod can still be removed; `kill -9` of
/// the shim leads containerd to remove the VM; an OOM kill in one container ends that one only.
#[test]
fn cri_faults_end_containers_and_leave_nothing() {
    let Some(cri) = Cri::start("cri_faults_end_containers_and_leave_nothing") else {
        return;
    };

    // kill -9 of the VMM.
    let config = cri.pod_config("vmm-kill", &[]);
    let pod = cri.run_pod(&config, HANDLER).expect("RunPodSandbox");
    let a = cri
        .start_container(&pod, &config, "a", &["sleep", "100000"], 0)
        .expect("container a");
    let b = cri
        .start_container(&pod, &config, "b", &["sleep", "100000"], 0)
        .expect("container b");
    let vmms = cri.vmms_of(&pod);
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    kill9(vmms[0]);
    let exited = wait_until(Duration::from_secs(120), || {
        [&a, &b]
            .iter()
            .all(|id| cri.container_in(id, ContainerState::ContainerExited))
    });
    assert!(
        exited,
        "every container exits with the VM: {:?} {:?}\n{}",
        cri.container_status(&a),
        cri.container_status(&b),
        cri.ctrd.log_tail()
    );
    cri.stop_and_remove_pod(&pod)
        .expect("the pod is stopped and removed after its VM died");

    // kill -9 of the shim.
    let config = cri.pod_config("shim-kill", &[]);
    let pod = cri.run_pod(&config, HANDLER).expect("RunPodSandbox");
    let a = cri
        .start_container(&pod, &config, "a", &["sleep", "100000"], 0)
        .expect("container a");
    let socket = cri.ctrd.socket.display().to_string();
    let shims = husk_tests::containerd::processes_mentioning(&[
        "containerd-shim-husk-v2",
        &format!("-id {pod}"),
        &socket,
    ]);
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(cri.vmms_of(&pod).len(), 1);
    kill9(shims[0]);
    let vm_gone = wait_until(Duration::from_secs(120), || cri.vmms_of(&pod).is_empty());
    assert!(
        vm_gone,
        "containerd's cleanup removes the VM\n{}",
        cri.ctrd.log_tail()
    );
    let exited = wait_until(Duration::from_secs(60), || {
        cri.container_in(&a, ContainerState::ContainerExited)
    });
    assert!(exited, "{:?}", cri.container_status(&a));
    cri.stop_and_remove_pod(&pod)
        .expect("the pod is stopped and removed after its shim died");

    // An OOM kill in one container of a pod: that container ends as OOMKilled, the other runs on.
    let config = cri.pod_config("oom", &[]);
    let pod = cri.run_pod(&config, HANDLER).expect("RunPodSandbox");
    let calm = cri
        .start_container(&pod, &config, "calm", &["sleep", "100000"], 0)
        .expect("container calm");
    let hog = cri
        .start_container(
            &pod,
            &config,
            "hog",
            &[
                "sh",
                "-c",
                "x=0123456789abcdef; while true; do x=\"$x$x\"; done",
            ],
            32 << 20,
        )
        .expect("container hog");
    let ended = wait_until(Duration::from_secs(120), || {
        cri.container_in(&hog, ContainerState::ContainerExited)
    });
    let status = cri.container_status(&hog).expect("hog status");
    assert!(ended, "the hog is OOM-killed: {status:?}");
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    assert!(
        cri.container_in(&calm, ContainerState::ContainerRunning),
        "{:?}",
        cri.container_status(&calm)
    );
    let r = cri
        .exec_sync(&calm, &["echo", "still here"])
        .expect("ExecSync after the OOM");
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "still here\n".into()));
    cri.stop_and_remove_pod(&pod)
        .expect("stop and remove the pod");
    assert_clean(&cri);
}

/// Bad `io.husk.vm.*` annotations on a pod: RunPodSandbox fails with an error naming the
/// problem, and nothing is started or left.
#[test]
fn bad_pod_annotations_fail_through_cri_clearly() {
    let Some(cri) = Cri::start("bad_pod_annotations_fail_through_cri_clearly") else {
        return;
    };
    for (name, annotation, value, expected) in [
        ("nan", "io.husk.vm.mem_mib", "abc", "io.husk.vm.mem_mib"),
        ("huge", "io.husk.vm.mem_mib", "99999999", "memory"),
        ("nocpu", "io.husk.vm.cpus", "0", "io.husk.vm.cpus"),
    ] {
        let config = cri.pod_config(name, &[(annotation, value)]);
        let err = cri
            .run_pod(&config, HANDLER)
            .expect_err("a bad annotation is refused");
        assert!(
            err.message().contains(expected),
            "{annotation}={value}: the error names {expected}: {err}"
        );
        assert_clean(&cri);
    }
}
