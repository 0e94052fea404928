//! COM1 (8250 UART, vm-superio) for the debug console: guest output goes to the VMM's stdout.
//! Attached only with `--console`; without it port 0x3f8 is unclaimed and reads as 0xff, so
//! the kernel finds no UART.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising its interrupt through `irq_evt` and writing to `out`.
    pub fn new(irq_evt: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger::new(irq_evt), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failed interrupt or output write only loses console output.
            if let Err(e) = self.serial.write(offset, *byte) {
                tracing::trace!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = SerialDevice::new(evt, Box::new(sink.clone()));
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(*sink.0.lock().expect("lock"), b"hi");
    }

    #[test]
    fn wide_accesses_read_all_ones_and_are_ignored() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = SerialDevice::new(evt, Box::new(sink.clone()));
        let mut data = [0u8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        dev.write(0, b"ab");
        assert!(sink.0.lock().expect("lock").is_empty());
    }
}
