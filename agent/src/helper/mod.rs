//! The runtime helper endpoint of one attempt: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! Every attempt gets its own server on `<work dir>/.cronium/helper.sock` and its own token (32
//! random bytes, hex); requests carry `Authorization: Bearer <token>`, anything else is answered
//! 401. The server lives exactly as long as the attempt's process: dropping the
//! [`HelperServer`] stops it and removes the socket, so a call after the job ended finds nothing
//! to connect to. The helper libraries (`cronium.sh`, `cronium.py`, `cronium.js`) are written
//! into the work dir next to the script ([`write_libraries`]).
//!
//! Calls answered here: `GET /v1/input`, `POST /v1/output`, `POST /v1/condition`,
//! `GET /v1/event`. Output and condition go to the attempt's spool and travel to the control
//! plane in `JobFinished`.
//!
//! Calls forwarded to the control plane ([`forward`]): `POST /v1/variables/get` (a variable of
//! the event's owner; a value the script set that is still on its way is answered from the
//! journal), `POST /v1/variables/set` and `POST /v1/notify`. Writes go to the attempt's
//! [`journal`] first: the call answers 200 once the control plane applied it, or 202
//! `{"queued": true}` when the link is down, and the write is sent when it is back (before the
//! attempt's result).

use std::convert::Infallible;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use cronium_protocol::JobSpec;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::forward::{ForwardError, HelperLink};
use crate::spool::AttemptSpool;
use cronium_protocol::{
    AttemptRef, HelperRefusal, HelperReply, HelperRequest, MAX_HELPER_NAME, MAX_HELPER_VALUE,
};

pub mod forward;
pub mod journal;

/// How long a write call waits for the control plane's answer before answering "queued" (it
/// does not wait for a connection: while the link is down writes are queued at once).
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// How long `get_variable` waits for a connection, and then for the answer, before giving up.
const READ_WAIT: Duration = Duration::from_secs(10);

/// The helper dir inside the work dir.
pub const HELPER_DIR: &str = ".cronium";

/// The socket's file name inside [`HELPER_DIR`].
pub const SOCKET_NAME: &str = "helper.sock";

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// Longest socket path bound directly (`sun_path` holds 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The Bash library.
const LIB_SH: &str = include_str!("lib/cronium.sh");
/// The Python library.
const LIB_PY: &str = include_str!("lib/cronium.py");
/// The Node.js library.
const LIB_JS: &str = include_str!("lib/cronium.js");

/// What the helper endpoint answers from, per attempt.
#[derive(Debug)]
struct Context {
    token: String,
    input: Value,
    event: Value,
    spool: AttemptSpool,
    job: AttemptRef,
    link: HelperLink,
}

/// A running helper endpoint; dropping it stops the server and removes the socket.
#[derive(Debug)]
pub struct HelperServer {
    token: String,
    socket: PathBuf,
    client_path: String,
    stop: CancellationToken,
}

impl HelperServer {
    /// Starts the endpoint of `spec`'s attempt in `work_dir` (which must exist). `shared`: the
    /// script runs as another user (a Docker job with a `user`), so the socket must be
    /// reachable by it. Calls that need the control plane go through `link`.
    pub fn start(
        work_dir: &Path,
        spec: &JobSpec,
        spool: AttemptSpool,
        shared: bool,
        link: HelperLink,
    ) -> io::Result<HelperServer> {
        let dir = work_dir.join(HELPER_DIR);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        if shared {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        let socket = dir.join(SOCKET_NAME);
        let (listener, client_path) = bind(&dir, &socket)?;
        let mode = if shared { 0o666 } else { 0o600 };
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))?;

        let token = new_token();
        let input = spec
            .input
            .as_deref()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
            .unwrap_or(Value::Null);
        let context = std::sync::Arc::new(Context {
            token: token.clone(),
            input,
            event: json!({
                "job_id": spec.job_id,
                "run_id": spec.run_id,
                "event_id": spec.event_id,
                "attempt": spec.attempt,
            }),
            job: spool.attempt().clone(),
            spool,
            link,
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, context, stop.clone()));
        Ok(HelperServer {
            token,
            socket,
            client_path,
            stop,
        })
    }

    /// The attempt's token (`CRONIUM_JOB_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The socket path a process on the host connects to (`CRONIUM_HELPER_SOCKET`): absolute,
    /// or relative to the work dir when the absolute path is too long for a Unix socket.
    pub fn client_path(&self) -> &str {
        &self.client_path
    }
}

impl Drop for HelperServer {
    fn drop(&mut self) {
        self.stop.cancel();
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(socket = %self.socket.display(), %error, "could not remove a helper socket")
            }
        }
    }
}

/// Binds the socket; a path too long for `sun_path` is bound through `/proc/self/fd`.
fn bind(dir: &Path, socket: &Path) -> io::Result<(UnixListener, String)> {
    let absolute = socket.to_string_lossy().into_owned();
    let listener = if absolute.len() <= MAX_SOCKET_PATH {
        std::os::unix::net::UnixListener::bind(socket)?
    } else {
        let handle = std::fs::File::open(dir)?;
        let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", handle.as_raw_fd());
        let listener = std::os::unix::net::UnixListener::bind(&short)?;
        drop(handle);
        listener
    };
    listener.set_nonblocking(true)?;
    let client_path = if absolute.len() <= MAX_SOCKET_PATH {
        absolute
    } else {
        format!("{HELPER_DIR}/{SOCKET_NAME}")
    };
    Ok((UnixListener::from_std(listener)?, client_path))
}

/// 32 random bytes, hex.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Writes `cronium.sh`, `cronium.py` and `cronium.js` into the work dir.
pub fn write_libraries(work_dir: &Path, shared: bool) -> io::Result<()> {
    let mode = if shared { 0o644 } else { 0o600 };
    for (name, text) in [
        ("cronium.sh", LIB_SH),
        ("cronium.py", LIB_PY),
        ("cronium.js", LIB_JS),
    ] {
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(work_dir.join(name))?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        std::fs::set_permissions(work_dir.join(name), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

async fn serve(listener: UnixListener, context: std::sync::Arc<Context>, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "helper accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let context = context.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(handle(&context, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        tracing::debug!(%error, "helper connection ended with an error");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
    drop(listener);
    connections.close();
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn authorized(context: &Context, header: Option<&HeaderValue>) -> bool {
    let Some(value) = header.and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq(token.trim().as_bytes(), context.token.as_bytes())
}

fn answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    answer(status, &json!({ "error": message }))
}

/// Reads a JSON object body.
async fn read_object(
    request: Request<Incoming>,
) -> Result<serde_json::Map<String, Value>, Response<Full<Bytes>>> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(failure) => {
            if failure
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(too_large());
            }
            return Err(error(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
            ));
        }
    };
    match serde_json::from_slice(&body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
        )),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "the request body is not JSON",
        )),
    }
}

/// Reads a JSON object body with a `value` field.
async fn read_value(request: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    read_object(request).await?.remove("value").ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "the request body has no \"value\" field",
        )
    })
}

/// The value `set_variable NAME TEXT` stores from the shell: TEXT as JSON when it parses as
/// JSON, else TEXT as a string.
pub fn value_from_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Checks a `set_variable` request: a string `name` and a `value` (or a shell `text`).
fn parse_set_variable(
    mut object: serde_json::Map<String, Value>,
) -> Result<(String, Value), &'static str> {
    let Some(Value::String(name)) = object.remove("name") else {
        return Err("the variable name must be a string");
    };
    if name.is_empty() {
        return Err("the variable name must not be empty");
    }
    let value = match (object.remove("value"), object.remove("text")) {
        (Some(value), None) => value,
        (None, Some(Value::String(text))) => value_from_text(&text),
        _ => return Err("expected {\"name\", \"value\"} or {\"name\", \"text\"}"),
    };
    Ok((name, value))
}

fn too_large() -> Response<Full<Bytes>> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than {MAX_BODY} bytes"),
    )
}

/// Checks a variable or tool name: 1 to [`MAX_HELPER_NAME`] of `A-Z a-z 0-9 _ . -`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_HELPER_NAME
        || !name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
    {
        return Err(format!(
            "the {what} name {name:?} is not valid (1 to {MAX_HELPER_NAME} of A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok(())
}

/// The HTTP status a refusal from the control plane is answered with.
fn refusal(reason: HelperRefusal, message: &str) -> Response<Full<Bytes>> {
    let status = match reason {
        HelperRefusal::Stale => StatusCode::CONFLICT,
        HelperRefusal::NotFound => StatusCode::NOT_FOUND,
        HelperRefusal::Invalid => StatusCode::BAD_REQUEST,
        HelperRefusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, message)
}

fn unreachable_answer(failure: &ForwardError) -> Response<Full<Bytes>> {
    tracing::debug!(error = %failure, "a forwarded helper read failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("the control plane is unreachable right now ({failure}); try again"),
    )
}

/// `get_variable`: `{"name"}`, plus `"format": "text"` for the shell library (a string raw,
/// nothing when unset, anything else as JSON).
async fn get_variable(context: &Context, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut object = match read_object(request).await {
        Ok(object) => object,
        Err(response) => return response,
    };
    let Some(Value::String(name)) = object.remove("name") else {
        return error(
            StatusCode::BAD_REQUEST,
            "the variable name must be a string",
        );
    };
    if let Err(message) = check_name("variable", &name) {
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let text_format = match object.remove("format") {
        None => false,
        Some(Value::String(format)) if format == "json" => false,
        Some(Value::String(format)) if format == "text" => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "format must be \"json\" or \"text\"",
            );
        }
    };
    let value_json = match context.spool.journal().pending_value(&name) {
        Some(pending) => Some(pending),
        None => {
            let reply = tokio::time::timeout(
                READ_WAIT * 2,
                context.link.read(
                    &context.job,
                    HelperRequest::GetVariable { name: name.clone() },
                    READ_WAIT,
                ),
            )
            .await
            .unwrap_or(Err(ForwardError::Timeout(READ_WAIT * 2)));
            match reply {
                Ok(HelperReply::Value { value_json }) => value_json,
                Ok(HelperReply::Refused { reason, message }) => return refusal(reason, &message),
                Ok(HelperReply::Done) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "the control plane gave an unexpected answer",
                    );
                }
                Err(failure) => return unreachable_answer(&failure),
            }
        }
    };
    let value = match value_json.as_deref().map(serde_json::from_str::<Value>) {
        None => Value::Null,
        Some(Ok(value)) => value,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_GATEWAY,
                "the control plane sent a value that is not JSON",
            );
        }
    };
    if text_format {
        let text = match (&value_json, value) {
            (None, _) => String::new(),
            (Some(_), Value::String(text)) => text,
            (Some(_), other) => other.to_string(),
        };
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return response;
    }
    answer(StatusCode::OK, &json!({ "value": value }))
}

/// `notify`: `{"message", "title"?, "tool"?}`.
fn parse_notify(mut object: serde_json::Map<String, Value>) -> Result<HelperRequest, String> {
    let message = match object.remove("message") {
        Some(Value::String(message)) if !message.trim().is_empty() => message,
        _ => return Err("notify needs a non-empty message".into()),
    };
    let mut optional = |field: &str| match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("the notification's {field} must be a string")),
    };
    let title = optional("title")?;
    let tool = optional("tool")?;
    if let Some(tool) = &tool {
        check_name("tool", tool)?;
    }
    if let Some(field) = object.keys().next() {
        return Err(format!(
            "unknown field {field:?} (notify takes message, title and tool)"
        ));
    }
    if message.len() + title.as_ref().map_or(0, String::len) > MAX_HELPER_VALUE {
        return Err(format!(
            "the notification is larger than {MAX_HELPER_VALUE} bytes"
        ));
    }
    Ok(HelperRequest::Notify {
        tool,
        title,
        message,
    })
}

/// Journals a write, then tries to deliver it: 200 once the control plane applied it, 202
/// `{"queued": true}` while the link is down, the refusal when it was refused.
async fn forward_write(context: &Context, request: HelperRequest) -> Response<Full<Bytes>> {
    // Notifications leave the system: secret values in them are masked like the log.
    let request = match request {
        HelperRequest::Notify {
            tool,
            title,
            message,
        } => {
            let masker = context.spool.masker();
            HelperRequest::Notify {
                tool,
                title: title.map(|title| masker.mask_str(&title)),
                message: masker.mask_str(&message),
            }
        }
        other => other,
    };
    let journal = context.spool.journal();
    let seq = match journal.append(request) {
        Ok(seq) => seq,
        Err(failure) => {
            tracing::warn!(error = %failure, "could not journal a helper write");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the agent could not store the call",
            );
        }
    };
    let flushed = tokio::time::timeout(
        WRITE_WAIT,
        context.link.flush(journal, &context.job, Duration::ZERO),
    )
    .await;
    match flushed {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => tracing::debug!(error = %failure, "helper write queued"),
        Err(_) => tracing::debug!("no answer to a helper write in time; it stays queued"),
    }
    if !journal.is_settled(seq) {
        return answer(StatusCode::ACCEPTED, &json!({ "ok": true, "queued": true }));
    }
    match journal.take_refusal(seq) {
        Some((reason, message)) => refusal(reason, &message),
        None => answer(StatusCode::OK, &json!({ "ok": true })),
    }
}

async fn handle(context: &Context, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(context, request.headers().get(AUTHORIZATION)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong job token (Authorization: Bearer $CRONIUM_JOB_TOKEN)",
        );
    }
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (path.as_str(), method) {
        ("/v1/input", Method::GET) => answer(StatusCode::OK, &context.input),
        ("/v1/event", Method::GET) => answer(StatusCode::OK, &context.event),
        ("/v1/output", Method::POST) => {
            let value = match read_value(request).await {
                Ok(value) => value,
                Err(response) => return response,
            };
            match context.spool.set_output(&value.to_string()) {
                Ok(()) => answer(StatusCode::OK, &json!({ "ok": true })),
                Err(failure) => {
                    tracing::warn!(error = %failure, "could not store a job's output value");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the agent could not store the value",
                    )
                }
            }
        }
        ("/v1/condition", Method::POST) => {
            let value = match read_value(request).await {
                Ok(value) => value,
                Err(response) => return response,
            };
            let Value::Bool(condition) = value else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the condition must be true or false",
                );
            };
            match context.spool.set_condition(condition) {
                Ok(()) => answer(StatusCode::OK, &json!({ "ok": true })),
                Err(failure) => {
                    tracing::warn!(error = %failure, "could not store a job's condition");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the agent could not store the condition",
                    )
                }
            }
        }
        ("/v1/variables/get", Method::POST) => get_variable(context, request).await,
        ("/v1/variables/set", Method::POST) => {
            let object = match read_object(request).await {
                Ok(object) => object,
                Err(response) => return response,
            };
            let (name, value) = match parse_set_variable(object) {
                Ok(parsed) => parsed,
                Err(message) => return error(StatusCode::BAD_REQUEST, message),
            };
            if let Err(message) = check_name("variable", &name) {
                return error(StatusCode::BAD_REQUEST, &message);
            }
            let value_json = value.to_string();
            if value_json.len() > MAX_HELPER_VALUE {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("a variable's value is limited to {MAX_HELPER_VALUE} bytes of JSON"),
                );
            }
            forward_write(context, HelperRequest::SetVariable { name, value_json }).await
        }
        ("/v1/notify", Method::POST) => {
            let object = match read_object(request).await {
                Ok(object) => object,
                Err(response) => return response,
            };
            match parse_notify(object) {
                Ok(notify) => forward_write(context, notify).await,
                Err(message) => error(StatusCode::BAD_REQUEST, &message),
            }
        }
        ("/v1/input" | "/v1/event", _)
        | (
            "/v1/output" | "/v1/condition" | "/v1/variables/get" | "/v1/variables/set"
            | "/v1/notify",
            _,
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such helper call"),
    }
}

#[cfg(test)]
mod tests;
