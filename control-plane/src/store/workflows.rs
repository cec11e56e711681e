//! Workflows, their runs and the durable state of each node of a run.
//!
//! Every change of a workflow run goes through [`Store::apply_workflow_step`]: one transaction
//! that moves nodes from the state the engine read to their new state (compare and set: if any
//! node moved meanwhile nothing is written and the engine reads again), creates the runs of the
//! nodes it starts and ends the workflow run. So a node's run is created at most once (the node
//! row is keyed by (workflow run, node) and leaves `pending` only in the transaction that
//! creates its run), and a decision is durable together with its effects.

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::jobs::{JobStatus, RunSpec, create_run_in};
use super::{Store, StoreError, StoreResult, audit_in, new_id, now_ms, write_op};

/// A workflow as stored (its webhook secret stays sealed, and is read only by the webhook).
#[derive(Debug, Clone)]
pub struct Workflow {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    /// JSON of [`crate::workflows::Definition`].
    pub definition: String,
    pub trigger_manual: bool,
    pub schedule_cron: Option<String>,
    pub schedule_timezone: Option<String>,
    pub next_run_at: Option<i64>,
    /// Whether a webhook secret is set (the webhook trigger is on).
    pub webhook: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a create or update writes.
#[derive(Debug, Clone)]
pub struct WorkflowFields {
    pub name: String,
    pub definition: String,
    pub trigger_manual: bool,
    pub schedule_cron: Option<String>,
    pub schedule_timezone: Option<String>,
    /// The first slot of the schedule (recomputed on every save).
    pub next_run_at: Option<i64>,
}

/// What happens to the webhook secret on a save.
#[derive(Debug, Clone)]
pub enum WebhookSecret {
    Keep,
    /// A new sealed secret.
    Set(Vec<u8>),
    Clear,
}

const WORKFLOW_COLUMNS: &str =
    "id, owner_id, name, definition, trigger_manual, schedule_cron, schedule_timezone, next_run_at,
     CASE WHEN webhook_secret_sealed IS NULL THEN 0 ELSE 1 END AS webhook, created_at, updated_at";

fn workflow_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Workflow> {
    Ok(Workflow {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        name: row.try_get("name")?,
        definition: row.try_get("definition")?,
        trigger_manual: row.try_get::<i64, _>("trigger_manual")? != 0,
        schedule_cron: row.try_get("schedule_cron")?,
        schedule_timezone: row.try_get("schedule_timezone")?,
        next_run_at: row.try_get("next_run_at")?,
        webhook: row.try_get::<i64, _>("webhook")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// A node of a workflow run as stored.
#[derive(Debug, Clone)]
pub struct RunNode {
    pub node_id: String,
    pub state: String,
    pub run_id: Option<String>,
    pub input: Option<String>,
    pub result: Option<String>,
    pub condition: Option<bool>,
    pub reason: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// A workflow run with its nodes.
#[derive(Debug, Clone)]
pub struct WorkflowRun {
    pub id: String,
    pub workflow_id: String,
    /// The definition as it was when the run was triggered.
    pub definition: String,
    pub input: Option<String>,
    pub trigger: String,
    pub slot_at: Option<i64>,
    pub status: String,
    pub created_by: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub nodes: Vec<RunNode>,
}

/// A job of a node's run, as the engine needs it to decide the node's outcome.
#[derive(Debug, Clone)]
pub struct NodeJob {
    pub status: JobStatus,
    pub result: Option<String>,
    pub condition: Option<bool>,
    /// The agent's or server's name (its id if it was deleted).
    pub runner: String,
}

/// A new workflow run, written by the step that starts its entry nodes.
#[derive(Debug, Clone)]
pub struct NewWorkflowRun {
    pub workflow_id: String,
    pub definition: String,
    pub input: Option<String>,
    /// `manual`, `schedule` or `webhook`.
    pub trigger: &'static str,
    pub slot_at: Option<i64>,
    pub created_by: Option<String>,
    /// Every node id of the definition (all start `pending`).
    pub node_ids: Vec<String>,
}

/// A schedule slot the step handles: `next_run_at` moves from `expected_next` to `new_next`
/// (compare and set) and the slot is recorded (UNIQUE per workflow and slot).
#[derive(Debug, Clone)]
pub struct SlotFire {
    pub expected_next: i64,
    pub new_next: Option<i64>,
    pub slot_at: i64,
    /// `fired` (the step creates the run) or `missed` (nothing else is written).
    pub outcome: &'static str,
}

/// One node's move in a step.
#[derive(Debug, Clone)]
pub struct NodeChange {
    pub node_id: String,
    /// The state the engine read; the change applies only if the node is still in it.
    pub from: &'static str,
    pub to: &'static str,
    pub input: Option<String>,
    pub result: Option<String>,
    pub condition: Option<bool>,
    pub reason: Option<String>,
    /// The run to create (for a move to `running`).
    pub run: Option<Box<RunSpec>>,
}

/// One transaction of the engine for one workflow run.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// The workflow run (for a new one: the id it gets).
    pub workflow_run_id: String,
    pub create: Option<NewWorkflowRun>,
    /// A schedule slot handled by this step (with `create`).
    pub fire: Option<SlotFire>,
    pub changes: Vec<NodeChange>,
    /// The status the workflow run ends with (`completed` or `failed`), if it ends.
    pub finish: Option<&'static str>,
}

/// What [`Store::apply_workflow_step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Written; the `(job id, runner)` pairs of the runs it created.
    Applied { jobs: Vec<(String, String)> },
    /// A node or the workflow run was not in the state the engine read (or the schedule slot
    /// was handled already); nothing was written.
    Stale,
}

/// Marks a step as stale so its savepoint is rolled back.
const STALE: &str = "workflow step is stale";

async fn apply_step_in(conn: &mut AnyConnection, step: &Step) -> StoreResult<StepOutcome> {
    let now = now_ms();
    if let (Some(fire), Some(create)) = (&step.fire, &step.create) {
        let moved =
            sqlx::query("UPDATE workflows SET next_run_at = $1 WHERE id = $2 AND next_run_at = $3")
                .bind(fire.new_next)
                .bind(&create.workflow_id)
                .bind(fire.expected_next)
                .execute(&mut *conn)
                .await?
                .rows_affected();
        if moved == 0 {
            return Err(StoreError::Constraint(STALE.into()));
        }
        let recorded = sqlx::query(
            "INSERT INTO workflow_fires (workflow_id, slot_at, outcome, handled_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workflow_id, slot_at) DO NOTHING",
        )
        .bind(&create.workflow_id)
        .bind(fire.slot_at)
        .bind(fire.outcome)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if recorded == 0 || fire.outcome != "fired" {
            // Already handled (or a miss): the slot moved on, nothing else happens.
            return Ok(StepOutcome::Applied { jobs: Vec::new() });
        }
    }
    if let Some(create) = &step.create {
        sqlx::query(
            "INSERT INTO workflow_runs (id, workflow_id, definition, input, trigger, slot_at, status, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8)",
        )
        .bind(&step.workflow_run_id)
        .bind(&create.workflow_id)
        .bind(&create.definition)
        .bind(&create.input)
        .bind(create.trigger)
        .bind(create.slot_at)
        .bind(&create.created_by)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        for node_id in &create.node_ids {
            sqlx::query(
                "INSERT INTO workflow_run_nodes (workflow_run_id, node_id, state) VALUES ($1, $2, 'pending')",
            )
            .bind(&step.workflow_run_id)
            .bind(node_id)
            .execute(&mut *conn)
            .await?;
        }
        if step.fire.is_some() {
            sqlx::query(
                "UPDATE workflow_fires SET workflow_run_id = $1 WHERE workflow_id = $2 AND slot_at = $3",
            )
            .bind(&step.workflow_run_id)
            .bind(&create.workflow_id)
            .bind(step.fire.as_ref().map(|fire| fire.slot_at))
            .execute(&mut *conn)
            .await?;
        }
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM workflow_runs WHERE id = $1")
            .bind(&step.workflow_run_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(status) = status else {
        return Err(StoreError::Constraint(STALE.into()));
    };
    let starts = step.changes.iter().any(|change| change.to == "running");
    if starts && status != "running" {
        // Cancelled meanwhile: no node starts any more.
        return Err(StoreError::Constraint(STALE.into()));
    }
    let mut jobs = Vec::new();
    for change in &step.changes {
        let run_id = match &change.run {
            Some(run) => {
                let (run_id, created) = create_run_in(conn, run).await?;
                jobs.extend(created);
                Some(run_id)
            }
            None => None,
        };
        let moved = sqlx::query(
            "UPDATE workflow_run_nodes SET state = $1, run_id = COALESCE($2, run_id),
               input = COALESCE($3, input), result = COALESCE($4, result), condition = COALESCE($5, condition), reason = COALESCE($6, reason),
               started_at = CASE WHEN $7 = 'running' THEN $8 ELSE started_at END,
               finished_at = CASE WHEN $9 IN ('completed', 'failed', 'skipped') THEN $10 ELSE finished_at END
             WHERE workflow_run_id = $11 AND node_id = $12 AND state = $13",
        )
        .bind(change.to)
        .bind(&run_id)
        .bind(&change.input)
        .bind(&change.result)
        .bind(change.condition.map(i64::from))
        .bind(&change.reason)
        .bind(change.to)
        .bind(now)
        .bind(change.to)
        .bind(now)
        .bind(&step.workflow_run_id)
        .bind(&change.node_id)
        .bind(change.from)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if moved == 0 {
            return Err(StoreError::Constraint(STALE.into()));
        }
    }
    if let Some(finish) = step.finish {
        // A cancelled run keeps its status; it only gets its end time.
        sqlx::query(
            "UPDATE workflow_runs SET status = CASE WHEN status = 'running' THEN $1 ELSE status END,
               finished_at = $2 WHERE id = $3 AND finished_at IS NULL",
        )
        .bind(finish)
        .bind(now)
        .bind(&step.workflow_run_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(StepOutcome::Applied { jobs })
}

fn run_node_from_row(row: &sqlx::any::AnyRow) -> StoreResult<RunNode> {
    Ok(RunNode {
        node_id: row.try_get("node_id")?,
        state: row.try_get("state")?,
        run_id: row.try_get("run_id")?,
        input: row.try_get("input")?,
        result: row.try_get("result")?,
        condition: row
            .try_get::<Option<i64>, _>("condition")?
            .map(|condition| condition != 0),
        reason: row.try_get("reason")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

const RUN_COLUMNS: &str = "id, workflow_id, definition, input, trigger, slot_at, status, created_by, created_at, finished_at";

fn workflow_run_from_row(row: &sqlx::any::AnyRow, nodes: Vec<RunNode>) -> StoreResult<WorkflowRun> {
    Ok(WorkflowRun {
        id: row.try_get("id")?,
        workflow_id: row.try_get("workflow_id")?,
        definition: row.try_get("definition")?,
        input: row.try_get("input")?,
        trigger: row.try_get("trigger")?,
        slot_at: row.try_get("slot_at")?,
        status: row.try_get("status")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
        nodes,
    })
}

impl Store {
    /// Creates a workflow; the name is unique per owner (`Constraint` otherwise).
    pub async fn create_workflow(
        &self,
        owner_id: &str,
        fields: &WorkflowFields,
        sealed_secret: Option<Vec<u8>>,
    ) -> StoreResult<Workflow> {
        let (id, owner_id, fields) = (new_id(), owner_id.to_string(), fields.clone());
        let created = id.clone();
        write_op!(self, |conn| async {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO workflows (id, owner_id, name, definition, trigger_manual, schedule_cron, schedule_timezone,
                   next_run_at, webhook_secret_sealed, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&id)
            .bind(&owner_id)
            .bind(&fields.name)
            .bind(&fields.definition)
            .bind(i64::from(fields.trigger_manual))
            .bind(&fields.schedule_cron)
            .bind(&fields.schedule_timezone)
            .bind(fields.next_run_at)
            .bind(sealed_secret)
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            audit_in(
                conn,
                "workflow_created",
                Some(&owner_id),
                serde_json::json!({"workflow_id": id, "name": fields.name}),
            )
            .await
        })
        .await?;
        self.workflow(&created).await
    }

    /// Replaces a workflow's fields; the schedule's next slot is recomputed by the caller.
    pub async fn update_workflow(
        &self,
        id: &str,
        fields: &WorkflowFields,
        secret: WebhookSecret,
    ) -> StoreResult<Workflow> {
        let (workflow_id, fields) = (id.to_string(), fields.clone());
        write_op!(self, |conn| async {
            let changed = sqlx::query(
                "UPDATE workflows SET name = $1, definition = $2, trigger_manual = $3, schedule_cron = $4,
                   schedule_timezone = $5, next_run_at = $6, updated_at = $7,
                   webhook_secret_sealed = CASE $8 WHEN 'keep' THEN webhook_secret_sealed ELSE $9 END
                 WHERE id = $10",
            )
            .bind(&fields.name)
            .bind(&fields.definition)
            .bind(i64::from(fields.trigger_manual))
            .bind(&fields.schedule_cron)
            .bind(&fields.schedule_timezone)
            .bind(fields.next_run_at)
            .bind(now_ms())
            .bind(match secret {
                WebhookSecret::Keep => "keep",
                _ => "change",
            })
            .bind(match &secret {
                WebhookSecret::Set(sealed) => Some(sealed.clone()),
                _ => None,
            })
            .bind(&workflow_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await?;
        self.workflow(id).await
    }

    /// Deletes a workflow with its runs' records (the events' runs stay).
    pub async fn delete_workflow(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let changed = sqlx::query("DELETE FROM workflows WHERE id = $1")
                .bind(&id)
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

    /// One workflow by id.
    pub async fn workflow(&self, id: &str) -> StoreResult<Workflow> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        workflow_from_row(&row)
    }

    /// The workflows of `owner` (every workflow when `None`), by name.
    pub async fn workflows(&self, owner: Option<&str>) -> StoreResult<Vec<Workflow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE ($1 IS NULL OR owner_id = $2) ORDER BY name, id"
        )))
        .bind(owner)
        .bind(owner)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(workflow_from_row).collect()
    }

    /// The sealed webhook secret of a workflow, if its webhook trigger is on.
    pub async fn workflow_webhook_secret(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT webhook_secret_sealed FROM workflows WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?
                .flatten(),
        )
    }

    /// Applies one engine step in one transaction (see the module documentation).
    pub async fn apply_workflow_step(&self, step: Step) -> StoreResult<StepOutcome> {
        let outcome = write_op!(self, |conn| async { apply_step_in(conn, &step).await }).await;
        match outcome {
            Err(StoreError::Constraint(message)) if message == STALE => Ok(StepOutcome::Stale),
            other => other,
        }
    }

    /// Cancels a running workflow run: its status becomes `cancelled`, its pending nodes are
    /// skipped. Returns the ids of the runs of its running nodes (to cancel their jobs), or
    /// `None` if it was not running.
    pub async fn cancel_workflow_run(&self, id: &str) -> StoreResult<Option<Vec<String>>> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let now = now_ms();
            let changed = sqlx::query(
                "UPDATE workflow_runs SET status = 'cancelled' WHERE id = $1 AND status = 'running'",
            )
            .bind(&id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 0 {
                return Ok(None);
            }
            sqlx::query(
                "UPDATE workflow_run_nodes SET state = 'skipped', reason = 'the workflow run was cancelled', finished_at = $1
                 WHERE workflow_run_id = $2 AND state = 'pending'",
            )
            .bind(now)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            let running: Vec<Option<String>> = sqlx::query_scalar(
                "SELECT run_id FROM workflow_run_nodes WHERE workflow_run_id = $1 AND state = 'running'",
            )
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?;
            if running.is_empty() {
                sqlx::query("UPDATE workflow_runs SET finished_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(Some(running.into_iter().flatten().collect()))
        })
        .await
    }

    /// One workflow run with its nodes.
    pub async fn workflow_run(&self, id: &str) -> StoreResult<WorkflowRun> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        let nodes = sqlx::query(
            "SELECT node_id, state, run_id, input, result, condition, reason, started_at, finished_at
             FROM workflow_run_nodes WHERE workflow_run_id = $1 ORDER BY node_id",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        let nodes = nodes
            .iter()
            .map(run_node_from_row)
            .collect::<StoreResult<_>>()?;
        workflow_run_from_row(&row, nodes)
    }

    /// The newest runs of a workflow, newest first, with their nodes.
    pub async fn workflow_runs(
        &self,
        workflow_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<WorkflowRun>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM workflow_runs WHERE workflow_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(workflow_id)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids {
            match self.workflow_run(&id).await {
                Ok(run) => runs.push(run),
                // Deleted between the two reads.
                Err(StoreError::NotFound) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(runs)
    }

    /// The workflow runs the engine may have to advance: running ones, and cancelled ones
    /// whose nodes still run.
    pub async fn active_workflow_runs(&self) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM workflow_runs WHERE status = 'running'
             UNION SELECT workflow_run_id FROM workflow_run_nodes WHERE state = 'running'",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    /// The workflow runs whose running nodes' runs hold one of these jobs that has ended: one
    /// query for a burst of job changes (the engine's wake-up), distinct ids.
    pub async fn workflow_runs_of_ended_jobs(&self, job_ids: &[&str]) -> StoreResult<Vec<String>> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let query = format!(
            "SELECT DISTINCT n.workflow_run_id FROM workflow_run_nodes n JOIN jobs j ON j.run_id = n.run_id
             WHERE n.state = 'running' AND j.id IN ({}) AND j.status IN ('completed', 'failed', 'cancelled')",
            super::dispatch::placeholders(1, super::dispatch::padded_len(job_ids.len(), usize::MAX))
        );
        let mut query = sqlx::query_scalar(AssertSqlSafe(self.backend().positional(query)));
        for id in super::dispatch::padded(job_ids, usize::MAX) {
            query = query.bind(id);
        }
        Ok(query.fetch_all(&self.reader).await?)
    }

    /// The jobs of a node's run, by id.
    pub async fn node_jobs(&self, run_id: &str) -> StoreResult<Vec<NodeJob>> {
        let rows = sqlx::query(
            "SELECT j.status, j.result, j.condition, COALESCE(a.name, s.name, j.agent_id, j.server_id, j.id) AS runner
             FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id LEFT JOIN servers s ON s.id = j.server_id
             WHERE j.run_id = $1 ORDER BY j.id",
        )
        .bind(run_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(NodeJob {
                    status: JobStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
                    result: row.try_get("result")?,
                    condition: row
                        .try_get::<Option<i64>, _>("condition")?
                        .map(|condition| condition != 0),
                    runner: row.try_get("runner")?,
                })
            })
            .collect()
    }

    /// Workflows with a schedule whose next slot is at or before `now`.
    pub async fn due_workflow_schedules(&self, now: i64) -> StoreResult<Vec<Workflow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE next_run_at IS NOT NULL AND next_run_at <= $1 ORDER BY next_run_at"
        )))
        .bind(now)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(workflow_from_row).collect()
    }

    /// The earliest next slot after `now` of any workflow.
    pub async fn earliest_next_workflow_run(&self, now: i64) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_run_at) FROM workflows WHERE next_run_at > $1")
                .bind(now)
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// The handled schedule slots of a workflow, newest first: `(slot_at, outcome, run id)`.
    pub async fn workflow_fires(
        &self,
        workflow_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<(i64, String, Option<String>)>> {
        let rows = sqlx::query(
            "SELECT slot_at, outcome, workflow_run_id FROM workflow_fires WHERE workflow_id = $1
             ORDER BY slot_at DESC LIMIT $2",
        )
        .bind(workflow_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("slot_at")?,
                    row.try_get("outcome")?,
                    row.try_get("workflow_run_id")?,
                ))
            })
            .collect()
    }
}
