//! Terminal recordings in asciicast v2: `<data dir>/recordings/<session>.cast`.
//!
//! The first line is the header `{"version":2,"width","height","timestamp","env":{"TERM":…}}`;
//! every following line is an event `[seconds, "o", text]` (output) or `[seconds, "r",
//! "COLSxROWS"]` (resize), with seconds counted from the header's timestamp. Output arrives as
//! bytes that may split a UTF-8 character anywhere; [`Utf8Stream`] holds an incomplete tail back
//! until the rest arrives, so every character is written whole (invalid bytes become U+FFFD).
//! A recording holds the terminal's bytes and nothing else. Files are created 0600 in a 0700
//! directory; each event is one `write` to a file opened for appending.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

/// Longest header line read back when a recording is continued.
const MAX_HEADER: u64 = 4096;

/// Decodes a byte stream as UTF-8, piece by piece.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    /// The start of a character whose remaining bytes have not arrived yet (at most 3 bytes).
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The text of `data` after what was pending; an incomplete character at the end is kept
    /// for the next call.
    pub fn push(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(data);
        let mut text = String::with_capacity(bytes.len());
        let mut rest = bytes.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    // `valid_up_to` bytes are valid UTF-8 by definition.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match error.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        text
    }

    /// Forgets a pending partial character (another stream position follows).
    pub fn reset(&mut self) {
        self.pending.clear();
    }
}

/// An open recording.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    file: File,
    /// The header's timestamp (seconds since the epoch), in milliseconds.
    start_ms: i64,
    utf8: Utf8Stream,
}

impl Recorder {
    /// Creates a new recording with its header; fails if the file exists.
    pub fn create(dir: &Path, session: &str, cols: u16, rows: u16) -> io::Result<Recorder> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let path = dir.join(format!("{session}.cast"));
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let timestamp = now_ms.div_euclid(1000);
        let header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": timestamp,
            "env": {"TERM": "xterm-256color"},
        });
        file.write_all(format!("{header}\n").as_bytes())?;
        Ok(Recorder {
            path,
            file,
            start_ms: timestamp * 1000,
            utf8: Utf8Stream::default(),
        })
    }

    /// Continues an existing recording (another viewer, or after a restart).
    pub fn append(path: &Path) -> io::Result<Recorder> {
        let mut header = String::new();
        BufReader::new(io::Read::take(File::open(path)?, MAX_HEADER)).read_line(&mut header)?;
        let timestamp = serde_json::from_str::<serde_json::Value>(&header)
            .ok()
            .and_then(|header| header["timestamp"].as_i64())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no asciicast header"))?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Recorder {
            path: path.to_path_buf(),
            file,
            start_ms: timestamp * 1000,
            utf8: Utf8Stream::default(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn seconds(&self) -> f64 {
        let elapsed = chrono::Utc::now().timestamp_millis() - self.start_ms;
        elapsed.max(0) as f64 / 1000.0
    }

    fn event(&mut self, kind: &str, text: &str) -> io::Result<()> {
        let line = json!([self.seconds(), kind, text]);
        self.file.write_all(format!("{line}\n").as_bytes())
    }

    /// Records terminal output.
    pub fn output(&mut self, data: &[u8]) -> io::Result<()> {
        let text = self.utf8.push(data);
        if text.is_empty() {
            return Ok(());
        }
        self.event("o", &text)
    }

    /// Records a new window size.
    pub fn resize(&mut self, cols: u16, rows: u16) -> io::Result<()> {
        self.event("r", &format!("{cols}x{rows}"))
    }

    /// Forgets a partial character (this relay just took the recording over).
    pub fn take_over(&mut self) {
        self.utf8.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_pieces_come_out_whole() {
        let mut stream = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(stream.push(&[b'a', euro[0]]), "a");
        assert_eq!(stream.push(&euro[1..2]), "");
        assert_eq!(stream.push(&[euro[2], b'b']), "€b");
        assert_eq!(stream.push(&[0xff, b'c']), "\u{FFFD}c");
        assert_eq!(stream.push(&"é".as_bytes()[..1]), "");
        stream.reset();
        assert_eq!(stream.push(b"d"), "d");
    }

    #[test]
    fn a_recording_is_asciicast_v2_and_can_be_continued() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = dir.path().join("recordings");
        let session = "0123456789abcdef0123456789abcdef";
        let mut recorder = Recorder::create(&recordings, session, 80, 24).unwrap();
        let e_acute = "é".as_bytes();
        recorder.output(&[b'h', e_acute[0]]).unwrap();
        recorder.output(&[e_acute[1], b'\r', b'\n']).unwrap();
        recorder.resize(100, 30).unwrap();
        assert!(Recorder::create(&recordings, session, 80, 24).is_err());
        let mut continued = Recorder::append(recorder.path()).unwrap();
        continued.output(b"more").unwrap();

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(recorder.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(recorder.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[0]["height"], 24);
        assert_eq!(lines[0]["env"]["TERM"], "xterm-256color");
        assert!(lines[0]["timestamp"].is_i64());
        assert_eq!(lines[1][1], "o");
        assert_eq!(lines[1][2], "h");
        assert_eq!(lines[2][2], "é\r\n");
        assert_eq!(lines[3][1], "r");
        assert_eq!(lines[3][2], "100x30");
        assert_eq!(lines[4][2], "more");
        assert!(
            lines[1..]
                .iter()
                .all(|event| event[0].as_f64().unwrap() >= 0.0)
        );
    }
}
