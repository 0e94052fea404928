//! The connection table: routes guest packets to connections, collects guest-bound packets in
//! a bounded backlog, and keeps each host stream's epoll registration in step with what its
//! connection waits for.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};

use super::connection::VsockConnection;
use super::packet::VsockPacket;
use super::{
    VsockError, LOCAL_PORT_RANGE_START, MAX_CONNECTIONS, MAX_PENDING_RESETS, VSOCK_HOST_CID,
    VSOCK_OP_REQUEST, VSOCK_OP_RST,
};

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
        }
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
            if !self.conns.contains_key(&ConnKey { local_port: port, peer_port }) {
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
        if self.conns.len() >= MAX_CONNECTIONS {
            return Err(VsockError::TooManyConnections);
        }
        let local_port = self.alloc_local_port(peer_port).ok_or(VsockError::NoFreePort)?;
        let key = ConnKey { local_port, peer_port };
        let conn = VsockConnection::new_local_init(stream, self.guest_cid, local_port, peer_port);
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
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
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
            }
            self.sync(key, ops);
            return;
        }
        match hdr.op {
            VSOCK_OP_REQUEST => {
                if self.conns.len() >= MAX_CONNECTIONS {
                    warn!("vsock: connection limit reached, refusing guest connection");
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

    /// An epoll event on a connection's host stream; false if `fd` is not one.
    pub fn handle_host_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) -> bool {
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
        if conn.has_pending_rx() && self.rx_queued.insert(key) {
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
    }

    /// Whether [`Self::recv_pkt`] may have a packet.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_backlog.is_empty()
    }

    /// The next packet for the guest, connections taking turns.
    pub fn recv_pkt(&mut self, max_data_len: usize, ops: &mut EventOps) -> Option<VsockPacket> {
        if let Some(pkt) = self.resets.pop_front() {
            return Some(pkt);
        }
        while let Some(key) = self.rx_backlog.pop_front() {
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.recv_pkt(max_data_len);
            self.sync(key, ops);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }
}
