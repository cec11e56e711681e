//! The runtime-helper HTTP protocol, independent of transport and backend: ONE implementation
//! of the paths, the JSON bodies, the size caps, the token check and the answers, served on any
//! byte stream by [`serve_connection`].
//!
//! Two transports use it: the agent's per-attempt Unix socket ([`super::HelperServer`]) and the
//! control plane's SSH fallback, which serves it on the channels sshd opens for a forwarded
//! Unix socket (`streamlocal-forward@openssh.com`). What a call does is the [`HelperBackend`]'s
//! business: the agent journals writes and forwards them; the control plane answers from its
//! store. The helper libraries' text ([`LIBRARIES`]) lives here too, so both hand out the same.
//!
//! Calls: `GET /v1/input`, `GET /v1/event`, `POST /v1/output` `{"value"}`, `POST /v1/condition`
//! `{"value": bool}`, `POST /v1/variables/get` `{"name", "format"?}`, `POST /v1/variables/set`
//! `{"name", "value"}` or `{"name", "text"}`, `POST /v1/notify` `{"message", "title"?, "tool"?}`.
//! Every request carries `Authorization: Bearer <token>` (checked in constant time); bodies are
//! limited to [`MAX_BODY`] bytes, names to [`MAX_HELPER_NAME`], values to [`MAX_HELPER_VALUE`].
//! Errors are `{"error": message}` with a status that says what kind of failure it was.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cronium_protocol::{HelperRefusal, HelperRequest, MAX_HELPER_NAME, MAX_HELPER_VALUE};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// How long a connection may take to finish the requests in flight once its endpoint stops.
const DRAIN: Duration = Duration::from_secs(15);

/// The helper libraries written next to every script: (file name, text).
pub const LIBRARIES: [(&str, &str); 3] = [
    ("cronium.sh", include_str!("lib/cronium.sh")),
    ("cronium.py", include_str!("lib/cronium.py")),
    ("cronium.js", include_str!("lib/cronium.js")),
];

/// The environment variable that tells the libraries why helpers are unavailable (set instead
/// of `CRONIUM_HELPER_SOCKET` when the transport could not be set up, e.g. an SSH server that
/// refuses socket forwarding).
pub const UNAVAILABLE_ENV: &str = "CRONIUM_HELPER_UNAVAILABLE";

/// A failed call: the status and the message the script's author reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperError {
    status: StatusCode,
    message: String,
}

impl HelperError {
    /// A refusal by whoever owns the data (the control plane's store).
    pub fn refused(reason: HelperRefusal, message: impl Into<String>) -> HelperError {
        let status = match reason {
            HelperRefusal::Stale => StatusCode::CONFLICT,
            HelperRefusal::NotFound => StatusCode::NOT_FOUND,
            HelperRefusal::Invalid => StatusCode::BAD_REQUEST,
            HelperRefusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        HelperError {
            status,
            message: message.into(),
        }
    }

    /// The call cannot be served right now; the script may try again.
    pub fn unavailable(message: impl Into<String>) -> HelperError {
        HelperError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }

    /// Something on this side failed (details are logged, not returned).
    pub fn internal(message: impl Into<String>) -> HelperError {
        HelperError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// The side that answers the call gave an answer that makes no sense.
    pub fn bad_gateway(message: impl Into<String>) -> HelperError {
        HelperError {
            status: StatusCode::BAD_GATEWAY,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> HelperError {
        HelperError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> HelperError {
        HelperError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// The message of the answer.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        answer(self.status, &json!({ "error": self.message }))
    }
}

/// What became of a write (`set_variable`, `notify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied by the control plane: 200 `{"ok": true}`.
    Applied,
    /// Stored to be applied later (the agent's link is down): 202 `{"ok": true, "queued": true}`.
    Queued,
}

/// What the calls of one attempt do. The endpoint has parsed and checked the request (names,
/// sizes, JSON) before any of these is called.
pub trait HelperBackend: Send + Sync + 'static {
    /// The run's input (`null` when none).
    fn input(&self) -> &Value;
    /// `{"job_id", "run_id", "event_id", "attempt"}`.
    fn event(&self) -> &Value;
    /// Stores the job's result (JSON); the last call wins.
    fn set_output(&self, value: Value) -> impl Future<Output = Result<(), HelperError>> + Send;
    /// Stores the job's condition; the last call wins.
    fn set_condition(
        &self,
        condition: bool,
    ) -> impl Future<Output = Result<(), HelperError>> + Send;
    /// A variable of the event's owner as JSON text; `None` when it is not set.
    fn get_variable(
        &self,
        name: String,
    ) -> impl Future<Output = Result<Option<String>, HelperError>> + Send;
    /// Applies (or queues) a [`HelperRequest::SetVariable`] or [`HelperRequest::Notify`].
    fn write(
        &self,
        request: HelperRequest,
    ) -> impl Future<Output = Result<WriteOutcome, HelperError>> + Send;
}

/// One attempt's endpoint: its token and its backend.
#[derive(Debug)]
pub struct Endpoint<B> {
    token: String,
    backend: B,
}

impl<B: HelperBackend> Endpoint<B> {
    /// An endpoint with a fresh token ([`new_token`]).
    pub fn new(backend: B) -> Arc<Endpoint<B>> {
        Arc::new(Endpoint {
            token: new_token(),
            backend,
        })
    }

    /// The attempt's token (`CRONIUM_JOB_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it or `stop` is cancelled; then
/// the requests in flight are finished (for at most a few seconds) before the connection
/// closes, so a write the script made is either answered or not started.
pub async fn serve_connection<I, B>(io: I, endpoint: Arc<Endpoint<B>>, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: HelperBackend,
{
    let service = service_fn(move |request| {
        let endpoint = endpoint.clone();
        async move { Ok::<_, Infallible>(handle(&endpoint, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, "helper connection ended with an error");
            }
            return;
        }
        () = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    if tokio::time::timeout(DRAIN, connection).await.is_err() {
        tracing::debug!("a helper connection did not finish in time after its endpoint stopped");
    }
}

/// 32 random bytes, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn authorized(token: &str, header: Option<&HeaderValue>) -> bool {
    let Some(value) = header.and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn ok() -> Response<Full<Bytes>> {
    answer(StatusCode::OK, &json!({ "ok": true }))
}

fn too_large() -> HelperError {
    HelperError::too_large(format!("the request body is larger than {MAX_BODY} bytes"))
}

/// Reads a JSON object body.
async fn read_object(
    request: Request<Incoming>,
) -> Result<serde_json::Map<String, Value>, HelperError> {
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
            return Err(HelperError::bad_request("could not read the request body"));
        }
    };
    match serde_json::from_slice(&body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(HelperError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(_) => Err(HelperError::bad_request("the request body is not JSON")),
    }
}

/// Reads a JSON object body with a `value` field.
async fn read_value(request: Request<Incoming>) -> Result<Value, HelperError> {
    read_object(request)
        .await?
        .remove("value")
        .ok_or_else(|| HelperError::bad_request("the request body has no \"value\" field"))
}

/// The value `set_variable NAME TEXT` stores from the shell: TEXT as JSON when it parses as
/// JSON, else TEXT as a string.
pub fn value_from_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Checks a `set_variable` request: a string `name` and a `value` (or a shell `text`).
fn parse_set_variable(
    mut object: serde_json::Map<String, Value>,
) -> Result<HelperRequest, HelperError> {
    let Some(Value::String(name)) = object.remove("name") else {
        return Err(HelperError::bad_request(
            "the variable name must be a string",
        ));
    };
    if name.is_empty() {
        return Err(HelperError::bad_request(
            "the variable name must not be empty",
        ));
    }
    let value = match (object.remove("value"), object.remove("text")) {
        (Some(value), None) => value,
        (None, Some(Value::String(text))) => value_from_text(&text),
        _ => {
            return Err(HelperError::bad_request(
                "expected {\"name\", \"value\"} or {\"name\", \"text\"}",
            ));
        }
    };
    check_name("variable", &name)?;
    let value_json = value.to_string();
    if value_json.len() > MAX_HELPER_VALUE {
        return Err(HelperError::too_large(format!(
            "a variable's value is limited to {MAX_HELPER_VALUE} bytes of JSON"
        )));
    }
    Ok(HelperRequest::SetVariable { name, value_json })
}

/// Checks a variable or tool name: 1 to [`MAX_HELPER_NAME`] of `A-Z a-z 0-9 _ . -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HELPER_NAME
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

fn check_name(what: &str, name: &str) -> Result<(), HelperError> {
    if !valid_name(name) {
        return Err(HelperError::bad_request(format!(
            "the {what} name {name:?} is not valid (1 to {MAX_HELPER_NAME} of A-Z a-z 0-9 _ . -)"
        )));
    }
    Ok(())
}

/// `notify`: `{"message", "title"?, "tool"?}`.
fn parse_notify(mut object: serde_json::Map<String, Value>) -> Result<HelperRequest, HelperError> {
    let message = match object.remove("message") {
        Some(Value::String(message)) if !message.trim().is_empty() => message,
        _ => return Err(HelperError::bad_request("notify needs a non-empty message")),
    };
    let mut optional = |field: &str| match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(HelperError::bad_request(format!(
            "the notification's {field} must be a string"
        ))),
    };
    let title = optional("title")?;
    let tool = optional("tool")?;
    if let Some(tool) = &tool {
        check_name("tool", tool)?;
    }
    if let Some(field) = object.keys().next() {
        return Err(HelperError::bad_request(format!(
            "unknown field {field:?} (notify takes message, title and tool)"
        )));
    }
    if message.len() + title.as_ref().map_or(0, String::len) > MAX_HELPER_VALUE {
        return Err(HelperError::bad_request(format!(
            "the notification is larger than {MAX_HELPER_VALUE} bytes"
        )));
    }
    Ok(HelperRequest::Notify {
        tool,
        title,
        message,
    })
}

/// `get_variable`: `{"name"}`, plus `"format": "text"` for the shell library (a string raw,
/// nothing when unset, anything else as JSON).
async fn get_variable<B: HelperBackend>(
    backend: &B,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, HelperError> {
    let mut object = read_object(request).await?;
    let Some(Value::String(name)) = object.remove("name") else {
        return Err(HelperError::bad_request(
            "the variable name must be a string",
        ));
    };
    check_name("variable", &name)?;
    let text_format = match object.remove("format") {
        None => false,
        Some(Value::String(format)) if format == "json" => false,
        Some(Value::String(format)) if format == "text" => true,
        Some(_) => {
            return Err(HelperError::bad_request(
                "format must be \"json\" or \"text\"",
            ));
        }
    };
    let value_json = backend.get_variable(name).await?;
    let value = match value_json.as_deref().map(serde_json::from_str::<Value>) {
        None => Value::Null,
        Some(Ok(value)) => value,
        Some(Err(_)) => {
            return Err(HelperError::bad_gateway(
                "the control plane sent a value that is not JSON",
            ));
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
        return Ok(response);
    }
    Ok(answer(StatusCode::OK, &json!({ "value": value })))
}

async fn write<B: HelperBackend>(
    backend: &B,
    request: HelperRequest,
) -> Result<Response<Full<Bytes>>, HelperError> {
    Ok(match backend.write(request).await? {
        WriteOutcome::Applied => ok(),
        WriteOutcome::Queued => {
            answer(StatusCode::ACCEPTED, &json!({ "ok": true, "queued": true }))
        }
    })
}

/// Answers one request.
pub async fn handle<B: HelperBackend>(
    endpoint: &Endpoint<B>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !authorized(&endpoint.token, request.headers().get(AUTHORIZATION)) {
        return HelperError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong job token (Authorization: Bearer $CRONIUM_JOB_TOKEN)".into(),
        }
        .into_response();
    }
    let backend = &endpoint.backend;
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let answered = match (path.as_str(), method) {
        ("/v1/input", Method::GET) => Ok(answer(StatusCode::OK, backend.input())),
        ("/v1/event", Method::GET) => Ok(answer(StatusCode::OK, backend.event())),
        ("/v1/output", Method::POST) => match read_value(request).await {
            Ok(value) => backend.set_output(value).await.map(|()| ok()),
            Err(failure) => Err(failure),
        },
        ("/v1/condition", Method::POST) => match read_value(request).await {
            Ok(Value::Bool(condition)) => backend.set_condition(condition).await.map(|()| ok()),
            Ok(_) => Err(HelperError::bad_request(
                "the condition must be true or false",
            )),
            Err(failure) => Err(failure),
        },
        ("/v1/variables/get", Method::POST) => get_variable(backend, request).await,
        ("/v1/variables/set", Method::POST) => match read_object(request).await {
            Ok(object) => match parse_set_variable(object) {
                Ok(set) => write(backend, set).await,
                Err(failure) => Err(failure),
            },
            Err(failure) => Err(failure),
        },
        ("/v1/notify", Method::POST) => match read_object(request).await {
            Ok(object) => match parse_notify(object) {
                Ok(notify) => write(backend, notify).await,
                Err(failure) => Err(failure),
            },
            Err(failure) => Err(failure),
        },
        ("/v1/input" | "/v1/event", _)
        | (
            "/v1/output" | "/v1/condition" | "/v1/variables/get" | "/v1/variables/set"
            | "/v1/notify",
            _,
        ) => Err(HelperError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "method not allowed".into(),
        }),
        _ => Err(HelperError {
            status: StatusCode::NOT_FOUND,
            message: "no such helper call".into(),
        }),
    };
    answered.unwrap_or_else(HelperError::into_response)
}
