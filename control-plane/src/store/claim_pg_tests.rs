//! Claims from two stores on one database at the same time, as two control planes (replicas)
//! sharing it: every job claimed exactly once, by a runner allowed to, and an event's
//! `max_concurrency` never exceeded. On PostgreSQL this exercises `store::claim_pg`; on SQLite the
//! two stores' writers take turns on the file's write lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::dispatch::{DispatchPolicy, RetryPolicy};
use super::super::jobs::{Attempt, FinishOutcome, JobStatus, RunSpec};
use super::super::users::Role;
use super::super::{Store, now_ms};

/// The limited event's `max_concurrency`.
const LIMIT: u32 = 2;
/// Claiming tasks per store and agent.
const TASKS: usize = 2;

async fn event(store: &Store, owner: &str, name: &str, max_concurrency: Option<u32>) -> String {
    let fields = super::super::tests::bash_fields(
        name,
        Some(DispatchPolicy {
            retry: RetryPolicy::default(),
            max_concurrency,
            ..Default::default()
        }),
    );
    store.create_event(owner, &fields).await.unwrap().id
}

/// Creates `runs` runs of `event_id` for `agents` (one pool job each with `pool`, else one job
/// per agent); returns each job with the agents allowed to claim it.
async fn runs(
    store: &Store,
    owner: &str,
    event_id: &str,
    agents: &[String],
    pool: bool,
    runs: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut jobs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for _ in 0..runs {
        let spec = RunSpec {
            pool,
            ..super::super::tests::bash_run(event_id, owner, agents)
        };
        let (_, pairs) = store.create_run_dispatched(spec, None, None).await.unwrap();
        for (job_id, agent_id) in pairs {
            jobs.entry(job_id).or_default().insert(agent_id);
        }
    }
    jobs
}

/// The limited event's jobs claimed or running now, as the database says.
async fn active_in_database(store: &Store, event_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE event_id = $1 AND status IN ('claimed', 'running')",
    )
    .bind(event_id)
    .fetch_one(&store.reader)
    .await
    .unwrap()
}

/// The tests' setting: a user, their event "free" without a limit, and four agents.
async fn owner_event_and_agents(store: &Store) -> (String, String, Vec<String>) {
    let owner = store
        .create_user("owner", "hash", Role::User)
        .await
        .unwrap()
        .id;
    let free = event(store, &owner, "free", None).await;
    let mut agents = Vec::new();
    for name in ["a", "b", "c", "d"] {
        agents.push(store.enroll_test_agent(name).await.id);
    }
    (owner, free, agents)
}

/// One claim as a claimer saw it.
#[derive(Debug, Clone)]
struct Claim {
    store: usize,
    agent: String,
    job: String,
    attempt: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_from_two_stores_on_one_database_take_each_job_once_within_max_concurrency() {
    let (_db, stores) = super::super::test_db::open_test_stores(2).await;
    let first = &stores[0];
    let (owner, free, agents) = owner_event_and_agents(first).await;
    let limited = event(first, &owner, "limited", Some(LIMIT)).await;
    // Pool jobs with four candidates, jobs of one agent (its runner claims through both stores,
    // as the SSH worker and the control plane's own worker of every replica do), and pool jobs
    // of the limited event.
    let mut allowed = runs(first, &owner, &free, &agents, true, 40).await;
    allowed.extend(runs(first, &owner, &free, &agents[..1], false, 20).await);
    let limited_jobs = runs(first, &owner, &limited, &agents, true, 40).await;
    allowed.extend(limited_jobs.clone());
    let total = allowed.len();
    assert_eq!(total, 100);

    let claims = Arc::new(Mutex::new(Vec::<Claim>::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    // Limited jobs between their claim's answer and their result: never more than the database
    // counts as active at that moment.
    let holding = Arc::new(AtomicUsize::new(0));
    let most_held = Arc::new(AtomicUsize::new(0));
    let most_active = Arc::new(AtomicI64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = Vec::new();
    for (index, store) in stores.iter().enumerate() {
        for agent in &agents {
            for task in 0..TASKS {
                let (store, agent, limited) = (store.clone(), agent.clone(), limited.clone());
                let (claims, finished) = (claims.clone(), finished.clone());
                let (holding, most_held, most_active) =
                    (holding.clone(), most_held.clone(), most_active.clone());
                tasks.push(tokio::spawn(async move {
                    let mut round = task;
                    while finished.load(Ordering::SeqCst) < total {
                        assert!(
                            Instant::now() < deadline,
                            "the jobs were not all claimed and finished"
                        );
                        round += 1;
                        let limit = 1 + (round % 3) as u32;
                        let batch = store
                            .claim_jobs(&agent, limit, now_ms() + 600_000)
                            .await
                            .unwrap();
                        if batch.is_empty() {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        let mut held = 0;
                        for job in &batch {
                            claims.lock().unwrap().push(Claim {
                                store: index,
                                agent: agent.clone(),
                                job: job.id.clone(),
                                attempt: job.attempt,
                            });
                            if job.event_id == limited {
                                held += 1;
                                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                                most_held.fetch_max(now, Ordering::SeqCst);
                            }
                        }
                        if held > 0 {
                            let active = active_in_database(&store, &limited).await;
                            most_active.fetch_max(active, Ordering::SeqCst);
                        }
                        // Hold the jobs a moment, so that claims through the other store overlap.
                        for _ in 0..5 {
                            tokio::task::yield_now().await;
                        }
                        holding.fetch_sub(held, Ordering::SeqCst);
                        for job in &batch {
                            let attempt = Attempt {
                                job_id: job.id.clone(),
                                attempt: job.attempt,
                            };
                            let (_, result) = super::super::dispatch::tests::ended(0, "");
                            let outcome = store
                                .finish_attempt(&agent, &attempt, &[], &result)
                                .await
                                .unwrap();
                            assert!(
                                matches!(outcome, FinishOutcome::Recorded { .. }),
                                "{agent} finishing {attempt:?}: {outcome:?}"
                            );
                            finished.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }));
            }
        }
    }
    for task in tasks {
        task.await.unwrap();
    }

    let claims = claims.lock().unwrap().clone();
    let mut by_job: HashMap<&str, Vec<&Claim>> = HashMap::new();
    for claim in &claims {
        by_job.entry(&claim.job).or_default().push(claim);
    }
    let twice: Vec<_> = by_job.values().filter(|claims| claims.len() > 1).collect();
    assert!(twice.is_empty(), "jobs claimed more than once: {twice:?}");
    assert_eq!(by_job.len(), total, "every job claimed");
    for claim in &claims {
        assert_eq!(claim.attempt, 1, "{claim:?}");
        assert!(
            allowed[&claim.job].contains(&claim.agent),
            "claimed by an agent that is not its runner or a candidate: {claim:?}"
        );
    }
    // On PostgreSQL both stores must have claimed, or the test did not exercise two writers.
    // On SQLite the writers take turns on the file's lock, and one store's claim batches
    // (`store::claim_batch`) may take every job before the other's first turn.
    let postgres = stores[0].backend() == super::super::Backend::Postgres;
    for store in (0..stores.len()).filter(|_| postgres) {
        assert!(
            claims.iter().any(|claim| claim.store == store),
            "store {store} claimed nothing: the claims did not come from two writers"
        );
    }
    assert!(
        most_held.load(Ordering::SeqCst) <= LIMIT as usize,
        "{} jobs of the limited event held at once (limit {LIMIT})",
        most_held.load(Ordering::SeqCst)
    );
    assert!(
        most_active.load(Ordering::SeqCst) <= i64::from(LIMIT),
        "{} jobs of the limited event active at once (limit {LIMIT})",
        most_active.load(Ordering::SeqCst)
    );
    for job_id in allowed.keys() {
        let job = first.job(job_id).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed, "{job_id}");
        assert_eq!(job.attempt, 1, "{job_id}");
    }
    for store in &stores {
        store.close().await;
    }
}

/// Rows an `EXPLAIN ANALYZE` (text format) says its plan's nodes produced or read and threw
/// away (`Rows Removed by …`), each node's figures times its loops, summed: the work of a
/// statement, independent of the machine's speed.
fn rows_processed(plan: &[String]) -> u64 {
    let number = |text: &str, key: &str| -> Option<u64> {
        let start = text.find(key)? + key.len();
        let digits: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let mut total = 0;
    let mut loops = 1;
    for line in plan {
        if let Some(at) = line.find("(actual ") {
            let actual = &line[at..];
            loops = number(actual, " loops=").unwrap_or(1);
            total += number(actual, " rows=").unwrap_or(0) * loops;
        } else if line.contains("Rows Removed by ") {
            // Belongs to the node above it: its rows read and not returned, per loop.
            total += number(line, ": ").unwrap_or(0) * loops;
        }
    }
    total
}

/// `EXPLAIN ANALYZE` of the GENERIC plan of `sql` (placeholders `$1…`, of `types`) run with
/// `arguments` (SQL literals), on `conn`; the plan's lines.
async fn explain_generic(
    conn: &mut sqlx::AnyConnection,
    name: &str,
    types: &str,
    sql: &str,
    arguments: &str,
) -> Vec<String> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE {name} ({types}) AS {sql}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE {name} ({arguments})"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap()
}

/// How many jobs `runner` (an SQL literal) holds claimed, as `conn` sees them.
async fn claimed_by(conn: &mut sqlx::AnyConnection, runner: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM jobs WHERE status = 'claimed' AND agent_id = {runner}"
    )))
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// With statistics taken after a burst was queued (as autovacuum takes them in a deployment),
/// the one-statement claim keeps its generic plan rather than being planned anew on every claim
/// (see `store::force_generic_plans`: on a connection left to PostgreSQL's default, all eight
/// runs below were custom plans). Eight claims on a connection of the pool the store claims
/// through, each rolled back so that the backlog stays, then that session's
/// `pg_prepared_statements`.
#[tokio::test]
async fn the_claim_keeps_a_generic_plan_with_statistics_that_know_the_backlog() {
    let (_db, store) = super::super::test_db::open_test_store().await;
    if store.backend() != super::super::Backend::Postgres {
        return;
    }
    const CLAIM: u32 = 8;
    // Large enough that reading `jobs` whole is costlier than a look-up per row by PostgreSQL's
    // own estimate, as in any backlog worth a plan test.
    const BACKLOG: usize = 3_000;
    let (owner, free, agents) = owner_event_and_agents(&store).await;
    runs(&store, &owner, &free, &agents, true, BACKLOG).await;
    let mut conn = store.hot.acquire().await.unwrap();
    sqlx::raw_sql("ANALYZE jobs; ANALYZE job_candidates;")
        .execute(&mut *conn)
        .await
        .unwrap();
    let sql = super::claim_at_once();
    let now = now_ms();
    for _ in 0..8 {
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
        let ids: BTreeSet<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&agents[0])
            .bind(now)
            .bind(i64::from(CLAIM))
            .bind(now + 600_000)
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .filter_map(|row| sqlx::Row::try_get::<Option<String>, _>(row, "id").unwrap())
            .collect();
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
        assert_eq!(ids.len(), CLAIM as usize, "one claim took {ids:?}");
    }
    let plans: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
    )
    .bind(sql)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        plans.len(),
        1,
        "the claim is prepared once on the connection"
    );
    let (generic, custom) = plans[0];
    assert!(
        generic == 8 && custom == 0,
        "eight claims were {custom} custom and {generic} generic plans"
    );
    // Nor is any of them compiled (JIT): a generic plan's cost is a guess.
    let jit: String = sqlx::query_scalar("SELECT current_setting('jit')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(jit, "off", "JIT on the claims' connections");
    // And the generic plans made on statistics that know the backlog still touch rows in
    // proportion to the jobs handled: PostgreSQL estimates a bound `LIMIT` at a tenth of the
    // rows below it, which once made it hash the whole `jobs` table to flag the few claimed
    // ones (20,550 rows read per claim in a 20,000-job drain).
    assert_hot_statements_bounded(&mut conn, &agents[0], CLAIM, BACKLOG).await;
}

/// A burst of pool jobs right after a quiet time: the table's statistics (taken when every job
/// had ended) say no job is queued, and PostgreSQL plans a statement used often enough once,
/// generically, with them. The claim's reads and its `UPDATE` must still only touch about as
/// many rows as the claim takes, not the backlog: with its earlier statements, claims of 8 jobs
/// from 5,000 queued ones each ran for a minute (nested loops over the backlog, evaluating the
/// id list for every pair of rows). Counted with `EXPLAIN ANALYZE` of the generic plans; on
/// SQLite there is nothing to check (its claims are `store::claim_batch`'s).
#[tokio::test]
async fn pg_claims_touch_rows_in_proportion_to_the_limit_with_a_backlog_planned_on_stale_statistics()
 {
    let (_db, store) = super::super::test_db::open_test_store().await;
    if store.backend() != super::super::Backend::Postgres {
        return;
    }
    const BACKLOG: usize = 600;
    const LIMIT: u32 = 8;
    let (owner, free, agents) = owner_event_and_agents(&store).await;
    let claimer = agents[0].clone();
    // A quiet past: jobs that all ended, and statistics that say so, kept while the burst comes.
    runs(&store, &owner, &free, &agents, true, 30).await;
    loop {
        let batch = store
            .claim_jobs(&claimer, 10, now_ms() + 600_000)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        for job in batch {
            let attempt = Attempt {
                job_id: job.id,
                attempt: job.attempt,
            };
            let (_, result) = super::super::dispatch::tests::ended(0, "");
            store
                .finish_attempt(&claimer, &attempt, &[], &result)
                .await
                .unwrap();
        }
    }
    let mut conn = store.reader.acquire().await.unwrap();
    sqlx::raw_sql(
        "ALTER TABLE jobs SET (autovacuum_enabled = false);
         ALTER TABLE job_candidates SET (autovacuum_enabled = false);
         ANALYZE jobs; ANALYZE job_candidates;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    // The burst: pool jobs for all four agents, and a few of the claimer's own.
    runs(&store, &owner, &free, &agents, true, BACKLOG).await;
    runs(&store, &owner, &free, &agents[..1], false, 20).await;
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_hot_statements_bounded(&mut conn, &claimer, LIMIT, BACKLOG).await;
    sqlx::raw_sql("RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Runs every statement of the claims' and results' hot paths once with `claimer`'s backlog
/// of at least `backlog` queued jobs, on `conn` (set to generic plans), and checks that each
/// one's plan touches rows in proportion to the jobs it handles (`limit` per claim), not to
/// the backlog.
async fn assert_hot_statements_bounded(
    conn: &mut sqlx::AnyConnection,
    claimer: &str,
    limit: u32,
    backlog: usize,
) {
    let runner = format!("'{claimer}'");
    let now = now_ms();

    let (at_once, candidates) = explain_claims(conn, &runner, now, limit).await;
    // The SSH worker's look at its queue, which every run with SSH jobs wakes: with no SSH job
    // queued it must find that out without walking the agents' backlog.
    let ssh = explain_generic(
        conn,
        "oldest_ssh_job",
        "bigint",
        &super::super::servers::oldest_ssh_job(),
        &now.to_string(),
    )
    .await;
    let ssh_rows = rows_processed(&ssh);
    assert!(
        ssh_rows <= 16,
        "the SSH worker's look processed {ssh_rows} rows with {backlog}+ agent jobs and no SSH job queued:\n{}",
        ssh.join("\n")
    );
    let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXECUTE unlimited_candidates ({runner}, {now}, '', {limit})"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(ids.len(), limit as usize, "the candidates: {ids:?}");
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
    let take = explain_generic(
        conn,
        "take",
        "bigint, bigint, text, text, bigint",
        &super::take(),
        &format!(
            "{now}, {}, {runner}, '{}', {now}",
            now + 600_000,
            ids.join(",")
        ),
    )
    .await;
    let taken = claimed_by(conn, &runner).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert_eq!(taken, i64::from(limit), "the take claimed the candidates");
    // The runners to wake after a batch of results: here of 8 jobs of the burst's event,
    // which has no limit and no batches, so nothing is held back and nobody is woken; the
    // look must not read the event's queue to find that out.
    const CHANGED: usize = 8;
    let changed: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE status = 'queued' AND pool = 1 ORDER BY queued_at DESC LIMIT 8",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(changed.len(), CHANGED);
    let wake = explain_generic(
        conn,
        "wake",
        &format!("{}, bigint", ["text"; CHANGED].join(", ")),
        &super::super::dispatch::wake_query(super::super::Backend::Postgres, CHANGED),
        &format!(
            "{}, {now}",
            changed
                .iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    // The result batch's read of those jobs (locking them): a look-up by key of each job, its
    // event and its run.
    let read = explain_generic(
        conn,
        "read_current",
        &["text"; CHANGED].join(", "),
        &super::super::result_batch::read_current_query(super::super::Backend::Postgres, CHANGED),
        &changed
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(", "),
    )
    .await;
    sqlx::raw_sql(
        "DEALLOCATE claim_at_once; DEALLOCATE unlimited_candidates; DEALLOCATE oldest_ssh_job;
         DEALLOCATE take; DEALLOCATE wake; DEALLOCATE read_current;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let rows = rows_processed(&read);
    let read_bound = 16 * CHANGED as u64;
    assert!(
        rows > 0 && rows <= read_bound,
        "the result batch's read processed {rows} rows for {CHANGED} jobs with {backlog}+ queued (at most {read_bound}):\n{}",
        read.join("\n")
    );
    // A primary-key look-up per changed job, one per changed run, and the joins above them.
    let rows = rows_processed(&wake);
    let wake_bound = 16 * CHANGED as u64;
    assert!(
        rows > 0 && rows <= wake_bound,
        "runners_to_wake processed {rows} rows for {CHANGED} changed jobs with {backlog}+ queued (at most {wake_bound}):\n{}",
        wake.join("\n")
    );

    assert_claims_bounded(&at_once, &candidates, limit, backlog);
    assert_bounded("take", &take, 24, limit, backlog);
}

/// The generic plans of the claim in one statement (run and rolled back: it must take `limit`
/// jobs) and of the candidates' read, for `runner` (an SQL literal) at `now`, on `conn`.
async fn explain_claims(
    conn: &mut sqlx::AnyConnection,
    runner: &str,
    now: i64,
    limit: u32,
) -> (Vec<String>, Vec<String>) {
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
    let at_once = explain_generic(
        conn,
        "claim_at_once",
        "text, bigint, bigint, bigint",
        super::claim_at_once(),
        &format!("{runner}, {now}, {limit}, {}", now + 600_000),
    )
    .await;
    let taken = claimed_by(conn, runner).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert_eq!(taken, i64::from(limit), "the claim in one statement");
    let candidates = explain_generic(
        conn,
        "unlimited_candidates",
        "text, bigint, text, bigint",
        &super::unlimited_candidates(),
        &format!("{runner}, {now}, '', {limit}"),
    )
    .await;
    (at_once, candidates)
}

/// Each claim statement may pass over a few rows more than it returns (the own and the pool
/// jobs' branches each read and, for the candidates, lock up to the limit and are materialized
/// before the merge; the candidates' look-ups), never the backlog. The claim in one statement
/// does all of that and the update, the limits' and the secrets' look-ups.
fn assert_claims_bounded(at_once: &[String], candidates: &[String], limit: u32, backlog: usize) {
    assert_bounded("claim_at_once", at_once, 32, limit, backlog);
    assert_bounded("unlimited_candidates", candidates, 24, limit, backlog);
}

fn assert_bounded(statement: &str, plan: &[String], per_job: u64, limit: u32, backlog: usize) {
    let rows = rows_processed(plan);
    let bound = per_job * u64::from(limit);
    assert!(
        rows > 0 && rows <= bound,
        "{statement} processed {rows} rows for a claim of {limit} out of {backlog}+ queued jobs (at most {bound}):\n{}",
        plan.join("\n")
    );
}
