//! Host side of the agent protocol: connects to the agent through husk-vmm's vsock Unix socket.
//!
//! husk-vmm exposes the guest's vsock as one Unix socket per sandbox. A host-initiated
//! connection writes `CONNECT <port>\n`; once the guest accepted it, the VMM answers
//! `OK <host-port>\n` and from then on the Unix stream carries the vsock stream. If nothing in
//! the guest listens on the port (the agent has not started yet), the VMM closes the Unix
//! connection instead, so [`AgentClient::connect`] retries until its timeout.
//!
//! Everything the agent sends is untrusted: frames are bounded by [`MAX_FRAME_LEN`], every read
//! has a timeout, and replies must be of the exact expected type.
//!
//! [`MAX_FRAME_LEN`]: crate::MAX_FRAME_LEN

use crate::frame::{read_frame, write_frame, FrameError};
use crate::{Handshake, Request, Response, AGENT_VSOCK_PORT, PROTOCOL_VERSION, REPLY_TIMEOUT};
use std::error::Error as _;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest `OK <port>\n` line accepted from the VMM, newline included.
pub const CONNECT_REPLY_MAX_LEN: usize = 64;

/// Pause between two connection attempts while the agent is not listening yet.
pub const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// Errors of talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Unix socket could not be connected.
    #[error("connecting to {} failed", path.display())]
    Connect {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the `CONNECT` exchange failed.
    #[error("the CONNECT exchange with the VMM failed")]
    ConnectIo(#[source] io::Error),
    /// The VMM closed the connection before `OK`: nothing listens on the port in the guest yet.
    #[error("the VMM closed the connection before OK (the agent is not listening yet)")]
    ClosedBeforeOk,
    /// The VMM answered something other than `OK <port>`.
    #[error("the VMM answered {line:?} to CONNECT instead of OK <port>")]
    BadConnectReply {
        /// The line received (lossy UTF-8, at most [`CONNECT_REPLY_MAX_LEN`] bytes).
        line: String,
    },
    /// The VMM's answer to `CONNECT` has no newline within [`CONNECT_REPLY_MAX_LEN`] bytes.
    #[error("the VMM's answer to CONNECT exceeds {CONNECT_REPLY_MAX_LEN} bytes")]
    ConnectReplyTooLong,
    /// Exchanging frames with the agent failed.
    #[error("agent protocol error")]
    Frame(#[from] FrameError),
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {agent}, this host speaks {host}")]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`].
        host: u32,
        /// The version in the agent's handshake.
        agent: u32,
    },
    /// The agent answered a request with [`Response::Error`].
    #[error("the agent refused the request: {message}")]
    Agent {
        /// The agent's message (untrusted text).
        message: String,
    },
    /// The agent answered with a response of the wrong type.
    #[error("expected a {expected} reply, the agent sent {got}")]
    UnexpectedResponse {
        /// The expected response kind.
        expected: &'static str,
        /// The kind received ([`Response::kind`]).
        got: &'static str,
    },
    /// Setting a socket option failed.
    #[error("configuring the agent socket failed")]
    Socket(#[source] io::Error),
    /// The agent did not answer within the connect timeout.
    #[error("no agent reachable through {} within {timeout_ms} ms; last error: {last_error}", path.display())]
    Timeout {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// The timeout given to [`AgentClient::connect`].
        timeout_ms: u64,
        /// The last attempt's error, with its causes.
        last_error: String,
    },
}

impl ClientError {
    /// Whether a connection attempt that failed this way is worth repeating: the socket does not
    /// exist yet, or the VMM or guest refused or dropped the connection (agent not listening).
    fn is_retryable(&self) -> bool {
        let retryable_io = |err: &io::Error| {
            matches!(
                err.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        };
        match self {
            ClientError::Connect { source, .. } => retryable_io(source),
            ClientError::ConnectIo(err) => retryable_io(err),
            ClientError::ClosedBeforeOk => true,
            // A VMM may answer OK before the guest side is established and close right after.
            ClientError::Frame(FrameError::Closed) => true,
            ClientError::Frame(FrameError::Io(err)) => retryable_io(err),
            _ => false,
        }
    }

    /// Whether this error is a read or write that ran into the deadline.
    fn is_timeout(&self) -> bool {
        let timed_out = |err: &io::Error| {
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        match self {
            ClientError::ConnectIo(err) => timed_out(err),
            ClientError::Frame(FrameError::TimedOut) => true,
            _ => false,
        }
    }

    /// The error and its chain of causes on one line.
    fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = self.source();
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        text
    }
}

/// A connection to the agent's control port, past the handshake.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    /// The read and write timeout the socket has now.
    timeout: Duration,
    /// The caller's timeout for every request ([`Self::set_io_timeout`]), in place of each
    /// request's own [`Request::reply_timeout`].
    fixed_timeout: Option<Duration>,
}

impl AgentClient {
    /// Connects to the agent through husk-vmm's vsock Unix socket at `uds_path` and performs the
    /// handshake, retrying every [`CONNECT_RETRY_INTERVAL`] while the socket does not exist yet
    /// or the agent is not listening yet, for at most `timeout` in total.
    ///
    /// Returns the client and the agent's handshake. Each later request waits for its reply as
    /// long as [`Request::reply_timeout`] says, unless [`Self::set_io_timeout`] fixed a timeout.
    pub fn connect(
        uds_path: &Path,
        timeout: Duration,
    ) -> Result<(AgentClient, Handshake), ClientError> {
        Self::connect_port(uds_path, AGENT_VSOCK_PORT, timeout)
    }

    /// [`Self::connect`] to the agent's vsock `port` ([`AGENT_VSOCK_PORT`], or
    /// [`crate::AGENT_IDENTITY_PORT`] for the renewal of a restored guest).
    pub fn connect_port(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<(AgentClient, Handshake), ClientError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let err = match Self::try_connect(uds_path, port, deadline) {
                Ok(connected) => return Ok(connected),
                Err(err) => err,
            };
            let now = Instant::now();
            if !(err.is_retryable() || err.is_timeout()) {
                return Err(err);
            }
            if err.is_timeout() || now >= deadline {
                return Err(ClientError::Timeout {
                    path: uds_path.to_path_buf(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    last_error: err.chain(),
                });
            }
            std::thread::sleep(CONNECT_RETRY_INTERVAL.min(deadline - now));
        }
    }

    /// One connection attempt: `CONNECT`, `OK`, handshake, each bounded by `deadline`. The
    /// `CONNECT` line and the handshake go out in one write, one round trip: husk-vmm's vsock
    /// device passes the bytes after the line to the agent once it accepts (a refused attempt
    /// closes the socket, bytes and all).
    fn try_connect(
        uds_path: &Path,
        port: u32,
        deadline: Instant,
    ) -> Result<(AgentClient, Handshake), ClientError> {
        let mut stream = UnixStream::connect(uds_path).map_err(|source| ClientError::Connect {
            path: uds_path.to_path_buf(),
            source,
        })?;
        set_timeouts(&stream, remaining(deadline))?;
        let mut hello = format!("CONNECT {port}\n").into_bytes();
        write_frame(
            &mut hello,
            &Request::Handshake {
                protocol_version: PROTOCOL_VERSION,
            },
        )?;
        stream.write_all(&hello).map_err(ClientError::ConnectIo)?;
        read_connect_reply(&mut stream)?;
        set_timeouts(&stream, remaining(deadline))?;
        let mut client = AgentClient {
            stream,
            timeout: Duration::ZERO,
            fixed_timeout: None,
        };
        let handshake = match read_frame(&mut client.stream)? {
            Response::Handshake(handshake) => handshake,
            other => return Err(unexpected("handshake", &other)),
        };
        if handshake.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                host: PROTOCOL_VERSION,
                agent: handshake.protocol_version,
            });
        }
        client.use_timeout(REPLY_TIMEOUT)?;
        Ok((client, handshake))
    }

    /// Fixes the read and write timeout of every later request, whatever the request (a zero
    /// duration is raised to 1 ms).
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.fixed_timeout = Some(timeout);
        self.use_timeout(timeout)
    }

    /// Gives the socket `timeout`, unless it has it already.
    fn use_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        if timeout != self.timeout {
            set_timeouts(&self.stream, timeout)?;
            self.timeout = timeout;
        }
        Ok(())
    }

    /// Sends one request and reads its response, whatever its type ([`Response::Error`]
    /// included), waiting at most the request's [`Request::reply_timeout`] (or the timeout
    /// that [`Self::set_io_timeout`] fixed) for each read and write.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.use_timeout(
            self.fixed_timeout
                .unwrap_or_else(|| request.reply_timeout()),
        )?;
        write_frame(&mut self.stream, request)?;
        Ok(read_frame(&mut self.stream)?)
    }

    /// Asks the agent to shut the guest down; returns once the agent acknowledged. The VM goes
    /// away right after, so the connection is dropped.
    pub fn shutdown(mut self) -> Result<(), ClientError> {
        self.request_ok(&Request::Shutdown)
    }

    /// Gives a guest restored from a template its own identity ([`Request::Renew`]).
    pub fn renew(&mut self, renewal: crate::Renewal) -> Result<(), ClientError> {
        self.request_ok(&Request::Renew(renewal))
    }

    /// Switches the connection to the agent's raw echo mode and returns the stream: every byte
    /// written to it comes back until the host shuts down its write side. The stream keeps the
    /// client's I/O timeouts.
    pub fn into_echo(mut self) -> Result<UnixStream, ClientError> {
        self.request_ok(&Request::Echo)?;
        Ok(self.stream)
    }

    /// Turns the connection into a standard stream of a container process
    /// ([`Request::AttachStdio`]) and returns it: after the agent's `Ok` it carries the stream's
    /// raw bytes (stdout/stderr: read until end of stream; stdin: write, then shut down the
    /// write side for EOF; pty: both ways). The stream keeps the client's I/O timeouts; clear
    /// them with `set_read_timeout(None)` for long-running processes.
    pub fn into_stdio(mut self, attach: crate::AttachStdio) -> Result<UnixStream, ClientError> {
        self.request_ok(&Request::AttachStdio(attach))?;
        Ok(self.stream)
    }

    /// Sends a request that must be answered with [`Response::Ok`].
    fn request_ok(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.request(request)? {
            Response::Ok => Ok(()),
            other => Err(unexpected("ok", &other)),
        }
    }
}

/// Maps a response of the wrong type to an error; an agent error keeps its message.
fn unexpected(expected: &'static str, got: &Response) -> ClientError {
    match got {
        Response::Error { message } => ClientError::Agent {
            message: message.clone(),
        },
        other => ClientError::UnexpectedResponse {
            expected,
            got: other.kind(),
        },
    }
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means "none").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn set_timeouts(stream: &UnixStream, timeout: Duration) -> Result<(), ClientError> {
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    stream
        .set_read_timeout(timeout)
        .map_err(ClientError::Socket)?;
    stream
        .set_write_timeout(timeout)
        .map_err(ClientError::Socket)
}

/// Reads the VMM's `OK <port>\n` byte by byte (nothing past the newline may be consumed).
fn read_connect_reply(stream: &mut UnixStream) -> Result<u32, ClientError> {
    let mut line = Vec::with_capacity(CONNECT_REPLY_MAX_LEN);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ClientError::ClosedBeforeOk),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(ClientError::ConnectIo(err)),
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= CONNECT_REPLY_MAX_LEN {
            return Err(ClientError::ConnectReplyTooLong);
        }
    }
    parse_connect_reply(&line).ok_or_else(|| ClientError::BadConnectReply {
        line: String::from_utf8_lossy(&line).into_owned(),
    })
}

/// Parses `OK <port>\n` into the port.
fn parse_connect_reply(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_suffix('\n')?.strip_prefix("OK ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::read_frame_bytes;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    fn handshake(version: u32) -> Handshake {
        Handshake {
            protocol_version: version,
            agent_version: "test".into(),
            uptime_us: 1234,
            cpus: 2,
            mem_total_kib: 1000,
            mem_phys_kib: 1024,
        }
    }

    /// Reads the client's `CONNECT <port>\n` line.
    fn read_connect(stream: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).expect("read CONNECT") == 1 {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        String::from_utf8(line).expect("utf-8")
    }

    /// Plays a VMM plus an agent on one accepted connection: OK, then the handshake.
    fn serve_ok(stream: &mut UnixStream, version: u32) {
        assert_eq!(read_connect(stream), "CONNECT 1024\n");
        stream.write_all(b"OK 1073741824\n").expect("write OK");
        let req: Request = read_frame(stream).expect("handshake request");
        assert_eq!(
            req,
            Request::Handshake {
                protocol_version: PROTOCOL_VERSION
            }
        );
        write_frame(stream, &Response::Handshake(handshake(version))).expect("reply");
    }

    /// A fake VMM socket in a temp dir; `script` handles each accepted connection in turn.
    fn fake_vmm<F>(script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
    where
        F: FnMut(usize, UnixStream) -> bool + Send + 'static,
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = std::thread::spawn(move || {
            let mut script = script;
            for (i, stream) in listener.incoming().enumerate() {
                if !script(i, stream.expect("accept")) {
                    break;
                }
            }
        });
        (dir, path, handle)
    }

    #[test]
    fn connect_succeeds_and_returns_the_handshake() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            serve_ok(&mut stream, PROTOCOL_VERSION);
            let req: Request = read_frame(&mut stream).expect("shutdown request");
            assert_eq!(req, Request::Shutdown);
            write_frame(&mut stream, &Response::Ok).expect("reply");
            false
        });
        let (client, hs) = AgentClient::connect(&path, Duration::from_secs(5)).expect("connects");
        assert_eq!(hs, handshake(PROTOCOL_VERSION));
        client.shutdown().expect("shutdown acknowledged");
        server.join().expect("server thread");
    }

    #[test]
    fn connect_waits_for_the_socket_to_appear() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("late.sock");
        let server_path = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let listener = UnixListener::bind(&server_path).expect("bind");
            let (mut stream, _) = listener.accept().expect("accept");
            serve_ok(&mut stream, PROTOCOL_VERSION);
        });
        let (_client, hs) = AgentClient::connect(&path, Duration::from_secs(5)).expect("connects");
        assert_eq!(hs.uptime_us, 1234);
        server.join().expect("server thread");
    }

    #[test]
    fn connect_retries_after_the_vmm_drops_the_connection() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&attempts);
        let (_dir, path, server) = fake_vmm(move |i, mut stream| {
            seen.fetch_add(1, Ordering::SeqCst);
            match i {
                // Agent not listening: the VMM closes after reading CONNECT (EOF for the client).
                0 => {
                    read_connect(&mut stream);
                    true
                }
                // RST-like: closed with CONNECT unread, the client sees ECONNRESET or EOF.
                1 => {
                    std::thread::sleep(Duration::from_millis(20));
                    true
                }
                _ => {
                    serve_ok(&mut stream, PROTOCOL_VERSION);
                    false
                }
            }
        });
        let (_client, hs) =
            AgentClient::connect(&path, Duration::from_secs(5)).expect("connects on retry");
        assert_eq!(hs.protocol_version, PROTOCOL_VERSION);
        server.join().expect("server thread");
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn connect_times_out_when_ok_never_comes() {
        let (_dir, path, _server) = fake_vmm(|_, mut stream| {
            read_connect(&mut stream);
            std::thread::sleep(Duration::from_millis(500));
            false
        });
        let start = Instant::now();
        let err = AgentClient::connect(&path, Duration::from_millis(100)).expect_err("times out");
        assert!(start.elapsed() < Duration::from_millis(400));
        match &err {
            ClientError::Timeout {
                path: p,
                timeout_ms,
                last_error,
            } => {
                assert_eq!(p, &path);
                assert_eq!(*timeout_ms, 100);
                assert!(last_error.contains("CONNECT exchange"), "{last_error}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("vsock.sock") && text.contains("100 ms"),
            "{text}"
        );
    }

    #[test]
    fn connect_times_out_naming_a_missing_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("never.sock");
        let err = AgentClient::connect(&path, Duration::from_millis(30)).expect_err("times out");
        match err {
            ClientError::Timeout { last_error, .. } => {
                assert!(last_error.contains("never.sock"), "{last_error}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn connect_rejects_another_protocol_version() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            serve_ok(&mut stream, PROTOCOL_VERSION + 1);
            false
        });
        let err = AgentClient::connect(&path, Duration::from_secs(5)).expect_err("mismatch");
        assert!(
            matches!(err, ClientError::VersionMismatch { host, agent } if host == PROTOCOL_VERSION && agent == PROTOCOL_VERSION + 1),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn connect_rejects_a_bad_connect_reply_without_retrying() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            read_connect(&mut stream);
            stream.write_all(b"NOPE\n").expect("write");
            false
        });
        let err = AgentClient::connect(&path, Duration::from_secs(5)).expect_err("bad reply");
        assert!(
            matches!(&err, ClientError::BadConnectReply { line } if line == "NOPE\n"),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn connect_rejects_an_endless_connect_reply() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            read_connect(&mut stream);
            stream.write_all(&[b'O'; 200]).expect("write");
            false
        });
        let err = AgentClient::connect(&path, Duration::from_secs(5)).expect_err("too long");
        assert!(matches!(err, ClientError::ConnectReplyTooLong), "{err:?}");
        server.join().expect("server thread");
    }

    #[test]
    fn connect_rejects_a_non_handshake_reply() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            read_connect(&mut stream);
            stream.write_all(b"OK 5\n").expect("write");
            read_frame_bytes(&mut stream).expect("request");
            write_frame(&mut stream, &Response::Ok).expect("reply");
            false
        });
        let err = AgentClient::connect(&path, Duration::from_secs(5)).expect_err("wrong type");
        assert!(
            matches!(
                err,
                ClientError::UnexpectedResponse {
                    expected: "handshake",
                    got: "ok"
                }
            ),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn oversize_reply_is_rejected() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            read_connect(&mut stream);
            stream.write_all(b"OK 5\n").expect("write");
            read_frame_bytes(&mut stream).expect("request");
            stream.write_all(&u32::MAX.to_be_bytes()).expect("write");
            false
        });
        let err = AgentClient::connect(&path, Duration::from_secs(5)).expect_err("too large");
        assert!(
            matches!(err, ClientError::Frame(FrameError::TooLarge { .. })),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn echo_returns_the_raw_stream() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            serve_ok(&mut stream, PROTOCOL_VERSION);
            let req: Request = read_frame(&mut stream).expect("echo request");
            assert_eq!(req, Request::Echo);
            write_frame(&mut stream, &Response::Ok).expect("reply");
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).expect("echo data");
            stream.write_all(&buf).expect("echo back");
            false
        });
        let (client, _) = AgentClient::connect(&path, Duration::from_secs(5)).expect("connects");
        let mut raw = client.into_echo().expect("echo mode");
        raw.write_all(b"hello").expect("write");
        let mut back = [0u8; 5];
        raw.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"hello");
        server.join().expect("server thread");
    }

    #[test]
    fn agent_error_reply_keeps_its_message() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            serve_ok(&mut stream, PROTOCOL_VERSION);
            read_frame_bytes(&mut stream).expect("request");
            write_frame(
                &mut stream,
                &Response::Error {
                    message: "busy".into(),
                },
            )
            .expect("reply");
            false
        });
        let (client, _) = AgentClient::connect(&path, Duration::from_secs(5)).expect("connects");
        let err = client.shutdown().expect_err("refused");
        assert!(
            matches!(&err, ClientError::Agent { message } if message == "busy"),
            "{err:?}"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn each_request_waits_as_long_as_its_work_may_take_unless_the_caller_fixed_it() {
        let (_dir, path, server) = fake_vmm(|_, mut stream| {
            serve_ok(&mut stream, PROTOCOL_VERSION);
            while read_frame_bytes(&mut stream).is_ok() {
                write_frame(&mut stream, &Response::Ok).expect("reply");
            }
            false
        });
        let (mut client, _) =
            AgentClient::connect(&path, Duration::from_secs(5)).expect("connects");
        let waits = |client: &AgentClient| {
            let read = client.stream.read_timeout().expect("read timeout");
            let write = client.stream.write_timeout().expect("write timeout");
            assert_eq!(read, write);
            read
        };
        assert_eq!(waits(&client), Some(REPLY_TIMEOUT));
        let exec = Request::ExecProcess(crate::ExecProcess {
            id: "c".into(),
            exec_id: "e".into(),
            process: serde_json::json!({"args": ["true"]}),
            stdio: crate::StdioConfig::default(),
        });
        client.request(&exec).expect("exec");
        assert_eq!(waits(&client), Some(crate::SETUP_REPLY_TIMEOUT));
        let stats = Request::Stats { id: "c".into() };
        client.request(&stats).expect("stats");
        assert_eq!(waits(&client), Some(REPLY_TIMEOUT));
        client
            .set_io_timeout(Duration::from_secs(3))
            .expect("fixed timeout");
        client.request(&exec).expect("exec");
        assert_eq!(waits(&client), Some(Duration::from_secs(3)));
        drop(client);
        server.join().expect("server thread");
    }

    #[test]
    fn connect_reply_parser_accepts_only_ok_and_a_port() {
        assert_eq!(parse_connect_reply(b"OK 1024\n"), Some(1024));
        assert_eq!(parse_connect_reply(b"OK 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect_reply(b"OK 4294967296\n"), None);
        assert_eq!(parse_connect_reply(b"OK +1\n"), None);
        assert_eq!(parse_connect_reply(b"OK \n"), None);
        assert_eq!(parse_connect_reply(b"OK 12"), None);
        assert_eq!(parse_connect_reply(b"ERR 1\n"), None);
    }
}
