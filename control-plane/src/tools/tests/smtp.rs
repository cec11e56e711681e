//! Email tools end to end: an SMTP server written here listens on 127.0.0.1 (plain, STARTTLS and
//! implicit TLS with a certificate from a test CA made with rcgen, AUTH PLAIN and LOGIN), records
//! every envelope and message, and answers DATA as each test scripts it. The control plane, its
//! API and its dispatcher are the real ones.

use std::net::SocketAddr;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::store::variables::{HelperWrite, HelperWriteOutcome};
use crate::tools::email::{EmailConfig, Security};

const PASSWORD: &str = "smtp-password-canary";

/// How the test server protects its connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    StartTls,
    Implicit,
}

/// One message the server accepted or refused at the end of DATA.
#[derive(Debug, Default, Clone)]
struct Mail {
    /// The conversation was encrypted when the message was sent.
    tls: bool,
    /// The AUTH mechanism and the credentials it carried.
    auth: Option<(String, String, String)>,
    from: String,
    to: Vec<String>,
    /// DATA as received (dot-stuffed, CRLF line ends, without the final `.`).
    raw: String,
    /// DATA with the dot-stuffing undone.
    data: String,
    /// The reply the server gave to it.
    reply: String,
}

impl Mail {
    /// The value of a header (unfolded), if present.
    fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let mut found: Option<String> = None;
        let mut current: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(value) = current.as_mut() {
                    value.push_str(line);
                }
                continue;
            }
            if let Some(value) = current.take() {
                found.get_or_insert(value);
            }
            if let Some((key, value)) = line.split_once(':')
                && key.eq_ignore_ascii_case(name)
            {
                current = Some(value.trim().to_string());
            }
        }
        if let Some(value) = current {
            found.get_or_insert(value);
        }
        found
    }

    /// The body, with its transfer encoding undone.
    fn body(&self) -> String {
        let body = self
            .data
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        match self.header("Content-Transfer-Encoding").as_deref() {
            Some("quoted-printable") => decode_quoted_printable(&body),
            Some("base64") => String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(body.replace("\r\n", ""))
                    .unwrap(),
            )
            .unwrap(),
            Some("7bit") | None => body,
            Some(other) => panic!("unexpected transfer encoding {other}"),
        }
    }
}

/// What the test server offers and expects.
#[derive(Clone)]
struct Setup {
    mode: Mode,
    tls: Option<TlsAcceptor>,
    /// The AUTH mechanisms advertised ("" for none).
    mechanisms: &'static str,
    username: &'static str,
    password: &'static str,
    /// The replies to the end of DATA, in order; then `250`.
    replies: Arc<Mutex<VecDeque<&'static str>>>,
}

/// A local SMTP server; stops when dropped.
struct SmtpServer {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Mail>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpServer {
    async fn start(setup: Setup) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            // The sessions belong to the accept loop: aborting it drops (and aborts) them.
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (setup, sender) = (setup.clone(), sender.clone());
                sessions.spawn(async move {
                    let _ = serve(tcp, setup, sender).await;
                });
                while sessions.try_join_next().is_some() {}
            }
        });
        SmtpServer {
            addr,
            received,
            task,
        }
    }

    /// The next message the server received (or panics after 20 s).
    async fn next(&mut self) -> Mail {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("no message within 20 s")
            .expect("the server stopped")
    }
}

/// One connection: greeting, then the conversation, upgraded to TLS on STARTTLS.
async fn serve(
    tcp: tokio::net::TcpStream,
    setup: Setup,
    sender: mpsc::UnboundedSender<Mail>,
) -> std::io::Result<()> {
    match setup.mode {
        Mode::Implicit => {
            let tls = setup.tls.clone().unwrap().accept(tcp).await?;
            converse(tls, &setup, true, &sender).await?;
        }
        Mode::Plain | Mode::StartTls => {
            if let Some(tcp) = converse(tcp, &setup, false, &sender).await? {
                let tls = setup.tls.clone().unwrap().accept(tcp).await?;
                converse(tls, &setup, true, &sender).await?;
            }
        }
    }
    Ok(())
}

/// Speaks SMTP until QUIT or STARTTLS (then hands the raw stream back for the handshake).
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    setup: &Setup,
    tls: bool,
    sender: &mpsc::UnboundedSender<Mail>,
) -> std::io::Result<Option<S>> {
    let mut stream = BufReader::new(stream);
    if !tls || setup.mode == Mode::Implicit {
        stream
            .get_mut()
            .write_all(b"220 test.local ESMTP\r\n")
            .await?;
    }
    let mut mail = Mail {
        tls,
        ..Mail::default()
    };
    let base64 = base64::engine::general_purpose::STANDARD;
    loop {
        let line = read_line(&mut stream).await?;
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut lines = vec!["250-test.local".to_string()];
            if setup.mode == Mode::StartTls && !tls {
                lines.push("250-STARTTLS".into());
            }
            if !setup.mechanisms.is_empty() {
                lines.push(format!("250-AUTH {}", setup.mechanisms));
            }
            lines.push("250 8BITMIME".into());
            lines.join("\r\n")
        } else if upper == "STARTTLS" && setup.mode == Mode::StartTls && !tls {
            stream
                .get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n")
                .await?;
            stream.get_mut().flush().await?;
            return Ok(Some(stream.into_inner()));
        } else if let Some(rest) = upper.strip_prefix("AUTH PLAIN") {
            let encoded = if rest.trim().is_empty() {
                stream.get_mut().write_all(b"334 \r\n").await?;
                read_line(&mut stream).await?
            } else {
                line["AUTH PLAIN".len()..].trim().to_string()
            };
            let decoded = String::from_utf8(base64.decode(encoded).unwrap_or_default()).unwrap();
            let parts: Vec<&str> = decoded.split('\0').collect();
            let (user, pass) = (
                parts.get(1).copied().unwrap_or(""),
                parts.get(2).copied().unwrap_or(""),
            );
            login(setup, &mut mail, "PLAIN", user, pass)
        } else if upper.starts_with("AUTH LOGIN") {
            let initial = line["AUTH LOGIN".len()..].trim().to_string();
            let user = if initial.is_empty() {
                stream.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await?;
                read_line(&mut stream).await?
            } else {
                initial
            };
            stream.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
            let pass = read_line(&mut stream).await?;
            let decode =
                |text: &str| String::from_utf8(base64.decode(text).unwrap_or_default()).unwrap();
            login(setup, &mut mail, "LOGIN", &decode(&user), &decode(&pass))
        } else if upper.starts_with("MAIL FROM:") {
            mail.from = line["MAIL FROM:".len()..].trim().to_string();
            mail.to.clear();
            "250 2.1.0 ok".into()
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(line["RCPT TO:".len()..].trim().to_string());
            "250 2.1.5 ok".into()
        } else if upper == "DATA" {
            stream.get_mut().write_all(b"354 go ahead\r\n").await?;
            let mut raw = String::new();
            let mut data = String::new();
            loop {
                let line = read_line(&mut stream).await?;
                if line == "." {
                    break;
                }
                raw.push_str(&line);
                raw.push_str("\r\n");
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
                data.push_str("\r\n");
            }
            let reply = setup
                .replies
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or("250 2.0.0 queued");
            let _ = sender.send(Mail {
                raw,
                data,
                reply: reply.into(),
                ..mail.clone()
            });
            reply.into()
        } else if upper == "QUIT" {
            stream.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(None);
        } else if upper == "RSET" || upper == "NOOP" {
            "250 2.0.0 ok".into()
        } else {
            "502 5.5.2 unknown command".into()
        };
        stream
            .get_mut()
            .write_all(format!("{reply}\r\n").as_bytes())
            .await?;
        stream.get_mut().flush().await?;
    }
}

fn login(setup: &Setup, mail: &mut Mail, mechanism: &str, user: &str, pass: &str) -> String {
    if user == setup.username && pass == setup.password {
        mail.auth = Some((mechanism.into(), user.into(), pass.into()));
        "235 2.7.0 authenticated".into()
    } else {
        // A server that echoes what it got: the password must still not reach `last_error`.
        format!("535 5.7.8 bad credentials for {user} / {pass}")
    }
}

/// One line without its CRLF; an error at the end of the stream or past 64 KiB.
async fn read_line<S: AsyncRead + Unpin>(stream: &mut BufReader<S>) -> std::io::Result<String> {
    let mut line = Vec::new();
    let read = (&mut *stream)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 || !line.ends_with(b"\n") {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = String::from_utf8(line).map_err(|_| std::io::ErrorKind::InvalidData)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn setup(mode: Mode, tls: Option<TlsAcceptor>, replies: &[&'static str]) -> Setup {
    Setup {
        mode,
        tls,
        mechanisms: "PLAIN LOGIN",
        username: "mailer",
        password: PASSWORD,
        replies: Arc::new(Mutex::new(replies.iter().copied().collect())),
    }
}

/// A test CA and a server certificate for `localhost` signed by it.
struct TestCa {
    ca: CertificateDer<'static>,
    acceptor: TlsAcceptor,
}

fn test_ca(name: &str) -> TestCa {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![server_cert.der().clone(), ca_cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
    .unwrap();
    TestCa {
        ca: ca_cert.der().clone(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// A control plane whose dispatcher also trusts `roots` for SMTP over TLS.
async fn start_plane(dir: &Path, retries: usize, roots: Vec<CertificateDer<'static>>) -> Plane {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = server_config(
        dir,
        &EncryptionKey::generate_base64(),
        fast_retries(retries),
    );
    config.delivery.extra_smtp_roots = roots;
    let shutdown = CancellationToken::new();
    let running = crate::start(config, shutdown.clone()).await.unwrap();
    Plane {
        running: Some(running),
        shutdown,
    }
}

fn check_email(value: Value) -> Result<String, String> {
    EmailConfig::from_json(&value)
        .and_then(|config| config.validate())
        .map_err(|error| {
            assert!(!error.to_string().contains(PASSWORD), "{error}");
            error.field
        })
}

#[test]
fn email_configurations_are_checked_and_refuse_header_injection() {
    let base = || {
        json!({"host": "smtp.example.com", "from": "Cronium <cron@example.com>",
               "to": "ops@example.com"})
    };
    let with = |changes: Value| {
        let mut config = base();
        for (key, value) in changes.as_object().unwrap() {
            config[key] = value.clone();
        }
        config
    };
    assert_eq!(check_email(base()), Ok("smtp.example.com:587".into()));
    let parsed = EmailConfig::from_json(&base()).unwrap();
    assert_eq!(parsed.security, Security::StartTls);
    assert_eq!(format!("{parsed:?}"), "EmailConfig(..)");
    assert_eq!(
        check_email(with(json!({"security": "tls"}))),
        Ok("smtp.example.com:465".into())
    );
    assert_eq!(
        check_email(with(
            json!({"host": "::1", "port": 2525, "security": "none"})
        )),
        Ok("[::1]:2525".into())
    );
    assert_eq!(
        check_email(with(json!({"to": ["a@example.com", "B <b@example.com>"],
                          "username": "u", "password": PASSWORD, "subject_prefix": "[cron]"}))),
        Ok("smtp.example.com:587".into())
    );
    // Plain SMTP to a relay is allowed; a password over it only to a loopback host.
    assert_eq!(
        check_email(with(json!({"security": "none", "port": 25}))),
        Ok("smtp.example.com:25".into())
    );
    assert_eq!(
        check_email(with(
            json!({"security": "none", "username": "u", "password": PASSWORD})
        )),
        Err("security".into())
    );
    assert_eq!(
        check_email(with(
            json!({"host": "127.0.0.1", "security": "none", "username": "u", "password": PASSWORD})
        )),
        Ok("127.0.0.1:587".into())
    );
    for (changes, field) in [
        (
            json!({"from": "Evil\r\nBcc: victim@example.com <cron@example.com>"}),
            "from",
        ),
        (
            json!({"from": "cron@example.com\nBcc: victim@example.com"}),
            "from",
        ),
        (
            json!({"to": ["ok@example.com", "x@example.com\r\nBcc: v@example.com"]}),
            "to",
        ),
        (
            json!({"subject_prefix": "[cron]\r\nBcc: v@example.com"}),
            "subject_prefix",
        ),
        (
            json!({"username": "u\r\nMAIL FROM:<x@example.com>", "password": PASSWORD}),
            "username",
        ),
        (
            json!({"username": "u", "password": "pass\nword"}),
            "password",
        ),
        (json!({"from": "not an address"}), "from"),
        (json!({"from": "a@"}), "from"),
        (json!({"to": []}), "to"),
        (json!({"to": "nobody"}), "to"),
        (json!({"to": [1]}), "to"),
        (json!({"to": null}), "to"),
        (json!({"host": "bad host"}), "host"),
        (json!({"host": ""}), "host"),
        (json!({"port": 0}), "port"),
        (json!({"port": 70000}), "port"),
        (json!({"port": "25"}), "port"),
        (json!({"security": "ssl"}), "security"),
        (json!({"username": "u"}), "password"),
        (json!({"password": PASSWORD}), "username"),
        (json!({"url": "https://example.com"}), "url"),
    ] {
        assert_eq!(
            check_email(with(changes.clone())),
            Err(field.into()),
            "{changes}"
        );
    }
    let too_many: Vec<String> = (0..51).map(|i| format!("u{i}@example.com")).collect();
    assert_eq!(check_email(with(json!({"to": too_many}))), Err("to".into()));
}

/// Creates an email tool through the API; returns its id.
async fn create_tool(plane: &Plane, token: &str, name: &str, config: Value) -> String {
    let (status, answer) = plane
        .send_raw(
            Method::POST,
            "/api/v1/tools",
            token,
            Some(&json!({"name": name, "kind": "email", "config": config}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert!(!answer.contains(PASSWORD), "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["kind"], "email");
    assert!(answer.get("config").is_none(), "{answer}");
    answer["id"].as_str().unwrap().to_string()
}

fn plain_config(server: &SmtpServer) -> Value {
    json!({"host": "127.0.0.1", "port": server.addr.port(), "security": "none",
           "username": "mailer", "password": PASSWORD,
           "from": "Cronium <cron@example.com>", "to": ["ops@example.com", "Dev Team <dev@example.com>"],
           "subject_prefix": "[cronium]"})
}

#[tokio::test]
async fn an_email_tool_sends_a_real_message_with_headers_body_and_dot_stuffing() {
    let dir = tempfile::tempdir().unwrap();
    let plane = start_plane(dir.path(), 3, Vec::new()).await;
    let mut server = SmtpServer::start(setup(Mode::Plain, None, &[])).await;
    let token = plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    let id = create_tool(&plane, &token, "mail", plain_config(&server)).await;
    let (status, shown) = plane
        .send_raw(Method::GET, &format!("/api/v1/tools/{id}"), &token, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !shown.contains(PASSWORD) && !shown.contains("mailer"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("127.0.0.1:{}", server.addr.port())),
        "{shown}"
    );
    let sealed = plane.state().store.sealed_tool_config(&id).await.unwrap();
    assert!(!contains_bytes(&sealed, PASSWORD));
    // Injection and plaintext passwords are refused when saving, naming the field only.
    for (change, field) in [
        (
            json!({"to": ["ops@example.com\r\nBcc: victim@example.com"]}),
            "config.to",
        ),
        (
            json!({"from": "cron@example.com\nSubject: forged"}),
            "config.from",
        ),
        (
            json!({"subject_prefix": "[x]\r\nBcc: victim@example.com"}),
            "config.subject_prefix",
        ),
        (json!({"host": "smtp.example.com"}), "config.security"),
    ] {
        let mut config = plain_config(&server);
        for (key, value) in change.as_object().unwrap() {
            config[key] = value.clone();
        }
        for (method, path, body) in [
            (
                Method::POST,
                "/api/v1/tools".to_string(),
                json!({"name": "bad", "kind": "email", "config": config}),
            ),
            (
                Method::PATCH,
                format!("/api/v1/tools/{id}"),
                json!({"config": config}),
            ),
        ] {
            let (status, answer) = plane
                .send_raw(method, &path, &token, Some(&body.to_string()))
                .await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{change}: {answer}"
            );
            assert!(
                !answer.contains(PASSWORD) && !answer.contains("victim"),
                "{answer}"
            );
            let answer: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["error"]["field"], field, "{change}");
        }
    }
    assert_eq!(
        plane.state().store.sealed_tool_config(&id).await.unwrap(),
        sealed,
        "a refused PATCH changes nothing"
    );
    let (_, tools) = plane.send(Method::GET, "/api/v1/tools", &token, None).await;
    assert_eq!(tools.as_array().unwrap().len(), 1, "{tools}");

    // The test route sends through the tool.
    let (status, answer) = plane
        .send(
            Method::POST,
            &format!("/api/v1/tools/{id}/test"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let mail = server.next().await;
    assert_eq!(
        mail.auth,
        Some(("PLAIN".into(), "mailer".into(), PASSWORD.into()))
    );
    assert!(!mail.tls);
    assert_eq!(mail.from, "<cron@example.com>");
    assert_eq!(mail.to, ["<ops@example.com>", "<dev@example.com>"]);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[cronium] Cronium test notification")
    );
    let sent = plane
        .settled(answer["id"].as_str().unwrap(), NotificationStatus::Sent)
        .await;
    assert_eq!(sent.attempts, 1);

    // A notification with lines that need dot-stuffing: ASCII, so sent as 7bit.
    let message = "first line\n.hidden line\n..two dots\nlast line";
    let id = crate::tools::notify(
        plane.state(),
        &owner,
        "mail",
        Some("Nightly report"),
        message,
        Some("job-7"),
    )
    .await
    .unwrap()
    .unwrap();
    let mail = server.next().await;
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[cronium] Nightly report")
    );
    assert_eq!(
        mail.header("From").as_deref(),
        Some("Cronium <cron@example.com>")
    );
    let to = mail.header("To").unwrap();
    assert!(
        to.contains("ops@example.com")
            && to.contains("Dev Team")
            && to.contains("<dev@example.com>"),
        "{to}"
    );
    assert_eq!(mail.header("MIME-Version").as_deref(), Some("1.0"));
    assert_eq!(
        mail.header("Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        mail.header("Content-Transfer-Encoding").as_deref(),
        Some("7bit")
    );
    assert_eq!(
        mail.header("Message-ID"),
        Some(format!("<{id}@example.com>"))
    );
    assert_eq!(
        mail.header("Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    let date = mail.header("Date").unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc2822(&date).is_ok(),
        "{date}"
    );
    // Dot-stuffed on the wire, intact after it.
    assert!(mail.raw.contains("\r\n..hidden line\r\n"), "{}", mail.raw);
    assert!(mail.raw.contains("\r\n...two dots\r\n"), "{}", mail.raw);
    let body = mail.body();
    assert!(
        body.starts_with(
            "Nightly report\r\n\r\nfirst line\r\n.hidden line\r\n..two dots\r\nlast line\r\n"
        ),
        "{body}"
    );
    assert!(body.contains("Tool: mail\r\n"), "{body}");
    assert!(body.contains("Owner: alice\r\n"), "{body}");
    assert!(body.contains("Job: job-7\r\n"), "{body}");
    assert!(body.contains(&format!("Notification: {id}\r\n")), "{body}");
    plane.settled(&id, NotificationStatus::Sent).await;

    // A UTF-8 title: an RFC 2047 subject and an encoded body; a title cannot add headers.
    let id = crate::tools::notify(
        plane.state(),
        &owner,
        "mail",
        Some("Sauvegarde réussie ✓\r\nBcc: victim@example.com"),
        "terminée",
        None,
    )
    .await
    .unwrap()
    .unwrap();
    let mail = server.next().await;
    let subject = mail.header("Subject").unwrap();
    assert!(subject.contains("=?utf-8?"), "RFC 2047: {subject}");
    assert_eq!(
        decode_rfc2047(&subject),
        "[cronium] Sauvegarde réussie ✓ Bcc: victim@example.com"
    );
    assert_eq!(mail.header("Bcc"), None);
    assert_eq!(mail.to, ["<ops@example.com>", "<dev@example.com>"]);
    assert_ne!(
        mail.header("Content-Transfer-Encoding").as_deref(),
        Some("7bit")
    );
    let body = mail.body();
    assert!(body.contains("terminée"), "{body}");
    plane.settled(&id, NotificationStatus::Sent).await;

    // A server offering only LOGIN gets LOGIN.
    let mut login_only = setup(Mode::Plain, None, &[]);
    login_only.mechanisms = "LOGIN";
    let mut login_server = SmtpServer::start(login_only).await;
    create_tool(&plane, &token, "login", plain_config(&login_server)).await;
    let id = crate::tools::notify(plane.state(), &owner, "login", None, "via LOGIN", None)
        .await
        .unwrap()
        .unwrap();
    let mail = login_server.next().await;
    assert_eq!(
        mail.auth,
        Some(("LOGIN".into(), "mailer".into(), PASSWORD.into()))
    );
    // Without a title, the first line of the message is the subject.
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[cronium] via LOGIN")
    );
    plane.settled(&id, NotificationStatus::Sent).await;
    plane.stop().await;
}

/// Decodes a quoted-printable body (soft line breaks and `=XX`).
fn decode_quoted_printable(body: &str) -> String {
    let joined = body.replace("=\r\n", "");
    let mut bytes = Vec::new();
    let mut input = joined.bytes();
    while let Some(byte) = input.next() {
        if byte == b'=' {
            let hex = [input.next().unwrap(), input.next().unwrap()];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).unwrap()
}

/// Decodes a header with `=?utf-8?b?...?=` / `=?utf-8?q?...?=` words among plain ones.
fn decode_rfc2047(header: &str) -> String {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut text = String::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut last_encoded = false;
    for word in header.split_whitespace() {
        let Some(inner) = word.strip_prefix("=?").and_then(|w| w.strip_suffix("?=")) else {
            text.push_str(&String::from_utf8(std::mem::take(&mut pending)).unwrap());
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(word);
            last_encoded = false;
            continue;
        };
        if !last_encoded && !text.is_empty() {
            text.push(' ');
        }
        last_encoded = true;
        let mut parts = inner.splitn(3, '?');
        let (_, encoding, payload) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if encoding.eq_ignore_ascii_case("b") {
            pending.extend(base64.decode(payload).unwrap());
        } else {
            pending.extend(decode_quoted_printable(&payload.replace('_', " ")).into_bytes());
        }
    }
    text.push_str(&String::from_utf8(pending).unwrap());
    text
}

#[tokio::test]
async fn a_failed_jobs_on_failure_and_the_notify_helper_both_send_email() {
    let dir = tempfile::tempdir().unwrap();
    let plane = start_plane(dir.path(), 3, Vec::new()).await;
    let mut server = SmtpServer::start(setup(Mode::Plain, None, &[])).await;
    let token = plane.token("alice", Role::User).await;
    let agent = enrolled_agent(&plane, "web-1").await;
    create_tool(&plane, &token, "mail", plain_config(&server)).await;
    let (status, event) = plane
        .send(
            Method::POST,
            "/api/v1/events",
            &token,
            Some(
                json!({"name": "nightly", "kind": "bash", "script": "exit 3",
                        "targets": {"agents": ["web-1"]}, "notify": {"on_failure": "mail"}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let runs = format!("/api/v1/events/{}/runs", event["id"].as_str().unwrap());
    let (status, run) = plane
        .send(Method::POST, &runs, &token, Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let job = run["jobs"][0]["id"].as_str().unwrap().to_string();
    let store = &plane.state().store;
    let claimed = store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(claimed[0].id, job);

    // The script's `notify` helper, as the agent forwards it.
    let outcome = store
        .helper_write(
            &agent,
            &job,
            claimed[0].attempt,
            1,
            HelperWrite::Notify {
                tool: Some("mail".into()),
                title: Some("Backup size".into()),
                message: "42 GB written".into(),
            },
        )
        .await
        .unwrap();
    let HelperWriteOutcome::Notified(helper_id) = outcome else {
        panic!("{outcome:?}");
    };
    plane.state().notifier.notify_one();
    let mail = server.next().await;
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[cronium] Backup size")
    );
    let body = mail.body();
    assert!(
        body.starts_with("Backup size\r\n\r\n42 GB written\r\n"),
        "{body}"
    );
    assert!(body.contains(&format!("Job: {job}\r\n")), "{body}");
    assert!(
        body.contains(&format!("/ui/#/runs/{run_id}?job={job}\r\n")),
        "{body}"
    );
    plane.settled(&helper_id, NotificationStatus::Sent).await;

    // The job's lease ends: the sweeper fails it as lost and `on_failure` mails.
    store
        .expire_attempts_now(
            &agent,
            &[crate::store::jobs::Attempt {
                job_id: job.clone(),
                attempt: claimed[0].attempt,
            }],
        )
        .await
        .unwrap();
    let mail = server.next().await;
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[cronium] cronium: nightly failed on web-1")
    );
    let body = mail.body();
    assert!(
        body.contains("status: failed") && body.contains("reason: lost"),
        "{body}"
    );
    assert!(body.contains(&format!("job: {job}")), "{body}");
    let id = mail
        .header("Message-ID")
        .unwrap()
        .trim_start_matches('<')
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let sent = plane.settled(&id, NotificationStatus::Sent).await;
    assert_eq!(sent.source_job_id.as_deref(), Some(job.as_str()));
    plane.stop().await;
}

#[tokio::test]
async fn smtp_rejections_fail_at_once_and_temporary_errors_are_retried_without_leaking_the_password()
 {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let plane = start_plane(dir.path(), 3, Vec::new()).await;
    let mut server = SmtpServer::start(setup(
        Mode::Plain,
        None,
        &[
            "451 4.3.0 try again later",
            "250 2.0.0 queued",
            "550 5.7.1 rejected by policy",
        ],
    ))
    .await;
    let token = plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    create_tool(&plane, &token, "mail", plain_config(&server)).await;
    let notify = async |tool: &str, message: &str| {
        crate::tools::notify(plane.state(), &owner, tool, None, message, None)
            .await
            .unwrap()
            .unwrap()
    };

    // 451, then 250: sent on the second attempt.
    let id = notify("mail", "eventually").await;
    assert_eq!(server.next().await.reply, "451 4.3.0 try again later");
    assert_eq!(server.next().await.reply, "250 2.0.0 queued");
    let sent = plane.settled(&id, NotificationStatus::Sent).await;
    assert_eq!(sent.attempts, 2);

    // 550: failed at once, the reply in `last_error`, no retry.
    let id = notify("mail", "rejected").await;
    assert!(server.next().await.reply.starts_with("550"));
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 1);
    let error = failed.last_error.unwrap();
    assert!(
        error.contains("\"mail\"") && error.contains("550"),
        "{error}"
    );
    assert!(error.contains("rejected by policy"), "{error}");

    // A wrong password: the server's 535 (which echoes the password) fails at once, redacted.
    let mut config = plain_config(&server);
    config["password"] = json!(format!("{PASSWORD}-wrong"));
    create_tool(&plane, &token, "badauth", config).await;
    let id = notify("badauth", "no login").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 1);
    let error = failed.last_error.unwrap();
    assert!(error.contains("535") && error.contains("AUTH"), "{error}");
    assert!(!error.contains(PASSWORD), "{error}");

    // Nothing listening: connection errors are retried until the attempts run out.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = plain_config(&server);
    config["port"] = json!(closed.local_addr().unwrap().port());
    drop(closed);
    create_tool(&plane, &token, "down", config).await;
    let id = notify("down", "nobody home").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 4);
    let error = failed.last_error.unwrap();
    assert!(
        error.contains("gave up after 4 attempts") && error.contains("connecting"),
        "{error}"
    );

    let (status, listed) = plane
        .send_raw(Method::GET, "/api/v1/notifications", &token, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        listed.contains("550") && !listed.contains(PASSWORD),
        "{listed}"
    );
    assert!(
        server.received.try_recv().is_err(),
        "no message beyond those checked"
    );
    plane.stop().await;
    let logs = logs.text();
    assert!(
        logs.contains("notification failed"),
        "the logs were captured"
    );
    assert!(!logs.contains(PASSWORD), "{logs}");
}

#[tokio::test]
async fn starttls_and_implicit_tls_are_verified_and_never_downgraded() {
    let ca = test_ca("Cronium test SMTP CA");
    let other = test_ca("Someone else's CA");
    let dir = tempfile::tempdir().unwrap();
    let plane = start_plane(dir.path(), 1, vec![ca.ca.clone()]).await;
    let token = plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    let notify = async |tool: &str| {
        crate::tools::notify(plane.state(), &owner, tool, Some("TLS"), "over TLS", None)
            .await
            .unwrap()
            .unwrap()
    };
    let tls_config = |server: &SmtpServer, security: &str| {
        json!({"host": "localhost", "port": server.addr.port(), "security": security,
               "username": "mailer", "password": PASSWORD,
               "from": "cron@example.com", "to": "ops@example.com"})
    };

    // STARTTLS: the session is upgraded before AUTH.
    let mut starttls =
        SmtpServer::start(setup(Mode::StartTls, Some(ca.acceptor.clone()), &[])).await;
    create_tool(
        &plane,
        &token,
        "starttls",
        tls_config(&starttls, "starttls"),
    )
    .await;
    let id = notify("starttls").await;
    let mail = starttls.next().await;
    assert!(mail.tls, "sent after STARTTLS");
    assert_eq!(mail.auth.map(|auth| auth.2), Some(PASSWORD.to_string()));
    plane.settled(&id, NotificationStatus::Sent).await;

    // Implicit TLS.
    let mut implicit =
        SmtpServer::start(setup(Mode::Implicit, Some(ca.acceptor.clone()), &[])).await;
    create_tool(&plane, &token, "smtps", tls_config(&implicit, "tls")).await;
    let id = notify("smtps").await;
    let mail = implicit.next().await;
    assert!(mail.tls);
    assert_eq!(mail.header("Subject").as_deref(), Some("TLS"));
    plane.settled(&id, NotificationStatus::Sent).await;

    // A server without STARTTLS: no plaintext fallback, failed at once, nothing sent.
    let mut plain = SmtpServer::start(setup(Mode::Plain, None, &[])).await;
    create_tool(&plane, &token, "nostarttls", tls_config(&plain, "starttls")).await;
    let id = notify("nostarttls").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 1);
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .contains("does not offer STARTTLS"),
        "{:?}",
        failed.last_error
    );

    // A certificate from a CA nobody trusts: retried, then given up; nothing sent.
    let mut untrusted =
        SmtpServer::start(setup(Mode::Implicit, Some(other.acceptor.clone()), &[])).await;
    create_tool(&plane, &token, "untrusted", tls_config(&untrusted, "tls")).await;
    let id = notify("untrusted").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 2);
    let error = failed.last_error.unwrap();
    assert!(
        error.contains("TLS handshake") && error.contains("certificate"),
        "{error}"
    );
    let mut untrusted_starttls =
        SmtpServer::start(setup(Mode::StartTls, Some(other.acceptor.clone()), &[])).await;
    create_tool(
        &plane,
        &token,
        "untrusted-starttls",
        tls_config(&untrusted_starttls, "starttls"),
    )
    .await;
    let id = notify("untrusted-starttls").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    let error = failed.last_error.unwrap();
    assert!(error.contains("STARTTLS"), "{error}");
    assert!(plain.received.try_recv().is_err());
    assert!(untrusted.received.try_recv().is_err());
    assert!(untrusted_starttls.received.try_recv().is_err());
    plane.stop().await;
}

#[tokio::test]
async fn a_server_that_never_ends_its_reply_is_cut_off_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let plane = start_plane(dir.path(), 1, Vec::new()).await;
    let token = plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    // A "server" that sends an endless greeting line.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let flood = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            connections.spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                let _ = tcp.write_all(b"220-").await;
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    create_tool(
        &plane,
        &token,
        "flood",
        json!({"host": "127.0.0.1", "port": port, "security": "none",
               "from": "cron@example.com", "to": "ops@example.com"}),
    )
    .await;
    let id = crate::tools::notify(plane.state(), &owner, "flood", None, "x", None)
        .await
        .unwrap()
        .unwrap();
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 2);
    let error = failed.last_error.unwrap();
    assert!(error.contains("more than 1048576 bytes"), "{error}");
    flood.abort();
    plane.stop().await;
}

#[tokio::test]
async fn the_email_migration_keeps_tools_and_their_notifications() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::str::FromStr;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cronium.db");
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .unwrap()
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    // The database as it was before 0015, with a tool and a notification through it.
    let mut before = sqlx::migrate!("../migrations/sqlite");
    before.migrations = std::borrow::Cow::Owned(
        before
            .migrations
            .iter()
            .filter(|migration| migration.version < 15)
            .cloned()
            .collect(),
    );
    before.run(&pool).await.unwrap();
    for statement in [
        "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'alice', 'x', 'user', 0)",
        "INSERT INTO tools VALUES ('t1', 'u1', 'hook', 'webhook', x'00', 'example.com', 0, 0)",
        "INSERT INTO notifications (id, owner_id, tool_id, tool_name, message, status, next_attempt_at, created_at)
         VALUES ('n1', 'u1', 't1', 'hook', 'hello', 'pending', 0, 0)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let refused =
        sqlx::query("INSERT INTO tools VALUES ('t2', 'u1', 'mail', 'email', x'00', 'h:587', 0, 0)")
            .execute(&pool)
            .await;
    assert!(refused.is_err(), "email was not a kind before 0015");
    pool.close().await;

    let store = crate::store::Store::open_sqlite(&path).await.unwrap();
    let tool = store.tool("t1").await.unwrap();
    assert_eq!((tool.name.as_str(), tool.kind), ("hook", ToolKind::Webhook));
    assert_eq!(
        store.notification("n1").await.unwrap().tool_id.as_deref(),
        Some("t1")
    );
    let sealed = || crate::store::tools::SealedConfig {
        sealed: b"sealed".to_vec(),
        target_host: "smtp.example.com:587".into(),
    };
    let mail = store
        .create_tool("u1", "mail", ToolKind::Email, sealed())
        .await
        .unwrap();
    assert_eq!(mail.kind, ToolKind::Email);
    // Still one name per owner, and the notifications' foreign key still works.
    assert!(
        store
            .create_tool("u1", "mail", ToolKind::Email, sealed())
            .await
            .is_err()
    );
    store.delete_tool("t1").await.unwrap();
    let notification = store.notification("n1").await.unwrap();
    assert_eq!(notification.tool_id, None);
    assert_eq!(notification.status, NotificationStatus::Failed);
}
