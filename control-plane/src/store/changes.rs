//! The lookups behind the change notices of `GET /changes` (`crate::changes`): who owns the
//! objects a batch of notices is about, and the state of changed jobs (so log appends, which
//! also wake job followers, are not announced as changes).

use sqlx::{AssertSqlSafe, Row};

use super::dispatch::{padded, padded_len, placeholders};
use super::{Store, StoreResult};

/// Most ids bound in one query.
const CHUNK: usize = 500;

/// The owned objects a notice can name, by how their owner is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    /// A run: its event's owner.
    Run,
    Server,
    Event,
    Workflow,
    /// A workflow run: its workflow's owner.
    WorkflowRun,
}

impl Owned {
    /// The query's start; it ends with `WHERE <id column> IN (`.
    fn select(self) -> &'static str {
        match self {
            Owned::Run => {
                "SELECT r.id, e.owner_id FROM runs r JOIN events e ON e.id = r.event_id WHERE r.id IN ("
            }
            Owned::Server => "SELECT id, owner_id FROM servers WHERE id IN (",
            Owned::Event => "SELECT id, owner_id FROM events WHERE id IN (",
            Owned::Workflow => "SELECT id, owner_id FROM workflows WHERE id IN (",
            Owned::WorkflowRun => {
                "SELECT wr.id, w.owner_id FROM workflow_runs wr JOIN workflows w ON w.id = wr.workflow_id WHERE wr.id IN ("
            }
        }
    }
}

/// A job as a change notice needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChange {
    pub id: String,
    pub run_id: String,
    /// The owner of the job's event.
    pub owner_id: String,
    /// What makes a change worth announcing: status, attempt and the cancel request.
    pub status: String,
    pub attempt: i64,
    pub cancel_requested: bool,
}

impl Store {
    /// `(id, owner id)` of the objects of `ids` that exist; missing ones are left out.
    pub async fn owners_of(
        &self,
        owned: Owned,
        ids: &[&str],
    ) -> StoreResult<Vec<(String, String)>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "{}{})",
                owned.select(),
                placeholders(1, padded_len(chunk.len(), CHUNK))
            );
            let mut query = sqlx::query(AssertSqlSafe(self.backend().positional(sql)));
            for id in padded(chunk, CHUNK) {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.reader).await? {
                found.push((row.try_get(0)?, row.try_get(1)?));
            }
        }
        Ok(found)
    }

    /// The jobs of `ids` that exist, with their run and owner.
    pub async fn job_changes(&self, ids: &[&str]) -> StoreResult<Vec<JobChange>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT j.id, j.run_id, e.owner_id, j.status, j.attempt, j.cancel_requested \
                 FROM jobs j JOIN events e ON e.id = j.event_id WHERE j.id IN ({})",
                placeholders(1, padded_len(chunk.len(), CHUNK))
            );
            let mut query = sqlx::query(AssertSqlSafe(self.backend().positional(sql)));
            for id in padded(chunk, CHUNK) {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.reader).await? {
                found.push(JobChange {
                    id: row.try_get(0)?,
                    run_id: row.try_get(1)?,
                    owner_id: row.try_get(2)?,
                    status: row.try_get(3)?,
                    attempt: row.try_get(4)?,
                    cancel_requested: row.try_get::<i64, _>(5)? != 0,
                });
            }
        }
        Ok(found)
    }
}
