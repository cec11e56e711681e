//! Enrollment tokens and agents.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};

/// Labels are a sorted map of key to value, stored as a JSON object.
pub type Labels = BTreeMap<String, String>;

/// An enrolled agent.
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub version: Option<String>,
    pub hostname: Option<String>,
    pub last_seen_at: Option<i64>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// Whether the agent's last hello reported a reachable Docker engine (`None`: not known yet).
    pub docker: Option<bool>,
    /// Terminal sessions on this agent are recorded (when the control plane records at all).
    pub record_terminals: bool,
    /// The last self-update announced to this agent and what it reported about it.
    pub update: Option<super::agent_updates::AgentUpdateState>,
}

/// What a consumed enrollment token allows.
#[derive(Debug, Clone)]
pub struct EnrollmentGrant {
    pub labels: Labels,
}

/// Why an enrollment token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token.
    Unknown,
    /// The token's lifetime is over.
    Expired,
    /// Every use of the token was spent.
    UsedUp,
}

/// Input to [`Store::enroll_agent`].
#[derive(Debug)]
pub struct NewAgent<'a> {
    pub token_sha256: &'a str,
    pub name: &'a str,
    pub extra_labels: &'a Labels,
    pub hostname: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
}

pub(crate) fn labels_from_json(text: &str) -> StoreResult<Labels> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("labels: {error}")))
}

pub(crate) fn labels_to_json(labels: &Labels) -> String {
    // A map of strings always serializes.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn agent_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Agent> {
    Ok(Agent {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        labels: labels_from_json(&row.try_get::<String, _>("labels")?)?,
        version: row.try_get("version")?,
        hostname: row.try_get("hostname")?,
        last_seen_at: row.try_get("last_seen_at")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        docker: row
            .try_get::<Option<i64>, _>("docker")?
            .map(|docker| docker != 0),
        record_terminals: row.try_get::<i64, _>("record_terminals")? != 0,
        update: super::agent_updates::update_state_from_row(row)?,
    })
}

const AGENT_COLUMNS: &str = "id, name, labels, version, hostname, last_seen_at, created_at, revoked_at, docker, record_terminals, update_target, update_state, update_reason, update_at";

impl Store {
    /// Stores a new enrollment token (by hash).
    pub async fn create_enrollment_token(
        &self,
        token_sha256: &str,
        labels: &Labels,
        uses: u32,
        expires_at: i64,
        created_by: Option<&str>,
    ) -> StoreResult<String> {
        let (token_sha256, labels, created_by) = (
            token_sha256.to_string(),
            labels_to_json(labels),
            created_by.map(str::to_string),
        );
        let id = new_id();
        let token_id = id.clone();
        write_op!(self, |conn| async {
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, token_sha256, labels, uses_left, expires_at, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&token_id)
        .bind(token_sha256)
        .bind(labels)
        .bind(uses as i64)
        .bind(expires_at)
        .bind(created_by)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
        Ok(())
        })
        .await?;
        Ok(id)
    }

    /// Spends one use of an enrollment token and records the agent, atomically: two concurrent
    /// uses of a one-use token give exactly one agent. The certificate fingerprint is filled in
    /// by [`Store::set_agent_certificate`] once the certificate is issued for the returned id.
    pub async fn enroll_agent(
        &self,
        new_agent: NewAgent<'_>,
    ) -> StoreResult<Result<(Agent, EnrollmentGrant), TokenRefusal>> {
        let token_sha256 = new_agent.token_sha256.to_string();
        let name = new_agent.name.to_string();
        let extra_labels = new_agent.extra_labels.clone();
        let (hostname, os, arch) = (
            new_agent.hostname.to_string(),
            new_agent.os.to_string(),
            new_agent.arch.to_string(),
        );
        write_op!(self, |conn| async {
            let now = now_ms();
            let spent = sqlx::query(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1
             WHERE token_sha256 = $1 AND uses_left > 0 AND expires_at > $2 RETURNING labels",
            )
            .bind(&token_sha256)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(spent) = spent else {
                let row = sqlx::query(
                    "SELECT uses_left, expires_at FROM enrollment_tokens WHERE token_sha256 = $1",
                )
                .bind(&token_sha256)
                .fetch_optional(&mut *conn)
                .await?;
                let refusal = match row {
                    None => TokenRefusal::Unknown,
                    Some(row) if row.try_get::<i64, _>("expires_at")? <= now => {
                        TokenRefusal::Expired
                    }
                    Some(_) => TokenRefusal::UsedUp,
                };
                return Ok(Err(refusal));
            };
            let mut labels = labels_from_json(&spent.try_get::<String, _>("labels")?)?;
            let grant = EnrollmentGrant {
                labels: labels.clone(),
            };
            for (key, value) in &extra_labels {
                labels.insert(key.clone(), value.clone());
            }
            let id = new_id();
            // The placeholder fingerprint is unique per agent until the real one is set.
            sqlx::query(
                "INSERT INTO agents (id, name, labels, cert_sha256, hostname, os, arch, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&id)
            .bind(&name)
            .bind(labels_to_json(&labels))
            .bind(format!("pending:{id}"))
            .bind(&hostname)
            .bind(&os)
            .bind(&arch)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            let agent = Agent {
                id,
                name,
                labels,
                version: None,
                hostname: Some(hostname),
                last_seen_at: None,
                created_at: now,
                revoked_at: None,
                docker: None,
                record_terminals: false,
                update: None,
            };
            Ok(Ok((agent, grant)))
        })
        .await
    }

    /// Records the fingerprint of the certificate issued to an agent.
    pub async fn set_agent_certificate(
        &self,
        agent_id: &str,
        cert_sha256: &str,
    ) -> StoreResult<()> {
        let (agent_id, cert_sha256) = (agent_id.to_string(), cert_sha256.to_string());
        write_op!(self, |conn| async {
            sqlx::query("UPDATE agents SET cert_sha256 = $1 WHERE id = $2")
                .bind(cert_sha256)
                .bind(agent_id)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Removes an agent whose certificate could not be issued (enrollment failed half way).
    pub async fn delete_pending_agent(&self, agent_id: &str) -> StoreResult<()> {
        let agent_id = agent_id.to_string();
        write_op!(self, |conn| async {
            sqlx::query("DELETE FROM agents WHERE id = $1 AND cert_sha256 LIKE 'pending:%'")
                .bind(agent_id)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// The agent holding a certificate, revoked or not.
    pub async fn agent_by_certificate(&self, cert_sha256: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE cert_sha256 = $1"
        )))
        .bind(cert_sha256)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    /// One agent by id.
    pub async fn agent(&self, id: &str) -> StoreResult<Agent> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 AND cert_sha256 NOT LIKE 'pending:%'"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref()
            .map(agent_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    /// Every enrolled agent that is not revoked, by name.
    pub async fn agents(&self) -> StoreResult<Vec<Agent>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked_at IS NULL AND cert_sha256 NOT LIKE 'pending:%' ORDER BY name"
        )))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Records what an agent said about itself when it connected.
    pub async fn record_agent_hello(
        &self,
        agent_id: &str,
        version: &str,
        hostname: &str,
        os: &str,
        arch: &str,
        docker: bool,
    ) -> StoreResult<()> {
        let (agent_id, version, hostname, os, arch) = (
            agent_id.to_string(),
            version.to_string(),
            hostname.to_string(),
            os.to_string(),
            arch.to_string(),
        );
        write_op!(self, |conn| async {
        sqlx::query("UPDATE agents SET version = $1, hostname = $2, os = $3, arch = $4, docker = $5, last_seen_at = $6 WHERE id = $7")
            .bind(version)
            .bind(hostname)
            .bind(os)
            .bind(arch)
            .bind(i64::from(docker))
            .bind(now_ms())
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
        })
        .await
    }

    /// Persists last-seen times kept in memory while agents are connected, in one transaction.
    pub async fn record_last_seen(&self, seen: &[(String, i64)]) -> StoreResult<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let seen = seen.to_vec();
        write_op!(self, |conn| async {
            for (agent_id, at) in &seen {
                sqlx::query(
                "UPDATE agents SET last_seen_at = CASE WHEN last_seen_at > $1 THEN last_seen_at ELSE $1 END WHERE id = $2",
            )
            .bind(at)
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
            }
            Ok(())
        })
        .await
    }

    /// Revokes an agent and fails every job it had not finished (enqueueing their events'
    /// `notify.on_failure`; wake the dispatcher). Returns false if it was already revoked or does
    /// not exist.
    pub async fn revoke_agent(&self, agent_id: &str) -> StoreResult<bool> {
        let agent_id = agent_id.to_string();
        write_op!(self, |conn| async {
        let now = now_ms();
                let changed =
            sqlx::query("UPDATE agents SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(&agent_id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        let failed: Vec<String> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'failed', reason = 'revoked', settled_by = 'revoke', finished_at = $1, lease_expires_at = NULL
             WHERE agent_id = $2 AND status IN ('queued', 'claimed', 'running') RETURNING id",
        )
        .bind(now)
        .bind(&agent_id)
        .fetch_all(&mut *conn)
        .await?;
        for job_id in failed {
            super::jobs::notify_settled_in(conn, &job_id).await?;
            super::dispatch::settled_in(conn, &job_id).await?;
        }
        Ok(true)
        })
        .await
    }
}

#[cfg(test)]
impl Store {
    /// An agent enrolled straight into the store for tests (rows only; nothing connects): token
    /// `token-<name>`, certificate fingerprint `cert-<name>`.
    pub(crate) async fn enroll_test_agent(&self, name: &str) -> Agent {
        let token = format!("token-{name}");
        self.create_enrollment_token(&token, &Labels::new(), 1, now_ms() + 60_000, None)
            .await
            .expect("enrollment token");
        let (agent, _) = self
            .enroll_agent(NewAgent {
                token_sha256: &token,
                name,
                extra_labels: &Labels::new(),
                hostname: "h",
                os: "linux",
                arch: "x86_64",
            })
            .await
            .expect("enroll")
            .expect("token accepted");
        self.set_agent_certificate(&agent.id, &format!("cert-{name}"))
            .await
            .expect("certificate");
        agent
    }
}
