//! The virtio network device (virtio spec 5.1) over a host TAP device: one receive and one
//! transmit queue, a MAC address in the configuration space, no offloads.
//!
//! Frames pass through whole, with their 12-byte `virtio_net_hdr_v1`: the TAP is opened with
//! `IFF_VNET_HDR` and its header size set to 12, so what the guest transmits is written to the
//! TAP as it is, and what the TAP gives is what the guest receives (the header's `num_buffers`
//! set to 1). No checksum or segmentation offload is offered, so the headers carry nothing the
//! host must act on. The pod's side of the TAP (a TAP in the pod's network namespace, mirrored
//! to its CNI interface) is the shim's business; see `runtime-shim`'s `network` module.
//!
//! Everything from the guest is bounded: a transmit chain may have at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors and [`MAX_FRAME_LEN`] bytes, and a chain that breaks a
//! rule is returned unused and counted, never fatal.

mod device;
mod event_handler;
pub mod frame;
pub mod tap;

pub use device::{Net, NetStats};
pub use tap::Tap;

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which precedes every frame (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;
/// The longest frame with its header: a 64 KiB frame is more than any MTU without offloads.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_536;
/// The most descriptors one chain may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Feature bit: the device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u32 = 5;

/// A frame source and sink: the TAP device, or a socket pair in tests. Frames keep message
/// boundaries and carry the virtio-net header.
pub trait NetBackend: std::os::fd::AsRawFd + Send {
    /// Reads one frame into `buf`; `Ok(None)` when no frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Writes one frame; `Ok(false)` when the backend has no room now (the frame is dropped,
    /// as a NIC drops on a full ring).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool>;
}

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The file descriptor given as the TAP is not a usable TAP device.
    #[error(
        "file descriptor {fd} is not a TAP device opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR"
    )]
    NotATap {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    /// The TAP could not be configured.
    #[error("cannot configure the TAP device ({what})")]
    TapSetup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
