//! [`Balloon`]: the `VirtioDevice` side of the memory balloon.

use tracing::debug;
use virtio_queue::QueueT;

use super::request::{discard, pfn_ranges, reported_ranges, Range};
use super::{
    BalloonError, DEFLATE_QUEUE, INFLATE_QUEUE, QUEUE_SIZE, REPORTING_QUEUE,
    VIRTIO_BALLOON_F_REPORTING,
};
use crate::devices::virtio::{
    read_config_bytes, signal_used_queue, RateLimitedLog, VirtioDevice, VirtioDeviceState,
    VIRTIO_ID_BALLOON,
};

/// The memory balloon: free page reporting, and a classic balloon whose target is always 0.
pub struct Balloon {
    pub(super) state: VirtioDeviceState,
    pub(super) queue_sizes: [u16; 3],
    /// The `actual` field of the configuration space: the pages the driver says it holds.
    actual: u32,
    pub(super) bad_request_log: RateLimitedLog,
    /// Bytes of guest memory whose host pages were dropped.
    bytes_discarded: u64,
}

impl Balloon {
    /// Creates an inactive balloon that offers free page reporting.
    pub fn new() -> Result<Self, BalloonError> {
        let mut state = VirtioDeviceState::new("virtio-balloon").map_err(BalloonError::EventFd)?;
        state.avail_features |= 1 << VIRTIO_BALLOON_F_REPORTING;
        Ok(Self {
            state,
            queue_sizes: [QUEUE_SIZE; 3],
            actual: 0,
            bad_request_log: RateLimitedLog::default(),
            bytes_discarded: 0,
        })
    }

    /// Bytes of guest memory handed back to the host so far (reported or inflated).
    pub fn bytes_discarded(&self) -> u64 {
        self.bytes_discarded
    }

    /// Serves every available request of queue `index`; interrupts the guest if any was
    /// completed. A request that is malformed is consumed without touching memory; in a
    /// well-formed one, each range is checked and discarded on its own.
    pub(super) fn process_queue(&mut self, index: usize) {
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let ranges: Result<Vec<Range>, BalloonError> = match index {
                INFLATE_QUEUE => pfn_ranges(&active.mem, chain),
                // The guest takes pages back by touching them; nothing to do but check.
                DEFLATE_QUEUE => pfn_ranges(&active.mem, chain).map(|_| Vec::new()),
                REPORTING_QUEUE => reported_ranges(chain),
                _ => Ok(Vec::new()),
            };
            match ranges {
                Ok(ranges) => {
                    for (addr, len) in ranges {
                        match discard(&active.mem, addr, len) {
                            Ok(()) => self.bytes_discarded += len,
                            Err(e) => log_bad(&mut self.bad_request_log, index, &e),
                        }
                    }
                }
                Err(e) => log_bad(&mut self.bad_request_log, index, &e),
            }
            if let Err(e) = queue.add_used(&active.mem, head, 0) {
                debug!("virtio-balloon: add_used failed: {e}");
                continue;
            }
            used_any = true;
        }
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
    }
}

fn log_bad(log: &mut RateLimitedLog, queue: usize, e: &BalloonError) {
    if log.should_log() {
        debug!(
            queue,
            count = log.count(),
            "virtio-balloon: bad request: {e}"
        );
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
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
        // struct virtio_balloon_config { le32 num_pages; le32 actual; }: the target is 0 pages.
        let mut config = [0u8; 8];
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        match (offset, <[u8; 4]>::try_from(data)) {
            (4, Ok(bytes)) => self.actual = u32::from_le_bytes(bytes),
            _ => debug!(
                offset,
                len = data.len(),
                "virtio-balloon: ignored write to the config space"
            ),
        }
    }
}
