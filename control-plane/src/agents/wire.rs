//! Reading and writing protocol messages on QUIC streams.

use cronium_protocol::{FrameDecoder, FrameError, Message, encode};
use thiserror::Error;

/// Why a message could not be read or written.
#[derive(Debug, Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

impl WireError {
    /// The connection went away (closed by either side, reset, timed out): an end, not a fault.
    pub fn connection_lost(&self) -> Option<&quinn::ConnectionError> {
        match self {
            WireError::Read(quinn::ReadError::ConnectionLost(error))
            | WireError::Write(quinn::WriteError::ConnectionLost(error)) => Some(error),
            _ => None,
        }
    }
}

/// Reads the next message; `Ok(None)` at a clean end of stream.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<Message>, WireError> {
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(Some(message));
        }
        // `read_chunk` hands over quinn's own buffers: no per-stream read buffer lives in the
        // (long-lived) future, and a dropped read loses nothing.
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => decoder.push(&chunk.bytes)?,
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Writes one message.
pub async fn write_message(
    send: &mut quinn::SendStream,
    message: &Message,
) -> Result<(), WireError> {
    let frame = encode(message)?;
    send.write_all(&frame).await?;
    Ok(())
}
