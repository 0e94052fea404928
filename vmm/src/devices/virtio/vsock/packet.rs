//! Parsing and validation of vsock packets in guest descriptor chains.
//!
//! Everything here treats guest memory as hostile: descriptor counts, lengths, directions and
//! addresses are checked before any byte is copied, and a bad chain yields a [`PacketError`],
//! never a panic. Packets are copied out of (and into) guest memory, so nothing keeps a
//! reference into guest memory past a call.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::{
    VSOCK_HOST_CID, VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST,
    VSOCK_OP_RESPONSE, VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_TYPE_STREAM,
};

/// Size of the packed `struct virtio_vsock_hdr`.
pub const VSOCK_PKT_HDR_SIZE: usize = 44;
/// The largest payload one packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA_SIZE: usize = 64 * 1024;
/// The most descriptors one packet's chain may have.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain has no descriptor at all (bad head index or unreadable table).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain has more descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS}")]
    ChainTooLong,
    /// A tx chain contains a device-writable descriptor.
    #[error("device-writable descriptor in a tx chain")]
    UnexpectedWriteOnlyDescriptor,
    /// An rx chain contains a device-readable descriptor.
    #[error("device-readable descriptor in an rx chain")]
    UnexpectedReadOnlyDescriptor,
    /// The buffers cannot hold a header.
    #[error("buffers of {0} bytes cannot hold a packet header")]
    HeaderTooShort(u64),
    /// The header's len field exceeds [`MAX_PKT_DATA_SIZE`].
    #[error("packet length {0} is too large")]
    LenTooLarge(u32),
    /// The header's len field exceeds the buffers after the header.
    #[error("packet length {len} exceeds the {available} bytes of buffers")]
    LenExceedsBuffers { len: u32, available: u64 },
    /// Unknown op field.
    #[error("unknown op {0}")]
    UnknownOp(u16),
    /// Unknown or unsupported socket type.
    #[error("unsupported socket type {0}")]
    UnknownType(u16),
    /// The source CID is not the guest's.
    #[error("source cid {0} is not the guest's")]
    BadSrcCid(u64),
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// The rx buffers cannot hold the packet.
    #[error("rx buffers of {capacity} bytes cannot hold a packet of {needed}")]
    RxBufferTooSmall { capacity: usize, needed: usize },
}

/// The vsock packet header (`struct virtio_vsock_hdr`, little endian, packed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; VSOCK_PKT_HDR_SIZE]) -> Self {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; VSOCK_PKT_HDR_SIZE] {
        let mut b = [0u8; VSOCK_PKT_HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One packet, copied out of (or to be copied into) guest memory. `data` is only non-empty
/// for `VSOCK_OP_RW`, and then `hdr.len == data.len()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

impl VsockPacket {
    /// A host-to-guest control packet (no payload) of `op`.
    pub fn control(src_port: u32, dst_cid: u64, dst_port: u32, op: u16) -> Self {
        Self {
            hdr: VsockHeader {
                src_cid: VSOCK_HOST_CID,
                dst_cid,
                src_port,
                dst_port,
                type_: VSOCK_TYPE_STREAM,
                op,
                ..VsockHeader::default()
            },
            data: Vec::new(),
        }
    }

    /// A reset answering `pkt` (source and destination swapped).
    pub fn rst_reply_to(hdr: &VsockHeader) -> Self {
        let mut pkt = Self::control(hdr.dst_port, hdr.src_cid, hdr.src_port, VSOCK_OP_RST);
        pkt.hdr.src_cid = hdr.dst_cid;
        pkt
    }
}

fn is_known_op(op: u16) -> bool {
    matches!(
        op,
        VSOCK_OP_REQUEST
            | VSOCK_OP_RESPONSE
            | VSOCK_OP_RST
            | VSOCK_OP_SHUTDOWN
            | VSOCK_OP_RW
            | VSOCK_OP_CREDIT_UPDATE
            | VSOCK_OP_CREDIT_REQUEST
    )
}

/// Collects at most [`MAX_CHAIN_DESCRIPTORS`] descriptors, all in the expected direction.
fn collect_descriptors<I>(descs: I, device_writable: bool) -> Result<Vec<Descriptor>, PacketError>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut out = Vec::new();
    for desc in descs {
        if out.len() == MAX_CHAIN_DESCRIPTORS {
            return Err(PacketError::ChainTooLong);
        }
        match (desc.is_write_only(), device_writable) {
            (true, false) => return Err(PacketError::UnexpectedWriteOnlyDescriptor),
            (false, true) => return Err(PacketError::UnexpectedReadOnlyDescriptor),
            _ => out.push(desc),
        }
    }
    if out.is_empty() {
        return Err(PacketError::EmptyChain);
    }
    Ok(out)
}

/// Copies `buf.len()` bytes starting `skip` bytes into the chain `descs`.
fn gather<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0usize;
    for desc in descs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(desc.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        // `len - skip` fits the remaining buffer size or is cut to it.
        let n = usize::try_from(len - skip)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let addr = desc
            .addr()
            .checked_add(skip)
            .ok_or(PacketError::GuestMemory(
                GuestMemoryError::InvalidGuestAddress(desc.addr()),
            ))?;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(PacketError::GuestMemory)?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// Parses and validates one packet the guest queued on the tx queue.
///
/// Checks the chain (count, direction, addresses), the header (length, op, type, source CID)
/// and that `len` fits both [`MAX_PKT_DATA_SIZE`] and the buffers. The destination CID is left
/// to the muxer, which answers packets for other CIDs with a reset. This is the entry point
/// for fuzzing guest tx chains.
pub fn parse_tx_chain<M, I>(mem: &M, descs: I, guest_cid: u64) -> Result<VsockPacket, PacketError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    let descs = collect_descriptors(descs, false)?;
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total < VSOCK_PKT_HDR_SIZE as u64 {
        return Err(PacketError::HeaderTooShort(total));
    }
    let mut hdr_bytes = [0u8; VSOCK_PKT_HDR_SIZE];
    gather(mem, &descs, 0, &mut hdr_bytes)?;
    let hdr = VsockHeader::from_bytes(&hdr_bytes);

    if hdr.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid(hdr.src_cid));
    }
    if !is_known_op(hdr.op) {
        return Err(PacketError::UnknownOp(hdr.op));
    }
    if hdr.type_ != VSOCK_TYPE_STREAM {
        return Err(PacketError::UnknownType(hdr.type_));
    }
    if hdr.len as usize > MAX_PKT_DATA_SIZE {
        return Err(PacketError::LenTooLarge(hdr.len));
    }
    let available = total - VSOCK_PKT_HDR_SIZE as u64;
    if u64::from(hdr.len) > available {
        return Err(PacketError::LenExceedsBuffers {
            len: hdr.len,
            available,
        });
    }
    let mut data = Vec::new();
    if hdr.op == VSOCK_OP_RW {
        data = vec![0u8; hdr.len as usize];
        gather(mem, &descs, VSOCK_PKT_HDR_SIZE as u64, &mut data)?;
    }
    Ok(VsockPacket { hdr, data })
}

/// The device-writable buffers of one rx chain.
#[derive(Debug)]
pub struct RxBuffers {
    descs: Vec<Descriptor>,
    capacity: usize,
}

impl RxBuffers {
    /// Total bytes the buffers hold (capped at header + [`MAX_PKT_DATA_SIZE`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest payload a packet written here may carry.
    pub fn max_data_len(&self) -> usize {
        self.capacity.saturating_sub(VSOCK_PKT_HDR_SIZE)
    }

    /// Writes `pkt` (header, then payload) into the buffers; returns the bytes written.
    pub fn write_packet<M: GuestMemory>(
        &self,
        mem: &M,
        pkt: &VsockPacket,
    ) -> Result<u32, PacketError> {
        let needed = VSOCK_PKT_HDR_SIZE + pkt.data.len();
        if needed > self.capacity {
            return Err(PacketError::RxBufferTooSmall {
                capacity: self.capacity,
                needed,
            });
        }
        let mut hdr = pkt.hdr;
        // The payload length bounds the header's len (at most MAX_PKT_DATA_SIZE).
        hdr.len = u32::try_from(pkt.data.len()).unwrap_or(u32::MAX);
        let hdr_bytes = hdr.to_bytes();
        let mut sources: [&[u8]; 2] = [&hdr_bytes, &pkt.data];
        for desc in &self.descs {
            let mut offset = 0u64;
            let len = u64::from(desc.len());
            while offset < len {
                let Some(src) = sources.iter_mut().find(|s| !s.is_empty()) else {
                    break;
                };
                let n = usize::try_from(len - offset)
                    .unwrap_or(usize::MAX)
                    .min(src.len());
                let addr: GuestAddress =
                    desc.addr()
                        .checked_add(offset)
                        .ok_or(PacketError::GuestMemory(
                            GuestMemoryError::InvalidGuestAddress(desc.addr()),
                        ))?;
                mem.write_slice(&src[..n], addr)
                    .map_err(PacketError::GuestMemory)?;
                *src = &src[n..];
                offset += n as u64;
            }
        }
        // `needed` is at most header + MAX_PKT_DATA_SIZE.
        Ok(u32::try_from(needed).unwrap_or(u32::MAX))
    }
}

/// Validates one chain the guest queued on the rx queue: only device-writable descriptors,
/// at most [`MAX_CHAIN_DESCRIPTORS`], room for at least a header. Addresses are checked when
/// written.
pub fn parse_rx_chain<I>(descs: I) -> Result<RxBuffers, PacketError>
where
    I: IntoIterator<Item = Descriptor>,
{
    let descs = collect_descriptors(descs, true)?;
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total < VSOCK_PKT_HDR_SIZE as u64 {
        return Err(PacketError::HeaderTooShort(total));
    }
    let max = (VSOCK_PKT_HDR_SIZE + MAX_PKT_DATA_SIZE) as u64;
    // At most header + MAX_PKT_DATA_SIZE, which fits usize.
    let capacity = usize::try_from(total.min(max)).unwrap_or(VSOCK_PKT_HDR_SIZE);
    Ok(RxBuffers { descs, capacity })
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        test_memory, GuestQueue, RawDesc, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryMmap;

    const GUEST_CID: u64 = 3;

    fn rw_header(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1000,
            dst_port: 2000,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    /// Publishes `descs` (raw) with head 0 and parses the chain the device pops.
    fn parse_raw(mem: &GuestMemoryMmap<()>, descs: &[RawDesc]) -> Result<VsockPacket, PacketError> {
        let mut gq = GuestQueue::new(mem, 0x10000, 16);
        for (i, d) in descs.iter().enumerate() {
            gq.write_desc(i as u16, *d);
        }
        gq.publish(0);
        let mut q = gq.create_queue();
        let chain = q.pop_descriptor_chain(mem).expect("chain");
        parse_tx_chain(mem, chain, GUEST_CID)
    }

    fn write_pkt(mem: &GuestMemoryMmap<()>, hdr: &VsockHeader, data: &[u8]) {
        mem.write_slice(&hdr.to_bytes(), GuestAddress(0x20000))
            .unwrap();
        mem.write_slice(data, GuestAddress(0x30000)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags,
            next,
        }
    }

    #[test]
    fn header_roundtrips_through_wire_format() {
        let hdr = rw_header(5);
        assert_eq!(VsockHeader::from_bytes(&hdr.to_bytes()), hdr);
        assert_eq!(hdr.to_bytes()[24..28], 5u32.to_le_bytes());
    }

    #[test]
    fn parses_header_and_data_in_two_descriptors() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(5), b"hello");
        let pkt = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(0x30000, 5, 0, 0),
            ],
        )
        .unwrap();
        assert_eq!(pkt.hdr, rw_header(5));
        assert_eq!(pkt.data, b"hello");
    }

    #[test]
    fn parses_header_split_across_descriptors() {
        let mem = test_memory();
        let hdr = rw_header(3);
        let bytes = hdr.to_bytes();
        mem.write_slice(&bytes[..10], GuestAddress(0x20000))
            .unwrap();
        mem.write_slice(&bytes[10..], GuestAddress(0x21000))
            .unwrap();
        mem.write_slice(b"abc", GuestAddress(0x21000 + 34)).unwrap();
        let pkt = parse_raw(
            &mem,
            &[
                desc(0x20000, 10, VRING_DESC_F_NEXT, 1),
                desc(0x21000, 37, 0, 0),
            ],
        )
        .unwrap();
        assert_eq!(pkt.hdr, hdr);
        assert_eq!(pkt.data, b"abc");
    }

    #[test]
    fn control_packet_payload_is_not_copied() {
        let mem = test_memory();
        let mut hdr = rw_header(0);
        hdr.op = VSOCK_OP_REQUEST;
        write_pkt(&mem, &hdr, b"");
        let pkt = parse_raw(&mem, &[desc(0x20000, 44, 0, 0)]).unwrap();
        assert_eq!(pkt.hdr.op, VSOCK_OP_REQUEST);
        assert!(pkt.data.is_empty());
    }

    #[test]
    fn header_too_short_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(0), b"");
        let err = parse_raw(&mem, &[desc(0x20000, 43, 0, 0)]).unwrap_err();
        assert!(matches!(err, PacketError::HeaderTooShort(43)));
    }

    #[test]
    fn len_beyond_buffers_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(100), b"");
        let err = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(0x30000, 99, 0, 0),
            ],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            PacketError::LenExceedsBuffers {
                len: 100,
                available: 99
            }
        ));
    }

    #[test]
    fn len_above_max_packet_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(u32::MAX), b"");
        let err = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(0x30000, u32::MAX, 0, 0),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, PacketError::LenTooLarge(u32::MAX)));
    }

    #[test]
    fn out_of_bounds_buffer_is_refused() {
        let mem = test_memory();
        let err = parse_raw(&mem, &[desc(0xffff_ffff_ffff_fff0, 44, 0, 0)]).unwrap_err();
        assert!(matches!(err, PacketError::GuestMemory(_)));
        write_pkt(&mem, &rw_header(16), b"");
        let err = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(0x10_0000_0000, 16, 0, 0),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, PacketError::GuestMemory(_)));
        // A buffer straddling the end of guest memory.
        let end = crate::devices::virtio::test_utils::TEST_MEM_SIZE as u64;
        let err = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(end - 8, 16, 0, 0),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, PacketError::GuestMemory(_)));
    }

    #[test]
    fn write_only_descriptor_in_tx_chain_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(0), b"");
        let err = parse_raw(&mem, &[desc(0x20000, 44, VRING_DESC_F_WRITE, 0)]).unwrap_err();
        assert!(matches!(err, PacketError::UnexpectedWriteOnlyDescriptor));
    }

    #[test]
    fn descriptor_loop_terminates_and_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(1000), b"");
        // 0 -> 1 -> 0 -> ...: virtio-queue stops after queue-size (16) descriptors, whose
        // 16 * 44 bytes cannot hold the 1000 bytes the header claims.
        let looped = parse_raw(
            &mem,
            &[
                desc(0x20000, 44, VRING_DESC_F_NEXT, 1),
                desc(0x20000, 44, VRING_DESC_F_NEXT, 0),
            ],
        );
        assert!(matches!(
            looped,
            Err(PacketError::LenExceedsBuffers {
                len: 1000,
                available: 660
            })
        ));
        let self_loop = parse_raw(&mem, &[desc(0x20000, 44, VRING_DESC_F_NEXT, 0)]);
        assert!(matches!(
            self_loop,
            Err(PacketError::LenExceedsBuffers {
                len: 1000,
                available: 660
            })
        ));
    }

    #[test]
    fn over_long_chain_is_refused() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(0), b"");
        // A 256-entry queue whose chain loops forever: virtio-queue yields 256 descriptors,
        // more than MAX_CHAIN_DESCRIPTORS.
        let mut gq = GuestQueue::new(&mem, 0x10000, 256);
        for i in 0..256u16 {
            gq.write_desc(i, desc(0x20000, 44, VRING_DESC_F_NEXT, (i + 1) % 256));
        }
        gq.publish(0);
        let mut q = gq.create_queue();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let err = parse_tx_chain(&mem, chain, GUEST_CID).unwrap_err();
        assert!(matches!(err, PacketError::ChainTooLong));
    }

    #[test]
    fn next_index_beyond_queue_ends_the_chain() {
        let mem = test_memory();
        write_pkt(&mem, &rw_header(5), b"hello");
        let err = parse_raw(&mem, &[desc(0x20000, 44, VRING_DESC_F_NEXT, 999)]).unwrap_err();
        assert!(matches!(
            err,
            PacketError::LenExceedsBuffers {
                len: 5,
                available: 0
            }
        ));
    }

    #[test]
    fn unknown_op_type_and_foreign_src_cid_are_refused() {
        let mem = test_memory();
        let mut hdr = rw_header(0);
        hdr.op = 99;
        write_pkt(&mem, &hdr, b"");
        assert!(matches!(
            parse_raw(&mem, &[desc(0x20000, 44, 0, 0)]),
            Err(PacketError::UnknownOp(99))
        ));
        let mut hdr = rw_header(0);
        hdr.type_ = 2;
        write_pkt(&mem, &hdr, b"");
        assert!(matches!(
            parse_raw(&mem, &[desc(0x20000, 44, 0, 0)]),
            Err(PacketError::UnknownType(2))
        ));
        let mut hdr = rw_header(0);
        hdr.src_cid = 2;
        write_pkt(&mem, &hdr, b"");
        assert!(matches!(
            parse_raw(&mem, &[desc(0x20000, 44, 0, 0)]),
            Err(PacketError::BadSrcCid(2))
        ));
    }

    #[test]
    fn rx_chain_with_read_only_descriptor_is_refused() {
        let d = Descriptor::new(0x20000, 4096, 0, 0);
        assert!(matches!(
            parse_rx_chain([d]),
            Err(PacketError::UnexpectedReadOnlyDescriptor)
        ));
        let small = Descriptor::new(0x20000, 43, VRING_DESC_F_WRITE, 0);
        assert!(matches!(
            parse_rx_chain([small]),
            Err(PacketError::HeaderTooShort(43))
        ));
        assert!(matches!(parse_rx_chain([]), Err(PacketError::EmptyChain)));
    }

    #[test]
    fn rx_packet_is_scattered_over_buffers() {
        let mem = test_memory();
        let bufs = parse_rx_chain([
            Descriptor::new(0x20000, 30, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            Descriptor::new(0x30000, 100, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert_eq!(bufs.capacity(), 130);
        assert_eq!(bufs.max_data_len(), 86);
        let pkt = VsockPacket {
            hdr: rw_header(0),
            data: b"payload".to_vec(),
        };
        assert_eq!(bufs.write_packet(&mem, &pkt).unwrap(), 51);
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw[..30], GuestAddress(0x20000))
            .unwrap();
        mem.read_slice(&mut raw[30..], GuestAddress(0x30000))
            .unwrap();
        assert_eq!(VsockHeader::from_bytes(&raw), rw_header(7));
        let mut data = [0u8; 7];
        mem.read_slice(&mut data, GuestAddress(0x30000 + 14))
            .unwrap();
        assert_eq!(&data, b"payload");
        let too_big = VsockPacket {
            hdr: rw_header(0),
            data: vec![0; 87],
        };
        assert!(matches!(
            bufs.write_packet(&mem, &too_big),
            Err(PacketError::RxBufferTooSmall {
                capacity: 130,
                needed: 131
            })
        ));
    }

    #[test]
    fn rx_buffer_outside_memory_fails_the_write() {
        let mem = test_memory();
        let bufs =
            parse_rx_chain([Descriptor::new(0x10_0000_0000, 4096, VRING_DESC_F_WRITE, 0)]).unwrap();
        let pkt = VsockPacket {
            hdr: rw_header(0),
            data: vec![],
        };
        assert!(matches!(
            bufs.write_packet(&mem, &pkt),
            Err(PacketError::GuestMemory(_))
        ));
    }
}
