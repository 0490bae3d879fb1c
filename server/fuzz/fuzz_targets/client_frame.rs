//! Any bytes a WebSocket client could send as a text frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = herald_server::ws::protocol::parse(text);
    }
});
