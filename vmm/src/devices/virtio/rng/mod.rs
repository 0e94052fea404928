//! The virtio entropy device (virtio spec 5.4): one request queue whose device-writable
//! buffers the host fills with random bytes.

mod device;
mod event_handler;
pub mod request;

pub use device::Rng;
pub use request::fill_request;

/// The request queue.
pub const REQ_QUEUE: usize = 0;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most random bytes given for one request; the driver asks again for more.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The most descriptors one request may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The host could not produce random bytes.
    #[error("getrandom failed")]
    GetRandom(#[source] std::io::Error),
    /// The request contains a device-readable buffer.
    #[error("request has a device-readable descriptor")]
    ReadOnlyDescriptor,
    /// The request has more descriptors than allowed.
    #[error("request has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A buffer lies outside guest memory.
    #[error("request buffer is outside guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}
