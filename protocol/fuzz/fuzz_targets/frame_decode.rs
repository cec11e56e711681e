//! `cronium_protocol::decode` on arbitrary payloads: any input is a value (a message or a
//! `FrameError`), never a panic, and a payload that decodes re-encodes to a frame that decodes
//! to the same message.
#![no_main]

use cronium_protocol::frame::HEADER_LEN;
use cronium_protocol::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    if let Ok(message) = decode(payload) {
        let frame = encode(&message).expect("a decoded message encodes");
        assert_eq!(
            decode(&frame[HEADER_LEN..]).as_ref(),
            Ok(&message),
            "re-encoded message decodes to itself"
        );
    }
});
