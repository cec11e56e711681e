//! Email tools: the configuration of an SMTP tool (validated here, sealed like the others) and
//! one delivery attempt over SMTP (lettre's message builder and SMTP connection, rustls on ring).
//!
//! Configuration: `host`, `port`, `security`, optional `username` + `password`, `from`, `to`
//! (one or more addresses) and an optional `subject_prefix`.
//!
//! - `security: "starttls"` (the default, port 587): the connection must be upgraded with
//!   STARTTLS before anything else is sent; a server that does not offer it fails the
//!   notification (no silent downgrade).
//! - `security: "tls"` (implicit TLS, port 465 by default): TLS from the first byte.
//! - `security: "none"`: plain SMTP (an internal relay on port 25, a local MTA). Allowed for any
//!   host as an explicit choice, but a username and password are sent in the clear only to a
//!   loopback host (`localhost`, `127.0.0.0/8`, `::1`): elsewhere the configuration is refused.
//!
//! Certificates are checked against the system's CA bundle (plus
//! [`DeliveryOptions::extra_smtp_roots`]), with the configured host as the expected name.
//! Addresses are `name@example.com` or `Name <name@example.com>`; a line break or any other
//! control character in an address, a credential or the subject prefix is refused when the tool
//! is saved (no header or command injection), and titles are flattened to one line.
//!
//! The message: `Subject: <prefix> <title>` (RFC 2047-encoded when not ASCII), `Date`,
//! `Message-ID: <notification id@from domain>` (the same on every retry, so receivers can
//! deduplicate), `From`, `To`, `MIME-Version`, `Content-Type: text/plain; charset=utf-8` and the
//! transfer encoding lettre picks (7bit, quoted-printable or base64); `Auto-Submitted:
//! auto-generated`. The body is the title, the message and where it came from (tool, owner,
//! job, a link to the job's run in the console). Lines starting with `.` are dot-stuffed.
//!
//! Outcome: `250` after DATA is a delivery. A 5xx reply at any step (a refused sender or
//! recipient, a failed login, a rejected message), a missing STARTTLS or authentication
//! mechanism fail at once; 4xx replies, connection and TLS errors, and timeouts are retried by
//! the dispatcher. Each step gets `request_timeout` (connect, TLS handshake, greeting and EHLO,
//! STARTTLS, AUTH, then MAIL FROM to the end of DATA) and the whole exchange
//! `request_timeout + 20 s`, which is shorter than the dispatcher's claim. The exchange runs in
//! its own task owned by the attempt, so a panic in the SMTP client fails one notification, not
//! the dispatcher. Error texts name the tool, the step and the server's reply code and text,
//! never the password (the text is checked against the password and the base64 forms AUTH sends;
//! like the HTTP tools' secrets, values under 4 bytes are not searched for). Replies are capped
//! (lettre: a line and a whole reply; here: 1 MiB read per connection).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::extension::{ClientId, Extension};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::delivery::Outcome;
use super::{DeliveryOptions, InvalidConfig, UnreadableConfig, is_loopback};
use crate::crypto::EncryptionKey;
use crate::store::tools::{ClaimedNotification, SealedConfig};

/// The port of `starttls` and `none` when none is given (message submission).
pub const DEFAULT_PORT: u16 = 587;

/// The port of `tls` when none is given (submission over implicit TLS).
pub const DEFAULT_TLS_PORT: u16 = 465;

/// Most recipients of one tool.
const MAX_RECIPIENTS: usize = 50;

/// Longest address (with its display name), in bytes.
const MAX_ADDRESS_BYTES: usize = 320;

/// Longest host name, in bytes.
const MAX_HOST_BYTES: usize = 253;

/// Longest username or password, in bytes.
const MAX_CREDENTIAL_BYTES: usize = 1024;

/// Longest subject prefix, in bytes.
const MAX_PREFIX_BYTES: usize = 128;

/// Most bytes read from one SMTP connection (all replies together).
const MAX_READ_BYTES: u64 = 1024 * 1024;

/// Most characters of a server reply kept in an error text.
const MAX_REPLY_CHARS: usize = 200;

/// What the whole exchange may take beyond one step's limit.
const EXCHANGE_MARGIN: Duration = Duration::from_secs(20);

/// The system's CA bundle (Debian and derivatives; the same file the HTTP tools trust).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain connection upgraded with STARTTLS before anything else (required).
    StartTls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption.
    None,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::StartTls => "starttls",
            Security::Tls => "tls",
            Security::None => "none",
        }
    }

    pub fn parse(text: &str) -> Option<Security> {
        match text {
            "starttls" => Some(Security::StartTls),
            "tls" => Some(Security::Tls),
            "none" => Some(Security::None),
            _ => None,
        }
    }
}

/// Where and how an email tool sends. The password is a secret; its `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    pub subject_prefix: Option<String>,
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("EmailConfig(..)")
    }
}

const FIELDS: &str = "host, port, security, username, password, from, to, subject_prefix";

/// A string field: absent and `null` are `None`.
fn optional_string(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>, InvalidConfig> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(InvalidConfig::new(field, "must be a string")),
    }
}

/// Refuses line breaks and other control characters (header and command injection).
fn one_line(field: &str, text: &str) -> Result<(), InvalidConfig> {
    if text.chars().any(char::is_control) {
        Err(InvalidConfig::new(
            field,
            "must not contain line breaks or other control characters",
        ))
    } else {
        Ok(())
    }
}

/// Parses `name@example.com` or `Name <name@example.com>`.
fn mailbox(field: &str, text: &str) -> Result<Mailbox, InvalidConfig> {
    one_line(field, text)?;
    if text.len() > MAX_ADDRESS_BYTES {
        return Err(InvalidConfig::new(
            field,
            format!("must be at most {MAX_ADDRESS_BYTES} bytes per address"),
        ));
    }
    Mailbox::from_str(text.trim()).map_err(|_| {
        InvalidConfig::new(
            field,
            "must be an email address (name@example.com or Name <name@example.com>)",
        )
    })
}

impl EmailConfig {
    /// Reads the configuration of an email tool. Errors name the field, never its value.
    pub fn from_json(value: &Value) -> Result<EmailConfig, InvalidConfig> {
        let object = value
            .as_object()
            .ok_or_else(|| InvalidConfig::new("config", "must be an object"))?;
        if let Some(unknown) = object
            .keys()
            .find(|key| !FIELDS.split(", ").any(|f| f == *key))
        {
            return Err(InvalidConfig::new(
                unknown,
                format!("is not a known field ({FIELDS})"),
            ));
        }
        let host = optional_string(object, "host")?
            .ok_or_else(|| InvalidConfig::new("host", "is required"))?;
        let security = match optional_string(object, "security")? {
            None => Security::StartTls,
            Some(text) => Security::parse(&text)
                .ok_or_else(|| InvalidConfig::new("security", "must be starttls, tls or none"))?,
        };
        let port = match object.get("port") {
            None | Some(Value::Null) if security == Security::Tls => DEFAULT_TLS_PORT,
            None | Some(Value::Null) => DEFAULT_PORT,
            Some(value) => value
                .as_u64()
                .and_then(|port| u16::try_from(port).ok())
                .filter(|port| *port > 0)
                .ok_or_else(|| InvalidConfig::new("port", "must be a number from 1 to 65535"))?,
        };
        let from = optional_string(object, "from")?
            .ok_or_else(|| InvalidConfig::new("from", "is required"))?;
        let to = match object.get("to") {
            None | Some(Value::Null) => return Err(InvalidConfig::new("to", "is required")),
            Some(Value::String(address)) => vec![address.clone()],
            Some(Value::Array(addresses)) => addresses
                .iter()
                .map(|address| match address {
                    Value::String(address) => Ok(address.clone()),
                    _ => Err(InvalidConfig::new(
                        "to",
                        "must be an address or a list of addresses",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(InvalidConfig::new(
                    "to",
                    "must be an address or a list of addresses",
                ));
            }
        };
        Ok(EmailConfig {
            host,
            port,
            security,
            username: optional_string(object, "username")?,
            password: optional_string(object, "password")?,
            from,
            to,
            subject_prefix: optional_string(object, "subject_prefix")?,
        })
    }

    /// Checks the configuration and returns `host:port`, the only part shown in lists.
    pub fn validate(&self) -> Result<String, InvalidConfig> {
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        let is_ip = bare.parse::<std::net::IpAddr>().is_ok();
        let is_name = !bare.is_empty()
            && bare.len() <= MAX_HOST_BYTES
            && bare.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
            });
        if !is_ip && !is_name {
            return Err(InvalidConfig::new(
                "host",
                "must be a host name or an IP address",
            ));
        }
        if self.port == 0 {
            return Err(InvalidConfig::new(
                "port",
                "must be a number from 1 to 65535",
            ));
        }
        match (&self.username, &self.password) {
            (Some(_), None) => {
                return Err(InvalidConfig::new(
                    "password",
                    "is required with a username",
                ));
            }
            (None, Some(_)) => {
                return Err(InvalidConfig::new(
                    "username",
                    "is required with a password",
                ));
            }
            (Some(username), Some(password)) => {
                for (field, value) in [("username", username), ("password", password)] {
                    if value.is_empty() || value.len() > MAX_CREDENTIAL_BYTES {
                        return Err(InvalidConfig::new(
                            field,
                            format!("must be 1-{MAX_CREDENTIAL_BYTES} bytes"),
                        ));
                    }
                    one_line(field, value)?;
                }
                if self.security == Security::None && !is_loopback(&self.host) {
                    return Err(InvalidConfig::new(
                        "security",
                        "is none: a username and password are sent unencrypted only to a loopback host; use starttls or tls",
                    ));
                }
            }
            (None, None) => {}
        }
        mailbox("from", &self.from)?;
        if self.to.is_empty() || self.to.len() > MAX_RECIPIENTS {
            return Err(InvalidConfig::new(
                "to",
                format!("must name 1-{MAX_RECIPIENTS} addresses"),
            ));
        }
        for address in &self.to {
            mailbox("to", address)?;
        }
        if let Some(prefix) = &self.subject_prefix {
            one_line("subject_prefix", prefix)?;
            if prefix.len() > MAX_PREFIX_BYTES {
                return Err(InvalidConfig::new(
                    "subject_prefix",
                    format!("must be at most {MAX_PREFIX_BYTES} bytes"),
                ));
            }
        }
        Ok(if bare.contains(':') {
            format!("[{bare}]:{}", self.port)
        } else {
            format!("{bare}:{}", self.port)
        })
    }

    /// Validates the configuration and seals it under `key`.
    pub fn seal(&self, key: &EncryptionKey) -> Result<SealedConfig, InvalidConfig> {
        let target_host = self.validate()?;
        let plaintext = json!({
            "host": self.host,
            "port": self.port,
            "security": self.security.as_str(),
            "username": self.username,
            "password": self.password,
            "from": self.from,
            "to": self.to,
            "subject_prefix": self.subject_prefix,
        });
        Ok(SealedConfig {
            sealed: key.seal(plaintext.to_string().as_bytes()),
            target_host,
        })
    }

    /// Opens a configuration sealed by [`seal`](EmailConfig::seal).
    pub fn open(sealed: &[u8], key: &EncryptionKey) -> Result<EmailConfig, UnreadableConfig> {
        let plaintext = key.open(sealed).map_err(|_| UnreadableConfig)?;
        let value: Value = serde_json::from_slice(&plaintext).map_err(|_| UnreadableConfig)?;
        EmailConfig::from_json(&value).map_err(|_| UnreadableConfig)
    }

    /// The secret forms of the credentials, longest first: what must never appear in an error.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Some(password) = &self.password {
            let base64 = base64::engine::general_purpose::STANDARD;
            secrets.push(password.clone());
            secrets.push(base64.encode(password));
            if let Some(username) = &self.username {
                secrets.push(base64.encode(format!("\0{username}\0{password}")));
            }
        }
        secrets.retain(|secret| secret.len() >= 4);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets
    }

    fn redact(&self, text: &str) -> String {
        self.secrets()
            .iter()
            .fold(text.to_string(), |text, secret| {
                text.replace(secret.as_str(), "[redacted]")
            })
    }
}

/// What the dispatcher needs to send email: trusted roots, limits, the console's address.
#[derive(Clone)]
pub struct Mailer {
    roots: Arc<Vec<CertificateDer<'static>>>,
    implicit_tls: tokio_rustls::TlsConnector,
    step_timeout: Duration,
    public_url: String,
}

impl Mailer {
    /// Trusts the system's CA bundle and `options.extra_smtp_roots`.
    pub fn new(options: &DeliveryOptions, public_url: &str) -> anyhow::Result<Mailer> {
        let mut roots = Vec::new();
        if let Ok(bundle) = std::fs::read(SYSTEM_CA_BUNDLE) {
            use rustls_pki_types::pem::PemObject;
            roots.extend(CertificateDer::pem_slice_iter(&bundle).flatten());
        }
        roots.extend(options.extra_smtp_roots.iter().cloned());
        // Only the certificates rustls accepts as roots: lettre refuses the whole set otherwise.
        let mut store = rustls::RootCertStore::empty();
        roots.retain(|root| store.add(root.clone()).is_ok());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
        Ok(Mailer {
            roots: Arc::new(roots),
            implicit_tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            step_timeout: options.request_timeout,
            public_url: public_url.trim_end_matches('/').to_string(),
        })
    }

    /// lettre's TLS parameters for STARTTLS: the same roots, the configured host as the name.
    fn starttls_parameters(
        &self,
        host: &str,
    ) -> Result<TlsParameters, lettre::transport::smtp::Error> {
        let mut builder =
            TlsParameters::builder(host.to_string()).certificate_store(CertificateStore::None);
        for root in self.roots.iter() {
            builder = builder.add_root_certificate(Certificate::from_der(root.to_vec())?);
        }
        builder.build_rustls()
    }
}

/// Why an attempt did not deliver.
enum Failure {
    /// Worth retrying (4xx, network, TLS, timeouts).
    Temporary(String),
    /// Retrying would not help (5xx, a server without STARTTLS or a usable AUTH mechanism).
    Permanent(String),
}

/// Delivers `notification` by email through a tool configured by `config`.
pub async fn deliver(
    mailer: &Mailer,
    config: &EmailConfig,
    notification: &ClaimedNotification,
) -> Outcome {
    let tool = &notification.tool_name;
    let message = match message(config, notification, &mailer.public_url) {
        Ok(message) => message,
        Err(error) => return Outcome::Fail(format!("email tool {tool:?}: {error}")),
    };
    let limit = mailer.step_timeout + EXCHANGE_MARGIN;
    // Its own task, so that a panic in the SMTP client fails this notification instead of the
    // dispatcher; aborted if this attempt is dropped (shutdown).
    let exchange = {
        let (mailer, config) = (mailer.clone(), config.clone());
        AbortOnDrop(tokio::spawn(async move {
            tokio::time::timeout(limit, send(&mailer, &config, &message)).await
        }))
    };
    let failure = match exchange.join().await {
        Ok(Ok(Ok(()))) => return Outcome::Delivered,
        Ok(Ok(Err(failure))) => failure,
        Ok(Err(_)) => Failure::Temporary(format!(
            "the SMTP exchange took longer than {} s",
            limit.as_secs()
        )),
        Err(_) => Failure::Permanent("the SMTP client failed unexpectedly".into()),
    };
    match failure {
        Failure::Temporary(error) => Outcome::Retry {
            error: config.redact(&format!("email tool {tool:?}: {error}")),
            retry_after: None,
        },
        Failure::Permanent(error) => {
            Outcome::Fail(config.redact(&format!("email tool {tool:?}: {error}")))
        }
    }
}

/// A task aborted when dropped: the delivery that spawned it owns it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A server reply or a lettre error as a short, single-line text.
fn short(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() > MAX_REPLY_CHARS {
        let mut cut: String = flat.chars().take(MAX_REPLY_CHARS).collect();
        cut.push('…');
        cut
    } else {
        flat.to_string()
    }
}

/// Sorts a lettre error of `step`: 5xx and client-side refusals are permanent, the rest not.
fn classify(step: &str, error: lettre::transport::smtp::Error) -> Failure {
    let text = short(&error.to_string());
    if error.is_permanent() {
        Failure::Permanent(format!("{step}: the server refused: {text}"))
    } else if error.is_transient() {
        Failure::Temporary(format!("{step}: the server answered: {text}"))
    } else if error.is_client() {
        Failure::Permanent(format!("{step}: {text}"))
    } else {
        Failure::Temporary(format!("{step}: {text}"))
    }
}

/// Runs one step of the exchange within the step limit.
async fn step<T>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(classify(what, error)),
        Err(_) => Err(Failure::Temporary(format!(
            "{what}: no answer within {} s",
            limit.as_secs()
        ))),
    }
}

/// Connects, secures, logs in and sends one message.
async fn send(mailer: &Mailer, config: &EmailConfig, message: &Message) -> Result<(), Failure> {
    let limit = mailer.step_timeout;
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    let tcp = match tokio::time::timeout(limit, TcpStream::connect((host, config.port))).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => {
            return Err(Failure::Temporary(format!(
                "connecting to {}:{}: {error}",
                config.host, config.port
            )));
        }
        Err(_) => {
            return Err(Failure::Temporary(format!(
                "connecting to {}:{}: no connection within {} s",
                config.host,
                config.port,
                limit.as_secs()
            )));
        }
    };
    let peer = tcp
        .peer_addr()
        .map_err(|error| Failure::Temporary(format!("connecting: {error}")))?;
    let stream: Box<dyn AsyncTokioStream> = match config.security {
        Security::Tls => {
            let name = ServerName::try_from(host.to_string()).map_err(|_| {
                Failure::Permanent(format!("{host:?} cannot be checked against a certificate"))
            })?;
            let tls =
                match tokio::time::timeout(limit, mailer.implicit_tls.connect(name, tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        return Err(Failure::Temporary(format!("TLS handshake: {error}")));
                    }
                    Err(_) => {
                        return Err(Failure::Temporary(format!(
                            "TLS handshake: not done within {} s",
                            limit.as_secs()
                        )));
                    }
                };
            Box::new(Capped::new(tls, peer))
        }
        Security::StartTls | Security::None => Box::new(Capped::new(tcp, peer)),
    };
    let hello = ClientId::default();
    let mut connection = step(
        limit,
        "greeting and EHLO",
        AsyncSmtpConnection::connect_with_transport(stream, &hello),
    )
    .await?;
    match exchange(mailer, config, message, &mut connection, &hello).await {
        Ok(()) => {
            let _ = tokio::time::timeout(limit, connection.quit()).await;
            Ok(())
        }
        Err((failure, usable)) => {
            if usable {
                let _ = tokio::time::timeout(limit, connection.abort()).await;
            }
            Err(failure)
        }
    }
}

/// Everything after the greeting: STARTTLS, AUTH, MAIL FROM, RCPT TO, DATA. A failure says
/// whether the connection may still be used (to say QUIT).
async fn exchange(
    mailer: &Mailer,
    config: &EmailConfig,
    message: &Message,
    connection: &mut AsyncSmtpConnection,
    hello: &ClientId,
) -> Result<(), (Failure, bool)> {
    let limit = mailer.step_timeout;
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    if config.security == Security::StartTls {
        if !connection
            .server_info()
            .supports_feature(Extension::StartTls)
        {
            return Err((Failure::Permanent(
                "the server does not offer STARTTLS (security is starttls; use tls, or none for a trusted relay)".into(),
            ), true));
        }
        let parameters = mailer.starttls_parameters(host).map_err(|error| {
            (
                Failure::Permanent(format!("TLS setup: {}", short(&error.to_string()))),
                true,
            )
        })?;
        if let Err(failure) = step(limit, "STARTTLS", connection.starttls(parameters, hello)).await
        {
            // A failed upgrade leaves lettre's connection without a stream: it must not be
            // used again (not even for QUIT), only dropped.
            return Err((failure, false));
        }
    }
    if let (Some(username), Some(password)) = (&config.username, &config.password) {
        if !connection.is_encrypted() && !is_loopback(&config.host) {
            return Err((
                Failure::Permanent(
                    "refusing to send the password unencrypted to a host that is not loopback"
                        .into(),
                ),
                true,
            ));
        }
        let credentials = Credentials::new(username.clone(), password.clone());
        step(
            limit,
            "AUTH",
            connection.auth(&[Mechanism::Plain, Mechanism::Login], &credentials),
        )
        .await
        .map_err(|failure| (failure, true))?;
    }
    let body = message.formatted();
    step(
        limit,
        "sending the message",
        connection.send(message.envelope(), &body),
    )
    .await
    .map_err(|failure| (failure, true))?;
    Ok(())
}

/// The subject: the prefix and the title (or the message's first line), on one line.
fn subject(config: &EmailConfig, notification: &ClaimedNotification) -> String {
    let title = notification
        .title
        .clone()
        .filter(|title| !title.trim().is_empty())
        .or_else(|| {
            notification
                .message
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "Cronium notification".into());
    let flat = |text: &str| -> String {
        text.split(char::is_control)
            .filter(|part| !part.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let title: String = flat(&title).chars().take(200).collect();
    match config.subject_prefix.as_deref().map(flat) {
        Some(prefix) if !prefix.is_empty() => format!("{prefix} {title}"),
        _ => title,
    }
}

/// The plain-text body: the title, the message and where it came from.
fn body(notification: &ClaimedNotification, public_url: &str) -> String {
    let mut text = String::new();
    if let Some(title) = notification
        .title
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    {
        text.push_str(title.trim());
        text.push_str("\n\n");
    }
    text.push_str(notification.message.trim_end());
    text.push_str("\n\n");
    text.push_str(&format!("Tool: {}\n", notification.tool_name));
    text.push_str(&format!("Owner: {}\n", notification.owner_name));
    if let Some(job) = &notification.source_job_id {
        text.push_str(&format!("Job: {job}\n"));
        if let Some(run) = &notification.source_run_id {
            text.push_str(&format!("Run: {public_url}/ui/#/runs/{run}?job={job}\n"));
        }
    }
    text.push_str(&format!("Notification: {}\n", notification.id));
    text.push_str("Sent by Cronium.\n");
    text
}

/// The whole message of a notification.
fn message(
    config: &EmailConfig,
    notification: &ClaimedNotification,
    public_url: &str,
) -> Result<Message, String> {
    let invalid = |error: InvalidConfig| format!("the stored configuration is invalid: {error}");
    let from = mailbox("from", &config.from).map_err(invalid)?;
    let message_id = format!("<{}@{}>", notification.id, from.email.domain());
    let mut builder = Message::builder()
        .from(from)
        .date_now()
        .message_id(Some(message_id))
        .subject(subject(config, notification))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".into(),
        ));
    for address in &config.to {
        builder = builder.to(mailbox("to", address).map_err(invalid)?);
    }
    builder
        .singlepart(SinglePart::plain(body(notification, public_url)))
        .map_err(|error| format!("the message cannot be built: {error}"))
}

/// A connection that fails once the server has sent more than [`MAX_READ_BYTES`]: lettre caps a
/// reply's lines, this caps everything else (a server that never ends a line).
#[derive(Debug)]
struct Capped<S> {
    inner: S,
    read: u64,
    peer: SocketAddr,
}

impl<S> Capped<S> {
    fn new(inner: S, peer: SocketAddr) -> Capped<S> {
        Capped {
            inner,
            read: 0,
            peer,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read >= MAX_READ_BYTES {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server sent more than {MAX_READ_BYTES} bytes"),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(context, buf);
        let added = buf.filled().len() - before;
        self.read += added as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(context, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

impl<S> AsyncTokioStream for Capped<S>
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + fmt::Debug,
{
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}
