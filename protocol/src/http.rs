//! HTTP request jobs: the request an attempt makes ([`HttpSpec`], carried in
//! [`RuntimeSpec::Http`](crate::RuntimeSpec::Http)), its checks, and the placeholders it may hold.
//!
//! The spec is stored and sent as its author wrote it: header values, the URL and the body may
//! name the event's secret environment variables as `{{secret:NAME}}`, and the body may hold
//! `{{input}}` (the run's input JSON). [`HttpSpec::resolve`] fills them in just before the
//! request is made, so a resolved value is never stored, sent over the wire or logged (logs show
//! the spec as written; the masker hides values that come back in answers).
//!
//! Everything here is pure: the runners (the agent's, and the control plane's) do the I/O.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The methods an HTTP request job may use.
pub const HTTP_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Longest URL, in bytes (as written, placeholders included).
pub const MAX_HTTP_URL: usize = 8 * 1024;

/// Most request headers.
pub const MAX_HTTP_HEADERS: usize = 64;

/// Longest header value, in bytes.
pub const MAX_HTTP_HEADER_VALUE: usize = 8 * 1024;

/// Largest request body, in bytes.
pub const MAX_HTTP_BODY: usize = 256 * 1024;

/// Most bytes of an answer's body kept (in the job's output and its result); the rest is read
/// no further and the result says `truncated`. The result travels in one frame
/// ([`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN)), which this leaves room for even base64-encoded.
pub const MAX_HTTP_RESPONSE_BODY: usize = 256 * 1024;

/// The request timeout when the spec sets none, in seconds.
pub const DEFAULT_HTTP_TIMEOUT_SECONDS: u32 = 30;

/// The longest request timeout, in seconds.
pub const MAX_HTTP_TIMEOUT_SECONDS: u32 = 3600;

/// Most redirects followed when `follow_redirects` is set.
pub const MAX_HTTP_REDIRECTS: usize = 10;

/// Headers a job may not set: they describe the connection or the body, which the client owns.
pub const RESERVED_HTTP_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// One HTTP request, as its event defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSpec {
    /// One of [`HTTP_METHODS`].
    pub method: String,
    /// An `http://` or `https://` URL.
    pub url: String,
    /// Request headers in order (names as written; values may hold `{{secret:NAME}}`).
    pub headers: Vec<(String, String)>,
    /// The request body (text; may hold `{{secret:NAME}}` and `{{input}}`).
    pub body: Option<String>,
    /// The statuses that count as success; empty means 200-299.
    pub expected_status: Vec<StatusRange>,
    /// The limit of the whole exchange (connect to the last byte of the answer), in seconds.
    pub timeout_seconds: u32,
    /// Follow redirects (at most [`MAX_HTTP_REDIRECTS`]); otherwise a 3xx answer is the answer.
    pub follow_redirects: bool,
}

/// An inclusive range of HTTP statuses (`from == to` for one status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRange {
    pub from: u16,
    pub to: u16,
}

impl StatusRange {
    /// Reads `200`, `"200"`, `"200-204"` or `"2xx"`.
    pub fn parse(text: &str) -> Option<StatusRange> {
        let text = text.trim();
        let status = |text: &str| {
            text.parse::<u16>()
                .ok()
                .filter(|status| (100..=599).contains(status))
        };
        let range = if let Some(class) = text.strip_suffix("xx").or_else(|| text.strip_suffix("XX"))
        {
            let class = class.parse::<u16>().ok().filter(|c| (1..=5).contains(c))?;
            StatusRange {
                from: class * 100,
                to: class * 100 + 99,
            }
        } else if let Some((from, to)) = text.split_once('-') {
            StatusRange {
                from: status(from.trim())?,
                to: status(to.trim())?,
            }
        } else {
            let status = status(text)?;
            StatusRange {
                from: status,
                to: status,
            }
        };
        (range.from <= range.to).then_some(range)
    }

    /// `"200"` or `"200-299"`.
    pub fn to_text(self) -> String {
        if self.from == self.to {
            self.from.to_string()
        } else {
            format!("{}-{}", self.from, self.to)
        }
    }
}

/// Why a spec (or a spec with its placeholders filled in) cannot be used. The message never
/// repeats a header value, the body or a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpecError {
    /// The field under `http`: `method`, `url`, `headers`, `body`, `expected_status`,
    /// `timeout_seconds`.
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for HttpSpecError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "http.{} {}", self.field, self.message)
    }
}

impl std::error::Error for HttpSpecError {}

fn invalid(field: &'static str, message: impl Into<String>) -> HttpSpecError {
    HttpSpecError {
        field,
        message: message.into(),
    }
}

/// A piece of a template: literal text or a placeholder.
enum Piece<'a> {
    Text(&'a str),
    Secret(&'a str),
    Input,
}

/// Splits `text` into literal text and placeholders; an opened `{{secret:` that is not a
/// well-formed placeholder is an error. Other `{{…}}` are literal text.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    const SECRET: &str = "{{secret:";
    const INPUT: &str = "{{input}}";
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let (before, from) = rest.split_at(start);
        if let Some(after) = from.strip_prefix(SECRET) {
            let end = after
                .find("}}")
                .ok_or_else(|| "has a {{secret: placeholder without its closing }}".to_string())?;
            let name = &after[..end];
            if !valid_secret_name(name) {
                return Err(
                    "has a {{secret:NAME}} placeholder whose NAME is not a variable name".into(),
                );
            }
            pieces.push(Piece::Text(before));
            pieces.push(Piece::Secret(name));
            rest = &after[end + 2..];
        } else if let Some(after) = from.strip_prefix(INPUT) {
            pieces.push(Piece::Text(before));
            pieces.push(Piece::Input);
            rest = after;
        } else {
            pieces.push(Piece::Text(&rest[..start + 2]));
            rest = &rest[start + 2..];
        }
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` can be sent as a header value: visible ASCII, spaces and tabs; no line
/// breaks or other control characters (no header injection).
fn valid_header_value(value: &str) -> bool {
    value.len() <= MAX_HTTP_HEADER_VALUE
        && value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Whether `url` starts with `http://` or `https://` followed by something, and holds no
/// whitespace or control characters. (The runners parse it fully.)
fn plausible_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url[8..]
    } else if lower.starts_with("http://") {
        &url[7..]
    } else {
        return false;
    };
    !rest.is_empty()
        && !rest.starts_with('/')
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl HttpSpec {
    /// Checks the spec as written: method, URL, headers (no CR, LF or other control characters,
    /// no reserved names), sizes, statuses, timeout and placeholders.
    pub fn validate(&self) -> Result<(), HttpSpecError> {
        if !HTTP_METHODS.contains(&self.method.as_str()) {
            return Err(invalid(
                "method",
                format!("must be one of {}", HTTP_METHODS.join(", ")),
            ));
        }
        if self.url.len() > MAX_HTTP_URL {
            return Err(invalid(
                "url",
                format!("is longer than {MAX_HTTP_URL} bytes"),
            ));
        }
        if !plausible_url(&self.url) {
            return Err(invalid(
                "url",
                "must be an http:// or https:// URL with a host, without spaces or control characters",
            ));
        }
        pieces(&self.url).map_err(|message| invalid("url", message))?;
        if pieces(&self.url)
            .is_ok_and(|pieces| pieces.iter().any(|piece| matches!(piece, Piece::Input)))
        {
            return Err(invalid("url", "may not use {{input}} (only the body may)"));
        }
        if self.headers.len() > MAX_HTTP_HEADERS {
            return Err(invalid(
                "headers",
                format!("at most {MAX_HTTP_HEADERS} headers"),
            ));
        }
        for (name, value) in &self.headers {
            if !valid_header_name(name) {
                return Err(invalid(
                    "headers",
                    format!("{name:?} is not a valid header name"),
                ));
            }
            if RESERVED_HTTP_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(invalid(
                    "headers",
                    format!("{name} is set by the HTTP client and cannot be configured"),
                ));
            }
            if !valid_header_value(value) {
                return Err(invalid(
                    "headers",
                    format!(
                        "the value of {name} is not a valid header value (visible ASCII, spaces \
                         and tabs, no line breaks, at most {MAX_HTTP_HEADER_VALUE} bytes)"
                    ),
                ));
            }
            let parsed = pieces(value)
                .map_err(|message| invalid("headers", format!("the value of {name} {message}")))?;
            if parsed.iter().any(|piece| matches!(piece, Piece::Input)) {
                return Err(invalid(
                    "headers",
                    format!("the value of {name} may not use {{{{input}}}} (only the body may)"),
                ));
            }
        }
        if let Some(body) = &self.body {
            if body.len() > MAX_HTTP_BODY {
                return Err(invalid(
                    "body",
                    format!("is larger than {MAX_HTTP_BODY} bytes"),
                ));
            }
            if body.contains('\0') {
                return Err(invalid("body", "must not contain NUL bytes"));
            }
            pieces(body).map_err(|message| invalid("body", message))?;
        }
        if self.expected_status.len() > 32 {
            return Err(invalid("expected_status", "lists more than 32 statuses"));
        }
        for range in &self.expected_status {
            if !(100..=599).contains(&range.from)
                || !(100..=599).contains(&range.to)
                || range.from > range.to
            {
                return Err(invalid(
                    "expected_status",
                    "statuses must be 100-599 (ranges low-high)",
                ));
            }
        }
        if !(1..=MAX_HTTP_TIMEOUT_SECONDS).contains(&self.timeout_seconds) {
            return Err(invalid(
                "timeout_seconds",
                format!("must be 1-{MAX_HTTP_TIMEOUT_SECONDS}"),
            ));
        }
        Ok(())
    }

    /// The secret environment variables the spec names, sorted.
    pub fn secret_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let texts = std::iter::once(self.url.as_str())
            .chain(self.headers.iter().map(|(_, value)| value.as_str()))
            .chain(self.body.as_deref());
        for text in texts {
            for piece in pieces(text).unwrap_or_default() {
                if let Piece::Secret(name) = piece {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }

    /// Whether an answer with `status` is a success.
    pub fn expects(&self, status: u16) -> bool {
        if self.expected_status.is_empty() {
            return (200..=299).contains(&status);
        }
        self.expected_status
            .iter()
            .any(|range| (range.from..=range.to).contains(&status))
    }

    /// The spec with its placeholders filled in from `secrets` (name, value) and `input` (the
    /// run's input JSON; `null` without one), checked again (a secret value with a line break
    /// must not become a header). Errors name the variable or the header, never a value.
    pub fn resolve(
        &self,
        secrets: &[(String, String)],
        input: Option<&str>,
    ) -> Result<HttpSpec, HttpSpecError> {
        let fill = |field: &'static str, text: &str| -> Result<String, HttpSpecError> {
            let mut filled = String::with_capacity(text.len());
            for piece in pieces(text).map_err(|message| invalid(field, message))? {
                match piece {
                    Piece::Text(text) => filled.push_str(text),
                    Piece::Input => filled.push_str(input.unwrap_or("null")),
                    Piece::Secret(name) => {
                        let (_, value) = secrets
                            .iter()
                            .find(|(secret, _)| secret == name)
                            .ok_or_else(|| {
                                invalid(
                                    field,
                                    format!("names the secret {name}, which the job does not have"),
                                )
                            })?;
                        filled.push_str(value);
                    }
                }
            }
            Ok(filled)
        };
        let url = fill("url", &self.url)?;
        if !plausible_url(&url) {
            return Err(invalid(
                "url",
                "is not an http:// or https:// URL once its secrets are filled in",
            ));
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let value = fill("headers", value)?;
            if !valid_header_value(&value) {
                return Err(invalid(
                    "headers",
                    format!(
                        "the value of {name} is not a valid header value once its secrets are \
                         filled in (line break, control character or too long)"
                    ),
                ));
            }
            headers.push((name.clone(), value));
        }
        let body = match &self.body {
            Some(body) => Some(fill("body", body)?),
            None => None,
        };
        Ok(HttpSpec {
            url,
            headers,
            body,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HttpSpec {
        HttpSpec {
            method: "POST".into(),
            url: "https://example.com/hook?key={{secret:KEY}}".into(),
            headers: vec![("Authorization".into(), "Bearer {{secret:TOKEN}}".into())],
            body: Some("{\"input\": {{input}}, \"t\": \"{{not a placeholder}}\"}".into()),
            expected_status: Vec::new(),
            timeout_seconds: 30,
            follow_redirects: false,
        }
    }

    #[test]
    fn status_ranges_parse_numbers_ranges_and_classes() {
        let parse = |text| StatusRange::parse(text).map(StatusRange::to_text);
        assert_eq!(parse("204").as_deref(), Some("204"));
        assert_eq!(parse(" 200 - 204 ").as_deref(), Some("200-204"));
        assert_eq!(parse("3xx").as_deref(), Some("300-399"));
        for bad in ["", "99", "600", "204-200", "6xx", "2xy", "abc", "200-"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn expected_statuses_default_to_2xx() {
        let mut spec = spec();
        assert!(spec.expects(200) && spec.expects(299));
        assert!(!spec.expects(301) && !spec.expects(500));
        spec.expected_status = vec![StatusRange::parse("404").unwrap()];
        assert!(spec.expects(404) && !spec.expects(200));
    }

    #[test]
    fn validation_names_the_field_and_never_the_value() {
        assert_eq!(spec().validate(), Ok(()));
        let check = |change: &dyn Fn(&mut HttpSpec), field: &str| {
            let mut spec = spec();
            change(&mut spec);
            let error = spec.validate().unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(!error.message.contains("canary"), "{error}");
        };
        check(&|spec| spec.method = "TRACE".into(), "method");
        check(&|spec| spec.method = "get".into(), "method");
        check(&|spec| spec.url = "ftp://example.com/".into(), "url");
        check(&|spec| spec.url = "file:///etc/passwd".into(), "url");
        check(&|spec| spec.url = "http:///path".into(), "url");
        check(&|spec| spec.url = "http://a b/".into(), "url");
        check(
            &|spec| spec.url = "http://example.com/{{input}}".into(),
            "url",
        );
        check(
            &|spec| spec.headers = vec![("X-A".into(), "canary\r\nX-Injected: 1".into())],
            "headers",
        );
        check(
            &|spec| spec.headers = vec![("X-A".into(), "canary\nx".into())],
            "headers",
        );
        check(
            &|spec| spec.headers = vec![("Bad Name".into(), "canary".into())],
            "headers",
        );
        check(
            &|spec| spec.headers = vec![("Host".into(), "canary".into())],
            "headers",
        );
        check(
            &|spec| spec.headers = vec![("X-A".into(), "{{secret:canary-x}}".into())],
            "headers",
        );
        check(
            &|spec| spec.headers = vec![("X-A".into(), "{{secret:OPEN".into())],
            "headers",
        );
        check(
            &|spec| spec.body = Some("x".repeat(MAX_HTTP_BODY + 1)),
            "body",
        );
        check(
            &|spec| spec.expected_status = vec![StatusRange { from: 99, to: 200 }],
            "expected_status",
        );
        check(&|spec| spec.timeout_seconds = 0, "timeout_seconds");
    }

    #[test]
    fn placeholders_are_found_and_filled_in() {
        let spec = spec();
        assert_eq!(
            spec.secret_names().into_iter().collect::<Vec<_>>(),
            ["KEY", "TOKEN"]
        );
        let secrets = vec![
            ("KEY".to_string(), "k3y".to_string()),
            ("TOKEN".to_string(), "t0ken".to_string()),
        ];
        let resolved = spec.resolve(&secrets, Some("{\"a\":1}")).unwrap();
        assert_eq!(resolved.url, "https://example.com/hook?key=k3y");
        assert_eq!(resolved.headers[0].1, "Bearer t0ken");
        assert_eq!(
            resolved.body.as_deref(),
            Some("{\"input\": {\"a\":1}, \"t\": \"{{not a placeholder}}\"}")
        );
        let without_input = spec.resolve(&secrets, None).unwrap();
        assert!(without_input.body.unwrap().starts_with("{\"input\": null"));
    }

    #[test]
    fn a_missing_secret_or_a_line_break_in_a_secret_is_refused() {
        let spec = spec();
        let error = spec
            .resolve(&[("KEY".to_string(), "k3y".to_string())], None)
            .unwrap_err();
        assert_eq!(error.field, "headers");
        assert!(error.message.contains("TOKEN"), "{error}");
        let error = spec
            .resolve(
                &[
                    ("KEY".to_string(), "k3y".to_string()),
                    ("TOKEN".to_string(), "canary\r\nX-Evil: 1".to_string()),
                ],
                None,
            )
            .unwrap_err();
        assert_eq!(error.field, "headers");
        assert!(!error.message.contains("canary"), "{error}");
    }
}
