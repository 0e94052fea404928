//! The agent's listener: accepts connections (vsock in the guest, a Unix socket for tests on
//! the host) and serves each on its own thread.

use crate::container::Containers;
use crate::reaper::Reaper;
use crate::rpc::{handle_frame, After};
use crate::sys;
use husk_agent_protocol::{
    read_frame_bytes, write_frame, FrameError, Response, AGENT_READY_PORT, AGENT_VSOCK_PORT,
};
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, getpeername, listen, setsockopt, socket, sockopt, AddressFamily,
    Backlog, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most connections served at once; more are refused with an error reply.
pub const MAX_CONNECTIONS: usize = 64;

/// Size of the echo buffer: one read of up to this much, then all of it written back.
pub const ECHO_BUF_LEN: usize = 64 * 1024;

/// How long a shutdown waits for the host to close the connection that asked for it.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// Longest `CONNECT <port>\n` line the Unix test listener accepts.
const CONNECT_LINE_MAX_LEN: usize = 64;

/// Stack of a connection thread; the echo buffer lives on the heap.
const CONNECTION_STACK_SIZE: usize = 256 * 1024;

/// Errors of setting up a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The vsock socket could not be created.
    #[error("creating the vsock socket failed")]
    VsockSocket(#[source] Errno),
    /// The vsock port could not be bound.
    #[error("binding vsock port {port} failed")]
    VsockBind {
        port: u32,
        #[source]
        errno: Errno,
    },
    /// The socket could not listen.
    #[error("listening failed")]
    Listen(#[source] Errno),
    /// The Unix test socket could not be bound.
    #[error("binding Unix socket {} failed", path.display())]
    UnixBind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A connected stream the server can serve.
pub trait Connection: Read + Write + Send + 'static {
    /// Sets the timeout of later reads (`None`: block forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// A second descriptor of the same stream (an attached stdio stream outlives the
    /// connection's thread).
    fn try_clone_file(&self) -> io::Result<File>;
}

/// A source of connections.
pub trait Listener {
    type Conn: Connection;

    /// Waits for the next connection.
    fn accept(&self) -> io::Result<Self::Conn>;

    /// Runs on the connection's thread before any frame (e.g. a transport preamble).
    fn prepare(&self, _conn: &mut Self::Conn) -> io::Result<()> {
        Ok(())
    }
}

/// A listening `AF_VSOCK` stream socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    /// The connection attempt that told the host we listen (see [`Self::bind`]); kept open so
    /// its REQUEST is not withdrawn before it leaves. The host refuses it.
    _ready_signal: Option<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` for any CID (`VMADDR_CID_ANY`), then tells the host so by starting a
    /// connection to host port [`AGENT_READY_PORT`]: husk-vmm holds host clients' connections
    /// until that signal instead of letting them poll the booting guest. The signal is best
    /// effort (a host without it just sees a refused connection); a host that never gets it
    /// still reaches the agent through clients that connect and retry.
    pub fn bind(port: u32) -> Result<Self, ServerError> {
        let mut listener = Self::bind_quiet(port)?;
        listener._ready_signal = signal_ready();
        Ok(listener)
    }

    /// Listens on `port` without telling the host (the identity port of a restored guest,
    /// [`husk_agent_protocol::AGENT_IDENTITY_PORT`], which the host reaches before the signal).
    pub fn bind_quiet(port: u32) -> Result<Self, ServerError> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(ServerError::VsockSocket)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(|errno| ServerError::VsockBind { port, errno })?;
        let backlog = Backlog::new(MAX_CONNECTIONS as i32).map_err(ServerError::Listen)?;
        listen(&fd, backlog).map_err(ServerError::Listen)?;
        Ok(Self {
            fd,
            _ready_signal: None,
        })
    }
}

/// Signals readiness once more (a guest restored from a template, once renewed): the host
/// holds its clients' connections again after a restore. The signal's socket is kept until the
/// next one.
pub fn signal_ready_again() {
    static SIGNAL: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);
    let fd = signal_ready();
    *SIGNAL.lock().unwrap_or_else(|p| p.into_inner()) = fd;
}

/// Starts a non-blocking connection to the host's [`AGENT_READY_PORT`]; the REQUEST it sends is
/// the signal. Returns the socket, or `None` (logged) if the attempt failed at once.
fn signal_ready() -> Option<OwnedFd> {
    let fd = match socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) {
        Ok(fd) => fd,
        Err(errno) => {
            crate::log_warn!("ready signal: vsock socket failed: {errno}");
            return None;
        }
    };
    let host = VsockAddr::new(libc::VMADDR_CID_HOST, AGENT_READY_PORT);
    match connect(fd.as_raw_fd(), &host) {
        // In progress (the usual answer) or already refused: the REQUEST went out either way.
        Ok(()) | Err(Errno::EINPROGRESS | Errno::ECONNRESET | Errno::ECONNREFUSED) => Some(fd),
        Err(errno) => {
            crate::log_warn!(
                "ready signal: connecting to host port {AGENT_READY_PORT} failed: {errno}"
            );
            None
        }
    }
}

impl Listener for VsockListener {
    type Conn = VsockStream;

    fn accept(&self) -> io::Result<VsockStream> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Only the host may drive the agent. A process inside the guest (a container) could
        // otherwise reach this port through a guest-local vsock transport.
        let peer: VsockAddr = getpeername(fd.as_raw_fd())?;
        if peer.cid() != libc::VMADDR_CID_HOST {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refused a vsock connection from CID {} (only the host, CID {}, may connect)",
                    peer.cid(),
                    libc::VMADDR_CID_HOST
                ),
            ));
        }
        Ok(VsockStream {
            file: File::from(fd),
        })
    }
}

/// A connected vsock stream (read(2)/write(2) through a `File`).
#[derive(Debug)]
pub struct VsockStream {
    file: File,
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero timeval means "no timeout" to SO_RCVTIMEO, so a requested zero becomes 1 us.
        let t = timeout.map_or(Duration::ZERO, |t| t.max(Duration::from_micros(1)));
        let tv = TimeVal::new(
            i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            i64::from(t.subsec_micros()),
        );
        setsockopt(&self.file, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl Connection for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout.map(|t| t.max(Duration::from_micros(1))))
    }

    fn try_clone_file(&self) -> io::Result<File> {
        Ok(File::from(OwnedFd::from(self.try_clone()?)))
    }
}

/// A Unix socket that behaves like husk-vmm's vsock socket in front of the agent: each
/// connection starts with `CONNECT 1024\n`, answered `OK 1024\n`. Lets the host-side client and
/// tests talk to a real agent without a VM (`husk-agent --serve-unix PATH`).
#[derive(Debug)]
pub struct UnixTestListener {
    listener: UnixListener,
}

impl UnixTestListener {
    /// Binds `path` (which must not exist).
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let listener = UnixListener::bind(path).map_err(|source| ServerError::UnixBind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { listener })
    }
}

impl Listener for UnixTestListener {
    type Conn = UnixStream;

    fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(stream, _)| stream)
    }

    fn prepare(&self, conn: &mut UnixStream) -> io::Result<()> {
        let mut line = Vec::with_capacity(CONNECT_LINE_MAX_LEN);
        let mut byte = [0u8; 1];
        while line.len() < CONNECT_LINE_MAX_LEN && !line.ends_with(b"\n") {
            if conn.read(&mut byte)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            line.extend_from_slice(&byte);
        }
        if line != format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected CONNECT to the agent port",
            ));
        }
        conn.write_all(format!("OK {AGENT_VSOCK_PORT}\n").as_bytes())
    }
}

/// What a shutdown request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// In the guest: sync before the reply, then reset the VM (see [`sys::reset_vm`]).
    ResetVm,
    /// Outside a guest (tests): exit the process with status 0.
    ExitProcess,
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Server {
    pub shutdown_mode: ShutdownMode,
    /// The reaper, for the operations that start processes.
    pub reaper: Option<Arc<Reaper>>,
    /// The containers (only with a reaper).
    pub containers: Option<Containers>,
    active: AtomicUsize,
}

impl Server {
    pub fn new(shutdown_mode: ShutdownMode, reaper: Option<Arc<Reaper>>) -> Arc<Self> {
        let containers = reaper.as_ref().map(|r| Containers::new(Arc::clone(r)));
        Arc::new(Self {
            shutdown_mode,
            reaper,
            containers,
            active: AtomicUsize::new(0),
        })
    }

    /// Connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Takes a connection slot, or `None` when [`MAX_CONNECTIONS`] are in use.
    fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }
}

/// One taken connection slot, given back on drop.
struct ConnectionSlot(Arc<Server>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections forever, each served on its own thread. Errors are logged, never fatal.
pub fn serve<L>(listener: L, server: Arc<Server>) -> !
where
    L: Listener + Send + Sync + 'static,
{
    let listener = Arc::new(listener);
    loop {
        let mut conn = match listener.accept() {
            Ok(conn) => conn,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                crate::log_warn!("{err}");
                continue;
            }
            Err(err) => {
                crate::log_error!("accept failed: {err}");
                // Out of descriptors or memory: give the other connections time to finish
                // instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(slot) = server.try_acquire() else {
            crate::log_warn!("refusing a connection: {MAX_CONNECTIONS} already open");
            let _ = write_frame(
                &mut conn,
                &Response::Error {
                    message: format!("too many connections (limit {MAX_CONNECTIONS})"),
                },
            );
            continue;
        };
        let thread_listener = Arc::clone(&listener);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(CONNECTION_STACK_SIZE)
            .spawn(move || {
                if let Err(err) = thread_listener.prepare(&mut conn) {
                    crate::log_warn!("dropping a connection before its first request: {err}");
                    return;
                }
                serve_connection(&mut conn, &slot.0);
                drop(slot);
            });
        if let Err(err) = spawned {
            crate::log_error!("spawning a connection thread failed: {err}");
        }
    }
}

/// Serves framed requests on one connection until the peer closes it (or it turns into an echo,
/// or the guest shuts down).
pub fn serve_connection<C: Connection>(conn: &mut C, server: &Server) {
    loop {
        let body = match read_frame_bytes(conn) {
            Ok(body) => body,
            Err(FrameError::Closed) => return,
            Err(err) => {
                crate::log_warn!("closing a connection: {err}");
                return;
            }
        };
        let reply = handle_frame(&body, server.containers.as_ref());
        if matches!(reply.after, After::Shutdown) && server.shutdown_mode == ShutdownMode::ResetVm {
            // Before the reply, which tells the host that nothing written in the guest is
            // left in its caches: the host may end the VM as soon as it reads it.
            nix::unistd::sync();
        }
        if let Err(err) = write_frame(conn, &reply.response) {
            crate::log_warn!("closing a connection, reply not sent: {err}");
            return;
        }
        match reply.after {
            After::Attach(job) => {
                match conn.try_clone_file() {
                    Ok(file) => job.run(file),
                    Err(err) => crate::log_error!("attaching a stream failed: {err}"),
                }
                return;
            }
            After::Continue => {}
            After::Echo => {
                if let Err(err) = echo(conn) {
                    crate::log_warn!("echo connection failed: {err}");
                }
                return;
            }
            After::Shutdown => shut_down(conn, server.shutdown_mode),
        }
    }
}

/// Writes back everything read, until end of stream.
pub fn echo<C: Read + Write>(conn: &mut C) -> io::Result<u64> {
    let mut buf = vec![0u8; ECHO_BUF_LEN];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        let data = buf.get(..n).unwrap_or(&[]);
        conn.write_all(data)?;
        total += n as u64;
    }
}

/// Ends the agent after the shutdown reply was written.
fn shut_down<C: Connection>(conn: &mut C, mode: ShutdownMode) -> ! {
    match mode {
        ShutdownMode::ExitProcess => std::process::exit(0),
        ShutdownMode::ResetVm => {
            // Synced before the reply (see `serve_connection`). The reply sits in the guest's
            // vsock queue; a reset now could beat it to the host. The host closes the
            // connection once it has read the reply (or ends the VM itself), so wait for that
            // (bounded), then reset.
            wait_for_peer_close(conn, SHUTDOWN_LINGER);
            let errno = sys::reset_vm();
            crate::log_error!("i8042 reset failed ({errno}); falling back to reboot(2)");
            let errno = sys::reboot_autoboot();
            crate::log_error!("reboot failed ({errno}); exiting, which panics the kernel");
            // PID 1 exiting panics the kernel; with panic=-1 it reboots at once and the VMM
            // sees the VM end (as a crash).
            std::process::exit(1)
        }
    }
}

/// Reads and drops whatever the peer sends until it closes or `linger` has passed.
fn wait_for_peer_close<C: Connection>(conn: &mut C, linger: Duration) {
    let deadline = Instant::now() + linger;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_agent_protocol::{read_frame, Request, PROTOCOL_VERSION};
    use std::net::Shutdown;

    fn test_server() -> Arc<Server> {
        Server::new(ShutdownMode::ExitProcess, None)
    }

    #[test]
    fn connection_serves_requests_until_the_peer_closes() {
        let (mut host, mut guest) = UnixStream::pair().expect("socket pair");
        let server = test_server();
        let thread = std::thread::spawn(move || serve_connection(&mut guest, &server));
        write_frame(
            &mut host,
            &Request::Handshake {
                protocol_version: PROTOCOL_VERSION,
            },
        )
        .expect("write");
        let resp: Response = read_frame(&mut host).expect("handshake reply");
        assert!(matches!(resp, Response::Handshake(hs) if hs.protocol_version == PROTOCOL_VERSION));
        host.write_all(&5u32.to_be_bytes()).expect("write");
        host.write_all(b"{bad}").expect("write");
        let resp: Response = read_frame(&mut host).expect("error reply");
        assert!(matches!(resp, Response::Error { .. }));
        host.shutdown(Shutdown::Write).expect("shutdown");
        thread.join().expect("connection thread");
        assert!(matches!(
            read_frame::<_, Response>(&mut host),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversize_frame_closes_the_connection() {
        let (mut host, mut guest) = UnixStream::pair().expect("socket pair");
        let server = test_server();
        let thread = std::thread::spawn(move || serve_connection(&mut guest, &server));
        host.write_all(&u32::MAX.to_be_bytes()).expect("write");
        thread.join().expect("connection thread");
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).expect("read");
        assert!(rest.is_empty());
    }

    #[test]
    fn echo_mode_returns_every_byte_then_closes() {
        let (mut host, mut guest) = UnixStream::pair().expect("socket pair");
        let server = test_server();
        let thread = std::thread::spawn(move || serve_connection(&mut guest, &server));
        write_frame(&mut host, &Request::Echo).expect("write");
        let resp: Response = read_frame(&mut host).expect("reply");
        assert_eq!(resp, Response::Ok);

        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = host.try_clone().expect("clone");
        let sent = data.clone();
        let feeder = std::thread::spawn(move || {
            writer.write_all(&sent).expect("write");
            writer.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::new();
        host.read_to_end(&mut back).expect("read back");
        feeder.join().expect("feeder");
        thread.join().expect("connection thread");
        assert_eq!(back.len(), data.len());
        assert!(back == data);
    }

    #[test]
    fn connection_slots_are_bounded_and_returned() {
        let server = test_server();
        let slots: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| server.try_acquire().expect("slot"))
            .collect();
        assert_eq!(server.active_connections(), MAX_CONNECTIONS);
        assert!(server.try_acquire().is_none());
        drop(slots);
        assert_eq!(server.active_connections(), 0);
        assert!(server.try_acquire().is_some());
    }

    #[test]
    fn unix_test_listener_answers_connect_like_the_vmm() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.sock");
        let listener = UnixTestListener::bind(&path).expect("bind");
        let mut host = UnixStream::connect(&path).expect("connect");
        let mut conn = listener.accept().expect("accept");
        host.write_all(b"CONNECT 1024\n").expect("write");
        listener.prepare(&mut conn).expect("prepare");
        let mut ok = [0u8; 8];
        host.read_exact(&mut ok).expect("read");
        assert_eq!(&ok, b"OK 1024\n");

        let mut other = UnixStream::connect(&path).expect("connect");
        let mut conn = listener.accept().expect("accept");
        other.write_all(b"CONNECT 22\n").expect("write");
        let err = listener.prepare(&mut conn).expect_err("wrong port");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn peer_close_ends_the_shutdown_linger_early() {
        let (host, mut guest) = UnixStream::pair().expect("socket pair");
        drop(host);
        let start = Instant::now();
        wait_for_peer_close(&mut guest, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1));

        let (_host, mut guest) = UnixStream::pair().expect("socket pair");
        let start = Instant::now();
        wait_for_peer_close(&mut guest, Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
