//! One terminal viewer: a browser's WebSocket relayed to a QUIC stream the control plane opens on
//! the agent's connection.
//!
//! WebSocket protocol (also in the README and the OpenAPI description):
//! - binary frames: terminal bytes, both ways, passed through untouched (a UTF-8 character may be
//!   split across frames; the browser decodes a stream);
//! - text frames, client → server: `{"type":"resize","cols":C,"rows":R}`, `{"type":"close"}` (end
//!   the session: its shell is killed); anything else is ignored;
//! - text frames, server → client: `{"type":"session","id":S}` first; `{"type":"exit","code":N}`
//!   last (`code` is null when the shell was killed); `{"type":"detached","reason":
//!   "agent_disconnected" | "control_plane_stopping"}` when the link to the agent is gone (the
//!   session may live on: re-attach with `?session=S`); `{"type":"error","code","message"}`
//!   when the agent refused (no such session, limit, disabled, spawn failure) or broke the
//!   protocol. The server closes the WebSocket after `exit`, `detached` and `error`.
//!
//! Both directions are bounded: the QUIC stream is read only as fast as the WebSocket takes the
//! bytes (a slow browser throttles its own stream; the agent then drops output for it or, if it
//! is the only viewer, throttles the program), and keystrokes are written to QUIC as they come,
//! never behind output. A closed WebSocket finishes the QUIC stream, which only detaches this
//! viewer. Pings keep the WebSocket alive; a client silent for [`CLIENT_SILENCE`] is dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use cronium_protocol::{
    CloseCode, FrameDecoder, MAX_TERMINAL_CHUNK, Message, TerminalInput, TerminalOpen,
    TerminalOpened, TerminalRefusal, TerminalResize,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info, warn};

use super::recording::Recorder;
use super::{Reservation, valid_session_id};
use crate::AppState;
use crate::agents::wire::{WireError, read_message, write_message};
use crate::store::now_ms;
use crate::store::users::User;

/// How long opening the stream and the agent's answer may take.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Interval of WebSocket pings.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(20);

/// A client that sends nothing (not even a pong) for this long is gone.
pub(super) const CLIENT_SILENCE: Duration = Duration::from_secs(60);

/// WebSocket close codes.
pub(super) const CLOSE_NORMAL: u16 = 1000;
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
pub(super) const CLOSE_ERROR: u16 = 1011;

/// The two halves of a viewer's WebSocket.
pub(super) type Sink = SplitSink<WebSocket, WsMessage>;
pub(super) type Source = SplitStream<WebSocket>;

/// A viewer of a terminal session: [`Relay`] (the agent's stream is held here) or
/// [`super::remote::RemoteRelay`] (relayed to the replica that holds it).
pub(super) trait Viewer: Sized + Send {
    /// Serves the viewer until it detaches or the session ends. Dropped unfinished, it detaches
    /// the session (the agent's stream, or the other replica's socket, goes with it).
    fn serve<'a>(
        self,
        sink: &'a mut Sink,
        source: &'a mut Source,
    ) -> impl Future<Output = ()> + Send + 'a;
}

/// Runs `viewer` on `socket` until it detaches or the session ends. When the control plane
/// stops first, the viewer's serving is dropped (so the session is detached) and the browser is
/// told `detached` before its socket is closed.
pub(super) async fn run_viewer(
    viewer: impl Viewer,
    shutdown: tokio_util::sync::CancellationToken,
    socket: WebSocket,
) {
    let (mut sink, mut source) = socket.split();
    tokio::select! {
        () = viewer.serve(&mut sink, &mut source) => {}
        () = shutdown.cancelled() => {
            send_json(&mut sink, json!({"type": "detached", "reason": "control_plane_stopping"})).await;
            close(&mut sink, CLOSE_GOING_AWAY, "control plane stopping").await;
        }
    }
}

/// What the checks before the upgrade established.
pub struct Relay {
    pub state: AppState,
    pub connection: quinn::Connection,
    pub agent_id: String,
    pub user: User,
    pub cols: u16,
    pub rows: u16,
    /// `Some`: attach to this live session (checked to be the caller's).
    pub session: Option<String>,
    /// The attached session's recording, if it has one.
    pub recording: Option<PathBuf>,
    /// New sessions are recorded (the control plane records and the agent opted in).
    pub record: bool,
    /// Counts the new session against the limits until it is in the database.
    pub reservation: Option<Reservation>,
}

/// A control message from the browser.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    Resize { cols: u16, rows: u16 },
    Close,
}

/// Parses a text frame; `None` for anything that is not a known control message.
fn parse_control(text: &str) -> Option<Control> {
    match serde_json::from_str::<Control>(text) {
        Ok(Control::Resize { cols, rows }) if cols == 0 || rows == 0 => None,
        Ok(control) => Some(control),
        Err(_) => None,
    }
}

/// How the agent → browser direction ended.
enum DownEnd {
    Exit(Option<i32>),
    AgentGone,
    ClientGone,
    ProtocolError(String),
}

/// How the browser → agent direction ended.
enum UpEnd {
    ClientGone,
    AgentGone,
}

impl Viewer for Relay {
    fn serve<'a>(
        self,
        sink: &'a mut Sink,
        source: &'a mut Source,
    ) -> impl Future<Output = ()> + Send + 'a {
        self.serve_viewer(sink, source)
    }
}

/// A recording as one relay sees it.
struct RelayRecording {
    recorder: Recorder,
    /// This relay is the session's recorder right now.
    writing: bool,
}

impl Relay {
    /// Runs the viewer until it detaches or the session ends.
    pub async fn run(self, socket: WebSocket) {
        let shutdown = self.state.shutdown.clone();
        run_viewer(self, shutdown, socket).await;
    }

    async fn serve_viewer(mut self, sink: &mut Sink, source: &mut Source) {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, self.open()).await;
        let (mut send, mut recv, mut decoder, session, started) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err((code, message))) => {
                send_json(
                    sink,
                    json!({"type": "error", "code": code, "message": message}),
                )
                .await;
                close(sink, CLOSE_ERROR, code).await;
                return;
            }
            Err(_) => {
                send_json(sink, json!({"type": "error", "code": "agent_timeout", "message": "the agent did not answer in time"})).await;
                close(sink, CLOSE_ERROR, "agent_timeout").await;
                return;
            }
        };
        let hub = self.state.terminals.clone();
        let relay_id = hub.relay_id();
        let recording = std::sync::Mutex::new(self.open_recording(&session));
        info!(session = %session, agent = %self.agent_id, user = %self.user.username, started, recorded = self.recording.is_some(), "terminal viewer connected");
        send_json(sink, json!({"type": "session", "id": session})).await;

        let last_heard = AtomicI64::new(now_ms());
        let mut close_requested = false;
        let ended = {
            let down = down(
                &mut recv,
                &mut decoder,
                sink,
                &last_heard,
                started,
                &recording,
                &hub,
                &session,
                relay_id,
            );
            let up = up(
                source,
                &mut send,
                &last_heard,
                &recording,
                &mut close_requested,
            );
            tokio::select! {
                end = down => Ok(end),
                end = up => Err(end),
            }
        };
        hub.release_recorder(&session, relay_id);
        let store = &self.state.store;
        match ended {
            Ok(DownEnd::Exit(code)) => {
                if let Err(error) = store
                    .close_terminal_session(&session, &self.agent_id, code)
                    .await
                {
                    warn!(%error, "could not record the end of a terminal session");
                }
                info!(session = %session, ?code, "terminal session exited");
                send_json(sink, json!({"type": "exit", "code": code})).await;
                close(sink, CLOSE_NORMAL, "exit").await;
            }
            Ok(DownEnd::AgentGone) | Err(UpEnd::AgentGone) => {
                info!(session = %session, "the agent link of a terminal is gone");
                send_json(
                    sink,
                    json!({"type": "detached", "reason": "agent_disconnected"}),
                )
                .await;
                close(sink, CLOSE_GOING_AWAY, "agent disconnected").await;
            }
            Ok(DownEnd::ProtocolError(detail)) => {
                warn!(session = %session, %detail, "the agent broke the terminal protocol");
                let code = quinn::VarInt::from_u32(CloseCode::ProtocolError.to_u32());
                let _ = send.reset(code);
                let _ = recv.stop(code);
                send_json(sink, json!({"type": "error", "code": "protocol_error", "message": "the agent sent something unexpected"})).await;
                close(sink, CLOSE_ERROR, "protocol error").await;
            }
            Ok(DownEnd::ClientGone) | Err(UpEnd::ClientGone) => {
                // Detach only: the session lives on until the agent's idle timeout.
                let _ = send.finish();
                debug!(session = %session, close_requested, "terminal viewer left");
            }
        }
    }

    /// Opens the stream and asks the agent; returns the stream, the session id and whether it
    /// is a new session, or an error code and message for the browser.
    #[allow(clippy::type_complexity)]
    async fn open(
        &mut self,
    ) -> Result<
        (
            quinn::SendStream,
            quinn::RecvStream,
            FrameDecoder,
            String,
            bool,
        ),
        (&'static str, String),
    > {
        let unreachable = |error: &dyn std::fmt::Display| {
            (
                "agent_unavailable",
                format!("the agent cannot be reached: {error}"),
            )
        };
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|error| unreachable(&error))?;
        let settings = &self.state.config.terminals;
        let open = TerminalOpen {
            session: self.session.clone(),
            cols: self.cols,
            rows: self.rows,
            opened_by: self.user.username.clone(),
            idle_timeout_ms: settings.idle_timeout.as_millis() as u64,
            max_age_ms: settings.max_age.as_millis() as u64,
        };
        write_message(&mut send, &Message::TerminalOpen(open))
            .await
            .map_err(|error| unreachable(&error))?;
        let mut decoder = FrameDecoder::new();
        let answer = read_message(&mut recv, &mut decoder)
            .await
            .map_err(|error| unreachable(&error))?;
        let protocol_error = || {
            (
                "protocol_error",
                "the agent answered with something unexpected".to_owned(),
            )
        };
        match answer {
            Some(Message::TerminalOpened(TerminalOpened::Started { session, pid })) => {
                if !valid_session_id(&session) || self.session.is_some() {
                    return Err(protocol_error());
                }
                let recording = self.record.then(|| {
                    self.state
                        .config
                        .terminals
                        .recordings_dir
                        .join(format!("{session}.cast"))
                });
                if let Some(path) = &recording {
                    // The header goes first, so the file exists whenever the row names it.
                    match Recorder::create(
                        &self.state.config.terminals.recordings_dir,
                        &session,
                        self.cols,
                        self.rows,
                    ) {
                        Ok(_) => self.recording = Some(path.clone()),
                        Err(error) => {
                            warn!(%session, %error, "cannot create a terminal recording; the session is not recorded");
                        }
                    }
                }
                let stored = self
                    .state
                    .store
                    .open_terminal_session(
                        &session,
                        &self.agent_id,
                        &self.user.id,
                        self.recording
                            .as_ref()
                            .map(|path| path.to_string_lossy())
                            .as_deref(),
                    )
                    .await;
                self.reservation.take();
                if let Err(error) = stored {
                    warn!(%session, %error, "cannot record a new terminal session; closing it");
                    let _ = write_message(&mut send, &Message::TerminalClose).await;
                    let _ = send.finish();
                    return Err((
                        "unavailable",
                        "the session could not be recorded; it was closed".to_owned(),
                    ));
                }
                info!(%session, pid, agent = %self.agent_id, user = %self.user.username, "terminal session started");
                Ok((send, recv, decoder, session, true))
            }
            Some(Message::TerminalOpened(TerminalOpened::Attached { session })) => {
                if self.session.as_deref() != Some(session.as_str()) {
                    return Err(protocol_error());
                }
                Ok((send, recv, decoder, session, false))
            }
            Some(Message::TerminalOpened(TerminalOpened::Refused { reason, message })) => {
                let message: String = message
                    .chars()
                    .filter(|character| !character.is_control())
                    .take(300)
                    .collect();
                let code = match reason {
                    TerminalRefusal::NoSuchSession => {
                        if let Some(session) = &self.session
                            && let Err(error) = self
                                .state
                                .store
                                .close_terminal_session(session, &self.agent_id, None)
                                .await
                        {
                            warn!(%error, "could not mark a gone terminal session closed");
                        }
                        "no_such_session"
                    }
                    TerminalRefusal::Limit => "agent_limit",
                    TerminalRefusal::Spawn => "spawn_failed",
                    TerminalRefusal::Disabled => "disabled",
                };
                Err((code, format!("the agent refused the terminal: {message}")))
            }
            Some(_) => Err(protocol_error()),
            None => Err((
                "agent_unavailable",
                "the agent closed the terminal stream".to_owned(),
            )),
        }
    }

    fn open_recording(&self, session: &str) -> Option<RelayRecording> {
        let path = self.recording.as_ref()?;
        match Recorder::append(path) {
            Ok(recorder) => Some(RelayRecording {
                recorder,
                writing: false,
            }),
            Err(error) => {
                warn!(%session, %error, "cannot continue a terminal recording");
                None
            }
        }
    }
}

/// Agent → browser: output (and the recording) until the session exits or a side goes away.
#[allow(clippy::too_many_arguments)]
async fn down(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    sink: &mut Sink,
    last_heard: &AtomicI64,
    started: bool,
    recording: &std::sync::Mutex<Option<RelayRecording>>,
    hub: &super::TerminalHub,
    session: &str,
    relay_id: u64,
) -> DownEnd {
    // An attached viewer first gets the replay, which is already in any recording.
    let mut live = started;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            message = read_message(recv, decoder) => match message {
                Ok(Some(Message::TerminalOutput(output))) => {
                    if output.data.is_empty() {
                        live = true;
                        continue;
                    }
                    if live && let Some(recording) = lock(recording).as_mut() {
                        record(recording, hub, session, relay_id, &output.data);
                    }
                    if sink.send(WsMessage::Binary(output.data.into())).await.is_err() {
                        return DownEnd::ClientGone;
                    }
                }
                Ok(Some(Message::TerminalExit(exit))) => return DownEnd::Exit(exit.code),
                Ok(Some(other)) => return DownEnd::ProtocolError(format!("unexpected {}", other.name())),
                Ok(None) => return DownEnd::AgentGone,
                Err(WireError::Frame(error)) => return DownEnd::ProtocolError(error.to_string()),
                Err(error) => {
                    debug!(%error, "a terminal stream ended");
                    return DownEnd::AgentGone;
                }
            },
            _ = ping.tick() => {
                let silent_ms = now_ms() - last_heard.load(Ordering::Relaxed);
                if silent_ms > CLIENT_SILENCE.as_millis() as i64 {
                    debug!(silent_ms, "terminal client silent; dropping it");
                    return DownEnd::ClientGone;
                }
                if sink.send(WsMessage::Ping(Vec::new().into())).await.is_err() {
                    return DownEnd::ClientGone;
                }
            }
        }
    }
}

/// Writes output to the recording if this relay is (or becomes) the session's recorder.
fn record(
    recording: &mut RelayRecording,
    hub: &super::TerminalHub,
    session: &str,
    relay_id: u64,
    data: &[u8],
) {
    if !hub.claim_recorder(session, relay_id) {
        return;
    }
    if !recording.writing {
        recording.writing = true;
        recording.recorder.take_over();
    }
    if let Err(error) = recording.recorder.output(data) {
        warn!(%session, %error, "writing a terminal recording failed");
    }
}

/// Browser → agent: keystrokes and control messages until the browser leaves.
async fn up(
    source: &mut Source,
    send: &mut quinn::SendStream,
    last_heard: &AtomicI64,
    recording: &std::sync::Mutex<Option<RelayRecording>>,
    close_requested: &mut bool,
) -> UpEnd {
    loop {
        let Some(Ok(message)) = source.next().await else {
            return UpEnd::ClientGone;
        };
        last_heard.store(now_ms(), Ordering::Relaxed);
        let written = match message {
            WsMessage::Binary(data) => {
                let mut result = Ok(());
                for chunk in data.chunks(MAX_TERMINAL_CHUNK) {
                    let input = Message::TerminalInput(TerminalInput {
                        data: chunk.to_vec(),
                    });
                    result = write_message(send, &input).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            WsMessage::Text(text) => match parse_control(text.as_str()) {
                Some(Control::Resize { cols, rows }) => {
                    if let Some(recording) = lock(recording).as_mut()
                        && let Err(error) = recording.recorder.resize(cols, rows)
                    {
                        warn!(%error, "writing a terminal recording failed");
                    }
                    write_message(
                        send,
                        &Message::TerminalResize(TerminalResize { cols, rows }),
                    )
                    .await
                }
                Some(Control::Close) => {
                    *close_requested = true;
                    write_message(send, &Message::TerminalClose).await
                }
                None => {
                    debug!(
                        length = text.len(),
                        "ignoring an unknown terminal control message"
                    );
                    Ok(())
                }
            },
            WsMessage::Close(_) => return UpEnd::ClientGone,
            WsMessage::Ping(_) | WsMessage::Pong(_) => Ok(()),
        };
        if written.is_err() {
            return UpEnd::AgentGone;
        }
    }
}

/// The relay's recording; its lock is never held across an await.
fn lock(
    recording: &std::sync::Mutex<Option<RelayRecording>>,
) -> std::sync::MutexGuard<'_, Option<RelayRecording>> {
    recording
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) async fn send_json(sink: &mut Sink, value: serde_json::Value) {
    let _ = sink
        .send(WsMessage::Text(Utf8Bytes::from(value.to_string())))
        .await;
}

pub(super) async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let _ = sink
        .send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_owned()),
        })))
        .await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_are_parsed_defensively() {
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":120,"rows":40}"#),
            Some(Control::Resize {
                cols: 120,
                rows: 40
            })
        );
        assert_eq!(parse_control(r#"{"type":"close"}"#), Some(Control::Close));
        for ignored in [
            r#"{"type":"resize","cols":0,"rows":40}"#,
            r#"{"type":"resize","cols":70000,"rows":40}"#,
            r#"{"type":"resize","cols":"a","rows":40}"#,
            r#"{"type":"paste","data":"x"}"#,
            r#"{"cols":1}"#,
            "not json",
            "",
            "[]",
        ] {
            assert_eq!(parse_control(ignored), None, "{ignored}");
        }
    }
}
