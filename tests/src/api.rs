//! A thin HTTP client for the control plane's API.
//!
//! [`Api`] adds the bearer token (if any) and returns every answer as an [`ApiResponse`] with the
//! status and the body, so tests can assert on failures as easily as on successes.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::Value;

/// HTTP client bound to one control plane and (optionally) one API token.
#[derive(Clone, Debug)]
pub struct Api {
    client: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

/// One HTTP answer: status, body text and the body parsed as JSON (`Value::Null` if it is not JSON).
#[derive(Clone, Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub text: String,
    pub json: Value,
}

impl Api {
    /// A client for `base_url` (`http://127.0.0.1:PORT`, no trailing slash).
    pub fn new(base_url: &str, token: Option<&str>) -> Result<Api> {
        crate::init_crypto();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("build the http client")?;
        Ok(Api {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: token.map(str::to_owned),
        })
    }

    /// The same server with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            client: self.client.clone(),
            base_url: self.base_url.clone(),
            token: token.map(str::to_owned),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A request builder for `path` with the bearer token attached, for anything unusual.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends `method path` with an optional JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse> {
        let mut builder = self.request(method.clone(), path);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        ApiResponse::read(
            builder
                .send()
                .await
                .with_context(|| format!("{method} {path}"))?,
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Result<ApiResponse> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<ApiResponse> {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<ApiResponse> {
        self.send(Method::DELETE, path, None).await
    }

    /// Sends `body` as it is, with the given content type (for malformed-input tests).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<ApiResponse> {
        let response = self
            .request(method.clone(), path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        ApiResponse::read(response).await
    }

    /// `GET path` that must answer 200; returns the JSON body.
    pub async fn get_ok(&self, path: &str) -> Result<Value> {
        self.get(path)
            .await?
            .expect_status(200, &format!("GET {path}"))
    }
}

impl ApiResponse {
    async fn read(response: reqwest::Response) -> Result<ApiResponse> {
        let status = response.status().as_u16();
        let bytes = response.bytes().await.context("read the response body")?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(ApiResponse { status, text, json })
    }

    /// The JSON body if the status is `status`, else an error that shows what came back.
    pub fn expect_status(self, status: u16, what: &str) -> Result<Value> {
        if self.status != status {
            bail!(
                "{what}: expected HTTP {status}, got {} with body {}",
                self.status,
                self.text
            );
        }
        Ok(self.json)
    }

    /// Checks the error shape `{"error":{"code":"…","message":"…"}}` with a non-empty message and
    /// returns the code.
    pub fn expect_error_shape(&self, what: &str) -> Result<String> {
        let code = self.json.pointer("/error/code").and_then(Value::as_str);
        let message = self.json.pointer("/error/message").and_then(Value::as_str);
        match (code, message) {
            (Some(code), Some(message)) if !code.is_empty() && !message.is_empty() => {
                Ok(code.to_owned())
            }
            _ => bail!(
                "{what}: expected an error body {{\"error\":{{\"code\",\"message\"}}}}, got HTTP {} {}",
                self.status,
                self.text
            ),
        }
    }
}
