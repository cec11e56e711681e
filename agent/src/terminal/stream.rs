//! One terminal stream: a viewer of a session, opened by the control plane.
//!
//! The first message must be `TerminalOpen` (within [`OPEN_TIMEOUT`]); anything else resets the
//! stream with `ProtocolError`. After the answer, two halves run side by side on this task, so
//! neither waits for the other:
//! - output: the viewer's replay, the end-of-replay marker (an empty `TerminalOutput`), live
//!   output, and finally `TerminalExit`, after which the stream is finished;
//! - input: `TerminalInput` (at most `MAX_TERMINAL_CHUNK` each), `TerminalResize`,
//!   `TerminalClose` (ends the session for every viewer). The end of the control plane's side
//!   (finish or reset) only detaches this viewer.

use std::time::Duration;

use cronium_protocol::{
    CloseCode, FrameDecoder, MAX_TERMINAL_CHUNK, Message, TerminalExit, TerminalOutput,
};
use quinn::{RecvStream, SendStream, VarInt};

use super::{Terminals, Viewer, ViewerEvent};
use crate::frame_io::{FrameIoError, read_message, write_message};

/// How long the control plane may take to send `TerminalOpen` on a stream it opened.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the task waits for the control plane to acknowledge the exit (so a stopping agent
/// does not close the connection before the exit went out).
const EXIT_ACK_WAIT: Duration = Duration::from_secs(5);

/// How the input half ended.
enum InputEnd {
    /// The control plane finished or reset its side, or the connection is gone: detach.
    Detached,
    /// The control plane broke the protocol: reset the stream.
    ProtocolError(String),
}

/// Serves the stream until the viewer detaches or the session ends.
pub(super) async fn serve(terminals: Terminals, mut send: SendStream, mut recv: RecvStream) {
    let mut decoder = FrameDecoder::new();
    let request =
        match tokio::time::timeout(OPEN_TIMEOUT, read_message(&mut recv, &mut decoder)).await {
            Ok(Ok(Some(Message::TerminalOpen(request)))) => request,
            Ok(Ok(None)) => return,
            Ok(Ok(Some(other))) => {
                return reset(
                    &mut send,
                    &mut recv,
                    &format!("{} before terminal_open", other.name()),
                );
            }
            Ok(Err(FrameIoError::Frame(error))) => {
                return reset(&mut send, &mut recv, &error.to_string());
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "a terminal stream failed before it was opened");
                return;
            }
            Err(_) => return reset(&mut send, &mut recv, "no terminal_open in time"),
        };
    let (answer, viewer) = terminals.open(&request).await;
    if let Err(error) = write_message(&mut send, &Message::TerminalOpened(answer)).await {
        tracing::debug!(%error, "could not answer a terminal open");
        return;
    }
    let Some(viewer) = viewer else {
        let _ = send.finish();
        return;
    };
    tokio::select! {
        result = output(&viewer, &mut send) => {
            if let Err(error) = result {
                tracing::debug!(session = %viewer.session_id(), %error, "a terminal viewer's stream failed");
            }
            let _ = recv.stop(VarInt::from_u32(0));
        }
        end = input(&viewer, &mut recv, &mut decoder) => match end {
            InputEnd::Detached => {
                let _ = send.finish();
            }
            InputEnd::ProtocolError(detail) => {
                return reset(&mut send, &mut recv, &detail);
            }
        },
    }
    tracing::debug!(session = %viewer.session_id(), "terminal viewer detached");
}

/// Sends the viewer's output until the session ends (then `TerminalExit` and finish).
async fn output(viewer: &Viewer, send: &mut SendStream) -> Result<(), FrameIoError> {
    loop {
        let message = match viewer.next().await {
            ViewerEvent::Output(data) => Message::TerminalOutput(TerminalOutput {
                data: data.to_vec(),
            }),
            ViewerEvent::ReplayDone => Message::TerminalOutput(TerminalOutput { data: Vec::new() }),
            ViewerEvent::Exit(code) => {
                write_message(send, &Message::TerminalExit(TerminalExit { code })).await?;
                let _ = send.finish();
                let _ = tokio::time::timeout(EXIT_ACK_WAIT, send.stopped()).await;
                return Ok(());
            }
        };
        write_message(send, &message).await?;
    }
}

/// Applies the control plane's messages until its side ends.
async fn input(viewer: &Viewer, recv: &mut RecvStream, decoder: &mut FrameDecoder) -> InputEnd {
    loop {
        let message = match read_message(recv, decoder).await {
            Ok(Some(message)) => message,
            Ok(None) => return InputEnd::Detached,
            Err(FrameIoError::Frame(error)) => return InputEnd::ProtocolError(error.to_string()),
            Err(_) => return InputEnd::Detached,
        };
        match message {
            Message::TerminalInput(input) => {
                if input.data.len() > MAX_TERMINAL_CHUNK {
                    return InputEnd::ProtocolError(format!(
                        "terminal input of {} bytes (at most {MAX_TERMINAL_CHUNK})",
                        input.data.len()
                    ));
                }
                if !input.data.is_empty() && !viewer.input(input.data).await {
                    tracing::debug!(session = %viewer.session_id(), "input for a session that takes none any more");
                }
            }
            Message::TerminalResize(resize) => viewer.resize(resize.cols, resize.rows),
            Message::TerminalClose => {
                tracing::info!(session = %viewer.session_id(), "terminal session closed by a viewer");
                viewer.close_session();
            }
            other => {
                return InputEnd::ProtocolError(format!(
                    "unexpected {} on a terminal stream",
                    other.name()
                ));
            }
        }
    }
}

/// Resets both directions with `ProtocolError`.
fn reset(send: &mut SendStream, recv: &mut RecvStream, detail: &str) {
    tracing::warn!(%detail, "protocol error on a terminal stream; resetting it");
    let code = VarInt::from_u32(CloseCode::ProtocolError.to_u32());
    let _ = send.reset(code);
    let _ = recv.stop(code);
}
