//! A terminal viewer on one replica (B) of an agent connected to another (A), and recordings
//! read through B that A wrote (issue 8).
//!
//! B does every check of `http::terminals` (credentials, Origin, grant, session ownership,
//! limits: the user-facing checks stay where the user is), finds A with [`locate`] (the agent's
//! `agent_presence` row, then A's `relay_url` in the replica registry) and upgrades the
//! browser's WebSocket. [`RemoteRelay`] then opens a WebSocket of its own to A's internal route
//! (`GET /api/v1/internal/terminals/relay`, `http::terminal_relay`) with a relay token
//! (`relay_token`) naming the agent, the user, the session and the size. A runs the usual relay
//! (`relay::Relay`) for it: the QUIC stream on the agent, the session row, the recording (A
//! writes it, in A's data dir). So the internal WebSocket speaks exactly the public terminal
//! protocol, and B passes its frames through untouched:
//!
//! browser ⇄ WebSocket ⇄ B ⇄ WebSocket ⇄ A ⇄ QUIC stream ⇄ agent ⇄ PTY
//!
//! A's `relay_url` may be `http://` (the socket in the clear: a private network) or `https://`
//! (TLS, trusting the system's CA bundle).
//!
//! Both directions run at once (keystrokes never wait behind output) and are bounded: each
//! frame is sent, and the send awaited, before the next is read, so a slow browser throttles
//! A's socket, which throttles the QUIC stream as for a local viewer. B pings the browser and A
//! pings B; either side silent for `relay::CLIENT_SILENCE` is gone. When A's socket ends
//! without A's last message (`exit`, `detached`, `error`) the viewer gets
//! `{"type":"detached","reason":"agent_disconnected"}` (before the session was named:
//! `{"type":"error","code":"agent_unavailable"}`); on A the closed socket detaches the session
//! as a closed browser does. A viewer leaving B closes A's socket: the session is detached.
//! Everything runs inside the upgraded connection's task, which the control plane's tracker
//! owns; nothing else is spawned.
//!
//! A recording is written by the replica holding the agent's stream. `GET
//! /terminal-sessions/{id}/recording` on another replica reads its own data dir first, then asks
//! every live replica's internal route (`GET /api/v1/internal/terminals/recording`) and streams
//! the first that has the file ([`fetch_recording`]).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http::HeaderValue};
use tracing::{debug, info, warn};

use super::Reservation;
use super::relay::{
    CLIENT_SILENCE, CLOSE_ERROR, CLOSE_GOING_AWAY, OPEN_TIMEOUT, PING_INTERVAL, Sink, Source,
    close, send_json,
};
use super::relay_token::{Grant, HEADER};
use crate::AppState;
use crate::replicas::presence::STALE_AFTER;
use crate::store::{StoreResult, now_ms};

/// The internal route a replica serves relayed terminals on (under `/api/v1`).
pub const RELAY_PATH: &str = "/api/v1/internal/terminals/relay";

/// The internal route a replica serves its recordings to other replicas on (under `/api/v1`).
pub const RECORDING_PATH: &str = "/api/v1/internal/terminals/recording";

/// Largest message accepted from the other replica (its relay sends terminal output in chunks
/// of at most `MAX_TERMINAL_CHUNK`, and short JSON).
const MAX_UPSTREAM_MESSAGE: usize = 256 * 1024;

/// How long connecting to another replica for a recording may take, and each read after it.
const RECORDING_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECORDING_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The system's CA bundle, trusted for `https://` relay URLs (as for email tools).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A connection to another replica: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Upstream = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;
type UpstreamSink = SplitSink<Upstream, tungstenite::Message>;
type UpstreamSource = SplitStream<Upstream>;

/// Another replica serving an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its replica id (what relay tokens name).
    pub replica: String,
    /// Its `relay_url` from the replica registry.
    pub relay_url: String,
}

/// The live replica other than this one that `agent_id` is connected to, if any (never on
/// SQLite, where there is one control plane).
pub async fn locate(state: &AppState, agent_id: &str) -> StoreResult<Option<Target>> {
    if !state.replicas.is_shared() {
        return Ok(None);
    }
    let now = now_ms();
    let stale_after = STALE_AFTER.as_millis() as i64;
    let Some(replica) = state
        .store
        .agent_replica(agent_id, now, stale_after)
        .await?
    else {
        return Ok(None);
    };
    if replica == state.replicas.id() {
        // Our own row outlived the connection by up to one refresh.
        return Ok(None);
    }
    let Some(record) = state.store.replica(&replica).await? else {
        return Ok(None);
    };
    if record.seen_at < now - stale_after {
        return Ok(None);
    }
    Ok(Some(Target {
        replica,
        relay_url: record.relay_url,
    }))
}

/// `http(s)://host:port[/prefix]` + `path`, as a `ws(s)://` URL for a WebSocket; `None` for
/// anything but an http(s) URL with a host.
fn internal_url(relay_url: &str, path: &str, websocket: bool) -> Option<String> {
    let url = reqwest::Url::parse(relay_url.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    let base = url.as_str().trim_end_matches('/');
    let base = if websocket {
        format!("ws{}", base.strip_prefix("http")?)
    } else {
        base.to_owned()
    };
    Some(format!("{base}{path}"))
}

/// The system's CA bundle as rustls roots.
fn system_roots() -> rustls::RootCertStore {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(bundle) = std::fs::read(SYSTEM_CA_BUNDLE) {
        for certificate in CertificateDer::pem_slice_iter(&bundle).flatten() {
            let _ = roots.add(certificate);
        }
    }
    roots
}

/// Why a WebSocket to another replica could not be opened.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("not a ws:// or wss:// URL with a host")]
    Url,
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    WebSocket(#[from] tungstenite::Error),
}

/// Opens the WebSocket `request` names (`ws://`, or `wss://` trusting `roots`), with `config`.
async fn open_websocket(
    request: tungstenite::handshake::client::Request,
    roots: rustls::RootCertStore,
    config: tungstenite::protocol::WebSocketConfig,
) -> Result<Upstream, ConnectError> {
    let url = reqwest::Url::parse(&request.uri().to_string()).map_err(|_| ConnectError::Url)?;
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(ConnectError::Url);
    };
    // An IPv6 literal without its brackets.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    // Keystrokes go out at once.
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Io> = match url.scheme() {
        "ws" => Box::new(tcp),
        "wss" => {
            // A name or an IP address, as the certificate must name it.
            let name = rustls_pki_types::ServerName::try_from(host)
                .map_err(|error| ConnectError::Tls(error.to_string()))?;
            let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|error| ConnectError::Tls(error.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
            Box::new(connector.connect(name, tcp).await?)
        }
        _ => return Err(ConnectError::Url),
    };
    let (upstream, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(upstream)
}

/// What the checks before the upgrade established, for a viewer relayed to another replica.
pub struct RemoteRelay {
    pub state: AppState,
    pub target: Target,
    /// What the token grants (a [`Grant::Terminal`]).
    pub grant: Grant,
    /// Counts a new session against the limits until the other replica named it.
    pub reservation: Option<Reservation>,
}

/// How a relayed viewer ended.
enum End {
    /// The other replica sent its last message and closed; passed on.
    Finished,
    /// The other replica's socket ended without a last message.
    UpstreamGone,
    /// The browser left.
    ClientGone,
}

impl super::relay::Viewer for RemoteRelay {
    fn serve<'a>(
        self,
        sink: &'a mut Sink,
        source: &'a mut Source,
    ) -> impl Future<Output = ()> + Send + 'a {
        self.serve_viewer(sink, source)
    }
}

/// The `type` of a control message.
#[derive(Deserialize)]
struct ControlType {
    #[serde(rename = "type")]
    kind: String,
}

impl RemoteRelay {
    /// Runs the relayed viewer until it detaches or the session ends.
    pub async fn run(self, socket: WebSocket) {
        let shutdown = self.state.shutdown.clone();
        super::relay::run_viewer(self, shutdown, socket).await;
    }

    async fn serve_viewer(mut self, sink: &mut Sink, source: &mut Source) {
        let upstream = match tokio::time::timeout(OPEN_TIMEOUT, self.connect()).await {
            Ok(Ok(upstream)) => upstream,
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
                send_json(sink, json!({"type": "error", "code": "agent_timeout", "message": "the replica serving the agent did not answer in time"})).await;
                close(sink, CLOSE_ERROR, "agent_timeout").await;
                return;
            }
        };
        info!(replica = %self.target.replica, "terminal viewer relayed to the agent's replica");
        let (mut upstream_sink, mut upstream_source) = upstream.split();
        let last_heard = AtomicI64::new(now_ms());
        let named = AtomicBool::new(false);
        let end = {
            let down = down(
                &mut upstream_source,
                sink,
                &last_heard,
                &named,
                &mut self.reservation,
            );
            let up = up(source, &mut upstream_sink, &last_heard);
            tokio::select! {
                end = down => end,
                end = up => end,
            }
        };
        self.reservation.take();
        match end {
            End::Finished => {}
            End::UpstreamGone => {
                info!(replica = %self.target.replica, "the replica serving a relayed terminal went away");
                if named.load(Ordering::Relaxed) {
                    send_json(
                        sink,
                        json!({"type": "detached", "reason": "agent_disconnected"}),
                    )
                    .await;
                    close(sink, CLOSE_GOING_AWAY, "agent disconnected").await;
                } else {
                    send_json(sink, json!({"type": "error", "code": "agent_unavailable", "message": "the replica serving the agent went away"})).await;
                    close(sink, CLOSE_ERROR, "agent_unavailable").await;
                }
            }
            End::ClientGone => {
                // Detach only: the other replica's relay sees its socket close.
                let closing = upstream_sink.send(tungstenite::Message::Close(None));
                let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
                debug!("relayed terminal viewer left");
            }
        }
    }

    /// Opens the WebSocket to the other replica's internal route; an error code and message for
    /// the browser otherwise.
    async fn connect(&self) -> Result<Upstream, (&'static str, String)> {
        let unavailable = || {
            (
                "agent_unavailable",
                "the replica serving the agent cannot be reached".to_owned(),
            )
        };
        let Some(url) = internal_url(&self.target.relay_url, RELAY_PATH, true) else {
            warn!(replica = %self.target.replica, relay_url = %self.target.relay_url, "a replica's relay URL is not an http(s) URL; terminals of its agents cannot be relayed");
            return Err(unavailable());
        };
        let token = self.state.terminals.relay_auth().mint(
            &self.target.replica,
            self.grant.clone(),
            now_ms(),
        );
        let tls = url.starts_with("wss:");
        let mut request = url.into_client_request().map_err(|_| unavailable())?;
        request.headers_mut().insert(
            HEADER,
            HeaderValue::from_str(&token).map_err(|_| unavailable())?,
        );
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_UPSTREAM_MESSAGE))
            .max_frame_size(Some(MAX_UPSTREAM_MESSAGE));
        let roots = if tls {
            system_roots()
        } else {
            rustls::RootCertStore::empty()
        };
        match open_websocket(request, roots, config).await {
            Ok(upstream) => Ok(upstream),
            Err(ConnectError::WebSocket(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let message = response
                    .body()
                    .as_deref()
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                    .and_then(|body| body["error"]["message"].as_str().map(str::to_owned));
                match status {
                    401 => {
                        warn!(replica = %self.target.replica, "the agent's replica refused the relay token (are the replicas' clocks in sync?)");
                        Err(unavailable())
                    }
                    404 => Err((
                        "no_such_session",
                        message.unwrap_or_else(|| "no such terminal session".to_owned()),
                    )),
                    409 => Err((
                        "agent_unavailable",
                        "the agent just left the replica serving it; try again".to_owned(),
                    )),
                    _ => {
                        warn!(replica = %self.target.replica, status, "the agent's replica refused a relayed terminal");
                        Err(unavailable())
                    }
                }
            }
            Err(error) => {
                warn!(replica = %self.target.replica, %error, "cannot reach the agent's replica for a terminal");
                Err(unavailable())
            }
        }
    }
}

/// Other replica → browser: everything passed through until a side goes away.
async fn down(
    upstream: &mut UpstreamSource,
    sink: &mut Sink,
    last_heard: &AtomicI64,
    named: &AtomicBool,
    reservation: &mut Option<Reservation>,
) -> End {
    let mut upstream_heard = now_ms();
    let mut finished = false;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            message = upstream.next() => {
                upstream_heard = now_ms();
                let forwarded = match message {
                    Some(Ok(tungstenite::Message::Text(text))) => {
                        match serde_json::from_str::<ControlType>(text.as_str()) {
                            Ok(control) if control.kind == "session" => {
                                named.store(true, Ordering::Relaxed);
                                // The session is in the database now: it counts from there.
                                reservation.take();
                            }
                            Ok(control) if matches!(control.kind.as_str(), "exit" | "detached" | "error") => {
                                finished = true;
                            }
                            _ => {}
                        }
                        sink.send(WsMessage::Text(Utf8Bytes::from(text.as_str()))).await
                    }
                    Some(Ok(tungstenite::Message::Binary(data))) => {
                        sink.send(WsMessage::Binary(data)).await
                    }
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        if !finished {
                            return End::UpstreamGone;
                        }
                        let (code, reason) = frame
                            .map(|frame| (u16::from(frame.code), frame.reason.as_str().to_owned()))
                            .unwrap_or((super::relay::CLOSE_NORMAL, String::new()));
                        close(sink, code, &reason).await;
                        return End::Finished;
                    }
                    // Pongs are answered by the WebSocket itself.
                    Some(Ok(_)) => Ok(()),
                    None | Some(Err(_)) => {
                        if finished {
                            close(sink, super::relay::CLOSE_NORMAL, "").await;
                            return End::Finished;
                        }
                        return End::UpstreamGone;
                    }
                };
                if forwarded.is_err() {
                    return End::ClientGone;
                }
            }
            _ = ping.tick() => {
                let now = now_ms();
                if now - last_heard.load(Ordering::Relaxed) > CLIENT_SILENCE.as_millis() as i64 {
                    debug!("relayed terminal client silent; dropping it");
                    return End::ClientGone;
                }
                if now - upstream_heard > CLIENT_SILENCE.as_millis() as i64 {
                    // The other replica pings every `PING_INTERVAL`: it is gone.
                    return End::UpstreamGone;
                }
                if sink.send(WsMessage::Ping(Vec::new().into())).await.is_err() {
                    return End::ClientGone;
                }
            }
        }
    }
}

/// Browser → other replica: keystrokes and control messages until a side goes away.
async fn up(source: &mut Source, upstream: &mut UpstreamSink, last_heard: &AtomicI64) -> End {
    loop {
        let Some(Ok(message)) = source.next().await else {
            return End::ClientGone;
        };
        last_heard.store(now_ms(), Ordering::Relaxed);
        let forwarded = match message {
            WsMessage::Binary(data) => upstream.send(tungstenite::Message::Binary(data)).await,
            WsMessage::Text(text) => {
                upstream
                    .send(tungstenite::Message::text(text.as_str()))
                    .await
            }
            WsMessage::Close(_) => return End::ClientGone,
            WsMessage::Ping(_) | WsMessage::Pong(_) => Ok(()),
        };
        if forwarded.is_err() {
            return End::UpstreamGone;
        }
    }
}

/// The recording of `session` (which `user` may read) from the first other live replica that
/// has it, streamed; `None` when none has it.
pub async fn fetch_recording(
    state: &AppState,
    session: &str,
    user: &str,
) -> StoreResult<Option<Response>> {
    if !state.replicas.is_shared() {
        return Ok(None);
    }
    let replicas = state
        .store
        .live_replicas(now_ms(), STALE_AFTER.as_millis() as i64)
        .await?;
    let client = match reqwest::Client::builder()
        .connect_timeout(RECORDING_CONNECT_TIMEOUT)
        .read_timeout(RECORDING_READ_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, "cannot build the HTTP client for recordings on other replicas");
            return Ok(None);
        }
    };
    for replica in replicas
        .iter()
        .filter(|replica| replica.id != state.replicas.id())
    {
        let Some(url) = internal_url(&replica.relay_url, RECORDING_PATH, false) else {
            continue;
        };
        let grant = Grant::Recording {
            session: session.to_owned(),
            user: user.to_owned(),
        };
        let token = state
            .terminals
            .relay_auth()
            .mint(&replica.id, grant, now_ms());
        let response = match client.get(&url).header(HEADER, token).send().await {
            Ok(response) => response,
            Err(error) => {
                warn!(replica = %replica.id, %error, "cannot ask a replica for a recording");
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {
                debug!(replica = %replica.id, %session, "recording read through its replica");
                return Ok(Some(
                    (
                        [
                            (header::CONTENT_TYPE, "application/x-asciicast".to_owned()),
                            (
                                header::CONTENT_DISPOSITION,
                                format!("attachment; filename=\"{session}.cast\""),
                            ),
                        ],
                        Body::from_stream(response.bytes_stream()),
                    )
                        .into_response(),
                ));
            }
            404 => {}
            status => {
                warn!(replica = %replica.id, status, "a replica refused to hand over a recording");
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_urls_are_plain_http_only() {
        assert_eq!(
            internal_url("http://10.0.0.5:8080", RELAY_PATH, true).as_deref(),
            Some("ws://10.0.0.5:8080/api/v1/internal/terminals/relay")
        );
        assert_eq!(
            internal_url("http://a.internal:8080/", RECORDING_PATH, false).as_deref(),
            Some("http://a.internal:8080/api/v1/internal/terminals/recording")
        );
        assert_eq!(
            internal_url("http://[::1]:9", RELAY_PATH, true).as_deref(),
            Some("ws://[::1]:9/api/v1/internal/terminals/relay")
        );
        assert_eq!(
            internal_url("https://a.example", RELAY_PATH, true).as_deref(),
            Some("wss://a.example/api/v1/internal/terminals/relay")
        );
        for refused in ["ftp://a", "not a url", "", "http://"] {
            assert_eq!(internal_url(refused, RELAY_PATH, true), None, "{refused}");
        }
    }

    /// A one-connection WebSocket server on 127.0.0.1 (TLS with `tls`): it answers the relay
    /// header's value as a text message. Returns its port.
    // The handshake callback's error type is tungstenite's, large by its choice.
    #[allow(clippy::result_large_err)]
    async fn echo_header_server(tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let stream: Box<dyn Io> = match tls {
                // A client that does not trust the certificate ends the handshake.
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(_) => return,
                },
                None => Box::new(tcp),
            };
            let mut header = String::new();
            let mut socket = tokio_tungstenite::accept_hdr_async(
                stream,
                |request: &tungstenite::handshake::server::Request, response| {
                    header = request.headers()[HEADER].to_str().unwrap().to_owned();
                    Ok(response)
                },
            )
            .await
            .unwrap();
            socket
                .send(tungstenite::Message::text(header))
                .await
                .unwrap();
            let _ = socket.close(None).await;
        });
        port
    }

    fn request(url: &str) -> tungstenite::handshake::client::Request {
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert(HEADER, HeaderValue::from_static("the-token"));
        request
    }

    async fn first_text(mut upstream: Upstream) -> String {
        match upstream.next().await {
            Some(Ok(tungstenite::Message::Text(text))) => text.as_str().to_owned(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_relay_client_speaks_ws_and_wss_with_the_given_roots_only() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = tungstenite::protocol::WebSocketConfig::default();
        // Plain: what replicas on one private network use.
        let port = echo_header_server(None).await;
        let upstream = open_websocket(
            request(&format!("ws://127.0.0.1:{port}/x")),
            rustls::RootCertStore::empty(),
            config,
        )
        .await
        .unwrap();
        assert_eq!(first_text(upstream).await, "the-token");

        // TLS: the certificate must chain to the roots given (the system's, in production).
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let certificate = certified.cert.der().clone();
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certificate.clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let mut trusted = rustls::RootCertStore::empty();
        trusted.add(certificate).unwrap();
        let port = echo_header_server(Some(acceptor.clone())).await;
        let upstream = open_websocket(
            request(&format!("wss://localhost:{port}/x")),
            trusted,
            config,
        )
        .await
        .unwrap();
        assert_eq!(first_text(upstream).await, "the-token");

        // Not trusted: refused before the handshake, the token never sent.
        let port = echo_header_server(Some(acceptor)).await;
        let refused = open_websocket(
            request(&format!("wss://localhost:{port}/x")),
            rustls::RootCertStore::empty(),
            config,
        )
        .await;
        match refused {
            Err(ConnectError::Io(error)) => {
                assert!(error.to_string().contains("certificate"), "{error}");
            }
            Err(error) => panic!("refused for another reason: {error}"),
            Ok(_) => panic!("an untrusted certificate was accepted"),
        }
    }
}
