//! Terminal sessions on real PTYs and real shells: lifecycle, replay, flow control, limits and
//! leaks. Waits are polls with deadlines; nothing asserts a duration.

use std::time::{Duration, Instant};

use cronium_protocol::{MAX_TERMINAL_CHUNK, TerminalOpen, TerminalOpened, TerminalRefusal};

use super::session::{Phase, Scrollback};
use super::*;

/// Generous upper bound of every wait (shared, slow CI machines).
const DEADLINE: Duration = Duration::from_secs(30);

/// PTYs are a process-wide resource the leak test counts: the tests that open them run one at
/// a time.
static PTY_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options() -> TerminalOptions {
    TerminalOptions {
        shell: Some(PathBuf::from("/bin/sh")),
        ..TerminalOptions::default()
    }
}

fn terminals(options: TerminalOptions) -> Terminals {
    Terminals::new(
        options,
        crate::runner::process::DEFAULT_PATH,
        Some("C.UTF-8"),
    )
}

fn open_request(session: Option<&str>) -> TerminalOpen {
    TerminalOpen {
        session: session.map(str::to_owned),
        cols: 100,
        rows: 30,
        opened_by: "tester".into(),
        idle_timeout_ms: 0,
        max_age_ms: 0,
    }
}

/// Opens a new session; returns its id, the shell's pid and the viewer.
async fn start(terminals: &Terminals) -> (String, u32, Viewer) {
    match terminals.open(&open_request(None)).await {
        (TerminalOpened::Started { session, pid }, Some(viewer)) => (session, pid, viewer),
        (other, _) => panic!("expected a started session, got {other:?}"),
    }
}

/// Reads the viewer's output until it contains `needle`; returns everything read.
async fn read_until(viewer: &Viewer, needle: &str) -> Vec<u8> {
    let needle = needle.as_bytes();
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let data = match tokio::time::timeout(left, viewer.next()).await {
            Ok(ViewerEvent::Output(data)) => data,
            Ok(ViewerEvent::ReplayDone) => continue,
            Ok(ViewerEvent::Exit(code)) => panic!(
                "the session exited ({code:?}) before {:?} appeared; the output ended with {:?}",
                String::from_utf8_lossy(needle),
                tail(&seen)
            ),
            Err(_) => panic!(
                "{:?} did not appear within {DEADLINE:?}; the output ended with {:?}",
                String::from_utf8_lossy(needle),
                tail(&seen)
            ),
        };
        // Only the new bytes (and a needle's length before them) can complete a match.
        let from = seen.len().saturating_sub(needle.len());
        seen.extend_from_slice(&data);
        if contains(&seen[from..], needle) {
            return seen;
        }
    }
}

/// The last few hundred bytes of `output`, for failure messages.
fn tail(output: &[u8]) -> String {
    String::from_utf8_lossy(&output[output.len().saturating_sub(300)..]).into_owned()
}

/// Reads until the session's exit; returns the output and the code.
async fn read_to_exit(viewer: &Viewer) -> (Vec<u8>, Option<i32>) {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, viewer.next()).await {
            Ok(ViewerEvent::Output(data)) => seen.extend_from_slice(&data),
            Ok(ViewerEvent::ReplayDone) => {}
            Ok(ViewerEvent::Exit(code)) => return (seen, code),
            Err(_) => panic!("the session did not exit within {DEADLINE:?}"),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Waits for the report of an ended session.
async fn ended(terminals: &Terminals) -> TerminalEnded {
    tokio::time::timeout(DEADLINE, terminals.next_ended())
        .await
        .expect("no session ended in time")
}

/// Whether `pid` exists at all (alive or a zombie).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Open descriptors of this process.
fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Descriptors of this process that are PTY masters or slaves.
fn pty_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            target == "/dev/ptmx" || target.starts_with("/dev/pts/")
        })
        .count()
}

#[test]
fn the_scrollback_keeps_the_newest_bytes_and_replays_from_a_character_boundary() {
    let mut scrollback = Scrollback::new(10);
    scrollback.push(b"abc");
    let replay: Vec<u8> = scrollback.replay().into_iter().flatten().collect();
    assert_eq!(replay, b"abc");

    // "€" is three bytes: 3 + 9 bytes are trimmed to the last ten.
    scrollback.push("€€€".as_bytes());
    let replay: Vec<u8> = scrollback.replay().into_iter().flatten().collect();
    assert_eq!(String::from_utf8(replay).unwrap(), "c€€€");
    scrollback.push(b"x");
    let replay: Vec<u8> = scrollback.replay().into_iter().flatten().collect();
    assert_eq!(String::from_utf8(replay).unwrap(), "€€€x");
    scrollback.push(b"yz");
    // 10 bytes kept: the tail of the first "€" (2 bytes) is skipped.
    let replay: Vec<u8> = scrollback.replay().into_iter().flatten().collect();
    assert_eq!(String::from_utf8(replay).unwrap(), "€€xyz");

    // More than the capacity at once keeps the newest bytes.
    scrollback.push(b"0123456789ABCDEF");
    let replay: Vec<u8> = scrollback.replay().into_iter().flatten().collect();
    assert_eq!(replay, b"6789ABCDEF");

    // Long replays come in protocol-sized chunks.
    let mut big = Scrollback::new(3 * MAX_TERMINAL_CHUNK + 5);
    big.push(&vec![b'a'; 4 * MAX_TERMINAL_CHUNK]);
    let chunks = big.replay();
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|chunk| chunk.len() <= MAX_TERMINAL_CHUNK));
    assert_eq!(
        chunks.iter().map(|chunk| chunk.len()).sum::<usize>(),
        3 * MAX_TERMINAL_CHUNK + 5
    );
}

#[test]
fn requested_timeouts_are_bounded() {
    assert_eq!(pick(0, Duration::from_secs(5)), Duration::from_secs(5));
    assert_eq!(
        pick(1500, Duration::from_secs(5)),
        Duration::from_millis(1500)
    );
    assert_eq!(pick(u64::MAX, Duration::from_secs(5)), MAX_TIMEOUT);
    assert_eq!(pick(0, Duration::MAX), MAX_TIMEOUT);
}

#[test]
fn phases_only_move_forward() {
    let mut phase = Phase::Running;
    assert!(phase.advance(Phase::Ending));
    assert!(!phase.advance(Phase::Running));
    assert!(phase.advance(Phase::Exited(Some(0))));
    assert!(!phase.advance(Phase::Ending));
    assert!(!phase.advance(Phase::Exited(None)));
    assert_eq!(phase, Phase::Exited(Some(0)));
    assert!(phase.advance(Phase::Gone(Some(0))));
    assert!(!phase.advance(Phase::Gone(None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_commands_replays_to_a_second_viewer_and_closes_for_both() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    let (id, pid, first) = start(&terminals).await;
    assert_eq!(id.len(), 32, "128 random bits in hex: {id}");
    assert!(id.bytes().all(|byte| byte.is_ascii_hexdigit()));
    assert_eq!(terminals.live_sessions(), vec![id.clone()]);

    assert!(first.input(b"echo \"size $(stty size)\"\n".to_vec()).await);
    read_until(&first, "size 30 100").await;
    assert!(first.input(b"echo hello-$((6*7))\n".to_vec()).await);
    read_until(&first, "hello-42").await;

    // A second viewer gets the recent output, the end of the replay, then live output.
    let (answer, second) = terminals.open(&open_request(Some(&id))).await;
    assert_eq!(
        answer,
        TerminalOpened::Attached {
            session: id.clone()
        }
    );
    let second = second.unwrap();
    let mut replay = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, second.next()).await.unwrap() {
            ViewerEvent::Output(data) => replay.extend_from_slice(&data),
            ViewerEvent::ReplayDone => break,
            ViewerEvent::Exit(code) => panic!("exited during the replay: {code:?}"),
        }
    }
    assert!(contains(&replay, b"hello-42"), "replay: {}", tail(&replay));
    assert_eq!(terminals.viewers_of(&id), 2);
    first.resize(120, 40);
    assert!(second.input(b"echo \"both $(stty size)\"\n".to_vec()).await);
    read_until(&first, "both 40 120").await;
    read_until(&second, "both 40 120").await;

    // Detaching one viewer leaves the session to the other.
    drop(second);
    assert_eq!(terminals.viewers_of(&id), 1);
    assert_eq!(terminals.phase_of(&id), Some(Phase::Running));

    first.close_session();
    let (_, code) = read_to_exit(&first).await;
    assert_eq!(code, None, "a closed session was killed");
    let report = ended(&terminals).await;
    assert_eq!(report.session, id);
    assert!(terminals.live_sessions().is_empty());
    assert!(!process_exists(pid), "the shell {pid} was not reaped");

    // Attaching to an ended session is refused.
    let (answer, viewer) = terminals.open(&open_request(Some(&id))).await;
    assert!(viewer.is_none());
    assert!(matches!(
        answer,
        TerminalOpened::Refused {
            reason: TerminalRefusal::NoSuchSession,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_that_exits_reports_its_code_to_its_viewers() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    let (id, pid, viewer) = start(&terminals).await;
    assert!(viewer.input(b"exit 7\n".to_vec()).await);
    let (_, code) = read_to_exit(&viewer).await;
    assert_eq!(code, Some(7));
    assert_eq!(
        ended(&terminals).await,
        TerminalEnded {
            session: id,
            code: Some(7)
        }
    );
    assert!(!process_exists(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_viewers_is_reaped_after_its_idle_timeout() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(TerminalOptions {
        idle_timeout: Duration::from_millis(300),
        ..options()
    });
    let (id, pid, viewer) = start(&terminals).await;
    // A background job of the session goes with it.
    assert!(
        viewer
            .input(b"sleep 1000 & echo started-$((1+1))\n".to_vec())
            .await
    );
    read_until(&viewer, "started-2").await;
    drop(viewer);
    let report = ended(&terminals).await;
    assert_eq!(report.session, id);
    assert!(!process_exists(pid));
    let deadline = Instant::now() + DEADLINE;
    while !pty::session_members(pid as libc::pid_t).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes of the session are left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_asks_for_its_own_maximum_age() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    let request = TerminalOpen {
        max_age_ms: 300,
        ..open_request(None)
    };
    let (TerminalOpened::Started { session, .. }, Some(viewer)) = terminals.open(&request).await
    else {
        panic!("not started");
    };
    // The viewer stays attached: the maximum age ends the session anyway.
    let (_, code) = read_to_exit(&viewer).await;
    assert_eq!(code, None);
    assert_eq!(ended(&terminals).await.session, session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_switches_refuse_with_a_reason() {
    let _guard = PTY_TESTS.lock().await;
    let disabled = terminals(TerminalOptions {
        enabled: false,
        ..options()
    });
    let (answer, viewer) = disabled.open(&open_request(None)).await;
    assert!(viewer.is_none());
    assert!(matches!(
        answer,
        TerminalOpened::Refused {
            reason: TerminalRefusal::Disabled,
            ..
        }
    ));

    let limited = terminals(TerminalOptions {
        max_sessions: 1,
        ..options()
    });
    let (_, _, viewer) = start(&limited).await;
    let (answer, refused) = limited.open(&open_request(None)).await;
    assert!(refused.is_none());
    match answer {
        TerminalOpened::Refused {
            reason: TerminalRefusal::Limit,
            message,
        } => assert!(message.contains("--terminal-max-sessions"), "{message}"),
        other => panic!("expected a limit refusal, got {other:?}"),
    }
    let (answer, _) = limited.open(&open_request(Some("0123"))).await;
    assert!(matches!(
        answer,
        TerminalOpened::Refused {
            reason: TerminalRefusal::NoSuchSession,
            ..
        }
    ));

    let broken = terminals(TerminalOptions {
        shell: Some(PathBuf::from("/nonexistent/shell")),
        ..options()
    });
    let (answer, _) = broken.open(&open_request(None)).await;
    assert!(
        matches!(
            answer,
            TerminalOpened::Refused {
                reason: TerminalRefusal::Spawn,
                ..
            }
        ),
        "{answer:?}"
    );

    // Stopping the agent ends the sessions and refuses new ones.
    limited.stop(DEADLINE).await;
    let (_, code) = read_to_exit(&viewer).await;
    assert_eq!(code, None);
    let (answer, _) = limited.open(&open_request(None)).await;
    assert!(matches!(
        answer,
        TerminalOpened::Refused {
            reason: TerminalRefusal::Disabled,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_viewer_misses_output_with_one_marker_while_the_fast_one_gets_everything() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    let (id, _, fast) = start(&terminals).await;
    let (_, slow) = terminals.open(&open_request(Some(&id))).await;
    let slow = slow.unwrap();
    // Far more than a viewer's queue; the slow viewer reads nothing meanwhile.
    let total = 4 * session::VIEWER_QUEUE_BYTES;
    let command =
        format!("head -c {total} /dev/zero | tr '\\0' '\\171'; echo; echo flood-$((2+3))\n");
    assert!(fast.input(command.into_bytes()).await);
    let seen = read_until(&fast, "flood-5").await;
    let ys = seen.iter().filter(|byte| **byte == b'y').count();
    assert_eq!(ys, total, "the fast viewer got every byte");
    assert!(!contains(&seen, LAG_MARKER));

    // The slow viewer holds at most its queue; once it has caught up, one marker precedes
    // live output again.
    let mut seen = Vec::new();
    while let Some(event) = slow.try_next() {
        if let ViewerEvent::Output(data) = event {
            seen.extend_from_slice(&data);
        }
    }
    assert!(fast.input(b"echo after-$((3+4))\n".to_vec()).await);
    seen.extend(read_until(&slow, "after-7").await);
    let ys = seen.iter().filter(|byte| **byte == b'y').count();
    assert!(
        ys < total && ys <= session::VIEWER_QUEUE_BYTES,
        "the slow viewer got {ys} bytes"
    );
    let markers = seen
        .windows(LAG_MARKER.len())
        .filter(|window| *window == LAG_MARKER)
        .count();
    assert_eq!(markers, 1, "exactly one marker");
    fast.close_session();
    read_to_exit(&fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_slow_viewer_throttles_the_program_and_loses_nothing() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    let (_, _, viewer) = start(&terminals).await;
    let total = 3 * session::VIEWER_QUEUE_BYTES;
    let command =
        format!("head -c {total} /dev/zero | tr '\\0' '\\161'; echo; echo done-$((4+4))\n");
    assert!(viewer.input(command.into_bytes()).await);
    let seen = read_until(&viewer, "done-8").await;
    assert_eq!(seen.iter().filter(|byte| **byte == b'q').count(), total);
    assert!(!contains(&seen, LAG_MARKER));
    viewer.close_session();
    read_to_exit(&viewer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_leave_no_descriptor_and_no_process() {
    let _guard = PTY_TESTS.lock().await;
    let terminals = terminals(options());
    // One session first, so whatever the runtime opens lazily is open before counting.
    let (_, _, warm_up) = start(&terminals).await;
    warm_up.close_session();
    read_to_exit(&warm_up).await;
    drop(warm_up);
    ended(&terminals).await;
    let before = (descriptors(), pty_descriptors());
    let mut pids = Vec::new();
    for round in 0..4 {
        let (_, pid, viewer) = start(&terminals).await;
        pids.push(pid);
        assert!(pty_descriptors() > before.1);
        if round % 2 == 0 {
            assert!(viewer.input(b"exit\n".to_vec()).await);
        } else {
            viewer.close_session();
        }
        read_to_exit(&viewer).await;
        ended(&terminals).await;
    }
    let deadline = Instant::now() + DEADLINE;
    while (descriptors(), pty_descriptors()) != before {
        assert!(
            Instant::now() < deadline,
            "(all, PTY) descriptors: {before:?} before, {:?} after",
            (descriptors(), pty_descriptors())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in pids {
        assert!(!process_exists(pid), "shell {pid} left behind");
    }
}

#[test]
fn the_launch_has_a_clean_login_environment() {
    let launch = launch_for(&options(), "/usr/bin:/bin", Some("de_DE.ISO-8859-1"));
    let env: HashMap<_, _> = launch.env.iter().cloned().collect();
    assert_eq!(env["TERM"], "xterm-256color");
    assert_eq!(env["COLORTERM"], "truecolor");
    assert_eq!(env["PATH"], "/usr/bin:/bin");
    assert_eq!(env["LANG"], "C.UTF-8", "a non-UTF-8 LANG is replaced");
    assert_eq!(env["SHELL"], "/bin/sh");
    assert_eq!(Path::new(&env["HOME"]), launch.cwd);
    assert!(!env.contains_key("CRONIUM_AGENT_STATE_DIR"));
    let utf8 = launch_for(&options(), "/bin", Some("en_US.UTF-8"));
    assert!(utf8.env.contains(&("LANG".into(), "en_US.UTF-8".into())));
    // Without --terminal-shell: the user's login shell, which exists.
    let default = launch_for(&TerminalOptions::default(), "/bin", None);
    assert!(default.shell.is_absolute());
}
