//! Length-prefixed framing: a 4-byte big-endian payload length, then a postcard-encoded [`Message`].
//!
//! The length is checked against the maximum *before* any buffer is sized for the payload, so a
//! hostile 4 GiB prefix costs nothing. [`FrameDecoder`] is incremental: feed it whatever bytes
//! arrived and pull complete messages out.

use thiserror::Error;

use crate::{MAX_FRAME_LEN, Message};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix announces more than the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Encodes one message as a frame (header plus payload).
pub fn encode(message: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(message, out)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // The check above bounds `len` to MAX_FRAME_LEN, which fits in a u32.
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one payload (without its header). Trailing bytes are an error.
pub fn decode(payload: &[u8]) -> Result<Message, FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(error) => Err(FrameError::Malformed(error.to_string())),
    }
}

/// Incremental decoder: [`push`](FrameDecoder::push) bytes as they arrive, then call
/// [`next_message`](FrameDecoder::next_message) until it returns `Ok(None)`.
///
/// Memory stays bounded: a push is refused once the buffer would hold more than one maximal
/// frame plus the pushed slice, and an oversized length prefix is refused as soon as its four
/// bytes are in.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's maximum frame size.
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_max(MAX_FRAME_LEN)
    }

    /// A decoder with a smaller maximum (never larger than [`MAX_FRAME_LEN`]).
    pub fn with_max(max: usize) -> FrameDecoder {
        FrameDecoder {
            buffer: Vec::new(),
            max: max.min(MAX_FRAME_LEN),
        }
    }

    /// Appends received bytes. Fails when the pending frame announces an oversized length.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.buffer.len() > HEADER_LEN + self.max {
            // The caller did not drain complete frames with `next_message`; refuse to grow further.
            return Err(FrameError::TooLarge {
                len: self.buffer.len(),
                max: self.max,
            });
        }
        self.buffer.extend_from_slice(bytes);
        self.check_header()?;
        Ok(())
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(len) = self.check_header()? else {
            return Ok(None);
        };
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let message = decode(&self.buffer[HEADER_LEN..HEADER_LEN + len]);
        self.buffer.drain(..HEADER_LEN + len);
        message.map(Some)
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Call at end of stream: fails if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buffer.len(),
            })
        }
    }

    fn check_header(&self) -> Result<Option<usize>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::*;

    fn samples() -> Vec<Message> {
        let attempt = AttemptRef {
            job_id: "01J-job".into(),
            attempt: 2,
        };
        vec![
            Message::Hello(hello::Hello {
                min_version: 1,
                max_version: 1,
                agent_version: "0.1.0".into(),
                capacity: 4,
                running: vec![attempt.clone()],
                capabilities: Capabilities {
                    interpreters: vec!["bash".into()],
                    docker: false,
                },
                host: HostInfo {
                    hostname: "h".into(),
                    os: "linux".into(),
                    arch: "x86_64".into(),
                },
                terminals: vec!["0123456789abcdef0123456789abcdef".into()],
            }),
            Message::Welcome(Welcome {
                version: 1,
                agent_id: "a".into(),
                heartbeat_interval_ms: 5000,
                lease_ms: 30000,
                abandon: vec![],
            }),
            Message::Reject(Reject {
                code: RejectCode::Revoked,
                message: "revoked".into(),
            }),
            Message::Heartbeat(Heartbeat {
                seq: 7,
                running: vec![attempt.clone()],
            }),
            Message::HeartbeatAck(HeartbeatAck {
                seq: 7,
                abandon: vec![],
            }),
            Message::WorkAvailable,
            Message::Claim(Claim { slots: 3 }),
            Message::Assign(JobSpec {
                job_id: "j".into(),
                attempt: 1,
                run_id: "r".into(),
                event_id: "e".into(),
                kind: ScriptKind::Python,
                script: "print('hi')".into(),
                env: vec![("A".into(), "b".into())],
                timeout_ms: 1000,
                input: Some("{}".into()),
                runtime: RuntimeSpec::Docker(DockerSpec {
                    image: "debian:12-slim".into(),
                    memory_mb: Some(64),
                    cpus: Some(0.5),
                    pids: Some(256),
                    network: DockerNetwork::Bridge,
                    read_only: true,
                    user: Some("1000:1000".into()),
                }),
                secret_env: SecretEnv(vec![("TOKEN".into(), "s3cret-value".into())]),
            }),
            Message::Assign(JobSpec {
                job_id: "h".into(),
                attempt: 2,
                run_id: "r".into(),
                event_id: "e".into(),
                kind: ScriptKind::Bash,
                script: "id -u".into(),
                env: vec![],
                timeout_ms: 0,
                input: None,
                runtime: RuntimeSpec::Host(HostSpec {
                    user: Some("nobody".into()),
                    memory_mb: Some(32),
                    cpus: Some(1.5),
                    pids: Some(20),
                }),
                secret_env: SecretEnv::default(),
            }),
            Message::ClaimDone(ClaimDone { claimed: 1 }),
            Message::Cancel(Cancel {
                job: attempt.clone(),
            }),
            Message::JobOpen(JobOpen { job: attempt }),
            Message::JobOpened(JobOpened::Resume { next_offset: 10 }),
            Message::JobOpened(JobOpened::Stale),
            Message::JobStarted(JobStarted { pid: 42 }),
            Message::LogChunk(LogChunk {
                offset: 10,
                stream: LogStream::Stderr,
                data: b"oops\n".to_vec(),
            }),
            Message::LogAck(LogAck { next_offset: 15 }),
            Message::JobFinished(JobFinished {
                status: FinalStatus::Failed,
                reason: Some(FailReason::ExitCode),
                exit_code: Some(3),
                log_len: 15,
                result: Some("{\"a\":1}".to_owned()),
                condition: Some(false),
            }),
            Message::FinishAck(FinishAck {
                verdict: FinishVerdict::Recorded,
            }),
            Message::HelperCall(HelperCall {
                job: AttemptRef {
                    job_id: "j1".into(),
                    attempt: 2,
                },
                seq: 7,
                request: HelperRequest::SetVariable {
                    name: "counter".into(),
                    value_json: "{\"n\":1}".into(),
                },
            }),
            Message::HelperCall(HelperCall {
                job: AttemptRef {
                    job_id: "j1".into(),
                    attempt: 2,
                },
                seq: 8,
                request: HelperRequest::Notify {
                    tool: Some("ops".into()),
                    title: None,
                    message: "disk almost full".into(),
                },
            }),
            Message::HelperReply(HelperReply::Value {
                value_json: Some("42".into()),
            }),
            Message::HelperReply(HelperReply::Refused {
                reason: HelperRefusal::NotFound,
                message: "no tool named ops".into(),
            }),
            Message::TerminalOpen(TerminalOpen {
                session: Some("s1".into()),
                cols: 120,
                rows: 40,
                opened_by: "alice".into(),
                idle_timeout_ms: 0,
                max_age_ms: 60_000,
            }),
            Message::TerminalOpened(TerminalOpened::Started {
                session: "s1".into(),
                pid: 99,
            }),
            Message::TerminalOpened(TerminalOpened::Refused {
                reason: TerminalRefusal::Limit,
                message: "too many".into(),
            }),
            Message::TerminalInput(TerminalInput {
                data: "é\x03".as_bytes().to_vec(),
            }),
            Message::TerminalOutput(TerminalOutput {
                data: vec![0xe2, 0x82],
            }),
            Message::TerminalResize(TerminalResize { cols: 80, rows: 24 }),
            Message::TerminalClose,
            Message::TerminalExit(TerminalExit { code: Some(130) }),
            Message::TerminalEnded(TerminalEnded {
                session: "0123456789abcdef0123456789abcdef".into(),
                code: None,
            }),
            Message::AgentUpdate(crate::AgentUpdate {
                version: Some("0.2.0".into()),
            }),
            Message::AgentUpdate(crate::AgentUpdate { version: None }),
            Message::UpdateStatus(crate::UpdateStatus {
                target_version: "0.2.0".into(),
                state: crate::UpdateState::RolledBack,
                reason: Some("did not connect".into()),
            }),
            Message::ReplicaAddrs(crate::ReplicaAddrs {
                quic_addrs: vec!["10.0.0.1:7443".into(), "[::1]:7443".into()],
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_byte_at_a_time_decoder() {
        let messages = samples();
        let mut wire = Vec::new();
        for message in &messages {
            wire.extend(encode(message).unwrap());
        }
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for byte in wire {
            decoder.push(&[byte]).unwrap();
            while let Some(message) = decoder.next_message().unwrap() {
                decoded.push(message);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(decoded, messages);
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_the_payload_arrives() {
        let mut decoder = FrameDecoder::new();
        let error = decoder.push(&u32::MAX.to_be_bytes()).unwrap_err();
        assert_eq!(
            error,
            FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            }
        );
        // Nothing was sized for the announced payload.
        assert!(decoder.buffer.capacity() < 64);
    }

    #[test]
    fn encoding_refuses_a_message_over_the_maximum() {
        let chunk = LogChunk {
            offset: 0,
            stream: LogStream::Stdout,
            data: vec![0; MAX_FRAME_LEN],
        };
        assert!(matches!(
            encode(&Message::LogChunk(chunk)),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_truncation_are_errors() {
        let mut frame = encode(&Message::WorkAvailable).unwrap();
        frame.push(0);
        frame[3] += 1;
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame).unwrap();
        assert!(matches!(
            decoder.next_message(),
            Err(FrameError::Malformed(_))
        ));

        let frame = encode(&Message::Claim(Claim { slots: 1 })).unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..frame.len() - 1]).unwrap();
        assert_eq!(decoder.next_message(), Ok(None));
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn a_decoder_that_is_not_drained_stops_growing() {
        let mut decoder = FrameDecoder::with_max(16);
        let frame = encode(&Message::WorkAvailable).unwrap();
        let mut refused = false;
        for _ in 0..100 {
            if decoder.push(&frame).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(decoder.buffered() <= 4 + 16 + frame.len());
    }

    /// Random, truncated and mutated inputs never panic the decoder; every outcome is a value.
    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x00c0_ffee);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|message| encode(message).unwrap())
            .collect();
        for round in 0..20_000 {
            let mut bytes = match round % 3 {
                0 => (0..rng.gen_range(0..256))
                    .map(|_| rng.r#gen::<u8>())
                    .collect::<Vec<u8>>(),
                1 => {
                    let frame = &valid[rng.gen_range(0..valid.len())];
                    frame[..rng.gen_range(0..=frame.len())].to_vec()
                }
                _ => {
                    let mut frame = valid[rng.gen_range(0..valid.len())].clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let index = rng.gen_range(0..frame.len());
                        frame[index] = rng.r#gen();
                    }
                    frame
                }
            };
            if round % 7 == 0 {
                // Keep some length prefixes plausible so the payload decoder itself is exercised.
                let len = bytes.len().saturating_sub(4) as u32;
                if bytes.len() >= 4 {
                    bytes[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
            let mut decoder = FrameDecoder::new();
            let mut cursor = 0;
            while cursor < bytes.len() {
                let step = rng.gen_range(1..=16).min(bytes.len() - cursor);
                if decoder.push(&bytes[cursor..cursor + step]).is_err() {
                    break;
                }
                cursor += step;
                while let Ok(Some(_)) = decoder.next_message() {}
            }
            let _ = decoder.finish();
            let _ = decode(&bytes);
        }
    }
}
