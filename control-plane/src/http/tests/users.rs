//! `/users`, `/tokens` and the enrollment-token list through the real router: roles (viewers and
//! users get 403 on admin routes), the last admin, tokens that only their owner lists and
//! revokes, passwords that really log in, and field errors.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};

use super::{Api, api, assert_error_shape};
use crate::store::users::Role;

async fn login(api: &Api, username: &str, password: &str) -> StatusCode {
    let request = Request::post("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"username": username, "password": password}).to_string(),
        ))
        .unwrap();
    api.call(request).await.0
}

fn id_of(users: &Value, username: &str) -> String {
    users
        .as_array()
        .unwrap()
        .iter()
        .find(|user| user["username"] == username)
        .unwrap_or_else(|| panic!("{username} not in {users}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn admins_manage_users_and_nobody_else_can() {
    let api = api().await;
    let admin = api.token("root", Role::Admin).await;
    let user = api.token("uma", Role::User).await;
    let viewer = api.token("vic", Role::Viewer).await;

    // Viewers and users are refused on every admin route.
    for token in [&user, &viewer] {
        for (method, path, body) in [
            (Method::GET, "/api/v1/users", None),
            (
                Method::POST,
                "/api/v1/users",
                Some(r#"{"username":"x","password":"long enough","role":"user"}"#),
            ),
            (
                Method::PATCH,
                "/api/v1/users/whatever",
                Some(r#"{"role":"admin"}"#),
            ),
            (Method::DELETE, "/api/v1/users/whatever", None),
            (Method::GET, "/api/v1/enrollment-tokens", None),
            (Method::DELETE, "/api/v1/enrollment-tokens/whatever", None),
        ] {
            let (status, body) = api.send(method.clone(), path, Some(token), body).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert_error_shape(&body);
        }
    }
    let (_, users) = api
        .send(Method::GET, "/api/v1/users", Some(&user), None)
        .await;
    assert!(users.get("error").is_some());

    // Bad input names its field and stores nothing.
    for (body, field) in [
        (
            json!({"password": "long enough", "role": "user"}),
            "username",
        ),
        (
            json!({"username": "bad name", "password": "long enough", "role": "user"}),
            "username",
        ),
        (
            json!({"username": "ann", "password": "short", "role": "user"}),
            "password",
        ),
        (
            json!({"username": "ann", "password": "long enough", "role": "root"}),
            "role",
        ),
    ] {
        let (status, answer) = api
            .send(
                Method::POST,
                "/api/v1/users",
                Some(&admin),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
        assert!(!answer.to_string().contains("long enough"), "{answer}");
    }

    // Create, then the new user logs in with that password.
    let (status, created) = api
        .send(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(r#"{"username":"ann","password":"ann's password","role":"viewer"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["role"], "viewer");
    assert!(created.get("password").is_none() && !created.to_string().contains("argon2"));
    let ann = created["id"].as_str().unwrap().to_string();
    assert_eq!(login(&api, "ann", "ann's password").await, StatusCode::OK);
    let (status, _) = api
        .send(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(r#"{"username":"ann","password":"another one","role":"user"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Change the role and reset the password: the old password stops working.
    let (status, changed) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{ann}"),
            Some(&admin),
            Some(r#"{"role":"user","password":"a new password"}"#),
        )
        .await;
    assert_eq!((status, &changed["role"]), (StatusCode::OK, &json!("user")));
    assert_eq!(
        login(&api, "ann", "ann's password").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login(&api, "ann", "a new password").await, StatusCode::OK);

    // The first start made an `admin`; with it deleted, root is the only admin, who can be
    // neither demoted nor deleted, and nobody deletes themselves.
    let (_, users) = api
        .send(Method::GET, "/api/v1/users", Some(&admin), None)
        .await;
    assert_eq!(users.as_array().unwrap().len(), 5, "{users}");
    let first = id_of(&users, "admin");
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{first}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, users) = api
        .send(Method::GET, "/api/v1/users", Some(&admin), None)
        .await;
    assert_eq!(users.as_array().unwrap().len(), 4, "{users}");
    let root = id_of(&users, "root");
    let (status, answer) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{root}"),
            Some(&admin),
            Some(r#"{"role":"user"}"#),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("role"))
    );
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{root}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // With a second admin, the first may be demoted, and then the second is the last one.
    let (status, _) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{ann}"),
            Some(&admin),
            Some(r#"{"role":"admin"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let ann_token = crate::cli::create_api_token(&api.state().store, "ann", "t")
        .await
        .unwrap();
    let (status, _) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{root}"),
            Some(&ann_token),
            Some(r#"{"role":"viewer"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{ann}"),
            Some(&ann_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    // The demoted admin lost the admin routes at once.
    let (status, _) = api
        .send(Method::GET, "/api/v1/users", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A user who owns events cannot be deleted until they are gone; then their token dies too.
    let uma = id_of(&users, "uma");
    let (status, _) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&user),
            Some(r#"{"name":"e","kind":"bash","script":"true"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, answer) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{uma}"),
            Some(&ann_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let vic = id_of(&users, "vic");
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{vic}"),
            Some(&ann_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .send(Method::GET, "/api/v1/auth/me", Some(&viewer), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/users/{vic}"),
            Some(&ann_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn api_tokens_are_shown_once_listed_by_their_owner_and_revoked_only_by_them() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    let viewer = api.token("vic", Role::Viewer).await;

    let (status, created) = api
        .send(
            Method::POST,
            "/api/v1/tokens",
            Some(&alice),
            Some(r#"{"name":"ci deploys"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(token.starts_with("crt_"));
    // The new token works, and using it sets "last used".
    let (status, me) = api
        .send(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!((status, &me["username"]), (StatusCode::OK, &json!("alice")));
    let (_, listed) = api
        .send(Method::GET, "/api/v1/tokens", Some(&alice), None)
        .await;
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mine = listed
        .iter()
        .find(|entry| entry["id"] == id.as_str())
        .unwrap();
    assert_eq!(mine["name"], "ci deploys");
    assert!(mine["last_used_at"].is_string(), "{mine}");
    assert!(mine.get("token").is_none());
    assert!(!Value::Array(listed.clone()).to_string().contains(&token));

    // Bob neither sees nor revokes Alice's token.
    let (_, bobs) = api
        .send(Method::GET, "/api/v1/tokens", Some(&bob), None)
        .await;
    assert!(
        bobs.as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["id"] != id.as_str()),
        "{bobs}"
    );
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .send(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // Viewers cannot create or revoke tokens; bad names are refused with the field.
    let (status, _) = api
        .send(
            Method::POST,
            "/api/v1/tokens",
            Some(&viewer),
            Some(r#"{"name":"x"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, answer) = api
        .send(
            Method::POST,
            "/api/v1/tokens",
            Some(&alice),
            Some(r#"{"name":"  "}"#),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("name"))
    );

    // Alice revokes it: it stops working and leaves her list.
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .send(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = api
        .send(Method::GET, "/api/v1/tokens", Some(&alice), None)
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
}

#[tokio::test]
async fn admins_list_and_revoke_usable_enrollment_tokens() {
    let api = api().await;
    let admin = api.token("root", Role::Admin).await;
    let (status, created) = api
        .send(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&admin),
            Some(r#"{"labels":{"env":"prod"},"uses":3}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = created["token"].as_str().unwrap().to_string();
    let (status, listed) = api
        .send(Method::GET, "/api/v1/enrollment-tokens", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["labels"], json!({"env": "prod"}));
    assert_eq!(listed[0]["uses_left"], 3);
    assert_eq!(listed[0]["created_by"], "root");
    assert!(!Value::Array(listed.clone()).to_string().contains(&secret));
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        created["id"],
        json!(id),
        "the creation answer names the token's id"
    );

    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, listed) = api
        .send(Method::GET, "/api/v1/enrollment-tokens", Some(&admin), None)
        .await;
    assert_eq!(listed, json!([]));
    // A revoked token enrolls nothing.
    let labels = crate::store::agents::Labels::new();
    let refused = api
        .state()
        .store
        .enroll_agent(crate::store::agents::NewAgent {
            token_sha256: &crate::crypto::sha256_hex(secret.as_bytes()),
            name: "h",
            extra_labels: &labels,
            hostname: "h",
            os: "linux",
            arch: "x86_64",
        })
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(crate::store::agents::TokenRefusal::UsedUp)),
        "{:?}",
        refused.map(|_| ())
    );
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
