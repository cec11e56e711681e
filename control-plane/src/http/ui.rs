//! The web console's static files under `/ui/`, unauthenticated (the pages log in through the
//! API). They are built from `web/` by `build.rs` and embedded in the binary, so the control
//! plane serves them without touching the disk.
//!
//! `/ui/` is the index page, `/ui/terminal` the terminal page (any `NAME` finds `NAME.html`),
//! `/ui/assets/…` the scripts and styles Vite named after their content hash (cached for a year);
//! pages are revalidated on every load (`no-cache` with an ETag). Every answer carries a
//! Content-Security-Policy that allows only this origin. `/` redirects to `/ui/`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::error::ApiError;
use crate::AppState;

/// One embedded file of the built console.
pub struct Asset {
    /// Path relative to `/ui/`, e.g. `assets/terminal-Ceuto0Ua.js`.
    pub path: &'static str,
    pub contents: &'static [u8],
    /// A quoted hash of the contents.
    pub etag: &'static str,
}

mod built {
    use super::Asset;
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

pub use built::FILES;

/// Only this origin may provide scripts, styles, images, fonts and connections (the API and the
/// terminal WebSocket); no page may frame the console. xterm.js sets the terminal's sizes and
/// colours, and CodeMirror its editor's theme, in `<style>` elements they create, hence
/// `'unsafe-inline'` for styles (never for scripts).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Where Vite puts content-hashed files, which never change under the same name.
const HASHED_DIR: &str = "assets/";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { serve("", &headers) }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, headers: HeaderMap| async move {
                serve(&path, &headers)
            }),
        )
}

/// The embedded file for a request path: exact, else `PATH.html`, else `PATH/index.html`.
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = path.trim_start_matches('/');
    let lookup = |wanted: &str| FILES.iter().find(|asset| asset.path == wanted);
    if path.is_empty() || path.ends_with('/') {
        return lookup(&format!("{path}index.html"));
    }
    lookup(path)
        .or_else(|| lookup(&format!("{path}.html")))
        .or_else(|| lookup(&format!("{path}/index.html")))
}

fn serve(path: &str, request_headers: &HeaderMap) -> Response {
    let Some(asset) = find(path) else {
        return with_security_headers(ApiError::NotFound("file").into_response());
    };
    let cache = if asset.path.starts_with(HASHED_DIR) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let fresh = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == asset.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, content_type(asset.path))],
            asset.contents,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    with_security_headers(response)
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let pairs: [(HeaderName, &'static str); 4] = [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in pairs {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The media type of a built file, by extension.
pub fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("txt") => "text/plain; charset=utf-8",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}
