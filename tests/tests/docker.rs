//! Docker runner end-to-end tests: real control plane, real agents, a real Docker engine.
//!
//! They need `DOCKER_HOST` to name a running engine (`.ci/run` starts a private `dockerd`; see the
//! README to run them locally) and fail with a clear message otherwise. Jobs run in a tiny image
//! built locally ([`TEST_IMAGE`]); every test uses its own cluster and finds its containers by
//! the job's label, so the tests run in parallel.

use std::time::Duration;

use anyhow::{Result, ensure};
use cronium_e2e::docker::{TEST_IMAGE, containers_of_job, require_engine};
use cronium_e2e::{AgentOptions, ClusterOptions, EventSpec, TestCluster};
use serde_json::{Value, json};

/// How long a Docker job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn docker_fields(extra: Value) -> Value {
    let mut fields = json!({"image": TEST_IMAGE});
    if let (Some(fields), Some(extra)) = (fields.as_object_mut(), extra.as_object()) {
        fields.extend(extra.clone());
    }
    fields
}

async fn cluster_with_agent(name: &str) -> Result<(TestCluster, String)> {
    tokio::task::spawn_blocking(require_engine).await??;
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(3),
        heartbeat_seconds: Some(1),
    })
    .await?;
    let agent = cluster.add_agent(name).await?;
    Ok((cluster, agent.id))
}

async fn wait_no_container(cluster: &TestCluster, job_id: &str) -> Result<()> {
    cluster
        .wait_until(
            Duration::from_secs(20),
            &format!("no container of job {job_id}"),
            || async { Ok(containers_of_job(job_id)?.is_empty().then_some(())) },
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_job_returns_its_output_and_exit_code() -> Result<()> {
    let (cluster, agent) = cluster_with_agent("docker-basic").await?;
    let spec = EventSpec::bash(
        "in-docker",
        "echo \"in $(pwd) as $(id -u): $GREETING\"; echo oops >&2; exit 7",
    )
    .target(&agent)
    .env("GREETING", "hello")
    .docker(docker_fields(json!({})));
    let job_id = cluster.run_single_job(&spec).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "exit_code" && job["exit_code"] == 7,
        "unexpected result: {job}"
    );
    let output = job["output"].as_str().unwrap_or_default();
    ensure!(
        output.contains("in /job as 0: hello\n"),
        "output: {output:?}"
    );
    ensure!(output.contains("oops\n"), "output: {output:?}");
    ensure!(
        containers_of_job(&job_id)?.is_empty(),
        "the container is gone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_fails_with_reason_oom_and_a_fork_bomb_is_contained() -> Result<()> {
    let (cluster, agent) = cluster_with_agent("docker-limits").await?;
    let hog = EventSpec::bash("hog", "x=aaaaaaaaaaaaaaaa; while true; do x=\"$x$x\"; done")
        .target(&agent)
        .docker(docker_fields(json!({"limits": {"memory_mb": 32}})));
    let job_id = cluster.run_single_job(&hog).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "oom",
        "the hog should fail with reason oom: {job}"
    );

    let bomb = EventSpec::bash("bomb", "bomb() { bomb | bomb & }; bomb; sleep 1000")
        .target(&agent)
        .timeout_seconds(3)
        .docker(docker_fields(json!({"limits": {"pids": 16}})));
    let job_id = cluster.run_single_job(&bomb).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    // Contained: forks fail at the PIDs limit. Usually the timeout ends it; bash may also give
    // up by itself when a fork of the top-level shell fails ("fork: Interrupted system call").
    let output = job["output"].as_str().unwrap_or_default();
    ensure!(
        job["status"] == "failed"
            && (job["reason"] == "timeout"
                || (job["reason"] == "exit_code" && output.contains("fork:"))),
        "the fork bomb should be contained and end failed: {job}"
    );
    ensure!(
        output.contains("Resource temporarily unavailable"),
        "forks should fail at the PIDs limit: {job}"
    );
    wait_no_container(&cluster, &job_id).await?;

    // The agent is fine and runs the next job.
    let next = EventSpec::bash("next", "echo next")
        .target(&agent)
        .docker(docker_fields(json!({})));
    let job_id = cluster.run_single_job(&next).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(job["status"] == "completed", "next job: {job}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_cannot_reach_a_listener_on_the_host() -> Result<()> {
    let (cluster, agent) = cluster_with_agent("docker-net").await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let spec = EventSpec::bash(
        "net",
        &format!(
            "if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo connected; else echo refused; fi"
        ),
    )
    .target(&agent)
    .docker(docker_fields(json!({"network": "none"})));
    let job_id = cluster.run_single_job(&spec).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(job["status"] == "completed", "{job}");
    ensure!(
        job["output"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "{job}"
    );
    listener.set_nonblocking(true)?;
    ensure!(listener.accept().is_err(), "something connected");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_leave_no_container() -> Result<()> {
    let (cluster, agent) = cluster_with_agent("docker-stop").await?;
    let timed = EventSpec::bash("timed", "echo started; sleep 1000")
        .target(&agent)
        .timeout_seconds(2)
        .docker(docker_fields(json!({})));
    let job_id = cluster.run_single_job(&timed).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "timeout",
        "{job}"
    );
    wait_no_container(&cluster, &job_id).await?;

    let cancelled = EventSpec::bash("cancelled", "echo started; sleep 1000")
        .target(&agent)
        .docker(docker_fields(json!({})));
    let job_id = cluster.run_single_job(&cancelled).await?;
    cluster
        .wait_until(JOB_TIMEOUT, "the container running", || async {
            Ok((!containers_of_job(&job_id)?.is_empty()).then_some(()))
        })
        .await?;
    cluster.cancel_job(&job_id).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(job["status"] == "cancelled", "{job}");
    wait_no_container(&cluster, &job_id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_no_container_after_it_restarts() -> Result<()> {
    tokio::task::spawn_blocking(require_engine).await??;
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(3),
        heartbeat_seconds: Some(1),
    })
    .await?;
    let agent = cluster.add_agent("docker-doomed").await?;
    let spec = EventSpec::bash("doomed", "echo started; sleep 1000")
        .target(&agent.id)
        .docker(docker_fields(json!({})));
    let job_id = cluster.run_single_job(&spec).await?;
    cluster
        .wait_until(JOB_TIMEOUT, "the container running", || async {
            Ok((!containers_of_job(&job_id)?.is_empty()).then_some(()))
        })
        .await?;
    cluster.kill_agent(&agent.id)?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "lost",
        "{job}"
    );
    ensure!(
        !containers_of_job(&job_id)?.is_empty(),
        "the container outlives the SIGKILLed agent (it is the restart that removes it)"
    );
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    wait_no_container(&cluster, &job_id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_docker_is_refused_docker_jobs() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.enroll_agent("no-docker", &[]).await?;
    let options = AgentOptions {
        env: vec![(
            "DOCKER_HOST".to_owned(),
            format!("unix://{}/no-such-docker.sock", cluster.dir().display()),
        )],
        ..AgentOptions::default()
    };
    cluster.start_agent(&agent, &options).await?;
    let spec = EventSpec::bash("refused", "echo never")
        .target(&agent.id)
        .docker(docker_fields(json!({})));
    let event_id = cluster.create_event(&spec).await?;
    let answer = cluster
        .api()
        .post(&format!("/api/v1/events/{event_id}/runs"), &json!({}))
        .await?
        .expect_status(422, "run a docker event on an agent without docker")?;
    ensure!(answer["error"]["field"] == "runtime", "{answer}");
    ensure!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-docker"),
        "{answer}"
    );
    Ok(())
}
