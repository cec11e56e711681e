//! Servers: the hosts jobs run on, reached through their agent or, for SSH fallback, by the
//! control plane over SSH. The SSH secrets are stored sealed (the caller seals them with
//! `ENCRYPTION_KEY`); this module never sees them in the clear. `claim_ssh_job` hands queued SSH
//! jobs to the control plane's SSH worker with a lease, like an agent's claim.

use sqlx::Row;

use super::agents::{Labels, labels_from_json, labels_to_json};
use super::jobs::{ClaimedJob, SSH_RUNNER_PREFIX};
use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};

/// How the control plane reaches a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Agent,
    Ssh,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Agent => "agent",
            Connection::Ssh => "ssh",
        }
    }

    pub fn parse(text: &str) -> Option<Connection> {
        match text {
            "agent" => Some(Connection::Agent),
            "ssh" => Some(Connection::Ssh),
            _ => None,
        }
    }
}

/// How the control plane authenticates over SSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshAuth {
    Key,
    Password,
}

impl SshAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            SshAuth::Key => "key",
            SshAuth::Password => "password",
        }
    }

    pub fn parse(text: &str) -> Option<SshAuth> {
        match text {
            "key" => Some(SshAuth::Key),
            "password" => Some(SshAuth::Password),
            _ => None,
        }
    }
}

/// The SSH settings of a server; `secrets` is the sealed JSON of the private key, passphrase
/// and password.
#[derive(Clone)]
pub struct SshSettings {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub auth: SshAuth,
    pub secrets: Vec<u8>,
    /// The pinned OpenSSH public key line (`ssh-ed25519 AAAA…`), if known.
    pub host_key: Option<String>,
    /// Keep the connection open for the server's next jobs (`ssh/pool.rs`).
    pub reuse_connection: bool,
}

impl std::fmt::Debug for SshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("auth", &self.auth)
            .field("host_key", &self.host_key)
            .field("reuse_connection", &self.reuse_connection)
            .finish_non_exhaustive()
    }
}

/// A stored server.
#[derive(Debug, Clone)]
pub struct Server {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub address: String,
    pub labels: Labels,
    pub connection: Connection,
    pub agent_id: Option<String>,
    pub ssh: Option<SshSettings>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Everything a server is made of, as written by create and update.
#[derive(Debug, Clone)]
pub struct ServerFields {
    pub name: String,
    pub address: String,
    pub labels: Labels,
    pub connection: Connection,
    pub agent_id: Option<String>,
    pub ssh: Option<SshSettings>,
}

const SERVER_COLUMNS: &str = "id, owner_id, name, address, labels, connection, agent_id, ssh_host, ssh_port, ssh_user, ssh_auth, ssh_secrets, host_key, ssh_reuse, created_at, updated_at";

fn server_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Server> {
    let connection: String = row.try_get("connection")?;
    let connection = Connection::parse(&connection)
        .ok_or_else(|| StoreError::Corrupt(format!("connection {connection:?}")))?;
    let ssh = match row.try_get::<Option<String>, _>("ssh_host")? {
        Some(host) => {
            let auth: String = row.try_get("ssh_auth")?;
            Some(SshSettings {
                host,
                port: row.try_get::<i64, _>("ssh_port")? as u16,
                username: row.try_get("ssh_user")?,
                auth: SshAuth::parse(&auth)
                    .ok_or_else(|| StoreError::Corrupt(format!("ssh_auth {auth:?}")))?,
                secrets: row.try_get("ssh_secrets")?,
                host_key: row.try_get("host_key")?,
                reuse_connection: row.try_get::<i64, _>("ssh_reuse")? != 0,
            })
        }
        None => None,
    };
    Ok(Server {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        name: row.try_get("name")?,
        address: row.try_get("address")?,
        labels: labels_from_json(&row.try_get::<String, _>("labels")?)?,
        connection,
        agent_id: row.try_get("agent_id")?,
        ssh,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    pub async fn create_server(
        &self,
        owner_id: &str,
        fields: &ServerFields,
    ) -> StoreResult<Server> {
        let (owner_id, fields) = (owner_id.to_string(), fields.clone());
        let id = write_op!(self, |conn| async {
            let id = new_id();
            let now = now_ms();
            let ssh = fields.ssh.as_ref();
            sqlx::query(
                "INSERT INTO servers (id, owner_id, name, address, labels, connection, agent_id, ssh_host, ssh_port, ssh_user,
                 ssh_auth, ssh_secrets, host_key, ssh_reuse, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            )
            .bind(&id)
            .bind(&owner_id)
            .bind(&fields.name)
            .bind(&fields.address)
            .bind(labels_to_json(&fields.labels))
            .bind(fields.connection.as_str())
            .bind(&fields.agent_id)
            .bind(ssh.map(|ssh| ssh.host.clone()))
            .bind(ssh.map(|ssh| ssh.port as i64))
            .bind(ssh.map(|ssh| ssh.username.clone()))
            .bind(ssh.map(|ssh| ssh.auth.as_str()))
            .bind(ssh.map(|ssh| ssh.secrets.clone()))
            .bind(ssh.and_then(|ssh| ssh.host_key.clone()))
            .bind(i64::from(ssh.is_none_or(|ssh| ssh.reuse_connection)))
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(id)
        })
        .await?;
        self.server(&id).await
    }

    /// Replaces every field of a server (the caller merged the change into the stored one).
    pub async fn update_server(&self, id: &str, fields: &ServerFields) -> StoreResult<Server> {
        let (id, fields) = (id.to_string(), fields.clone());
        let updated_id = id.clone();
        write_op!(self, |conn| async {
            let ssh = fields.ssh.as_ref();
            let done = sqlx::query(
                "UPDATE servers SET name = $1, address = $2, labels = $3, connection = $4, agent_id = $5, ssh_host = $6, ssh_port = $7,
                 ssh_user = $8, ssh_auth = $9, ssh_secrets = $10, host_key = $11, ssh_reuse = $12, updated_at = $13 WHERE id = $14",
            )
            .bind(&fields.name)
            .bind(&fields.address)
            .bind(labels_to_json(&fields.labels))
            .bind(fields.connection.as_str())
            .bind(&fields.agent_id)
            .bind(ssh.map(|ssh| ssh.host.clone()))
            .bind(ssh.map(|ssh| ssh.port as i64))
            .bind(ssh.map(|ssh| ssh.username.clone()))
            .bind(ssh.map(|ssh| ssh.auth.as_str()))
            .bind(ssh.map(|ssh| ssh.secrets.clone()))
            .bind(ssh.and_then(|ssh| ssh.host_key.clone()))
            .bind(i64::from(ssh.is_none_or(|ssh| ssh.reuse_connection)))
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await?;
        self.server(&updated_id).await
    }

    /// Deletes a server. Its queued jobs are cancelled (nothing could run them any more; their
    /// events' `notify.on_failure` is enqueued, so wake the dispatcher); its
    /// past jobs stay, without `server_id`; a running one is settled by its lease.
    pub async fn delete_server(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let cancelled: Vec<String> = sqlx::query_scalar(
                "UPDATE jobs SET status = 'cancelled', reason = 'cancelled', settled_by = 'api', cancel_requested = 1,
                 finished_at = $1 WHERE server_id = $2 AND status = 'queued' RETURNING id",
            )
            .bind(now_ms())
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?;
            for job_id in cancelled {
                super::jobs::notify_settled_in(conn, &job_id).await?;
                super::dispatch::settled_in(conn, &job_id).await?;
            }
            let done = sqlx::query("DELETE FROM servers WHERE id = $1")
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    pub async fn server(&self, id: &str) -> StoreResult<Server> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        server_from_row(&row)
    }

    /// Every server, or those of one owner.
    pub async fn servers(&self, owner_id: Option<&str>) -> StoreResult<Vec<Server>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE $1 IS NULL OR owner_id = $2 ORDER BY name, id"
        )))
        .bind(owner_id)
        .bind(owner_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(server_from_row).collect()
    }

    /// The servers an event of `owner_id` may target: the owner's own, or every server when the
    /// owner is an admin.
    pub async fn servers_usable_by(&self, owner_id: &str) -> StoreResult<Vec<Server>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE owner_id = $1
             OR EXISTS (SELECT 1 FROM users WHERE id = $2 AND role = 'admin') ORDER BY name, id"
        )))
        .bind(owner_id)
        .bind(owner_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(server_from_row).collect()
    }

    /// Pins a host key on first use: records `host_key` only while none is stored. Returns the
    /// key that is pinned afterwards (the given one, or the one another connection pinned first).
    pub async fn pin_host_key(&self, server_id: &str, host_key: &str) -> StoreResult<String> {
        let (server_id, host_key) = (server_id.to_string(), host_key.to_string());
        write_op!(self, |conn| async {
            sqlx::query("UPDATE servers SET host_key = $1 WHERE id = $2 AND host_key IS NULL")
                .bind(&host_key)
                .bind(&server_id)
                .execute(&mut *conn)
                .await?;
            sqlx::query_scalar::<_, Option<String>>("SELECT host_key FROM servers WHERE id = $1")
                .bind(&server_id)
                .fetch_optional(&mut *conn)
                .await?
                .flatten()
                .ok_or(StoreError::NotFound)
        })
        .await
    }

    /// Claims the oldest queued SSH fallback job (of any server), starting its next attempt
    /// with a lease until `lease_until`. Returns the job and its runner key (`ssh:<server id>`).
    pub async fn claim_ssh_job(
        &self,
        lease_until: i64,
    ) -> StoreResult<Option<(ClaimedJob, String)>> {
        // The oldest claimable job (see `super::dispatch`): a delayed retry, a closed batch or a
        // full concurrency limit must not hold back the jobs behind it. The queued SSH jobs are
        // walked in the order of their own index (migration 0027, `jobs_ssh`), never the
        // agents' backlog.
        let now = super::now_ms();
        let runner = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(oldest_ssh_job()))
            .bind(now)
            .fetch_optional(&self.reader)
            .await?;
        let Some(runner) = runner else {
            return Ok(None);
        };
        debug_assert!(runner.starts_with(SSH_RUNNER_PREFIX));
        let mut claimed = self.claim_jobs(&runner, 1, lease_until).await?;
        Ok(claimed.pop().map(|job| (job, runner)))
    }
}

/// The runner key of the oldest claimable SSH fallback job at time `$1` (see
/// [`Store::claim_ssh_job`]).
pub(super) fn oldest_ssh_job() -> String {
    format!(
        "SELECT j.runner FROM jobs j LEFT JOIN event_dispatch d ON d.event_id = j.event_id
         WHERE j.agent_id IS NULL AND j.server_id IS NOT NULL AND {}
           AND (d.max_concurrency IS NULL OR d.max_concurrency >
                (SELECT COUNT(*) FROM jobs a WHERE a.event_id = j.event_id AND a.status IN ('claimed', 'running')))
         ORDER BY j.queued_at, j.id LIMIT 1",
        super::dispatch::claimable(1)
    )
}
