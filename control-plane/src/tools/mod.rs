//! Tools and notifications: the configuration of a tool (validated here, sealed with
//! `ENCRYPTION_KEY`, never shown again) and the dispatcher that delivers the notification outbox.
//!
//! A notification is a row in the outbox (`store/tools.rs`) from the moment it is enqueued. The
//! dispatcher claims due rows (which counts the attempt and leases the row for the length of a
//! request and a margin), delivers them (`delivery.rs`) and records the outcome: sent, retry
//! later with exponential backoff, or failed. A row is `pending` until a delivery succeeded, so
//! nothing is lost when the control plane stops or crashes; a delivery whose outcome was not
//! recorded is made again (at least once; receivers deduplicate by `notification_id`).
//! On a graceful shutdown the dispatcher hands its in-flight claims back, so they are due at
//! once on the next start and the interrupted attempt does not count.

pub mod delivery;
pub mod email;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::AppState;
use crate::crypto::EncryptionKey;
use crate::store::tools::{ClaimedNotification, NotifyRefused, SealedConfig, ToolKind};
use crate::store::{StoreResult, now_ms};
use delivery::Outcome;

/// Longest URL accepted, in bytes.
const MAX_URL_BYTES: usize = 2048;

/// Most headers a webhook tool may set.
const MAX_HEADERS: usize = 32;

/// Longest header value or signing secret accepted, in bytes.
const MAX_VALUE_BYTES: usize = 4096;

/// Headers a webhook tool may not set: the dispatcher sets them itself.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-cronium-signature",
];

/// Most deliveries in flight at once.
const MAX_IN_FLIGHT: usize = 8;

/// How often the dispatcher looks for due notifications when nothing wakes it.
const POLL: Duration = Duration::from_secs(5);

/// The longest wait a `Retry-After` answer may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How notifications are delivered and retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOptions {
    /// The wait before each retry; the first attempt is immediate, so a notification gets
    /// `retry_delays.len() + 1` attempts before it fails.
    pub retry_delays: Vec<Duration>,
    /// The limit of one delivery request (connect, send, answer); for email, of each SMTP step.
    pub request_timeout: Duration,
    /// CA certificates trusted for SMTP over TLS besides the system's bundle (tests add theirs).
    pub extra_smtp_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// HTTP request jobs the control plane runs reach public addresses only (`actions/`):
    /// `cronium serve --http-jobs-public-only`.
    pub http_jobs_public_only: bool,
}

impl Default for DeliveryOptions {
    /// The production values: retries after 1 s, 5 s, 30 s, 2 min and 10 min; 10 s per request.
    fn default() -> DeliveryOptions {
        DeliveryOptions {
            retry_delays: [1, 5, 30, 120, 600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            request_timeout: Duration::from_secs(10),
            extra_smtp_roots: Vec::new(),
            http_jobs_public_only: false,
        }
    }
}

impl DeliveryOptions {
    /// How long a claim lasts: a request and a margin, after which a crashed delivery is retried.
    /// An SMTP exchange is bounded by `request_timeout` and a smaller margin (`email.rs`).
    fn claim_lease(&self) -> Duration {
        self.request_timeout + Duration::from_secs(30)
    }

    fn max_attempts(&self) -> u32 {
        u32::try_from(self.retry_delays.len()).unwrap_or(u32::MAX - 1) + 1
    }
}

/// Where and how a tool delivers. Everything in it is treated as a secret: the URL of a Slack or
/// Discord webhook is the credential. Its `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ToolConfig {
    pub url: String,
    /// Extra request headers (webhook tools only).
    pub headers: BTreeMap<String, String>,
    /// The HMAC-SHA256 signing secret (webhook tools only).
    pub secret: Option<String>,
}

impl fmt::Debug for ToolConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ToolConfig(..)")
    }
}

/// A configuration field that is not acceptable. The message never repeats the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {message}")]
pub struct InvalidConfig {
    /// The field under `config`: `url`, `headers`, `secret`, or `config` itself.
    pub field: String,
    pub message: String,
}

impl InvalidConfig {
    fn new(field: &str, message: impl Into<String>) -> InvalidConfig {
        InvalidConfig {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// A stored configuration that cannot be used any more.
#[derive(Debug, Error)]
#[error("the tool's stored configuration cannot be opened")]
pub struct UnreadableConfig;

impl ToolConfig {
    /// Reads `{url, headers?, secret?}`. Errors name the field, never its value.
    pub fn from_json(value: &Value) -> Result<ToolConfig, InvalidConfig> {
        let object = value
            .as_object()
            .ok_or_else(|| InvalidConfig::new("config", "must be an object"))?;
        if let Some(unknown) = object
            .keys()
            .find(|key| !matches!(key.as_str(), "url" | "headers" | "secret"))
        {
            return Err(InvalidConfig::new(
                unknown,
                "is not a known field (url, headers, secret)",
            ));
        }
        let url = match object.get("url") {
            Some(Value::String(url)) => url.clone(),
            Some(_) => return Err(InvalidConfig::new("url", "must be a string")),
            None => return Err(InvalidConfig::new("url", "is required")),
        };
        let mut headers = BTreeMap::new();
        match object.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (name, value) in map {
                    let Value::String(value) = value else {
                        return Err(InvalidConfig::new(
                            "headers",
                            format!("the value of {name:?} must be a string"),
                        ));
                    };
                    headers.insert(name.clone(), value.clone());
                }
            }
            Some(_) => {
                return Err(InvalidConfig::new(
                    "headers",
                    "must be an object of header names to string values",
                ));
            }
        }
        let secret = match object.get("secret") {
            None | Some(Value::Null) => None,
            Some(Value::String(secret)) => Some(secret.clone()),
            Some(_) => return Err(InvalidConfig::new("secret", "must be a string")),
        };
        Ok(ToolConfig {
            url,
            headers,
            secret,
        })
    }

    /// Checks the configuration for a tool of `kind` and returns the URL's host (with its port
    /// when one is given), the only part shown in lists.
    ///
    /// URLs must be `http` or `https`. Slack and Discord URLs must be `https`, except for
    /// loopback hosts (`localhost`, `127.0.0.0/8`, `::1`: local relays and tests); a generic
    /// webhook may be plain `http`.
    pub fn validate(&self, kind: ToolKind) -> Result<String, InvalidConfig> {
        if self.url.len() > MAX_URL_BYTES {
            return Err(InvalidConfig::new(
                "url",
                format!("is longer than {MAX_URL_BYTES} bytes"),
            ));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|_| InvalidConfig::new("url", "is not a valid absolute URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidConfig::new(
                "url",
                "must be an http:// or https:// URL",
            ));
        }
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| InvalidConfig::new("url", "must name a host"))?;
        if kind != ToolKind::Webhook && url.scheme() != "https" && !is_loopback(host) {
            return Err(InvalidConfig::new(
                "url",
                format!(
                    "must be https:// for {} tools (plain http is allowed only for loopback hosts)",
                    kind.as_str()
                ),
            ));
        }
        if kind != ToolKind::Webhook {
            if !self.headers.is_empty() {
                return Err(InvalidConfig::new(
                    "headers",
                    "only webhook tools take headers",
                ));
            }
            if self.secret.is_some() {
                return Err(InvalidConfig::new(
                    "secret",
                    "only webhook tools take a signing secret",
                ));
            }
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(InvalidConfig::new(
                "headers",
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        for (name, value) in &self.headers {
            let parsed = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| InvalidConfig::new("headers", "contains an invalid header name"))?;
            if RESERVED_HEADERS.contains(&parsed.as_str()) {
                return Err(InvalidConfig::new(
                    "headers",
                    format!("{name} is set by Cronium and cannot be configured"),
                ));
            }
            if value.len() > MAX_VALUE_BYTES
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                return Err(InvalidConfig::new(
                    "headers",
                    format!(
                        "the value of {name} is not a valid header value (visible ASCII, at most {MAX_VALUE_BYTES} bytes)"
                    ),
                ));
            }
        }
        if let Some(secret) = &self.secret
            && (secret.is_empty() || secret.len() > MAX_VALUE_BYTES)
        {
            return Err(InvalidConfig::new(
                "secret",
                format!("must be 1-{MAX_VALUE_BYTES} bytes"),
            ));
        }
        Ok(match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        })
    }

    /// Validates the configuration for `kind` and seals it under `key`.
    pub fn seal(&self, kind: ToolKind, key: &EncryptionKey) -> Result<SealedConfig, InvalidConfig> {
        let target_host = self.validate(kind)?;
        let plaintext = json!({"url": self.url, "headers": self.headers, "secret": self.secret});
        Ok(SealedConfig {
            sealed: key.seal(plaintext.to_string().as_bytes()),
            target_host,
        })
    }

    /// Opens a configuration sealed by [`seal`](ToolConfig::seal).
    pub fn open(sealed: &[u8], key: &EncryptionKey) -> Result<ToolConfig, UnreadableConfig> {
        let plaintext = key.open(sealed).map_err(|_| UnreadableConfig)?;
        let value: Value = serde_json::from_slice(&plaintext).map_err(|_| UnreadableConfig)?;
        ToolConfig::from_json(&value).map_err(|_| UnreadableConfig)
    }

    /// The secret parts (URL, header values, signing secret), to keep them out of error texts.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.url.clone()];
        if let Ok(url) = reqwest::Url::parse(&self.url) {
            // The path or the query alone may be the credential (Slack and Discord webhooks).
            secrets.push(url.path().to_string());
            secrets.extend(url.query().map(str::to_string));
            secrets.extend(url.password().map(str::to_string));
        }
        secrets.extend(self.headers.values().cloned());
        secrets.extend(self.secret.clone());
        // Short values are not worth hiding and would blank out ordinary words.
        secrets.retain(|secret| secret.len() >= 4);
        secrets
    }
}

/// Whether `host` (as in a URL, IPv6 in brackets) is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(address) => address.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// Enqueues a notification in its own transaction and wakes the dispatcher.
pub async fn notify(
    state: &AppState,
    owner_id: &str,
    tool_name: &str,
    title: Option<&str>,
    message: &str,
    source_job_id: Option<&str>,
) -> StoreResult<Result<String, NotifyRefused>> {
    let enqueued = state
        .store
        .enqueue_notification(owner_id, tool_name, title, message, source_job_id)
        .await?;
    if enqueued.is_ok() {
        state.notifier.notify_one();
    }
    Ok(enqueued)
}

/// The dispatcher: delivers due notifications, at most [`MAX_IN_FLIGHT`] at once. Woken by
/// `wake` when something was enqueued, and otherwise when the next retry is due (or every
/// [`POLL`] at the latest). On shutdown it hands its in-flight claims back and returns.
pub async fn dispatch_notifications(state: AppState, wake: Arc<Notify>) {
    let options = state.config.delivery.clone();
    let client = match delivery::client(&options) {
        Ok(client) => client,
        Err(error) => {
            warn!(error = %format!("{error:#}"), "notifications cannot be delivered: no HTTP client");
            return;
        }
    };
    let mailer = match email::Mailer::new(&options, &state.config.public_url) {
        Ok(mailer) => mailer,
        Err(error) => {
            warn!(error = %format!("{error:#}"), "notifications cannot be delivered: no TLS configuration for email");
            return;
        }
    };
    let mut in_flight = FuturesUnordered::new();
    let mut in_flight_ids = HashSet::new();
    loop {
        let mut wait = POLL;
        let free = MAX_IN_FLIGHT - in_flight.len();
        if free > 0 {
            let now = now_ms();
            let lease_until = now + options.claim_lease().as_millis() as i64;
            match state
                .store
                .claim_notifications(now, lease_until, free)
                .await
            {
                Ok(claimed) => {
                    for notification in claimed {
                        in_flight_ids.insert(notification.id.clone());
                        in_flight.push(deliver(
                            client.clone(),
                            mailer.clone(),
                            state.key.clone(),
                            notification,
                        ));
                    }
                    if in_flight.len() < MAX_IN_FLIGHT {
                        match state.store.next_notification_due().await {
                            Ok(Some(due)) => {
                                let until = u64::try_from(due - now_ms()).unwrap_or(0);
                                wait = wait.min(Duration::from_millis(until));
                            }
                            Ok(None) => {}
                            Err(error) => warn!(%error, "reading the next notification due failed"),
                        }
                    }
                }
                Err(error) => warn!(%error, "claiming notifications failed"),
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                drop(in_flight);
                let ids: Vec<String> = in_flight_ids.into_iter().collect();
                if !ids.is_empty() {
                    match state.store.release_notifications(&ids).await {
                        Ok(()) => info!(count = ids.len(), "handed back notifications in flight at shutdown"),
                        Err(error) => warn!(%error, "handing back notifications in flight failed; they are retried when their claim ends"),
                    }
                }
                return;
            }
            Some((notification, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                in_flight_ids.remove(&notification.id);
                record(&state, &options, &notification, outcome).await;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Opens the tool's configuration and delivers one notification.
async fn deliver(
    client: reqwest::Client,
    mailer: email::Mailer,
    key: EncryptionKey,
    notification: ClaimedNotification,
) -> (ClaimedNotification, Outcome) {
    let outcome = if notification.kind == ToolKind::Email {
        match email::EmailConfig::open(&notification.sealed_config, &key) {
            Ok(config) => email::deliver(&mailer, &config, &notification).await,
            Err(error) => Outcome::Fail(error.to_string()),
        }
    } else {
        match ToolConfig::open(&notification.sealed_config, &key) {
            Ok(config) => delivery::deliver(&client, &config, &notification).await,
            Err(error) => Outcome::Fail(error.to_string()),
        }
    };
    (notification, outcome)
}

/// Writes the outcome of a delivery to the outbox.
async fn record(
    state: &AppState,
    options: &DeliveryOptions,
    notification: &ClaimedNotification,
    outcome: Outcome,
) {
    let ClaimedNotification {
        id,
        tool_id,
        tool_name,
        attempt,
        ..
    } = notification;
    let recorded = match outcome {
        Outcome::Delivered => {
            info!(notification_id = %id, %tool_id, tool = %tool_name, attempt, "notification sent");
            state.store.mark_notification_sent(id).await
        }
        Outcome::Retry { error, retry_after } if *attempt < options.max_attempts() => {
            let index = (*attempt as usize).saturating_sub(1);
            let mut delay = options.retry_delays.get(index).copied().unwrap_or_default();
            if let Some(retry_after) = retry_after {
                delay = delay.max(retry_after.min(MAX_RETRY_AFTER));
            }
            warn!(notification_id = %id, %tool_id, tool = %tool_name, attempt, %error, retry_in = ?delay, "notification delivery failed; will retry");
            state
                .store
                .retry_notification(id, now_ms() + delay.as_millis() as i64, &error)
                .await
        }
        Outcome::Retry { error, .. } => {
            let error = format!("gave up after {attempt} attempts: {error}");
            warn!(notification_id = %id, %tool_id, tool = %tool_name, attempt, %error, "notification failed");
            state.store.fail_notification(id, &error).await
        }
        Outcome::Fail(error) => {
            warn!(notification_id = %id, %tool_id, tool = %tool_name, attempt, %error, "notification failed");
            state.store.fail_notification(id, &error).await
        }
    };
    if let Err(error) = recorded {
        // The claim runs out and the notification is delivered again: at least once.
        warn!(notification_id = %id, %error, "recording a delivery outcome failed");
    }
}

#[cfg(test)]
mod tests;
