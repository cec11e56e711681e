//! Workflows end to end on a real agent: a condition branch (`cronium_set_condition`) picks
//! one side, two parallel branches join into a node that gets both results, data flows from
//! node to node (checked in the last node's result); failure edges; validation (cycles named,
//! events of other users); the webhook trigger with good, bad and missing signatures; a
//! schedule trigger; and a control plane SIGKILLed mid-workflow that finishes it after the
//! restart without running any node twice.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::{EventSpec, TestCluster};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// How long a small workflow on a local agent may take.
const WORKFLOW_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates a bash event on `agent` and returns its id.
async fn event(cluster: &TestCluster, agent: &str, name: &str, script: &str) -> Result<String> {
    cluster
        .create_event(&EventSpec::bash(name, &format!(". ./cronium.sh\n{script}")).target(agent))
        .await
}

async fn create_workflow(cluster: &TestCluster, body: &Value) -> Result<Value> {
    cluster
        .api()
        .post("/api/v1/workflows", body)
        .await?
        .expect_status(201, "create a workflow")
}

async fn start_run(cluster: &TestCluster, workflow: &Value, input: Value) -> Result<String> {
    let id = workflow["id"].as_str().context("workflow id")?;
    let run = cluster
        .api()
        .post(
            &format!("/api/v1/workflows/{id}/runs"),
            &json!({"input": input}),
        )
        .await?
        .expect_status(201, "start a workflow run")?;
    Ok(run["id"].as_str().context("workflow run id")?.to_owned())
}

/// Waits until the workflow run has ended and returns it.
async fn wait_run_ended(cluster: &TestCluster, run_id: &str) -> Result<Value> {
    cluster
        .wait_until(
            WORKFLOW_TIMEOUT,
            &format!("workflow run {run_id} ended"),
            || async {
                let run = cluster
                    .api()
                    .get_ok(&format!("/api/v1/workflow-runs/{run_id}"))
                    .await?;
                Ok(run["finished_at"].is_string().then_some(run))
            },
        )
        .await
}

/// The node `id` of a workflow run.
fn node<'a>(run: &'a Value, id: &str) -> Result<&'a Value> {
    run["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|node| node["id"] == id))
        .with_context(|| format!("no node {id} in {run}"))
}

/// The states of a run's nodes, as `id=state` in the definition's order.
fn states(run: &Value) -> Vec<String> {
    run["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|node| {
                    format!(
                        "{}={}",
                        node["id"].as_str().unwrap_or("?"),
                        node["state"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many runs an event has (`GET /runs?event_id=`).
async fn event_runs(cluster: &TestCluster, event_id: &str) -> Result<usize> {
    let runs = cluster
        .api()
        .get_ok(&format!("/api/v1/runs?event_id={event_id}&limit=100"))
        .await?;
    Ok(runs.as_array().context("runs array")?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_branch_and_a_join_pass_data_to_the_last_node() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-agent").await?;
    let agent = agent.id.as_str();
    let check = event(
        &cluster,
        agent,
        "check",
        "case \"$(cronium_input)\" in *yes*) cronium_set_condition true;; *) cronium_set_condition false;; esac\n\
         cronium_output '{\"n\": 5}'\n",
    )
    .await?;
    let yes = event(
        &cluster,
        agent,
        "yes",
        "cronium_output \"{\\\"yes_saw\\\": $(cronium_input)}\"\n",
    )
    .await?;
    let no = event(&cluster, agent, "no", "cronium_output '\"no ran\"'\n").await?;
    let left = event(
        &cluster,
        agent,
        "left",
        "cronium_output \"{\\\"from\\\": \\\"left\\\", \\\"saw\\\": $(cronium_input)}\"\n",
    )
    .await?;
    let right = event(
        &cluster,
        agent,
        "right",
        "cronium_output '{\"from\": \"right\"}'\n",
    )
    .await?;
    let join = event(
        &cluster,
        agent,
        "join",
        "cronium_output \"{\\\"joined\\\": $(cronium_input)}\"\n",
    )
    .await?;
    let workflow = create_workflow(
        &cluster,
        &json!({
            "name": "branch-and-join",
            "nodes": [
                {"id": "check", "event_id": check},
                {"id": "yes", "event_id": yes},
                {"id": "no", "event_id": no},
                {"id": "left", "event_id": left},
                // By name: the caller's event called "right".
                {"id": "right", "event_id": "right"},
                {"id": "join", "event_id": join, "join": "all"},
            ],
            "edges": [
                {"from": "check", "to": "yes", "on": "condition", "condition": true},
                {"from": "check", "to": "no", "on": "condition", "condition": false},
                {"from": "yes", "to": "left"},
                {"from": "yes", "to": "right"},
                {"from": "left", "to": "join"},
                {"from": "right", "to": "join"},
            ],
        }),
    )
    .await?;
    if workflow["nodes"][4]["event_id"] != right.as_str() {
        bail!("the event named by name was not resolved to its id: {workflow}");
    }
    if workflow.get("webhook_secret").is_some() || workflow["trigger"]["webhook"] != false {
        bail!("a workflow without a webhook trigger shows a secret: {workflow}");
    }

    // The "yes" branch: the condition picks it, left and right run in parallel, the join gets
    // both results keyed by node, and the data of the first node reaches the last one.
    let run_id = start_run(&cluster, &workflow, json!({"branch": "yes"})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    if run["status"] != "completed" {
        bail!("the yes run did not complete: {:?} {run}", states(&run));
    }
    assert_eq!(
        states(&run),
        [
            "check=completed",
            "yes=completed",
            "no=skipped",
            "left=completed",
            "right=completed",
            "join=completed"
        ]
    );
    assert_eq!(node(&run, "check")?["input"], json!({"branch": "yes"}));
    assert_eq!(node(&run, "check")?["condition"], json!(true));
    assert_eq!(node(&run, "yes")?["input"], json!({"n": 5}));
    assert_eq!(
        node(&run, "join")?["result"],
        json!({"joined": {
            "left": {"from": "left", "saw": {"yes_saw": {"n": 5}}},
            "right": {"from": "right"},
        }})
    );
    // Each node's run is an ordinary run whose job got the input.
    let join_run = node(&run, "join")?["run_id"]
        .as_str()
        .context("join run id")?;
    let join_run = cluster.run(join_run).await?;
    let join_job = join_run["jobs"][0]["id"].as_str().context("join job id")?;
    let job = cluster.job(join_job).await?;
    assert_eq!(job["status"], "completed");
    assert!(node(&run, "no")?["run_id"].is_null());

    // The "no" branch: only "no" runs, everything behind "yes" is skipped.
    let run_id = start_run(&cluster, &workflow, json!({"branch": "nope"})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        states(&run),
        [
            "check=completed",
            "yes=skipped",
            "no=completed",
            "left=skipped",
            "right=skipped",
            "join=skipped"
        ]
    );
    assert_eq!(node(&run, "no")?["result"], json!("no ran"));
    assert_eq!(event_runs(&cluster, &yes).await?, 1);
    assert_eq!(event_runs(&cluster, &no).await?, 1);

    let runs = cluster
        .api()
        .get_ok(&format!(
            "/api/v1/workflows/{}/runs",
            workflow["id"].as_str().unwrap_or_default()
        ))
        .await?;
    assert_eq!(runs.as_array().map(Vec::len), Some(2), "{runs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_edges_run_the_handler_and_the_run_fails() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-failure").await?;
    let agent = agent.id.as_str();
    let fails = event(
        &cluster,
        agent,
        "fails",
        "cronium_output '\"partial\"'\nexit 3\n",
    )
    .await?;
    let handler = event(
        &cluster,
        agent,
        "handler",
        "cronium_output \"{\\\"handled\\\": $(cronium_input)}\"\n",
    )
    .await?;
    let next = event(&cluster, agent, "next", "echo never\n").await?;
    let always = event(&cluster, agent, "always", "echo always\n").await?;
    let workflow = create_workflow(
        &cluster,
        &json!({
            "name": "failure-edges",
            "nodes": [
                {"id": "fails", "event_id": fails},
                {"id": "handler", "event_id": handler},
                {"id": "next", "event_id": next},
                {"id": "cleanup", "event_id": always},
            ],
            "edges": [
                {"from": "fails", "to": "handler", "on": "failure"},
                {"from": "fails", "to": "next", "on": "success"},
                {"from": "fails", "to": "cleanup", "on": "always"},
            ],
        }),
    )
    .await?;
    let run_id = start_run(&cluster, &workflow, Value::Null).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    assert_eq!(
        states(&run),
        [
            "fails=failed",
            "handler=completed",
            "next=skipped",
            "cleanup=completed"
        ]
    );
    // A failure handled by an edge still fails the workflow run (documented).
    assert_eq!(run["status"], "failed");
    assert_eq!(
        node(&run, "handler")?["result"],
        json!({"handled": "partial"})
    );
    assert_eq!(event_runs(&cluster, &next).await?, 0);

    // Cancel: a run whose entry node waits is cancelled, its job too, nothing else starts.
    let slow = event(&cluster, agent, "slow", "sleep 600\n").await?;
    let after = event(&cluster, agent, "after", "echo after\n").await?;
    let workflow = create_workflow(
        &cluster,
        &json!({
            "name": "cancelled",
            "nodes": [{"id": "slow", "event_id": slow}, {"id": "after", "event_id": after}],
            "edges": [{"from": "slow", "to": "after", "on": "always"}],
        }),
    )
    .await?;
    let run_id = start_run(&cluster, &workflow, Value::Null).await?;
    let run = cluster
        .api()
        .post(
            &format!("/api/v1/workflow-runs/{run_id}/cancel"),
            &json!({}),
        )
        .await?
        .expect_status(200, "cancel the workflow run")?;
    assert_eq!(run["status"], "cancelled");
    let run = wait_run_ended(&cluster, &run_id).await?;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(node(&run, "after")?["state"], "skipped");
    assert_eq!(node(&run, "slow")?["state"], "failed");
    assert_eq!(event_runs(&cluster, &after).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_workflows_are_refused_with_a_field() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-validate").await?;
    let a = event(&cluster, &agent.id, "a", "true\n").await?;
    let (_, other_token) = cluster.create_user("someone", "user").await?;
    let other = cluster.api().with_token(Some(&other_token));
    let theirs = other
        .post(
            "/api/v1/events",
            &json!({"name": "theirs", "kind": "bash", "script": "true", "runtime": "host"}),
        )
        .await?
        .expect_status(201, "another user's event")?;
    let theirs = theirs["id"].as_str().context("event id")?.to_owned();

    let cases = [
        (
            json!({"name": "cycle", "nodes": [
                {"id": "start", "event_id": a}, {"id": "x", "event_id": a}, {"id": "y", "event_id": a}],
              "edges": [{"from": "start", "to": "x"}, {"from": "x", "to": "y"}, {"from": "y", "to": "x"}]}),
            "edges",
            "x → y → x",
        ),
        (
            json!({"name": "unknown", "nodes": [{"id": "x", "event_id": a}],
              "edges": [{"from": "x", "to": "ghost"}]}),
            "edges[0].to",
            "ghost",
        ),
        (
            json!({"name": "dup", "nodes": [{"id": "x", "event_id": a}, {"id": "x", "event_id": a}],
              "edges": []}),
            "nodes[1].id",
            "duplicate",
        ),
        (
            json!({"name": "sched", "nodes": [{"id": "x", "event_id": a}], "edges": [],
              "trigger": {"schedule": {"cron": "* * *", "timezone": "UTC"}}}),
            "trigger.schedule.cron",
            "",
        ),
    ];
    for (body, field, words) in cases {
        let response = cluster.api().post("/api/v1/workflows", &body).await?;
        if response.status / 100 != 4 || response.json["error"]["field"] != field {
            bail!(
                "{body}: expected a 4xx naming {field}, got {} {}",
                response.status,
                response.text
            );
        }
        let message = response.json["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(words), "{field}: {message}");
    }
    // A user may not build a workflow from another user's event (the admin's `a` here), by
    // id or by name; their own event is fine.
    for event_id in [a.as_str(), "a"] {
        let response = other
            .post(
                "/api/v1/workflows",
                &json!({"name": "foreign", "nodes": [{"id": "x", "event_id": event_id}], "edges": []}),
            )
            .await?;
        assert_eq!(response.status, 422, "{}", response.text);
        assert_eq!(response.json["error"]["field"], "nodes[0].event_id");
    }
    other
        .post(
            "/api/v1/workflows",
            &json!({"name": "own", "nodes": [{"id": "x", "event_id": theirs}], "edges": []}),
        )
        .await?
        .expect_status(201, "a workflow of the user's own event")?;
    let listed = cluster.api().get_ok("/api/v1/workflows").await?;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "only the valid workflow was stored: {listed}"
    );

    // Another user can neither see nor run the admin's workflow; a viewer changes nothing.
    let workflow = create_workflow(
        &cluster,
        &json!({"name": "mine", "nodes": [{"id": "x", "event_id": a}], "edges": []}),
    )
    .await?;
    let id = workflow["id"].as_str().context("id")?;
    other
        .get(&format!("/api/v1/workflows/{id}"))
        .await?
        .expect_status(404, "another user's workflow")?;
    let (_, viewer_token) = cluster.create_user("watcher", "viewer").await?;
    cluster
        .api()
        .with_token(Some(&viewer_token))
        .post(
            "/api/v1/workflows",
            &json!({"name": "v", "nodes": [{"id": "x", "event_id": a}], "edges": []}),
        )
        .await?
        .expect_status(403, "a viewer creating a workflow")?;
    Ok(())
}

/// HMAC-SHA256 written out from its definition (RFC 2104), independent of the server's.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_needs_a_valid_signature_and_its_body_is_the_input() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-hook").await?;
    let echo = event(
        &cluster,
        &agent.id,
        "echo",
        "cronium_output \"$(cronium_input)\"\n",
    )
    .await?;
    let workflow = create_workflow(
        &cluster,
        &json!({"name": "hooked", "nodes": [{"id": "echo", "event_id": echo}], "edges": [],
                "trigger": {"manual": false, "webhook": true}}),
    )
    .await?;
    let id = workflow["id"].as_str().context("id")?.to_owned();
    let secret = workflow["webhook_secret"]
        .as_str()
        .context("the secret is shown on creation")?
        .to_owned();
    let url = workflow["webhook_url"].as_str().context("webhook_url")?;
    assert!(
        url.ends_with(&format!("/api/v1/hooks/workflows/{id}")),
        "{url}"
    );
    let shown = cluster
        .api()
        .get_ok(&format!("/api/v1/workflows/{id}"))
        .await?;
    assert!(
        shown.get("webhook_secret").is_none(),
        "shown again: {shown}"
    );
    assert_eq!(shown["trigger"]["webhook"], true);
    // Manual runs are off for this workflow.
    cluster
        .api()
        .post(&format!("/api/v1/workflows/{id}/runs"), &json!({}))
        .await?
        .expect_status(409, "a manual run with trigger.manual false")?;

    let anonymous = cluster.api().with_token(None);
    let path = format!("/api/v1/hooks/workflows/{id}");
    let body = br#"{"order": 42}"#.to_vec();
    let post = |signature: Option<String>, body: Vec<u8>| {
        let mut request = anonymous
            .request(Method::POST, &path)
            .header("content-type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("X-Cronium-Signature", signature);
        }
        async move { Ok::<_, anyhow::Error>(request.send().await?.status().as_u16()) }
    };
    assert_eq!(post(None, body.clone()).await?, 401, "missing signature");
    assert_eq!(
        post(Some(format!("sha256={}", "00".repeat(32))), body.clone()).await?,
        401,
        "wrong signature"
    );
    let wrong_key = hmac_sha256(b"not the secret", &body);
    assert_eq!(
        post(Some(format!("sha256={wrong_key}")), body.clone()).await?,
        401,
        "signed with another key"
    );
    let good = hmac_sha256(secret.as_bytes(), &body);
    // A signature of another body does not authorise this one.
    assert_eq!(
        post(Some(format!("sha256={good}")), br#"{"order": 43}"#.to_vec()).await?,
        401,
        "signature of another body"
    );
    // The body is capped (256 KiB), whatever the signature.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(300 * 1024)).into_bytes();
    let big_signature = hmac_sha256(secret.as_bytes(), &big);
    assert_eq!(
        post(Some(format!("sha256={big_signature}")), big).await?,
        413
    );
    let runs_path = format!("/api/v1/workflows/{id}/runs");
    assert_eq!(
        cluster.api().get_ok(&runs_path).await?,
        json!([]),
        "refused hooks started nothing"
    );
    assert_eq!(
        post(Some(format!("sha256={good}")), body.clone()).await?,
        201
    );
    let runs = cluster.api().get_ok(&runs_path).await?;
    let run_id = runs[0]["id"].as_str().context("the hooked run")?;
    assert_eq!(runs[0]["trigger"], "webhook");
    let run = wait_run_ended(&cluster, run_id).await?;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(node(&run, "echo")?["result"], json!({"order": 42}));

    // Rotation: the old secret stops working, the new one works.
    let rotated = cluster
        .api()
        .post(
            &format!("/api/v1/workflows/{id}/webhook-secret"),
            &json!({}),
        )
        .await?
        .expect_status(200, "rotate the webhook secret")?;
    let new_secret = rotated["webhook_secret"].as_str().context("new secret")?;
    assert_ne!(new_secret, secret);
    assert_eq!(
        post(Some(format!("sha256={good}")), body.clone()).await?,
        401
    );
    let signature = hmac_sha256(new_secret.as_bytes(), &body);
    assert_eq!(post(Some(format!("sha256={signature}")), body).await?, 201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_finishes_the_workflow_without_running_a_node_twice() -> Result<()>
{
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-crash").await?;
    let gate = cluster.dir().join("gate");
    let started = cluster.dir().join("started");
    let first = event(
        &cluster,
        &agent.id,
        "first",
        &format!(
            "touch {started}\nfor i in $(seq 600); do [ -e {gate} ] && break; sleep 0.1; done\n\
             cronium_output '{{\"stage\": 1}}'\n",
            started = started.display(),
            gate = gate.display()
        ),
    )
    .await?;
    let second = event(
        &cluster,
        &agent.id,
        "second",
        "cronium_output \"{\\\"after\\\": $(cronium_input)}\"\n",
    )
    .await?;
    let workflow = create_workflow(
        &cluster,
        &json!({"name": "crashy",
                "nodes": [{"id": "first", "event_id": first}, {"id": "second", "event_id": second}],
                "edges": [{"from": "first", "to": "second"}]}),
    )
    .await?;
    let run_id = start_run(&cluster, &workflow, Value::Null).await?;
    cluster
        .wait_until(WORKFLOW_TIMEOUT, "the first node's job started", || async {
            Ok(started.exists().then_some(()))
        })
        .await?;
    // The control plane dies while the first node runs; the job ends while it is down.
    cluster.kill_control_plane()?;
    std::fs::write(&gate, b"go")?;
    cluster.start_control_plane_again().await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(
        node(&run, "second")?["result"],
        json!({"after": {"stage": 1}})
    );
    assert_eq!(event_runs(&cluster, &first).await?, 1);
    assert_eq!(event_runs(&cluster, &second).await?, 1);

    // And again after another restart: nothing is started twice by the start-up scan.
    cluster.restart_control_plane().await?;
    cluster
        .wait_agent_online(&agent.id, WORKFLOW_TIMEOUT)
        .await?;
    let again = cluster
        .api()
        .get_ok(&format!("/api/v1/workflow-runs/{run_id}"))
        .await?;
    assert_eq!(again["status"], "completed");
    assert_eq!(event_runs(&cluster, &second).await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_workflow_fires_each_slot_once() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-schedule").await?;
    let tick = event(&cluster, &agent.id, "tick", "cronium_output '\"tick\"'\n").await?;
    let workflow = create_workflow(
        &cluster,
        &json!({"name": "every-second", "nodes": [{"id": "tick", "event_id": tick}], "edges": [],
                "trigger": {"schedule": {"cron": "* * * * * *", "timezone": "Europe/Berlin"}}}),
    )
    .await?;
    assert!(workflow["next_run_at"].is_string(), "{workflow}");
    let id = workflow["id"].as_str().context("id")?.to_owned();
    let runs = cluster
        .wait_until(
            WORKFLOW_TIMEOUT,
            "three completed scheduled runs",
            || async {
                let runs = cluster
                    .api()
                    .get_ok(&format!("/api/v1/workflows/{id}/runs?limit=100"))
                    .await?;
                let completed = runs
                    .as_array()
                    .context("runs")?
                    .iter()
                    .filter(|run| run["status"] == "completed")
                    .count();
                Ok((completed >= 3).then_some(runs))
            },
        )
        .await?;
    // Stop the schedule, then check every slot is distinct.
    cluster
        .api()
        .send(
            Method::PATCH,
            &format!("/api/v1/workflows/{id}"),
            Some(&json!({"trigger": {"schedule": null}})),
        )
        .await?
        .expect_status(200, "remove the schedule")?;
    let runs = runs.as_array().context("runs")?;
    let mut slots: Vec<&str> = runs
        .iter()
        .map(|run| run["slot_at"].as_str().unwrap_or_default())
        .collect();
    assert!(runs.iter().all(|run| run["trigger"] == "schedule"));
    let count = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), count, "a slot fired twice: {slots:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_runs_a_workflow() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("wf-cli").await?;
    event(
        &cluster,
        &agent.id,
        "double",
        "n=$(cronium_input | sed 's/[^0-9]//g')\ncronium_output \"{\\\"n\\\": $((n * 2))}\"\n",
    )
    .await?;
    event(&cluster, &agent.id, "boom", "exit 1\n").await?;
    let file = cluster.dir().join("workflow.json");
    std::fs::write(
        &file,
        json!({"name": "cli-flow", "nodes": [{"id": "double", "event_id": "double"}], "edges": [],
               "trigger": {"webhook": true}})
        .to_string(),
    )?;
    let file = file.to_str().context("path")?;
    let timeout = Duration::from_secs(60);
    let created = cluster.cli(&["workflow", "create", file], timeout).await?;
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{stderr}");
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(
        stderr.contains("whsec_"),
        "the secret is printed once: {stderr}"
    );

    let listed = cluster.cli(&["workflow", "list"], timeout).await?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&id) && listed.contains("cli-flow") && listed.contains("manual, webhook"),
        "{listed}"
    );

    let ran = cluster
        .cli(
            &["workflow", "run", "cli-flow", "--input", "21", "--wait"],
            timeout,
        )
        .await?;
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(
        stdout.contains("double") && stdout.contains("completed"),
        "{stdout}"
    );
    let run_id = stdout.lines().next().context("run id")?.trim();
    let run = cluster
        .api()
        .get_ok(&format!("/api/v1/workflow-runs/{run_id}"))
        .await?;
    assert_eq!(node(&run, "double")?["result"], json!({"n": 42}));

    // A failing workflow makes `--wait` exit non-zero.
    let boom = cluster.dir().join("boom.json");
    std::fs::write(
        &boom,
        json!({"name": "cli-boom", "nodes": [{"id": "boom", "event_id": "boom"}], "edges": []})
            .to_string(),
    )?;
    let created = cluster
        .cli(
            &["workflow", "create", boom.to_str().context("path")?],
            timeout,
        )
        .await?;
    assert!(created.status.success());
    let ran = cluster
        .cli(&["workflow", "run", "cli-boom", "--wait"], timeout)
        .await?;
    assert!(
        !ran.status.success(),
        "a failed workflow run exits non-zero"
    );
    assert!(String::from_utf8_lossy(&ran.stdout).contains("failed"));
    Ok(())
}
