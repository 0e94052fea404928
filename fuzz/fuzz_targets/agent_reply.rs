//! What the guest agent answers, as the host reads it: frames of JSON responses, read until
//! the stream ends or a frame is refused (see `husk_agent_protocol::frame`).
#![no_main]

use husk_agent_protocol::frame::read_frame;
use husk_agent_protocol::Response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(response) = read_frame::<_, Response>(&mut stream) {
        // The host formats replies into errors and logs.
        let _ = format!("{} {response:?}", response.kind());
    }
});
