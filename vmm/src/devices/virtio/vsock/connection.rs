//! One vsock stream connection between a guest socket and a host Unix stream: its state
//! machine and credit-based flow control (virtio spec 5.10.6.3).
//!
//! Guest to host: the guest may send at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes, where we
//! advertise `buf_alloc` = [`CONN_TX_BUF_SIZE`] and `fwd_cnt` = bytes written to the host
//! socket. Bytes the host socket cannot take yet wait in `tx_buf`, which therefore never
//! exceeds `CONN_TX_BUF_SIZE` for a guest that respects its credit; a guest that overruns it is
//! reset. Host to guest: we read from the host socket only as much as the guest's advertised
//! free space (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) and ask for credit when it is used
//! up.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;
use tracing::debug;

use super::packet::{VsockPacket, MAX_PKT_DATA_SIZE};
use super::{
    CONN_CREDIT_UPDATE_THRESHOLD, CONN_TX_BUF_SIZE, VSOCK_FLAGS_SHUTDOWN_RCV,
    VSOCK_FLAGS_SHUTDOWN_SEND, VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST,
    VSOCK_OP_RESPONSE, VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN,
};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: a REQUEST goes (or went) to the guest; waiting for its RESPONSE.
    LocalInit,
    /// Both sides connected.
    Established,
    /// Finished: a RST goes (or went) to the guest, or came from it. Data already accepted
    /// from the guest is still flushed to the host socket before the connection is dropped.
    Closed,
}

/// Packets owed to the guest, as bits.
const PENDING_REQUEST: u8 = 1 << 0;
const PENDING_RESPONSE: u8 = 1 << 1;
const PENDING_CREDIT_UPDATE: u8 = 1 << 2;
const PENDING_CREDIT_REQUEST: u8 = 1 << 3;
const PENDING_SHUTDOWN: u8 = 1 << 4;
const PENDING_RST: u8 = 1 << 5;

/// One connection. Plain data apart from the host stream, so that its state can be saved.
#[derive(Debug)]
pub struct VsockConnection {
    stream: UnixStream,
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    pending: u8,
    /// Shutdown flags the guest sent us.
    peer_shutdown: u32,
    /// The host socket reached EOF (a SHUTDOWN(SEND) goes to the guest).
    local_eof: bool,
    /// We shut down the writing half of the host socket.
    host_write_shut: bool,
    /// Bytes written to the host socket before any guest data (`OK <port>\n`).
    host_prefix: Vec<u8>,
    /// Guest data not yet taken by the host socket.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's advertised receive buffer.
    peer_buf_alloc: u32,
    /// Bytes the guest says it consumed.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent the guest.
    rx_cnt: Wrapping<u32>,
    /// The host socket may have data (epoll said so, and no read hit EAGAIN since).
    host_readable: bool,
    /// A CREDIT_REQUEST went out and no credit arrived since.
    credit_requested: bool,
    /// What the connection is registered for with epoll (kept by the muxer).
    pub(super) registered: Option<EventSet>,
    /// When the connection is given up if it has not moved on (an unanswered REQUEST, or
    /// data for a host socket that does not drain after the close).
    deadline: Option<Instant>,
}

impl VsockConnection {
    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            pending: 0,
            peer_shutdown: 0,
            local_eof: false,
            host_write_shut: false,
            host_prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_readable: false,
            credit_requested: false,
            registered: None,
            deadline: None,
        }
    }

    /// A host-initiated connection: a REQUEST for guest port `peer_port` is owed to the guest.
    pub fn new_local_init(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::LocalInit,
        );
        conn.pending = PENDING_REQUEST;
        conn
    }

    /// A guest-initiated connection whose host socket is connected: a RESPONSE is owed.
    pub fn new_peer_init(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::Established,
        );
        conn.pending = PENDING_RESPONSE;
        conn.peer_buf_alloc = peer_buf_alloc;
        conn.peer_fwd_cnt = Wrapping(peer_fwd_cnt);
        conn
    }

    /// The state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Bytes of guest data waiting for the host socket.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The guest's free receive space as far as we know.
    pub fn peer_avail_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent gets no credit, not more.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The deadline, if the connection waits for something that may never come.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets (or clears) the deadline.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Whether the connection is closed but still has guest data for the host socket.
    pub fn is_draining(&self) -> bool {
        self.state == ConnState::Closed && !(self.tx_buf.is_empty() && self.host_prefix.is_empty())
    }

    /// Gives up on the connection after its deadline passed: an unanswered request is reset,
    /// undelivered data is dropped.
    pub fn expire(&mut self) {
        self.deadline = None;
        let notify = self.state == ConnState::LocalInit;
        self.kill(notify);
    }

    /// Whether the connection is finished and can be dropped.
    pub fn is_dead(&self) -> bool {
        self.state == ConnState::Closed
            && self.pending == 0
            && self.tx_buf.is_empty()
            && self.host_prefix.is_empty()
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established
            && !self.local_eof
            && self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV == 0
    }

    /// Whether [`Self::recv_pkt`] has something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
            || (self.can_read_host()
                && self.host_readable
                && (self.peer_avail_credit() > 0 || !self.credit_requested))
    }

    /// The epoll events the host stream should be watched for.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_read_host() && !self.host_readable {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() || !self.host_prefix.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Aborts the connection; a RST goes to the guest if `notify_peer`.
    pub fn kill(&mut self, notify_peer: bool) {
        self.state = ConnState::Closed;
        self.tx_buf.clear();
        self.host_prefix.clear();
        self.pending = if notify_peer { PENDING_RST } else { 0 };
    }

    fn update_peer_credit(&mut self, pkt: &VsockPacket) {
        self.peer_buf_alloc = pkt.hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(pkt.hdr.fwd_cnt);
        if self.peer_avail_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Handles a packet from the guest for this connection.
    pub fn send_pkt(&mut self, pkt: &VsockPacket) {
        if self.state == ConnState::Closed {
            // The guest still talks to a connection we reset: repeat the reset.
            if pkt.hdr.op != VSOCK_OP_RST {
                self.pending |= PENDING_RST;
            }
            return;
        }
        self.update_peer_credit(pkt);
        match pkt.hdr.op {
            VSOCK_OP_RESPONSE if self.state == ConnState::LocalInit => {
                self.deadline = None;
                self.state = ConnState::Established;
                self.host_prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host();
            }
            VSOCK_OP_RW if self.state == ConnState::Established => {
                if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
                    debug!(
                        port = self.local_port,
                        "vsock: data after the guest's shutdown"
                    );
                    self.kill(true);
                    return;
                }
                if self.tx_buf.len() + pkt.data.len() > CONN_TX_BUF_SIZE as usize {
                    debug!(port = self.local_port, "vsock: guest overran its credit");
                    self.kill(true);
                    return;
                }
                self.tx_buf.extend(&pkt.data);
                self.flush_to_host();
            }
            VSOCK_OP_CREDIT_UPDATE => {}
            VSOCK_OP_CREDIT_REQUEST => self.pending |= PENDING_CREDIT_UPDATE,
            VSOCK_OP_SHUTDOWN => {
                self.peer_shutdown |=
                    pkt.hdr.flags & (VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND);
                let both = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
                if self.peer_shutdown == both {
                    // A full close: acknowledge with a RST, keep flushing what we have.
                    self.state = ConnState::Closed;
                    self.pending = PENDING_RST;
                }
                self.flush_to_host();
            }
            VSOCK_OP_RST => self.kill(false),
            _ => {
                debug!(op = pkt.hdr.op, state = ?self.state, "vsock: unexpected packet");
                self.kill(true);
            }
        }
    }

    /// The host socket became ready for `events`.
    pub fn notify(&mut self, events: EventSet) {
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            && self.can_read_host()
        {
            self.host_readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush_to_host();
        }
    }

    /// Writes buffered guest data to the host socket as far as it takes it.
    fn flush_to_host(&mut self) {
        while !self.host_prefix.is_empty() {
            match self.stream.write(&self.host_prefix) {
                Ok(0) => return self.host_write_failed(&io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.host_prefix.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.host_write_failed(&e),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return self.host_write_failed(&io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    // `n` is at most CONN_TX_BUF_SIZE.
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return self.host_write_failed(&e),
            }
        }
        if self.state != ConnState::Closed
            && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_CREDIT_UPDATE_THRESHOLD
        {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
        if self.tx_buf.is_empty()
            && !self.host_write_shut
            && (self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0
                || self.state == ConnState::Closed)
        {
            // The guest will send nothing more: pass the EOF on.
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                debug!("vsock: host socket shutdown failed: {e}");
            }
        }
    }

    fn host_write_failed(&mut self, e: &io::Error) {
        debug!(
            port = self.local_port,
            "vsock: host socket write failed: {e}"
        );
        let notify = self.state != ConnState::Closed;
        self.kill(notify);
    }

    fn packet(&mut self, op: u16) -> VsockPacket {
        let mut pkt = VsockPacket::control(self.local_port, self.guest_cid, self.peer_port, op);
        pkt.hdr.buf_alloc = CONN_TX_BUF_SIZE;
        pkt.hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        pkt
    }

    fn take_pending(&mut self, bit: u8) -> bool {
        let set = self.pending & bit != 0;
        self.pending &= !bit;
        set
    }

    /// The next packet for the guest, with at most `max_data_len` bytes of payload.
    pub fn recv_pkt(&mut self, max_data_len: usize) -> Option<VsockPacket> {
        if self.take_pending(PENDING_RST) {
            self.pending = 0;
            return Some(self.packet(VSOCK_OP_RST));
        }
        if self.take_pending(PENDING_REQUEST) {
            return Some(self.packet(VSOCK_OP_REQUEST));
        }
        if self.take_pending(PENDING_RESPONSE) {
            return Some(self.packet(VSOCK_OP_RESPONSE));
        }
        if self.can_read_host() && self.host_readable {
            if let Some(pkt) = self.read_host(max_data_len) {
                return Some(pkt);
            }
        }
        if self.take_pending(PENDING_RST) {
            // The host read failed.
            self.pending = 0;
            return Some(self.packet(VSOCK_OP_RST));
        }
        if self.take_pending(PENDING_CREDIT_UPDATE) {
            return Some(self.packet(VSOCK_OP_CREDIT_UPDATE));
        }
        if self.take_pending(PENDING_CREDIT_REQUEST) {
            return Some(self.packet(VSOCK_OP_CREDIT_REQUEST));
        }
        if self.take_pending(PENDING_SHUTDOWN) {
            let mut pkt = self.packet(VSOCK_OP_SHUTDOWN);
            pkt.hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
            return Some(pkt);
        }
        None
    }

    fn read_host(&mut self, max_data_len: usize) -> Option<VsockPacket> {
        let credit = self.peer_avail_credit() as usize;
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= PENDING_CREDIT_REQUEST;
            }
            return None;
        }
        let want = credit.min(max_data_len).min(MAX_PKT_DATA_SIZE);
        if want == 0 {
            return None;
        }
        let mut data = vec![0u8; want];
        loop {
            match self.stream.read(&mut data) {
                Ok(0) => {
                    self.local_eof = true;
                    self.host_readable = false;
                    self.pending |= PENDING_SHUTDOWN;
                    return None;
                }
                Ok(n) => {
                    data.truncate(n);
                    // `n` is at most MAX_PKT_DATA_SIZE.
                    self.rx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    let mut pkt = self.packet(VSOCK_OP_RW);
                    pkt.hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                    pkt.data = data;
                    return Some(pkt);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(e) => {
                    debug!(
                        port = self.local_port,
                        "vsock: host socket read failed: {e}"
                    );
                    self.kill(true);
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::VsockHeader;
    use crate::devices::virtio::vsock::{VSOCK_HOST_CID, VSOCK_TYPE_STREAM};

    const GUEST_CID: u64 = 3;

    fn guest_pkt(op: u16, data: &[u8], buf_alloc: u32, fwd_cnt: u32) -> VsockPacket {
        VsockPacket {
            hdr: VsockHeader {
                src_cid: GUEST_CID,
                dst_cid: VSOCK_HOST_CID,
                src_port: 500,
                dst_port: 1 << 30,
                len: data.len() as u32,
                type_: VSOCK_TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc,
                fwd_cnt,
            },
            data: data.to_vec(),
        }
    }

    fn established() -> (VsockConnection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut conn = VsockConnection::new_peer_init(ours, GUEST_CID, 1 << 30, 500, 1000, 0);
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_RESPONSE);
        (conn, theirs)
    }

    #[test]
    fn local_init_sends_request_then_ok_line_on_response() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = VsockConnection::new_local_init(ours, GUEST_CID, 1 << 30, 1024);
        let req = conn.recv_pkt(4096).unwrap();
        assert_eq!(req.hdr.op, VSOCK_OP_REQUEST);
        assert_eq!(
            (req.hdr.src_cid, req.hdr.dst_cid),
            (VSOCK_HOST_CID, GUEST_CID)
        );
        assert_eq!((req.hdr.src_port, req.hdr.dst_port), (1 << 30, 1024));
        assert_eq!(req.hdr.buf_alloc, CONN_TX_BUF_SIZE);
        assert!(!conn.has_pending_rx());
        conn.send_pkt(&guest_pkt(VSOCK_OP_RESPONSE, b"", 4096, 0));
        assert_eq!(conn.state(), ConnState::Established);
        let mut line = [0u8; 14];
        theirs.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
    }

    #[test]
    fn guest_data_reaches_host_and_counts_forwarded() {
        let (mut conn, mut theirs) = established();
        conn.send_pkt(&guest_pkt(VSOCK_OP_RW, b"hello", 1000, 0));
        let mut buf = [0u8; 5];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // A credit request is answered with our forwarded count.
        conn.send_pkt(&guest_pkt(VSOCK_OP_CREDIT_REQUEST, b"", 1000, 0));
        let update = conn.recv_pkt(4096).unwrap();
        assert_eq!(update.hdr.op, VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(update.hdr.fwd_cnt, 5);
    }

    #[test]
    fn host_data_is_bounded_by_guest_credit() {
        let (mut conn, mut theirs) = established();
        theirs.write_all(&[7u8; 1500]).unwrap();
        conn.notify(EventSet::IN);
        let first = conn.recv_pkt(4096).unwrap();
        assert_eq!(first.hdr.op, VSOCK_OP_RW);
        assert_eq!(first.data.len(), 1000);
        assert_eq!(conn.peer_avail_credit(), 0);
        // Credit exhausted: one credit request, then nothing.
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_CREDIT_REQUEST);
        assert!(conn.recv_pkt(4096).is_none());
        assert!(!conn.has_pending_rx());
        // The guest consumed 600 bytes.
        conn.send_pkt(&guest_pkt(VSOCK_OP_CREDIT_UPDATE, b"", 1000, 600));
        assert!(conn.has_pending_rx());
        let second = conn.recv_pkt(4096).unwrap();
        assert_eq!(second.data.len(), 500);
    }

    #[test]
    fn host_data_is_bounded_by_rx_buffer() {
        let (mut conn, mut theirs) = established();
        theirs.write_all(&[1u8; 300]).unwrap();
        conn.notify(EventSet::IN);
        assert_eq!(conn.recv_pkt(100).unwrap().data.len(), 100);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut conn, _theirs) = established();
        // Nobody reads the host socket: once its kernel buffer is full, guest data piles up
        // in tx_buf until the guest exceeds the credit we gave.
        let big = vec![0u8; 64 * 1024];
        for _ in 0..1000 {
            conn.send_pkt(&guest_pkt(VSOCK_OP_RW, &big, 1000, 0));
            assert!(conn.tx_buffered() <= CONN_TX_BUF_SIZE as usize);
            if conn.state() == ConnState::Closed {
                break;
            }
        }
        assert_eq!(conn.state(), ConnState::Closed);
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn buffered_data_waits_for_writable_host() {
        let (mut conn, mut theirs) = established();
        let big = vec![9u8; 16 * 1024];
        let mut sent = 0usize;
        while conn.tx_buffered() == 0 {
            conn.send_pkt(&guest_pkt(VSOCK_OP_RW, &big, 1000, 0));
            sent += big.len();
            assert!(sent < 64 << 20, "host socket never filled");
        }
        assert_eq!(conn.state(), ConnState::Established);
        assert!(conn.interest().contains(EventSet::OUT));
        let mut got = 0usize;
        let mut chunk = vec![0u8; 65536];
        while got < sent {
            match theirs.read(&mut chunk) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.notify(EventSet::OUT),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, sent);
        assert_eq!(conn.tx_buffered(), 0);
        assert!(!conn.interest().contains(EventSet::OUT));
        assert_eq!(conn.fwd_cnt.0 as usize, sent);
        // Forwarding more than the threshold queued a credit update.
        let mut ops = Vec::new();
        while let Some(pkt) = conn.recv_pkt(4096) {
            ops.push(pkt.hdr.op);
        }
        assert_eq!(ops, vec![VSOCK_OP_CREDIT_UPDATE]);
    }

    #[test]
    fn host_eof_sends_shutdown_send() {
        let (mut conn, theirs) = established();
        theirs.shutdown(Shutdown::Write).unwrap();
        conn.notify(EventSet::IN);
        let pkt = conn.recv_pkt(4096).unwrap();
        assert_eq!(pkt.hdr.op, VSOCK_OP_SHUTDOWN);
        assert_eq!(pkt.hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
        assert!(!conn.interest().contains(EventSet::IN));
        // Half-close: the guest can still send.
        conn.send_pkt(&guest_pkt(VSOCK_OP_RW, b"x", 1000, 0));
        assert_eq!(conn.state(), ConnState::Established);
    }

    #[test]
    fn guest_shutdown_send_half_closes_host_socket() {
        let (mut conn, mut theirs) = established();
        conn.send_pkt(&guest_pkt(VSOCK_OP_RW, b"bye", 1000, 0));
        let mut shut = guest_pkt(VSOCK_OP_SHUTDOWN, b"", 1000, 0);
        shut.hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
        conn.send_pkt(&shut);
        let mut all = Vec::new();
        theirs.set_nonblocking(false).unwrap();
        theirs.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"bye");
        assert_eq!(conn.state(), ConnState::Established);
    }

    #[test]
    fn guest_full_shutdown_is_acknowledged_with_rst() {
        let (mut conn, _theirs) = established();
        let mut shut = guest_pkt(VSOCK_OP_SHUTDOWN, b"", 1000, 0);
        shut.hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV;
        conn.send_pkt(&shut);
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_RST);
        assert!(conn.is_dead());
    }

    #[test]
    fn guest_rst_kills_without_reply() {
        let (mut conn, _theirs) = established();
        conn.send_pkt(&guest_pkt(VSOCK_OP_RST, b"", 1000, 0));
        assert!(conn.is_dead());
        assert!(conn.recv_pkt(4096).is_none());
    }

    #[test]
    fn host_close_with_pending_write_resets() {
        let (mut conn, theirs) = established();
        drop(theirs);
        conn.send_pkt(&guest_pkt(VSOCK_OP_RW, b"lost", 1000, 0));
        assert_eq!(conn.state(), ConnState::Closed);
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_RST);
    }

    #[test]
    fn lying_fwd_cnt_yields_no_credit() {
        let (mut conn, _theirs) = established();
        conn.send_pkt(&guest_pkt(VSOCK_OP_CREDIT_UPDATE, b"", 1000, 5000));
        assert_eq!(conn.peer_avail_credit(), 0);
    }

    #[test]
    fn response_in_wrong_state_resets() {
        let (mut conn, _theirs) = established();
        conn.send_pkt(&guest_pkt(VSOCK_OP_RESPONSE, b"", 1000, 0));
        assert_eq!(conn.state(), ConnState::Closed);
        assert_eq!(conn.recv_pkt(4096).unwrap().hdr.op, VSOCK_OP_RST);
    }
}
