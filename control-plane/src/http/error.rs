//! The one error type of the HTTP API: `{"error": {"code", "message", "field"?}}` with a status.
//! Internal errors are logged with their cause and answered with a generic message, never
//! with their text (which could carry SQL or a secret).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::store::StoreError;

/// An error answer of the API.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed; `field` names the culprit when known.
    BadRequest {
        field: Option<String>,
        message: String,
    },
    /// 401: no or invalid credentials.
    Unauthorized,
    /// 403: authenticated but not allowed.
    Forbidden(String),
    /// 404: no such object (or not visible to the caller).
    NotFound(&'static str),
    /// 409: conflicts with the current state.
    Conflict(String),
    /// 413: the body is too large.
    PayloadTooLarge,
    /// 422: well-formed but semantically invalid; `field` names the culprit.
    Unprocessable { field: String, message: String },
    /// 429: a limit is reached; the message names it.
    TooManyRequests(String),
    /// 503: the database is unavailable; nothing was done.
    Unavailable,
    /// 507: the database's disk is full; nothing was done.
    InsufficientStorage,
    /// 500: a bug or an unexpected failure; logged, not shown.
    Internal(anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::Unprocessable {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, field) = match self {
            ApiError::BadRequest { field, message } => {
                (StatusCode::BAD_REQUEST, "bad_request", message, field)
            }
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid credentials".into(),
                None,
            ),
            ApiError::Forbidden(message) => (StatusCode::FORBIDDEN, "forbidden", message, None),
            ApiError::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
                None,
            ),
            ApiError::Conflict(message) => (StatusCode::CONFLICT, "conflict", message, None),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is too large".into(),
                None,
            ),
            ApiError::Unprocessable { field, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                message,
                Some(field),
            ),
            ApiError::TooManyRequests(message) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                message,
                None,
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable; nothing was changed, retry later".into(),
                None,
            ),
            ApiError::InsufficientStorage => (
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "the database's disk is full; nothing was changed, retry after space is freed"
                    .into(),
                None,
            ),
            ApiError::Internal(error) => {
                tracing::error!(error = %format!("{error:#}"), "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".into(),
                    None,
                )
            }
        };
        let mut body = json!({"error": {"code": code, "message": message}});
        if let Some(field) = field {
            body["error"]["field"] = json!(field);
        }
        (status, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NotFound => ApiError::NotFound("object"),
            StoreError::Constraint(message) => ApiError::Conflict(if message.contains("UNIQUE") {
                "an object with this name already exists".into()
            } else {
                "the change conflicts with stored data".into()
            }),
            StoreError::Unavailable(error) => {
                tracing::warn!(%error, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::Full(error) => {
                tracing::error!(%error, "the database's disk is full");
                ApiError::InsufficientStorage
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> ApiError {
        ApiError::Internal(error)
    }
}

/// `axum::Json` with rejections turned into [`ApiError`]s that name the problem.
pub struct ApiJson<T>(pub T);

/// `Option<ApiJson<T>>`: `None` for a request without a body (no `Content-Type` and no length),
/// for routes whose body is optional.
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let headers = request.headers();
        let empty = !headers.contains_key(axum::http::header::CONTENT_TYPE)
            && headers
                .get(axum::http::header::CONTENT_LENGTH)
                .is_none_or(|length| length.as_bytes() == b"0");
        if empty {
            return Ok(None);
        }
        <ApiJson<T> as FromRequest<S>>::from_request(request, state)
            .await
            .map(Some)
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonDataError(error)) => {
                // serde's message names the field and what was expected.
                let message = error.body_text();
                let field = message.split('`').nth(1).map(str::to_string);
                Err(ApiError::BadRequest {
                    field,
                    message: message.replace(
                        "Failed to deserialize the JSON body into the target type: ",
                        "",
                    ),
                })
            }
            Err(JsonRejection::JsonSyntaxError(error)) => Err(ApiError::bad_request(format!(
                "malformed JSON: {}",
                error.body_text()
            ))),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::bad_request(
                "expected Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(error))
                if error.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge)
            }
            Err(other) => Err(ApiError::bad_request(other.body_text())),
        }
    }
}
