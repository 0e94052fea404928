//! A minimal i8042 keyboard controller. Its one real job is the CPU reset line: command 0xFE
//! on port 0x64 means "guest finished" to the VMM. It also answers the controller and
//! keyboard commands the Linux i8042/atkbd drivers send while probing (read/write the command
//! byte, self tests, keyboard reset/identify), so a kernel that has those drivers does not sit
//! in probe timeouts. There is no real keyboard: no scancodes are ever produced.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// Offset of the data port (0x60) in the device's range.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64) in the device's range.
pub const COMMAND_OFFSET: u64 = 4;
/// Length of the range starting at 0x60.
pub const I8042_RANGE_LEN: u64 = 5;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;

const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
const BUFFER_MAX: usize = 16;

/// What the next write to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    ControlRegister,
    OutputPort,
}

/// The controller. `reset` fires on command 0xFE; `kbd_irq` (IRQ 1) when a keyboard reply is
/// queued and the guest enabled keyboard interrupts.
pub struct I8042Device {
    reset: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    ctr: u8,
    last_was_command: bool,
    data_target: DataTarget,
    out: VecDeque<u8>,
}

impl I8042Device {
    /// A controller with an empty output buffer.
    pub fn new(reset: EventFdTrigger, kbd_irq: EventFdTrigger) -> Self {
        I8042Device {
            reset,
            kbd_irq,
            ctr: CTR_KBD_INT | CTR_AUX_DISABLE,
            last_was_command: false,
            data_target: DataTarget::Keyboard,
            out: VecDeque::new(),
        }
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < BUFFER_MAX {
            self.out.push_back(byte);
        }
    }

    fn push_kbd(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.push(*b);
        }
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.kbd_irq.trigger() {
                tracing::debug!("i8042: keyboard interrupt failed: {e}");
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG;
        if !self.out.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_COMMAND;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.data_target = DataTarget::ControlRegister,
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLE,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLE,
            CMD_TEST_AUX | CMD_TEST_KBD => self.push(PORT_TEST_OK),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLE,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.push(0x01), // reset line deasserted
            CMD_WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            CMD_RESET_CPU => {
                tracing::debug!("i8042: guest requested a CPU reset");
                if let Err(e) = self.reset.trigger() {
                    tracing::error!("i8042: failed to signal the reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.data_target, DataTarget::Keyboard) {
            DataTarget::ControlRegister => self.ctr = byte,
            DataTarget::OutputPort => {}
            DataTarget::Keyboard => match byte {
                KBD_CMD_RESET => self.push_kbd(&[KBD_ACK, KBD_RESET_OK]),
                KBD_CMD_GET_ID => self.push_kbd(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                _ => self.push_kbd(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.out.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042Device, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dev = I8042Device::new(
            EventFdTrigger::new(reset.try_clone().expect("clone")),
            EventFdTrigger::new(irq.try_clone().expect("clone")),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let (mut dev, reset, _irq) = device();
        assert!(reset.read().is_err(), "nothing before the command");
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(reset.read().expect("reset fired"), 1);
    }

    #[test]
    fn idle_status_has_empty_buffers() {
        let (mut dev, _reset, _irq) = device();
        assert_eq!(
            read(&mut dev, COMMAND_OFFSET) & (STATUS_OUTPUT_FULL | 0x02),
            0
        );
    }

    #[test]
    fn controller_self_test_and_ctr_round_trip() {
        let (mut dev, _reset, _irq) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x47);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_commands_are_acked_with_an_interrupt() {
        let (mut dev, _reset, irq) = device();
        dev.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        assert_eq!(irq.read().expect("irq"), 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0xab);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x83);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn ports_between_data_and_command_read_all_ones() {
        let (mut dev, _reset, _irq) = device();
        assert_eq!(read(&mut dev, 1), 0xff);
    }
}
