//! Log output of the binaries (`cronium-agent` here, and `cronium`, which calls the same
//! function): human-readable text or one JSON object per line, always on stderr.
//!
//! The JSON form is tracing-subscriber's, with the event's fields flattened into the object:
//! `{"timestamp":"…","level":"INFO","message":"…","target":"…",<fields>}` plus `span`/`spans`
//! when the event happened inside one. Nothing is added to what the text form says, so whatever
//! is kept out of the logs (secrets, tokens) stays out of both.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Installs the global subscriber: `filter` decides what is logged, `format` how; both write to
/// stderr. Call once, before the runtime starts.
pub fn init(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Reports the error that ends the process: a plain `error: …` line, or in JSON mode an `ERROR`
/// event, so every line on stderr stays in the chosen format.
pub fn report_fatal(format: LogFormat, program: &str, error: &anyhow::Error) {
    match format {
        LogFormat::Text => eprintln!("{program}: {error:#}"),
        LogFormat::Json => tracing::error!(error = %format!("{error:#}"), "{program} stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_level_and_message_at_the_top() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        // The same settings as `init`, into a buffer instead of stderr.
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(jobs = 3, "leases extended");
            tracing::debug!("filtered out");
            tracing::warn!("second\nline");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "leases extended");
        assert_eq!(first["jobs"], 3);
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "second\nline");
    }
}
