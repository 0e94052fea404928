//! The connection table: routes guest packets to connections, collects guest-bound packets in
//! a bounded backlog, and keeps each host stream's epoll registration in step with what its
//! connection waits for.
//!
//! Readiness gate ([`VsockMuxer::hold_until_ready`]): a host client usually connects before
//! the guest's agent listens. Without the gate, each attempt becomes a REQUEST that the booting
//! guest has to take an interrupt for and refuse with a RST, and the client retries every few
//! milliseconds, interrupting the guest's single vCPU all through its boot. With the gate,
//! host-initiated connections wait in the table, silently, until the guest opens a connection
//! to the gate's host port (the agent does so once it listens; the muxer refuses that
//! connection with a RST, having taken note); then their REQUESTs go out. The guest controls
//! only when its own connections proceed: a guest that never says so leaves them to time out
//! on the client side, as a guest that never listens does. A device reset closes the gate again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::VsockConnection;
use super::packet::VsockPacket;
use super::{
    VsockError, CONN_DRAIN_TIMEOUT, CONN_REQUEST_TIMEOUT, CONN_SWEEP_INTERVAL,
    LOCAL_PORT_RANGE_START, MAX_CONNECTIONS, MAX_PENDING_RESETS, VSOCK_HOST_CID, VSOCK_OP_REQUEST,
    VSOCK_OP_RST,
};
use crate::devices::virtio::RateLimitedLog;

/// Whether the host client of `stream` has closed its end (a non-blocking peek reads EOF).
fn client_gone(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        nix::sys::socket::recv(
            stream.as_raw_fd(),
            &mut byte,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ),
        Ok(0)
    )
}

/// A connection's identity: our (host-side) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// The connection table of one vsock device.
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    conns: HashMap<ConnKey, VsockConnection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    /// Connections that may have packets for the guest, oldest first, each at most once.
    rx_backlog: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    /// Resets for guest packets that matched no connection.
    resets: VecDeque<VsockPacket>,
    next_local_port: u32,
    /// How many reset replies were dropped because the queue was full.
    pub dropped_resets: u64,
    /// Limits warnings the guest can trigger.
    guest_warn_log: RateLimitedLog,
    max_connections: usize,
    request_timeout: Duration,
    drain_timeout: Duration,
    /// Fires every [`CONN_SWEEP_INTERVAL`] to expire connections past their deadline.
    sweep_timer: Option<TimerFd>,
    /// The readiness gate's host port, if the gate is on (see the module docs).
    ready_port: Option<u32>,
    /// Whether the guest has connected to `ready_port` since the last reset.
    guest_ready: bool,
    /// Host-initiated connections whose REQUEST waits for the gate, oldest first.
    held: VecDeque<ConnKey>,
    /// A guest port that host connections reach even while the gate is closed (the agent's
    /// identity port, for the renewal of a restored guest).
    gate_exempt_port: Option<u32>,
}

impl VsockMuxer {
    /// An empty table for the guest `guest_cid`.
    pub fn new(guest_cid: u64) -> Self {
        Self {
            guest_cid,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            rx_backlog: VecDeque::new(),
            rx_queued: HashSet::new(),
            resets: VecDeque::new(),
            next_local_port: LOCAL_PORT_RANGE_START,
            dropped_resets: 0,
            guest_warn_log: RateLimitedLog::default(),
            max_connections: MAX_CONNECTIONS,
            request_timeout: CONN_REQUEST_TIMEOUT,
            drain_timeout: CONN_DRAIN_TIMEOUT,
            sweep_timer: None,
            ready_port: None,
            guest_ready: false,
            held: VecDeque::new(),
            gate_exempt_port: None,
        }
    }

    /// Lets host connections to guest port `port` through while the gate is closed.
    pub fn exempt_from_gate(&mut self, port: u32) {
        self.gate_exempt_port = Some(port);
    }

    /// Turns the readiness gate on: host-initiated connections wait until the guest connects
    /// to host port `port` (which is then never forwarded to a host socket).
    pub fn hold_until_ready(&mut self, port: u32) {
        self.ready_port = Some(port);
    }

    /// Whether host-initiated connections may reach the guest now.
    pub fn gate_open(&self) -> bool {
        self.ready_port.is_none() || self.guest_ready
    }

    /// How many host-initiated connections wait for the gate.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// The guest said it listens: release the held connections' REQUESTs, oldest first.
    fn open_gate(&mut self, ops: &mut EventOps) {
        if !self.guest_ready {
            debug!(
                held = self.held.len(),
                "vsock: the guest is ready for host connections"
            );
        }
        self.guest_ready = true;
        while let Some(key) = self.held.pop_front() {
            if self
                .conns
                .get(&key)
                .is_some_and(|c| client_gone(c.stream()))
            {
                // The client gave up while it waited (e.g. a connect timeout): the guest
                // never hears of it.
                debug!(?key, "vsock: held client left before the guest was ready");
                self.remove(key, ops);
                continue;
            }
            self.sync(key, ops);
        }
    }

    /// Drops held connections whose clients have left, so clients that retry with short
    /// timeouts while the guest boots do not pile up.
    fn prune_held(&mut self, ops: &mut EventOps) {
        let gone: Vec<ConnKey> = self
            .held
            .iter()
            .filter(|k| self.conns.get(k).is_none_or(|c| client_gone(c.stream())))
            .copied()
            .collect();
        for key in gone {
            self.remove(key, ops);
        }
    }

    /// Starts the periodic deadline check on the device thread.
    pub fn register(&mut self, ops: &mut EventOps) -> Result<(), VsockError> {
        if self.sweep_timer.is_some() {
            return Ok(());
        }
        let mut timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        timer
            .reset(CONN_SWEEP_INTERVAL, Some(CONN_SWEEP_INTERVAL))
            .map_err(|e| VsockError::Timer(e.into()))?;
        ops.add(Events::new(&timer, EventSet::IN))
            .map_err(|e| VsockError::Timer(io::Error::other(format!("{e:?}"))))?;
        self.sweep_timer = Some(timer);
        Ok(())
    }

    /// Changes how long a delivered REQUEST may go unanswered and how long a closed
    /// connection may take to drain (defaults [`CONN_REQUEST_TIMEOUT`], [`CONN_DRAIN_TIMEOUT`]).
    pub fn set_timeouts(&mut self, request_timeout: Duration, drain_timeout: Duration) {
        self.request_timeout = request_timeout;
        self.drain_timeout = drain_timeout;
    }

    /// Expires every connection whose deadline is at or before `now`.
    pub fn sweep(&mut self, now: Instant, ops: &mut EventOps) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            debug!(?key, "vsock: connection deadline passed");
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire();
            }
            self.sync(key, ops);
        }
    }

    /// Lowers the connection limit (default [`MAX_CONNECTIONS`]).
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.min(MAX_CONNECTIONS);
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The connection `key`, if live.
    pub fn connection(&self, key: ConnKey) -> Option<&VsockConnection> {
        self.conns.get(&key)
    }

    /// Whether `fd` is a connection's host stream.
    pub fn owns_fd(&self, fd: RawFd) -> bool {
        self.fd_keys.contains_key(&fd)
    }

    fn queue_reset(&mut self, pkt: VsockPacket) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            self.resets.pop_front();
            self.dropped_resets += 1;
        }
        self.resets.push_back(pkt);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match self.next_local_port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => LOCAL_PORT_RANGE_START,
            };
            if !self.conns.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return Some(port);
            }
        }
        None
    }

    /// Adds a host-initiated connection to guest port `peer_port` over `stream`; a REQUEST
    /// goes to the guest. Returns the host-side port.
    pub fn add_local_connection(
        &mut self,
        stream: UnixStream,
        peer_port: u32,
        ops: &mut EventOps,
    ) -> Result<u32, VsockError> {
        if !self.held.is_empty() {
            self.prune_held(ops);
        }
        if self.conns.len() >= self.max_connections {
            return Err(VsockError::TooManyConnections);
        }
        let local_port = self
            .alloc_local_port(peer_port)
            .ok_or(VsockError::NoFreePort)?;
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = VsockConnection::new_local_init(stream, self.guest_cid, local_port, peer_port);
        if !self.gate_open() && self.gate_exempt_port != Some(peer_port) {
            self.held.push_back(key);
        }
        self.insert(key, conn, ops);
        Ok(local_port)
    }

    fn insert(&mut self, key: ConnKey, conn: VsockConnection, ops: &mut EventOps) {
        self.fd_keys.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.sync(key, ops);
    }

    /// Handles a validated packet from the guest. `connect` opens the host socket for a
    /// guest-initiated connection to host port `port`.
    pub fn handle_guest_pkt(
        &mut self,
        pkt: VsockPacket,
        ops: &mut EventOps,
        connect: &mut dyn FnMut(u32) -> io::Result<UnixStream>,
    ) {
        let hdr = pkt.hdr;
        if hdr.dst_cid != VSOCK_HOST_CID {
            // Only the host is reachable from this device.
            if hdr.op != VSOCK_OP_RST {
                self.queue_reset(VsockPacket::rst_reply_to(&hdr));
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            if hdr.op == VSOCK_OP_REQUEST {
                // A new connection reusing a live key: the old one is gone on the guest side.
                debug!(?key, "vsock: request for an existing connection");
                self.remove(key, ops);
                self.queue_reset(VsockPacket::rst_reply_to(&hdr));
                return;
            }
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.send_pkt(&pkt);
                if conn.is_draining() && conn.deadline().is_none() {
                    conn.set_deadline(Some(Instant::now() + self.drain_timeout));
                }
            }
            self.sync(key, ops);
            return;
        }
        match hdr.op {
            VSOCK_OP_REQUEST if Some(hdr.dst_port) == self.ready_port => {
                // The readiness signal: noted, and refused (there is nothing to connect to).
                self.open_gate(ops);
                self.queue_reset(VsockPacket::rst_reply_to(&hdr));
            }
            VSOCK_OP_REQUEST => {
                if self.conns.len() >= self.max_connections {
                    if self.guest_warn_log.should_log() {
                        warn!("vsock: connection limit reached, refusing a guest connection");
                    }
                    self.queue_reset(VsockPacket::rst_reply_to(&hdr));
                    return;
                }
                match connect(hdr.dst_port).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                    Ok(stream) => {
                        let conn = VsockConnection::new_peer_init(
                            stream,
                            self.guest_cid,
                            hdr.dst_port,
                            hdr.src_port,
                            hdr.buf_alloc,
                            hdr.fwd_cnt,
                        );
                        self.insert(key, conn, ops);
                    }
                    Err(e) => {
                        debug!(port = hdr.dst_port, "vsock: guest connection refused: {e}");
                        self.queue_reset(VsockPacket::rst_reply_to(&hdr));
                    }
                }
            }
            VSOCK_OP_RST => {}
            _ => self.queue_reset(VsockPacket::rst_reply_to(&hdr)),
        }
    }

    /// An epoll event on a connection's host stream or the deadline timer; false if `fd` is
    /// neither.
    pub fn handle_host_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) -> bool {
        if let Some(timer) = self.sweep_timer.as_mut().filter(|t| t.as_raw_fd() == fd) {
            if let Err(e) = timer.wait() {
                debug!("vsock: timer read failed: {e}");
            }
            self.sweep(Instant::now(), ops);
            return true;
        }
        let Some(&key) = self.fd_keys.get(&fd) else {
            return false;
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.notify(events);
        }
        self.sync(key, ops);
        true
    }

    /// Brings `key`'s epoll registration and backlog entry in line with its state, and drops
    /// it if it is finished.
    fn sync(&mut self, key: ConnKey, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_dead() {
            self.remove(key, ops);
            return;
        }
        let want = conn.interest();
        let fd = conn.stream().as_raw_fd();
        let result = match conn.registered {
            None if want.is_empty() => Ok(()),
            None => ops.add(Events::new_raw(fd, want)),
            Some(_) if want.is_empty() => ops.remove(Events::new_raw(fd, EventSet::empty())),
            Some(have) if have == want => Ok(()),
            Some(_) => ops.modify(Events::new_raw(fd, want)),
        };
        match result {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                warn!(?key, "vsock: epoll update failed: {e:?}");
                conn.kill(true);
            }
        }
        if conn.has_pending_rx() && !self.held.contains(&key) && self.rx_queued.insert(key) {
            self.rx_backlog.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream().as_raw_fd();
            if conn.registered.is_some() {
                if let Err(e) = ops.remove(Events::new_raw(fd, EventSet::empty())) {
                    warn!(?key, "vsock: epoll removal failed: {e:?}");
                }
            }
            self.fd_keys.remove(&fd);
        }
        self.held.retain(|k| *k != key);
    }

    /// Drops every connection (closing the host sockets) and everything owed to the guest.
    pub fn reset(&mut self, ops: &mut EventOps) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, ops);
        }
        self.rx_backlog.clear();
        self.rx_queued.clear();
        self.resets.clear();
        self.held.clear();
        self.guest_ready = false;
    }

    /// Whether [`Self::recv_pkt`] may have a packet.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_backlog.is_empty()
    }

    /// The next packet for the guest, connections taking turns. Each connection queued when
    /// the call starts is asked once: one that has nothing to send into this buffer (data
    /// waiting, but a guest buffer with no room for data) goes back to the end of the queue
    /// rather than being asked again and again, which would spin the device thread for ever.
    pub fn recv_pkt(&mut self, max_data_len: usize, ops: &mut EventOps) -> Option<VsockPacket> {
        if let Some(pkt) = self.resets.pop_front() {
            return Some(pkt);
        }
        for _ in 0..self.rx_backlog.len() {
            let Some(key) = self.rx_backlog.pop_front() else {
                break;
            };
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.recv_pkt(max_data_len);
            if pkt.as_ref().is_some_and(|p| p.hdr.op == VSOCK_OP_REQUEST) {
                // The guest answers a request at once, unless it is stuck.
                conn.set_deadline(Some(Instant::now() + self.request_timeout));
            }
            self.sync(key, ops);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::devices::virtio::vsock::packet::VsockHeader;
    use crate::devices::virtio::vsock::test_utils::{guest_hdr, VsockTestContext, GUEST_CID};
    use crate::devices::virtio::vsock::unix::VsockUnixBackend;
    use crate::devices::virtio::vsock::{
        VSOCK_FLAGS_SHUTDOWN_RCV, VSOCK_FLAGS_SHUTDOWN_SEND, VSOCK_OP_CREDIT_REQUEST,
        VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_RESPONSE, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN,
    };
    use crate::devices::virtio::VirtioDevice;

    type Ctx = VsockTestContext<VsockUnixBackend>;

    const GUEST_PORT: u32 = 1024;

    fn ops_of(pkts: &[VsockPacket]) -> Vec<u16> {
        pkts.iter().map(|p| p.hdr.op).collect()
    }

    fn connection_count(ctx: &Ctx) -> usize {
        ctx.device
            .lock()
            .unwrap()
            .backend()
            .muxer()
            .connection_count()
    }

    /// A host client sends `CONNECT 1024`; returns it and the REQUEST the guest got.
    fn host_connect(ctx: &mut Ctx, path: &Path) -> (UnixStream, VsockHeader) {
        let mut client = UnixStream::connect(path).unwrap();
        client
            .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_REQUEST]);
        (client, pkts[0].hdr)
    }

    /// The guest accepts `req` with `buf_alloc` of receive space.
    fn guest_accept(ctx: &mut Ctx, req: &VsockHeader, buf_alloc: u32) {
        let mut hdr = guest_hdr(VSOCK_OP_RESPONSE, req.dst_port, req.src_port);
        hdr.buf_alloc = buf_alloc;
        ctx.guest_send(hdr, b"");
    }

    fn read_line(client: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            client.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// The host side closed `client` (EOF, or a reset if it left bytes unread).
    fn assert_closed(client: &mut UnixStream) {
        let mut buf = Vec::new();
        match client.read_to_end(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("client not closed: {other:?}"),
        }
    }

    fn established(dir: &Path) -> (Ctx, UnixStream, VsockHeader) {
        let (mut ctx, path) = Ctx::new_unix(dir);
        let (mut client, req) = host_connect(&mut ctx, &path);
        guest_accept(&mut ctx, &req, 64 * 1024);
        assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
        (ctx, client, req)
    }

    #[test]
    fn host_initiated_connect_and_data_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut client, req) = established(dir.path());
        assert_eq!((req.src_cid, req.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
        assert_eq!(req.dst_port, GUEST_PORT);
        assert!(req.src_port >= LOCAL_PORT_RANGE_START);
        assert_eq!(
            req.buf_alloc,
            crate::devices::virtio::vsock::CONN_TX_BUF_SIZE
        );

        client.write_all(b"ping").unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW]);
        assert_eq!(pkts[0].data, b"ping");
        assert_eq!(
            (pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
            (req.src_port, GUEST_PORT)
        );

        ctx.guest_send_data(GUEST_PORT, req.src_port, b"pong");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        assert_eq!(connection_count(&ctx), 1);
    }

    #[test]
    fn bytes_after_connect_line_go_to_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1024\nearly").unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_REQUEST]);
        guest_accept(&mut ctx, &pkts[0].hdr, 4096);
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW]);
        assert_eq!(pkts[0].data, b"early");
    }

    #[test]
    fn guest_rst_to_request_closes_host_client() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        let (mut client, req) = host_connect(&mut ctx, &path);
        ctx.guest_send(guest_hdr(VSOCK_OP_RST, GUEST_PORT, req.src_port), b"");
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).unwrap(), 0);
        assert_eq!(connection_count(&ctx), 0);
        assert!(ctx.drain_rx().is_empty());
    }

    #[test]
    fn invalid_connect_line_closes_host_client() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"HELLO 1024\n").unwrap();
        ctx.pump();
        assert_closed(&mut client);
        assert!(ctx.drain_rx().is_empty());
        // An over-long line without newline is refused too.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(&[b'9'; 64]).unwrap();
        ctx.pump();
        assert_closed(&mut client);
    }

    #[test]
    fn credit_flow_control_stops_and_resumes_host_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        let (mut client, req) = host_connect(&mut ctx, &path);
        guest_accept(&mut ctx, &req, 100);
        read_line(&mut client);
        client.write_all(&[5u8; 300]).unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_CREDIT_REQUEST]);
        assert_eq!(pkts[0].data.len(), 100);
        // Without credit, nothing more comes.
        ctx.pump();
        assert!(ctx.drain_rx().is_empty());
        // The guest consumed the 100 bytes.
        let mut update = guest_hdr(VSOCK_OP_CREDIT_UPDATE, GUEST_PORT, req.src_port);
        update.buf_alloc = 100;
        update.fwd_cnt = 100;
        ctx.guest_send(update, b"");
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_CREDIT_REQUEST]);
        assert_eq!(pkts[0].data.len(), 100);
        update.fwd_cnt = 200;
        ctx.guest_send(update, b"");
        let pkts = ctx.drain_rx();
        // The host might have more: with the credit used up again, ask for more.
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_CREDIT_REQUEST]);
        assert_eq!(pkts[0].data.len(), 100);
    }

    #[test]
    fn host_data_is_split_to_rx_buffer_size() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut client, _req) = established(dir.path());
        client.write_all(&[1u8; 10_000]).unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        let sizes: Vec<usize> = pkts.iter().map(|p| p.data.len()).collect();
        assert_eq!(sizes, vec![4096, 4096, 1808]);
    }

    #[test]
    fn guest_credit_request_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut client, req) = established(dir.path());
        ctx.guest_send_data(GUEST_PORT, req.src_port, b"abc");
        let mut buf = [0u8; 3];
        client.read_exact(&mut buf).unwrap();
        ctx.guest_send(
            guest_hdr(VSOCK_OP_CREDIT_REQUEST, GUEST_PORT, req.src_port),
            b"",
        );
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_CREDIT_UPDATE]);
        assert_eq!(pkts[0].hdr.fwd_cnt, 3);
    }

    #[test]
    fn host_close_sends_shutdown_then_guest_close_resets() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, client, req) = established(dir.path());
        drop(client);
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_SHUTDOWN]);
        assert_eq!(pkts[0].hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
        let mut shut = guest_hdr(VSOCK_OP_SHUTDOWN, GUEST_PORT, req.src_port);
        shut.flags = VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV;
        ctx.guest_send(shut, b"");
        assert_eq!(ops_of(&ctx.drain_rx()), vec![VSOCK_OP_RST]);
        assert_eq!(connection_count(&ctx), 0);
    }

    #[test]
    fn guest_rst_closes_established_host_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut client, req) = established(dir.path());
        ctx.guest_send(guest_hdr(VSOCK_OP_RST, GUEST_PORT, req.src_port), b"");
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).unwrap(), 0);
        assert_eq!(connection_count(&ctx), 0);
        // Later packets for it are answered with a reset.
        ctx.guest_send_data(GUEST_PORT, req.src_port, b"late");
        assert_eq!(ops_of(&ctx.drain_rx()), vec![VSOCK_OP_RST]);
    }

    #[test]
    fn guest_initiated_connection_to_listening_host_port() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        let listener = UnixListener::bind(format!("{}_52", path.display())).unwrap();
        ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, 3000, 52), b"");
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RESPONSE]);
        let hdr = pkts[0].hdr;
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port),
            (2, GUEST_CID, 52, 3000)
        );
        let (mut host, _) = listener.accept().unwrap();
        ctx.guest_send_data(3000, 52, b"from guest");
        let mut buf = [0u8; 10];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from guest");
        host.write_all(b"from host").unwrap();
        ctx.pump();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RW]);
        assert_eq!(pkts[0].data, b"from host");
        // The guest half-closes: the host reads EOF after the data.
        let mut shut = guest_hdr(VSOCK_OP_SHUTDOWN, 3000, 52);
        shut.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
        ctx.guest_send(shut, b"");
        let mut rest = Vec::new();
        assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn guest_initiated_connection_without_listener_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _path) = Ctx::new_unix(dir.path());
        ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, 3000, 52), b"");
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RST]);
        assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (52, 3000));
        assert_eq!(connection_count(&ctx), 0);
    }

    #[test]
    fn packets_to_other_cids_or_unknown_connections_are_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _path) = Ctx::new_unix(dir.path());
        let mut hdr = guest_hdr(VSOCK_OP_REQUEST, 3000, 52);
        hdr.dst_cid = 5;
        ctx.guest_send(hdr, b"");
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RST]);
        assert_eq!((pkts[0].hdr.src_cid, pkts[0].hdr.dst_cid), (5, GUEST_CID));
        ctx.guest_send_data(3000, 52, b"nobody");
        assert_eq!(ops_of(&ctx.drain_rx()), vec![VSOCK_OP_RST]);
        // A reset for nothing is not answered.
        ctx.guest_send(guest_hdr(VSOCK_OP_RST, 3000, 52), b"");
        assert!(ctx.drain_rx().is_empty());
    }

    #[test]
    fn device_reset_drops_connections_and_reactivation_works() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, mut client, _req) = established(dir.path());
        ctx.reset();
        assert!(!ctx.device.lock().unwrap().is_activated());
        assert_closed(&mut client);
        assert_eq!(connection_count(&ctx), 0);
        // Old queue notifications are no longer watched.
        ctx.queue_evts[crate::devices::virtio::vsock::TXQ_INDEX]
            .write(1)
            .unwrap();
        assert_eq!(ctx.em.run_with_timeout(20).unwrap(), 0);
        ctx.reactivate();
        let path = dir.path().join("vsock.sock");
        let (mut client, req) = host_connect(&mut ctx, &path);
        guest_accept(&mut ctx, &req, 4096);
        assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
    }

    #[test]
    fn host_clients_are_accepted_while_inactive() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        ctx.reset();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        ctx.pump();
        ctx.reactivate();
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_REQUEST]);
    }

    #[test]
    fn unanswered_request_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        ctx.device
            .lock()
            .unwrap()
            .backend
            .muxer_mut()
            .set_timeouts(Duration::ZERO, Duration::ZERO);
        let (mut client, req) = host_connect(&mut ctx, &path);
        // The guest never answers; the next sweep gives up.
        ctx.pump_until(Duration::from_secs(3), |ctx| connection_count(ctx) == 0);
        assert_closed(&mut client);
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RST]);
        assert_eq!(pkts[0].hdr.src_port, req.src_port);
    }

    #[test]
    fn connection_count_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = Ctx::new_unix(dir.path());
        ctx.device
            .lock()
            .unwrap()
            .backend
            .muxer_mut()
            .set_max_connections(2);
        let _listener = UnixListener::bind(format!("{}_52", path.display())).unwrap();
        for port in [3000, 3001, 3002] {
            ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, port, 52), b"");
        }
        let mut replies: Vec<(u32, u16)> = ctx
            .drain_rx()
            .iter()
            .map(|p| (p.hdr.dst_port, p.hdr.op))
            .collect();
        replies.sort();
        assert_eq!(
            replies,
            vec![
                (3000, VSOCK_OP_RESPONSE),
                (3001, VSOCK_OP_RESPONSE),
                (3002, VSOCK_OP_RST)
            ]
        );
        // Host clients beyond the limit are refused too.
        let mut client = UnixStream::connect(&path).unwrap();
        ctx.pump();
        assert_closed(&mut client);
        assert_eq!(connection_count(&ctx), 2);
    }

    #[test]
    fn reset_backlog_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _path) = Ctx::new_unix(dir.path());
        // No rx buffers: resets pile up, the oldest are dropped.
        for i in 0..(MAX_PENDING_RESETS as u32 + 10) {
            ctx.guest_send_data(i, 52, b"x");
        }
        let dev = ctx.device.lock().unwrap();
        assert_eq!(dev.backend().muxer().dropped_resets, 10);
    }

    const READY_PORT: u32 = 1023;

    fn gated(dir: &Path) -> (Ctx, PathBuf) {
        let (ctx, path) = Ctx::new_unix(dir);
        ctx.device
            .lock()
            .unwrap()
            .backend
            .muxer_mut()
            .hold_until_ready(READY_PORT);
        (ctx, path)
    }

    fn held_count(ctx: &Ctx) -> usize {
        ctx.device.lock().unwrap().backend().muxer().held_count()
    }

    #[test]
    fn gated_host_connections_wait_for_the_guest_to_say_it_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = gated(dir.path());
        let mut first = UnixStream::connect(&path).unwrap();
        first.write_all(b"CONNECT 1024\n").unwrap();
        let mut second = UnixStream::connect(&path).unwrap();
        second.write_all(b"CONNECT 1024\n").unwrap();
        ctx.pump();
        // Nothing reaches the booting guest.
        assert!(ctx.drain_rx().is_empty());
        assert_eq!((connection_count(&ctx), held_count(&ctx)), (2, 2));

        // The agent listens and says so: its connection is refused, the REQUESTs go out in order.
        ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, 40000, READY_PORT), b"");
        let pkts = ctx.drain_rx();
        assert_eq!(
            ops_of(&pkts),
            vec![VSOCK_OP_RST, VSOCK_OP_REQUEST, VSOCK_OP_REQUEST]
        );
        assert_eq!(
            (pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
            (READY_PORT, 40000)
        );
        assert!(pkts[1].hdr.src_port < pkts[2].hdr.src_port);
        assert_eq!(held_count(&ctx), 0);
        guest_accept(&mut ctx, &pkts[1].hdr, 4096);
        guest_accept(&mut ctx, &pkts[2].hdr, 4096);
        assert_eq!(
            read_line(&mut first),
            format!("OK {}\n", pkts[1].hdr.src_port)
        );
        assert_eq!(
            read_line(&mut second),
            format!("OK {}\n", pkts[2].hdr.src_port)
        );

        // Once open, the gate lets new connections straight through.
        let (_third, req) = host_connect(&mut ctx, &path);
        assert_eq!(req.dst_port, GUEST_PORT);
    }

    #[test]
    fn the_ready_port_never_reaches_a_host_socket_and_a_reset_closes_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, path) = gated(dir.path());
        // Even with a host listener on the ready port, the guest's connection is refused.
        let listener = UnixListener::bind(format!("{}_{READY_PORT}", path.display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, 40000, READY_PORT), b"");
        assert_eq!(ops_of(&ctx.drain_rx()), vec![VSOCK_OP_RST]);
        assert!(listener.accept().is_err());
        assert_eq!(connection_count(&ctx), 0);

        // A device reset (guest reboot) closes the gate again.
        ctx.reset();
        ctx.reactivate();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        ctx.pump();
        assert!(ctx.drain_rx().is_empty());
        assert_eq!(held_count(&ctx), 1);
        // A held client that gives up is dropped when the next one arrives, and never reaches
        // the guest.
        let mut gone = UnixStream::connect(&path).unwrap();
        gone.write_all(b"CONNECT 1024\n").unwrap();
        ctx.pump();
        assert_eq!(held_count(&ctx), 2);
        drop(gone);
        let mut late = UnixStream::connect(&path).unwrap();
        late.write_all(b"CONNECT 1024\n").unwrap();
        ctx.pump();
        assert_eq!((held_count(&ctx), connection_count(&ctx)), (2, 2));
        // One that leaves later is dropped when the gate opens.
        drop(late);
        // The gate opens for the new boot: only the live client's REQUEST goes out.
        ctx.guest_send(guest_hdr(VSOCK_OP_REQUEST, 40001, READY_PORT), b"");
        let pkts = ctx.drain_rx();
        assert_eq!(ops_of(&pkts), vec![VSOCK_OP_RST, VSOCK_OP_REQUEST]);
        guest_accept(&mut ctx, &pkts[1].hdr, 4096);
        assert_eq!(
            read_line(&mut client),
            format!("OK {}\n", pkts[1].hdr.src_port)
        );
    }
}
