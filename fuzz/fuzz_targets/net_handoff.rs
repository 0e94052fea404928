//! The text of the runtime's network handoff, parsed by husk-vmm (see `husk_vmm::net_handoff`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::net_handoff(data));
