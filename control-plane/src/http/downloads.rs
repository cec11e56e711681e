//! Unauthenticated downloads: `GET /install.sh` (the one-line installer, templated with this
//! control plane's public URL, CA fingerprint and release public key),
//! `GET /downloads/release-key` (the release public key, PEM) and
//! `GET /downloads/agent/{version}/{target}/{file}` (a signed agent release from the releases
//! dir; `latest` is the highest version that has the target). Only the four files of a release
//! are ever served, and only from `<version>/<target>/` of the releases dir; nothing there is
//! secret (the private key never lives in it).

use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::AppState;
use crate::release::{self, PublicKey, RELEASE_FILES};

/// The installer's template (POSIX sh).
const INSTALL_TEMPLATE: &str = include_str!("../../../packaging/install.sh");

/// The systemd unit the installer writes.
const SERVICE_UNIT: &str = include_str!("../../../packaging/cronium-agent.service");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/install.sh", get(install_script))
        .route("/downloads/release-key", get(release_key))
        .route(
            "/downloads/agent/{version}/{target}/{file}",
            get(agent_file),
        )
}

/// An error answer in the API's shape.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// Where the release public key is: `--release-key`, else `<releases dir>/release-key.pub`.
pub(crate) fn release_key_path(state: &AppState) -> PathBuf {
    state
        .config
        .release_public_key
        .clone()
        .unwrap_or_else(|| state.config.releases_dir.join(release::PUBLIC_KEY_FILE))
}

/// The release public key: `--release-key`, else `<releases dir>/release-key.pub`; read on each
/// request, so a key published while the control plane runs is picked up.
fn public_key(state: &AppState) -> Result<PublicKey, Box<Response>> {
    let path = release_key_path(state);
    if !path.exists() {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_release_key",
            "this control plane has no release public key (cronium serve --release-key FILE, or publish a release with `cronium release publish`)",
        )));
    }
    PublicKey::load(&path).map_err(|problem| {
        tracing::warn!(
            path = %path.display(),
            error = %format!("{problem:#}"),
            "unusable release public key"
        );
        Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_release_key",
            "the release public key of this control plane is unusable (see its log)",
        ))
    })
}

/// Quotes `value` for a POSIX shell single-quoted string.
fn shell_quote(value: &str) -> String {
    value.replace('\'', r"'\''")
}

/// The installer, with this control plane's settings filled in.
pub fn render_install_script(state: &AppState, key: &PublicKey) -> String {
    INSTALL_TEMPLATE
        .replace("@CRONIUM_URL@", &shell_quote(&state.config.public_url))
        .replace("@CRONIUM_CA_SHA256@", &shell_quote(&state.ca.fingerprint()))
        .replace(
            "@CRONIUM_RELEASE_KEY@",
            &shell_quote(key.to_pem().trim_end()),
        )
        .replace("@CRONIUM_SERVICE_UNIT@", SERVICE_UNIT.trim_end())
}

async fn install_script(State(state): State<AppState>) -> Response {
    let key = match public_key(&state) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    (
        [
            (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        render_install_script(&state, &key),
    )
        .into_response()
}

async fn release_key(State(state): State<AppState>) -> Response {
    match public_key(&state) {
        Ok(key) => (
            [
                (header::CONTENT_TYPE, "application/x-pem-file"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            key.to_pem(),
        )
            .into_response(),
        Err(response) => *response,
    }
}

async fn agent_file(
    State(state): State<AppState>,
    Path((version, target, file)): Path<(String, String, String)>,
) -> Response {
    let not_found = |message: String| error(StatusCode::NOT_FOUND, "not_found", message);
    if !RELEASE_FILES.contains(&file.as_str()) {
        return not_found(format!(
            "no such release file; a release has {}",
            RELEASE_FILES.join(", ")
        ));
    }
    if release::check_target(&target).is_err() {
        return not_found("no such target".into());
    }
    let releases = state.config.releases_dir.clone();
    let latest = version == "latest";
    let version = if latest {
        let (dir, wanted) = (releases.clone(), target.clone());
        match tokio::task::spawn_blocking(move || release::latest_version(&dir, &wanted)).await {
            Ok(Some(version)) => version,
            _ => return not_found(format!("no release for target {target}")),
        }
    } else if release::check_version(&version).is_ok() {
        version
    } else {
        return not_found("no such version".into());
    };
    let path: PathBuf = releases.join(&version).join(&target).join(&file);
    let opened = match tokio::fs::File::open(&path).await {
        Ok(opened) => opened,
        Err(_) => return not_found(format!("no {file} for version {version}, target {target}")),
    };
    let length = match opened.metadata().await {
        Ok(metadata) if metadata.is_file() => metadata.len(),
        _ => return not_found(format!("no {file} for version {version}, target {target}")),
    };
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    // `latest` moves; a versioned file is revalidated too, since a dev build re-signs in place.
    let stream = futures_util::stream::unfold(opened, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buffer)), file))
            }
            Err(problem) => Some((Err(problem), file)),
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    headers.insert(header::CONTENT_LENGTH, length.into());
    headers.insert(header::CACHE_CONTROL, "no-cache".parse().expect("static"));
    headers.insert(
        "x-cronium-release-version",
        version
            .parse()
            .unwrap_or(header::HeaderValue::from_static("")),
    );
    response
}
