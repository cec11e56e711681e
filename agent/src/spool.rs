//! The on-disk buffer of every attempt the agent runs or still has to report.
//!
//! Each attempt gets `<state>/spool/<job_id>-<attempt>/` holding:
//! - `log`: append-only records `[u8 kind][u32 BE length][data]`, which hold the attempt's
//!   output (kinds 0–2: stdout, stderr, system) and, between them, what is written once:
//!   - the spec (kind 16, JSON, always the first record): which job, attempt, run and event
//!     this is;
//!   - the pid (kind 17, u32 BE): the process id (and process group id) once the process
//!     started (0: no process);
//!   - the result (kind 18, JSON): written when the attempt ended, after all of its output.
//!
//!   The log offset of a byte of output is the sum of the output lengths before it, which is
//!   the offset the protocol speaks of; readers skip the other records;
//! - `output.json`, `condition`: what the script set through the runtime helpers (`output`,
//!   `set_condition`), each written with an atomic rename (last write wins);
//! - `helper-writes.jsonl`, `helper-acked`: the helper writes on their way to the control plane
//!   (see [`HelperJournal`]).
//!
//! One file for all of it, so an attempt that uses no helper costs one `mkdir`, one `openat`,
//! its writes, one `unlink` and one `rmdir` (the spec, pid and result were files of their own,
//! created and deleted per attempt, half of a drained no-op job's CPU in the agent). An agent
//! killed in the middle of a write leaves a last record cut short, which recovery cuts off: it
//! reads as not written (no spec: the directory is removed and the control plane settles the
//! attempt through its lease; no pid: nothing to kill; no result: settled as lost). Recovery
//! also reads the `spec.json`, `pid` and `result.json` files of attempts spooled by an agent
//! built before this layout. Nothing here is fsynced: see [`write_atomically`] for why the page
//! cache is enough.
//!
//! Output past `max_log_bytes` is dropped after one [`LogStream::System`] marker record.
//!
//! Nothing reaches the spool unmasked: the values of the attempt's secret environment variables
//! (see [`AttemptSpool::set_masker`]) are replaced with `***` in the log (stdout and stderr
//! chunk by chunk, holding back a tail that could start a value until the next chunk or the
//! result; system records whole) and in the `output` value. What a crash loses is at most the
//! held-back tail.
//! The spool outlives connections and agent restarts: uploads resume from the control plane's
//! offset, and [`Spool::recover`] settles attempts a crashed agent left behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cronium_protocol::{AttemptRef, FailReason, FinalStatus, LogStream, Masker, StreamMasker};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;

use crate::helper::journal::HelperJournal;

/// The attempt's log file.
const LOG_FILE: &str = "log";

/// The files in which agents built before the records of [`Record`] kept the spec, the pid and
/// the result; recovery still reads them.
const LEGACY_SPEC_FILE: &str = "spec.json";
const LEGACY_PID_FILE: &str = "pid";
const LEGACY_RESULT_FILE: &str = "result.json";

/// Bytes of a log record header: one kind byte and a 32-bit length.
const RECORD_HEADER_LEN: u64 = 5;

/// What a log record holds (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Output of one stream; only these count in log offsets.
    Output(LogStream),
    /// [`SpecFile`] as JSON; the first record.
    Spec,
    /// The process id, 4 bytes big-endian.
    Pid,
    /// [`ResultFile`] as JSON, after all of the output.
    Result,
}

impl Record {
    fn byte(self) -> u8 {
        match self {
            Record::Output(LogStream::Stdout) => 0,
            Record::Output(LogStream::Stderr) => 1,
            Record::Output(LogStream::System) => 2,
            Record::Spec => 16,
            Record::Pid => 17,
            Record::Result => 18,
        }
    }

    fn parse(byte: u8) -> Option<Record> {
        match byte {
            0 => Some(Record::Output(LogStream::Stdout)),
            1 => Some(Record::Output(LogStream::Stderr)),
            2 => Some(Record::Output(LogStream::System)),
            16 => Some(Record::Spec),
            17 => Some(Record::Pid),
            18 => Some(Record::Result),
            _ => None,
        }
    }
}

/// Largest data part of one record the writer produces.
const MAX_RECORD_DATA: usize = cronium_protocol::MAX_LOG_CHUNK;

/// Marker appended to the log of an attempt that was running when the agent died.
const RESTART_MARKER: &[u8] = b"\n[cronium: agent restarted while the job ran]\n";

/// Why a spool operation failed.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// The job id cannot be used as a file name.
    #[error("job id {0:?} is not a safe file name (expected 1 to 64 of A-Z a-z 0-9 _ -)")]
    UnsafeJobId(String),
    /// A file of the spool could not be read or written.
    #[error("spool i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A spool file does not have the expected format.
    #[error("corrupt spool file {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// The control plane asked for output from an offset past what the log holds.
    #[error("log offset {requested} is beyond the {available} bytes in the spool")]
    OffsetBeyondLog { requested: u64, available: u64 },
}

/// How an attempt ended, as reported by a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: FinalStatus,
    pub reason: Option<FailReason>,
    pub exit_code: Option<i32>,
}

/// The stored result of an attempt: its outcome plus the final log length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub log_len: u64,
}

/// The identifying facts of an attempt, stored in `spec.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSpec {
    pub job_id: String,
    pub attempt: u32,
    pub run_id: String,
    pub event_id: String,
}

/// A consistent view of an attempt's spool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the log file that hold complete records.
    pub file_len: u64,
    /// Total data bytes in the log (the next log offset).
    pub log_len: u64,
    /// The process id, once the process started.
    pub pid: Option<u32>,
    /// The result, once the attempt ended.
    pub result: Option<AttemptResult>,
}

/// The spool root, `<state>/spool`.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

/// A cheap handle on one attempt's spool directory, shared by the runner that writes it and the
/// uploader that reads it.
#[derive(Debug, Clone)]
pub struct AttemptSpool {
    inner: Arc<SpoolInner>,
}

#[derive(Debug)]
struct SpoolInner {
    attempt: AttemptRef,
    dir: PathBuf,
    /// The log records of an attempt that has no spool on disk ([`Spool::unstored`]).
    memory_log: Option<Arc<[u8]>>,
    max_log_bytes: u64,
    state: Mutex<SpoolState>,
    /// The helper writes (variables, notifications) not yet answered by the control plane.
    journal: HelperJournal,
    /// Woken (all waiters) after every append, the pid and the result, so the uploader can
    /// follow the log without polling.
    changed: Notify,
}

#[derive(Debug)]
struct SpoolState {
    /// The log opened for appending; `None` once the attempt has its result.
    log: Option<Arc<File>>,
    /// The same file for the readers (each pass of the uploader), so they open nothing; `None`
    /// for an attempt without a spool on disk, or once the spool is removed.
    readable: Option<Arc<File>>,
    file_len: u64,
    log_len: u64,
    truncated: bool,
    pid: Option<u32>,
    result: Option<AttemptResult>,
    /// JSON text set with the `output` helper.
    output: Option<String>,
    /// Set with the `set_condition` helper.
    condition: Option<bool>,
    /// Masks secret values in what is written.
    masking: Masking,
}

impl SpoolState {
    fn progress(&self) -> Progress {
        Progress {
            file_len: self.file_len,
            log_len: self.log_len,
            pid: self.pid,
            result: self.result,
        }
    }
}

/// The secret values of an attempt and the per-stream state of their masking.
#[derive(Debug, Default)]
struct Masking {
    masker: Masker,
    stdout: StreamMasker,
    stderr: StreamMasker,
}

impl Masking {
    fn new(masker: Masker) -> Masking {
        Masking {
            stdout: masker.stream(),
            stderr: masker.stream(),
            masker,
        }
    }
}

/// What the script set through the runtime helpers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelperValues {
    /// JSON text set with `output` (the attempt's result).
    pub output: Option<String>,
    /// Set with `set_condition`.
    pub condition: Option<bool>,
}

/// Sequential reader of a log from any offset. It reads only bytes the caller says are complete.
#[derive(Debug)]
pub struct LogReader {
    source: LogSource,
    path: PathBuf,
    position: u64,
    offset: u64,
    record_stream: LogStream,
    record_remaining: u64,
}

/// Where a [`LogReader`] reads the records from.
#[derive(Debug)]
enum LogSource {
    /// The attempt's `log` file.
    File(Arc<File>),
    /// The records of an attempt whose spool could not be written ([`Spool::unstored`]).
    Memory(Arc<[u8]>),
}

impl LogSource {
    fn read_exact_at(&self, buffer: &mut [u8], position: u64) -> io::Result<()> {
        match self {
            LogSource::File(file) => file.read_exact_at(buffer, position),
            LogSource::Memory(records) => {
                let bytes = usize::try_from(position)
                    .ok()
                    .and_then(|start| records.get(start..start.checked_add(buffer.len())?))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                buffer.copy_from_slice(bytes);
                Ok(())
            }
        }
    }
}

/// One piece of output read back from the log: all bytes of it come from one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPiece {
    pub offset: u64,
    pub stream: LogStream,
    pub data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SpecFile {
    job_id: String,
    attempt: u32,
    run_id: String,
    event_id: String,
}

#[derive(Serialize, Deserialize)]
struct ResultFile {
    status: FinalStatus,
    reason: Option<FailReason>,
    exit_code: Option<i32>,
    log_len: u64,
}

/// Checks that a job id can be used as part of a file name.
pub fn validate_job_id(job_id: &str) -> Result<(), SpoolError> {
    let safe = (1..=64).contains(&job_id.len())
        && job_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if safe {
        Ok(())
    } else {
        Err(SpoolError::UnsafeJobId(job_id.to_owned()))
    }
}

/// The directory name of an attempt, shared by the spool and the work dir.
pub fn attempt_dir_name(attempt: &AttemptRef) -> String {
    format!("{}-{}", attempt.job_id, attempt.attempt)
}

impl Spool {
    /// Opens (and creates, mode 0700) the spool root.
    pub fn open(root: PathBuf) -> Result<Spool, SpoolError> {
        create_private_dir(&root)?;
        Ok(Spool { root })
    }

    /// Creates the spool of a new attempt and writes its `spec.json`. An existing directory of
    /// the same attempt is replaced.
    pub fn create(&self, spec: &SpoolSpec, max_log_bytes: u64) -> Result<AttemptSpool, SpoolError> {
        validate_job_id(&spec.job_id)?;
        let attempt = AttemptRef {
            job_id: spec.job_id.clone(),
            attempt: spec.attempt,
        };
        let dir = self.root.join(attempt_dir_name(&attempt));
        let spec_file = SpecFile {
            job_id: spec.job_id.clone(),
            attempt: spec.attempt,
            run_id: spec.run_id.clone(),
            event_id: spec.event_id.clone(),
        };
        let json = serde_json::to_vec(&spec_file).map_err(|error| corrupt(&dir, error))?;
        create_attempt_dir(&dir)?;
        let log = Arc::new(open_log_for_append(&dir.join(LOG_FILE))?);
        let journal = HelperJournal::new(&dir);
        let spool = AttemptSpool::new(
            attempt,
            dir,
            journal,
            max_log_bytes,
            SpoolState {
                log: Some(Arc::clone(&log)),
                readable: Some(log),
                file_len: 0,
                log_len: 0,
                truncated: false,
                pid: None,
                result: None,
                output: None,
                condition: None,
                masking: Masking::default(),
            },
        );
        spool.write_record(&mut spool.lock(), Record::Spec, &json)?;
        Ok(spool)
    }

    /// The attempt of `spec` when its spool cannot be written ([`create`](Self::create) failed
    /// with `error`: a full disk, a read-only or missing directory). Nothing is kept on disk: its
    /// log is one system line saying why, held in memory, and it already has its result, failed
    /// with reason `spawn` (the script was not started). It is uploaded like any other attempt,
    /// so the control plane settles the job at once instead of when its lease runs out. Fails
    /// only for a job id that cannot name a directory (nothing may be deleted in its name).
    pub fn unstored(
        &self,
        spec: &SpoolSpec,
        error: &SpoolError,
    ) -> Result<AttemptSpool, SpoolError> {
        validate_job_id(&spec.job_id)?;
        let attempt = AttemptRef {
            job_id: spec.job_id.clone(),
            attempt: spec.attempt,
        };
        let dir = self.root.join(attempt_dir_name(&attempt));
        let message = format!(
            "[cronium: the job was not started: the agent cannot write its spool: {error}]\n"
        );
        let mut records = Vec::new();
        for piece in message.as_bytes().chunks(MAX_RECORD_DATA) {
            records.push(Record::Output(LogStream::System).byte());
            // A piece is at most MAX_RECORD_DATA bytes, far below u32::MAX.
            records.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            records.extend_from_slice(piece);
        }
        let log_len = message.len() as u64;
        let result = AttemptResult {
            outcome: Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Spawn),
                exit_code: None,
            },
            log_len,
        };
        let journal = HelperJournal::new(&dir);
        let mut spool = AttemptSpool::new(
            attempt,
            dir,
            journal,
            log_len,
            SpoolState {
                log: None,
                readable: None,
                file_len: records.len() as u64,
                log_len,
                truncated: false,
                pid: None,
                result: Some(result),
                output: None,
                condition: None,
                masking: Masking::default(),
            },
        );
        if let Some(inner) = Arc::get_mut(&mut spool.inner) {
            inner.memory_log = Some(records.into());
        }
        Ok(spool)
    }

    /// Loads every attempt left in the spool by an earlier agent process.
    ///
    /// An attempt without a result was running when that agent died: its process group is killed
    /// if it is still alive (identified by the recorded pid and a working directory inside
    /// `work_root`), a marker is appended to its log and it is settled as failed, reason `lost`.
    /// Unreadable directories are removed.
    pub fn recover(
        &self,
        max_log_bytes: u64,
        work_root: &Path,
    ) -> Result<Vec<AttemptSpool>, SpoolError> {
        let mut recovered = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(|source| io_error(&self.root, source))?;
        for entry in entries {
            let entry = entry.map_err(|source| io_error(&self.root, source))?;
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            match self.recover_one(&dir, max_log_bytes, work_root) {
                Ok(spool) => recovered.push(spool),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "removing an unreadable spool directory");
                    if let Err(error) = fs::remove_dir_all(&dir) {
                        tracing::warn!(dir = %dir.display(), %error, "could not remove the spool directory");
                    }
                }
            }
        }
        recovered.sort_by(|left, right| left.attempt().cmp(right.attempt()));
        Ok(recovered)
    }

    fn recover_one(
        &self,
        dir: &Path,
        max_log_bytes: u64,
        work_root: &Path,
    ) -> Result<AttemptSpool, SpoolError> {
        let log_path = dir.join(LOG_FILE);
        let log = open_log_for_append(&log_path)?;
        let mut scan = repair_log(&log, &log_path)?.with_legacy_files(dir)?;
        let pid = scan.pid;
        let result_bytes = scan.result.take();
        // Kill a job a dead agent left running first, even if the rest of its spool turns out
        // to be unreadable.
        if result_bytes.is_none()
            && let Some(pid) = pid
            && let Some(name) = dir.file_name()
        {
            kill_orphaned_group(pid, &work_root.join(name));
        }

        let spec_bytes = scan
            .spec
            .take()
            .ok_or_else(|| corrupt(&log_path, "the attempt has no spec"))?;
        let spec: SpecFile =
            serde_json::from_slice(&spec_bytes).map_err(|error| corrupt(&log_path, error))?;
        validate_job_id(&spec.job_id)?;
        let attempt = AttemptRef {
            job_id: spec.job_id,
            attempt: spec.attempt,
        };
        let dir_name = attempt_dir_name(&attempt);
        if dir.file_name().and_then(|name| name.to_str()) != Some(dir_name.as_str()) {
            return Err(corrupt(&log_path, "spec does not match the directory name"));
        }

        let result = result_bytes.and_then(|bytes| {
            match serde_json::from_slice::<ResultFile>(&bytes) {
                Ok(file) => Some(file.into()),
                // A legacy `result.json` cut short by an agent killed while writing it (a
                // record cut short is already gone): settled below as one without a result.
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "ignoring a torn result");
                    None
                }
            }
        });

        let output_path = dir.join("output.json");
        let output = match fs::read_to_string(&output_path) {
            Ok(text) => Some(text),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(io_error(&output_path, source)),
        };
        let condition_path = dir.join("condition");
        let condition = match fs::read_to_string(&condition_path) {
            Ok(text) => match text.trim() {
                "true" => Some(true),
                "false" => Some(false),
                other => {
                    return Err(corrupt(
                        &condition_path,
                        format!("{other:?} is not a boolean"),
                    ));
                }
            },
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(io_error(&condition_path, source)),
        };

        let journal = HelperJournal::load(dir)?;
        let truncated = scan.log_len >= max_log_bytes;
        let log = Arc::new(log);
        let spool = AttemptSpool::new(
            attempt,
            dir.to_path_buf(),
            journal,
            max_log_bytes,
            SpoolState {
                log: result.is_none().then(|| Arc::clone(&log)),
                readable: Some(log),
                file_len: scan.file_len,
                log_len: scan.log_len,
                truncated,
                pid,
                result,
                output,
                condition,
                masking: Masking::default(),
            },
        );
        if result.is_none() {
            spool.append(LogStream::System, RESTART_MARKER)?;
            spool.finish(Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code: None,
            })?;
            tracing::info!(job = %spool.attempt().job_id, attempt = spool.attempt().attempt, "settled an attempt interrupted by an agent restart");
        }
        Ok(spool)
    }
}

impl AttemptSpool {
    fn new(
        attempt: AttemptRef,
        dir: PathBuf,
        journal: HelperJournal,
        max_log_bytes: u64,
        state: SpoolState,
    ) -> AttemptSpool {
        AttemptSpool {
            inner: Arc::new(SpoolInner {
                attempt,
                dir,
                memory_log: None,
                max_log_bytes,
                state: Mutex::new(state),
                journal,
                changed: Notify::new(),
            }),
        }
    }

    /// The attempt this spool belongs to.
    pub fn attempt(&self) -> &AttemptRef {
        &self.inner.attempt
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The helper writes waiting for (or answered by) the control plane.
    pub fn journal(&self) -> &HelperJournal {
        &self.inner.journal
    }

    /// Notified after every change (appended output, pid, result). Call `enable` on the
    /// `Notified` future before reading [`progress`](Self::progress) so no wake-up is missed.
    pub fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// The current lengths, pid and result.
    pub fn progress(&self) -> Progress {
        self.lock().progress()
    }

    /// Appends output. Stdout and stderr count against `max_log_bytes`: the first write past it
    /// stores what fits plus one truncation marker, later writes are dropped. System records are
    /// always stored.
    pub fn append(&self, stream: LogStream, data: &[u8]) -> Result<(), SpoolError> {
        let mut state = self.lock();
        let masked = match stream {
            LogStream::Stdout => state.masking.stdout.push(data),
            LogStream::Stderr => state.masking.stderr.push(data),
            LogStream::System => state.masking.masker.mask(data),
        };
        self.append_locked(&mut state, stream, &masked)?;
        drop(state);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Sets the secret values masked in everything written from now on (before the attempt's
    /// process starts).
    pub fn set_masker(&self, masker: Masker) {
        self.lock().masking = Masking::new(masker);
    }

    /// The secret values masked in this attempt's output.
    pub fn masker(&self) -> Masker {
        self.lock().masking.masker.clone()
    }

    /// [`append`](Self::append) of already masked data, under the lock.
    fn append_locked(
        &self,
        state: &mut SpoolState,
        stream: LogStream,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        if stream == LogStream::System {
            self.write_records(state, stream, data)?;
        } else if !state.truncated {
            let room = self.inner.max_log_bytes.saturating_sub(state.log_len);
            if (data.len() as u64) <= room {
                self.write_records(state, stream, data)?;
            } else {
                // `room` is smaller than `data.len()`, so it fits in usize.
                self.write_records(state, stream, &data[..room as usize])?;
                let marker = format!(
                    "\n[cronium: output truncated after {} bytes]\n",
                    self.inner.max_log_bytes
                );
                self.write_records(state, LogStream::System, marker.as_bytes())?;
                state.truncated = true;
            }
        }
        Ok(())
    }

    /// Records the process id.
    pub fn record_pid(&self, pid: u32) -> Result<(), SpoolError> {
        let mut state = self.lock();
        self.write_record(&mut state, Record::Pid, &pid.to_be_bytes())?;
        state.pid = Some(pid);
        drop(state);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Stores the JSON text the script set with the `output` helper (last write wins). Ignored
    /// once the attempt has its result.
    pub fn set_output(&self, json: &str) -> Result<(), SpoolError> {
        let mut state = self.lock();
        if state.result.is_some() {
            return Ok(());
        }
        let json = mask_json(&state.masking.masker, json);
        write_atomically(&self.inner.dir.join("output.json"), json.as_bytes())?;
        state.output = Some(json);
        Ok(())
    }

    /// Stores the condition the script set with the `set_condition` helper (last write wins).
    /// Ignored once the attempt has its result.
    pub fn set_condition(&self, condition: bool) -> Result<(), SpoolError> {
        let mut state = self.lock();
        if state.result.is_some() {
            return Ok(());
        }
        let text = if condition { "true" } else { "false" };
        write_atomically(&self.inner.dir.join("condition"), text.as_bytes())?;
        state.condition = Some(condition);
        Ok(())
    }

    /// What the script set through the runtime helpers so far.
    pub fn helper_values(&self) -> HelperValues {
        let state = self.lock();
        HelperValues {
            output: state.output.clone(),
            condition: state.condition,
        }
    }

    /// Stores the result (a record after the whole output). A spool that already has a result
    /// keeps it. On a write error the result is still kept in memory.
    pub fn finish(&self, outcome: Outcome) -> Result<AttemptResult, SpoolError> {
        let mut state = self.lock();
        if let Some(result) = state.result {
            return Ok(result);
        }
        // What the maskers still hold back is output too (masked: it ends here).
        let mut flushed = Ok(());
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let tail = match stream {
                LogStream::Stdout => state.masking.stdout.finish(),
                _ => state.masking.stderr.finish(),
            };
            if flushed.is_ok() {
                flushed = self.append_locked(&mut state, stream, &tail);
            }
        }
        let result = AttemptResult {
            outcome,
            log_len: state.log_len,
        };
        let file = ResultFile {
            status: outcome.status,
            reason: outcome.reason,
            exit_code: outcome.exit_code,
            log_len: state.log_len,
        };
        let written = serde_json::to_vec(&file)
            .map_err(|error| corrupt(&self.inner.dir, error))
            .and_then(|json| self.write_record(&mut state, Record::Result, &json));
        // The result is kept in memory even when it could not be stored, so it is still
        // reported; only a restart of the agent before the upload would lose it.
        state.result = Some(result);
        state.log = None;
        drop(state);
        self.inner.changed.notify_waiters();
        flushed.and(written).map(|()| result)
    }

    /// Opens a reader positioned at log offset `offset`.
    pub fn reader(&self, offset: u64) -> Result<LogReader, SpoolError> {
        let (progress, readable) = {
            let state = self.lock();
            (state.progress(), state.readable.clone())
        };
        if offset > progress.log_len {
            return Err(SpoolError::OffsetBeyondLog {
                requested: offset,
                available: progress.log_len,
            });
        }
        let path = self.inner.dir.join(LOG_FILE);
        let source = match (&self.inner.memory_log, readable) {
            (Some(records), _) => LogSource::Memory(Arc::clone(records)),
            (None, Some(file)) => LogSource::File(file),
            // Removed: nothing left to read.
            (None, None) => {
                return Err(io_error(&path, io::Error::from(io::ErrorKind::NotFound)));
            }
        };
        LogReader::open(source, path, offset, progress.file_len)
    }

    /// Deletes the spool directory: its log, then the directory; only when it holds more (the
    /// helpers' files, a temporary file left by a crash, the files of an older agent) is it
    /// listed and emptied (most attempts use no helper, and listing costs four more system
    /// calls).
    pub fn remove(&self) -> Result<(), SpoolError> {
        {
            let mut state = self.lock();
            state.log = None;
            state.readable = None;
        }
        let dir = &self.inner.dir;
        // A failure here leaves the log to `remove_dir_all` below.
        let _ = fs::remove_file(dir.join(LOG_FILE));
        match fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(_) => match fs::remove_dir_all(dir) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(io_error(dir, source)),
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // A panic while holding this lock leaves the state consistent (every update is a single
        // assignment after the I/O), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends output as records of at most [`MAX_RECORD_DATA`] bytes.
    fn write_records(
        &self,
        state: &mut SpoolState,
        stream: LogStream,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        for piece in data.chunks(MAX_RECORD_DATA) {
            self.write_record(state, Record::Output(stream), piece)?;
            state.log_len += piece.len() as u64;
        }
        Ok(())
    }

    /// Appends one record (`data` of at most `u32::MAX` bytes) in one write.
    fn write_record(
        &self,
        state: &mut SpoolState,
        kind: Record,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        let path = || self.inner.dir.join(LOG_FILE);
        let Some(log) = state.log.as_deref() else {
            return Err(corrupt(&path(), "the attempt already has a result"));
        };
        let len = u32::try_from(data.len()).map_err(|_| corrupt(&path(), "record too long"))?;
        let mut record = Vec::with_capacity(RECORD_HEADER_LEN as usize + data.len());
        record.push(kind.byte());
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(data);
        let mut writer = log;
        if let Err(source) = writer.write_all(&record) {
            // Cut a partly written record off so the log stays a sequence of whole records.
            let _ = log.set_len(state.file_len);
            return Err(io_error(&path(), source));
        }
        state.file_len += record.len() as u64;
        Ok(())
    }
}

impl LogReader {
    fn open(
        source: LogSource,
        path: PathBuf,
        offset: u64,
        file_len: u64,
    ) -> Result<LogReader, SpoolError> {
        let mut reader = LogReader {
            source,
            path,
            position: 0,
            offset: 0,
            record_stream: LogStream::Stdout,
            record_remaining: 0,
        };
        while reader.offset < offset {
            let Some((stream, len)) = reader.read_header(file_len)? else {
                return Err(SpoolError::OffsetBeyondLog {
                    requested: offset,
                    available: reader.offset,
                });
            };
            let skip = len.min(offset - reader.offset);
            reader.position += skip;
            reader.offset += skip;
            reader.record_stream = stream;
            reader.record_remaining = len - skip;
        }
        Ok(reader)
    }

    /// The log offset of the next byte this reader returns.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads up to `max` bytes of one record, looking only at the first `file_len` bytes of the
    /// file. `Ok(None)` means everything up to `file_len` was read.
    pub fn next_piece(
        &mut self,
        file_len: u64,
        max: usize,
    ) -> Result<Option<LogPiece>, SpoolError> {
        while self.record_remaining == 0 {
            let Some((stream, len)) = self.read_header(file_len)? else {
                return Ok(None);
            };
            self.record_stream = stream;
            self.record_remaining = len;
        }
        let available = file_len.saturating_sub(self.position);
        let take = self.record_remaining.min(available).min(max as u64);
        if take == 0 {
            return Ok(None);
        }
        // `take` is at most `max`, a usize.
        let mut data = vec![0; take as usize];
        self.source
            .read_exact_at(&mut data, self.position)
            .map_err(|source| io_error(&self.path, source))?;
        let piece = LogPiece {
            offset: self.offset,
            stream: self.record_stream,
            data,
        };
        self.position += take;
        self.offset += take;
        self.record_remaining -= take;
        Ok(Some(piece))
    }

    /// The header of the next output record, past the spec, pid and result records.
    fn read_header(&mut self, file_len: u64) -> Result<Option<(LogStream, u64)>, SpoolError> {
        loop {
            if self.position + RECORD_HEADER_LEN > file_len {
                return Ok(None);
            }
            let mut header = [0u8; RECORD_HEADER_LEN as usize];
            self.source
                .read_exact_at(&mut header, self.position)
                .map_err(|source| io_error(&self.path, source))?;
            let kind = Record::parse(header[0])
                .ok_or_else(|| corrupt(&self.path, "unknown record kind"))?;
            let len = u64::from(u32::from_be_bytes([
                header[1], header[2], header[3], header[4],
            ]));
            if self.position + RECORD_HEADER_LEN + len > file_len {
                return Err(corrupt(&self.path, "record runs past the end of the log"));
            }
            self.position += RECORD_HEADER_LEN;
            match kind {
                Record::Output(stream) => return Ok(Some((stream, len))),
                Record::Spec | Record::Pid | Record::Result => self.position += len,
            }
        }
    }
}

/// Masks secret values in the JSON text of an `output` value: every string (keys too) and
/// number is masked where it holds a value; if the result still contains one (a value with
/// characters JSON escapes, or spanning syntax), the whole text is masked and kept as a JSON
/// string.
pub fn mask_json(masker: &Masker, json: &str) -> String {
    fn walk(masker: &Masker, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(text) => Value::String(masker.mask_str(&text)),
            Value::Number(number) if masker.contains_secret(number.to_string().as_bytes()) => {
                Value::String(masker.mask_str(&number.to_string()))
            }
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|item| walk(masker, item)).collect())
            }
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(key, item)| (masker.mask_str(&key), walk(masker, item)))
                    .collect(),
            ),
            other => other,
        }
    }
    if masker.is_empty() {
        return json.to_owned();
    }
    let masked = match serde_json::from_str::<serde_json::Value>(json) {
        Ok(value) => walk(masker, value).to_string(),
        Err(_) => json.to_owned(),
    };
    if !masker.contains_secret(masked.as_bytes()) {
        return masked;
    }
    let quoted = serde_json::Value::String(masker.mask_str(&masked)).to_string();
    if masker.contains_secret(quoted.as_bytes()) {
        // Escaping made a value appear again (it contains `\` or `"`): keep nothing.
        "\"***\"".to_owned()
    } else {
        quoted
    }
}

/// What [`scan_log`] found in a log.
struct LogScan {
    /// Bytes of the file.
    actual_len: u64,
    /// Bytes of whole records.
    file_len: u64,
    /// Bytes of output.
    log_len: u64,
    spec: Option<Vec<u8>>,
    pid: Option<u32>,
    result: Option<Vec<u8>>,
}

/// Walks the records of a log: the lengths and the spec, pid and result records. The whole
/// records end before a trailing partial one (left by a crash in the middle of a write), a
/// record of an unknown kind or a pid that is not 4 bytes.
fn scan_log(log: &File, path: &Path) -> Result<LogScan, SpoolError> {
    let actual_len = log
        .metadata()
        .map_err(|source| io_error(path, source))?
        .len();
    let mut scan = LogScan {
        actual_len,
        file_len: 0,
        log_len: 0,
        spec: None,
        pid: None,
        result: None,
    };
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    let read = |position: u64, len: u64| -> Result<Vec<u8>, SpoolError> {
        // `len` is within the file's length (checked by the caller).
        let mut data = vec![0; len as usize];
        log.read_exact_at(&mut data, position)
            .map_err(|source| io_error(path, source))?;
        Ok(data)
    };
    while scan.file_len + RECORD_HEADER_LEN <= actual_len {
        let position = scan.file_len;
        log.read_exact_at(&mut header, position)
            .map_err(|source| io_error(path, source))?;
        let len = u64::from(u32::from_be_bytes([
            header[1], header[2], header[3], header[4],
        ]));
        let data_at = position + RECORD_HEADER_LEN;
        if data_at + len > actual_len {
            break;
        }
        match Record::parse(header[0]) {
            Some(Record::Output(_)) => scan.log_len += len,
            Some(Record::Spec) => scan.spec = Some(read(data_at, len)?),
            Some(Record::Result) => scan.result = Some(read(data_at, len)?),
            Some(Record::Pid) if len == 4 => {
                let bytes = read(data_at, len)?;
                scan.pid = Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            }
            Some(Record::Pid) | None => break,
        }
        scan.file_len = data_at + len;
    }
    Ok(scan)
}

/// [`scan_log`] that cuts off what follows the whole records, so appends continue after them.
fn repair_log(log: &File, path: &Path) -> Result<LogScan, SpoolError> {
    let scan = scan_log(log, path)?;
    if scan.file_len != scan.actual_len {
        tracing::warn!(path = %path.display(), kept = scan.file_len, dropped = scan.actual_len - scan.file_len, "cutting a partial record off a spool log");
        log.set_len(scan.file_len)
            .map_err(|source| io_error(path, source))?;
    }
    Ok(scan)
}

/// The result stored in the spool directory `dir` of an attempt, if it has one yet: for tools
/// and tests that look at a spool from outside the agent (read only; nothing is repaired).
pub fn stored_result(dir: &Path) -> Result<Option<AttemptResult>, SpoolError> {
    let path = dir.join(LOG_FILE);
    let log = File::open(&path).map_err(|source| io_error(&path, source))?;
    let Some(bytes) = scan_log(&log, &path)?.with_legacy_files(dir)?.result else {
        return Ok(None);
    };
    let file: ResultFile = serde_json::from_slice(&bytes).map_err(|error| corrupt(&path, error))?;
    Ok(Some(file.into()))
}

impl From<ResultFile> for AttemptResult {
    fn from(file: ResultFile) -> AttemptResult {
        AttemptResult {
            outcome: Outcome {
                status: file.status,
                reason: file.reason,
                exit_code: file.exit_code,
            },
            log_len: file.log_len,
        }
    }
}

impl LogScan {
    /// Fills in the spec, pid and result the log has no record of from the files in which an
    /// agent built before those records kept them in the attempt's directory `dir`.
    fn with_legacy_files(mut self, dir: &Path) -> Result<LogScan, SpoolError> {
        let read = |name: &str| {
            let path = dir.join(name);
            match fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(io_error(&path, source)),
            }
        };
        if self.spec.is_none() {
            self.spec = read(LEGACY_SPEC_FILE)?;
        }
        if self.pid.is_none() {
            self.pid = read(LEGACY_PID_FILE)?
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| text.trim().parse::<u32>().ok());
        }
        if self.result.is_none() {
            self.result = read(LEGACY_RESULT_FILE)?;
        }
        Ok(self)
    }
}

/// Kills the process group `pgid` if one of its members still works inside `work_dir`, which
/// proves the group is the job's and not an unrelated one that reused the number.
fn kill_orphaned_group(pgid: u32, work_dir: &Path) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let work_dir = work_dir.to_string_lossy().into_owned();
    let mut belongs_to_job = false;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain anything, so parse after the last ')'.
        // The fields after it are: state, ppid, pgrp.
        let Some((_, after_name)) = stat.rsplit_once(')') else {
            continue;
        };
        let process_group = after_name
            .split_whitespace()
            .nth(2)
            .and_then(|field| field.parse::<u32>().ok());
        if process_group != Some(pgid) {
            continue;
        }
        let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else {
            continue;
        };
        if cwd.to_string_lossy().starts_with(&work_dir) {
            belongs_to_job = true;
            break;
        }
    }
    if belongs_to_job {
        tracing::warn!(
            pgid,
            "killing the process group of a job left running by an earlier agent"
        );
        // The pgid came from our own pid file and was verified above; i32 covers every Linux pid.
        let Ok(pgid) = i32::try_from(pgid) else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Creates the directory of a new attempt, private to the agent's user (mode 0700, which the
/// umask can only narrow), replacing one left by an earlier claim of the same attempt. One
/// `mkdir` in the common case: no look first, no `chmod` after.
fn create_attempt_dir(dir: &Path) -> Result<(), SpoolError> {
    let create = || fs::DirBuilder::new().mode(0o700).create(dir);
    match create() {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir_all(dir).map_err(|source| io_error(dir, source))?;
            create().map_err(|source| io_error(dir, source))
        }
        // The spool's root is gone (removed by hand): made again, as `Spool::open` does.
        Err(error) if error.kind() == io::ErrorKind::NotFound => create_private_dir(dir),
        Err(source) => Err(io_error(dir, source)),
    }
}

/// Creates a directory (and its parents) and makes it private to the agent's user.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SpoolError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io_error(dir, source))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| io_error(dir, source))
}

fn open_log_for_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_error(path, source))
}

/// Writes a file through a temporary sibling and renames it into place, so a reader (or the
/// agent after a crash) sees the old contents or the new ones, never a torn file.
///
/// There is deliberately no fsync: the control plane is the durable record of every job. The
/// spool has to survive the *agent process* (a crash, a restart, an upgrade), which the page
/// cache does; if the *machine* goes down, the job's processes die with it and the control plane
/// settles the attempt through its lease, whatever the spool held.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SpoolError> {
    let temporary = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|source| io_error(&temporary, source))?;
    file.write_all(contents)
        .map_err(|source| io_error(&temporary, source))?;
    fs::rename(&temporary, path).map_err(|source| io_error(path, source))
}

pub(crate) fn io_error(path: &Path, source: io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn corrupt(path: &Path, detail: impl ToString) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome of a script that exited 0.
    fn completed() -> Outcome {
        Outcome {
            status: FinalStatus::Completed,
            reason: None,
            exit_code: Some(0),
        }
    }

    fn spec(job_id: &str) -> SpoolSpec {
        SpoolSpec {
            job_id: job_id.into(),
            attempt: 1,
            run_id: "run".into(),
            event_id: "event".into(),
        }
    }

    fn read_all(spool: &AttemptSpool, offset: u64, max: usize) -> Vec<LogPiece> {
        let mut reader = spool.reader(offset).unwrap();
        let file_len = spool.progress().file_len;
        let mut pieces = Vec::new();
        while let Some(piece) = reader.next_piece(file_len, max).unwrap() {
            pieces.push(piece);
        }
        pieces
    }

    fn concat(pieces: &[LogPiece]) -> Vec<u8> {
        pieces.iter().flat_map(|piece| piece.data.clone()).collect()
    }

    #[test]
    fn an_unstored_attempt_is_failed_spawn_with_the_reason_in_its_log() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let error = io_error(
            &temp.path().join("spool/job-full-1/spec.json"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let attempt = spool.unstored(&spec("job-full"), &error).unwrap();
        let progress = attempt.progress();
        let result = progress.result.unwrap();
        assert_eq!(result.outcome.status, FinalStatus::Failed);
        assert_eq!(result.outcome.reason, Some(FailReason::Spawn));
        assert_eq!(result.outcome.exit_code, None);
        let log = String::from_utf8(concat(&read_all(&attempt, 0, 1 << 20))).unwrap();
        assert!(
            log.starts_with("[cronium: the job was not started"),
            "{log}"
        );
        assert!(log.contains("No space left on device"), "{log}");
        assert_eq!(result.log_len, log.len() as u64);
        assert!(
            read_all(&attempt, 0, 1 << 20)
                .iter()
                .all(|piece| piece.stream == LogStream::System)
        );
        // A resumed upload reads from the middle, in pieces.
        let tail = concat(&read_all(&attempt, 10, 7));
        assert_eq!(tail, log.as_bytes()[10..]);
        // Nothing is on disk, and nothing can be written.
        assert!(!attempt.dir().exists());
        assert!(attempt.append(LogStream::Stdout, b"late").is_err());
        attempt.remove().unwrap();
        // A job id that cannot name a directory is refused.
        assert!(matches!(
            spool.unstored(&spec("../x"), &error),
            Err(SpoolError::UnsafeJobId(_))
        ));
    }

    #[test]
    fn secret_values_never_reach_the_spool() {
        let canary = "canary-0d9e7f-secret";
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let attempt = spool.create(&spec("job-masked"), 1 << 20).unwrap();
        attempt.set_masker(Masker::new([canary, "abc"]));
        attempt
            .append(LogStream::Stdout, b"plain canary-0d9e7f-secret\n")
            .unwrap();
        // Split across two writes, with stderr in between.
        attempt
            .append(LogStream::Stdout, b"split canary-0d9")
            .unwrap();
        attempt.append(LogStream::Stderr, b"err abc\n").unwrap();
        attempt.append(LogStream::Stdout, b"e7f-secret!\n").unwrap();
        attempt
            .append(LogStream::System, b"[cronium: canary-0d9e7f-secret]\n")
            .unwrap();
        // A tail that could start the value waits, and is written (masked) with the result.
        attempt.append(LogStream::Stdout, b"end canary-0").unwrap();
        attempt
            .set_output(&serde_json::json!({"token": canary, "n": 1, canary: [canary]}).to_string())
            .unwrap();
        let result = attempt.finish(completed()).unwrap();
        let log = String::from_utf8(concat(&read_all(&attempt, 0, 1 << 20))).unwrap();
        assert_eq!(
            log,
            "plain ***\nsplit err abc\n***!\n[cronium: ***]\nend canary-0"
        );
        assert_eq!(result.log_len, log.len() as u64);
        let output = attempt.helper_values().output.unwrap();
        assert!(!output.contains(canary), "{output}");
        let value: serde_json::Value = serde_json::from_str(&output).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"token": "***", "n": 1, "***": ["***"]})
        );
        let on_disk = fs::read(attempt.dir().join("output.json")).unwrap();
        assert!(!String::from_utf8_lossy(&on_disk).contains(canary));

        // JSON escaping cannot smuggle a value out: the whole text is masked.
        let quoted = Masker::new(["a\"quoted\"secret"]);
        let escaped = mask_json(
            &quoted,
            &serde_json::json!({"v": "a\"quoted\"secret"}).to_string(),
        );
        assert!(!escaped.contains("quoted"), "{escaped}");
        assert_eq!(mask_json(&Masker::default(), "{\"a\":1}"), "{\"a\":1}");
    }

    #[test]
    fn records_round_trip_and_can_be_read_from_any_offset() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let attempt = spool.create(&spec("job-1"), 1 << 20).unwrap();
        attempt.append(LogStream::Stdout, b"hello ").unwrap();
        // The spec, pid and result records between the output are not output.
        attempt.record_pid(42).unwrap();
        attempt.append(LogStream::Stderr, b"oops\n").unwrap();
        attempt.append(LogStream::Stdout, b"world\n").unwrap();
        let all = b"hello oops\nworld\n";
        assert_eq!(attempt.progress().log_len, all.len() as u64);

        let pieces = read_all(&attempt, 0, 1024);
        let streams: Vec<LogStream> = pieces.iter().map(|piece| piece.stream).collect();
        assert_eq!(
            streams,
            [LogStream::Stdout, LogStream::Stderr, LogStream::Stdout]
        );
        assert_eq!(concat(&pieces), all);

        for offset in 0..=all.len() {
            for max in [1, 2, 5, 1024] {
                let pieces = read_all(&attempt, offset as u64, max);
                assert_eq!(concat(&pieces), &all[offset..], "offset {offset} max {max}");
                let mut expected_offset = offset as u64;
                for piece in &pieces {
                    assert_eq!(piece.offset, expected_offset);
                    assert!(piece.data.len() <= max);
                    expected_offset += piece.data.len() as u64;
                }
            }
        }
        assert!(matches!(
            attempt.reader(all.len() as u64 + 1),
            Err(SpoolError::OffsetBeyondLog { .. })
        ));
        attempt.finish(completed()).unwrap();
        assert_eq!(concat(&read_all(&attempt, 0, 1024)), all);
        assert_eq!(concat(&read_all(&attempt, 6, 1024)), &all[6..]);
        assert_eq!(attempt.progress().pid, Some(42));
    }

    #[test]
    fn output_past_the_cap_is_replaced_by_one_marker() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let attempt = spool.create(&spec("job-cap"), 10).unwrap();
        attempt.append(LogStream::Stdout, b"0123456").unwrap();
        attempt.append(LogStream::Stdout, b"789abcdef").unwrap();
        attempt.append(LogStream::Stderr, b"dropped").unwrap();
        attempt.append(LogStream::System, b"[system]").unwrap();
        let pieces = read_all(&attempt, 0, 1024);
        let text = String::from_utf8(concat(&pieces)).unwrap();
        assert_eq!(
            text,
            "0123456789\n[cronium: output truncated after 10 bytes]\n[system]"
        );
        assert_eq!(pieces[2].stream, LogStream::System);
        assert_eq!(attempt.progress().log_len, text.len() as u64);
    }

    #[test]
    fn unsafe_job_ids_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        for job_id in ["", "../x", "a/b", "a b", "x\0", &"a".repeat(65)] {
            assert!(
                matches!(
                    spool.create(&spec(job_id), 10),
                    Err(SpoolError::UnsafeJobId(_))
                ),
                "{job_id:?}"
            );
        }
        assert!(validate_job_id("01J_abc-DEF").is_ok());
    }

    #[test]
    fn helper_values_survive_a_restart_and_freeze_with_the_result() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        {
            let spool = Spool::open(root.clone()).unwrap();
            let attempt = spool.create(&spec("helped"), 1 << 20).unwrap();
            assert_eq!(attempt.helper_values(), HelperValues::default());
            attempt.set_output("1").unwrap();
            attempt.set_output(r#"{"a":2}"#).unwrap();
            attempt.set_condition(false).unwrap();
            attempt.finish(completed()).unwrap();
            // After the result, the values no longer change.
            attempt.set_output("3").unwrap();
            attempt.set_condition(true).unwrap();
        }
        let spool = Spool::open(root).unwrap();
        let recovered = spool.recover(1 << 20, &temp.path().join("work")).unwrap();
        assert_eq!(
            recovered[0].helper_values(),
            HelperValues {
                output: Some(r#"{"a":2}"#.to_owned()),
                condition: Some(false),
            }
        );
    }

    /// Cuts the last `bytes` bytes off a file.
    fn cut(path: &Path, bytes: u64) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len - bytes).unwrap();
    }

    #[test]
    fn records_cut_short_by_a_crash_read_as_not_written() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        let work = temp.path().join("work");
        {
            let spool = Spool::open(root.clone()).unwrap();
            let torn = spool.create(&spec("torn"), 1 << 20).unwrap();
            torn.record_pid(0).unwrap();
            torn.append(LogStream::Stdout, b"all of it\n").unwrap();
            torn.finish(completed()).unwrap();
            assert_eq!(
                stored_result(torn.dir())
                    .unwrap()
                    .map(|result| result.outcome),
                Some(completed())
            );
            let unnamed = spool.create(&spec("unnamed"), 1 << 20).unwrap();
            assert_eq!(stored_result(unnamed.dir()).unwrap(), None);
        }
        // The agent died while writing each last record: the result cut in half, the spec
        // (the first record) cut before its end.
        cut(&root.join("torn-1/log"), 20);
        assert_eq!(stored_result(&root.join("torn-1")).unwrap(), None);
        cut(&root.join("unnamed-1/log"), 1);

        let spool = Spool::open(root.clone()).unwrap();
        let recovered = spool.recover(1 << 20, &work).unwrap();
        // Without its spec the attempt cannot be named: removed, left to the lease.
        assert!(!root.join("unnamed-1").exists());
        assert_eq!(recovered.len(), 1);
        // Without a readable result the attempt is settled as lost, its log kept.
        let progress = recovered[0].progress();
        assert_eq!(
            progress.result.unwrap().outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code: None
            }
        );
        let text = String::from_utf8(concat(&read_all(&recovered[0], 0, 1024))).unwrap();
        assert!(text.starts_with("all of it\n"), "{text:?}");
        // Settled once: the rewritten result is read back as it is.
        let again = spool.recover(1 << 20, &work).unwrap();
        assert_eq!(again[0].progress().result, progress.result);
    }

    #[test]
    fn removal_takes_the_whole_directory_whatever_the_attempt_wrote() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let finish = |attempt: &AttemptSpool| attempt.finish(completed()).unwrap();
        // The common case: spec, pid, log and result.
        let plain = spool.create(&spec("plain"), 1 << 20).unwrap();
        plain.record_pid(0).unwrap();
        plain.append(LogStream::Stdout, b"hi\n").unwrap();
        finish(&plain);
        // Files of the helpers, and one left behind by a crash.
        let helped = spool.create(&spec("helped"), 1 << 20).unwrap();
        helped.set_output("{\"a\":1}").unwrap();
        helped.set_condition(true).unwrap();
        fs::write(helped.dir().join("output.tmp"), b"{").unwrap();
        finish(&helped);
        // Removed before it ever started or ended.
        let early = spool.create(&spec("early"), 1 << 20).unwrap();
        for attempt in [&plain, &helped, &early] {
            attempt.remove().unwrap();
            assert!(!attempt.dir().exists(), "{}", attempt.dir().display());
            // Removing again is not an error.
            attempt.remove().unwrap();
        }
    }

    #[test]
    fn creating_an_attempt_again_starts_it_afresh() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        let spool = Spool::open(root.clone()).unwrap();
        let first = spool.create(&spec("again"), 1 << 20).unwrap();
        first.append(LogStream::Stdout, b"old output\n").unwrap();
        first.set_condition(false).unwrap();
        let second = spool.create(&spec("again"), 1 << 20).unwrap();
        assert_eq!(second.progress().log_len, 0);
        assert!(!second.dir().join("condition").exists());
        // Its directory is private, and made again if the spool's root was removed by hand.
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(second.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        fs::remove_dir_all(&root).unwrap();
        let third = spool.create(&spec("again"), 1 << 20).unwrap();
        assert!(third.dir().join(LOG_FILE).exists());
    }

    /// An attempt spooled by an agent built before the spec, pid and result were records of the
    /// log (an update installed while results waited for the control plane) is recovered.
    #[test]
    fn attempts_spooled_in_files_of_their_own_are_recovered() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        let work = temp.path().join("work");
        let spec_json = |job: &str| {
            format!(r#"{{"job_id":"{job}","attempt":1,"run_id":"run","event_id":"event"}}"#)
        };
        let output = |data: &[u8]| {
            let mut record = vec![0];
            record.extend_from_slice(&(data.len() as u32).to_be_bytes());
            record.extend_from_slice(data);
            record
        };
        for job in ["ended", "cut-off"] {
            let dir = root.join(format!("{job}-1"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(LEGACY_SPEC_FILE), spec_json(job)).unwrap();
            fs::write(dir.join(LEGACY_PID_FILE), "0").unwrap();
            fs::write(dir.join(LOG_FILE), output(b"old output\n")).unwrap();
        }
        fs::write(
            root.join("ended-1").join(LEGACY_RESULT_FILE),
            r#"{"status":"Completed","reason":null,"exit_code":0,"log_len":11}"#,
        )
        .unwrap();
        assert_eq!(
            stored_result(&root.join("ended-1"))
                .unwrap()
                .map(|result| result.log_len),
            Some(11)
        );

        let spool = Spool::open(root.clone()).unwrap();
        let recovered = spool.recover(1 << 20, &work).unwrap();
        let names: Vec<&str> = recovered
            .iter()
            .map(|spool| spool.attempt().job_id.as_str())
            .collect();
        assert_eq!(names, ["cut-off", "ended"]);
        let ended = recovered[1].progress();
        assert_eq!(ended.pid, Some(0));
        assert_eq!(
            ended.result,
            Some(AttemptResult {
                outcome: completed(),
                log_len: 11
            })
        );
        assert_eq!(concat(&read_all(&recovered[1], 0, 1024)), b"old output\n");
        // Without its result the attempt is settled as lost, its log kept, as in the new layout.
        let cut_off = recovered[0].progress().result.unwrap();
        assert_eq!(cut_off.outcome.reason, Some(FailReason::Lost));
        let text = String::from_utf8(concat(&read_all(&recovered[0], 0, 1024))).unwrap();
        assert_eq!(
            text,
            "old output\n\n[cronium: agent restarted while the job ran]\n"
        );
        // Settled once, and removed whole.
        let again = spool.recover(1 << 20, &work).unwrap();
        assert_eq!(again[0].progress().result, Some(cut_off));
        for attempt in &again {
            attempt.remove().unwrap();
            assert!(!attempt.dir().exists());
        }
    }

    #[test]
    fn recovery_settles_an_attempt_without_result_and_keeps_finished_ones() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        let work = temp.path().join("work");
        {
            let spool = Spool::open(root.clone()).unwrap();
            let running = spool.create(&spec("running"), 1 << 20).unwrap();
            running
                .append(LogStream::Stdout, b"partial output\n")
                .unwrap();
            // The pid of this test process is not in a process group working inside `work`,
            // so recovery must not kill anything.
            running.record_pid(std::process::id()).unwrap();
            let finished = spool.create(&spec("finished"), 1 << 20).unwrap();
            finished.append(LogStream::Stdout, b"done\n").unwrap();
            finished.finish(completed()).unwrap();
        }
        // Simulate a crash in the middle of a record write.
        let mut log = OpenOptions::new()
            .append(true)
            .open(root.join("running-1/log"))
            .unwrap();
        log.write_all(&[0, 0, 0, 0, 9, b'x']).unwrap();
        drop(log);
        fs::create_dir_all(root.join("garbage")).unwrap();

        let spool = Spool::open(root.clone()).unwrap();
        let recovered = spool.recover(1 << 20, &work).unwrap();
        assert!(!root.join("garbage").exists());
        let names: Vec<&str> = recovered
            .iter()
            .map(|spool| spool.attempt().job_id.as_str())
            .collect();
        assert_eq!(names, ["finished", "running"]);

        let finished = &recovered[0];
        let result = finished.progress().result.unwrap();
        assert_eq!(result.outcome.status, FinalStatus::Completed);
        assert_eq!(result.log_len, 5);

        let running = &recovered[1];
        let progress = running.progress();
        let result = progress.result.unwrap();
        assert_eq!(
            result.outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code: None
            }
        );
        let text = String::from_utf8(concat(&read_all(running, 0, 1024))).unwrap();
        assert_eq!(
            text,
            "partial output\n\n[cronium: agent restarted while the job ran]\n"
        );
        assert_eq!(result.log_len, text.len() as u64);

        // A second recovery changes nothing.
        let again = spool.recover(1 << 20, &work).unwrap();
        assert_eq!(again[1].progress().result, Some(result));
    }
    #[tokio::test]
    async fn recovery_kills_a_job_group_left_running() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("spool");
        let work = temp.path().join("work");
        let spool = Spool::open(root.clone()).unwrap();
        let attempt = spool.create(&spec("orphan"), 1 << 20).unwrap();
        let work_dir = work.join("orphan-1");
        fs::create_dir_all(&work_dir).unwrap();
        // A job process group as a crashed agent would leave it: a leader and a background child.
        let mut leader = tokio::process::Command::new("bash")
            .args(["-c", "sleep 1000 & sleep 1000"])
            .current_dir(&work_dir)
            .process_group(0)
            .spawn()
            .unwrap();
        attempt.record_pid(leader.id().unwrap()).unwrap();
        drop(attempt);

        let recovered = spool.recover(1 << 20, &work).unwrap();
        assert_eq!(recovered.len(), 1);
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), leader.wait())
            .await
            .expect("the orphaned group was killed")
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
