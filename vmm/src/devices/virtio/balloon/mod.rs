//! The virtio memory balloon (virtio spec 5.5), used for what an idle sandbox costs the host:
//! **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`). The guest kernel hands the device
//! ranges of memory it has freed (whole free blocks of its buddy allocator, 2-4 MiB each, a
//! couple of seconds after they became free), and the device drops the host pages behind them
//! (`MADV_DONTNEED`): a guest that allocated and freed memory gives it back to the host, and the
//! memory its kernel touched while booting (the initramfs image, init sections) stops counting.
//! A discarded page reads as zeros again (anonymous guest RAM) or as the file it was mapped
//! from (a template's memory, a kernel segment), which is all a free page may hold.
//!
//! The classic balloon is there as the spec requires it (an inflate and a deflate queue), but the
//! device never asks for pages: its target (`num_pages`) is always 0. Pages a guest inflates on
//! its own are discarded like reported ones; deflating needs no work (a page comes back when the
//! guest touches it).
//!
//! Everything in a request is the guest's: page frame numbers and ranges are checked to be
//! page aligned and inside guest RAM, request sizes are bounded, and a bad request is consumed
//! and logged (rate limited) without touching memory.

mod device;
mod event_handler;
pub mod request;

pub use device::Balloon;

/// The inflate queue: arrays of page frame numbers the guest gives up.
pub const INFLATE_QUEUE: usize = 0;
/// The deflate queue: arrays of page frame numbers the guest takes back.
pub const DEFLATE_QUEUE: usize = 1;
/// The reporting queue: ranges of free guest memory (with `VIRTIO_BALLOON_F_REPORTING`; the
/// driver numbers its queues without the statistics and free page hinting queues it was not
/// offered, so this is the third).
pub const REPORTING_QUEUE: usize = 2;
/// Size of each queue (Linux needs at least 32 for reporting, its batch of ranges).
pub const QUEUE_SIZE: u16 = 256;
/// Feature bit: the device accepts free page reports.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Page frame numbers on the inflate and deflate queues count 4 KiB pages, whatever the guest's
/// page size.
pub const PFN_SHIFT: u32 = 12;
/// The most page frame numbers one inflate or deflate request may carry (Linux sends up to 256).
pub const MAX_PFNS_PER_REQUEST: usize = 1024;
/// The most descriptors one request may have (Linux reports up to 32 ranges at once).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Errors of the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The request has more descriptors than allowed.
    #[error("request has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// An inflate or deflate request carries more page frame numbers than allowed.
    #[error("request has more than {MAX_PFNS_PER_REQUEST} page frame numbers")]
    TooManyPfns,
    /// An inflate or deflate buffer is device-writable or not a whole number of PFNs.
    #[error("page frame number buffer of {len} bytes is malformed (writable: {writable})")]
    BadPfnBuffer { len: u32, writable: bool },
    /// A buffer lies outside guest memory.
    #[error("request buffer is outside guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// A range to discard is not page aligned, empty, or not inside one region of guest RAM.
    #[error("cannot discard {len:#x} bytes at guest address {addr:#x}: not page aligned or not in guest RAM")]
    BadRange { addr: u64, len: u64 },
    /// madvise refused to drop the pages.
    #[error("madvise(MADV_DONTNEED) failed")]
    Discard(#[source] std::io::Error),
}
