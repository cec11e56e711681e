//! One terminal session: its state machine, scrollback, viewers and lifecycle.
//!
//! # States (forward only)
//!
//! ```text
//! Running ──(shell exited | TerminalClose | idle timeout | maximum age | agent stopping)──▶ Ending
//! Ending  ──(shell reaped, session killed, remaining output read)──▶ Exited{code}
//! Exited  ──(threads joined, removed from the table)──▶ Gone{code}
//! ```
//!
//! Only a `Running` session accepts new viewers. In `Ending` the supervisor hangs the session up
//! (SIGHUP to the process group and every process of the session, SIGKILL after
//! [`KILL_GRACE`]), waits for the shell to be reaped and reads what is left on the PTY. In
//! `Exited` every viewer receives its queued output and then the exit code. [`Phase::advance`]
//! refuses to go back.
//!
//! # Output and flow control
//!
//! The reader thread appends every chunk to the scrollback (a ring of the last
//! `scrollback_bytes`) and offers it to every attached viewer. Each viewer has a queue bounded by
//! [`VIEWER_QUEUE_BYTES`]: a viewer whose queue cannot take the chunk misses it and is flagged
//! lagging; once it has drained half its queue, the next chunk is preceded by one
//! [`LAG_MARKER`]. When *every* attached
//! viewer is full the reader waits until one has room, which stops reading the PTY and so
//! throttles the program to the pace of the fastest viewer. A viewer takes everything queued
//! for it at once, merged up to `MAX_TERMINAL_CHUNK` (a PTY read is about 4 KiB), so a viewer
//! that is behind gets fewer, larger messages. With no viewer attached the reader
//! keeps reading into the scrollback only, so a detached program never blocks on its output.
//! Input has its own bounded channel and thread and never waits behind output.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cronium_protocol::MAX_TERMINAL_CHUNK;
use portable_pty::MasterPty;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::pty::{self, POLL_INTERVAL};

/// Most output queued for one viewer; a viewer that falls further behind misses output.
pub(crate) const VIEWER_QUEUE_BYTES: usize = 256 * 1024;

/// What a viewer that missed output sees before live output resumes.
pub const LAG_MARKER: &[u8] = b"\r\n[cronium: output skipped, this viewer was too slow]\r\n";

/// Time between SIGHUP and SIGKILL when the agent ends a session.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long the output left on the PTY may take to be read once the shell is gone.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// How long the PTY threads may take to stop before they are left behind (logged).
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Pieces of input queued for the writer thread.
const INPUT_QUEUE: usize = 16;

/// Where a session is in its life; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Ending,
    Exited(Option<i32>),
    /// Removed from the table; keeps the exit code for viewers that have not read it yet.
    Gone(Option<i32>),
}

impl Phase {
    fn rank(self) -> u8 {
        match self {
            Phase::Running => 0,
            Phase::Ending => 1,
            Phase::Exited(_) => 2,
            Phase::Gone(_) => 3,
        }
    }

    /// Moves to `next` if that is forward; returns whether it moved.
    pub(crate) fn advance(&mut self, next: Phase) -> bool {
        if next.rank() > self.rank() {
            *self = next;
            true
        } else {
            false
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    ShellExited,
    Closed,
    IdleTimeout,
    MaxAge,
    AgentStopping,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::ShellExited => "the shell exited",
            EndReason::Closed => "closed by a viewer",
            EndReason::IdleTimeout => "idle timeout",
            EndReason::MaxAge => "maximum age reached",
            EndReason::AgentStopping => "the agent is stopping",
        }
    }
}

/// The last output of a session, bounded; replayed to viewers that attach.
#[derive(Debug)]
pub(crate) struct Scrollback {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes were dropped from the front, so the first byte may be inside a UTF-8 sequence.
    trimmed: bool,
}

impl Scrollback {
    pub(crate) fn new(capacity: usize) -> Scrollback {
        Scrollback {
            bytes: VecDeque::with_capacity(capacity.min(64 * 1024)),
            capacity,
            trimmed: false,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let data = if data.len() > self.capacity {
            self.trimmed = true;
            &data[data.len() - self.capacity..]
        } else {
            data
        };
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.bytes.drain(..overflow);
            self.trimmed = true;
        }
        self.bytes.extend(data);
    }

    /// The content as chunks of at most `MAX_TERMINAL_CHUNK`, starting at a character
    /// boundary: leading UTF-8 continuation bytes of a trimmed buffer are skipped.
    pub(crate) fn replay(&self) -> VecDeque<Bytes> {
        let skip = if self.trimmed {
            self.bytes
                .iter()
                .take(3)
                .take_while(|byte| (0x80..0xC0).contains(*byte))
                .count()
        } else {
            0
        };
        let (front, back) = self.bytes.as_slices();
        let mut all = Vec::with_capacity(self.bytes.len());
        all.extend_from_slice(front);
        all.extend_from_slice(back);
        let all = Bytes::from(all).slice(skip..);
        (0..all.len())
            .step_by(MAX_TERMINAL_CHUNK)
            .map(|start| all.slice(start..(start + MAX_TERMINAL_CHUNK).min(all.len())))
            .collect()
    }
}

/// What a viewer receives next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerEvent {
    /// Terminal bytes (replay or live).
    Output(Bytes),
    /// The replay is complete; live output follows (attached viewers only).
    ReplayDone,
    /// The session ended; nothing follows.
    Exit(Option<i32>),
}

/// One attached viewer's queue.
struct Slot {
    id: u64,
    replay: VecDeque<Bytes>,
    replay_marker: bool,
    queue: VecDeque<Bytes>,
    queued: usize,
    lagging: bool,
    wake: Arc<Notify>,
}

impl Slot {
    fn needs(&self, len: usize) -> usize {
        len + if self.lagging { LAG_MARKER.len() } else { 0 }
    }

    /// Whether the chunk can be queued. A lagging viewer resumes only once it has drained half
    /// its queue, so a viewer that reads nothing gets one marker, not one per gap.
    fn fits(&self, len: usize) -> bool {
        let limit = if self.lagging {
            VIEWER_QUEUE_BYTES / 2
        } else {
            VIEWER_QUEUE_BYTES
        };
        self.queued + self.needs(len) <= limit
    }

    fn offer(&mut self, data: &Bytes) {
        if !self.fits(data.len()) {
            self.lagging = true;
            return;
        }
        if self.lagging {
            self.lagging = false;
            self.queue.push_back(Bytes::from_static(LAG_MARKER));
            self.queued += LAG_MARKER.len();
        }
        self.queue.push_back(data.clone());
        self.queued += data.len();
        self.wake.notify_one();
    }
}

struct Shared {
    phase: Phase,
    scrollback: Scrollback,
    viewers: Vec<Slot>,
    next_viewer: u64,
    /// Since when no viewer is attached (`None` while one is).
    detached_since: Option<Instant>,
}

/// Timeouts and sizes of one session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_age: Duration,
    pub(crate) scrollback_bytes: usize,
}

/// A live terminal session. Shared by the table, its supervisor, its reader thread and its
/// viewers.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) pid: u32,
    limits: SessionLimits,
    shared: Mutex<Shared>,
    /// Signalled whenever a viewer's queue shrinks or the viewer set changes (the reader may
    /// be waiting for room).
    room: Condvar,
    /// Keystrokes for the writer thread; taken (closing the channel) when the session ends.
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// The PTY master (for resizes); dropped when the session ends.
    master: Mutex<Option<Box<dyn MasterPty + Send>>>,
    /// Cancelled by `TerminalClose`.
    close: CancellationToken,
    /// Notified (one permit) when a viewer attaches or detaches.
    viewers_changed: Notify,
}

/// The threads and channels of a started session, owned by its supervisor.
pub(crate) struct Running {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    waiter: JoinHandle<()>,
    reader_stop: Arc<AtomicBool>,
    exited: oneshot::Receiver<Option<i32>>,
}

impl Session {
    /// Wraps a spawned shell into a session and starts its threads. On failure the shell is
    /// killed and reaped before the error is returned.
    pub(crate) fn start(
        id: String,
        spawned: pty::Spawned,
        limits: SessionLimits,
    ) -> std::io::Result<(Arc<Session>, Running)> {
        let pty::Spawned {
            pid,
            master,
            reader,
            writer,
            child,
        } = spawned;
        let (input, input_receiver) = mpsc::channel(INPUT_QUEUE);
        let session = Arc::new(Session {
            id,
            pid,
            limits,
            shared: Mutex::new(Shared {
                phase: Phase::Running,
                scrollback: Scrollback::new(limits.scrollback_bytes),
                viewers: Vec::new(),
                next_viewer: 0,
                detached_since: Some(Instant::now()),
            }),
            room: Condvar::new(),
            input: Mutex::new(Some(input)),
            master: Mutex::new(Some(master)),
            close: CancellationToken::new(),
            viewers_changed: Notify::new(),
        });
        let short = &session.id[..8.min(session.id.len())];
        let (exited_sender, exited) = oneshot::channel();
        let waiter = match pty::start_waiter(format!("pty-wait-{short}"), child, exited_sender) {
            Ok(waiter) => waiter,
            Err(error) => {
                // Without a waiter nothing reaps the shell: kill it; the child handle is gone
                // with the failed spawn, so reap by pid.
                pty::signal_session(pid, libc::SIGKILL);
                reap(pid);
                return Err(error);
            }
        };
        let reader_stop = Arc::new(AtomicBool::new(false));
        let threads = (|| {
            let deliver_to = session.clone();
            let stop = reader_stop.clone();
            let reader = pty::start_reader(
                format!("pty-read-{short}"),
                reader,
                reader_stop.clone(),
                move |chunk| deliver_to.deliver(chunk, &stop),
            )?;
            let writer = pty::start_writer(format!("pty-write-{short}"), writer, input_receiver)?;
            Ok::<_, std::io::Error>((reader, writer))
        })();
        match threads {
            Ok((reader, writer)) => Ok((
                session,
                Running {
                    reader,
                    writer,
                    waiter,
                    reader_stop,
                    exited,
                },
            )),
            Err(error) => {
                reader_stop.store(true, Ordering::Release);
                pty::signal_session(pid, libc::SIGKILL);
                session
                    .master
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                session
                    .input
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let _ = waiter.join();
                Err(error)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Every critical section leaves `Shared` consistent, so a poisoned lock is usable.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current phase.
    #[cfg(test)]
    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Number of attached viewers.
    #[cfg(test)]
    pub(crate) fn viewer_count(&self) -> usize {
        self.lock().viewers.len()
    }

    /// Called by the reader thread for every chunk read from the PTY.
    fn deliver(&self, chunk: &[u8], stop: &AtomicBool) {
        let mut shared = self.lock();
        shared.scrollback.push(chunk);
        if shared.viewers.is_empty() {
            return;
        }
        let data = Bytes::copy_from_slice(chunk);
        // Backpressure: while no attached viewer can take the chunk, stop reading the PTY.
        while !shared.viewers.is_empty()
            && shared.viewers.iter().all(|slot| !slot.fits(data.len()))
            && !stop.load(Ordering::Acquire)
        {
            shared = self
                .room
                .wait_timeout(shared, POLL_INTERVAL)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        for slot in &mut shared.viewers {
            slot.offer(&data);
        }
    }

    /// Attaches a viewer if the session is running; `replay` queues the scrollback first.
    pub(crate) fn attach(self: &Arc<Session>, replay: bool) -> Option<Viewer> {
        let mut shared = self.lock();
        if shared.phase != Phase::Running {
            return None;
        }
        let id = shared.next_viewer;
        shared.next_viewer += 1;
        let replay_chunks = if replay {
            shared.scrollback.replay()
        } else {
            VecDeque::new()
        };
        shared.viewers.push(Slot {
            id,
            replay: replay_chunks,
            replay_marker: replay,
            queue: VecDeque::new(),
            queued: 0,
            lagging: false,
            wake: Arc::new(Notify::new()),
        });
        shared.detached_since = None;
        drop(shared);
        self.viewers_changed.notify_one();
        Some(Viewer {
            session: self.clone(),
            id,
        })
    }

    fn detach(&self, id: u64) {
        let mut shared = self.lock();
        shared.viewers.retain(|slot| slot.id != id);
        if shared.viewers.is_empty() && shared.detached_since.is_none() {
            shared.detached_since = Some(Instant::now());
        }
        drop(shared);
        self.room.notify_all();
        self.viewers_changed.notify_one();
    }

    /// Asks the supervisor to end the session.
    pub(crate) fn request_close(&self) {
        self.close.cancel();
    }

    /// Moves the phase forward and wakes every viewer (they may have to send the exit).
    fn advance(&self, next: Phase) {
        let mut shared = self.lock();
        if shared.phase.advance(next) {
            for slot in &shared.viewers {
                slot.wake.notify_one();
            }
        }
        drop(shared);
        self.room.notify_all();
    }

    /// Runs the session until it ends; returns the shell's exit code (`None`: killed).
    pub(crate) async fn supervise(
        self: Arc<Session>,
        mut running: Running,
        stopping: CancellationToken,
    ) -> Option<i32> {
        let started = tokio::time::Instant::now();
        let max_age = started + self.limits.max_age;
        // `Some(code)`: the shell has exited (and is reaped) already.
        let (reason, exited): (EndReason, Option<Option<i32>>) = loop {
            let idle_deadline = self.lock().detached_since.map(|since| {
                let idle_for = since.elapsed();
                tokio::time::Instant::now() + self.limits.idle_timeout.saturating_sub(idle_for)
            });
            tokio::select! {
                code = &mut running.exited => break (EndReason::ShellExited, Some(code.unwrap_or(None))),
                () = self.close.cancelled() => break (EndReason::Closed, None),
                () = tokio::time::sleep_until(max_age) => break (EndReason::MaxAge, None),
                () = sleep_until_some(idle_deadline) => {
                    if self.lock().viewers.is_empty() {
                        break (EndReason::IdleTimeout, None);
                    }
                }
                () = self.viewers_changed.notified() => {}
                () = stopping.cancelled() => break (EndReason::AgentStopping, None),
            }
        };
        self.advance(Phase::Ending);
        tracing::info!(session = %self.id, pid = self.pid, reason = reason.as_str(), "terminal session ending");
        let code = match exited {
            Some(code) => code,
            None => {
                // Hang up: the shell and its jobs get SIGHUP (and SIGCONT), SIGKILL after a
                // grace period.
                pty::signal_session(self.pid, libc::SIGHUP);
                match tokio::time::timeout(KILL_GRACE, &mut running.exited).await {
                    Ok(code) => code.unwrap_or(None),
                    Err(_) => {
                        pty::signal_session(self.pid, libc::SIGKILL);
                        (&mut running.exited).await.unwrap_or(None)
                    }
                }
            }
        };
        // Whatever the shell left behind in its session (background jobs) goes with it.
        pty::signal_session(self.pid, libc::SIGKILL);

        // Read what is left on the PTY; it reaches end of file once every process is gone.
        let stop = running.reader_stop.clone();
        let mut reader = tokio::task::spawn_blocking(move || running.reader.join());
        if tokio::time::timeout(DRAIN_WAIT, &mut reader).await.is_err() {
            stop.store(true, Ordering::Release);
            self.room.notify_all();
            let _ = reader.await;
        }
        self.advance(Phase::Exited(code));
        // Closing the input channel ends the writer; dropping the master closes the PTY.
        self.input
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        self.master
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let (writer, waiter) = (running.writer, running.waiter);
        let joined = tokio::task::spawn_blocking(move || {
            let _ = writer.join();
            let _ = waiter.join();
        });
        if tokio::time::timeout(JOIN_WAIT, joined).await.is_err() {
            tracing::warn!(session = %self.id, "a terminal's PTY threads did not stop in time");
        }
        tracing::info!(session = %self.id, ?code, "terminal session ended");
        code
    }

    /// Marks the session as removed from the table.
    pub(crate) fn gone(&self) {
        let code = match self.lock().phase {
            Phase::Exited(code) | Phase::Gone(code) => code,
            Phase::Running | Phase::Ending => None,
        };
        self.advance(Phase::Gone(code));
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reaps `pid` (blocking) when no child handle is left to do it.
fn reap(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let mut status = 0;
    // SAFETY: plain syscall on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// A viewer attached to a session. Dropping it detaches the viewer; the session lives on.
pub struct Viewer {
    session: Arc<Session>,
    id: u64,
}

impl Viewer {
    /// The session's id.
    pub fn session_id(&self) -> &str {
        &self.session.id
    }

    /// The shell's process id.
    pub fn pid(&self) -> u32 {
        self.session.pid
    }

    /// The next thing to send to this viewer. Cancel-safe.
    pub async fn next(&self) -> ViewerEvent {
        loop {
            match self.poll_event() {
                Ok(event) => return event,
                Err(wake) => wake.notified().await,
            }
        }
    }

    /// The next event if one is ready, else what to wait on. A stored `notify_one` permit makes
    /// a wake-up between this call and the wait impossible to lose.
    fn poll_event(&self) -> Result<ViewerEvent, Arc<Notify>> {
        let mut shared = self.session.lock();
        let phase = shared.phase;
        let Some(slot) = shared.viewers.iter_mut().find(|slot| slot.id == self.id) else {
            return Ok(ViewerEvent::Exit(None));
        };
        if let Some(chunk) = slot.replay.pop_front() {
            return Ok(ViewerEvent::Output(chunk));
        }
        if slot.replay_marker {
            slot.replay_marker = false;
            return Ok(ViewerEvent::ReplayDone);
        }
        if let Some(first) = slot.queue.pop_front() {
            slot.queued -= first.len();
            // What was queued behind it goes out with it, up to one chunk's worth: while the
            // viewer is behind, fewer and larger messages cost less per byte on every hop.
            let mut len = first.len();
            let mut more = Vec::new();
            while let Some(next) = slot.queue.front()
                && len + next.len() <= MAX_TERMINAL_CHUNK
            {
                len += next.len();
                slot.queued -= next.len();
                more.extend(slot.queue.pop_front());
            }
            drop(shared);
            self.session.room.notify_all();
            if more.is_empty() {
                return Ok(ViewerEvent::Output(first));
            }
            let mut merged = BytesMut::with_capacity(len);
            merged.extend_from_slice(&first);
            for next in &more {
                merged.extend_from_slice(next);
            }
            return Ok(ViewerEvent::Output(merged.freeze()));
        }
        match phase {
            Phase::Exited(code) => Ok(ViewerEvent::Exit(code)),
            Phase::Gone(code) => Ok(ViewerEvent::Exit(code)),
            Phase::Running | Phase::Ending => Err(slot.wake.clone()),
        }
    }

    /// The next event if one is ready (tests drain queues with it).
    #[cfg(test)]
    pub(crate) fn try_next(&self) -> Option<ViewerEvent> {
        self.poll_event().ok()
    }

    /// Sends keystrokes to the PTY; waits while the input queue is full. Returns `false` when
    /// the session no longer takes input.
    pub async fn input(&self, data: Vec<u8>) -> bool {
        let sender = self
            .session
            .input
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match sender {
            Some(sender) => sender.send(data).await.is_ok(),
            None => false,
        }
    }

    /// Changes the PTY's window size (TIOCSWINSZ); a failure is logged and otherwise ignored.
    pub fn resize(&self, cols: u16, rows: u16) {
        if cols == 0 || rows == 0 {
            tracing::debug!(cols, rows, "ignoring a terminal resize to zero");
            return;
        }
        let master = self
            .session
            .master
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(master) = master.as_ref()
            && let Err(error) = master.resize(pty::size(cols, rows))
        {
            tracing::warn!(session = %self.session.id, %error, "resizing a terminal failed");
        }
    }

    /// Ends the session for every viewer.
    pub fn close_session(&self) {
        self.session.request_close();
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.session.detach(self.id);
    }
}
