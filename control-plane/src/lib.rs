//! The Cronium control plane: HTTP API, QUIC listener for agents, durable job queue.
//!
//! [`start`] binds both listeners and spawns every long-lived task under one
//! [`CancellationToken`] and one [`TaskTracker`]; [`Running::wait`] drains them after the
//! token is cancelled. `main.rs` only parses the command line and calls into this crate, and
//! the tests and `cronium dev` use the same entry points.

pub mod actions;
pub mod agents;
pub mod changes;
pub mod cli;
pub mod crypto;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod queue;
pub mod release;
pub mod replicas;
pub mod schedule;
pub mod ssh;
pub mod store;
pub mod terminals;
pub mod tools;
pub mod workflows;

#[cfg(test)]
mod secrets_tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::serve::ListenerExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use agents::ca::CertificateAuthority;
use agents::registry::AgentRegistry;
use crypto::EncryptionKey;
use queue::JobEvents;
use store::Store;
use terminals::{TerminalConfig, TerminalHub, TerminalSettings};

/// Everything `start` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `sqlite://PATH`; `None` means `cronium.db` in the data dir.
    pub database_url: Option<String>,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    /// The URL agents and install commands use to reach the HTTP API.
    pub public_url: Option<String>,
    /// The QUIC address(es) agents are told to dial; derived from the bind address when empty.
    pub quic_public_addrs: Vec<String>,
    /// The base URL other replicas reach this replica's HTTP listener at (`--relay-url`);
    /// `http://<bound HTTP address>` when `None`.
    pub relay_url: Option<String>,
    pub encryption_key: EncryptionKey,
    /// How long an attempt's lease lasts without a heartbeat.
    pub lease: Duration,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Images of Docker events that name none.
    pub docker_images: DockerImages,
    /// How notifications are delivered and retried.
    pub delivery: tools::DeliveryOptions,
    /// Terminals: allowed origins, limits, timeouts asked of agents, recording.
    pub terminals: TerminalConfig,
    /// Where the signed agent releases and their public key are.
    pub releases: release::ReleaseConfig,
    /// SHA-256 (hex) of the bearer token that may read `GET /metrics` (besides admins).
    pub metrics_token_sha256: Option<String>,
}

#[cfg(test)]
impl ServerConfig {
    /// A control plane for in-process tests: its data in `data_dir` (and, when the tests run on
    /// PostgreSQL, a database of its own there, the same one each time for the same `data_dir`,
    /// so a restarted control plane finds its data: `cronium_e2e::postgres::test_database_url`),
    /// HTTP and QUIC on free loopback ports, `key` (base64) as `ENCRYPTION_KEY`, every other
    /// setting at its default.
    pub(crate) fn for_tests(data_dir: &std::path::Path, key: &str) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.to_path_buf(),
            database_url: ServerConfig::test_database_url(data_dir),
            http_addr: "127.0.0.1:0".parse().expect("loopback address"),
            quic_addr: "127.0.0.1:0".parse().expect("loopback address"),
            public_url: None,
            quic_public_addrs: Vec::new(),
            relay_url: None,
            encryption_key: EncryptionKey::from_base64(key).expect("a test key"),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            docker_images: DockerImages::default(),
            delivery: tools::DeliveryOptions::default(),
            terminals: TerminalConfig::default(),
            releases: release::ReleaseConfig::default(),
            metrics_token_sha256: None,
        }
    }

    /// The store of the in-process test control plane of `data_dir`, opened again (e.g. while
    /// it is stopped), on the database [`ServerConfig::for_tests`] gives it.
    pub(crate) async fn reopen_test_store(data_dir: &std::path::Path) -> Store {
        open_store(
            data_dir,
            ServerConfig::test_database_url(data_dir).as_deref(),
        )
        .await
        .expect("the test control plane's store")
    }

    /// `None` (SQLite in `data_dir`) unless the tests run on PostgreSQL; then the URL of the
    /// database of `data_dir`'s control plane, created on first use.
    fn test_database_url(data_dir: &std::path::Path) -> Option<String> {
        static DATABASES: std::sync::Mutex<std::collections::BTreeMap<PathBuf, String>> =
            std::sync::Mutex::new(std::collections::BTreeMap::new());
        cronium_e2e::postgres::postgres_selected().then(|| {
            let mut databases = DATABASES
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            databases
                .entry(data_dir.to_path_buf())
                .or_insert_with(|| {
                    cronium_e2e::postgres::test_database_url()
                        .expect("a PostgreSQL test database")
                        .expect("PostgreSQL is selected")
                })
                .clone()
        })
    }
}

/// The image a Docker event runs in when it names none, per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerImages {
    pub bash: String,
    pub python: String,
    pub nodejs: String,
}

impl Default for DockerImages {
    fn default() -> DockerImages {
        DockerImages {
            bash: "debian:12-slim".to_owned(),
            python: "python:3-slim".to_owned(),
            nodejs: "node:20-slim".to_owned(),
        }
    }
}

/// Settings the request handlers and sessions read.
#[derive(Debug)]
pub struct Settings {
    pub public_url: String,
    pub quic_public_addrs: Vec<String>,
    /// The base URL other replicas reach this replica's HTTP listener at, without a trailing
    /// `/` (`--relay-url`; in the replica registry, `store::replica_registry`).
    pub relay_url: String,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub docker_images: DockerImages,
    pub delivery: tools::DeliveryOptions,
    pub terminals: TerminalSettings,
    /// The signed agent releases served under `/downloads/agent/`.
    pub releases_dir: PathBuf,
    /// `--release-key`: the release public key file; `<releases dir>/release-key.pub` if `None`.
    pub release_public_key: Option<PathBuf>,
    /// SHA-256 (hex) of the metrics token (`--metrics-token-file`), if one is configured.
    pub metrics_token_sha256: Option<String>,
}

/// Shared state of every handler and session. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Settings>,
    pub store: Store,
    pub registry: AgentRegistry,
    pub ca: Arc<CertificateAuthority>,
    pub key: EncryptionKey,
    pub job_events: JobEvents,
    /// Change notices for the console's lists (`GET /changes`).
    pub changes: changes::Changes,
    /// Whether the database answered its last check (`store::health::watch`; `GET /healthz`).
    pub database: Arc<store::health::DatabaseHealth>,
    /// Wakes the lease sweeper before its next tick.
    pub lease_reaper: Arc<Notify>,
    /// Wakes the notification dispatcher; `notify_one` after a notification was committed.
    pub notifier: Arc<Notify>,
    /// Terminal sessions being opened and who records which.
    pub terminals: TerminalHub,
    /// Wakes the scheduler after an event's schedule was created, changed or removed.
    pub schedules: Arc<Notify>,
    /// The SSH fallback: wakes its worker, cancels its running jobs.
    pub ssh: ssh::SshRunner,
    /// The control plane's own jobs (HTTP requests, tool actions): wakes their worker, cancels
    /// them.
    pub actions: actions::ActionRunner,
    /// This replica among those sharing the database: its id, scheduler leadership, the
    /// signals for the others (`replicas`).
    pub replicas: replicas::Replicas,
    /// Cancelled when the control plane shuts down; every task watches it.
    pub shutdown: CancellationToken,
    /// Every spawned task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// A started control plane.
pub struct Running {
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub state: AppState,
    /// The generated admin password, on first start only.
    pub admin_password: Option<String>,
    /// The shared running lock (`<database>.running.lock`, or an advisory lock on PostgreSQL),
    /// held until [`Running::wait`] returns (or the process ends), so `cronium keys rotate`
    /// refuses while this control plane runs.
    _running_lock: RunningLock,
}

impl Running {
    /// Waits until shutdown was requested and every task has stopped.
    pub async fn wait(self) {
        self.state.shutdown.cancelled().await;
        self.state.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.state.tasks.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop within 10 s");
        }
        self.state.store.close().await;
        if let Err(error) = self._running_lock.release().await {
            // The server releases it anyway once it notices the session is gone.
            warn!("{error:#}");
        }
        info!("control plane stopped");
    }

    /// The SHA-256 fingerprint of the CA agents must pin.
    pub fn ca_sha256(&self) -> String {
        self.state.ca.fingerprint()
    }

    /// The URL of the HTTP API as reachable from this machine.
    pub fn local_url(&self) -> String {
        local_url(self.http_addr)
    }
}

fn local_url(address: SocketAddr) -> String {
    let host = if address.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        address.ip().to_string()
    };
    match address {
        SocketAddr::V6(_) if !address.ip().is_unspecified() => {
            format!("http://[{host}]:{}", address.port())
        }
        _ => format!("http://{host}:{}", address.port()),
    }
}

/// Opens the store named by the config (or the default in the data dir).
pub async fn open_store(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Store> {
    if let Some(url) = database_url.filter(|url| is_postgres_url(url)) {
        return Store::open_postgres(url)
            .await
            .context("opening the PostgreSQL database");
    }
    let path = database_path(data_dir, database_url)?;
    Store::open_sqlite(&path)
        .await
        .with_context(|| format!("opening the database {}", path.display()))
}

/// Whether a database URL names PostgreSQL.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The SQLite file named by the config (or `cronium.db` in the data dir).
pub fn database_path(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<PathBuf> {
    Ok(match database_url {
        None => data_dir.join("cronium.db"),
        Some(url) if url.starts_with("sqlite://") => {
            PathBuf::from(url.trim_start_matches("sqlite://"))
        }
        Some(url) if is_postgres_url(url) => {
            bail!("this works on the SQLite database only, not on PostgreSQL")
        }
        Some(_) => {
            bail!("CRONIUM_DATABASE_URL must start with sqlite://, postgres:// or postgresql://")
        }
    })
}

/// The lock file next to a database: every running control plane holds a shared lock on it,
/// `cronium keys rotate` an exclusive one (the OS drops a lock when its process dies).
pub fn running_lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".running.lock");
    PathBuf::from(name)
}

/// The "a control plane runs on this database" lock: a file lock next to a SQLite database
/// ([`running_lock_path`]), an advisory lock on PostgreSQL (`store::running`). Every running
/// control plane holds it shared, `cronium keys rotate` exclusively; either kind is released
/// when dropped or when the process ends.
#[derive(Debug)]
pub(crate) enum RunningLock {
    File(#[allow(dead_code)] std::fs::File),
    Postgres(store::running::AdvisoryLock),
}

impl RunningLock {
    /// Releases the lock before returning (on PostgreSQL unlocked on its session, not left to
    /// the server noticing a closed socket).
    pub(crate) async fn release(self) -> anyhow::Result<()> {
        match self {
            RunningLock::File(file) => drop(file),
            RunningLock::Postgres(lock) => lock
                .release()
                .await
                .context("releasing the running lock on the PostgreSQL database")?,
        }
        Ok(())
    }

    /// Takes the lock of the database `database_url` names (or the SQLite file in `data_dir`),
    /// or says who holds it the other way.
    pub(crate) async fn take(
        data_dir: &Path,
        database_url: Option<&str>,
        mode: store::running::LockMode,
    ) -> anyhow::Result<RunningLock> {
        use store::running::LockMode;
        const ROTATING: &str =
            "`cronium keys rotate` is re-encrypting this database; start again when it is done";
        const RUNNING: &str = "a control plane is running on this database; stop it (every replica) first: it keeps the current key in memory";
        let held_by = match mode {
            LockMode::Shared => ROTATING,
            LockMode::Exclusive => RUNNING,
        };
        if let Some(url) = database_url.filter(|url| is_postgres_url(url)) {
            let lock = store::running::try_advisory_lock(url, mode)
                .await
                .context("taking the running lock on the PostgreSQL database")?
                .context(held_by)?;
            return Ok(RunningLock::Postgres(lock));
        }
        let path = running_lock_path(&database_path(data_dir, database_url)?);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let locked = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match locked {
            Ok(()) => Ok(RunningLock::File(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!("{held_by} (it holds {})", path.display())
            }
            Err(std::fs::TryLockError::Error(error)) => {
                Err(error).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

/// Creates the data dir (mode 0700) if needed.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes a file readable only by its owner.
pub fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// Starts the control plane: database, key check, CA, listeners and background tasks.
pub async fn start(config: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<Running> {
    create_private_dir(&config.data_dir)?;
    let running_lock = RunningLock::take(
        &config.data_dir,
        config.database_url.as_deref(),
        store::running::LockMode::Shared,
    )
    .await?;
    let store = open_store(&config.data_dir, config.database_url.as_deref()).await?;
    match store.key_check().await? {
        Some(sealed) => config.encryption_key.verify_key_check(&sealed)?,
        None => {
            if let Err(error) = store
                .set_key_check(&config.encryption_key.key_check())
                .await
            {
                // Another replica starting at the same time may have stored its check first.
                let sealed = store.key_check().await?.ok_or(error)?;
                config.encryption_key.verify_key_check(&sealed)?;
            }
        }
    }
    let admin_password = if store.has_users().await? {
        None
    } else {
        let password = crypto::random_token("");
        let hash = http::auth::hash_password(password.clone()).await?;
        match store
            .create_user("admin", &hash, store::users::Role::Admin)
            .await
        {
            Ok(_) => Some(password),
            // Another replica starting at the same time created it first.
            Err(_) if store.has_users().await? => None,
            Err(error) => return Err(error.into()),
        }
    };
    let terminal_settings = TerminalSettings::new(
        &config.terminals,
        config.public_url.as_deref(),
        &config.data_dir,
    )?;
    // Shared by every replica of this database (`replicas::material`).
    let ca = Arc::new(
        replicas::material::load_ca(&store, &config.encryption_key, &config.data_dir).await?,
    );
    if let Some(path) = &config.releases.public_key_file {
        // Fail at start-up rather than on the first install.
        release::PublicKey::load(path).context("--release-key")?;
    }

    let reset_key =
        replicas::material::load_reset_key(&store, &config.encryption_key, &config.data_dir)
            .await?;
    // The key of the terminal relay tokens between replicas (`terminals::relay_token`).
    let relay_key = terminals::relay_token::load_key(&store, &config.encryption_key).await?;
    let endpoint = agents::bind_endpoint(config.quic_addr, &ca, &reset_key)?;
    let quic_addr = endpoint.local_addr().context("QUIC local address")?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
    let http_addr = listener.local_addr()?;

    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| local_url(http_addr))
        .trim_end_matches('/')
        .to_string();
    let quic_public_addrs = if config.quic_public_addrs.is_empty() {
        vec![public_quic_addr(quic_addr, &public_url)]
    } else {
        config.quic_public_addrs.clone()
    };
    // Agents get a full lease to reconnect after a restart before their jobs count as lost.
    let extended = store
        .extend_active_leases(store::now_ms() + config.lease.as_millis() as i64)
        .await?;
    if extended > 0 {
        info!(
            jobs = extended,
            "extended leases of jobs that were running before the restart"
        );
    }

    let replicas = replicas::Replicas::new(config.database_url.as_deref());
    let state = AppState {
        config: Arc::new(Settings {
            public_url,
            quic_public_addrs,
            relay_url: config
                .relay_url
                .clone()
                .unwrap_or_else(|| local_url(http_addr))
                .trim_end_matches('/')
                .to_owned(),
            lease: config.lease,
            heartbeat: config.heartbeat,
            docker_images: config.docker_images.clone(),
            delivery: config.delivery.clone(),
            terminals: terminal_settings,
            releases_dir: config
                .releases
                .dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("releases")),
            release_public_key: config.releases.public_key_file.clone(),
            metrics_token_sha256: config.metrics_token_sha256.clone(),
        }),
        store,
        registry: AgentRegistry::with_outbox(replicas.outbox().clone()),
        ca,
        key: config.encryption_key.clone(),
        job_events: JobEvents::with_outbox(replicas.outbox().clone()),
        changes: changes::Changes::default(),
        database: Arc::default(),
        lease_reaper: Arc::new(Notify::new()),
        notifier: Arc::new(Notify::new()),
        terminals: TerminalHub::new(terminals::relay_token::RelayAuth::new(&relay_key)),
        schedules: Arc::new(Notify::new()),
        ssh: ssh::SshRunner::default(),
        actions: actions::ActionRunner::default(),
        replicas,
        shutdown,
        tasks: TaskTracker::new(),
    };
    // Before anything can wake or notify: the other replicas' signals (PostgreSQL only).
    replicas::signals::start(&state);
    state.tasks.spawn(replicas::presence::run(state.clone()));
    // In the replica registry before the first agent is accepted (PostgreSQL only).
    replicas::membership::start(&state).await?;
    state.tasks.spawn(store::health::watch(
        state.store.clone(),
        state.database.clone(),
        state.shutdown.clone(),
    ));
    if let RunningLock::Postgres(lock) = &running_lock {
        // The lock dies with its session when PostgreSQL restarts: take it again.
        state.tasks.spawn(store::running::keep_shared(
            lock.clone(),
            state.shutdown.clone(),
        ));
    }
    state.tasks.spawn(agents::serve(endpoint, state.clone()));
    state.tasks.spawn(queue::sweep_leases(
        state.clone(),
        state.lease_reaper.clone(),
    ));
    state.tasks.spawn(tools::dispatch_notifications(
        state.clone(),
        state.notifier.clone(),
    ));
    state.tasks.spawn(
        schedule::scheduler::Scheduler::new(state.clone(), Arc::new(schedule::SystemClock)).run(),
    );
    state.tasks.spawn(ssh::run_worker(state.clone()));
    state.tasks.spawn(actions::run_worker(state.clone()));
    state.tasks.spawn(dispatch::run(state.clone()));
    state.tasks.spawn(workflows::engine::run(state.clone()));
    state.tasks.spawn(changes::run(state.clone()));
    state.tasks.spawn(queue::record_last_seen(
        state.clone(),
        Duration::from_secs(30),
    ));
    let router = http::router(state.clone());
    let http_shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        let served = axum::serve(
            // Small writes (server-sent events, short answers) go out at once instead of
            // waiting for the client's delayed ACK.
            listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "could not set TCP_NODELAY");
                }
            }),
            router,
        )
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
        .await;
        if let Err(error) = served {
            warn!(%error, "HTTP server failed");
        }
    });
    info!(%http_addr, %quic_addr, "control plane started");
    Ok(Running {
        http_addr,
        quic_addr,
        state,
        admin_password,
        _running_lock: running_lock,
    })
}

/// The QUIC address agents dial: the bind address, or the public URL's host when bound to all
/// interfaces.
fn public_quic_addr(bound: SocketAddr, public_url: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = reqwest::Url::parse(public_url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_string))
        .unwrap_or_else(|| "127.0.0.1".to_string());
    format!("{host}:{}", bound.port())
}
