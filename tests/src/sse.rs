//! A minimal server-sent events reader for `GET /api/v1/jobs/{id}/logs?follow=true`.
//!
//! It reads the response body as it streams, splits it into events at blank lines, and keeps the
//! `log` events and the final `end` event. Anything else (comments, keep-alives) is ignored.
//! [`EventStream`] reads any other event stream (e.g. `GET /api/v1/changes`) event by event.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::Value;

use crate::api::Api;

/// One `event: log` of the follow stream.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEvent {
    pub offset: u64,
    pub stream: String,
    pub data: String,
}

/// Everything a follow stream delivered.
#[derive(Clone, Debug)]
pub struct FollowedLog {
    pub logs: Vec<LogEvent>,
    /// The job JSON of the `end` event.
    pub end: Value,
    /// Names of events other than `log` and `end`, in order.
    pub other_events: Vec<String>,
}

impl FollowedLog {
    /// The data of every log event, concatenated.
    pub fn text(&self) -> String {
        self.logs.iter().map(|event| event.data.as_str()).collect()
    }
}

/// Follows a job's log until the `end` event, failing after `timeout`.
pub async fn follow_job_logs(api: &Api, job_id: &str, timeout: Duration) -> Result<FollowedLog> {
    tokio::time::timeout(timeout, follow(api, job_id))
        .await
        .with_context(|| format!("the log stream of job {job_id} did not end within {timeout:?}"))?
}

async fn follow(api: &Api, job_id: &str) -> Result<FollowedLog> {
    let mut stream =
        EventStream::open(api, &format!("/api/v1/jobs/{job_id}/logs?follow=true")).await?;
    let mut followed = FollowedLog {
        logs: Vec::new(),
        end: Value::Null,
        other_events: Vec::new(),
    };
    loop {
        let (name, data) = stream
            .next_event()
            .await
            .with_context(|| format!("no `end` event after {} log events", followed.logs.len()))?;
        match name.as_str() {
            "log" => {
                let value: Value = serde_json::from_str(&data)
                    .with_context(|| format!("log event data is not JSON: {data:?}"))?;
                followed.logs.push(LogEvent {
                    offset: value["offset"]
                        .as_u64()
                        .with_context(|| format!("log event without offset: {data}"))?,
                    stream: value["stream"].as_str().unwrap_or_default().to_owned(),
                    data: value["data"]
                        .as_str()
                        .with_context(|| format!("log event without data: {data}"))?
                        .to_owned(),
                });
            }
            "end" => {
                followed.end = serde_json::from_str(&data)
                    .with_context(|| format!("end event data is not JSON: {data:?}"))?;
                return Ok(followed);
            }
            _ => followed.other_events.push(name),
        }
    }
}

/// Any server-sent event stream, read one event (name, data) at a time; comments and
/// keep-alives are skipped.
pub struct EventStream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buffer: Vec<u8>,
}

impl EventStream {
    /// Opens `path` on `api` as an event stream (an error unless it answers 2xx with
    /// `text/event-stream`).
    pub async fn open(api: &Api, path: &str) -> Result<EventStream> {
        let response = api
            .request(reqwest::Method::GET, path)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "GET {path}: HTTP {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            bail!("GET {path}: expected content type text/event-stream, got {content_type:?}");
        }
        Ok(EventStream {
            body: response
                .bytes_stream()
                .map(|chunk| chunk.map(|bytes| bytes.to_vec()))
                .boxed(),
            buffer: Vec::new(),
        })
    }

    /// The next event as `(name, data)`, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<(String, String)> {
        tokio::time::timeout(timeout, self.next_event())
            .await
            .with_context(|| format!("no event within {timeout:?}"))?
    }

    /// The next event as `(name, data)`; an error when the stream closes first.
    pub async fn next_event(&mut self) -> Result<(String, String)> {
        loop {
            while let Some((block, rest)) = split_event(&self.buffer) {
                self.buffer = rest;
                if let Some(event) = parse_event(&block)? {
                    return Ok(event);
                }
            }
            match self.body.next().await {
                Some(chunk) => self
                    .buffer
                    .extend_from_slice(&chunk.context("read the event stream")?),
                None => bail!("the event stream closed"),
            }
        }
    }
}

/// Splits the first complete event block (terminated by a blank line) off `buffer`.
fn split_event(buffer: &[u8]) -> Option<(String, Vec<u8>)> {
    let text_end = buffer
        .windows(2)
        .position(|pair| pair == b"\n\n")
        .map(|index| (index, index + 2));
    let crlf_end = buffer
        .windows(4)
        .position(|quad| quad == b"\r\n\r\n")
        .map(|index| (index, index + 4));
    let (end, next) = match (text_end, crlf_end) {
        (Some(a), Some(b)) => {
            if a.0 < b.0 {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => return None,
    };
    Some((
        String::from_utf8_lossy(&buffer[..end]).into_owned(),
        buffer[next..].to_vec(),
    ))
}

/// Parses one event block into `(event name, data)`; `None` for a block with no data (a comment).
fn parse_event(block: &str) -> Result<Option<(String, String)>> {
    let mut name = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return Ok(None);
    }
    Ok(Some((name, data.join("\n"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_and_parsed() {
        let stream = b": keep-alive\n\nevent: log\ndata: {\"offset\":0}\n\nevent: end\r\ndata: {}\r\n\r\nrest";
        let (first, rest) = split_event(stream).unwrap();
        assert_eq!(parse_event(&first).unwrap(), None);
        let (second, rest) = split_event(&rest).unwrap();
        assert_eq!(
            parse_event(&second).unwrap(),
            Some(("log".into(), "{\"offset\":0}".into()))
        );
        let (third, rest) = split_event(&rest).unwrap();
        assert_eq!(
            parse_event(&third).unwrap(),
            Some(("end".into(), "{}".into()))
        );
        assert_eq!(rest, b"rest");
        assert!(split_event(&rest).is_none());
    }
}
