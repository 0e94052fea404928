//! [`Vsock`]: the `VirtioDevice` side of the socket device, and its queue processing.

use std::path::Path;

use event_manager::EventOps;
use tracing::debug;
use virtio_queue::{QueueOwnedT, QueueT};

use super::packet::{parse_rx_chain, parse_tx_chain};
use super::unix::VsockUnixBackend;
use super::{VsockBackend, VsockError, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VSOCK_HOST_CID};
use crate::devices::virtio::{
    read_config_bytes, signal_used_queue, RateLimitedLog, VirtioDevice, VirtioDeviceState,
    VIRTIO_ID_VSOCK,
};

/// Counters of the socket device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockMetrics {
    /// Valid packets taken from the tx queue.
    pub tx_packets: u64,
    /// Tx chains dropped as malformed.
    pub tx_bad_chains: u64,
    /// Packets written to the rx queue.
    pub rx_packets: u64,
    /// Rx chains returned empty as malformed or unwritable.
    pub rx_bad_chains: u64,
}

/// The virtio socket device.
pub struct Vsock<B: VsockBackend = VsockUnixBackend> {
    pub(super) guest_cid: u64,
    pub(super) backend: B,
    /// Features, activation and reset; its `reset_pending` means: the backend's connections
    /// are to be dropped on the device thread.
    pub(super) state: VirtioDeviceState,
    pub(super) queue_sizes: [u16; 3],
    pub(super) metrics: VsockMetrics,
    pub(super) bad_chain_log: RateLimitedLog,
}

impl Vsock<VsockUnixBackend> {
    /// A socket device for guest `guest_cid` whose host side listens at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        Self::with_backend(guest_cid, VsockUnixBackend::new(guest_cid, uds_path)?)
    }

    /// Host connections wait until the guest connects to host port `ready_port` (see
    /// [`super::muxer::VsockMuxer::hold_until_ready`]).
    pub fn hold_until_ready(&mut self, ready_port: u32) {
        self.backend.muxer_mut().hold_until_ready(ready_port);
    }

    /// Host connections to guest port `port` pass while the others are held.
    pub fn exempt_from_gate(&mut self, port: u32) {
        self.backend.muxer_mut().exempt_from_gate(port);
    }

    /// Whether the guest said it is ready and no connection is open or owes the guest a
    /// packet: nothing of the host side would be lost by a snapshot now.
    pub fn ready_and_idle(&self) -> bool {
        let muxer = self.backend.muxer();
        muxer.gate_open() && muxer.connection_count() == 0 && !muxer.has_pending_rx()
    }
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    if cid <= VSOCK_HOST_CID || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

impl<B: VsockBackend> Vsock<B> {
    /// A socket device for guest `guest_cid` with the host side `backend`.
    pub fn with_backend(guest_cid: u64, backend: B) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        Ok(Self {
            guest_cid,
            backend,
            state: VirtioDeviceState::new("vsock").map_err(VsockError::EventFd)?,
            queue_sizes: [QUEUE_SIZE; 3],
            metrics: VsockMetrics::default(),
            bad_chain_log: RateLimitedLog::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host side.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The device's counters.
    pub fn metrics(&self) -> VsockMetrics {
        self.metrics
    }

    /// Takes every packet the guest queued on the tx queue to the backend.
    pub(super) fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(TXQ_INDEX) else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            match parse_tx_chain(&active.mem, chain, self.guest_cid) {
                Ok(pkt) => {
                    self.metrics.tx_packets += 1;
                    self.backend.send_pkt(pkt, ops);
                }
                Err(e) => {
                    self.metrics.tx_bad_chains += 1;
                    if self.bad_chain_log.should_log() {
                        debug!(
                            count = self.metrics.tx_bad_chains,
                            "vsock: dropped tx chain: {e}"
                        );
                    }
                }
            }
            match queue.add_used(&active.mem, head, 0) {
                Ok(()) => used_any = true,
                Err(e) => debug!("vsock: tx add_used failed: {e}"),
            }
        }
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
    }

    /// Fills rx buffers with the backend's packets while both last.
    pub(super) fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(RXQ_INDEX) else {
            return;
        };
        let mut used_any = false;
        while self.backend.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match parse_rx_chain(chain) {
                Ok(buffers) => match self.backend.recv_pkt(buffers.max_data_len(), ops) {
                    None => {
                        // Nothing after all: leave the buffer for the next packet.
                        queue.go_to_previous_position();
                        break;
                    }
                    Some(pkt) => match buffers.write_packet(&active.mem, &pkt) {
                        Ok(len) => {
                            self.metrics.rx_packets += 1;
                            len
                        }
                        Err(e) => {
                            self.metrics.rx_bad_chains += 1;
                            if self.bad_chain_log.should_log() {
                                debug!("vsock: rx packet lost to a bad buffer: {e}");
                            }
                            0
                        }
                    },
                },
                Err(e) => {
                    self.metrics.rx_bad_chains += 1;
                    if self.bad_chain_log.should_log() {
                        debug!(
                            count = self.metrics.rx_bad_chains,
                            "vsock: dropped rx chain: {e}"
                        );
                    }
                    0
                }
            };
            match queue.add_used(&active.mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => debug!("vsock: rx add_used failed: {e}"),
            }
        }
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "vsock: ignored write to read-only config space"
        );
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, IrqTrigger};
    use std::sync::Arc;

    use crate::devices::virtio::test_utils::test_memory;
    use crate::devices::virtio::vsock::packet::VsockPacket;
    use crate::devices::virtio::vsock::test_utils::{
        guest_hdr, TestBackend, VsockTestContext, GUEST_CID,
    };
    use crate::devices::virtio::vsock::{VSOCK_OP_REQUEST, VSOCK_OP_RW};

    #[test]
    fn identifies_as_vsock_with_cid_in_config() {
        let dev = Vsock::with_backend(0x1_2345_6789, TestBackend::new());
        assert!(matches!(dev, Err(VsockError::InvalidCid(0x1_2345_6789))));
        let dev = Vsock::with_backend(0x0102_0304, TestBackend::new()).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(dev.avail_features(), 1 << 32);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [4, 3, 2, 1, 0, 0, 0, 0]);
        let mut tail = [0xaau8; 4];
        dev.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0xaa, 0xaa]);
        dev.read_config(u64::MAX, &mut tail);
    }

    #[test]
    fn reserved_cids_are_refused() {
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            assert!(matches!(
                Vsock::with_backend(cid, TestBackend::new()),
                Err(VsockError::InvalidCid(c)) if c == cid
            ));
        }
    }

    #[test]
    fn activate_checks_queue_count_and_twice() {
        let mut dev = Vsock::with_backend(GUEST_CID, TestBackend::new()).unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let err = dev
            .activate(test_memory(), irq.clone(), vec![], vec![])
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 3,
                got: 0
            }
        ));
        let ctx = VsockTestContext::new_test();
        let mut dev = ctx.device.lock().unwrap();
        let err = dev
            .activate(test_memory(), irq, vec![], vec![])
            .unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActivated));
    }

    #[test]
    fn reset_resets_backend_on_device_thread() {
        let mut ctx = VsockTestContext::new_test();
        ctx.device.lock().unwrap().set_acked_features(1 << 32);
        ctx.reset();
        let dev = ctx.device.lock().unwrap();
        assert!(!dev.is_activated());
        assert_eq!(dev.acked_features(), 0);
        assert_eq!(dev.backend().resets, 1);
        assert!(dev.state.stale_queue_evts.is_empty());
    }

    #[test]
    fn tx_packet_reaches_backend_and_buffer_is_returned() {
        let mut ctx = VsockTestContext::new_test();
        ctx.guest_send(guest_hdr(VSOCK_OP_RW, 1000, 52), b"hello");
        assert_eq!(ctx.txq.take_used(), vec![(0, 0)]);
        assert_eq!(ctx.irq.irq_status(), 1);
        let dev = ctx.device.lock().unwrap();
        assert_eq!(dev.backend().sent.len(), 1);
        assert_eq!(dev.backend().sent[0].data, b"hello");
        assert_eq!(dev.backend().sent[0].hdr.dst_port, 52);
        assert_eq!(dev.metrics().tx_packets, 1);
    }

    #[test]
    fn malformed_tx_chains_are_consumed_and_counted() {
        let mut ctx = VsockTestContext::new_test();
        // Too short for a header.
        ctx.txq.add_chain(&[(0x10_0000, 20, false)]);
        // Write-only descriptor.
        ctx.txq.add_chain(&[(0x10_0000, 44, true)]);
        // Outside guest memory.
        ctx.txq.add_chain(&[(0xffff_0000_0000, 44, false)]);
        ctx.notify(crate::devices::virtio::vsock::TXQ_INDEX);
        assert_eq!(ctx.txq.take_used(), vec![(0, 0), (1, 0), (2, 0)]);
        // A wrong source cid.
        let mut hdr = guest_hdr(VSOCK_OP_REQUEST, 1000, 52);
        hdr.src_cid = 7;
        ctx.guest_send(hdr, b"");
        let dev = ctx.device.lock().unwrap();
        assert!(dev.backend().sent.is_empty());
        assert_eq!(dev.metrics().tx_bad_chains, 4);
    }

    #[test]
    fn rx_packet_waits_for_a_buffer() {
        let mut ctx = VsockTestContext::new_test();
        let pkt = VsockPacket::control(1 << 30, GUEST_CID, 1024, VSOCK_OP_REQUEST);
        ctx.device
            .lock()
            .unwrap()
            .backend
            .to_guest
            .push_back(pkt.clone());
        ctx.device.lock().unwrap().backend.evt.write(1).unwrap();
        ctx.pump();
        assert_eq!(ctx.irq.irq_status(), 0);
        assert!(ctx.take_rx().is_empty());
        ctx.add_rx_buffers(2);
        assert_eq!(ctx.take_rx(), vec![pkt]);
        assert_eq!(ctx.irq.irq_status(), 1);
        // The second buffer stays with the device.
        assert!(ctx.rxq.take_used().is_empty());
        assert_eq!(ctx.device.lock().unwrap().metrics().rx_packets, 1);
    }

    #[test]
    fn read_only_rx_buffer_is_returned_empty() {
        let mut ctx = VsockTestContext::new_test();
        let pkt = VsockPacket::control(1 << 30, GUEST_CID, 1024, VSOCK_OP_REQUEST);
        ctx.device
            .lock()
            .unwrap()
            .backend
            .to_guest
            .push_back(pkt.clone());
        ctx.rxq.add_chain(&[(0x80_0000, 4096, false)]);
        ctx.notify(crate::devices::virtio::vsock::RXQ_INDEX);
        assert_eq!(ctx.rxq.take_used(), vec![(0, 0)]);
        assert_eq!(ctx.device.lock().unwrap().metrics().rx_bad_chains, 1);
        // The packet is still delivered into the next good buffer.
        ctx.add_rx_buffers(1);
        assert_eq!(ctx.take_rx(), vec![pkt]);
    }

    #[test]
    fn no_interrupt_without_used_buffers() {
        let mut ctx = VsockTestContext::new_test();
        ctx.add_rx_buffers(4);
        ctx.notify(crate::devices::virtio::vsock::TXQ_INDEX);
        assert_eq!(ctx.irq.irq_status(), 0);
    }
}
