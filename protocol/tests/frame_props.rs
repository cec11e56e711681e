//! Property tests of the frame codec (bounded, part of the normal test suite; the unbounded
//! search is the cargo-fuzz target in `protocol/fuzz/`): random bytes and mutated valid frames
//! never panic `decode` or the incremental `FrameDecoder`, oversized length prefixes are refused
//! before their payload is buffered, and valid frames round-trip whatever way they are split.

use cronium_protocol::{
    AttemptRef, Claim, FrameDecoder, FrameError, HeartbeatAck, JobOpen, LogAck, LogChunk,
    LogStream, MAX_FRAME_LEN, Message, TerminalExit, TerminalInput, TerminalResize, decode, encode,
    frame::HEADER_LEN,
};
use proptest::prelude::*;

/// A few messages of different shapes: unit variants, integers, strings, byte vectors, options.
fn message() -> impl Strategy<Value = Message> {
    let text = proptest::collection::vec(any::<char>(), 0..40)
        .prop_map(|chars| chars.into_iter().collect::<String>());
    let bytes = proptest::collection::vec(any::<u8>(), 0..512);
    prop_oneof![
        Just(Message::WorkAvailable),
        Just(Message::TerminalClose),
        any::<u32>().prop_map(|slots| Message::Claim(Claim { slots })),
        (any::<u64>(), proptest::collection::vec(text.clone(), 0..3)).prop_map(|(seq, ids)| {
            Message::HeartbeatAck(HeartbeatAck {
                seq,
                abandon: ids
                    .into_iter()
                    .map(|job_id| AttemptRef { job_id, attempt: 1 })
                    .collect(),
            })
        }),
        (text.clone(), any::<u32>()).prop_map(|(job_id, attempt)| {
            Message::JobOpen(JobOpen {
                job: AttemptRef { job_id, attempt },
            })
        }),
        (any::<u64>(), any::<bool>(), bytes.clone()).prop_map(|(offset, stderr, data)| {
            Message::LogChunk(LogChunk {
                offset,
                stream: if stderr {
                    LogStream::Stderr
                } else {
                    LogStream::Stdout
                },
                data,
            })
        }),
        any::<u64>().prop_map(|next_offset| Message::LogAck(LogAck { next_offset })),
        bytes.prop_map(|data| Message::TerminalInput(TerminalInput { data })),
        (any::<u16>(), any::<u16>())
            .prop_map(|(cols, rows)| Message::TerminalResize(TerminalResize { cols, rows })),
        any::<Option<i32>>().prop_map(|code| Message::TerminalExit(TerminalExit { code })),
    ]
}

/// Feeds `bytes` to a decoder in pieces of the given sizes and drains it after each push.
/// Returns the messages decoded before the first error, and whether an error was seen.
fn feed(decoder: &mut FrameDecoder, bytes: &[u8], splits: &[usize]) -> (Vec<Message>, bool) {
    let mut messages = Vec::new();
    let mut cursor = 0;
    let mut sizes = splits.iter().cycle();
    while cursor < bytes.len() {
        let step = (*sizes.next().unwrap_or(&1)).clamp(1, bytes.len() - cursor);
        if decoder.push(&bytes[cursor..cursor + step]).is_err() {
            return (messages, true);
        }
        cursor += step;
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(_) => return (messages, true),
            }
        }
    }
    (messages, false)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any byte string: `decode` answers a value and the decoder never panics nor grows without
    /// bound.
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        splits in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let _ = decode(&bytes);
        let mut decoder = FrameDecoder::with_max(4096);
        let _ = feed(&mut decoder, &bytes, &splits);
        prop_assert!(decoder.buffered() <= HEADER_LEN + 4096 + 64);
        let _ = decoder.finish();
    }

    /// Valid frames with a few bytes overwritten, a truncated end and a plausible length
    /// prefix: whatever comes out is a value, never a panic.
    #[test]
    fn mutated_valid_frames_never_panic(
        messages in proptest::collection::vec(message(), 1..6),
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        splits in proptest::collection::vec(1usize..32, 1..6),
    ) {
        let mut wire = Vec::new();
        for message in &messages {
            wire.extend(encode(message).unwrap());
        }
        for (index, byte) in &mutations {
            let at = index.index(wire.len());
            wire[at] = *byte;
        }
        let wire = &wire[..cut.index(wire.len() + 1)];
        let mut decoder = FrameDecoder::new();
        let _ = feed(&mut decoder, wire, &splits);
        let _ = decoder.finish();
        if wire.len() >= HEADER_LEN {
            let _ = decode(&wire[HEADER_LEN..]);
        }
    }

    /// Valid frames come back unchanged however the stream is split, and the decoder ends empty.
    #[test]
    fn valid_frames_round_trip(
        messages in proptest::collection::vec(message(), 1..8),
        splits in proptest::collection::vec(1usize..100, 1..8),
    ) {
        let mut wire = Vec::new();
        for message in &messages {
            let frame = encode(message).unwrap();
            let single = decode(&frame[HEADER_LEN..]);
            prop_assert_eq!(single.as_ref(), Ok(message), "a single frame decodes to its message");
            wire.extend(frame);
        }
        let mut decoder = FrameDecoder::new();
        let (decoded, failed) = feed(&mut decoder, &wire, &splits);
        prop_assert!(!failed);
        prop_assert_eq!(decoded, messages);
        prop_assert_eq!(decoder.finish(), Ok(()));
    }

    /// A length prefix over the maximum is refused as soon as its four bytes are in, whatever
    /// follows, and nothing is buffered for the announced payload.
    #[test]
    fn oversized_lengths_are_refused(
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        small_max in 0usize..1024,
    ) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(&tail);
        let mut decoder = FrameDecoder::new();
        prop_assert_eq!(
            decoder.push(&bytes),
            Err(FrameError::TooLarge { len: len as usize, max: MAX_FRAME_LEN })
        );
        prop_assert!(decoder.next_message().is_err());

        // A decoder with a smaller maximum refuses anything above it the same way.
        let announced = small_max as u32 + 1 + (len % 1024);
        let mut decoder = FrameDecoder::with_max(small_max);
        let result = decoder.push(&announced.to_be_bytes());
        prop_assert_eq!(
            result,
            Err(FrameError::TooLarge { len: announced as usize, max: small_max })
        );

        // `decode` itself refuses a payload over the maximum without parsing it.
        let oversized = vec![0u8; MAX_FRAME_LEN + 1 + tail.len()];
        let refused = matches!(decode(&oversized), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused);
    }
}
