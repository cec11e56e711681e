//! End-to-end test harness for Cronium.
//!
//! The tests start the real `cronium` and `cronium-agent` binaries (build them first with
//! `cargo build --workspace`; set `CRONIUM_BIN_DIR` to use binaries from elsewhere), talk to them
//! over real HTTP and QUIC on loopback, and inspect the real processes they spawn.
//!
//! The entry point is [`TestCluster`]: one temp dir, one control plane on free ports, any number of
//! enrolled agents, and guards that kill every process the test started when the cluster drops,
//! also when the test panics. Waits are polls with a deadline ([`TestCluster::wait_until`]); on
//! timeout the error names what was awaited, and the cluster prints the tail of every process log
//! when it drops (the test runner shows it for failed tests).

pub mod api;
pub mod cluster;
pub mod docker;
pub mod fleet;
pub mod lab;
pub mod light;
pub mod load;
pub mod mount;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod quic;
pub mod release;
pub mod sse;
pub mod sshd;
pub mod terminal_client;
pub mod udp_forward;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

pub use api::{Api, ApiResponse};
pub use cluster::{
    AgentOptions, ClusterOptions, EnrollOutcome, EnrollRequest, EnrolledAgent, EventSpec,
    RunStarted, ServeIn, TestCluster,
};
pub use process::{ChildGuard, ProcessInfo, live_processes_with_arg};
pub use sse::{FollowedLog, LogEvent, follow_job_logs};
pub use webhook::WebhookListener;

/// Installs the ring crypto provider as the process default, once (reqwest and quinn need one).
pub fn init_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another test in the same process may have installed it already; either way there is one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The directory holding `cronium` and `cronium-agent`: `CRONIUM_BIN_DIR`, else the cargo target
/// dir this test executable was built into (`target/debug/deps/<test>` → `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CRONIUM_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locate the test executable")?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("the test executable has no grandparent directory")?;
    Ok(dir.to_path_buf())
}

/// The path of one of the workspace binaries, checked to exist.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace` first (or set CRONIUM_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// A string unique within this machine for this run: process id, time and a counter.
pub fn unique_marker(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}-{count}", std::process::id())
}

/// A `sleep` argument nobody else uses, so a test can look for the process by its command line.
///
/// It is a long duration (more than 900 s) with a unique fractional part, e.g. `917.004711023`.
pub fn unique_sleep_seconds() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}.{:05}{:09}",
        900 + count % 90,
        std::process::id() % 100_000,
        nanos
    )
}

/// `len` random bytes from the kernel.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0u8; len];
    // /dev/urandom never runs dry on Linux; failing here means the machine is unusable for tests.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

/// The SHA-256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
