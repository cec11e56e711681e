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
    /// Bytes received and not yet returned as events, from `start` on.
    buffer: Vec<u8>,
    start: usize,
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
            start: 0,
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
            while let Some((end, next)) = event_end(&self.buffer[self.start..]) {
                let block = &self.buffer[self.start..self.start + end];
                let event = parse_event(&String::from_utf8_lossy(block))?;
                self.start += next;
                if let Some(event) = event {
                    return Ok(event);
                }
            }
            // Only an incomplete event is left: moved to the front once per chunk received,
            // not once per event taken (a burst of events in one chunk stays linear).
            self.buffer.drain(..self.start);
            self.start = 0;
            match self.body.next().await {
                Some(chunk) => self
                    .buffer
                    .extend_from_slice(&chunk.context("read the event stream")?),
                None => bail!("the event stream closed"),
            }
        }
    }
}

/// Where the first complete event block of `buffer` ends (a blank line, `\n\n` or
/// `\r\n\r\n`): the block's length and where the next one starts.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let find = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
    };
    let text = find(buffer, b"\n\n").map(|at| (at, at + 2));
    // A CRLF blank line comes first only if it starts before the LF one: look no further.
    let crlf_scope = text.map_or(buffer.len(), |(at, _)| (at + 3).min(buffer.len()));
    let crlf = find(&buffer[..crlf_scope], b"\r\n\r\n").map(|at| (at, at + 4));
    crlf.or(text)
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
        let stream: &[u8] = b": keep-alive\n\nevent: log\ndata: {\"offset\":0}\n\nevent: end\r\ndata: {}\r\n\r\nrest";
        let split = |buffer: &[u8]| {
            event_end(buffer).map(|(end, next)| {
                (
                    String::from_utf8_lossy(&buffer[..end]).into_owned(),
                    buffer[next..].to_vec(),
                )
            })
        };
        let (first, rest) = split(stream).unwrap();
        assert_eq!(parse_event(&first).unwrap(), None);
        let (second, rest) = split(&rest).unwrap();
        assert_eq!(
            parse_event(&second).unwrap(),
            Some(("log".into(), "{\"offset\":0}".into()))
        );
        let (third, rest) = split(&rest).unwrap();
        assert_eq!(
            parse_event(&third).unwrap(),
            Some(("end".into(), "{}".into()))
        );
        assert_eq!(rest, b"rest");
        assert!(event_end(&rest).is_none());
        // A CRLF blank line before an LF one ends the first block, and one after it does not.
        assert_eq!(event_end(b"a\r\n\r\nb\n\n"), Some((1, 5)));
        assert_eq!(event_end(b"a\n\nb\r\n\r\n"), Some((1, 3)));
    }
}
