//! Emulated devices: the address-space buses, the legacy PC devices and the virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;
