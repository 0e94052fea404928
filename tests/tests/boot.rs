//! Boots the real guest kernel and agent under real KVM through `husk-vmm`.

use husk_tests::{process_alive, vm_artifacts, wait_until, Pattern, TestVmBuilder};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

/// Boots, checks the agent's view of the machine against what was asked, and shuts down cleanly.
fn boot_and_check(cpus: u8, mem_mib: u32) {
    let Some(artifacts) = vm_artifacts("boot_and_check") else {
        return;
    };
    let mut vm = TestVmBuilder::new(&artifacts)
        .cpus(cpus)
        .mem_mib(mem_mib)
        .spawn()
        .expect("spawn husk-vmm");
    let (client, hello) = vm.connect().expect("agent handshake");
    eprintln!(
        "{cpus} vCPU / {mem_mib} MiB: handshake after {:?}: {hello:?}",
        vm.started.elapsed()
    );
    assert_eq!(hello.cpus, u32::from(cpus), "guest CPU count");
    // The E820 map leaves out only the legacy hole below 1 MiB (the 640K-1M range and page 0).
    let asked_kib = u64::from(mem_mib) * 1024;
    assert!(
        hello.mem_phys_kib <= asked_kib && hello.mem_phys_kib >= asked_kib - 1024,
        "guest RAM {} KiB, asked for {asked_kib} KiB",
        hello.mem_phys_kib
    );
    assert!(hello.mem_total_kib < hello.mem_phys_kib && hello.mem_total_kib > asked_kib / 2);
    assert!(hello.uptime_us > 0);

    let report = vm.boot_report().expect("boot report");
    assert_eq!(report.vcpus, cpus);
    assert_eq!(report.mem_size_mib, mem_mib);
    let first_entry = report
        .first_vcpu_entry_us
        .expect("first vCPU entry recorded");
    let handshake = report.agent_handshake_us.expect("agent handshake recorded");
    assert!(report.vm_created_us <= report.kernel_loaded_us);
    assert!(report.kernel_loaded_us <= first_entry && first_entry <= handshake);
    assert!(report.guest_uptime_at_handshake_us.is_some());

    client.shutdown().expect("shutdown acknowledged");
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("husk-vmm exits after the agent's shutdown");
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(!vm.socket.exists(), "the vsock socket was removed");
}

#[test]
fn boots_to_handshake_with_1_vcpu_and_128_mib() {
    boot_and_check(1, 128);
}

#[test]
fn boots_to_handshake_with_4_vcpus_and_1024_mib() {
    boot_and_check(4, 1024);
}

#[test]
fn boots_to_handshake_with_1_vcpu_and_1024_mib() {
    boot_and_check(1, 1024);
}

#[test]
fn boots_to_handshake_with_4_vcpus_and_128_mib() {
    boot_and_check(4, 128);
}

#[test]
fn guest_kernel_panic_exits_nonzero_with_a_clear_message() {
    let Some(artifacts) = vm_artifacts("guest_kernel_panic") else {
        return;
    };
    // No init to run: the kernel panics ("No working init found" or no root fs).
    let mut vm = TestVmBuilder::new(&artifacts)
        .cmdline_extra("rdinit=/no/such/init init=/no/such/init")
        .spawn()
        .expect("spawn husk-vmm");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("husk-vmm exits after the guest panics");
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr
            .contains("husk-vmm: the microVM failed: guest crashed (kernel panic or triple fault)"),
        "message names the crash: {stderr}"
    );
    assert!(!vm.socket.exists(), "the vsock socket was removed");
}

#[test]
fn sigterm_stops_the_vm_and_leaves_nothing_behind() {
    let Some(artifacts) = vm_artifacts("sigterm_cleanup") else {
        return;
    };
    let mut vm = TestVmBuilder::new(&artifacts).spawn().expect("spawn");
    let (_client, _) = vm.connect().expect("agent handshake");
    let pid = vm.pid();
    vm.signal(libc::SIGTERM).expect("signal");
    let status = vm.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "128 + SIGTERM");
    assert!(!process_alive(pid));
    assert!(!vm.socket.exists(), "the vsock socket was removed");
}

#[test]
fn sigkill_leaves_no_process_behind() {
    let Some(artifacts) = vm_artifacts("sigkill_cleanup") else {
        return;
    };
    let mut vm = TestVmBuilder::new(&artifacts).spawn().expect("spawn");
    let (_client, _) = vm.connect().expect("agent handshake");
    let pid = vm.pid();
    vm.signal(libc::SIGKILL).expect("signal");
    vm.wait_exit(Duration::from_secs(30)).expect("exits");
    // Every vCPU and device thread dies with the process; no helper process exists.
    assert!(wait_until(Duration::from_secs(5), || !process_alive(pid)));
    let leftovers = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.contains(&*vm.socket.to_string_lossy()))
        .count();
    assert_eq!(leftovers, 0, "no process still refers to this VM's socket");
}

/// Pushes `len` bytes through an echo connection and checks every byte that comes back.
fn echo_roundtrip(mut stream: std::os::unix::net::UnixStream, len: usize, seed: u64) {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut reader = stream.try_clone().expect("clone stream");
    let writer = std::thread::spawn(move || {
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            pattern.fill(&mut buf[..n]);
            stream.write_all(&buf[..n]).expect("write to the guest");
            left -= n;
        }
        stream.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut expected = Pattern::new(seed);
    let mut want = vec![0u8; 256 * 1024];
    let mut got = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    while received < len {
        let n = reader.read(&mut got).expect("read from the guest");
        assert!(n > 0, "echo stream ended after {received} of {len} bytes");
        expected.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "byte mismatch in [{received}, {})",
            received + n
        );
        received += n;
    }
    writer.join().expect("writer thread");
    let mut tail = [0u8; 1];
    assert_eq!(reader.read(&mut tail).expect("EOF after the echo"), 0);
}

#[test]
fn two_vsock_streams_carry_64_mib_each_way_intact() {
    let Some(artifacts) = vm_artifacts("vsock_bulk") else {
        return;
    };
    const LEN: usize = 64 << 20;
    let mut vm = TestVmBuilder::new(&artifacts)
        .cpus(2)
        .mem_mib(256)
        .spawn()
        .expect("spawn");
    let (first, _) = vm.connect().expect("agent handshake");
    let (second, _) = vm.connect().expect("second connection");
    let a = first.into_echo().expect("echo mode");
    let b = second.into_echo().expect("echo mode");
    let started = std::time::Instant::now();
    let ta = std::thread::spawn(move || echo_roundtrip(a, LEN, 0x1234_5678));
    let tb = std::thread::spawn(move || echo_roundtrip(b, LEN, 0x9abc_def0));
    ta.join().expect("stream A intact");
    tb.join().expect("stream B intact");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "vsock: 2 x 64 MiB each way in {secs:.1} s ({:.1} MiB/s each way in total)",
        128.0 / secs
    );
}
