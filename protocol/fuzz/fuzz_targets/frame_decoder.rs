//! The incremental `FrameDecoder` on an arbitrary byte stream: the first input byte picks a
//! maximum frame size and a push size, the rest is the stream. Pushing and draining never
//! panics, the buffer never holds more than one maximal frame plus one push, and an error ends
//! the stream as it would end a QUIC stream.
#![no_main]

use cronium_protocol::FrameDecoder;
use cronium_protocol::frame::HEADER_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, stream)) = data.split_first() else {
        return;
    };
    // Small maxima reach the size checks with short inputs; 0 keeps the protocol's maximum.
    let max = match shape & 0x0f {
        0 => cronium_protocol::MAX_FRAME_LEN,
        n => 1usize << (n + 1),
    };
    let step = usize::from(shape >> 4) + 1;
    let mut decoder = FrameDecoder::with_max(max);
    for piece in stream.chunks(step) {
        if decoder.push(piece).is_err() {
            return;
        }
        assert!(decoder.buffered() <= HEADER_LEN + max + step);
        loop {
            match decoder.next_message() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
