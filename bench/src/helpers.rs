//! The helper round-trip phase: how long one runtime helper call takes from inside a script,
//! next to the same language's bare HTTP/1.1 round trip over a Unix socket.
//!
//! Per language (Bash through `cronium.sh`, Python through `cronium.py`, Node.js through
//! `cronium.js`) one host job alternates `warmup + calls` times between an `input` helper call
//! and a minimal HTTP/1.1 request over a Unix socket to [`BareServer`] (hyper on tokio, run by
//! this process, answering `200 {}`), timing each inside the script (`$EPOCHREALTIME`,
//! `time.perf_counter_ns`, `process.hrtime.bigint`) and printing the durations when done. The
//! peer is the most direct request each language can make: `curl --unix-socket` in Bash (which
//! cannot open a Unix socket itself, and whose helper library runs curl too), a raw `AF_UNIX`
//! socket in Python and a `net` socket in Node.js. The ratio is then the helper's cost (library,
//! token, JSON, the agent's endpoint) over a bare round trip on the same machine in the same job.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::api::Api;
use crate::phases::ensure_completed;

/// Untimed calls of each kind before the timed ones.
pub const WARMUP: usize = 10;

/// Bash: `cronium_input` (curl, through the library) vs `curl --unix-socket` to the bare server.
const BASH: &str = r#"set -e
. ./cronium.sh
lines=()
for ((i = 0; i < HELPER_WARMUP + HELPER_CALLS; i++)); do
  t0=${EPOCHREALTIME/[.,]/}
  cronium_input >/dev/null
  t1=${EPOCHREALTIME/[.,]/}
  curl -fsS --unix-socket "$BARE_SOCKET" http://bench/ >/dev/null
  t2=${EPOCHREALTIME/[.,]/}
  if ((i >= HELPER_WARMUP)); then
    lines+=("helper_ns $(((t1 - t0) * 1000)) bare_ns $(((t2 - t1) * 1000))")
  fi
done
printf '%s\n' "${lines[@]}"
"#;

/// Python: `cronium.input()` vs a raw `AF_UNIX` socket.
const PYTHON: &str = r#"import os
import socket
import time
import cronium

calls = int(os.environ["HELPER_CALLS"])
warmup = int(os.environ["HELPER_WARMUP"])
path = os.environ["BARE_SOCKET"]
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"

def bare():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(REQUEST)
    answer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(b"{}"):
        raise SystemExit("unexpected answer from the bare server: %r" % answer)

lines = []
for i in range(warmup + calls):
    t0 = time.perf_counter_ns()
    cronium.input()
    t1 = time.perf_counter_ns()
    bare()
    t2 = time.perf_counter_ns()
    if i >= warmup:
        lines.append("helper_ns %d bare_ns %d" % (t1 - t0, t2 - t1))
print("\n".join(lines))
"#;

/// Node.js: `await cronium.input()` vs a `net` socket.
const NODE: &str = r#"const net = require('net');
const cronium = require('./cronium');

const calls = Number(process.env.HELPER_CALLS);
const warmup = Number(process.env.HELPER_WARMUP);
const path = process.env.BARE_SOCKET;
const REQUEST = 'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n';

function bare() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const socket = net.createConnection({ path }, () => socket.write(REQUEST));
    socket.on('data', (chunk) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('end', () => {
      const answer = Buffer.concat(chunks).toString('utf8');
      if (answer.startsWith('HTTP/1.1 200') && answer.endsWith('{}')) resolve();
      else reject(new Error('unexpected answer from the bare server: ' + JSON.stringify(answer)));
    });
  });
}

(async () => {
  const lines = [];
  for (let i = 0; i < warmup + calls; i++) {
    const t0 = process.hrtime.bigint();
    await cronium.input();
    const t1 = process.hrtime.bigint();
    await bare();
    const t2 = process.hrtime.bigint();
    if (i >= warmup) lines.push(`helper_ns ${t1 - t0} bare_ns ${t2 - t1}`);
  }
  console.log(lines.join('\n'));
})().catch((error) => { console.error(error); process.exit(1); });
"#;

/// One language of the phase.
pub struct Language {
    /// The name in the report (`bash`, `python`, `node`).
    pub name: &'static str,
    /// The event kind.
    kind: &'static str,
    /// The benchmark script.
    script: &'static str,
    /// What the bare side does, for the report.
    pub peer: &'static str,
}

/// Bash, Python and Node.js.
pub const LANGUAGES: [Language; 3] = [
    Language {
        name: "bash",
        kind: "bash",
        script: BASH,
        peer: "`curl --unix-socket`",
    },
    Language {
        name: "python",
        kind: "python",
        script: PYTHON,
        peer: "raw `AF_UNIX` socket",
    },
    Language {
        name: "node",
        kind: "nodejs",
        script: NODE,
        peer: "`net` socket",
    },
];

/// The samples of one language, in milliseconds.
pub struct HelperSamples {
    /// `input` helper calls.
    pub helper: Vec<f64>,
    /// Bare HTTP/1.1 round trips to [`BareServer`].
    pub bare: Vec<f64>,
}

/// A trivial HTTP/1.1 server on a Unix socket answering every request `200` with `{}`; it stops
/// and its socket goes when this drops.
pub struct BareServer {
    path: PathBuf,
    _stop: DropGuard,
}

impl BareServer {
    /// Binds `path` and serves it on a task of the current runtime.
    pub fn start(path: &Path) -> anyhow::Result<BareServer> {
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot bind the bare server to {}", path.display()))?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, stop.clone()));
        Ok(BareServer {
            path: path.to_owned(),
            _stop: stop.drop_guard(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: UnixListener, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    eprintln!("the bare server could not accept a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .expect("a static response is valid"),
                )
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        eprintln!("a bare-server connection failed: {error}");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Runs `language`'s benchmark job once on the agent named `agent` with `calls` timed calls of
/// each kind, against `server`; returns the durations the script printed.
pub async fn measure(
    api: &Api,
    agent: &str,
    server: &BareServer,
    language: &Language,
    calls: usize,
) -> anyhow::Result<HelperSamples> {
    // Generous: the slowest side (Bash, a curl process per call) takes a few ms per call.
    let timeout = Duration::from_secs(60) + Duration::from_millis(50) * (calls + WARMUP) as u32;
    let event = api
        .create_host_event(
            &format!("bench-helper-{}", language.name),
            language.kind,
            language.script,
            &[
                ("HELPER_CALLS", calls.to_string()),
                ("HELPER_WARMUP", WARMUP.to_string()),
                ("BARE_SOCKET", server.path().display().to_string()),
            ],
            timeout.as_secs(),
            agent,
        )
        .await?;
    let triggered = api.trigger(&event).await?;
    let followed = api
        .follow_for(&triggered.job_id, timeout + Duration::from_secs(10))
        .await?;
    ensure_completed(&followed.job)
        .with_context(|| format!("the {} helper benchmark job failed", language.name))?;
    let printed = if followed.log.trim().is_empty() {
        followed.job["output"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    } else {
        followed.log
    };
    let samples = parse_samples(&printed)
        .with_context(|| format!("the {} helper benchmark job's output", language.name))?;
    if samples.helper.len() != calls {
        bail!(
            "the {} helper benchmark job printed {} samples instead of {calls}",
            language.name,
            samples.helper.len()
        );
    }
    Ok(samples)
}

/// Parses `helper_ns H bare_ns B` lines into milliseconds.
fn parse_samples(text: &str) -> anyhow::Result<HelperSamples> {
    let mut samples = HelperSamples {
        helper: Vec::new(),
        bare: Vec::new(),
    };
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["helper_ns", helper, "bare_ns", bare] = words.as_slice() else {
            bail!("unexpected line {line:?}");
        };
        let ms = |text: &str| -> anyhow::Result<f64> {
            Ok(text
                .parse::<u64>()
                .with_context(|| format!("not a duration in {line:?}"))? as f64
                / 1e6)
        };
        samples.helper.push(ms(helper)?);
        samples.bare.push(ms(bare)?);
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_printed_durations() {
        let samples =
            parse_samples("helper_ns 1500000 bare_ns 250000\n\nhelper_ns 2000000 bare_ns 500000\n")
                .unwrap();
        assert_eq!(samples.helper, vec![1.5, 2.0]);
        assert_eq!(samples.bare, vec![0.25, 0.5]);
        assert!(parse_samples("helper_ns 1 bare_ns x\n").is_err());
        assert!(parse_samples("hello\n").is_err());
    }
}
