//! Reading and writing protocol messages on QUIC streams.
//!
//! The framing itself lives in `cronium_protocol::frame`; this module only moves bytes between a
//! quinn stream and a [`FrameDecoder`]. Reads are cancel-safe: a message is consumed from the
//! decoder only when it is returned, and quinn's `read_chunk` loses nothing when dropped.

use cronium_protocol::{FrameDecoder, FrameError, Message, encode};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use thiserror::Error;

/// Most bytes taken from a stream in one read before the decoder is drained again.
const READ_CHUNK: usize = 64 * 1024;

/// Why a message could not be read from or written to a stream.
#[derive(Debug, Error)]
pub enum FrameIoError {
    /// The bytes on the stream are not a valid frame.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The stream or its connection failed while reading.
    #[error("stream read failed: {0}")]
    Read(#[from] ReadError),
    /// The stream or its connection failed while writing.
    #[error("stream write failed: {0}")]
    Write(#[from] WriteError),
}

/// Reads the next message. Returns `Ok(None)` when the peer finished the stream cleanly between
/// two frames; a stream that ends inside a frame is an error.
pub async fn read_message(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<Message>, FrameIoError> {
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(Some(message));
        }
        match recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => decoder.push(&chunk.bytes)?,
            None => {
                decoder.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Encodes and writes one message.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), FrameIoError> {
    let frame = encode(message)?;
    send.write_all(&frame).await?;
    Ok(())
}
