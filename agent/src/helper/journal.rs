//! The journal of an attempt's helper writes (`set_variable`, `notify`) on their way to the
//! control plane.
//!
//! Every write is appended to `<spool dir>/helper-writes.jsonl` with the next sequence number
//! *before* it is forwarded, and `helper-acked` records the highest sequence number the control
//! plane answered. So a write made while the agent's link is down, or while the control plane
//! restarts, waits here (surviving an agent restart too) and is sent in order once the link is
//! back; the uploader sends every pending write before it reports the attempt's result. The
//! control plane applies each sequence number at most once, so a write sent twice (the answer
//! was lost) is harmless.
//!
//! Like the rest of the spool, nothing is fsynced (see `spool::write_atomically`).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cronium_protocol::{HelperRefusal, HelperReply, HelperRequest};
use serde::{Deserialize, Serialize};

use crate::spool::{SpoolError, corrupt, io_error, write_atomically};

/// The journal file inside the attempt's spool dir.
const WRITES_FILE: &str = "helper-writes.jsonl";

/// The highest answered sequence number.
const ACKED_FILE: &str = "helper-acked";

/// One journal line.
#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    request: HelperRequest,
}

/// A cheap handle on one attempt's journal.
#[derive(Debug, Clone)]
pub struct HelperJournal {
    inner: Arc<JournalInner>,
}

#[derive(Debug)]
struct JournalInner {
    dir: PathBuf,
    state: Mutex<JournalState>,
    /// Held while writes are being sent, so they reach the control plane in order even when
    /// the helper endpoint and the uploader flush at the same time.
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct JournalState {
    /// Open for appending once the first write was made.
    file: Option<File>,
    /// The sequence number of the last write appended.
    last_seq: u64,
    /// The highest sequence number the control plane answered.
    acked: u64,
    /// Writes not answered yet, in order.
    pending: VecDeque<(u64, HelperRequest)>,
    /// Refusals not yet collected by the helper call that made the write.
    refused: BTreeMap<u64, (HelperRefusal, String)>,
}

impl HelperJournal {
    /// An empty journal for a new attempt in `dir` (files are created with the first write).
    pub fn new(dir: &Path) -> HelperJournal {
        HelperJournal::with_state(dir, JournalState::default())
    }

    /// Loads the journal a previous agent process left in `dir`. A torn last line (the agent
    /// died while appending it) is cut off: the script was never told that write succeeded.
    pub fn load(dir: &Path) -> Result<HelperJournal, SpoolError> {
        let acked_path = dir.join(ACKED_FILE);
        let acked = match fs::read_to_string(&acked_path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|error| corrupt(&acked_path, error))?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(io_error(&acked_path, source)),
        };
        let path = dir.join(WRITES_FILE);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(HelperJournal::with_state(
                    dir,
                    JournalState {
                        acked,
                        last_seq: acked,
                        ..JournalState::default()
                    },
                ));
            }
            Err(source) => return Err(io_error(&path, source)),
        };
        let mut state = JournalState {
            acked,
            last_seq: acked,
            ..JournalState::default()
        };
        let mut good_len = 0usize;
        for line in text.split_inclusive(|byte| *byte == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            let entry: Entry = match serde_json::from_slice(line) {
                Ok(entry) => entry,
                Err(_) => break,
            };
            if entry.seq != state.last_seq + 1 && entry.seq > acked {
                return Err(corrupt(
                    &path,
                    format!(
                        "sequence {} follows {} in the helper journal",
                        entry.seq, state.last_seq
                    ),
                ));
            }
            state.last_seq = state.last_seq.max(entry.seq);
            if entry.seq > acked {
                state.pending.push_back((entry.seq, entry.request));
            }
            good_len += line.len();
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| io_error(&path, source))?;
        if good_len != text.len() {
            tracing::warn!(path = %path.display(), "cutting a torn line off a helper journal");
            file.set_len(good_len as u64)
                .map_err(|source| io_error(&path, source))?;
        }
        state.file = Some(file);
        Ok(HelperJournal::with_state(dir, state))
    }

    fn with_state(dir: &Path, state: JournalState) -> HelperJournal {
        HelperJournal {
            inner: Arc::new(JournalInner {
                dir: dir.to_path_buf(),
                state: Mutex::new(state),
                flushing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, JournalState> {
        // Every update is a single assignment after its I/O, so a poisoned lock is consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a write and returns its sequence number.
    pub fn append(&self, request: HelperRequest) -> Result<u64, SpoolError> {
        let mut state = self.lock();
        let seq = state.last_seq + 1;
        let path = self.inner.dir.join(WRITES_FILE);
        if state.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| io_error(&path, source))?;
            state.file = Some(file);
        }
        let mut line = serde_json::to_vec(&Entry {
            seq,
            request: request.clone(),
        })
        .map_err(|error| corrupt(&path, error))?;
        line.push(b'\n');
        if let Some(file) = state.file.as_mut() {
            file.write_all(&line)
                .map_err(|source| io_error(&path, source))?;
        }
        state.last_seq = seq;
        state.pending.push_back((seq, request));
        Ok(seq)
    }

    /// The first unanswered write, if any.
    pub fn next_pending(&self) -> Option<(u64, HelperRequest)> {
        self.lock().pending.front().cloned()
    }

    /// Whether writes wait to be sent.
    pub fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// Records the control plane's answer to write `seq` (the first pending one).
    pub fn settle(&self, seq: u64, reply: &HelperReply) -> Result<(), SpoolError> {
        let mut state = self.lock();
        if seq <= state.acked {
            return Ok(());
        }
        write_atomically(&self.inner.dir.join(ACKED_FILE), seq.to_string().as_bytes())?;
        state.acked = seq;
        while state
            .pending
            .front()
            .is_some_and(|(pending, _)| *pending <= seq)
        {
            state.pending.pop_front();
        }
        if let HelperReply::Refused { reason, message } = reply {
            state.refused.insert(seq, (*reason, message.clone()));
        }
        Ok(())
    }

    /// Whether write `seq` was answered.
    pub fn is_settled(&self, seq: u64) -> bool {
        self.lock().acked >= seq
    }

    /// Takes the refusal of write `seq`, if it was refused.
    pub fn take_refusal(&self, seq: u64) -> Option<(HelperRefusal, String)> {
        self.lock().refused.remove(&seq)
    }

    /// The value of the latest unanswered `set_variable` of `name` (JSON text), so a script
    /// reads its own writes while they wait for the link.
    pub fn pending_value(&self, name: &str) -> Option<String> {
        self.lock()
            .pending
            .iter()
            .rev()
            .find_map(|(_, request)| match request {
                HelperRequest::SetVariable {
                    name: pending,
                    value_json,
                } if pending == name => Some(value_json.clone()),
                _ => None,
            })
    }

    /// The lock held while sending writes.
    pub fn flushing(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.flushing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> HelperRequest {
        HelperRequest::SetVariable {
            name: name.into(),
            value_json: value.into(),
        }
    }

    #[test]
    fn writes_survive_a_reload_until_they_are_answered() {
        let temp = tempfile::tempdir().unwrap();
        let journal = HelperJournal::new(temp.path());
        assert_eq!(journal.append(set("a", "1")).unwrap(), 1);
        assert_eq!(journal.append(set("b", "2")).unwrap(), 2);
        assert_eq!(journal.append(set("a", "3")).unwrap(), 3);
        assert_eq!(journal.pending_value("a").as_deref(), Some("3"));
        journal.settle(1, &HelperReply::Done).unwrap();
        journal
            .settle(
                2,
                &HelperReply::Refused {
                    reason: HelperRefusal::Invalid,
                    message: "no".into(),
                },
            )
            .unwrap();
        assert!(journal.is_settled(2));
        assert!(!journal.is_settled(3));
        assert_eq!(
            journal.take_refusal(2),
            Some((HelperRefusal::Invalid, "no".into()))
        );
        assert_eq!(journal.take_refusal(2), None);

        let reloaded = HelperJournal::load(temp.path()).unwrap();
        assert_eq!(reloaded.next_pending(), Some((3, set("a", "3"))));
        assert_eq!(reloaded.append(set("c", "4")).unwrap(), 4);
        reloaded.settle(4, &HelperReply::Done).unwrap();
        assert!(!reloaded.has_pending());
        assert_eq!(reloaded.pending_value("a"), None);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let temp = tempfile::tempdir().unwrap();
        let journal = HelperJournal::new(temp.path());
        journal.append(set("a", "1")).unwrap();
        let path = temp.path().join(WRITES_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":2,\"requ").unwrap();
        drop(file);
        let reloaded = HelperJournal::load(temp.path()).unwrap();
        assert_eq!(reloaded.next_pending(), Some((1, set("a", "1"))));
        assert_eq!(reloaded.append(set("b", "2")).unwrap(), 2);
        let again = HelperJournal::load(temp.path()).unwrap();
        assert_eq!(again.next_pending(), Some((1, set("a", "1"))));
        again.settle(1, &HelperReply::Done).unwrap();
        assert_eq!(again.next_pending(), Some((2, set("b", "2"))));
    }

    #[test]
    fn a_journal_without_files_is_empty() {
        let temp = tempfile::tempdir().unwrap();
        let journal = HelperJournal::load(temp.path()).unwrap();
        assert!(!journal.has_pending());
        assert_eq!(journal.append(set("a", "1")).unwrap(), 1);
    }
}
