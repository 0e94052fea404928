//! The Unix-socket host backend of the vsock device.
//!
//! One listener at `uds_path`: a host client connects and writes `CONNECT <port>\n`; once the
//! guest accepts, the client reads `OK <host-port>\n` and the stream then carries the
//! connection's bytes. If the guest refuses (no listener on the port), the client's socket is
//! closed. Guest-initiated connections to host port P connect to `<uds_path>_P`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};

use super::muxer::VsockMuxer;
use super::packet::VsockPacket;
use super::{VsockBackend, VsockError};

/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What one read of a pending client's line gave.
enum LineStatus {
    Incomplete,
    Connect(u32),
    Invalid,
}

/// The Unix-socket host side of a vsock device.
#[derive(Debug)]
pub struct VsockUnixBackend {
    uds_path: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, PendingClient>,
    muxer: VsockMuxer,
    registered: bool,
}

impl VsockUnixBackend {
    /// Binds the listener at `uds_path`; fails if the path exists or its folder is missing.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::SocketPathExists(uds_path.to_path_buf()));
        }
        let listener = UnixListener::bind(uds_path).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                VsockError::SocketPathExists(uds_path.to_path_buf())
            } else {
                VsockError::Bind(uds_path.to_path_buf(), e)
            }
        })?;
        let backend = Self {
            uds_path: uds_path.to_path_buf(),
            listener,
            pending: HashMap::new(),
            muxer: VsockMuxer::new(guest_cid),
            registered: false,
        };
        // From here on, Drop removes the socket file.
        backend
            .listener
            .set_nonblocking(true)
            .map_err(VsockError::Listener)?;
        Ok(backend)
    }

    /// The listener's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The connection table.
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// The connection table, to adjust its limits.
    pub fn muxer_mut(&mut self) -> &mut VsockMuxer {
        &mut self.muxer
    }

    /// The socket guest-initiated connections to host port `port` go to.
    pub fn guest_port_path(&self, port: u32) -> PathBuf {
        guest_port_path(&self.uds_path, port)
    }

    fn accept_clients(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let limit = self.muxer.max_connections();
                    if self.pending.len() + self.muxer.connection_count() >= limit {
                        warn!("vsock: connection limit reached, dropping a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: failed to configure a host client: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                        warn!("vsock: failed to watch a host client: {e:?}");
                        continue;
                    }
                    self.pending.insert(
                        fd,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn read_connect_line(client: &mut PendingClient) -> LineStatus {
        // One byte at a time, so no byte after the newline (connection data) is consumed.
        let mut byte = [0u8; 1];
        loop {
            match client.stream.read(&mut byte) {
                Ok(0) => return LineStatus::Invalid,
                Ok(_) if byte[0] == b'\n' => return parse_connect_line(&client.line),
                Ok(_) => {
                    client.line.push(byte[0]);
                    if client.line.len() > MAX_CONNECT_LINE {
                        return LineStatus::Invalid;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineStatus::Incomplete,
                Err(_) => return LineStatus::Invalid,
            }
        }
    }

    fn handle_pending_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.pending.get_mut(&fd) else {
            return;
        };
        let status = Self::read_connect_line(client);
        if matches!(status, LineStatus::Incomplete) {
            return;
        }
        if let Err(e) = ops.remove(Events::new_raw(fd, EventSet::empty())) {
            warn!("vsock: failed to unwatch a host client: {e:?}");
        }
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        match status {
            LineStatus::Connect(port) => {
                if let Err(e) = self.muxer.add_local_connection(client.stream, port, ops) {
                    warn!("vsock: host connection to port {port} refused: {e}");
                }
            }
            _ => debug!("vsock: host client sent an invalid CONNECT line"),
        }
    }
}

/// `<uds_path>_<port>`.
fn guest_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_os_string();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Parses `CONNECT <port>` (without the newline).
fn parse_connect_line(line: &[u8]) -> LineStatus {
    let Ok(text) = std::str::from_utf8(line) else {
        return LineStatus::Invalid;
    };
    let text = text.strip_suffix('\r').unwrap_or(text);
    match text
        .strip_prefix("CONNECT ")
        .map(|p| p.trim().parse::<u32>())
    {
        Some(Ok(port)) => LineStatus::Connect(port),
        _ => LineStatus::Invalid,
    }
}

impl VsockBackend for VsockUnixBackend {
    fn register(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.muxer.register(ops) {
            warn!("vsock: connection deadlines disabled: {e}");
        }
        if self.registered {
            return;
        }
        match ops.add(Events::new(&self.listener, EventSet::IN)) {
            Ok(()) => self.registered = true,
            Err(e) => warn!("vsock: failed to watch the listener: {e:?}"),
        }
    }

    fn send_pkt(&mut self, pkt: VsockPacket, ops: &mut EventOps) {
        let uds_path = &self.uds_path;
        // A Unix connect completes at once unless the listener's backlog is full, in which
        // case it waits for the host side (trusted) to accept.
        let mut connect = |port: u32| UnixStream::connect(guest_port_path(uds_path, port));
        self.muxer.handle_guest_pkt(pkt, ops, &mut connect);
    }

    fn recv_pkt(&mut self, max_data_len: usize, ops: &mut EventOps) -> Option<VsockPacket> {
        self.muxer.recv_pkt(max_data_len, ops)
    }

    fn has_pending_rx(&self) -> bool {
        self.muxer.has_pending_rx()
    }

    fn reset(&mut self, ops: &mut EventOps) {
        self.muxer.reset(ops);
    }

    fn handle_event(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_clients(ops);
        } else if self.pending.contains_key(&fd) {
            self.handle_pending_client(fd, ops);
        } else if !self.muxer.handle_host_event(fd, events.event_set(), ops) {
            debug!(fd, "vsock: event for an unknown fd");
        }
    }
}

impl Drop for VsockUnixBackend {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            debug!("vsock: failed to remove {}: {e}", self.uds_path.display());
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert!(matches!(
            parse_connect_line(b"CONNECT 1024"),
            LineStatus::Connect(1024)
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 52\r"),
            LineStatus::Connect(52)
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT"),
            LineStatus::Invalid
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT -1"),
            LineStatus::Invalid
        ));
        assert!(matches!(
            parse_connect_line(b"connect 5"),
            LineStatus::Invalid
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 99999999999"),
            LineStatus::Invalid
        ));
        assert!(matches!(
            parse_connect_line(&[0xff, 0xfe]),
            LineStatus::Invalid
        ));
    }

    #[test]
    fn new_fails_if_path_exists_and_drop_removes_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let backend = VsockUnixBackend::new(3, &path).unwrap();
        assert!(path.exists());
        assert!(matches!(
            VsockUnixBackend::new(3, &path),
            Err(VsockError::SocketPathExists(_))
        ));
        assert_eq!(backend.guest_port_path(52), dir.path().join("v.sock_52"));
        drop(backend);
        assert!(!path.exists());
    }

    #[test]
    fn new_fails_if_folder_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("v.sock");
        assert!(matches!(
            VsockUnixBackend::new(3, &path),
            Err(VsockError::Bind(_, _))
        ));
    }
}
