//! The virtio socket device (virtio spec 5.10) with a Unix-socket host side.
//!
//! - [`packet`]: parsing and validation of guest descriptor chains (fuzzing entry point
//!   [`packet::parse_tx_chain`]).
//! - [`connection`]: one stream connection's state machine and credit flow control.
//! - [`muxer`]: the connection table, routing of guest packets, the rx backlog.
//! - [`unix`]: the host backend: a Unix listener at `uds_path` taking `CONNECT <port>\n`
//!   from host clients, and `<uds_path>_<port>` for guest-initiated connections.
//! - `device` / `event_handler`: the [`VirtioDevice`](super::VirtioDevice) and
//!   `MutEventSubscriber` sides of [`Vsock`].

pub mod connection;
mod device;
mod event_handler;
pub mod muxer;
pub mod packet;
pub mod unix;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_utils;

use std::io;
use std::path::PathBuf;

use event_manager::{EventOps, Events};

pub use device::{Vsock, VsockMetrics};
pub use packet::{VsockHeader, VsockPacket};
pub use unix::VsockUnixBackend;

/// The rx queue (device to driver).
pub const RXQ_INDEX: usize = 0;
/// The tx queue (driver to device).
pub const TXQ_INDEX: usize = 1;
/// The event queue (transport reset events).
pub const EVQ_INDEX: usize = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// The host's CID.
pub const VSOCK_HOST_CID: u64 = 2;

/// Socket type: stream.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Connection request.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const VSOCK_OP_RST: u16 = 3;
/// Half or full close; `flags` carries `VSOCK_FLAGS_SHUTDOWN_*`.
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// Payload.
pub const VSOCK_OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// The receive buffer we advertise per connection (`buf_alloc`), which is also the most we
/// ever buffer from the guest for one connection.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a credit update once this many bytes were forwarded without telling the guest.
pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// The most connections (including host clients still sending their `CONNECT` line).
pub const MAX_CONNECTIONS: usize = 1024;
/// The most resets queued for the guest for packets that matched no connection.
pub const MAX_PENDING_RESETS: usize = 256;
/// How long a host-initiated REQUEST may go unanswered once delivered to the guest.
pub const CONN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a closed connection may take to flush guest data to a slow host socket.
pub const CONN_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often connection deadlines are checked.
pub const CONN_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// First port of the range host-initiated connections take their host-side port from.
pub const LOCAL_PORT_RANGE_START: u32 = 1 << 30;

/// Errors of the vsock device and its Unix backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Something already exists at the socket path.
    #[error("vsock socket path {0} already exists")]
    SocketPathExists(PathBuf),
    /// Binding the host listener failed (missing folder, permissions).
    #[error("failed to bind the vsock socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    /// Configuring the host listener failed.
    #[error("failed to configure the vsock listener")]
    Listener(#[source] io::Error),
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] io::Error),
    /// The guest CID is reserved (0, 1, 2 or `u32::MAX` and above).
    #[error("invalid guest cid {0}")]
    InvalidCid(u64),
    /// The connection table is full.
    #[error("too many vsock connections")]
    TooManyConnections,
    /// No free host-side port.
    #[error("no free host-side vsock port")]
    NoFreePort,
    /// Creating or arming the deadline timer failed.
    #[error("failed to set up the vsock connection timer")]
    Timer(#[source] io::Error),
}

/// The host side of the vsock device: where guest packets go and guest-bound packets come from.
///
/// All methods run on the device thread. Backends register their own file descriptors with
/// `ops` (from [`VsockBackend::register`] on) and get their events in
/// [`VsockBackend::handle_event`].
pub trait VsockBackend: Send {
    /// The device was activated: start watching host file descriptors.
    fn register(&mut self, ops: &mut EventOps);
    /// A validated packet from the guest.
    fn send_pkt(&mut self, pkt: VsockPacket, ops: &mut EventOps);
    /// The next packet for the guest, with at most `max_data_len` bytes of payload, if any.
    fn recv_pkt(&mut self, max_data_len: usize, ops: &mut EventOps) -> Option<VsockPacket>;
    /// Whether [`VsockBackend::recv_pkt`] may have something.
    fn has_pending_rx(&self) -> bool;
    /// An event on a file descriptor the backend registered.
    fn handle_event(&mut self, events: Events, ops: &mut EventOps);
    /// The driver reset the device: drop every connection (the guest's sockets are gone).
    fn reset(&mut self, ops: &mut EventOps);
}
