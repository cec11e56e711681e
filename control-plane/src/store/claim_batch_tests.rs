//! Claims made together (`claim_batch`): many agents claiming at once each get their own jobs
//! with their own secret environment, and a batch that fails answers every claim in it.

use std::collections::BTreeMap;

use super::super::events::SecretEnvChange;
use super::super::jobs::RunSpec;
use super::super::now_ms;
use super::super::tests::fixture_with;

/// A run of `event` with one job per agent.
fn spec(event: &str, owner: &str, agents: &[String]) -> RunSpec {
    RunSpec {
        event_id: event.to_string(),
        kind: "bash".into(),
        script: "true".into(),
        env: "{}".into(),
        runtime_spec: None,
        input: None,
        timeout_seconds: 60,
        max_attempts: 1,
        created_by: owner.to_string(),
        agent_ids: agents.to_vec(),
        trigger: "manual",
        slot_at: None,
        missed_slots: 0,
        pool: false,
    }
}

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
            .create_run_dispatched(spec(event, &fixture.owner, half), None, None)
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
