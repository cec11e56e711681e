//! Authentication: API tokens (`Authorization: Bearer`), console sessions (cookie plus a CSRF
//! token on every state-changing request), login, logout and who is logged in, and password
//! hashing.

use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, PasswordHash};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, ApiJson, ApiResult};
use crate::AppState;
use crate::crypto::{random_token, sha256_hex};
use crate::store::users::{Role, User};

/// Name of the console's session cookie.
pub const SESSION_COOKIE: &str = "cronium_session";

/// Header carrying the CSRF token for cookie-authenticated state-changing requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/me", get(me))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub User);

impl CurrentUser {
    pub fn is_admin(&self) -> bool {
        self.0.role == Role::Admin
    }

    /// Refuses viewers (read-only).
    pub fn require_writer(&self) -> ApiResult<()> {
        if self.0.role == Role::Viewer {
            Err(ApiError::Forbidden("viewers cannot change anything".into()))
        } else {
            Ok(())
        }
    }

    /// Refuses everyone but admins.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this needs the admin role".into()))
        }
    }

    /// Whether the caller may see or use an object owned by `owner_id`.
    pub fn may_access(&self, owner_id: &str) -> bool {
        self.is_admin() || self.0.id == owner_id
    }

    /// An owned object as the caller may see it: a missing one and another user's are the same
    /// 404 (named `what`), so ids of other users' objects are never confirmed.
    pub fn visible<T>(
        &self,
        loaded: crate::store::StoreResult<T>,
        owner_of: impl Fn(&T) -> &str,
        what: &'static str,
    ) -> super::error::ApiResult<T> {
        match loaded {
            Ok(object) if self.may_access(owner_of(&object)) => Ok(object),
            Ok(_) | Err(crate::store::StoreError::NotFound) => {
                Err(super::error::ApiError::NotFound(what))
            }
            Err(error) => Err(error.into()),
        }
    }
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .ok_or(ApiError::Unauthorized)?;
            let token_sha256 = sha256_hex(token.trim().as_bytes());
            let user = state.store.user_by_api_token(&token_sha256).await?;
            let user = user.map(CurrentUser).ok_or(ApiError::Unauthorized)?;
            // For the owner's token list ("last used"); at most one write a minute per token. A
            // failure to record it does not fail the request.
            if let Err(error) = state.store.touch_api_token(&token_sha256).await {
                tracing::warn!(%error, "recording an API token's last use");
            }
            return Ok(user);
        }
        let cookie = session_cookie(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let session = state
            .store
            .session(&sha256_hex(cookie.as_bytes()))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe {
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("");
            if !constant_time_eq(presented.as_bytes(), session.csrf_token.as_bytes()) {
                return Err(ApiError::Forbidden("missing or invalid CSRF token".into()));
            }
        }
        Ok(CurrentUser(session.user))
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hashes a password with argon2id on a blocking thread.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| anyhow::anyhow!("hashing a password: {error}"))
    })
    .await?
}

async fn verify_password(password: String, hash: String) -> anyhow::Result<bool> {
    Ok(tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    username: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let found = state.store.user_with_password(&request.username).await?;
    // Hash even for unknown users so timing does not reveal which usernames exist.
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), hash),
        None => (None, "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$9sTbSlTio3Biev89thdrlKKiCaYsjjYVJxGAL3swxpQ".into()),
    };
    let valid = verify_password(request.password, hash).await?;
    let Some(user) = user.filter(|_| valid) else {
        return Err(ApiError::Unauthorized);
    };
    let token = random_token("");
    let csrf_token = random_token("");
    state
        .store
        .create_session(
            &user.id,
            &sha256_hex(token.as_bytes()),
            &csrf_token,
            SESSION_TTL_MS,
        )
        .await?;
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|proto| proto == "https")
        || state.config.public_url.starts_with("https://");
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if secure { "; Secure" } else { "" }
    );
    let body = json!({"csrf_token": csrf_token, "user": {"id": user.id, "username": user.username, "role": user.role.as_str()}});
    let mut response = (StatusCode::OK, Json(body)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(anyhow::Error::from)?,
    );
    Ok(response)
}

/// The caller. A console page that was reloaded has lost the CSRF token login gave it, so with a
/// session cookie (and no bearer token) the answer carries the session's token again; other
/// origins cannot read it (no CORS), and the cookie is `SameSite=Strict`.
async fn me(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
) -> ApiResult<Json<serde_json::Value>> {
    let csrf_token = match session_cookie(&headers) {
        Some(cookie) if !headers.contains_key(header::AUTHORIZATION) => state
            .store
            .session(&sha256_hex(cookie.as_bytes()))
            .await?
            .map(|session| session.csrf_token),
        _ => None,
    };
    let CurrentUser(user) = user;
    Ok(Json(json!({
        "id": user.id,
        "username": user.username,
        "role": user.role.as_str(),
        "csrf_token": csrf_token,
    })))
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    _user: CurrentUser,
) -> ApiResult<Response> {
    if let Some(cookie) = session_cookie(&headers) {
        state
            .store
            .delete_session(&sha256_hex(cookie.as_bytes()))
            .await?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("cronium_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(response)
}
