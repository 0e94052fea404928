//! The virtio-mmio transport, version 2 ("modern") register layout (virtio spec 4.2.2).
//!
//! The guest drives the device status state machine through these registers; every access of
//! any width at any offset is checked, and a bad sequence is ignored (with a rate-limited
//! warning) or sets `DEVICE_NEEDS_RESET`, never panics.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    IrqTrigger, RateLimitedLog, VirtioDevice, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;

/// Size of one device's MMIO window (`virtio_mmio.device=4K@...`).
pub const MMIO_REGION_SIZE: u64 = 0x1000;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID.
pub const MMIO_VENDOR_ID: u32 = 0;

/// Register offsets (virtio spec 4.2.2, table "MMIO Device Register Layout").
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = 0x000;
pub const VIRTIO_MMIO_VERSION: u64 = 0x004;
pub const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;
pub const VIRTIO_MMIO_VENDOR_ID: u64 = 0x00c;
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = 0x010;
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = 0x020;
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = 0x030;
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = 0x034;
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = 0x038;
pub const VIRTIO_MMIO_QUEUE_READY: u64 = 0x044;
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = 0x060;
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = 0x064;
pub const VIRTIO_MMIO_STATUS: u64 = 0x070;
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = 0x080;
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = 0x0a0;
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const VIRTIO_MMIO_SHM_SEL: u64 = 0x0ac;
pub const VIRTIO_MMIO_SHM_LEN_LOW: u64 = 0x0b0;
pub const VIRTIO_MMIO_SHM_LEN_HIGH: u64 = 0x0b4;
pub const VIRTIO_MMIO_SHM_BASE_LOW: u64 = 0x0b8;
pub const VIRTIO_MMIO_SHM_BASE_HIGH: u64 = 0x0bc;
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = 0x0fc;
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;

/// The transport side of one virtio-mmio device: register file, device status, queue
/// configuration until activation.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap<()>,
    irq_trigger: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    bad_access_log: RateLimitedLog,
}

impl MmioTransport {
    /// Creates the transport for `device`, with one notification eventfd per queue.
    pub fn new(mem: GuestMemoryMmap<()>, device: Arc<Mutex<dyn VirtioDevice>>) -> io::Result<Self> {
        let max_sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for max_size in max_sizes {
            let queue = Queue::new(max_size).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad queue size: {e}"))
            })?;
            queues.push(queue);
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            irq_trigger: Arc::new(IrqTrigger::new()?),
            queues,
            queue_evts,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            bad_access_log: RateLimitedLog::default(),
        })
    }

    /// One notification eventfd per queue; the builder registers each as an ioeventfd at
    /// `base + VIRTIO_MMIO_QUEUE_NOTIFY` with datamatch = queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt line; the builder registers its eventfd as an irqfd.
    pub fn irq_trigger(&self) -> &Arc<IrqTrigger> {
        &self.irq_trigger
    }

    /// The current device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    fn warn_bad_access(&mut self, what: &str, offset: u64, len: usize) {
        if self.bad_access_log.should_log() {
            warn!(
                offset,
                len,
                status = self.device_status,
                count = self.bad_access_log.count(),
                "virtio-mmio: ignored guest access: {what}"
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn status_has(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    /// Queue registers are writable after FEATURES_OK and before DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status_has(VIRTIO_CONFIG_S_FEATURES_OK)
            && !self.status_has(VIRTIO_CONFIG_S_DRIVER_OK)
            && !self.status_has(VIRTIO_CONFIG_S_FAILED)
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let value = match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.irq_trigger.read_status(),
            VIRTIO_MMIO_STATUS => self.device_status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a length (and base) of all ones says so (spec 4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => return None,
        };
        Some(value)
    }

    fn write_register(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => return self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_SHM_SEL => {}
            VIRTIO_MMIO_QUEUE_NOTIFY => return self.notify_queue(value),
            // The read of InterruptStatus cleared what the guest acknowledges (see
            // `IrqTrigger`); the builder keeps these writes inside KVM.
            VIRTIO_MMIO_INTERRUPT_ACK => {}
            VIRTIO_MMIO_STATUS => return self.write_status(value),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => return self.write_queue_register(offset, value),
            _ => return false,
        }
        true
    }

    fn write_driver_features(&mut self, value: u32) -> bool {
        if !self.status_has(VIRTIO_CONFIG_S_DRIVER) || self.status_has(VIRTIO_CONFIG_S_FEATURES_OK)
        {
            return false;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Feature pages beyond 63 do not exist: acking anything there is acking a feature
            // we do not offer.
            _ if value != 0 => {
                self.driver_features |= 1 << 63;
                return false;
            }
            _ => {}
        }
        true
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) -> bool {
        if !self.queue_config_allowed() {
            return false;
        }
        let Some(queue) = self.selected_queue() else {
            return false;
        };
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if queue.try_set_size(size).is_err() {
                    // Zero, too big or not a power of two: the queue cannot be used.
                    self.needs_reset("bad queue size");
                    return false;
                }
            }
            VIRTIO_MMIO_QUEUE_READY => queue.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => return false,
        }
        true
    }

    /// A notification that did not go through an ioeventfd (none registered, or a test).
    fn notify_queue(&mut self, value: u32) -> bool {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: failed to signal queue {value}: {e}");
                }
                true
            }
            None => false,
        }
    }

    fn write_status(&mut self, value: u32) -> bool {
        if value == 0 {
            self.reset();
            return true;
        }
        let old = self.device_status;
        // FAILED may be set at any time, and the driver may rewrite the same status.
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return true;
        }
        // Bits may only be added, one step at a time.
        let current = old & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value == current {
            return true;
        }
        if value & current != current {
            return false;
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        const DRIVER_OK: u32 = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        match (current, value) {
            (0, ACK) | (ACK, DRIVER) => {
                self.device_status = (old & VIRTIO_CONFIG_S_NEEDS_RESET) | value;
                true
            }
            (DRIVER, FEATURES_OK) if self.features_acceptable() => {
                lock(&self.device).set_acked_features(self.driver_features);
                self.device_status |= VIRTIO_CONFIG_S_FEATURES_OK;
                true
            }
            (FEATURES_OK, DRIVER_OK) => {
                if old & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
                    self.activate();
                }
                true
            }
            // Includes FEATURES_OK for unacceptable features: leaving the bit clear tells the
            // driver we refused them (spec 3.1.1).
            _ => false,
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        if self
            .queues
            .iter()
            .any(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.needs_reset("a ready queue is invalid");
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for (queue, evt) in self.queues.iter().zip(&self.queue_evts) {
            let Ok(copy) = Queue::try_from(queue.state()) else {
                self.needs_reset("queue state cannot be copied");
                return;
            };
            queues.push(copy);
            match evt.try_clone() {
                Ok(evt) => evts.push(evt),
                Err(e) => {
                    warn!("virtio-mmio: failed to clone a queue eventfd: {e}");
                    self.needs_reset("queue eventfd clone failed");
                    return;
                }
            }
        }
        let result =
            lock(&self.device).activate(self.mem.clone(), self.irq_trigger.clone(), queues, evts);
        match result {
            Ok(()) => self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK,
            Err(e) => {
                warn!("virtio-mmio: device activation failed: {e}");
                self.needs_reset("activation failed");
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        if self.bad_access_log.should_log() {
            warn!("virtio-mmio: device needs reset: {why}");
        }
        self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.irq_trigger.trigger_config() {
            warn!("virtio-mmio: failed to signal the config interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        {
            let mut device = lock(&self.device);
            if device.is_activated() && !device.reset() {
                drop(device);
                // The device cannot go back: tell the driver instead of pretending.
                self.needs_reset("the active device does not support reset");
                return;
            }
            device.set_acked_features(0);
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.irq_trigger.clear();
    }
}

/// A queue's configuration and ring positions, as a template keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// The queue, checked by virtio-queue (sizes) like a driver's own configuration.
    fn to_queue(&self) -> Result<Queue, TransportRestoreError> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| TransportRestoreError::Queue(e.to_string()))
    }
}

/// A virtio-mmio device's state in a template: the transport's registers and, once the
/// driver activated it, the device's negotiated features and queue positions. Devices hold
/// no other state a template needs: one is taken with no vsock connection open and no file
/// system session (see `crate::snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub irq_status: u32,
    pub acked_features: u64,
    /// The transport's queue registers.
    pub queues: Vec<QueueSnapshot>,
    /// The active device's queues, with the ring positions it reached.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// Why a transport's state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("device type {found} where the template has {expected}")]
    DeviceType { expected: u32, found: u32 },
    #[error("{found} queues where the template has {expected}")]
    QueueCount { expected: usize, found: usize },
    #[error("invalid queue: {0}")]
    Queue(String),
    #[error("a ready queue lies outside guest memory")]
    InvalidQueue,
    #[error("activation failed")]
    Activate(#[source] super::ActivateError),
    #[error("cloning a queue eventfd failed")]
    Evt(#[source] io::Error),
}

impl MmioTransport {
    /// The state a template keeps (call with the guest paused).
    pub fn snapshot(&self) -> TransportSnapshot {
        let device = lock(&self.device);
        let active_queues = device.state().active.as_ref().map(|active| {
            active
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        });
        TransportSnapshot {
            device_type: device.device_type(),
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            irq_status: self.irq_trigger.irq_status(),
            acked_features: device.acked_features(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
            active_queues,
        }
    }

    /// Puts the transport (and its device) back in the state of `snap`, before the guest
    /// runs: registers, queues, and for an active device its activation with the queues'
    /// ring positions. Its interrupt is raised again if one was pending, and the device thread
    /// looks at every queue once it takes the activation (so nothing the driver queued is
    /// missed). Everything is checked as the driver's own writes would be.
    pub fn restore(&mut self, snap: &TransportSnapshot) -> Result<(), TransportRestoreError> {
        let device_type = lock(&self.device).device_type();
        if device_type != snap.device_type {
            return Err(TransportRestoreError::DeviceType {
                expected: snap.device_type,
                found: device_type,
            });
        }
        if snap.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                expected: snap.queues.len(),
                found: self.queues.len(),
            });
        }
        for (queue, saved) in self.queues.iter_mut().zip(&snap.queues) {
            if saved.max_size != queue.max_size() {
                return Err(TransportRestoreError::Queue(format!(
                    "maximum size {} where the device has {}",
                    saved.max_size,
                    queue.max_size()
                )));
            }
            *queue = saved.to_queue()?;
        }
        self.device_status = snap.device_status;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        if let Some(saved) = &snap.active_queues {
            if saved.len() != self.queues.len() {
                return Err(TransportRestoreError::QueueCount {
                    expected: saved.len(),
                    found: self.queues.len(),
                });
            }
            let queues = saved
                .iter()
                .map(QueueSnapshot::to_queue)
                .collect::<Result<Vec<_>, _>>()?;
            if queues.iter().any(|q| q.ready() && !q.is_valid(&self.mem)) {
                return Err(TransportRestoreError::InvalidQueue);
            }
            let evts = self
                .queue_evts
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(TransportRestoreError::Evt)?;
            let mut device = lock(&self.device);
            device.set_acked_features(snap.acked_features);
            device
                .activate(self.mem.clone(), self.irq_trigger.clone(), queues, evts)
                .map_err(TransportRestoreError::Activate)?;
        } else {
            lock(&self.device).set_acked_features(snap.acked_features);
        }
        if snap.irq_status != 0 {
            self.irq_trigger.restore(snap.irq_status);
        }
        Ok(())
    }
}

/// Locks the device; a poisoned lock (a panic on another thread) still yields the device,
/// whose state stays consistent since every device method leaves it so before returning.
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= VIRTIO_MMIO_CONFIG {
            lock(&self.device).read_config(offset - VIRTIO_MMIO_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn_bad_access("read of bad width or alignment", offset, data.len());
            return;
        }
        match self.read_register(offset) {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()),
            None => self.warn_bad_access("read of unknown register", offset, data.len()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= VIRTIO_MMIO_CONFIG {
            lock(&self.device).write_config(offset - VIRTIO_MMIO_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn_bad_access("write of bad width", offset, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            self.warn_bad_access("unaligned write", offset, data.len());
            return;
        }
        if !self.write_register(offset, u32::from_le_bytes(bytes)) {
            self.warn_bad_access("write rejected", offset, data.len());
        }
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, DummyDevice};
    use crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG;

    fn read_u32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_u32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let device = Arc::new(Mutex::new(DummyDevice::new(vec![16, 16])));
        let t = MmioTransport::new(test_memory(), device.clone()).unwrap();
        (t, device)
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write_u32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write_u32(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write_u32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write_u32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write_u32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write_u32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        write_u32(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    const FEATURES_OK_STATUS: u32 =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK_STATUS: u32 = FEATURES_OK_STATUS | VIRTIO_CONFIG_S_DRIVER_OK;

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write_u32(t, VIRTIO_MMIO_QUEUE_SEL, index);
        write_u32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write_u32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        write_u32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        write_u32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        write_u32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        write_u32(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x200) as u32);
        write_u32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        write_u32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers_read_back() {
        let (mut t, _) = transport();
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_DEVICE_ID), 0x42);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_VENDOR_ID), 0);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn device_features_are_paged_by_select() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        write_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        write_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_accepted_for_offered_features() {
        let (mut t, device) = transport();
        negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b100);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), FEATURES_OK_STATUS);
        assert_eq!(device.lock().unwrap().acked_features(), (1 << 32) | 0b100);
    }

    #[test]
    fn features_ok_rejected_for_unoffered_feature() {
        let (mut t, device) = transport();
        negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b10);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
        assert_eq!(device.lock().unwrap().acked_features(), 0);
    }

    #[test]
    fn features_ok_rejected_without_version_1() {
        let (mut t, _) = transport();
        negotiate(&mut t, 0b1);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
    }

    #[test]
    fn driver_features_ignored_after_features_ok() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        write_u32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write_u32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b101);
        assert_eq!(device.lock().unwrap().acked_features(), 1 << 32);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(device.lock().unwrap().acked_features(), 1 << 32);
    }

    #[test]
    fn status_steps_cannot_be_skipped() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), 0);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, FEATURES_OK_STATUS);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
        );
    }

    #[test]
    fn queue_setup_and_activation_on_driver_ok() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), DRIVER_OK_STATUS);
        let dev = device.lock().unwrap();
        assert!(dev.is_activated());
        let queues = dev.activated_queues.as_ref().unwrap();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[1].desc_table(), 0x2000);
        assert_eq!(queues[1].avail_ring(), 0x2100);
        assert_eq!(queues[1].used_ring(), 0x2200);
        assert_eq!(queues[1].size(), 16);
    }

    #[test]
    fn queue_config_ignored_after_driver_ok() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert!(device.lock().unwrap().is_activated());
    }

    #[test]
    fn queue_config_ignored_before_features_ok() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn invalid_ready_queue_blocks_activation_and_sets_needs_reset() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        // Descriptor table beyond the end of guest memory.
        setup_queue(&mut t, 0, 0x10_0000_0000);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            FEATURES_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert!(!device.lock().unwrap().is_activated());
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn bad_queue_size_blocks_activation() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert!(!device.lock().unwrap().is_activated());
        assert_ne!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn writing_zero_resets_the_transport() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), 0);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(device.lock().unwrap().acked_features(), 0);
        // And the device can be negotiated again from scratch.
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), FEATURES_OK_STATUS);
    }

    #[test]
    fn reset_of_active_device_without_reset_support_sets_needs_reset() {
        let (mut t, device) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert!(device.lock().unwrap().is_activated());
    }

    #[test]
    fn reset_of_active_rng_deactivates_it() {
        let rng = Arc::new(Mutex::new(crate::devices::virtio::rng::Rng::new().unwrap()));
        let mut t = MmioTransport::new(test_memory(), rng.clone()).unwrap();
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_DEVICE_ID), 4);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1100);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1200);
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), DRIVER_OK_STATUS);
        assert!(rng.lock().unwrap().is_activated());
        write_u32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!rng.lock().unwrap().is_activated());
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn shared_memory_regions_read_as_absent() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn failed_status_bit_is_kept() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write_u32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FAILED);
        assert_eq!(
            read_u32(&mut t, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED
        );
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let (mut t, _) = transport();
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        // An out-of-range queue index is ignored.
        write_u32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    }

    #[test]
    fn interrupt_status_read_clears_it_and_a_late_ack_loses_nothing() {
        let (mut t, _) = transport();
        t.irq_trigger().trigger_queue().unwrap();
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Used buffers added between the guest's read and its acknowledgement of that read:
        // the acknowledgement must not clear their bit.
        t.irq_trigger().trigger_queue().unwrap();
        write_u32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    }

    #[test]
    fn config_space_reads_at_any_width() {
        let (mut t, _) = transport();
        let mut data = [0u8; 8];
        t.read(VIRTIO_MMIO_CONFIG, &mut data);
        assert_eq!(data, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut byte = [0u8; 1];
        t.read(VIRTIO_MMIO_CONFIG + 3, &mut byte);
        assert_eq!(byte, [4]);
        let mut beyond = [0xffu8; 4];
        t.read(VIRTIO_MMIO_CONFIG + 6, &mut beyond);
        assert_eq!(beyond, [7, 8, 0, 0]);
        t.read(MMIO_REGION_SIZE - 1, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn bad_widths_and_offsets_are_harmless() {
        let (mut t, _) = transport();
        for len in [0usize, 1, 2, 3, 5, 8, 16] {
            for offset in [
                0u64,
                1,
                2,
                3,
                0x14,
                0x33,
                0x70,
                0x71,
                0xfc,
                0xfd,
                0xff,
                0xfff,
                u64::MAX,
            ] {
                let mut data = vec![0xaau8; len];
                t.read(offset, &mut data);
                if offset < VIRTIO_MMIO_CONFIG {
                    assert!(data.iter().all(|&b| b == 0), "offset {offset:#x} len {len}");
                }
                t.write(offset, &data);
            }
        }
        // Narrow writes to the status register did nothing.
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Unknown and write-only registers read as zero.
        assert_eq!(read_u32(&mut t, 0x0f0), 0);
        assert_eq!(read_u32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
    }

    #[test]
    fn every_register_offset_survives_random_values() {
        let (mut t, _) = transport();
        for offset in (0..0x100u64).step_by(4) {
            for value in [0u32, 1, 2, 0xff, 0xffff, 0xffff_ffff] {
                write_u32(&mut t, offset, value);
                let _ = read_u32(&mut t, offset);
            }
        }
    }
}
