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
//! plane in `JobFinished`. Variables, event triggers and notifications need the control plane
//! and are answered 501 until that is built.

use std::convert::Infallible;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

use crate::spool::AttemptSpool;

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
    /// reachable by it.
    pub fn start(
        work_dir: &Path,
        spec: &JobSpec,
        spool: AttemptSpool,
        shared: bool,
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
            spool,
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

fn not_yet(call: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_IMPLEMENTED,
        &format!("{call} is not available yet on this control plane version"),
    )
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
        ("/v1/variables/get", Method::POST) => not_yet("get_variable"),
        ("/v1/variables/set", Method::POST) => {
            let object = match read_object(request).await {
                Ok(object) => object,
                Err(response) => return response,
            };
            match parse_set_variable(object) {
                Ok(_) => not_yet("set_variable"),
                Err(message) => error(StatusCode::BAD_REQUEST, message),
            }
        }
        ("/v1/event/trigger", Method::POST) => not_yet("triggering an event"),
        ("/v1/notify", Method::POST) => not_yet("notify"),
        ("/v1/input" | "/v1/event", _)
        | (
            "/v1/output" | "/v1/condition" | "/v1/variables/get" | "/v1/variables/set"
            | "/v1/event/trigger" | "/v1/notify",
            _,
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such helper call"),
    }
}

#[cfg(test)]
mod tests;
