//! A hostile guest against the memory balloon (see `husk_vmm::fuzzing`).
#![no_main]

use husk_vmm::fuzzing::{guest, Device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| guest(Device::Balloon, data));
