//! Unit tests of the helper endpoint: real Unix sockets, raw HTTP/1.1 requests.

use std::path::Path;

use cronium_protocol::{JobSpec, RuntimeSpec, ScriptKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::spool::{Spool, SpoolSpec};
use cronium_protocol::MAX_HELPER_NAME;

struct Fixture {
    _temp: tempfile::TempDir,
    spool: AttemptSpool,
    work_dir: PathBuf,
    spec: JobSpec,
}

fn fixture(input: Option<&str>) -> Fixture {
    let temp = tempfile::tempdir().unwrap();
    let spool = Spool::open(temp.path().join("spool")).unwrap();
    let spool = spool
        .create(
            &SpoolSpec {
                job_id: "job1".to_owned(),
                attempt: 2,
                run_id: "run1".to_owned(),
                event_id: "event1".to_owned(),
            },
            1 << 20,
        )
        .unwrap();
    let work_dir = temp.path().join("w");
    std::fs::create_dir(&work_dir).unwrap();
    let spec = JobSpec {
        job_id: "job1".to_owned(),
        attempt: 2,
        run_id: "run1".to_owned(),
        event_id: "event1".to_owned(),
        kind: ScriptKind::Bash,
        script: String::new(),
        env: Vec::new(),
        timeout_ms: 0,
        input: input.map(str::to_owned),
        runtime: RuntimeSpec::default(),
        secret_env: Default::default(),
    };
    Fixture {
        _temp: temp,
        spool,
        work_dir,
        spec,
    }
}

/// One request with `Connection: close`; returns the status and the body.
async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: cronium\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    // The server may answer (413) and close before it read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8(answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn socket_of(fixture: &Fixture) -> PathBuf {
    fixture.work_dir.join(HELPER_DIR).join(SOCKET_NAME)
}

#[tokio::test]
async fn answers_input_event_output_and_condition() {
    let fixture = fixture(Some(r#"{"n": 3}"#));
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let token = Some(server.token());
    assert_eq!(server.token().len(), 64);

    let (status, body) = call(&socket, "GET", "/v1/input", token, "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"n":3}"#));
    let (status, body) = call(&socket, "GET", "/v1/event", token, "").await;
    assert_eq!(status, 200);
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        event,
        json!({"job_id": "job1", "run_id": "run1", "event_id": "event1", "attempt": 2})
    );

    let (status, _) = call(&socket, "POST", "/v1/output", token, r#"{"value": 1}"#).await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &socket,
        "POST",
        "/v1/output",
        token,
        r#"{"value": {"a": [1, "x"]}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &socket,
        "POST",
        "/v1/condition",
        token,
        r#"{"value": true}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &socket,
        "POST",
        "/v1/condition",
        token,
        r#"{"value": "yes"}"#,
    )
    .await;
    assert_eq!(status, 400);
    let values = fixture.spool.helper_values();
    assert_eq!(values.output.as_deref(), Some(r#"{"a":[1,"x"]}"#));
    assert_eq!(values.condition, Some(true));
    // Stored in the spool, too.
    assert_eq!(
        std::fs::read_to_string(fixture.spool.dir().join("output.json")).unwrap(),
        r#"{"a":[1,"x"]}"#
    );
    assert_eq!(
        std::fs::read_to_string(fixture.spool.dir().join("condition")).unwrap(),
        "true"
    );
}

#[tokio::test]
async fn missing_input_is_null() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let (status, body) = call(
        &socket_of(&fixture),
        "GET",
        "/v1/input",
        Some(server.token()),
        "",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "null"));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let (status, _) = call(&socket, "GET", "/v1/input", None, "").await;
    assert_eq!(status, 401);
    let wrong = "0".repeat(64);
    let (status, body) = call(&socket, "GET", "/v1/input", Some(&wrong), "").await;
    assert_eq!(status, 401);
    assert!(body.contains("token"), "{body}");
    let (status, _) = call(
        &socket,
        "POST",
        "/v1/output",
        Some(&wrong),
        r#"{"value":1}"#,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(fixture.spool.helper_values(), Default::default());
    // A token of another attempt does not work either.
    let other = fixture_with_server(&fixture);
    let (status, _) = call(&socket, "GET", "/v1/input", Some(other.token()), "").await;
    assert_eq!(status, 401);
    drop(server);
}

fn fixture_with_server(fixture: &Fixture) -> HelperServer {
    let dir = fixture.work_dir.join("other");
    std::fs::create_dir(&dir).unwrap();
    HelperServer::start(
        &dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap()
}

#[tokio::test]
async fn bodies_are_bounded_and_bad_input_is_a_client_error() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let token = Some(server.token());
    let big = format!(r#"{{"value": "{}"}}"#, "x".repeat(MAX_BODY + 1));
    let (status, _) = call(&socket, "POST", "/v1/output", token, &big).await;
    assert_eq!(status, 413);
    for bad in ["", "not json", "[1]", r#"{"other": 1}"#] {
        let (status, body) = call(&socket, "POST", "/v1/output", token, bad).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    let (status, _) = call(&socket, "GET", "/v1/nothing", token, "").await;
    assert_eq!(status, 404);
    let (status, _) = call(&socket, "DELETE", "/v1/output", token, "").await;
    assert_eq!(status, 405);
    assert_eq!(fixture.spool.helper_values(), Default::default());
}

#[tokio::test]
async fn writes_made_while_the_link_is_down_are_queued_and_read_back() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let token = Some(server.token());
    for (path, body) in [
        ("/v1/variables/set", r#"{"name": "a", "value": {"n": 1}}"#),
        (
            "/v1/variables/set",
            r#"{"name": "b", "text": "plain words"}"#,
        ),
        (
            "/v1/notify",
            r#"{"message": "m", "tool": "ops", "title": "t"}"#,
        ),
    ] {
        let (status, answer) = call(&socket, "POST", path, token, body).await;
        assert_eq!(
            (status, answer.as_str()),
            (202, r#"{"ok":true,"queued":true}"#),
            "{path}"
        );
    }
    // The script reads its own writes while they wait for the link.
    let (status, answer) = call(
        &socket,
        "POST",
        "/v1/variables/get",
        token,
        r#"{"name": "a"}"#,
    )
    .await;
    assert_eq!((status, answer.as_str()), (200, r#"{"value":{"n":1}}"#));
    let (status, answer) = call(
        &socket,
        "POST",
        "/v1/variables/get",
        token,
        r#"{"name": "b", "format": "text"}"#,
    )
    .await;
    assert_eq!((status, answer.as_str()), (200, "plain words"));
    // A variable nobody set here needs the control plane.
    let (status, answer) = call(
        &socket,
        "POST",
        "/v1/variables/get",
        token,
        r#"{"name": "c"}"#,
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("unreachable"), "{answer}");

    // Everything is in the journal, in order, and survives a reload.
    let journal = crate::helper::journal::HelperJournal::load(fixture.spool.dir()).unwrap();
    assert_eq!(
        journal.next_pending(),
        Some((
            1,
            HelperRequest::SetVariable {
                name: "a".into(),
                value_json: r#"{"n":1}"#.into()
            }
        ))
    );
    assert_eq!(
        journal.pending_value("b").as_deref(),
        Some(r#""plain words""#)
    );
    assert_eq!(
        journal
            .append(HelperRequest::GetVariable { name: "x".into() })
            .unwrap(),
        4
    );
}

#[tokio::test]
async fn forwarded_calls_check_their_input() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let token = Some(server.token());
    let long_name = format!(
        r#"{{"name": "{}", "value": 1}}"#,
        "n".repeat(MAX_HELPER_NAME + 1)
    );
    for (path, body) in [
        ("/v1/variables/set", r#"{"name": 1}"#),
        ("/v1/variables/set", r#"{"name": "has space", "value": 1}"#),
        ("/v1/variables/set", r#"{"name": "", "value": 1}"#),
        ("/v1/variables/set", long_name.as_str()),
        ("/v1/variables/set", r#"{"name": "a"}"#),
        ("/v1/variables/get", r#"{"name": "a/b"}"#),
        ("/v1/variables/get", r#"{"name": "a", "format": "xml"}"#),
        ("/v1/notify", r#"{"message": ""}"#),
        ("/v1/notify", r#"{"message": "m", "tool": 3}"#),
        ("/v1/notify", r#"{"message": "m", "colour": "red"}"#),
        (
            "/v1/notify",
            r#"{"message": "m", "tool": "no spaces please"}"#,
        ),
    ] {
        let (status, answer) = call(&socket, "POST", path, token, body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
    }
    let big = format!(
        r#"{{"name": "a", "value": "{}"}}"#,
        "x".repeat(cronium_protocol::MAX_HELPER_VALUE)
    );
    let (status, _) = call(&socket, "POST", "/v1/variables/set", token, &big).await;
    assert_eq!(status, 413);
    let (status, _) = call(&socket, "POST", "/v1/event/trigger", token, "{}").await;
    assert_eq!(status, 404);
    assert!(!fixture.spool.journal().has_pending());
}

#[test]
fn shell_values_are_json_when_they_parse() {
    assert_eq!(value_from_text("12"), json!(12));
    assert_eq!(value_from_text(r#"{"a":true}"#), json!({"a": true}));
    assert_eq!(value_from_text(r#""quoted""#), json!("quoted"));
    assert_eq!(value_from_text("plain text"), json!("plain text"));
    assert_eq!(value_from_text(""), json!(""));
}

#[tokio::test]
async fn the_socket_is_gone_after_the_attempt() {
    let fixture = fixture(None);
    let server = HelperServer::start(
        &fixture.work_dir,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    let socket = socket_of(&fixture);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(fixture.work_dir.join(HELPER_DIR))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    drop(server);
    assert!(!socket.exists());
    assert!(UnixStream::connect(&socket).await.is_err());
}

#[tokio::test]
async fn long_work_dirs_bind_through_proc() {
    let fixture = fixture(None);
    let deep = fixture.work_dir.join("d".repeat(60)).join("e".repeat(60));
    std::fs::create_dir_all(&deep).unwrap();
    let server = HelperServer::start(
        &deep,
        &fixture.spec,
        fixture.spool.clone(),
        false,
        HelperLink::offline(),
    )
    .unwrap();
    assert_eq!(server.client_path(), ".cronium/helper.sock");
    assert!(deep.join(HELPER_DIR).join(SOCKET_NAME).exists());
    drop(server);
    assert!(!deep.join(HELPER_DIR).join(SOCKET_NAME).exists());
}

#[test]
fn libraries_are_written() {
    let temp = tempfile::tempdir().unwrap();
    write_libraries(temp.path(), false).unwrap();
    for name in ["cronium.sh", "cronium.py", "cronium.js"] {
        let metadata = std::fs::metadata(temp.path().join(name)).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "{name}");
        assert!(metadata.len() > 0);
    }
}
