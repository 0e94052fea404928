//! Address-space dispatch for port I/O and MMIO exits.
//!
//! Every PIO or MMIO access a vCPU exits with is routed through a [`Bus`]: devices register a
//! range, the run loop asks the bus, and nothing in the run loop knows device addresses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes on a bus.
///
/// `offset` is relative to the start of the range the device was inserted at. `data` is the
/// access width (1, 2, 4 or 8 bytes). Devices must tolerate any offset and width: the guest
/// chooses them.
pub trait BusDevice: Send {
    /// Fills `data` for a guest read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BusRange {
    base: u64,
    len: u64,
}

/// A shared, thread-safe device handle as stored on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedBusDevice>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + len;
        let overlaps = self
            .devices
            .keys()
            .any(|r| base < r.base + r.len && r.base < end);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(BusRange { base, len }, device);
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (range, dev) = self
            .devices
            .range(
                ..=BusRange {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        (addr - range.base < range.len).then_some((addr - range.base, dev))
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device that panicked once must not take
/// every later access (and so the VMM) down with it.
fn lock(dev: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last_write: None }))
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x1000, 0x100).expect("free range");
        let mut data = [0u8; 1];
        assert!(bus.read(0x1004, &mut data));
        assert_eq!(data, [4]);
        assert!(bus.write(0x10ff, &[9, 9]));
        assert_eq!(
            dev.lock().expect("not poisoned").last_write,
            Some((0xff, vec![9, 9]))
        );
    }

    #[test]
    fn misses_outside_any_range() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x100).expect("free range");
        let mut data = [7u8; 1];
        assert!(!bus.read(0xfff, &mut data));
        assert!(!bus.read(0x1100, &mut data));
        assert_eq!(data, [7]);
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x100).expect("free range");
        assert_eq!(
            bus.insert(recorder(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(recorder(), 0xf00, 0x101),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert_eq!(
            bus.insert(recorder(), 5, 0),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(recorder(), 0x1100, 0x10)
            .expect("adjacent is fine");
    }
}
