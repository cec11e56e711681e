//! Claims made together (`claim_batch`): many agents claiming at once each get their own jobs
//! with their own secret environment, and a batch that fails answers every claim in it.

use std::collections::BTreeMap;

use super::super::events::SecretEnvChange;
use super::super::now_ms;
use super::super::tests::{bash_run, fixture_with};

#[tokio::test]
async fn concurrent_claims_of_many_agents_each_get_their_own_jobs_and_secrets() {
    let fixture = fixture_with(Default::default()).await;
    let store = &fixture.store;
    // Two events with different secret environments, each fanned out to half of the agents.
    let mut events = Vec::new();
    for (name, secret) in [
        ("first", b"sealed-one".to_vec()),
        ("second", b"sealed-two".to_vec()),
    ] {
        let fields = super::super::tests::bash_fields(name, None);
        let secrets = SecretEnvChange {
            set: vec![(format!("{}_TOKEN", name.to_uppercase()), secret.clone())],
            remove: Vec::new(),
        };
        let event = store
            .create_event_with_secrets(&fixture.owner, &fields, secrets)
            .await
            .unwrap()
            .id;
        events.push((event, name, secret));
    }
    let mut agents = Vec::new();
    for index in 0..40 {
        agents.push(store.enroll_test_agent(&format!("agent-{index}")).await.id);
    }
    let mut expected: BTreeMap<String, (String, String, Vec<u8>)> = BTreeMap::new();
    for ((event, name, secret), half) in events.iter().zip(agents.chunks(20)) {
        let (run_id, _) = store
            .create_run_dispatched(bash_run(event, &fixture.owner, half), None, None)
            .await
            .unwrap();
        for job in store.run(&run_id).await.unwrap().jobs {
            let agent = job.agent_id.clone().unwrap();
            let variable = format!("{}_TOKEN", name.to_uppercase());
            expected.insert(agent, (job.id, variable, secret.clone()));
        }
    }
    // Every agent claims at once (most of them share a write operation), twice as many
    // slots as it has jobs.
    let lease = now_ms() + 60_000;
    let claims = agents.iter().map(|agent| store.claim_jobs(agent, 2, lease));
    let results = futures_util::future::join_all(claims).await;
    for (agent, claimed) in agents.iter().zip(results) {
        let claimed = claimed.unwrap();
        let (job_id, variable, secret) = &expected[agent];
        assert_eq!(claimed.len(), 1, "agent {agent} claims exactly its one job");
        assert_eq!(
            &claimed[0].id, job_id,
            "agent {agent} got another agent's job"
        );
        assert_eq!(claimed[0].attempt, 1);
        assert_eq!(
            claimed[0].secret_env,
            vec![(variable.clone(), secret.clone())],
            "agent {agent} got another job's secret environment"
        );
    }
    // Nothing is left to claim, and each job was claimed once.
    for agent in &agents {
        assert!(store.claim_jobs(agent, 2, lease).await.unwrap().is_empty());
        let job = store.job(&expected[agent].0).await.unwrap();
        assert_eq!(
            (job.attempt, job.agent_id.as_deref()),
            (1, Some(agent.as_str()))
        );
    }
}

/// The ids of the jobs of a run of `event` with one job per agent, in `agents`' order.
async fn run_of(
    store: &super::super::Store,
    event: &str,
    owner: &str,
    agents: &[String],
    pool: bool,
) -> Vec<String> {
    let mut spec = bash_run(event, owner, agents);
    spec.pool = pool;
    let (_, jobs) = store.create_run_dispatched(spec, None, None).await.unwrap();
    let by_agent: BTreeMap<String, String> =
        jobs.into_iter().map(|(job, agent)| (agent, job)).collect();
    if pool {
        return by_agent.into_values().take(1).collect();
    }
    agents.iter().map(|agent| by_agent[agent].clone()).collect()
}

#[tokio::test]
async fn one_batch_mixing_plain_pool_capped_and_repeated_claims_gives_each_what_it_would_alone() {
    // The fixture's event allows one job at a time; `free` has no limit.
    let fixture = fixture_with(super::super::dispatch::DispatchPolicy {
        max_concurrency: Some(1),
        ..Default::default()
    })
    .await;
    let store = &fixture.store;
    let (capped, owner) = (fixture.event.clone(), fixture.owner.clone());
    let free = store
        .create_event(&owner, &super::super::tests::bash_fields("free", None))
        .await
        .unwrap()
        .id;
    let mut agents = Vec::new();
    for name in ["plain-a", "plain-b", "limited", "pooled", "twice", "idle"] {
        agents.push(store.enroll_test_agent(name).await.id);
    }
    let [plain_a, plain_b, limited, pooled, twice, idle] =
        <[String; 6]>::try_from(agents.clone()).unwrap();
    let one = |agent: &String| vec![agent.clone()];
    // plain-a: three own jobs, oldest first; plain-b: one.
    let mut plain_a_jobs = Vec::new();
    for _ in 0..3 {
        plain_a_jobs.extend(run_of(store, &free, &owner, &one(&plain_a), false).await);
    }
    let plain_b_job = run_of(store, &free, &owner, &one(&plain_b), false).await;
    // limited: a free job and two jobs of the capped event (one claimable at a time).
    let limited_free = run_of(store, &free, &owner, &one(&limited), false).await;
    let mut limited_capped = Vec::new();
    for _ in 0..2 {
        limited_capped.extend(run_of(store, &capped, &owner, &one(&limited), false).await);
    }
    // pooled: an own job and a pool job it is the only candidate for.
    let pooled_own = run_of(store, &free, &owner, &one(&pooled), false).await;
    let pool_job = run_of(store, &free, &owner, &one(&pooled), true).await;
    // twice: two own jobs, claimed by two requests of one slot each in the same batch.
    let mut twice_jobs = Vec::new();
    for _ in 0..2 {
        twice_jobs.extend(run_of(store, &free, &owner, &one(&twice), false).await);
    }

    let now = now_ms();
    let lease = now + 60_000;
    let requests: Vec<(&String, u32)> = vec![
        (&plain_a, 2),
        (&limited, 5),
        (&plain_b, 3),
        (&pooled, 5),
        (&twice, 1),
        (&twice, 1),
        (&idle, 4),
    ];
    // Hold the writer so that every claim joins one batch (on SQLite; PostgreSQL claims outside
    // the writer, `claim_pg`, at once: the answers must be the same).
    let (holder, release) = super::super::writer_tests::hold_writer(store).await;
    let batched = store.backend() == super::super::Backend::Sqlite;
    let mut claiming = Vec::new();
    for (agent, limit) in &requests {
        let mut future: std::pin::Pin<Box<dyn Future<Output = _>>> = if batched {
            Box::pin(store.claim_batched(agent, *limit, lease, Some(now)))
        } else {
            Box::pin(store.claim_jobs_at(agent, *limit, lease, now))
        };
        if batched {
            // A claim joins the waiting batch at its first poll.
            assert!(futures_util::poll!(future.as_mut()).is_pending());
        }
        claiming.push(future);
    }
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    let answers: Vec<Vec<String>> = futures_util::future::join_all(claiming)
        .await
        .into_iter()
        .map(|claimed| claimed.unwrap().into_iter().map(|job| job.id).collect())
        .collect();

    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    assert_eq!(
        answers[0],
        sorted(plain_a_jobs[..2].to_vec()),
        "plain-a: its two oldest"
    );
    assert_eq!(
        answers[1],
        sorted(vec![limited_free[0].clone(), limited_capped[0].clone()]),
        "limited: its free job and the oldest capped one"
    );
    assert_eq!(answers[2], plain_b_job, "plain-b: its one job");
    assert_eq!(
        answers[3],
        sorted(vec![pooled_own[0].clone(), pool_job[0].clone()]),
        "pooled: its own job and the pool job"
    );
    let mut both = answers[4].clone();
    both.extend(answers[5].clone());
    assert_eq!(
        (answers[4].len(), answers[5].len(), sorted(both)),
        (1, 1, sorted(twice_jobs.clone())),
        "twice: one job per request, none twice"
    );
    assert!(answers[6].is_empty(), "idle has nothing");

    // Every claimed job is bound to its claimer, at the claim's time, with its lease; the rest
    // stay queued.
    for (jobs, agent) in [
        (&answers[0], &plain_a),
        (&answers[1], &limited),
        (&answers[2], &plain_b),
        (&answers[3], &pooled),
        (&answers[4], &twice),
        (&answers[5], &twice),
    ] {
        for id in jobs {
            let job = store.job(id).await.unwrap();
            assert_eq!(job.status, super::super::jobs::JobStatus::Claimed, "{id}");
            assert_eq!(
                (job.attempt, job.agent_id.as_deref()),
                (1, Some(agent.as_str()))
            );
            assert_eq!(job.claimed_at, Some(now));
            let lease_expires_at: Option<i64> =
                sqlx::query_scalar("SELECT lease_expires_at FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&store.reader)
                    .await
                    .unwrap();
            assert_eq!(lease_expires_at, Some(lease));
        }
    }
    for id in [&plain_a_jobs[2], &limited_capped[1]] {
        let job = store.job(id).await.unwrap();
        assert_eq!(
            (job.status, job.attempt),
            (super::super::jobs::JobStatus::Queued, 0),
            "{id} stays queued"
        );
    }
}
