//! Tests of secrets across modules: events' secret environment variables through the real
//! router (write-only, PATCH semantics, validation), and `cronium keys rotate` against a real
//! database (every sealed kind re-encrypted, the old key refused afterwards, a wrong key or a
//! running control plane refused without a change).

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

fn config(dir: &std::path::Path, key: &str) -> ServerConfig {
    ServerConfig::for_tests(dir, key)
}

async fn start(dir: &std::path::Path, key: &str) -> anyhow::Result<Running> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::start(config(dir, key), CancellationToken::new()).await
}

async fn stop(running: Running) {
    running.state.shutdown.cancel();
    running.wait().await;
}

async fn admin_token(running: &Running) -> String {
    let store = &running.state.store;
    if store.user_with_password("root").await.unwrap().is_none() {
        store
            .create_user("root", "unused", Role::Admin)
            .await
            .unwrap();
    }
    crate::cli::create_api_token(store, "root", "test")
        .await
        .unwrap()
}

async fn send(
    running: &Running,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("/api/v1{path}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = crate::http::router(running.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 4 * 1024 * 1024)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An enrolled agent (rows only; nothing connects).
async fn agent(running: &Running) -> String {
    running.state.store.enroll_test_agent("a1").await.id
}

const CANARY: &str = "canary-7f3a9c1e-secret";

#[tokio::test]
async fn secret_env_is_write_only_and_patched_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), &EncryptionKey::generate_base64())
        .await
        .unwrap();
    secret_env_through_the_api(running).await;
}

/// The same through a control plane whose database is PostgreSQL (a throwaway cluster): the
/// whole start-up (migrations, key check, admin, CA) and the API's writes and reads on it.
#[tokio::test]
async fn secret_env_is_write_only_and_patched_by_name_on_postgres() {
    let cluster = tokio::task::spawn_blocking(cronium_e2e::postgres::PgCluster::start)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ServerConfig {
        database_url: Some(url),
        ..config(dir.path(), &EncryptionKey::generate_base64())
    };
    let running = crate::start(config, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        running.state.store.backend(),
        crate::store::Backend::Postgres
    );
    assert!(
        !dir.path().join("cronium.db").exists(),
        "no SQLite file is created"
    );
    secret_env_through_the_api(running).await;
}

async fn secret_env_through_the_api(running: Running) {
    let token = admin_token(&running).await;
    let (status, created) = send(
        &running,
        Method::POST,
        "/events",
        &token,
        Some(json!({
            "name": "deploy", "kind": "bash", "script": "true", "env": {"PLAIN": "visible"},
            "secret_env": {"B_TOKEN": CANARY, "A_PASS": format!("{CANARY}-2")},
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["secret_env_names"], json!(["A_PASS", "B_TOKEN"]));
    assert!(created.get("secret_env").is_none(), "{created}");
    assert!(!created.to_string().contains(CANARY), "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    // Stored sealed: the raw rows never hold the value.
    let sealed = running
        .state
        .store
        .event_secret_env_names(&id)
        .await
        .unwrap();
    assert_eq!(sealed, ["A_PASS", "B_TOKEN"]);

    // PATCH: a given name is replaced, null deletes, others are kept, other fields untouched.
    let (status, patched) = send(
        &running,
        Method::PATCH,
        &format!("/events/{id}"),
        &token,
        Some(json!({"secret_env": {"A_PASS": null, "C_KEY": "another-secret-value"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["secret_env_names"], json!(["B_TOKEN", "C_KEY"]));
    assert_eq!(patched["env"], json!({"PLAIN": "visible"}));
    let (status, patched) = send(
        &running,
        Method::PATCH,
        &format!("/events/{id}"),
        &token,
        Some(json!({"script": "echo changed"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["secret_env_names"], json!(["B_TOKEN", "C_KEY"]));

    for path in [format!("/events/{id}"), "/events".to_owned()] {
        let (status, shown) = send(&running, Method::GET, &path, &token, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!shown.to_string().contains(CANARY), "{shown}");
        assert!(!shown.to_string().contains("another-secret"), "{shown}");
    }

    // The value that is kept still opens to what was given.
    let agent_id = agent(&running).await;
    let (status, run) = send(
        &running,
        Method::POST,
        &format!("/events/{id}/runs"),
        &token,
        Some(json!({"targets": {"agents": [agent_id]}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let claimed = running
        .state
        .store
        .claim_jobs(&agent_id, 1, crate::store::now_ms() + 60_000)
        .await
        .unwrap();
    let opened =
        crate::http::events::open_secret_env(&running.state.key, &claimed[0].secret_env).unwrap();
    assert_eq!(
        opened,
        [
            ("B_TOKEN".to_owned(), CANARY.to_owned()),
            ("C_KEY".to_owned(), "another-secret-value".to_owned())
        ]
    );
    assert!(!format!("{:?}", claimed[0]).contains(CANARY));

    // Bad input: named field, never the value in the message.
    let cases = [
        json!({"secret_env": {"PLAIN": CANARY}}),
        json!({"env": {"B_TOKEN": "x"}}),
        json!({"secret_env": {"1BAD": CANARY}}),
        json!({"secret_env": {"CRONIUM_X": CANARY}}),
        json!({"secret_env": {"NUM": 12345678}}),
        json!({"secret_env": {"BIG": "x".repeat(crate::http::events::MAX_SECRET_VALUE_BYTES + 1)}}),
        json!({"secret_env": (0..=crate::http::events::MAX_SECRET_ENV)
            .map(|i| (format!("S{i}"), json!("v")))
            .collect::<serde_json::Map<_, _>>()}),
    ];
    for body in cases {
        let (status, answer) = send(
            &running,
            Method::PATCH,
            &format!("/events/{id}"),
            &token,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        let field = answer["error"]["field"].as_str().unwrap_or_default();
        assert!(field == "secret_env" || field == "env", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains(CANARY) && !message.contains("12345678"),
            "{answer}"
        );
    }
    let (_, unchanged) = send(
        &running,
        Method::GET,
        &format!("/events/{id}"),
        &token,
        None,
    )
    .await;
    assert_eq!(unchanged["secret_env_names"], json!(["B_TOKEN", "C_KEY"]));
    stop(running).await;
}

/// Runs `cronium keys rotate` with these arguments (after `--data-dir DIR`, and the
/// `--database-url` of `DIR`'s control plane when the tests run on PostgreSQL).
async fn rotate(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec![
        "cronium".to_owned(),
        "keys".to_owned(),
        "rotate".to_owned(),
        "--data-dir".to_owned(),
        dir.display().to_string(),
    ];
    if let Some(url) =
        crate::ServerConfig::for_tests(dir, &EncryptionKey::generate_base64()).database_url
    {
        args.extend(["--database-url".to_owned(), url]);
    }
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let cli = crate::cli::Cli::try_parse_from(args)?;
    crate::cli::dispatch_for_tests(cli).await
}

#[tokio::test]
async fn rotation_re_encrypts_every_secret_and_the_old_key_is_refused_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("encryption.key");
    let old = EncryptionKey::generate_base64();
    std::fs::write(&key_file, &old).unwrap();
    let key_arg = key_file.display().to_string();

    let running = start(dir.path(), &old).await.unwrap();
    let token = admin_token(&running).await;
    let (status, server) = send(
        &running,
        Method::POST,
        "/servers",
        &token,
        Some(json!({"name": "db1", "connection": "ssh", "ssh": {
            "host": "192.0.2.10", "port": 22, "username": "deploy", "auth": "password",
            "password": "ssh-password-canary"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{server}");
    let (status, tool) = send(
        &running,
        Method::POST,
        "/tools",
        &token,
        Some(json!({"name": "hook", "kind": "webhook",
            "config": {"url": "https://hooks.example/abc", "secret": "tool-signing-canary"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{tool}");
    let (status, _) = send(
        &running,
        Method::PUT,
        "/variables/deploy.key",
        &token,
        Some(json!({"value": {"k": "variable-canary"}})),
    )
    .await;
    assert!(status.is_success(), "{status}");
    let agent_id = agent(&running).await;
    // The CA (sealed in the database since migration 0024) survives the rotation.
    let ca_before = running.ca_sha256();
    let (status, event) = send(
        &running,
        Method::POST,
        "/events",
        &token,
        Some(json!({"name": "e", "kind": "bash", "script": "true",
            "targets": {"agents": [agent_id]}, "secret_env": {"TOKEN": CANARY}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let event_id = event["id"].as_str().unwrap().to_owned();
    let (status, workflow) = send(
        &running,
        Method::POST,
        "/workflows",
        &token,
        Some(
            json!({"name": "w", "nodes": [{"id": "e", "event_id": event_id}], "edges": [],
            "trigger": {"webhook": true}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{workflow}");
    let (status, _) = send(
        &running,
        Method::POST,
        &format!("/events/{event_id}/runs"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // Refused while the control plane runs; nothing changes.
    let error = rotate(dir.path(), &["--current-key-file", &key_arg])
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("control plane is running"),
        "{error:#}"
    );
    stop(running).await;

    // A wrong current key is refused and changes nothing (no staged file either).
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, EncryptionKey::generate_base64()).unwrap();
    let error = rotate(
        dir.path(),
        &["--current-key-file", &wrong.display().to_string()],
    )
    .await
    .unwrap_err();
    assert!(format!("{error:#}").contains("does not match"), "{error:#}");
    assert!(!dir.path().join("wrong.key.new").exists());
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), old);

    // The rotation with a given new key.
    let new_file = dir.path().join("next.key");
    let new = EncryptionKey::generate_base64();
    std::fs::write(&new_file, format!("{new}\n")).unwrap();
    rotate(
        dir.path(),
        &[
            "--current-key-file",
            &key_arg,
            "--new-key-file",
            &new_file.display().to_string(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), new);
    let backups: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("encryption.key.before-rotation-")
        })
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(backups[0].path()).unwrap(), old);
    assert!(!dir.path().join("encryption.key.new").exists());

    // The old key no longer starts the control plane.
    let error = start(dir.path(), &old).await.err().unwrap();
    assert!(
        format!("{error:#}").contains("ENCRYPTION_KEY does not match"),
        "{error:#}"
    );

    // The new key opens everything.
    let running = start(dir.path(), &new).await.unwrap();
    assert_eq!(running.ca_sha256(), ca_before);
    let key = running.state.key.clone();
    let store = &running.state.store;
    let server = store.server(server["id"].as_str().unwrap()).await.unwrap();
    let secrets = crate::ssh::SshSecrets::open(&key, &server.ssh.unwrap().secrets).unwrap();
    assert_eq!(secrets.password.as_deref(), Some("ssh-password-canary"));
    assert!(tool["id"].is_string());
    let old_key = EncryptionKey::from_base64(&old).unwrap();
    let mut opened_kinds = Vec::new();
    for column in crate::store::secrets::SEALED_COLUMNS {
        let values = store.sealed_values_for_tests(column).await.unwrap();
        assert!(!values.is_empty(), "no {} to check", column.kind);
        for sealed in values {
            assert!(key.open(&sealed).is_ok(), "{} does not open", column.kind);
            assert!(
                old_key.open(&sealed).is_err(),
                "{} still opens with the old key",
                column.kind
            );
            if column.table == "tools" {
                let config = crate::tools::ToolConfig::open(&sealed, &key).unwrap();
                assert_eq!(config.secret.as_deref(), Some("tool-signing-canary"));
            }
        }
        opened_kinds.push(column.kind);
    }
    assert_eq!(
        opened_kinds.len(),
        crate::store::secrets::SEALED_COLUMNS.len()
    );
    let (status, variable) =
        send(&running, Method::GET, "/variables/deploy.key", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{variable}");
    assert_eq!(variable["value"], json!({"k": "variable-canary"}));
    let claimed = store
        .claim_jobs(&agent_id, 1, crate::store::now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        crate::http::events::open_secret_env(&key, &claimed[0].secret_env).unwrap(),
        [("TOKEN".to_owned(), CANARY.to_owned())]
    );
    // The event's own copy too: a new run gets it.
    let (status, _) = send(
        &running,
        Method::POST,
        &format!("/events/{event_id}/runs"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let claimed = store
        .claim_jobs(&agent_id, 1, crate::store::now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        crate::http::events::open_secret_env(&key, &claimed[0].secret_env).unwrap(),
        [("TOKEN".to_owned(), CANARY.to_owned())]
    );
    stop(running).await;
}

#[tokio::test]
async fn every_sealed_column_of_the_schema_is_rotated() {
    // A new sealed column must be listed in SEALED_COLUMNS; this finds BLOB columns whose name
    // says they are sealed (or secret) and checks they are.
    // With CRONIUM_TEST_DATABASE=postgres: the BYTEA columns of the PostgreSQL schema.
    let (_db, store) = crate::store::test_db::open_test_store().await;
    let columns = store.blob_columns_for_tests().await.unwrap();
    let listed: Vec<(String, String)> = crate::store::secrets::SEALED_COLUMNS
        .iter()
        .map(|column| (column.table.to_owned(), column.column.to_owned()))
        .collect();
    for (table, column) in &columns {
        let looks_sealed = ["sealed", "secret", "config"]
            .iter()
            .any(|word| column.contains(word));
        if looks_sealed {
            assert!(
                listed.contains(&(table.clone(), column.clone())),
                "{table}.{column} looks sealed but is not in SEALED_COLUMNS"
            );
        }
    }
    for listed in &listed {
        assert!(columns.contains(listed), "{listed:?} is not a BLOB column");
    }
    store.close().await;
}
