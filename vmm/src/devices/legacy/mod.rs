//! Legacy PC devices: the 8250 serial console (debug only) and the i8042 controller (reset).

pub mod i8042;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// A vm-superio interrupt/reset trigger that writes to an EventFd (registered as an irqfd,
/// or watched by the VMM).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The underlying EventFd.
    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
