//! The virtio network device (virtio spec 5.1) over a host TAP device: one receive and one
//! transmit queue, a MAC address and the MTU in the configuration space (the MTU of the
//! interface the TAP mirrors: a guest with a larger one would send frames that interface
//! drops), checksum and TCP segmentation offloads both ways.
//!
//! Frames pass through whole, with their 12-byte `virtio_net_hdr_v1`: the TAP is opened with
//! `IFF_VNET_HDR` and its header size set to 12, so what the guest transmits is written to the
//! TAP as it is, and what the TAP gives is what the guest receives (the header's `num_buffers`
//! set to 1). The header is where the offloads live, and the host kernel is what acts on it:
//!
//! - transmit (`VIRTIO_NET_F_CSUM`, `HOST_TSO4`, `HOST_TSO6`): the guest may send a frame whose
//!   checksum is left to the host and a TCP segment of up to 64 KiB for the host to cut into
//!   MTU-sized ones. The TAP hands it to the host's stack as such (GSO), which checksums and
//!   segments it where it must (a veth and a bridge carry it whole, as they carry the host's
//!   own). The TAP's driver checks the header (`virtio_net_hdr_to_skb`) and refuses a bad one
//!   (the write fails, the frame is dropped and counted), as it does for any user.
//! - receive (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`): once the driver acks them, the TAP is
//!   told (`TUNSETOFFLOAD`) that its reader takes unchecksummed frames and 64 KiB segments, so
//!   the host's big TCP segments reach the guest whole instead of being cut and checksummed in
//!   software first.
//! - mergeable receive buffers (`MRG_RXBUF`): a frame goes into as many of the driver's
//!   receive buffers as it needs, their number in the header's `num_buffers`. Linux then posts
//!   buffers sized to its traffic, cut from larger pages, instead of 64 KiB ones of 17 pages
//!   and 18 descriptors each ("big packets"), of which a 256-entry ring holds 14 and every
//!   small frame (an ACK) takes a whole one, to be refilled with 17 pages. A frame waits, its
//!   buffers untouched, until enough are posted; one that every buffer of the ring cannot hold
//!   is dropped.
//!
//! One 64 KiB segment instead of 45 frames is one TAP read or write, one descriptor chain and
//! one interrupt instead of 45: the cost per frame is what bounds a VMM's throughput.
//!
//! Notifications are suppressed with event indices (`VIRTIO_RING_F_EVENT_IDX`): the device
//! asks for a transmit notification only for the first frame after those it has taken, and
//! for a receive one only when it ran out of buffers; the driver asks for an interrupt only
//! where it wants one (Linux's transmit path: after most of the frames in flight are sent).
//! Each notification and each interrupt is a VM exit or two (the notification's write, the
//! interrupt's status read and acknowledgement).
//!
//! The pod's side of the TAP (a TAP in the pod's network namespace, mirrored to its CNI
//! interface) is the shim's business; see `runtime-shim`'s `network` module.
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

/// The MAC address of a template's card: a locally administered one that no sandbox uses (a
/// restored guest's agent sets its sandbox's own, [`crate::config::NetConfig::renewal_params`]).
pub const TEMPLATE_CARD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// What a VM's card sits on: the sandbox's TAP, or nothing, in a template's guest (whose card
/// the driver sets up but never brings up: it has no address; a frame it sends anyway is
/// dropped). A sandbox restored from the template puts its TAP under the same card.
pub enum CardBackend {
    Tap(Tap),
    /// An eventfd that is never written, for the device thread to watch.
    Detached(vmm_sys_util::eventfd::EventFd),
}

impl CardBackend {
    /// A backend with no TAP.
    pub fn detached() -> std::io::Result<CardBackend> {
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map(CardBackend::Detached)
    }
}

impl std::os::fd::AsRawFd for CardBackend {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            CardBackend::Tap(tap) => tap.as_raw_fd(),
            CardBackend::Detached(evt) => evt.as_raw_fd(),
        }
    }
}

impl NetBackend for CardBackend {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self {
            CardBackend::Tap(tap) => tap.recv(buf),
            CardBackend::Detached(_) => Ok(None),
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        match self {
            CardBackend::Tap(tap) => tap.send(frame),
            CardBackend::Detached(_) => Ok(false),
        }
    }

    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
        match self {
            CardBackend::Tap(tap) => tap.set_offloads(flags),
            CardBackend::Detached(_) => Ok(()),
        }
    }
}

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which precedes every frame (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;
/// The longest frame with its header: a segmentation offload's largest segment (an IP packet
/// of 64 KiB, with an Ethernet header and a VLAN tag).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 14 + 4 + 65_535;
/// The most descriptors one chain may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Feature bit: the device takes frames with a partial checksum (the host completes it).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature bit: the driver takes frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature bit: the device gives the driver its MTU in the configuration space.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// Feature bit: the device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature bits: the driver takes TCP segments of up to 64 KiB over IPv4, IPv6.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature bits: the device takes TCP segments of up to 64 KiB over IPv4, IPv6.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature bit: the driver takes a frame spread over several receive buffers (each a chain of
/// its own), their number in the header's `num_buffers`.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;

/// The TAP's offload flags (`TUNSETOFFLOAD`): its reader takes partial checksums, TCP
/// segments over IPv4, over IPv6.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// The TAP offloads that fit what the driver acked: each receive offload it took, and the
/// segmentation ones only with the checksum one they depend on (virtio 5.1.3.1).
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    flags
}

/// A frame source and sink: the TAP device, or a socket pair in tests. Frames keep message
/// boundaries and carry the virtio-net header.
pub trait NetBackend: std::os::fd::AsRawFd + Send {
    /// Reads one frame into `buf`; `Ok(None)` when no frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// Writes one frame; `Ok(false)` when the backend has no room now (the frame is dropped,
    /// as a NIC drops on a full ring).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool>;
    /// Sets which offloads the frames [`NetBackend::recv`] gives may use (`TUN_F_*`).
    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()>;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_the_acked_receive_features() {
        let bits = |list: &[u32]| list.iter().fold(0u64, |acc, b| acc | (1 << b));
        assert_eq!(tap_offloads(0), 0);
        // Transmit offloads and the MAC are not the TAP reader's business.
        assert_eq!(
            tap_offloads(bits(&[
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_HOST_TSO4
            ])),
            0
        );
        assert_eq!(tap_offloads(bits(&[VIRTIO_NET_F_GUEST_CSUM])), TUN_F_CSUM);
        assert_eq!(
            tap_offloads(bits(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6
            ])),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
        // Segments without the checksum offload they depend on: none.
        assert_eq!(tap_offloads(bits(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    }
}
