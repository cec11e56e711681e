//! Terminal sessions on the agent's host: a shell on a PTY, relayed to browsers by the control
//! plane over QUIC streams the control plane opens on the agent's connection.
//!
//! [`Terminals`] is the table of live sessions (at most `max_sessions`) and the entry point of the
//! control plane's terminal streams ([`Terminals::serve_stream`], see `stream`). A session
//! ([`session`]) outlives its viewers and the QUIC connection: viewers come and go (a refresh,
//! a reconnect, a second browser), and it ends when its shell exits, when a viewer closes it,
//! after `idle_timeout` without any viewer, after `max_age`, or when the agent stops. Every ended
//! session is reported once through [`Terminals::next_ended`] (sent as `TerminalEnded` on the
//! control stream), and [`Terminals::live_sessions`] goes into every hello.
//!
//! The shell is the agent user's login shell from the user database (`getpwuid_r`), or
//! `--terminal-shell`, or `/bin/sh`; it starts in the user's home with a clean environment:
//! `TERM=xterm-256color`, `COLORTERM=truecolor`, `HOME`, `USER`, `LOGNAME`, `SHELL`, the agent's
//! sanitized `PATH`, and `LANG` (the agent's when it is a UTF-8 locale, else `C.UTF-8`).

mod pty;
pub mod session;
mod stream;

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cronium_protocol::{TerminalEnded, TerminalOpen, TerminalOpened, TerminalRefusal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::pty::Launch;
pub use self::session::{LAG_MARKER, Viewer, ViewerEvent};
use self::session::{Session, SessionLimits};

/// Default idle timeout of a session without viewers.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Default maximum age of a session.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 60);

/// Longest idle timeout or maximum age a session gets, whatever is asked (keeps every deadline
/// far from overflowing).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default number of sessions an agent runs at once.
pub const DEFAULT_MAX_SESSIONS: usize = 16;

/// Default scrollback kept per session, replayed on attach.
pub const DEFAULT_SCROLLBACK_BYTES: usize = 256 * 1024;

/// The terminal settings of an agent (`cronium-agent run --terminal-…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalOptions {
    /// `false` (`--no-terminals`): every open is refused with `Disabled`.
    pub enabled: bool,
    /// The shell; `None`: the agent user's login shell (or `/bin/sh`).
    pub shell: Option<PathBuf>,
    /// Output kept per session for viewers that attach later.
    pub scrollback_bytes: usize,
    /// A session without viewers for this long is ended (unless the open asks for another).
    pub idle_timeout: Duration,
    /// A session older than this is ended (unless the open asks for another).
    pub max_age: Duration,
    /// Sessions at once; more are refused with `Limit`.
    pub max_sessions: usize,
}

impl Default for TerminalOptions {
    fn default() -> TerminalOptions {
        TerminalOptions {
            enabled: true,
            shell: None,
            scrollback_bytes: DEFAULT_SCROLLBACK_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_age: DEFAULT_MAX_AGE,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// The agent's terminal sessions. Cheap to clone.
#[derive(Clone)]
pub struct Terminals {
    inner: Arc<Inner>,
}

struct Inner {
    options: TerminalOptions,
    launch: Launch,
    table: Mutex<Table>,
    /// Owns every session supervisor and stream task.
    tracker: TaskTracker,
    /// Cancelled when the agent stops: every session ends, new ones are refused.
    stopping: CancellationToken,
    ended_sender: mpsc::UnboundedSender<TerminalEnded>,
    ended: tokio::sync::Mutex<mpsc::UnboundedReceiver<TerminalEnded>>,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Arc<Session>>,
    /// Sessions being spawned (they count against the limit).
    starting: usize,
}

impl Terminals {
    /// The terminal table of an agent whose sanitized base PATH is `path` and whose own `LANG`
    /// is `agent_lang`.
    pub fn new(options: TerminalOptions, path: &str, agent_lang: Option<&str>) -> Terminals {
        let launch = launch_for(&options, path, agent_lang);
        if options.enabled && !pty::is_executable(&launch.shell) {
            tracing::warn!(shell = %launch.shell.display(), "the terminal shell is not an executable file; terminal sessions will fail to start");
        }
        let (ended_sender, ended) = mpsc::unbounded_channel();
        Terminals {
            inner: Arc::new(Inner {
                options,
                launch,
                table: Mutex::new(Table::default()),
                tracker: TaskTracker::new(),
                stopping: CancellationToken::new(),
                ended_sender,
                ended: tokio::sync::Mutex::new(ended),
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent.
        self.inner
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The shell new sessions start.
    pub fn shell(&self) -> &Path {
        &self.inner.launch.shell
    }

    /// Ids of the live sessions (for the hello).
    pub fn live_sessions(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.table().sessions.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The next session that ended (to report on the control stream). Cancel-safe.
    pub async fn next_ended(&self) -> TerminalEnded {
        let mut ended = self.inner.ended.lock().await;
        match ended.recv().await {
            Some(ended) => ended,
            // The sender lives in `inner`, as long as `self`.
            None => std::future::pending().await,
        }
    }

    /// Drops the reports of ended sessions (a hello lists the live ones instead).
    pub fn clear_ended(&self) {
        if let Ok(mut ended) = self.inner.ended.try_lock() {
            while ended.try_recv().is_ok() {}
        }
    }

    /// Opens a new session or attaches to a live one, as `request` asks. The answer is what
    /// the agent sends back; a viewer comes with `Started` and `Attached`.
    pub async fn open(&self, request: &TerminalOpen) -> (TerminalOpened, Option<Viewer>) {
        if !self.inner.options.enabled {
            return refused(
                TerminalRefusal::Disabled,
                "terminals are turned off on this agent (--no-terminals)",
            );
        }
        if self.inner.stopping.is_cancelled() {
            return refused(TerminalRefusal::Disabled, "the agent is stopping");
        }
        if let Some(id) = &request.session {
            let session = self.table().sessions.get(id).cloned();
            return match session.and_then(|session| session.attach(true)) {
                Some(viewer) => {
                    tracing::info!(session = %id, opened_by = %printable(&request.opened_by), "terminal viewer attached");
                    (
                        TerminalOpened::Attached {
                            session: id.clone(),
                        },
                        Some(viewer),
                    )
                }
                None => refused(
                    TerminalRefusal::NoSuchSession,
                    "no such terminal session (it ended, or never existed)",
                ),
            };
        }
        {
            let mut table = self.table();
            if table.sessions.len() + table.starting >= self.inner.options.max_sessions {
                let message = format!(
                    "this agent runs {} terminal sessions, its limit (--terminal-max-sessions)",
                    self.inner.options.max_sessions
                );
                return refused(TerminalRefusal::Limit, &message);
            }
            table.starting += 1;
        }
        let result = self.start(request).await;
        self.table().starting -= 1;
        match result {
            Ok((session, viewer)) => {
                tracing::info!(session = %session.id, pid = session.pid, opened_by = %printable(&request.opened_by), shell = %self.inner.launch.shell.display(), "terminal session started");
                (
                    TerminalOpened::Started {
                        session: session.id.clone(),
                        pid: session.pid,
                    },
                    Some(viewer),
                )
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "a terminal session could not be started");
                refused(
                    TerminalRefusal::Spawn,
                    &format!(
                        "the shell {} could not be started: {error:#}",
                        self.inner.launch.shell.display()
                    ),
                )
            }
        }
    }

    async fn start(&self, request: &TerminalOpen) -> anyhow::Result<(Arc<Session>, Viewer)> {
        let options = &self.inner.options;
        let limits = SessionLimits {
            idle_timeout: pick(request.idle_timeout_ms, options.idle_timeout),
            max_age: pick(request.max_age_ms, options.max_age),
            scrollback_bytes: options.scrollback_bytes,
        };
        let launch = self.inner.launch.clone();
        let (cols, rows) = (request.cols, request.rows);
        let id = hex::encode(rand::random::<[u8; 16]>());
        // Forking is blocking work: keep it off the async workers.
        let (session, running) = tokio::task::spawn_blocking(move || {
            let spawned = pty::spawn(&launch, cols, rows)?;
            Ok::<_, anyhow::Error>(Session::start(id, spawned, limits)?)
        })
        .await??;
        self.table()
            .sessions
            .insert(session.id.clone(), session.clone());
        let terminals = self.clone();
        let supervised = session.clone();
        let stopping = self.inner.stopping.clone();
        self.inner.tracker.spawn(async move {
            let code = supervised.clone().supervise(running, stopping).await;
            terminals.table().sessions.remove(&supervised.id);
            supervised.gone();
            let _ = terminals.inner.ended_sender.send(TerminalEnded {
                session: supervised.id.clone(),
                code,
            });
        });
        // The idle timer runs from the start; the opener attaches right away.
        let viewer = session
            .attach(false)
            .ok_or_else(|| anyhow::anyhow!("the session ended at once"))?;
        Ok((session, viewer))
    }

    /// Serves one terminal stream the control plane opened (see `stream`), on a task of this
    /// table.
    pub fn serve_stream(&self, send: quinn::SendStream, recv: quinn::RecvStream) {
        let terminals = self.clone();
        self.inner
            .tracker
            .spawn(stream::serve(terminals, send, recv));
    }

    /// Ends every session (their viewers get `TerminalExit`), refuses new ones and waits up to
    /// `wait` for the sessions and their streams to finish.
    pub async fn stop(&self, wait: Duration) {
        self.inner.stopping.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(wait, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some terminal sessions did not end in time");
        }
    }

    /// The phase of a session, for tests.
    #[cfg(test)]
    fn phase_of(&self, id: &str) -> Option<session::Phase> {
        self.table().sessions.get(id).map(|session| session.phase())
    }

    /// Number of viewers of a session, for tests.
    #[cfg(test)]
    fn viewers_of(&self, id: &str) -> usize {
        self.table()
            .sessions
            .get(id)
            .map_or(0, |session| session.viewer_count())
    }
}

fn refused(reason: TerminalRefusal, message: &str) -> (TerminalOpened, Option<Viewer>) {
    (
        TerminalOpened::Refused {
            reason,
            message: message.to_owned(),
        },
        None,
    )
}

/// A timeout from the open (milliseconds, 0 = none) or the agent's own, at most
/// [`MAX_TIMEOUT`].
fn pick(requested_ms: u64, default: Duration) -> Duration {
    let picked = if requested_ms == 0 {
        default
    } else {
        Duration::from_millis(requested_ms)
    };
    picked.min(MAX_TIMEOUT)
}

/// Text from the network, made safe to log.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|character| !character.is_control())
        .take(100)
        .collect()
}

/// The agent user's entry of the user database.
struct Passwd {
    name: String,
    home: PathBuf,
    shell: PathBuf,
}

/// Looks up the agent's effective user with `getpwuid_r`.
fn agent_passwd() -> Option<Passwd> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut size = 1024;
    loop {
        let mut buffer = vec![0u8; size];
        // SAFETY: all-zero is a valid `passwd` (integers and null pointers).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        if code == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if code != 0 || result.is_null() {
            return None;
        }
        let text = |pointer: *const libc::c_char| {
            if pointer.is_null() {
                Vec::new()
            } else {
                // SAFETY: getpwuid_r filled `entry` with NUL-terminated strings in `buffer`,
                // which is alive here.
                unsafe { CStr::from_ptr(pointer) }.to_bytes().to_vec()
            }
        };
        return Some(Passwd {
            name: String::from_utf8_lossy(&text(entry.pw_name)).into_owned(),
            home: PathBuf::from(OsStr::from_bytes(&text(entry.pw_dir))),
            shell: PathBuf::from(OsStr::from_bytes(&text(entry.pw_shell))),
        });
    }
}

/// Whether a locale name is a UTF-8 one (`C.UTF-8`, `en_US.utf8`, …).
fn is_utf8_locale(lang: &str) -> bool {
    let lower = lang.to_ascii_lowercase();
    lower.contains("utf-8") || lower.contains("utf8")
}

/// The shell, environment and working directory of new sessions.
fn launch_for(options: &TerminalOptions, path: &str, agent_lang: Option<&str>) -> Launch {
    let passwd = agent_passwd();
    let shell = options
        .shell
        .clone()
        .or_else(|| {
            passwd
                .as_ref()
                .map(|passwd| passwd.shell.clone())
                .filter(|shell| pty::is_executable(shell))
        })
        .unwrap_or_else(|| PathBuf::from("/bin/sh"));
    let home = passwd
        .as_ref()
        .map(|passwd| passwd.home.clone())
        .filter(|home| home.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"));
    let name = passwd.as_ref().map(|passwd| passwd.name.clone());
    let lang = agent_lang
        .filter(|lang| is_utf8_locale(lang))
        .unwrap_or("C.UTF-8");
    let mut env = vec![
        ("TERM".to_owned(), "xterm-256color".to_owned()),
        ("COLORTERM".to_owned(), "truecolor".to_owned()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("SHELL".to_owned(), shell.to_string_lossy().into_owned()),
        ("PATH".to_owned(), path.to_owned()),
        ("LANG".to_owned(), lang.to_owned()),
    ];
    if let Some(name) = name {
        env.push(("USER".to_owned(), name.clone()));
        env.push(("LOGNAME".to_owned(), name));
    }
    Launch {
        shell,
        env,
        cwd: home,
    }
}

#[cfg(test)]
mod tests;
