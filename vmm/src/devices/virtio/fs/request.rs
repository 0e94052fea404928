//! Serving one FUSE request: checking the guest's descriptor chain, then handing its
//! readable part (the request) and writable part (the reply) to the FUSE server.

use std::ops::Deref;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::{FsError, MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES};

/// The sizes of a checked chain's two parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainShape {
    /// Bytes the device may read (the request).
    pub readable: usize,
    /// Bytes the device may write (the reply).
    pub writable: usize,
}

/// Checks a chain before the server sees it: at most [`MAX_CHAIN_DESCRIPTORS`] descriptors,
/// readable ones first, at most [`MAX_REQUEST_BYTES`] each way, every buffer inside guest
/// memory, and a readable part.
pub fn check_chain<M>(chain: &DescriptorChain<M>) -> Result<ChainShape, FsError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut shape = ChainShape {
        readable: 0,
        writable: 0,
    };
    for (count, desc) in chain.clone().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(FsError::ChainTooLong);
        }
        let len = desc.len() as usize;
        let total = if desc.is_write_only() {
            &mut shape.writable
        } else {
            if shape.writable > 0 {
                return Err(FsError::ChainOrder);
            }
            &mut shape.readable
        };
        *total = total
            .checked_add(len)
            .filter(|t| *t <= MAX_REQUEST_BYTES)
            .ok_or(FsError::RequestTooLarge)?;
        if len > 0 && mem.get_slice(desc.addr(), len).is_err() {
            return Err(FsError::GuestMemory);
        }
    }
    if shape.readable == 0 {
        return Err(FsError::NoHeader);
    }
    Ok(shape)
}

/// Serves one request; returns the number of reply bytes written.
pub fn handle_chain<F>(
    server: &Server<F>,
    mem: &GuestMemoryMmap<()>,
    chain: DescriptorChain<&GuestMemoryMmap<()>>,
) -> Result<u32, FsError>
where
    F: FileSystem + Sync,
{
    check_chain(&chain)?;
    let reader =
        Reader::from_descriptor_chain(mem, chain.clone()).map_err(|_| FsError::GuestMemory)?;
    let writer = VirtioFsWriter::new(mem, chain).map_err(|_| FsError::GuestMemory)?;
    let written = server
        .handle_message(reader, writer.into(), None, None)
        .map_err(FsError::Fuse)?;
    // Bounded by MAX_REQUEST_BYTES.
    Ok(u32::try_from(written).unwrap_or(u32::MAX))
}
