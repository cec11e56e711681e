//! The internal routes of the terminal relay between replicas (`http::terminal_relay`) through
//! the real router: nothing but a genuine, fresh, unused relay token for this replica gets past
//! the 401, and a token that does opens nothing by itself (here the agent is not connected).

use axum::body::Body;
use axum::http::{Request, StatusCode};

use super::{Api, api};
use crate::store::now_ms;
use crate::terminals::relay_token::{Grant, HEADER, RelayAuth};

/// `GET path` with `token` in the relay header (none when `None`).
async fn get(api: &Api, path: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().uri(path);
    if let Some(token) = token {
        request = request.header(HEADER, token);
    }
    let (status, _, body) = api.call(request.body(Body::empty()).unwrap()).await;
    (status, body)
}

#[tokio::test]
async fn only_a_fresh_unused_relay_token_for_this_replica_passes() {
    let api = api().await;
    let state = api.state();
    let store = &state.store;
    let agent = store.enroll_test_agent("relayed").await;
    api.token("admin-relay", crate::store::users::Role::Admin)
        .await;
    let admin = store
        .user_with_password("admin-relay")
        .await
        .unwrap()
        .unwrap()
        .0;
    let this = state.replicas.id().to_owned();
    let auth = state.terminals.relay_auth();
    let terminal = Grant::Terminal {
        agent: agent.id.clone(),
        user: admin.id.clone(),
        session: None,
        cols: 80,
        rows: 24,
    };
    let relay = "/api/v1/internal/terminals/relay";
    let now = now_ms();

    let forged_key = RelayAuth::random().mint(&this, terminal.clone(), now);
    let expired = auth.mint(&this, terminal.clone(), now - 60_000);
    let other_replica = auth.mint("replica-elsewhere", terminal.clone(), now);
    let genuine = auth.mint(&this, terminal.clone(), now);
    let (payload, _) = genuine.split_once('.').unwrap();
    let unsigned = format!("{payload}.");
    for (what, token) in [
        ("no token", None),
        ("garbage", Some("not-a-token")),
        ("another key", Some(forged_key.as_str())),
        ("expired", Some(expired.as_str())),
        ("another replica's", Some(other_replica.as_str())),
        ("no signature", Some(unsigned.as_str())),
    ] {
        let (status, body) = get(&api, relay, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
    // The API's own credentials are no use on the internal route.
    let admin_token = api
        .token("admin-relay", crate::store::users::Role::Admin)
        .await;
    let (status, _) = api
        .send(axum::http::Method::GET, relay, Some(&admin_token), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The genuine token passes the check: the agent is not connected here, so 409, and nothing
    // was opened. Used once, it is refused afterwards.
    let (status, body) = get(&api, relay, Some(&genuine)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = get(&api, relay, Some(&genuine)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a replayed token");

    // A terminal token does not read recordings, nor a recording token open terminals.
    let recording = "/api/v1/internal/terminals/recording";
    let wrong_purpose = auth.mint(&this, terminal.clone(), now);
    let (status, _) = get(&api, recording, Some(&wrong_purpose)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let session = "0123456789abcdef0123456789abcdef".to_owned();
    let reading = Grant::Recording {
        session: session.clone(),
        user: admin.id.clone(),
    };
    let wrong_purpose = auth.mint(&this, reading.clone(), now);
    let (status, _) = get(&api, relay, Some(&wrong_purpose)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&api, recording, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let expired = auth.mint(&this, reading.clone(), now - 60_000);
    let (status, _) = get(&api, recording, Some(&expired)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A genuine one for a session that does not exist: 404.
    let genuine = auth.mint(&this, reading, now);
    let (status, _) = get(&api, recording, Some(&genuine)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Attaching to a session that is not open on that agent: 404 before anything is reached.
    let attach = auth.mint(
        &this,
        Grant::Terminal {
            agent: agent.id.clone(),
            user: admin.id.clone(),
            session: Some(session),
            cols: 80,
            rows: 24,
        },
        now,
    );
    let (status, _) = get(&api, relay, Some(&attach)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // No session was recorded by any of it.
    assert!(store.terminal_sessions(None, 10).await.unwrap().is_empty());
}
