//! HTTP request jobs: one request per attempt, made with reqwest, its answer as the output.
//!
//! [`exchange`] is the whole job and is shared: the agent's [`HttpRunner`] calls it for attempts
//! whose runtime is [`RuntimeSpec::Http`] (so URLs inside the agent's network work), and the
//! control plane calls it for HTTP request events it runs itself. It fills in the spec's
//! placeholders (`{{secret:NAME}}`, `{{input}}`) just before sending, writes what happened to an
//! [`HttpOutput`] (the request as written, never resolved; the answer's status line, headers and
//! body) and returns the result JSON:
//! `{"status", "headers": {name: value}, "body", "encoding": "text"|"base64", "truncated"}`.
//!
//! The body is read up to [`MAX_HTTP_RESPONSE_BODY`] and no further (`truncated`); a body that is
//! not UTF-8 text (or holds control characters) is base64 in the result and named, not printed,
//! in the output. Everything taken from the answer is masked with the job's secret values before
//! it reaches the result; the output is masked by whoever stores it. Error texts never contain
//! the URL (it may hold a secret): reqwest's URL is removed and the rest masked.
//! A status outside `expected_status` fails the attempt with `HttpStatus`, a request that got no
//! answer with `HttpError`, the timeout (the spec's, or the job's when shorter) with `Timeout`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use cronium_protocol::http::{MAX_HTTP_REDIRECTS, MAX_HTTP_RESPONSE_BODY};
use cronium_protocol::{
    FailReason, FinalStatus, HttpSpec, JobSpec, LogStream, Masker, RuntimeSpec,
};
use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};

use super::{Runner, StopReason, StopSignal};
use crate::spool::{AttemptSpool, Outcome};

/// Adjusts the client of one exchange (TLS roots, a resolver that refuses some addresses).
pub type ConfigureClient =
    Arc<dyn Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder + Send + Sync>;

/// Where an exchange writes its output (masked by the receiver).
pub trait HttpOutput: Send {
    fn write(&mut self, stream: LogStream, data: &[u8]);
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEnding {
    pub status: FinalStatus,
    pub reason: Option<FailReason>,
    /// The result JSON (masked), when an answer arrived.
    pub result: Option<String>,
}

impl HttpEnding {
    fn failed(reason: FailReason) -> HttpEnding {
        HttpEnding {
            status: FinalStatus::Failed,
            reason: Some(reason),
            result: None,
        }
    }
}

/// Everything one exchange needs besides the spec.
pub struct Exchange<'a> {
    pub configure: &'a ConfigureClient,
    /// The job's secret environment (name, value): fills `{{secret:NAME}}`, and is masked.
    pub secrets: &'a [(String, String)],
    pub masker: &'a Masker,
    /// The run's input JSON: fills `{{input}}`.
    pub input: Option<&'a str>,
    /// The job's own timeout, when it has one; the shorter of it and the spec's applies.
    pub job_timeout: Option<Duration>,
    /// Refuses IP addresses written in the URL or in a redirect's URL (names are the
    /// resolver's business, see [`ConfigureClient`]); `None`: every address is allowed.
    pub refuse_address: Option<fn(IpAddr) -> bool>,
}

/// Makes the request of `spec` and reads its answer, unless `stop` completes first (then its
/// output is returned as the error and the request is dropped, which closes the connection).
pub async fn exchange<S: Future>(
    context: Exchange<'_>,
    spec: &HttpSpec,
    output: &mut dyn HttpOutput,
    stop: S,
) -> Result<HttpEnding, S::Output> {
    let system = |output: &mut (dyn HttpOutput + '_), line: &str| {
        output.write(LogStream::System, format!("[cronium: {line}]\n").as_bytes());
    };
    // The request as written: placeholders stay placeholders in the log.
    system(output, &format!("{} {}", spec.method, spec.url));
    let resolved = match spec.resolve(context.secrets, context.input) {
        Ok(resolved) => resolved,
        Err(error) => {
            system(output, &format!("cannot make the request: {error}"));
            return Ok(HttpEnding::failed(FailReason::Spawn));
        }
    };
    let mut timeout = Duration::from_secs(u64::from(spec.timeout_seconds.max(1)));
    if let Some(job_timeout) = context.job_timeout {
        timeout = timeout.min(job_timeout);
    }
    let masker = context.masker;
    if let Some(refuse) = context.refuse_address
        && reqwest::Url::parse(&resolved.url)
            .ok()
            .and_then(|url| literal_address(&url))
            .is_some_and(refuse)
    {
        system(
            output,
            "the request failed: the URL's address is not allowed (not a public address)",
        );
        return Ok(HttpEnding::failed(FailReason::HttpError));
    }
    let request = async {
        let client = client(context.configure, &resolved, context.refuse_address)
            .map_err(|error| describe(error, masker))?;
        let method = reqwest::Method::from_bytes(resolved.method.as_bytes())
            .map_err(|_| "the method is not valid".to_string())?;
        let mut request = client.request(method, &resolved.url);
        for (name, value) in &resolved.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &resolved.body {
            request = request.body(body.clone());
        }
        request
            .send()
            .await
            .map_err(|error| describe(error, masker))
    };
    let deadline = tokio::time::Instant::now() + timeout;
    tokio::pin!(stop);
    let response = tokio::select! {
        stopped = &mut stop => return Err(stopped),
        _ = tokio::time::sleep_until(deadline) => {
            system(output, &format!("timed out after {} s", timeout.as_secs_f64()));
            return Ok(HttpEnding::failed(FailReason::Timeout));
        }
        response = request => response,
    };
    let mut response = match response {
        Ok(response) => response,
        Err(error) => {
            system(output, &format!("the request failed: {error}"));
            return Ok(HttpEnding::failed(FailReason::HttpError));
        }
    };
    let status = response.status();
    let mut head = format!(
        "HTTP {} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut headers = Map::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        head.push_str(&format!("{name}: {value}\n"));
        let value = masker.mask_str(&value);
        match headers.get_mut(name.as_str()) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    head.push('\n');
    output.write(LogStream::Stdout, head.as_bytes());
    let mut body = Vec::new();
    let mut truncated = false;
    let read = async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_HTTP_RESPONSE_BODY - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        return Ok(());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(()),
                Err(error) => return Err(describe(error, masker)),
            }
        }
    };
    let read = tokio::select! {
        stopped = &mut stop => return Err(stopped),
        _ = tokio::time::sleep_until(deadline) => {
            system(output, &format!("timed out after {} s while reading the answer", timeout.as_secs_f64()));
            return Ok(HttpEnding::failed(FailReason::Timeout));
        }
        read = read => read,
    };
    if let Err(error) = read {
        system(output, &format!("reading the answer failed: {error}"));
        return Ok(HttpEnding::failed(FailReason::HttpError));
    }
    let text = text_of(&body, truncated);
    match text {
        Some(text) => {
            output.write(LogStream::Stdout, text.as_bytes());
            if !text.is_empty() && !text.ends_with('\n') {
                output.write(LogStream::Stdout, b"\n");
            }
        }
        None => system(
            output,
            &format!(
                "the body is {} bytes of binary data (base64 in the result)",
                body.len()
            ),
        ),
    }
    if truncated {
        system(
            output,
            &format!("body truncated after {MAX_HTTP_RESPONSE_BODY} bytes"),
        );
    }
    let (body_value, encoding) = match text {
        Some(text) => (masker.mask_str(text), "text"),
        None => (
            base64::engine::general_purpose::STANDARD.encode(masker.mask(&body)),
            "base64",
        ),
    };
    let result = json!({
        "status": status.as_u16(),
        "headers": headers,
        "body": body_value,
        "encoding": encoding,
        "truncated": truncated,
    })
    .to_string();
    if spec.expects(status.as_u16()) {
        Ok(HttpEnding {
            status: FinalStatus::Completed,
            reason: None,
            result: Some(result),
        })
    } else {
        let expected = if spec.expected_status.is_empty() {
            "200-299".to_string()
        } else {
            spec.expected_status
                .iter()
                .map(|range| range.to_text())
                .collect::<Vec<_>>()
                .join(", ")
        };
        system(
            output,
            &format!(
                "failed: the answer's status {} is not an expected one ({expected})",
                status.as_u16()
            ),
        );
        Ok(HttpEnding {
            status: FinalStatus::Failed,
            reason: Some(FailReason::HttpStatus),
            result: Some(result),
        })
    }
}

/// The client of one exchange: redirects followed (at most [`MAX_HTTP_REDIRECTS`]) only when
/// the spec asks; when a header carries a secret, only to the same origin (reqwest itself drops
/// `Authorization` and cookies on a redirect to another host, but not custom headers).
fn client(
    configure: &ConfigureClient,
    spec: &HttpSpec,
    refuse_address: Option<fn(IpAddr) -> bool>,
) -> reqwest::Result<reqwest::Client> {
    let secret_headers = spec
        .headers
        .iter()
        .any(|(_, value)| value.contains("{{secret:"));
    let policy = if !spec.follow_redirects {
        reqwest::redirect::Policy::none()
    } else {
        reqwest::redirect::Policy::custom(move |attempt| {
            let next = attempt.url();
            let same_origin = attempt.previous().first().is_some_and(|first| {
                next.scheme() == first.scheme()
                    && next.host_str() == first.host_str()
                    && next.port_or_known_default() == first.port_or_known_default()
            });
            let refused =
                refuse_address.is_some_and(|refuse| literal_address(next).is_some_and(refuse));
            if attempt.previous().len() > MAX_HTTP_REDIRECTS {
                attempt.error("too many redirects")
            } else if refused {
                attempt.error("a redirect to an address that is not allowed (not a public address)")
            } else if secret_headers && !same_origin {
                // The answer is the redirect itself.
                attempt.stop()
            } else {
                attempt.follow()
            }
        })
    };
    configure(
        reqwest::Client::builder()
            .redirect(policy)
            .user_agent(concat!("cronium/", env!("CARGO_PKG_VERSION"))),
    )
    .build()
}

/// The IP address a URL names literally, if it does.
fn literal_address(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The body as text, if it is UTF-8 without control characters other than tab, line feed,
/// carriage return and escape (a cut in the middle of a character at the cap is dropped).
fn text_of(body: &[u8], truncated: bool) -> Option<&str> {
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(error) if truncated && error.error_len().is_none() => {
            // Only the last character was cut by the cap; the prefix is valid.
            std::str::from_utf8(&body[..error.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    text.chars()
        .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\u{1b}'))
        .then_some(text)
}

/// A reqwest error without its URL, with its causes, masked.
fn describe(error: reqwest::Error, masker: &Masker) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    masker.mask_str(&text)
}

/// Runs the attempts whose runtime is [`RuntimeSpec::Http`].
pub struct HttpRunner {
    pub configure: ConfigureClient,
}

impl HttpRunner {
    /// A runner whose requests use reqwest's defaults.
    pub fn new() -> HttpRunner {
        HttpRunner {
            configure: Arc::new(|builder| builder),
        }
    }
}

impl Default for HttpRunner {
    fn default() -> HttpRunner {
        HttpRunner::new()
    }
}

/// The spool as an exchange's output.
struct SpoolOutput<'a>(&'a AttemptSpool);

impl HttpOutput for SpoolOutput<'_> {
    fn write(&mut self, stream: LogStream, data: &[u8]) {
        if let Err(error) = self.0.append(stream, data) {
            tracing::warn!(%error, "could not write an HTTP job's output to the spool");
        }
    }
}

impl Runner for HttpRunner {
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        mut stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let RuntimeSpec::Http(http) = &spec.runtime else {
                let _ = spool.append(LogStream::System, b"[cronium: not an HTTP request job]\n");
                return super::process::spawn_failure();
            };
            // Pid 0: no process. Recorded so the uploader reports the start.
            if let Err(error) = spool.record_pid(0) {
                tracing::warn!(%error, "could not record an HTTP job's start");
            }
            let masker = spool.masker();
            let stopped = async {
                match super::process::wait_for_stop(&mut stop).await {
                    Some(reason) => reason,
                    // The sender is gone: nobody can stop the attempt any more.
                    None => std::future::pending().await,
                }
            };
            let context = Exchange {
                configure: &self.configure,
                secrets: &spec.secret_env.0,
                masker: &masker,
                input: spec.input.as_deref(),
                job_timeout: (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms)),
                refuse_address: None,
            };
            let mut output = SpoolOutput(spool);
            match exchange(context, http, &mut output, stopped).await {
                Ok(ending) => {
                    if let Some(result) = &ending.result
                        && let Err(error) = spool.set_output(result)
                    {
                        tracing::warn!(%error, "could not store an HTTP job's result");
                    }
                    Outcome {
                        status: ending.status,
                        reason: ending.reason,
                        exit_code: None,
                    }
                }
                Err(StopReason::Cancel | StopReason::Abandon) => {
                    output.write(LogStream::System, b"[cronium: cancelled]\n");
                    Outcome {
                        status: FinalStatus::Cancelled,
                        reason: None,
                        exit_code: None,
                    }
                }
                Err(StopReason::Shutdown) => {
                    output.write(
                        LogStream::System,
                        b"[cronium: stopped because the agent is stopping]\n",
                    );
                    Outcome {
                        status: FinalStatus::Failed,
                        reason: Some(FailReason::Lost),
                        exit_code: None,
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_bodies_are_text_and_others_are_binary() {
        assert_eq!(text_of(b"hello\n", false), Some("hello\n"));
        assert_eq!(
            text_of(b"\x1b[1mbold\x1b[0m", false),
            Some("\x1b[1mbold\x1b[0m")
        );
        assert_eq!(text_of(b"a\x00b", false), None);
        assert_eq!(text_of(&[0xff, 0xfe], false), None);
        // "é" is two bytes; a cap after the first keeps the text before it.
        assert_eq!(text_of(&[b'a', 0xc3], true), Some("a"));
        assert_eq!(text_of(&[b'a', 0xc3], false), None);
    }
}
