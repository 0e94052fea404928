//! The real agent binary, serving on a Unix socket that speaks husk-vmm's CONNECT preamble,
//! driven by the real host-side client.

use husk_agent_protocol::{
    read_frame, write_frame, AgentClient, ClientError, Request, Response, PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The agent under test: this build's, or another one (e.g. the static release build in
/// `target/x86_64-unknown-linux-gnu/agent/`) named by `HUSK_AGENT_BIN`.
fn agent_bin() -> std::ffi::OsString {
    std::env::var_os("HUSK_AGENT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_husk-agent").into())
}

/// Kills the agent if a test fails before it exits.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(socket: &Path) -> Agent {
    Agent(
        Command::new(agent_bin())
            .arg("--serve-unix")
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn husk-agent"),
    )
}

fn wait_exit(agent: &mut Agent, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn handshake_requests_bulk_echo_and_shutdown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vsock.sock");
    let mut agent = start_agent(&socket);

    // The client retries until the agent has bound its socket.
    let (mut client, hs) = AgentClient::connect(&socket, Duration::from_secs(10)).expect("connect");
    assert_eq!(hs.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hs.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(hs.cpus >= 1 && hs.mem_total_kib > 0 && hs.uptime_us > 0);

    // The control connection serves several requests.
    let resp = client
        .request(&Request::Handshake {
            protocol_version: PROTOCOL_VERSION,
        })
        .expect("second handshake");
    assert!(matches!(resp, Response::Handshake(_)));

    // Bulk data through a second connection in echo mode.
    let (echo_client, _) = AgentClient::connect(&socket, Duration::from_secs(5)).expect("connect");
    let mut raw = echo_client.into_echo().expect("echo mode");
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut writer = raw.try_clone().expect("clone");
    let sent = data.clone();
    let feeder = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write");
        writer.shutdown(Shutdown::Write).expect("shutdown write");
    });
    let mut back = Vec::with_capacity(data.len());
    raw.read_to_end(&mut back).expect("read back");
    feeder.join().expect("feeder");
    assert!(
        back == data,
        "echoed {} of {} bytes",
        back.len(),
        data.len()
    );

    client.shutdown().expect("shutdown");
    let status = wait_exit(&mut agent, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn unknown_operation_is_refused_with_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vsock.sock");
    let _agent = start_agent(&socket);
    // Wait until the agent serves, then speak raw frames: the client cannot send unknown ops.
    let (client, _) = AgentClient::connect(&socket, Duration::from_secs(10)).expect("connect");
    drop(client);
    let mut raw = UnixStream::connect(&socket).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    raw.write_all(b"CONNECT 1024\n").expect("write");
    let mut ok = [0u8; 8];
    raw.read_exact(&mut ok).expect("read OK");
    assert_eq!(&ok, b"OK 1024\n");

    let body = br#"{"op":"create","id":"web"}"#;
    raw.write_all(&(body.len() as u32).to_be_bytes())
        .expect("write");
    raw.write_all(body).expect("write");
    let resp: Response = read_frame(&mut raw).expect("reply");
    assert!(
        matches!(&resp, Response::Error { message } if message.contains("unknown variant `create`")),
        "{resp:?}"
    );

    write_frame(
        &mut raw,
        &Request::Handshake {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .expect("write");
    let resp: Response = read_frame(&mut raw).expect("reply");
    assert!(matches!(resp, Response::Handshake(_)), "{resp:?}");
}

#[test]
fn without_pid_1_or_arguments_it_refuses_to_run() {
    let out = Command::new(agent_bin()).output().expect("run husk-agent");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not PID 1"), "{stderr}");

    let out = Command::new(agent_bin())
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("husk-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn connect_to_a_missing_agent_times_out_naming_the_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nobody.sock");
    let err = AgentClient::connect(&socket, Duration::from_millis(50)).expect_err("no agent");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}
