//! A throwaway PostgreSQL server for tests: Debian's PostgreSQL 15 binaries (`initdb`, `pg_ctl`)
//! on a cluster in a temp dir, listening on a free 127.0.0.1 port (and a Unix socket in the temp
//! dir, nowhere else), stopped and removed on drop.
//!
//! `initdb` refuses to run as root, so when the test runs as root the cluster belongs to the
//! `postgres` system user (from the Debian package) and the server runs as that user; otherwise
//! it runs as the caller. Authentication is `trust` on loopback only: the cluster lives as long as
//! the test and holds nothing but test data.
//!
//! Each test takes a fresh database of its own with [`PgCluster::create_database`]. Set
//! `CRONIUM_PG_BIN` to use binaries from another directory.
//!
//! The whole suite runs on PostgreSQL when `CRONIUM_TEST_DATABASE=postgres` and
//! `CRONIUM_TEST_POSTGRES_URL` names a server (`cargo xtask test` starts one with the
//! `cronium-test-postgres` binary for its second pass): [`test_database_url`] gives each test a
//! database of its own on it, which the in-process control planes and `TestCluster` use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";
/// `postgres` selects PostgreSQL for the tests (`sqlite`, empty or unset: SQLite).
pub const SELECT_VAR: &str = "CRONIUM_TEST_DATABASE";
/// The URL of the PostgreSQL server the tests create their databases on (no database name:
/// `postgres://USER@HOST:PORT`).
pub const SERVER_URL_VAR: &str = "CRONIUM_TEST_POSTGRES_URL";
/// More `postgres` server options for every throwaway cluster, appended to its command line
/// (e.g. `-c shared_preload_libraries=pg_stat_statements -c log_min_duration_statement=30`): for
/// looking into a test or benchmark run.
pub const SERVER_OPTIONS_VAR: &str = "CRONIUM_TEST_POSTGRES_SERVER_OPTIONS";
/// Databases created by this process (for unique names).
static CREATED: AtomicU64 = AtomicU64::new(0);

/// Whether the tests run against PostgreSQL ([`SELECT_VAR`]). Panics on a value that is neither
/// database, so a typo cannot silently test SQLite.
pub fn postgres_selected() -> bool {
    match std::env::var(SELECT_VAR) {
        Ok(value) if value == "postgres" => true,
        Ok(value) if value == "sqlite" || value.is_empty() => false,
        Ok(value) => panic!("{SELECT_VAR} must be sqlite or postgres, not {value:?}"),
        Err(_) => false,
    }
}

/// A new, empty database for one test when the tests run on PostgreSQL; `None` on SQLite.
pub fn test_database_url() -> Result<Option<String>> {
    if !postgres_selected() {
        return Ok(None);
    }
    let server = std::env::var(SERVER_URL_VAR).with_context(|| {
        format!(
            "{SELECT_VAR}=postgres needs {SERVER_URL_VAR}, the URL of a server to create test \
             databases on (`cargo xtask test` starts one; by hand: target/debug/cronium-test-postgres)"
        )
    })?;
    create_database_on(&server).map(Some)
}

/// Creates a database with a unique name on the server at `server_url` (no database name in
/// it) and returns the database's URL.
pub fn create_database_on(server_url: &str) -> Result<String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "cronium_test_{}_{}_{nanos}",
        std::process::id(),
        CREATED.fetch_add(1, Ordering::Relaxed)
    );
    let output = Command::new(pg_bin().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{server_url}/postgres"))
        .arg("-c")
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .context("running psql")?;
    ensure!(
        output.status.success(),
        "CREATE DATABASE on {server_url} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(format!("{server_url}/{name}"))
}

/// The directory of the PostgreSQL binaries.
fn pg_bin() -> PathBuf {
    std::env::var_os("CRONIUM_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN))
}
const START_DEADLINE: Duration = Duration::from_secs(60);
const SUPERUSER: &str = "postgres";

/// A running throwaway cluster; stopped (`pg_ctl stop -m immediate`) and deleted on drop.
///
/// The test that owns it may also stop it ([`PgCluster::stop`]) and start it again on the same
/// data dir and port ([`PgCluster::start_again`]), and put its data dir on a small tmpfs
/// ([`PgCluster::start_on_tmpfs`]) to run PostgreSQL out of space.
pub struct PgCluster {
    bin: PathBuf,
    /// The tmpfs under the data dir, if any; declared before `dir` so that it is unmounted
    /// (after the server stopped, in `drop`) before the temp dir is removed.
    tmpfs: Option<crate::mount::TmpfsMount>,
    dir: tempfile::TempDir,
    port: u16,
    /// The system user the server runs as, when it is not the caller.
    run_as: Option<String>,
    databases: AtomicU64,
}

impl PgCluster {
    /// Creates and starts a cluster. Fails with what to install when the binaries are missing.
    pub fn start() -> Result<PgCluster> {
        PgCluster::start_configured(None)
    }

    /// Like [`PgCluster::start`], with the data dir (the tables and the WAL) on a tmpfs of
    /// `size_bytes` ([`PgCluster::tmpfs`] fills and frees it). Needs root.
    pub fn start_on_tmpfs(size_bytes: u64) -> Result<PgCluster> {
        PgCluster::start_configured(Some(size_bytes))
    }

    fn start_configured(tmpfs_bytes: Option<u64>) -> Result<PgCluster> {
        let bin = pg_bin();
        ensure!(
            bin.join("initdb").exists() && bin.join("pg_ctl").exists(),
            "no PostgreSQL binaries in {} (apt-get install postgresql, or set CRONIUM_PG_BIN)",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("cronium-pg-")
            .tempdir_in("/tmp")
            .context("temp dir for the cluster")?;
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then(|| SUPERUSER.to_string());
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .context("chown of the cluster dir")?;
            ensure!(
                status.success(),
                "chown {user} {} failed (is the Debian postgresql package installed?)",
                dir.path().display()
            );
        }
        let tmpfs = match tmpfs_bytes {
            Some(size_bytes) => {
                let data = dir.path().join("data");
                std::fs::create_dir(&data).context("the cluster's data dir")?;
                let mount = crate::mount::TmpfsMount::mount(&data, size_bytes)?;
                if let Some(user) = &run_as {
                    let status = Command::new("chown")
                        .arg(user)
                        .arg(&data)
                        .status()
                        .context("chown of the data dir's tmpfs")?;
                    ensure!(status.success(), "chown {user} {} failed", data.display());
                }
                Some(mount)
            }
            None => None,
        };
        let mut cluster = PgCluster {
            bin,
            tmpfs,
            dir,
            port: 0,
            run_as,
            databases: AtomicU64::new(0),
        };
        cluster.init()?;
        // A port that was free a moment ago can be taken before the server binds it: try again.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The pid of the server's postmaster (its backends are its children).
    pub fn server_pid(&self) -> Result<u32> {
        let path = self.data_dir().join("postmaster.pid");
        let contents = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        contents
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("no pid in {}", path.display()))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command for one of the binaries, run as the cluster's user.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.arg("-u").arg(user).arg("--").arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn run(&self, mut command: Command, what: &str) -> Result<()> {
        let output = command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("{what}: could not start"))?;
        ensure!(
            output.status.success(),
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn init(&self) -> Result<()> {
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg("--locale=C");
        self.run(command, "initdb")
    }

    fn start_server(&self) -> Result<()> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        if let Ok(extra) = std::env::var(SERVER_OPTIONS_VAR) {
            options.push(' ');
            options.push_str(&extra);
        }
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(options)
            .args(["-w", "-t"])
            .arg(START_DEADLINE.as_secs().to_string())
            .arg("start");
        if let Err(error) = self.run(command, "pg_ctl start") {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            bail!("{error:#}\nserver log:\n{log}");
        }
        // pg_ctl -w waited for the server to accept connections; check the TCP side too.
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL does not accept connections on 127.0.0.1:{}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`: every session is ended with `admin_shutdown`,
    /// as on an operator's restart) and waits until it is down.
    pub fn stop(&self) -> Result<()> {
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t"])
            .arg(START_DEADLINE.as_secs().to_string())
            .arg("stop");
        self.run(command, "pg_ctl stop")
    }

    /// Starts the stopped server again on the same data dir and port; waits until it accepts
    /// connections.
    pub fn start_again(&self) -> Result<()> {
        self.start_server()
    }

    /// Whether the server runs (`pg_ctl status`); false also after it shut itself down.
    pub fn is_running(&self) -> Result<bool> {
        let mut command = self.command("pg_ctl");
        command.arg("-D").arg(self.data_dir()).arg("status");
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("pg_ctl status: could not start")?;
        // 0: running; 3: not running; 4: no accessible data dir.
        match status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => bail!("pg_ctl status failed ({status})"),
        }
    }

    /// The tmpfs under the data dir, for a cluster from [`PgCluster::start_on_tmpfs`].
    pub fn tmpfs(&self) -> Option<&crate::mount::TmpfsMount> {
        self.tmpfs.as_ref()
    }

    /// Runs `sql` as the superuser in database `database` with psql over TCP; returns what it
    /// printed (unaligned, tuples only), or its error.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        ensure!(
            output.status.success(),
            "psql failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data dir, socket, server log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.server_url())
    }

    /// The server's URL without a database name, over TCP.
    pub fn server_url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}", self.port)
    }

    /// The server's URL without a database name, over its Unix socket (the host part is the
    /// percent-encoded socket directory, which sqlx and libpq both read as a socket): what
    /// `cronium-test-postgres` hands out as [`SERVER_URL_VAR`], since it also reaches the
    /// server from a control plane inside a network namespace of its own (a socket is a file,
    /// not an address).
    pub fn socket_server_url(&self) -> String {
        let directory: String = self
            .dir
            .path()
            .to_string_lossy()
            .chars()
            .map(|c| match c {
                '/' => "%2F".to_string(),
                c if c.is_ascii_alphanumeric() || "-_.".contains(c) => c.to_string(),
                c => format!("%{:02X}", c as u32),
            })
            .collect();
        format!("postgres://{SUPERUSER}@{directory}:{}", self.port)
    }

    /// Creates a new, empty database with a unique name and returns its URL.
    pub fn create_database(&self) -> Result<String> {
        let name = format!(
            "cronium_test_{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        let mut command = self.command("createdb");
        command
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER])
            .arg(&name);
        self.run(command, "createdb")?;
        Ok(self.url(&name))
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = command.status();
        // The temp dir (owned by the cluster's user) is removed by TempDir's drop, as root or as
        // the caller who owns it.
    }
}

/// A port that is free on 127.0.0.1 right now.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster starts, serves two separate databases over TCP, and is gone after drop.
    #[test]
    fn cluster_serves_databases_and_is_removed() -> Result<()> {
        let cluster = PgCluster::start()?;
        let first = cluster.create_database()?;
        let second = cluster.create_database()?;
        assert_ne!(first, second);
        let psql = cluster.bin.join("psql");
        let query = |url: &str, sql: &str| -> Result<String> {
            let output = Command::new(&psql)
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    url,
                    "-c",
                    sql,
                ])
                .output()?;
            ensure!(
                output.status.success(),
                "psql: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(String::from_utf8(output.stdout)?.trim().to_string())
        };
        query(
            &first,
            "CREATE TABLE t (v BIGINT); INSERT INTO t VALUES (42)",
        )?;
        assert_eq!(query(&first, "SELECT v FROM t")?, "42");
        // The second database is separate: the table does not exist there.
        assert!(query(&second, "SELECT v FROM t").is_err());
        assert_eq!(
            query(&first, "SHOW listen_addresses")?,
            "127.0.0.1",
            "the server listens on loopback only"
        );
        let dir = cluster.dir().to_path_buf();
        let port = cluster.port();
        drop(cluster);
        assert!(!dir.exists(), "the cluster dir is removed");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server is stopped"
        );
        Ok(())
    }
}
