//! Events: what to run, where, and with which limits.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row};

use super::agents::{Labels, labels_from_json};
use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};
use crate::schedule::{DstPolicy, Misfire, Overlap, ScheduleSpec};

/// What an event runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Bash,
    Python,
    Nodejs,
    HttpRequest,
    ToolAction,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Bash => "bash",
            EventKind::Python => "python",
            EventKind::Nodejs => "nodejs",
            EventKind::HttpRequest => "http_request",
            EventKind::ToolAction => "tool_action",
        }
    }

    pub fn parse(text: &str) -> Option<EventKind> {
        Some(match text {
            "bash" => EventKind::Bash,
            "python" => EventKind::Python,
            "nodejs" => EventKind::Nodejs,
            "http_request" => EventKind::HttpRequest,
            "tool_action" => EventKind::ToolAction,
            _ => return None,
        })
    }
}

/// Where an event's scripts run on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Host,
    Docker,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Host => "host",
            Runtime::Docker => "docker",
        }
    }

    pub fn parse(text: &str) -> Option<Runtime> {
        match text {
            "host" => Some(Runtime::Host),
            "docker" => Some(Runtime::Docker),
            _ => None,
        }
    }
}

/// The network of an event's containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    #[default]
    None,
    Bridge,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Bridge => "bridge",
        }
    }

    pub fn parse(text: &str) -> Option<Network> {
        match text {
            "none" => Some(Network::None),
            "bridge" => Some(Network::Bridge),
            _ => None,
        }
    }
}

/// PIDs limit of an event's containers when the event sets none (host jobs get no default).
pub const DEFAULT_PIDS: u32 = 256;

/// How an event's jobs are isolated. `image`, `network` and `read_only` are used when its
/// runtime is `docker`; `memory_mb`, `cpus`, `pids` and `user` apply to both runtimes (on the
/// host through the agent's cgroups and its `--allow-run-as` list).
#[derive(Debug, Clone, PartialEq)]
pub struct DockerSettings {
    /// `None`: the control plane's default image for the event's kind.
    pub image: Option<String>,
    pub memory_mb: Option<u32>,
    pub cpus: Option<f64>,
    /// `None`: not set; Docker jobs get [`DEFAULT_PIDS`], host jobs no limit.
    pub pids: Option<u32>,
    pub network: Network,
    pub read_only: bool,
    pub user: Option<String>,
}

impl DockerSettings {
    /// The PIDs limit of the event's containers.
    pub fn docker_pids(&self) -> u32 {
        self.pids.unwrap_or(DEFAULT_PIDS)
    }
}

impl Default for DockerSettings {
    fn default() -> DockerSettings {
        DockerSettings {
            image: None,
            memory_mb: None,
            cpus: None,
            pids: None,
            network: Network::None,
            read_only: false,
            user: None,
        }
    }
}

/// Which agents an event runs on: named agents (by id or name) plus every agent matching all
/// labels, plus named servers (by id or name; SSH servers run their jobs over SSH). Or, with
/// `pool`, ONE job per run that any agent matching all of the pool's labels may claim (never
/// together with the others).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub agents: Vec<String>,
    pub labels: Labels,
    pub servers: Vec<String>,
    /// A label selector: one job, run by whichever matching agent claims it first.
    pub pool: Option<Labels>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
            && self.labels.is_empty()
            && self.servers.is_empty()
            && self.pool.is_none()
    }

    fn to_json(&self) -> String {
        let mut value = serde_json::json!({ "agents": self.agents, "labels": self.labels, "servers": self.servers });
        if let Some(pool) = &self.pool {
            value["pool"] = serde_json::json!(pool);
        }
        value.to_string()
    }

    fn from_json(text: &str) -> StoreResult<Targets> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|error| StoreError::Corrupt(format!("targets: {error}")))?;
        let agents = value["agents"]
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .filter_map(|agent| agent.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let servers = value["servers"]
            .as_array()
            .map(|servers| {
                servers
                    .iter()
                    .filter_map(|server| server.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let labels = labels_from_json(
            &value
                .get("labels")
                .map(|labels| labels.to_string())
                .unwrap_or_else(|| "{}".into()),
        )?;
        let pool = match value.get("pool") {
            Some(pool) if !pool.is_null() => Some(labels_from_json(&pool.to_string())?),
            _ => None,
        };
        Ok(Targets {
            agents,
            labels,
            servers,
            pool,
        })
    }
}

/// Who runs the jobs of an `http_request` event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Executor {
    /// The event's target agents (one job per agent; URLs inside the agents' networks work).
    #[default]
    Agent,
    /// The control plane itself (one job per run; no targets needed).
    ControlPlane,
}

impl Executor {
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Agent => "agent",
            Executor::ControlPlane => "control_plane",
        }
    }

    pub fn parse(text: &str) -> Option<Executor> {
        match text {
            "agent" => Some(Executor::Agent),
            "control_plane" => Some(Executor::ControlPlane),
            _ => None,
        }
    }
}

/// What a `tool_action` event sends, through which of its owner's tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolAction {
    pub tool_id: String,
    /// Slack/Discord: the bold first line; webhook: `title`; email: the subject.
    pub title: Option<String>,
    pub message: String,
}

impl ToolAction {
    /// The JSON stored in `events.tool_action` (and copied into each job's `runtime_spec`).
    pub fn to_json(&self) -> String {
        serde_json::json!({"tool_id": self.tool_id, "title": self.title, "message": self.message})
            .to_string()
    }

    pub fn from_json(text: &str) -> StoreResult<ToolAction> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|error| StoreError::Corrupt(format!("tool_action: {error}")))?;
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
        Ok(ToolAction {
            tool_id: text("tool_id")
                .ok_or_else(|| StoreError::Corrupt("tool_action without tool_id".into()))?,
            title: text("title"),
            message: text("message").unwrap_or_default(),
        })
    }
}

/// What an event of a kind other than a script does: the HTTP request of an `http_request`
/// event and who makes it, or the action of a `tool_action` event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventAction {
    pub http: Option<cronium_protocol::HttpSpec>,
    pub tool_action: Option<ToolAction>,
    pub executor: Executor,
}

impl EventAction {
    /// Whether the control plane runs the event's jobs itself (one job per run, no targets).
    pub fn on_control_plane(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::ToolAction => true,
            EventKind::HttpRequest => self.executor == Executor::ControlPlane,
            _ => false,
        }
    }
}

/// Which of the owner's tools (by name) are told when a job of the event ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventNotify {
    /// Told when a job fails or is cancelled.
    pub on_failure: Option<String>,
    /// Told when a job completes.
    pub on_success: Option<String>,
}

/// A stored event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub kind: EventKind,
    pub script: String,
    pub runtime: Runtime,
    pub targets: Targets,
    pub timeout_seconds: u32,
    pub retries: u32,
    pub env: BTreeMap<String, String>,
    pub docker: DockerSettings,
    pub schedule: Option<ScheduleSpec>,
    /// The next slot not handled yet (ms); `None` without a schedule.
    pub next_run_at: Option<i64>,
    pub notify: EventNotify,
    /// The names of its secret environment variables (values are never read here), sorted.
    pub secret_env_names: Vec<String>,
    /// HTTP request and tool action events: what they do.
    pub action: EventAction,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Changes to an event's secret environment variables: values (already sealed) to set by
/// name, and names to remove.
#[derive(Debug, Clone, Default)]
pub struct SecretEnvChange {
    pub set: Vec<(String, Vec<u8>)>,
    pub remove: Vec<String>,
}

/// The fields of an event a caller sets.
#[derive(Debug, Clone)]
pub struct EventFields {
    pub name: String,
    pub kind: EventKind,
    pub script: String,
    pub runtime: Runtime,
    pub targets: Targets,
    pub timeout_seconds: u32,
    pub retries: u32,
    pub env: BTreeMap<String, String>,
    pub docker: DockerSettings,
    pub schedule: Option<ScheduleSpec>,
    pub notify: EventNotify,
    /// Written only when `reschedule` is set (a new or changed schedule); otherwise the stored
    /// value, which the scheduler advances, stays.
    pub next_run_at: Option<i64>,
    pub reschedule: bool,
    /// HTTP request and tool action events: what they do.
    pub action: EventAction,
    /// The dispatch policy (retries, concurrency, rollout); written in the same transaction
    /// when set, otherwise the stored one (or the defaults) stays.
    pub dispatch: Option<super::dispatch::DispatchPolicy>,
}

pub(crate) const EVENT_COLUMNS: &str = "id, owner_id, name, kind, script, runtime, targets, timeout_seconds, retries, env, created_at, updated_at, image, memory_mb, cpus, pids, network, read_only, run_as_user, schedule_cron, schedule_timezone, schedule_dst, schedule_misfire, schedule_overlap, next_run_at, notify_on_failure, notify_on_success, http, tool_action, executor, (SELECT string_agg(name, ',') FROM event_secret_env WHERE event_secret_env.event_id = events.id) AS secret_env_names";

pub(crate) fn event_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Event> {
    let kind: String = row.try_get("kind")?;
    let runtime: String = row.try_get("runtime")?;
    let env: String = row.try_get("env")?;
    let network: String = row.try_get("network")?;
    let docker = DockerSettings {
        image: row.try_get("image")?,
        memory_mb: row
            .try_get::<Option<i64>, _>("memory_mb")?
            .map(|mb| u32::try_from(mb).unwrap_or(u32::MAX)),
        cpus: row.try_get("cpus")?,
        pids: row
            .try_get::<Option<i64>, _>("pids")?
            .map(|pids| u32::try_from(pids).unwrap_or(u32::MAX)),
        network: Network::parse(&network)
            .ok_or_else(|| StoreError::Corrupt(format!("network {network:?}")))?,
        read_only: row.try_get::<i64, _>("read_only")? != 0,
        user: row.try_get("run_as_user")?,
    };
    let schedule = match row.try_get::<Option<String>, _>("schedule_cron")? {
        None => None,
        Some(cron) => {
            let text = |column: &str| -> StoreResult<String> {
                Ok(row
                    .try_get::<Option<String>, _>(column)?
                    .unwrap_or_default())
            };
            let (dst, misfire, overlap) = (
                text("schedule_dst")?,
                text("schedule_misfire")?,
                text("schedule_overlap")?,
            );
            Some(ScheduleSpec {
                cron,
                timezone: text("schedule_timezone")?,
                dst: DstPolicy::parse(&dst)
                    .ok_or_else(|| StoreError::Corrupt(format!("schedule_dst {dst:?}")))?,
                misfire: Misfire::parse(&misfire)
                    .ok_or_else(|| StoreError::Corrupt(format!("schedule_misfire {misfire:?}")))?,
                overlap: Overlap::parse(&overlap)
                    .ok_or_else(|| StoreError::Corrupt(format!("schedule_overlap {overlap:?}")))?,
            })
        }
    };
    let secret_env_names: Option<String> = row.try_get("secret_env_names")?;
    // `string_agg` (SQLite 3.44+ and PostgreSQL) of names made of `[A-Za-z0-9_]`; NULL: none.
    let mut secret_env_names: Vec<String> = match secret_env_names {
        Some(text) => text.split(',').map(str::to_string).collect(),
        None => Vec::new(),
    };
    secret_env_names.sort();
    let executor: String = row.try_get("executor")?;
    let action = EventAction {
        http: match row.try_get::<Option<String>, _>("http")? {
            Some(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|error| StoreError::Corrupt(format!("http: {error}")))?,
            ),
            None => None,
        },
        tool_action: match row.try_get::<Option<String>, _>("tool_action")? {
            Some(text) => Some(ToolAction::from_json(&text)?),
            None => None,
        },
        executor: Executor::parse(&executor)
            .ok_or_else(|| StoreError::Corrupt(format!("executor {executor:?}")))?,
    };
    Ok(Event {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        name: row.try_get("name")?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("kind {kind:?}")))?,
        script: row.try_get("script")?,
        runtime: Runtime::parse(&runtime)
            .ok_or_else(|| StoreError::Corrupt(format!("runtime {runtime:?}")))?,
        targets: Targets::from_json(&row.try_get::<String, _>("targets")?)?,
        timeout_seconds: row.try_get::<i64, _>("timeout_seconds")? as u32,
        retries: row.try_get::<i64, _>("retries")? as u32,
        env: serde_json::from_str(&env)
            .map_err(|error| StoreError::Corrupt(format!("env: {error}")))?,
        docker,
        schedule,
        next_run_at: row.try_get("next_run_at")?,
        notify: EventNotify {
            on_failure: row.try_get("notify_on_failure")?,
            on_success: row.try_get("notify_on_success")?,
        },
        secret_env_names,
        action,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The JSON of an event's `http` column.
fn http_to_json(action: &EventAction) -> Option<String> {
    // A spec of strings, numbers and booleans always serializes.
    action
        .http
        .as_ref()
        .map(|http| serde_json::to_string(http).unwrap_or_default())
}

fn env_to_json(env: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(env).unwrap_or_else(|_| "{}".into())
}

impl Store {
    /// Creates an event owned by `owner_id`.
    pub async fn create_event(&self, owner_id: &str, fields: &EventFields) -> StoreResult<Event> {
        self.create_event_with_secrets(owner_id, fields, SecretEnvChange::default())
            .await
    }

    /// Creates an event with its secret environment variables, in one transaction.
    pub async fn create_event_with_secrets(
        &self,
        owner_id: &str,
        fields: &EventFields,
        secrets: SecretEnvChange,
    ) -> StoreResult<Event> {
        let (owner_id, fields) = (owner_id.to_string(), fields.clone());
        let id = write_op!(self, |conn| async {
        let id = new_id();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO events (id, owner_id, name, kind, script, runtime, targets, timeout_seconds, retries, env, created_at, updated_at,
             image, memory_mb, cpus, pids, network, read_only, run_as_user,
             schedule_cron, schedule_timezone, schedule_dst, schedule_misfire, schedule_overlap, next_run_at,
             notify_on_failure, notify_on_success, http, tool_action, executor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, CAST($15 AS DOUBLE PRECISION), $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)",
        )
        .bind(&id)
        .bind(owner_id)
        .bind(&fields.name)
        .bind(fields.kind.as_str())
        .bind(&fields.script)
        .bind(fields.runtime.as_str())
        .bind(fields.targets.to_json())
        .bind(fields.timeout_seconds as i64)
        .bind(fields.retries as i64)
        .bind(env_to_json(&fields.env))
        .bind(now)
        .bind(now)
        .bind(&fields.docker.image)
        .bind(fields.docker.memory_mb.map(i64::from))
        // As text (CAST in the SQL): sqlx's Any driver binds a NULL f64 as a float4 NULL, and
        // PostgreSQL then keeps that parameter type for the cached statement (docs/postgres.md).
        .bind(fields.docker.cpus.map(|cpus| cpus.to_string()))
        .bind(fields.docker.pids.map(i64::from))
        .bind(fields.docker.network.as_str())
        .bind(i64::from(fields.docker.read_only))
        .bind(&fields.docker.user)
        .bind(fields.schedule.as_ref().map(|s| s.cron.clone()))
        .bind(fields.schedule.as_ref().map(|s| s.timezone.clone()))
        .bind(fields.schedule.as_ref().map(|s| s.dst.as_str()))
        .bind(fields.schedule.as_ref().map(|s| s.misfire.as_str()))
        .bind(fields.schedule.as_ref().map(|s| s.overlap.as_str()))
        .bind(fields.next_run_at)
        .bind(&fields.notify.on_failure)
        .bind(&fields.notify.on_success)
        .bind(http_to_json(&fields.action))
        .bind(fields.action.tool_action.as_ref().map(ToolAction::to_json))
        .bind(fields.action.executor.as_str())
        .execute(&mut *conn)
        .await?;
        super::secrets::change_secret_env_in(conn, &id, &secrets.set, &secrets.remove).await?;
        if let Some(policy) = &fields.dispatch {
            super::dispatch::set_dispatch_policy_in(conn, &id, policy).await?;
        }
        Ok(id)
        })
        .await?;
        self.event(&id).await
    }

    /// Replaces the caller-set fields of an event.
    pub async fn update_event(&self, id: &str, fields: &EventFields) -> StoreResult<Event> {
        self.update_event_with_secrets(id, fields, SecretEnvChange::default())
            .await
    }

    /// Replaces the caller-set fields of an event and changes its secret environment
    /// variables, in one transaction.
    pub async fn update_event_with_secrets(
        &self,
        id: &str,
        fields: &EventFields,
        secrets: SecretEnvChange,
    ) -> StoreResult<Event> {
        let (id, fields) = (id.to_string(), fields.clone());
        let event_id = id.clone();
        write_op!(self, |conn| async {
        let changed = sqlx::query(
            "UPDATE events SET name = $1, kind = $2, script = $3, runtime = $4, targets = $5, timeout_seconds = $6, retries = $7,
             env = $8, updated_at = $9, image = $10, memory_mb = $11, cpus = CAST($12 AS DOUBLE PRECISION), pids = $13, network = $14, read_only = $15, run_as_user = $16,
             schedule_cron = $17, schedule_timezone = $18, schedule_dst = $19, schedule_misfire = $20, schedule_overlap = $21,
             next_run_at = CASE WHEN $22 THEN $23 ELSE next_run_at END,
             notify_on_failure = $24, notify_on_success = $25, http = $26, tool_action = $27, executor = $28
             WHERE id = $29",
        )
        .bind(&fields.name)
        .bind(fields.kind.as_str())
        .bind(&fields.script)
        .bind(fields.runtime.as_str())
        .bind(fields.targets.to_json())
        .bind(fields.timeout_seconds as i64)
        .bind(fields.retries as i64)
        .bind(env_to_json(&fields.env))
        .bind(now_ms())
        .bind(&fields.docker.image)
        .bind(fields.docker.memory_mb.map(i64::from))
        // As text (CAST in the SQL): sqlx's Any driver binds a NULL f64 as a float4 NULL, and
        // PostgreSQL then keeps that parameter type for the cached statement (docs/postgres.md).
        .bind(fields.docker.cpus.map(|cpus| cpus.to_string()))
        .bind(fields.docker.pids.map(i64::from))
        .bind(fields.docker.network.as_str())
        .bind(i64::from(fields.docker.read_only))
        .bind(&fields.docker.user)
        .bind(fields.schedule.as_ref().map(|s| s.cron.clone()))
        .bind(fields.schedule.as_ref().map(|s| s.timezone.clone()))
        .bind(fields.schedule.as_ref().map(|s| s.dst.as_str()))
        .bind(fields.schedule.as_ref().map(|s| s.misfire.as_str()))
        .bind(fields.schedule.as_ref().map(|s| s.overlap.as_str()))
        .bind(fields.reschedule || fields.schedule.is_none())
        .bind(fields.next_run_at)
        .bind(&fields.notify.on_failure)
        .bind(&fields.notify.on_success)
        .bind(http_to_json(&fields.action))
        .bind(fields.action.tool_action.as_ref().map(ToolAction::to_json))
        .bind(fields.action.executor.as_str())
        .bind(&id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        super::secrets::change_secret_env_in(conn, &id, &secrets.set, &secrets.remove).await?;
        if let Some(policy) = &fields.dispatch {
            super::dispatch::set_dispatch_policy_in(conn, &id, policy).await?;
        }
        Ok(())
        })
        .await?;
        self.event(&event_id).await
    }

    /// Deletes an event with its runs and jobs.
    pub async fn delete_event(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let changed = sqlx::query("DELETE FROM events WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    /// One event by id.
    pub async fn event(&self, id: &str) -> StoreResult<Event> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        event_from_row(&row)
    }

    /// One event by its owner's name for it.
    pub async fn event_by_name(&self, owner_id: &str, name: &str) -> StoreResult<Event> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE owner_id = $1 AND name = $2"
        )))
        .bind(owner_id)
        .bind(name)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        event_from_row(&row)
    }

    /// Events, all of them or only one owner's.
    pub async fn events(&self, owner_id: Option<&str>) -> StoreResult<Vec<Event>> {
        let rows = match owner_id {
            Some(owner) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE owner_id = $1 ORDER BY name"
                )))
                .bind(owner)
                .fetch_all(&self.reader)
                .await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {EVENT_COLUMNS} FROM events ORDER BY name"
                )))
                .fetch_all(&self.reader)
                .await?
            }
        };
        rows.iter().map(event_from_row).collect()
    }
}
