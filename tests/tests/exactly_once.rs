//! Issue 8, item 4, second half: jobs through two control-plane replicas on one PostgreSQL
//! database while agents are SIGKILLed and restarted and agent↔replica paths are cut for shorter
//! and longer than the lease. Every accepted job (every 201) ends with exactly one final result:
//! none lost, none duplicated, and no job exists that was not accepted.
//!
//! Real processes: a throwaway PostgreSQL cluster of the test's own (so it runs in the SQLite pass
//! of `cargo xtask test`, like `pg_faults.rs`), two `cronium serve` replicas, six `cronium-agent`
//! processes (three enrolled through each replica). Each replica advertises the address of a
//! [`UdpForwarder`] in front of it (`--quic-public-addrs`), so every agent reaches either replica
//! through one, whether it enrolled there or learned it as the other replica (failover); a cut
//! drops everything from and to one agent's UDP socket at both forwarders. Runs are created
//! through both replicas' APIs at once. Each execution of the job script appends `job attempt`
//! to a file, so re-executions (at-least-once after a lost lease or a killed agent) are visible
//! and counted as attempts.
//! A creation answered 503 (the database too slow to answer in time: "nothing was changed") is
//! retried; such a run must not exist.
//!
//! Size: `CRONIUM_EXACTLY_ONCE_JOBS` (default [`DEFAULT_JOBS`]). The figures (duration, attempts,
//! re-executions, stale results, faults) are printed (`--nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::TestCluster;
use cronium_e2e::api::Api;
use cronium_e2e::cluster::{AgentOptions, ClusterOptions, EnrolledAgent, EventSpec};
use cronium_e2e::postgres::PgCluster;
use cronium_e2e::udp_forward::{Cuts, UdpForwarder, udp_ports_of};
use serde_json::json;

/// Jobs created unless `CRONIUM_EXACTLY_ONCE_JOBS` says otherwise.
const DEFAULT_JOBS: usize = 1_000;
/// Agent processes (half enrolled through each replica).
const AGENTS: usize = 6;
/// Jobs each agent runs at once.
const CAPACITY: u32 = 4;
/// The replicas' lease: short, so cuts longer than it happen often.
const LEASE_SECONDS: u32 = 3;
/// Attempts per job (`retries` + 1): a job whose attempts all die with their agent ends failed
/// `lost`, which is a final result too.
const RETRIES: u32 = 5;
/// Concurrent creators per replica.
const CREATORS: usize = 3;
/// How long the whole run may take before the test gives up (not an assertion on speed).
const RUN_TIMEOUT: Duration = Duration::from_secs(1_800);
/// How long the jobs may take to settle after the last fault healed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A small deterministic generator (xorshift64*), seeded from the kernel; the seed is printed so
/// a failing sequence of faults can be replayed with `CRONIUM_EXACTLY_ONCE_SEED`.
struct Dice(u64);

impl Dice {
    fn new() -> (Dice, u64) {
        let seed = std::env::var("CRONIUM_EXACTLY_ONCE_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                let bytes = cronium_e2e::random_bytes(8);
                u64::from_le_bytes(bytes.try_into().expect("8 bytes")) | 1
            });
        (Dice(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// One agent of the test: its identity and the replica that started it (0 = A, 1 = B).
struct TestAgent {
    agent: EnrolledAgent,
    replica: usize,
    /// Killed and to be started again at this time.
    down_until: Option<Instant>,
    /// Cut off (its UDP ports) and to be healed at this time.
    cut_until: Option<(Instant, Vec<u16>)>,
}

/// An accepted run: the 201's run id and its one job.
#[derive(Debug, Clone)]
struct Accepted {
    run_id: String,
    job_id: String,
}

/// One job as stored.
#[derive(Debug)]
struct StoredJob {
    run_id: String,
    status: String,
    attempt: i64,
    settled_by: String,
    reason: String,
}

/// Creation requests that got no 201, by the `n` of their input.
#[derive(Debug, Default)]
struct NotAccepted {
    /// Answered 503 `unavailable` ("nothing was changed"): such a run must not exist.
    refused: BTreeSet<u64>,
    /// No answer (a client timeout): such a run may or may not exist.
    unanswered: BTreeSet<u64>,
}

/// Creates runs through `api`, one per slot taken from `next` until `total`, each retried until
/// it is accepted (201). A 503 (the database was too slow to answer in time: nothing changed) or
/// a request without an answer is recorded and retried with a new `n`; any other answer fails
/// the test.
async fn create_runs(
    api: Api,
    events: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    total: usize,
    tags: Arc<AtomicUsize>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    not_accepted: Arc<Mutex<NotAccepted>>,
) -> Result<()> {
    loop {
        let slot = next.fetch_add(1, Ordering::SeqCst);
        if slot >= total {
            return Ok(());
        }
        let event = &events[slot % events.len()];
        loop {
            let n = tags.fetch_add(1, Ordering::SeqCst) as u64;
            let answer = match api
                .post(
                    &format!("/api/v1/events/{event}/runs"),
                    &json!({"input": {"n": n}}),
                )
                .await
            {
                Ok(answer) => answer,
                Err(_) => {
                    not_accepted.lock().unwrap().unanswered.insert(n);
                    continue;
                }
            };
            if answer.status == 503 {
                not_accepted.lock().unwrap().refused.insert(n);
                continue;
            }
            ensure!(
                answer.status == 201,
                "create run {n}: HTTP {}: {}",
                answer.status,
                answer.text
            );
            let run_id = answer.json["run_id"].as_str().context("run_id")?.to_owned();
            let jobs = answer.json["jobs"].as_array().context("jobs")?;
            ensure!(jobs.len() == 1, "run {run_id} has {} jobs", jobs.len());
            let job_id = jobs[0]["id"].as_str().context("job id")?.to_owned();
            accepted.lock().unwrap().push(Accepted { run_id, job_id });
            break;
        }
    }
}

/// Every run (with the `n` of its input) and its jobs, read with psql.
fn stored_jobs(
    pg: &PgCluster,
    database: &str,
) -> Result<(BTreeMap<String, u64>, BTreeMap<String, StoredJob>)> {
    let rows = pg.psql(
        database,
        "SELECT r.id, COALESCE(j.id, '-'), COALESCE(j.status, '-'), COALESCE(j.attempt, -1), \
         COALESCE(j.settled_by, '-'), COALESCE(j.reason, '-'), CAST(r.input AS jsonb) ->> 'n' \
         FROM runs r LEFT JOIN jobs j ON j.run_id = r.id",
    )?;
    let mut runs = BTreeMap::new();
    let mut jobs = BTreeMap::new();
    for row in rows.lines().filter(|row| !row.is_empty()) {
        let fields: Vec<&str> = row.split('|').collect();
        ensure!(fields.len() == 7, "unexpected psql row {row:?}");
        runs.insert(fields[0].to_owned(), fields[6].parse()?);
        if fields[1] != "-" {
            let job = StoredJob {
                run_id: fields[0].to_owned(),
                status: fields[2].to_owned(),
                attempt: fields[3].parse()?,
                settled_by: fields[4].to_owned(),
                reason: fields[5].to_owned(),
            };
            ensure!(
                jobs.insert(fields[1].to_owned(), job).is_none(),
                "job {} listed twice",
                fields[1]
            );
        }
    }
    // Jobs whose run row is missing would not show above.
    let orphans = pg.psql(
        database,
        "SELECT COUNT(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = j.run_id)",
    )?;
    ensure!(orphans == "0", "{orphans} jobs without a run");
    Ok((runs, jobs))
}

/// Jobs not final yet.
fn open_jobs(pg: &PgCluster, database: &str) -> Result<usize> {
    Ok(pg
        .psql(
            database,
            "SELECT COUNT(*) FROM jobs WHERE status NOT IN ('completed', 'failed', 'cancelled')",
        )?
        .parse()?)
}

/// `(job id, requeued)` of every `lease_expired` audit entry.
fn lease_expiries(pg: &PgCluster, database: &str) -> Result<Vec<(String, bool)>> {
    let rows = pg.psql(
        database,
        "SELECT CAST(detail AS jsonb) ->> 'job_id', CAST(detail AS jsonb) ->> 'requeued' \
         FROM audit_log WHERE kind = 'lease_expired'",
    )?;
    rows.lines()
        .filter(|row| !row.is_empty())
        .map(|row| {
            let (job, requeued) = row.split_once('|').context("lease_expired row")?;
            Ok((job.to_owned(), requeued == "true"))
        })
        .collect()
}

/// `(job id, attempt)` of every audit entry of `kind` (`stale_result`, `stale_attempt`).
fn audited_attempts(pg: &PgCluster, database: &str, kind: &str) -> Result<Vec<(String, i64)>> {
    let rows = pg.psql(
        database,
        &format!(
            "SELECT CAST(detail AS jsonb) ->> 'job_id', CAST(detail AS jsonb) ->> 'attempt' \
             FROM audit_log WHERE kind = '{kind}'"
        ),
    )?;
    rows.lines()
        .filter(|row| !row.is_empty())
        .map(|row| {
            let (job, attempt) = row.split_once('|').context("audit row")?;
            Ok((job.to_owned(), attempt.parse()?))
        })
        .collect()
}

fn count_audit(pg: &PgCluster, database: &str, kind: &str) -> Result<usize> {
    Ok(pg
        .psql(
            database,
            &format!("SELECT COUNT(*) FROM audit_log WHERE kind = '{kind}'"),
        )?
        .parse()?)
}

/// Starts every killed agent again and heals every cut path.
fn heal_all(
    replicas: &mut [TestCluster; 2],
    agents: &mut [TestAgent],
    cuts: &Cuts,
    options: &AgentOptions,
) -> Result<()> {
    for agent in agents.iter_mut() {
        if agent.down_until.take().is_some() {
            replicas[agent.replica].spawn_agent(&agent.agent, options)?;
        }
        if let Some((_, ports)) = agent.cut_until.take() {
            cuts.heal(&ports);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_job_has_exactly_one_final_result_across_two_replicas_with_kills_and_partitions()
-> Result<()> {
    let total: usize = match std::env::var("CRONIUM_EXACTLY_ONCE_JOBS") {
        Ok(value) => value
            .parse()
            .context("CRONIUM_EXACTLY_ONCE_JOBS must be a number")?,
        Err(_) => DEFAULT_JOBS,
    };
    let (mut dice, seed) = Dice::new();
    println!("exactly_once: {total} jobs, seed {seed}");

    // Declared first, dropped last: the control planes stop before their database.
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let database = url.rsplit('/').next().context("database name")?.to_owned();
    let options = ClusterOptions {
        lease_seconds: Some(LEASE_SECONDS),
        heartbeat_seconds: Some(1),
    };
    let cuts = Cuts::default();
    let forwarders = [
        UdpForwarder::start(cuts.clone()).await?,
        UdpForwarder::start(cuts.clone()).await?,
    ];
    let public = |index: usize| forwarders[index].addr().to_string();
    let a = TestCluster::start_on_database_with_args(
        options,
        &url,
        &["--quic-public-addrs", &public(0)],
    )
    .await?;
    forwarders[0].set_upstream(a.quic_addr());
    let b =
        TestCluster::start_replica_of_with_args(&a, &["--quic-public-addrs", &public(1)]).await?;
    forwarders[1].set_upstream(b.quic_addr());
    let mut replicas = [a, b];

    let executions_dir = tempfile::tempdir()?;
    let executions = executions_dir.path().join("executions");
    std::fs::write(&executions, b"")?;
    // One line per execution; short enough for one atomic append. The sleep leaves room for
    // kills and cuts mid-job.
    let script = format!(
        "printf '%s %s\\n' \"$CRONIUM_JOB_ID\" \"$CRONIUM_ATTEMPT\" >> '{}'\nsleep 0.$((RANDOM % 4))\necho done",
        executions.display()
    );

    let agent_options = AgentOptions {
        capacity: CAPACITY,
        reconnect_max_ms: 1000,
        env: Vec::new(),
    };
    let mut agents = Vec::with_capacity(AGENTS);
    let mut events = Vec::with_capacity(AGENTS);
    for index in 0..AGENTS {
        let replica = index % 2;
        let agent = replicas[replica]
            .enroll_agent(&format!("eo-{index}"), &[])
            .await?;
        replicas[replica]
            .start_agent(&agent, &agent_options)
            .await?;
        events.push(
            replicas[0]
                .create_event(
                    &EventSpec::bash(&format!("exactly-once-{index}"), &script)
                        .target(&agent.id)
                        .retries(RETRIES),
                )
                .await?,
        );
        agents.push(TestAgent {
            agent,
            replica,
            down_until: None,
            cut_until: None,
        });
    }

    let started = Instant::now();
    let events = Arc::new(events);
    let next = Arc::new(AtomicUsize::new(0));
    let tags = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let not_accepted = Arc::new(Mutex::new(NotAccepted::default()));
    let mut creators = Vec::new();
    for replica in &replicas {
        for _ in 0..CREATORS {
            creators.push(tokio::spawn(create_runs(
                replica.api().clone(),
                events.clone(),
                next.clone(),
                total,
                tags.clone(),
                accepted.clone(),
                not_accepted.clone(),
            )));
        }
    }

    // Faults until every run is created and every job has settled once.
    let (mut kills, mut short_cuts, mut long_cuts) = (0, 0, 0);
    let lease = Duration::from_secs(u64::from(LEASE_SECONDS));
    loop {
        ensure!(
            started.elapsed() < RUN_TIMEOUT,
            "{} of {total} runs created, {} jobs open after {RUN_TIMEOUT:?}",
            accepted.lock().unwrap().len(),
            open_jobs(&postgres, &database)?
        );
        tokio::time::sleep(dice.millis(300, 1_200)).await;
        let now = Instant::now();
        for agent in agents.iter_mut() {
            if agent.down_until.is_some_and(|until| until <= now) {
                agent.down_until = None;
                replicas[agent.replica].spawn_agent(&agent.agent, &agent_options)?;
            }
            if agent
                .cut_until
                .as_ref()
                .is_some_and(|(until, _)| *until <= now)
                && let Some((_, ports)) = agent.cut_until.take()
            {
                cuts.heal(&ports);
            }
        }
        if creators.iter().all(|creator| creator.is_finished())
            && open_jobs(&postgres, &database)? == 0
        {
            break;
        }
        let index = dice.below(AGENTS as u64) as usize;
        let agent = &mut agents[index];
        if agent.down_until.is_some() || agent.cut_until.is_some() {
            continue;
        }
        let fault = dice.below(3);
        if fault == 0 {
            replicas[agent.replica].kill_agent(&agent.agent.id)?;
            agent.down_until = Some(now + dice.millis(200, 2_000));
            kills += 1;
            continue;
        }
        // The agent's one QUIC socket (none yet right after a restart: no cut this time).
        let ports = udp_ports_of(replicas[agent.replica].agent_pid(&agent.agent.id)?)?;
        if ports.is_empty() {
            continue;
        }
        cuts.cut(&ports);
        let until = if fault == 1 {
            short_cuts += 1;
            now + lease / 3 + dice.millis(0, 1_000)
        } else {
            long_cuts += 1;
            now + lease * 2 + dice.millis(0, 3_000)
        };
        agent.cut_until = Some((until, ports));
    }
    for creator in creators {
        creator.await??;
    }
    heal_all(&mut replicas, &mut agents, &cuts, &agent_options)?;
    let faults_over = Instant::now();
    while open_jobs(&postgres, &database)? > 0 {
        ensure!(
            faults_over.elapsed() < SETTLE_TIMEOUT,
            "{} jobs still open {SETTLE_TIMEOUT:?} after the last fault",
            open_jobs(&postgres, &database)?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let duration = started.elapsed();

    // Exactly the accepted runs and jobs exist, each run with its one job; besides them only
    // runs of requests that got no answer at all, never one answered 503.
    let accepted = accepted.lock().unwrap().clone();
    let not_accepted = std::mem::take(&mut *not_accepted.lock().unwrap());
    ensure!(
        accepted.len() == total,
        "{} of {total} runs accepted",
        accepted.len()
    );
    let (runs, jobs) = stored_jobs(&postgres, &database)?;
    let accepted_runs: BTreeSet<&str> = accepted.iter().map(|run| run.run_id.as_str()).collect();
    let accepted_jobs: BTreeMap<&str, &str> = accepted
        .iter()
        .map(|run| (run.job_id.as_str(), run.run_id.as_str()))
        .collect();
    ensure!(accepted_runs.len() == total, "a run id was answered twice");
    let missing: Vec<&&str> = accepted_runs
        .iter()
        .filter(|run| !runs.contains_key(**run))
        .take(5)
        .collect();
    ensure!(missing.is_empty(), "accepted runs not stored: {missing:?}");
    let mut unanswered_stored = BTreeSet::new();
    for (run, n) in &runs {
        if accepted_runs.contains(run.as_str()) {
            continue;
        }
        ensure!(
            !not_accepted.refused.contains(n),
            "run {run} exists though its request was answered 503"
        );
        ensure!(
            not_accepted.unanswered.contains(n),
            "run {run} (n {n}) exists but was never accepted"
        );
        unanswered_stored.insert(run.as_str());
    }
    for (job_id, job) in &jobs {
        match accepted_jobs.get(job_id.as_str()) {
            Some(run) => ensure!(
                *run == job.run_id,
                "job {job_id} is in run {}, accepted in {run}",
                job.run_id
            ),
            None => ensure!(
                unanswered_stored.contains(job.run_id.as_str()),
                "job {job_id} exists but was never accepted"
            ),
        }
    }
    ensure!(
        jobs.len() == total + unanswered_stored.len(),
        "{} jobs stored for {total} accepted runs and {} unanswered ones",
        jobs.len(),
        unanswered_stored.len()
    );

    // Each job settled once: by its agent's result (no final lease expiry), or by one final
    // lease expiry (`lost`) and no result.
    let expiries = lease_expiries(&postgres, &database)?;
    let mut final_expiries: BTreeMap<&str, usize> = BTreeMap::new();
    for (job, requeued) in &expiries {
        ensure!(
            jobs.contains_key(job.as_str()),
            "a lease of unknown job {job} expired"
        );
        if !requeued {
            *final_expiries.entry(job.as_str()).or_default() += 1;
        }
    }
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for (job_id, job) in &jobs {
        *by_status
            .entry(format!("{} ({})", job.status, job.reason))
            .or_default() += 1;
        let expired = final_expiries.get(job_id.as_str()).copied().unwrap_or(0);
        match (job.status.as_str(), job.settled_by.as_str()) {
            ("completed", "agent") | ("failed", "agent") => ensure!(
                expired == 0,
                "job {job_id}: a result recorded and {expired} final lease expiries"
            ),
            ("failed", "lease") => ensure!(
                expired == 1 && job.reason == "lost",
                "job {job_id}: settled by the lease ({}) with {expired} final expiries",
                job.reason
            ),
            (status, settled_by) => {
                bail!("job {job_id}: status {status} settled by {settled_by}")
            }
        }
        ensure!(
            (1..=i64::from(RETRIES) + 1).contains(&job.attempt),
            "job {job_id}: attempt {}",
            job.attempt
        );
    }

    // Executions: each attempt ran at most once, only accepted jobs ran, no attempt beyond the
    // job's last, and a job completed by its agent ran the attempt whose result it holds.
    let log = std::fs::read_to_string(&executions)?;
    let mut ran: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    let mut lines = 0usize;
    for line in log.lines() {
        lines += 1;
        let (job, attempt) = line
            .split_once(' ')
            .with_context(|| format!("execution line {line:?}"))?;
        let attempt: i64 = attempt.parse()?;
        let Some(stored) = jobs.get(job) else {
            bail!("job {job} ran but was never accepted");
        };
        ensure!(
            attempt <= stored.attempt,
            "job {job} ran attempt {attempt}, its last is {}",
            stored.attempt
        );
        ensure!(
            ran.entry(job).or_default().insert(attempt),
            "job {job} ran attempt {attempt} twice"
        );
    }
    for (job_id, job) in &jobs {
        if job.status == "completed" {
            ensure!(
                ran.get(job_id.as_str())
                    .is_some_and(|attempts| attempts.contains(&job.attempt)),
                "job {job_id} completed attempt {} which never ran",
                job.attempt
            );
        }
    }

    // Stale results and holders are refused: audited, and never the job's recorded result.
    for kind in ["stale_result", "stale_attempt"] {
        for (job_id, attempt) in audited_attempts(&postgres, &database, kind)? {
            let Some(job) = jobs.get(&job_id) else {
                bail!("{kind} of unknown job {job_id}");
            };
            ensure!(
                !(job.settled_by == "agent" && job.attempt == attempt),
                "job {job_id}: attempt {attempt} was audited as {kind} but its result is the recorded one"
            );
        }
    }

    let attempts: i64 = jobs.values().map(|job| job.attempt).sum();
    let re_executions = lines - ran.len();
    let stale = count_audit(&postgres, &database, "stale_result")?;
    let stale_holders = count_audit(&postgres, &database, "stale_attempt")?;
    let requeues = expiries.iter().filter(|(_, requeued)| *requeued).count();
    let dropped: u64 = forwarders.iter().map(UdpForwarder::dropped).sum();
    println!(
        "exactly_once: {total} jobs in {:.1} s ({:.1} jobs/s) through 2 replicas and {AGENTS} agents; \
         {kills} agent kills, {short_cuts} cuts shorter and {long_cuts} longer than the {LEASE_SECONDS} s lease \
         ({dropped} datagrams dropped); {attempts} attempts, {lines} executions of which {re_executions} \
         re-executions, {requeues} leases expired and re-queued, {} settled lost, {stale} stale results \
         refused and audited, {stale_holders} stale holders audited; final: {by_status:?}; \
         requests not accepted: {} answered 503, {} unanswered ({} of these stored)",
        duration.as_secs_f64(),
        total as f64 / duration.as_secs_f64(),
        final_expiries.len(),
        not_accepted.refused.len(),
        not_accepted.unanswered.len(),
        unanswered_stored.len(),
    );
    // The faults must have happened for the test to mean anything.
    ensure!(
        kills > 0 && short_cuts + long_cuts > 0,
        "faults were not injected"
    );
    ensure!(
        dropped > 0,
        "the cuts dropped nothing: the agents do not go through the forwarders"
    );
    Ok(())
}
