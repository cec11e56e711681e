//! PostgreSQL faults, with real processes on a throwaway PostgreSQL cluster that each test owns
//! (`PgCluster`: it stops, starts and fills it), in every pass of the suite: the control plane
//! runs on that cluster whichever database the rest of the suite uses. Without PostgreSQL's
//! binaries (Debian's `postgresql`) they fail and say what to install.
//!
//! - PostgreSQL restarted under load: while it is down, writes and reads answer 503 (never a
//!   201, never a 500), `/healthz` says `database: unavailable`, and the control plane neither
//!   exits nor busy-loops; when it is back, the SAME process serves again, takes its running
//!   lock again (so `cronium keys rotate` is still refused), every run that got a 201 exists
//!   and ends completed in its first attempt (the outage outlasts the lease: the leases are
//!   extended when the database is back), no run that got a 503 exists, and the results of jobs
//!   that finished during the outage, held in the agent's spool, are stored.
//! - PostgreSQL's disk full: a write that needs a new data page fails with SQLSTATE 53100,
//!   answered 507 with nothing partial stored; a write that needs a new WAL segment PANICs
//!   PostgreSQL, which then cannot start again on the full disk: 503 while it is down. Once space
//!   is freed (and PostgreSQL started again), the same control plane serves again.
//!
//! The disk test needs root to mount a tmpfs (like `faults.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cronium_agent::spool;
use cronium_e2e::api::{Api, ApiResponse};
use cronium_e2e::cluster::json_str;
use cronium_e2e::postgres::PgCluster;
use cronium_e2e::{AgentOptions, ClusterOptions, EventSpec, TestCluster};
use serde_json::json;

/// Bound of every wait for something that should happen.
const DEADLINE: Duration = Duration::from_secs(60);
/// The lease of these tests' control planes; the outage lasts longer.
const LEASE: Duration = Duration::from_secs(5);

/// The name of the database in a URL `postgres://…/NAME`.
fn database_name(url: &str) -> Result<&str> {
    url.rsplit('/')
        .next()
        .filter(|name| !name.is_empty())
        .with_context(|| format!("no database name in {url}"))
}

/// Checks that an answer is the API's 503: the database is unavailable, nothing was done.
fn ensure_unavailable(answer: &ApiResponse, what: &str) -> Result<()> {
    ensure!(
        answer.status == 503 && answer.json["error"]["code"] == "unavailable",
        "{what} while PostgreSQL is down: HTTP {}: {}",
        answer.status,
        answer.text
    );
    Ok(())
}

/// `GET /healthz`'s `database`.
async fn health_database(api: &Api) -> Result<String> {
    let health = api.get("/healthz").await?;
    ensure!(
        health.status == 200 && health.json["status"] == "ok",
        "/healthz: HTTP {}: {}",
        health.status,
        health.text
    );
    json_str(&health.json, "database")
}

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("the control plane {pid} is gone"))?;
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / per_second))
}

/// What one creator got back for one request.
#[derive(Debug, Clone)]
enum Answer {
    Created {
        tag: String,
        run_id: String,
        after_restart: bool,
    },
    Unavailable {
        tag: String,
    },
}

/// Creates runs of `event` one after the other until `stop`; every answer must be a 201 or the
/// API's 503. `restarted` is set once PostgreSQL was started again.
fn spawn_creator(
    api: Api,
    event: String,
    creator: usize,
    stop: Arc<AtomicBool>,
    restarted: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let path = format!("/api/v1/events/{event}/runs");
        for n in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let tag = format!("creator-{creator}-{n}");
            let after_restart = restarted.load(Ordering::SeqCst);
            let answer = api
                .post(&path, &json!({"input": {"tag": tag}}))
                .await
                .with_context(|| format!("creator {creator}: no HTTP answer"))?;
            let recorded = match answer.status {
                201 => Answer::Created {
                    tag,
                    run_id: json_str(&answer.json, "run_id")?,
                    after_restart,
                },
                503 => {
                    ensure_unavailable(&answer, "creating a run")?;
                    Answer::Unavailable { tag }
                }
                status => bail!("creator {creator}: HTTP {status}: {}", answer.text),
            };
            answers.lock().unwrap().push(recorded);
        }
        Ok(())
    })
}

/// One job of a stored run: its status, attempt and who settled it.
type StoredJob = (String, i64, String);

/// The runs of `event` in the database, read with psql on the cluster the test owns: run id →
/// (its input's `tag`, empty if none; its jobs).
fn stored_runs(
    pg: &PgCluster,
    database: &str,
    event: &str,
) -> Result<BTreeMap<String, (String, Vec<StoredJob>)>> {
    let rows = pg.psql(
        database,
        &format!(
            "SELECT r.id, COALESCE(CAST(r.input AS jsonb) ->> 'tag', ''), \
             COALESCE(j.status, '-'), COALESCE(j.attempt, -1), COALESCE(j.settled_by, '-') \
             FROM runs r LEFT JOIN jobs j ON j.run_id = r.id WHERE r.event_id = '{event}'"
        ),
    )?;
    let mut runs: BTreeMap<String, (String, Vec<StoredJob>)> = BTreeMap::new();
    for row in rows.lines().filter(|row| !row.is_empty()) {
        let fields: Vec<&str> = row.split('|').collect();
        ensure!(fields.len() == 5, "unexpected psql row {row:?}");
        let run = runs
            .entry(fields[0].to_owned())
            .or_insert_with(|| (fields[1].to_owned(), Vec::new()));
        if fields[2] != "-" {
            run.1.push((
                fields[2].to_owned(),
                fields[3].parse().unwrap_or(-1),
                fields[4].to_owned(),
            ));
        }
    }
    Ok(runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_answers_503_then_serves_again_losing_nothing() -> Result<()>
{
    const CREATORS: usize = 3;
    let pg = PgCluster::start()?;
    let url = pg.create_database()?;
    let database = database_name(&url)?.to_owned();
    let mut cluster = TestCluster::start_on_database(
        ClusterOptions {
            lease_seconds: Some(LEASE.as_secs() as u32),
            heartbeat_seconds: Some(1),
        },
        &url,
    )
    .await?;
    let agent = cluster.enroll_agent("across-the-outage", &[]).await?;
    cluster
        .start_agent(
            &agent,
            &AgentOptions {
                capacity: 16,
                ..AgentOptions::default()
            },
        )
        .await?;
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    let pid = cluster
        .control_plane_pid()
        .context("no control plane process")?;
    ensure!(
        health_database(cluster.api()).await? == "ok",
        "/healthz before the outage"
    );

    // Two jobs that run across the outage: they finish when the test creates the release file
    // (while PostgreSQL is down), so their results can only wait in the agent's spool.
    let release = cluster.dir().join("release");
    let done_line = cronium_e2e::unique_marker("finished-during-the-outage");
    let body = format!(
        "echo started\n\
         while [ ! -e '{release}' ]; do sleep 0.1; done\n\
         echo {done_line}\n",
        release = release.display(),
    );
    let held_event = cluster
        .create_event(
            &EventSpec::bash("across-the-outage", &body)
                .target(&agent.id)
                .timeout_seconds(300),
        )
        .await?;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(cluster.run_event(&held_event, None).await?.single_job()?);
    }
    for job in &held {
        cluster
            .wait_until(DEADLINE, "a held job's first line", || async {
                let log = cluster.job_logs(job).await?;
                Ok(String::from_utf8_lossy(&log)
                    .contains("started\n")
                    .then_some(()))
            })
            .await?;
    }

    // Clients creating runs in a loop, the whole time.
    let load_event = cluster
        .create_event(&EventSpec::bash("load", "echo ran").target(&agent.id))
        .await?;
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let creators: Vec<_> = (0..CREATORS)
        .map(|creator| {
            spawn_creator(
                cluster.api().clone(),
                load_event.clone(),
                creator,
                stop.clone(),
                restarted.clone(),
                answers.clone(),
            )
        })
        .collect();
    let created_before = |answers: &[Answer]| {
        answers
            .iter()
            .filter(|answer| matches!(answer, Answer::Created { .. }))
            .count()
    };
    cluster
        .wait_until(DEADLINE, "20 runs created", || async {
            Ok((created_before(&answers.lock().unwrap()) >= 20).then_some(()))
        })
        .await?;

    // The outage.
    pg.stop()?;
    let stopped_at = Instant::now();
    let cpu_at_stop = cpu_time(pid)?;
    // Every creator gets its 503 (a request waits for the database a few seconds at most);
    // reads and other writes are refused the same way; the health check says why. (At once:
    // each of them waits up to those seconds.)
    let answered_before = answers.lock().unwrap().len();
    let creators_refused = cluster.wait_until(DEADLINE, "a 503 for every creator", || async {
        let answers = answers.lock().unwrap();
        let refused = answers[answered_before..]
            .iter()
            .filter(|answer| matches!(answer, Answer::Unavailable { .. }))
            .count();
        Ok((refused >= CREATORS).then_some(()))
    });
    let read = async {
        let read = cluster
            .api()
            .get(&format!("/api/v1/jobs/{}", held[0]))
            .await?;
        ensure_unavailable(&read, "reading a job")
    };
    let listed = async {
        let listed = cluster.api().get("/api/v1/events").await?;
        ensure_unavailable(&listed, "listing events")
    };
    let written = async {
        let event = cluster
            .api()
            .post(
                "/api/v1/events",
                &EventSpec::bash("never-stored", "true")
                    .target(&agent.id)
                    .to_json(cluster.marker()),
            )
            .await?;
        ensure_unavailable(&event, "creating an event")
    };
    let unhealthy =
        cluster.wait_until(DEADLINE, "/healthz to say the database is down", || async {
            Ok((health_database(cluster.api()).await? == "unavailable").then_some(()))
        });
    tokio::try_join!(creators_refused, read, listed, written, unhealthy)?;
    // The held jobs finish now; the agent keeps their results until the control plane
    // acknowledges them.
    std::fs::write(&release, b"")?;
    for job in &held {
        let spool_dir = agent.state_dir.join("spool").join(format!("{job}-1"));
        cluster
            .wait_until(
                DEADLINE,
                "a held job's result in the agent's spool",
                || async { Ok(spool::stored_result(&spool_dir).ok().flatten().map(|_| ())) },
            )
            .await?;
    }
    // The outage outlasts the lease of every running attempt (the scenario, not a wait for
    // something to happen): without the extension after the outage they would be settled lost.
    cluster
        .wait_until(DEADLINE, "the outage to outlast the lease", || async {
            Ok((stopped_at.elapsed() > LEASE + Duration::from_secs(1)).then_some(()))
        })
        .await?;
    let outage_cpu = cpu_time(pid)?.saturating_sub(cpu_at_stop);
    let outage = stopped_at.elapsed();
    ensure!(
        outage_cpu < outage / 2,
        "the control plane busy-looped while PostgreSQL was down: {outage_cpu:?} of CPU in \
         {outage:?}"
    );

    // PostgreSQL is back: the same process serves again.
    restarted.store(true, Ordering::SeqCst);
    pg.start_again()?;
    let back_at = Instant::now();
    cluster
        .wait_until(
            DEADLINE,
            "a 201 from every creator after the restart",
            || async {
                let answers = answers.lock().unwrap();
                let mut served = [false; CREATORS];
                for answer in answers.iter() {
                    if let Answer::Created {
                        tag,
                        after_restart: true,
                        ..
                    } = answer
                    {
                        let creator: usize = tag
                            .split('-')
                            .nth(1)
                            .and_then(|creator| creator.parse().ok())
                            .unwrap_or(usize::MAX);
                        if creator < CREATORS {
                            served[creator] = true;
                        }
                    }
                }
                Ok(served.iter().all(|served| *served).then_some(()))
            },
        )
        .await?;
    eprintln!(
        "serving again {:?} after PostgreSQL was started again",
        back_at.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    for creator in creators {
        tokio::time::timeout(DEADLINE, creator)
            .await
            .context("a creator did not stop")???;
    }
    cluster
        .wait_until(DEADLINE, "/healthz to say the database is back", || async {
            Ok((health_database(cluster.api()).await? == "ok").then_some(()))
        })
        .await?;
    ensure!(
        cluster.control_plane_pid() == Some(pid) && cpu_time(pid).is_ok(),
        "the control plane process was replaced or exited"
    );

    // The running lock is held again, on a new session: `keys rotate` is refused.
    cluster
        .wait_until(DEADLINE, "the running lock held again", || async {
            let held = pg.psql(
                &database,
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' \
                 AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )?;
            Ok((held == "1").then_some(()))
        })
        .await?;
    let key_file = cluster.dir().join("current.key");
    std::fs::write(&key_file, cluster.encryption_key())?;
    let data_dir = cluster.data_dir().display().to_string();
    let output = cluster
        .cli(
            &[
                "keys",
                "rotate",
                "--data-dir",
                &data_dir,
                "--current-key-file",
                &key_file.display().to_string(),
            ],
            DEADLINE,
        )
        .await?;
    let refusal = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        !output.status.success() && refusal.contains("a control plane is running"),
        "keys rotate after the restart was not refused: {refusal}"
    );
    ensure!(
        std::fs::read_to_string(&key_file)?.trim() == cluster.encryption_key(),
        "the refused rotation replaced the key file"
    );

    // The held jobs' results, finished during the outage, are stored: completed, first
    // attempt, whole output.
    for job in &held {
        let finished = cluster.wait_job_final(job, DEADLINE).await?;
        ensure!(
            finished["status"] == "completed"
                && finished["attempt"] == 1
                && finished["output"]
                    .as_str()
                    .is_some_and(|output| output.contains(&done_line)),
            "a job that finished during the outage: {finished}"
        );
    }

    // Every 201 exists and ends with one final result in its first attempt; no 503 exists.
    let answers = answers.lock().unwrap().clone();
    let accepted: BTreeMap<&str, &str> = answers
        .iter()
        .filter_map(|answer| match answer {
            Answer::Created { tag, run_id, .. } => Some((tag.as_str(), run_id.as_str())),
            Answer::Unavailable { .. } => None,
        })
        .collect();
    let refused: Vec<&str> = answers
        .iter()
        .filter_map(|answer| match answer {
            Answer::Unavailable { tag } => Some(tag.as_str()),
            Answer::Created { .. } => None,
        })
        .collect();
    let stored = cluster
        .wait_until(DEADLINE, "every accepted run to end", || async {
            let runs = stored_runs(&pg, &database, &load_event)?;
            let ended = runs
                .values()
                .flat_map(|(_, jobs)| jobs)
                .all(|(status, _, _)| {
                    ["completed", "failed", "cancelled"].contains(&status.as_str())
                });
            Ok(ended.then_some(runs))
        })
        .await?;
    let runs: BTreeMap<&str, (&str, &Vec<StoredJob>)> = stored
        .iter()
        .map(|(run_id, (tag, jobs))| (tag.as_str(), (run_id.as_str(), jobs)))
        .collect();
    ensure!(
        runs.len() == stored.len(),
        "two runs with one tag: {stored:?}"
    );
    for tag in &refused {
        ensure!(
            !runs.contains_key(*tag),
            "the run {tag} was answered 503 but exists"
        );
    }
    for (tag, run_id) in &accepted {
        let (stored_id, jobs) = runs
            .get(*tag)
            .with_context(|| format!("the run {tag} ({run_id}) was answered 201 but is lost"))?;
        ensure!(
            stored_id == run_id
                && jobs.len() == 1
                && jobs[0] == ("completed".to_owned(), 1, "agent".to_owned()),
            "the run {tag} ({run_id}) did not end once, completed by its agent: {jobs:?}"
        );
    }
    ensure!(
        runs.len() == accepted.len(),
        "{} runs stored, {} accepted",
        runs.len(),
        accepted.len()
    );
    eprintln!(
        "{} runs accepted, {} refused with 503 during an outage of {outage:?}",
        accepted.len(),
        refused.len()
    );
    // One process, no panic; the log says what happened.
    let log = std::fs::read_to_string(cluster.dir().join("control-plane.log"))?;
    ensure!(!log.contains("panicked"), "the control plane panicked");
    ensure!(
        log.matches("cronium ready ").count() == 1,
        "the control plane started more than once"
    );
    for line in [
        "the database does not answer",
        "the database answers again",
        "took the running lock on PostgreSQL again",
        "extended the leases of running jobs",
    ] {
        ensure!(log.contains(line), "the control plane did not log {line:?}");
    }
    Ok(())
}

/// Incompressible text of `len` bytes (PostgreSQL would compress a repeated character away).
fn random_text(len: usize) -> String {
    let mut text = String::with_capacity(len + 64);
    while text.len() < len {
        text.push_str(&cronium_e2e::unique_marker("pad"));
    }
    text.truncate(len);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_postgres_disk_answers_507_or_503_stores_nothing_partial_and_recovers() -> Result<()>
{
    // initdb's cluster takes about 40 MiB (16 of them the first WAL segment), a database 8.
    let pg = PgCluster::start_on_tmpfs(96 * 1024 * 1024)?;
    let url = pg.create_database()?;
    let database = database_name(&url)?.to_owned();
    let mut cluster = TestCluster::start_on_database(ClusterOptions::default(), &url).await?;
    let agent = cluster.add_agent("worker").await?;
    // Runs of this event stay queued: its agent is enrolled but never started.
    let idle = cluster.enroll_agent("never-started", &[]).await?;
    let queued_event = cluster
        .create_event(&EventSpec::bash("stays-queued", "true").target(&idle.id))
        .await?;
    let live_event = cluster
        .create_event(&EventSpec::bash("runs", "echo ran-after-freeing").target(&agent.id))
        .await?;
    let pid = cluster
        .control_plane_pid()
        .context("no control plane process")?;
    let tmpfs = pg.tmpfs().context("the cluster has no tmpfs")?;
    ensure!(tmpfs.fill()? > 0, "nothing could be written to the tmpfs");

    // Runs with 200 KiB of input until PostgreSQL refuses one: a new data page is refused with
    // SQLSTATE 53100 (507); if a new WAL segment was needed first, PostgreSQL PANICked (503).
    let input = random_text(200 * 1024);
    let mut accepted = Vec::new();
    let refusal = loop {
        ensure!(
            accepted.len() < 150,
            "150 runs of 200 KiB were accepted on a full disk"
        );
        let answer = cluster
            .api()
            .post(
                &format!("/api/v1/events/{queued_event}/runs"),
                &json!({"input": {"n": accepted.len(), "pad": input}}),
            )
            .await?;
        match answer.status {
            201 => accepted.push(json_str(&answer.json, "run_id")?),
            507 | 503 => break answer,
            _ => bail!(
                "a run on a full disk: HTTP {}: {}",
                answer.status,
                answer.text
            ),
        }
    };
    eprintln!(
        "{} runs of 200 KiB accepted before PostgreSQL's full disk refused one with {}",
        accepted.len(),
        refusal.status
    );
    if refusal.status == 507 {
        ensure!(
            refusal.json["error"]["code"] == "insufficient_storage"
                && refusal.json["error"]["message"]
                    .as_str()
                    .is_some_and(|message| message.contains("disk is full")),
            "the refusal does not say why: {}",
            refusal.text
        );
        // Nothing partial: exactly the accepted runs exist, each with its job.
        let runs = stored_runs(&pg, &database, &queued_event)?;
        ensure!(
            runs.len() == accepted.len()
                && accepted.iter().all(|run_id| runs.contains_key(run_id))
                && runs.values().all(|(_, jobs)| jobs.len() == 1),
            "{} runs stored, {} accepted: {runs:?}",
            runs.len(),
            accepted.len()
        );
        // Reads still work on a full disk.
        cluster
            .api()
            .get_ok(&format!("/api/v1/events/{queued_event}"))
            .await?;

        // Now a write that needs a new WAL segment (a logical message is WAL only): PostgreSQL
        // PANICs ("could not write to file pg_wal/xlogtemp…") and its restart fails as long as
        // the disk stays full.
        let mut panicked = false;
        for _ in 0..200 {
            let emitted = pg.psql(
                &database,
                "SELECT pg_logical_emit_message(false, 'cronium-test', \
                 string_agg(md5(random()::text), '')) FROM generate_series(1, 40000)",
            );
            if emitted.is_err() {
                panicked = true;
                break;
            }
        }
        ensure!(panicked, "256 MB of WAL were written on a full 96 MB disk");
    }
    let log = pg.log();
    ensure!(
        log.contains("PANIC:") || refusal.status == 507,
        "a 503 without a PANIC of PostgreSQL: {}",
        refusal.text
    );
    // While PostgreSQL is down (or restarting into the same full disk), writes answer 503.
    let refused = cluster
        .wait_until(DEADLINE, "a write refused with 503", || async {
            let answer = cluster
                .api()
                .post(
                    &format!("/api/v1/events/{queued_event}/runs"),
                    &json!({"input": {"n": "during-the-panic"}}),
                )
                .await?;
            match answer.status {
                503 => Ok(Some(answer)),
                // The crash is still under way, or PostgreSQL came up into the full disk.
                507 => Ok(None),
                _ => bail!(
                    "a run while PostgreSQL is down: HTTP {}: {}",
                    answer.status,
                    answer.text
                ),
            }
        })
        .await?;
    ensure_unavailable(&refused, "creating a run")?;
    ensure!(
        pg.log().contains("No space left on device"),
        "PostgreSQL's log does not name the full disk"
    );

    // Space is freed; PostgreSQL is started again if it stopped for good: the same control
    // plane serves again, with every accepted run whole and nothing else.
    tmpfs.free()?;
    if !pg.is_running()? {
        pg.start_again()?;
    }
    let back = cluster
        .wait_until(DEADLINE, "a run accepted after freeing space", || async {
            let answer = cluster
                .api()
                .post(
                    &format!("/api/v1/events/{queued_event}/runs"),
                    &json!({"input": {"n": "after-freeing"}}),
                )
                .await?;
            match answer.status {
                201 => Ok(Some(json_str(&answer.json, "run_id")?)),
                503 => Ok(None),
                _ => bail!(
                    "a run after freeing space: HTTP {}: {}",
                    answer.status,
                    answer.text
                ),
            }
        })
        .await?;
    ensure!(
        cluster.control_plane_pid() == Some(pid) && cpu_time(pid).is_ok(),
        "the control plane process was replaced or exited"
    );
    let runs = stored_runs(&pg, &database, &queued_event)?;
    for run_id in &accepted {
        let run = cluster.run(run_id).await?;
        ensure!(
            run["input"]["pad"].as_str().map(str::len) == Some(input.len())
                && run["jobs"].as_array().map(Vec::len) == Some(1),
            "run {run_id} is not whole"
        );
    }
    // Nothing but the accepted runs and the one after freeing space: none of the refused ones.
    ensure!(
        runs.len() == accepted.len() + 1 && runs.contains_key(&back),
        "{} runs stored for {} accepted and one after freeing space",
        runs.len(),
        accepted.len()
    );
    cluster.run(&back).await?;
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    let started = cluster.run_event(&live_event, None).await?;
    let finished = cluster
        .wait_job_final(&started.single_job()?, DEADLINE)
        .await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .is_some_and(|output| output.contains("ran-after-freeing")),
        "the job after freeing space: {finished}"
    );
    let log = std::fs::read_to_string(cluster.dir().join("control-plane.log"))?;
    ensure!(!log.contains("panicked"), "the control plane panicked");
    drop(cluster);
    Ok(())
}
