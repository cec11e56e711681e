//! One delivery attempt: the request each kind of tool gets, and what its answer means.
//!
//! - Slack: `POST {"text": "*title*\nmessage"}` (incoming-webhook format; `&`, `<`, `>` escaped
//!   so a script cannot mention `@channel` or forge links).
//! - Discord: `POST {"content": "**title**\nmessage", "allowed_mentions": {"parse": []}}`, the
//!   content cut to 2000 characters with an ellipsis; mentions in it ping nobody.
//! - Webhook: `POST {"title", "message", "owner", "job_id", "notification_id", "sent_at"}` with
//!   the configured headers and, when a signing secret is set,
//!   `X-Cronium-Signature: sha256=<hex HMAC-SHA256 of the exact body>`.
//!
//! A 2xx answer is a delivery. 429, 5xx, timeouts and connection errors are retried; any other
//! 4xx, and a redirect to another origin, fail at once. Redirects within the same origin are
//! followed (three at most). Error texts never contain the URL or a header value: reqwest's URL
//! is stripped, and whatever is left is checked against the tool's secrets.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use ring::hmac;
use serde_json::{Value, json};

use super::{DeliveryOptions, ToolConfig};
use crate::store::tools::{ClaimedNotification, ToolKind};

/// Header carrying the webhook signature.
pub const SIGNATURE_HEADER: &str = "x-cronium-signature";

/// Longest Discord message content, in characters.
pub const DISCORD_MAX_CHARS: usize = 2000;

/// Most bytes of an error answer's body kept for `last_error`.
const MAX_BODY_SNIPPET: usize = 256;

/// Most redirects followed (same origin only).
const MAX_REDIRECTS: usize = 3;

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// A temporary failure; try again later (not before `retry_after` if the endpoint said so).
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// A permanent failure; retrying would not help.
    Fail(String),
}

/// The HTTP client of the dispatcher: ring TLS with the system's CA bundle, the request timeout,
/// same-origin redirects only.
pub fn client(options: &DeliveryOptions) -> anyhow::Result<reqwest::Client> {
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt.previous().first().is_some_and(|original| {
            let next = attempt.url();
            next.scheme() == original.scheme()
                && next.host_str() == original.host_str()
                && next.port_or_known_default() == original.port_or_known_default()
        });
        if same_origin && attempt.previous().len() <= MAX_REDIRECTS {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(crate::cli::client::tls_client_config()?)
        .timeout(options.request_timeout)
        .connect_timeout(options.request_timeout)
        .redirect(redirects)
        .user_agent(concat!("cronium/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Delivers `notification` through a tool configured by `config`.
pub async fn deliver(
    client: &reqwest::Client,
    config: &ToolConfig,
    notification: &ClaimedNotification,
) -> Outcome {
    let title = notification.title.as_deref();
    let message = notification.message.as_str();
    let body = match notification.kind {
        ToolKind::Slack => slack_body(title, message).to_string().into_bytes(),
        ToolKind::Discord => discord_body(title, message).to_string().into_bytes(),
        ToolKind::Webhook => webhook_body(notification, &sent_at_now())
            .to_string()
            .into_bytes(),
        ToolKind::Email => return Outcome::Fail("an email tool is not delivered over HTTP".into()),
    };
    let mut request = client
        .post(&config.url)
        .header(CONTENT_TYPE, "application/json");
    if notification.kind == ToolKind::Webhook {
        for (name, value) in &config.headers {
            // Validated when the tool was saved; a header that no longer parses fails the
            // notification instead of being sent half-configured.
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                return Outcome::Fail("a configured header is invalid".into());
            };
            request = request.header(name, value);
        }
        if let Some(secret) = &config.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret.as_bytes(), &body));
        }
    }
    let response = match request.body(body).send().await {
        Ok(response) => response,
        Err(error) => {
            let permanent = error.is_builder() || error.is_redirect();
            let error = redact(&describe(error), config);
            return if permanent {
                Outcome::Fail(error)
            } else {
                Outcome::Retry {
                    error,
                    retry_after: None,
                }
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Outcome::Delivered;
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let error = format!("HTTP {status}{}", body_snippet(response, config).await);
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Outcome::Retry { error, retry_after }
    } else if status.is_redirection() {
        Outcome::Fail(format!(
            "{error}: redirects to another origin are not followed"
        ))
    } else {
        Outcome::Fail(error)
    }
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// The Slack incoming-webhook body.
fn slack_body(title: Option<&str>, message: &str) -> Value {
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let text = match title {
        Some(title) => format!("*{}*\n{}", escape(title), escape(message)),
        None => escape(message),
    };
    json!({ "text": text })
}

/// The Discord webhook body.
fn discord_body(title: Option<&str>, message: &str) -> Value {
    let content = match title {
        Some(title) => format!("**{title}**\n{message}"),
        None => message.to_string(),
    };
    let content = if content.chars().count() > DISCORD_MAX_CHARS {
        let mut cut: String = content.chars().take(DISCORD_MAX_CHARS - 1).collect();
        cut.push('…');
        cut
    } else {
        content
    };
    json!({ "content": content, "allowed_mentions": { "parse": [] } })
}

/// The generic webhook body.
fn webhook_body(notification: &ClaimedNotification, sent_at: &str) -> Value {
    json!({
        "title": notification.title,
        "message": notification.message,
        "owner": notification.owner_name,
        "job_id": notification.source_job_id,
        "notification_id": notification.id,
        "sent_at": sent_at,
    })
}

fn sent_at_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A reqwest error without its URL, with its causes.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    if error.is_timeout() {
        return "the request timed out".into();
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Replaces every secret part of the configuration found in `text`.
fn redact(text: &str, config: &ToolConfig) -> String {
    let mut secrets = config.secrets();
    // Longest first, so the whole URL goes before its path.
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    secrets.iter().fold(text.to_string(), |text, secret| {
        text.replace(secret.as_str(), "[redacted]")
    })
}

/// The start of an error answer's body, as `": …"`, or nothing. Withheld when it repeats a
/// secret of the tool (an endpoint echoing the request).
async fn body_snippet(mut response: reqwest::Response, config: &ToolConfig) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_BODY_SNIPPET {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(MAX_BODY_SNIPPET);
    let text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else if redact(text, config) != text {
        ": (response body withheld: it repeats the tool's configuration)".into()
    } else {
        format!(": {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_text_bolds_the_title_and_escapes_control_characters() {
        assert_eq!(
            slack_body(Some("Backup"), "done"),
            json!({"text": "*Backup*\ndone"})
        );
        assert_eq!(slack_body(None, "done"), json!({"text": "done"}));
        assert_eq!(
            slack_body(None, "<!channel> a & b > c"),
            json!({"text": "&lt;!channel&gt; a &amp; b &gt; c"})
        );
    }

    #[test]
    fn discord_content_is_cut_to_2000_characters() {
        let long = "é".repeat(2500);
        let body = discord_body(Some("T"), &long);
        let content = body["content"].as_str().unwrap();
        assert_eq!(content.chars().count(), DISCORD_MAX_CHARS);
        assert!(content.starts_with("**T**\né") && content.ends_with('…'));
        let short = discord_body(None, "hi");
        assert_eq!(short["content"], "hi");
        assert_eq!(short["allowed_mentions"], json!({"parse": []}));
    }

    #[test]
    fn the_signature_is_the_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_are_redacted_from_error_texts() {
        let config = ToolConfig {
            url: "https://hooks.example.com/services/canary-path?token=canary-query".into(),
            headers: [(
                "Authorization".to_string(),
                "Bearer canary-header".to_string(),
            )]
            .into(),
            secret: Some("canary-secret".into()),
        };
        let text = redact(
            "failed for https://hooks.example.com/services/canary-path?token=canary-query, \
             /services/canary-path, token=canary-query, Bearer canary-header, canary-secret",
            &config,
        );
        assert!(!text.contains("canary"), "{text}");
    }
}
