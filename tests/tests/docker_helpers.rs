//! Runtime helpers in Docker: real jobs in Bash, Python and Node.js run in the locally built test
//! images ([`TestImage`]) and use the helper libraries the agent writes into `/job`, talking to
//! the attempt's helper socket bind-mounted with it. The host side of the same calls is
//! `tests/helpers.rs`.
//!
//! Like `tests/docker.rs`, these need `DOCKER_HOST` to name a running engine and fail with a
//! clear message otherwise. The events name no `image`: the cluster's control plane gets the test
//! images as its per-kind defaults (`--docker-image-bash|python|nodejs`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use cronium_e2e::docker::{DefaultImages, TestImage, require_engine_with};
use cronium_e2e::{ClusterOptions, EventSpec, TestCluster, WebhookListener};
use serde_json::{Value, json};

/// How long a Docker job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// The unprivileged user of the read-only jobs (`nobody` on Debian; the images have no entry
/// for it, which must not matter).
const NOBODY: &str = "65534:65534";

/// Reads the input, sets output and condition, prints the ids, the uid and whether `/` is
/// writable, and checks that the library fails clearly without curl and python3.
const BASH: &str = r#"set -e
. ./cronium.sh
n=$(cronium_input | sed 's/[^0-9]//g')
cronium_output "{\"doubled\": $((n * 2)), \"lang\": \"bash\"}"
cronium_set_condition true
echo "event: $(cronium_event)"
echo "uid: $(id -u)"
if touch /root-probe 2>/dev/null; then echo "root: writable"; else echo "root: read-only"; fi
if (PATH=/bin; cronium_event) 2>"$TMPDIR/err.txt"; then echo "UNEXPECTED success without curl"; fi
echo "without curl and python3: $(cat "$TMPDIR/err.txt")"
"#;

const PYTHON: &str = r#"import os
import cronium
n = cronium.input()["n"]
cronium.output({"doubled": n * 2, "lang": "python"})
cronium.set_condition(False)
event = cronium.event()
print("event:", event["job_id"], event["run_id"], event["event_id"], event["attempt"])
print("uid:", os.getuid())
try:
    open("/root-probe", "w").close()
    print("root: writable")
except OSError:
    print("root: read-only")
"#;

const NODE: &str = r#"const fs = require('fs');
const cronium = require('./cronium');
(async () => {
  const input = await cronium.input();
  await cronium.output({ doubled: input.n * 2, lang: 'node' });
  await cronium.setCondition(true);
  const event = await cronium.event();
  console.log('event:', event.job_id, event.run_id, event.event_id, event.attempt);
  console.log('uid:', process.getuid());
  try {
    fs.writeFileSync('/root-probe', '');
    console.log('root: writable');
  } catch (_) {
    console.log('root: read-only');
  }
})().catch((error) => { console.error(error); process.exit(1); });
"#;

/// A cluster whose default Docker images are the test images (all of them built), with one
/// agent; returns the agent's id.
async fn docker_cluster() -> Result<(TestCluster, String)> {
    tokio::task::spawn_blocking(|| require_engine_with(&TestImage::ALL)).await??;
    let mut cluster = TestCluster::start_with_docker_images(
        ClusterOptions::default(),
        DefaultImages::test_images(),
    )
    .await?;
    // A short agent name keeps the socket path well inside a Unix socket address.
    let agent = cluster.add_agent("dh").await?;
    Ok((cluster, agent.id))
}

/// Fails with every message in `failures` and the log tails, unless there are none.
fn report(cluster: &TestCluster, failures: Vec<String>) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    bail!(
        "{}\n(log tails)\n{}",
        failures.join("\n"),
        cluster.log_tails()
    )
}

/// Runs [`BASH`], [`PYTHON`] and [`NODE`] in Docker with the extra event fields `docker` and
/// checks result, condition, ids, uid and the root file system; returns what went wrong.
async fn helper_jobs(
    cluster: &TestCluster,
    agent: &str,
    docker: Value,
    uid: &str,
    root: &str,
) -> Result<Vec<String>> {
    let cases = [
        (EventSpec::bash("dh-bash", BASH), 3, "bash", true),
        (EventSpec::python("dh-python", PYTHON), 5, "python", false),
        (EventSpec::nodejs("dh-node", NODE), 7, "node", true),
    ];
    let mut started = Vec::new();
    for (spec, n, lang, condition) in cases {
        let spec = spec.target(agent).docker(docker.clone());
        let event_id = cluster.create_event(&spec).await?;
        let run = cluster.run_event(&event_id, Some(json!({"n": n}))).await?;
        let job_id = run.single_job()?;
        started.push((event_id, run.run_id, job_id, n, lang, condition));
    }
    let mut failures = Vec::new();
    for (event_id, run_id, job_id, n, lang, condition) in started {
        let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
        let output = job["output"].as_str().unwrap_or_default().to_owned();
        let what = format!("{lang} job {job_id} in Docker ({docker})");
        if job["status"] != "completed" {
            failures.push(format!("{what} did not complete: {job}"));
            continue;
        }
        if job["result"] != json!({"doubled": n * 2, "lang": lang}) {
            failures.push(format!("{what}: result {} for input {n}", job["result"]));
        }
        if job["condition"] != json!(condition) {
            failures.push(format!("{what}: condition {}", job["condition"]));
        }
        for id in [&job_id, &run_id, &event_id] {
            if !output.contains(id.as_str()) {
                failures.push(format!("{what}: event ids missing ({id}): {output}"));
            }
        }
        if !output.contains(&format!("uid: {uid}\n")) {
            failures.push(format!("{what}: not running as uid {uid}: {output}"));
        }
        if !output.contains(&format!("root: {root}\n")) {
            failures.push(format!(
                "{what}: the root file system is not {root}: {output}"
            ));
        }
        if lang == "bash"
            && !output.contains(
                "without curl and python3: cronium: the Bash helpers need curl or python3",
            )
        {
            failures.push(format!(
                "{what}: no clear message without curl and python3: {output}"
            ));
        }
        if output.contains("UNEXPECTED") {
            failures.push(format!("{what}: {output}"));
        }
    }
    Ok(failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_input_output_condition_and_event_in_every_language() -> Result<()> {
    let (cluster, agent) = docker_cluster().await?;
    let failures = helper_jobs(&cluster, &agent, json!({}), "0", "writable").await?;
    report(&cluster, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_helpers_work_with_a_read_only_root_and_a_non_root_user() -> Result<()> {
    let (cluster, agent) = docker_cluster().await?;
    let failures = helper_jobs(
        &cluster,
        &agent,
        json!({"read_only": true, "user": NOBODY}),
        "65534",
        "read-only",
    )
    .await?;
    report(&cluster, failures)
}

/// The JSON value the setter of `lang` stores and the getters expect back.
fn json_value(lang: &str) -> Value {
    json!({"lang": lang, "n": 42, "list": [1, "two", null, true], "nested": {"pi": 3.5}})
}

const BASH_SET: &str = r#"set -e
. ./cronium.sh
cronium_set_variable dv_bash_json '{"lang": "bash", "n": 42, "list": [1, "two", null, true], "nested": {"pi": 3.5}}'
cronium_set_variable dv_bash_text 'hello from bash'
echo stored
"#;

const PYTHON_SET: &str = r#"import cronium
cronium.set_variable("dv_python_json", {"lang": "python", "n": 42, "list": [1, "two", None, True], "nested": {"pi": 3.5}})
cronium.set_variable("dv_python_text", "hello from python")
print("stored")
"#;

const NODE_SET: &str = r#"const cronium = require('./cronium');
(async () => {
  await cronium.setVariable('dv_node_json', { lang: 'node', n: 42, list: [1, 'two', null, true], nested: { pi: 3.5 } });
  await cronium.setVariable('dv_node_text', 'hello from node');
  console.log('stored');
})().catch((error) => { console.error(error); process.exit(1); });
"#;

/// Bash prints a string variable raw, any other value as JSON, and nothing for an unset one.
const BASH_GET: &str = r#"set -e
. ./cronium.sh
value=$(cronium_get_variable dv_bash_json)
cronium_output "$value"
text=$(cronium_get_variable dv_bash_text)
echo "text: [$text]"
from_node=$(cronium_get_variable dv_node_json)
echo "from node: $from_node"
unset_value=$(cronium_get_variable dv_never_set)
echo "unset: [$unset_value]"
"#;

const PYTHON_GET: &str = r#"import cronium
cronium.output({
    "json": cronium.get_variable("dv_python_json"),
    "text": cronium.get_variable("dv_python_text"),
    "from_bash": cronium.get_variable("dv_bash_json"),
    "unset": cronium.get_variable("dv_never_set"),
})
"#;

const NODE_GET: &str = r#"const cronium = require('./cronium');
(async () => {
  await cronium.output({
    json: await cronium.getVariable('dv_node_json'),
    text: await cronium.getVariable('dv_node_text'),
    from_python: await cronium.getVariable('dv_python_json'),
    unset: await cronium.getVariable('dv_never_set'),
  });
})().catch((error) => { console.error(error); process.exit(1); });
"#;

/// Waits (within one [`JOB_TIMEOUT`] for all of them) for each job to end; a job that did not
/// complete in time becomes a failure naming `step`. Returns the jobs that ended (`Null` for the
/// others).
async fn wait_all(
    cluster: &TestCluster,
    step: &str,
    jobs: &[(String, String)],
    failures: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    let mut finished = Vec::new();
    for (lang, job_id) in jobs {
        let left = deadline.saturating_duration_since(Instant::now());
        let job = match cluster.wait_job_final(job_id, left).await {
            Ok(job) => job,
            Err(error) => {
                let job = cluster.job(job_id).await?;
                failures.push(format!(
                    "the {lang} {step} job {job_id} did not end within {JOB_TIMEOUT:?} ({error:#}): {job}"
                ));
                finished.push(Value::Null);
                continue;
            }
        };
        if job["status"] != "completed" {
            failures.push(format!(
                "the {lang} {step} job {job_id} did not complete: status {} reason {}, output {:?}",
                job["status"], job["reason"], job["output"]
            ));
        }
        finished.push(job);
    }
    Ok(finished)
}

/// Runs each of `specs` once in Docker on `agent` (all started before any is awaited) and waits
/// for them with [`wait_all`].
async fn run_all(
    cluster: &TestCluster,
    agent: &str,
    step: &str,
    specs: Vec<EventSpec>,
    failures: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let mut jobs = Vec::new();
    for spec in specs {
        let lang = spec.kind.clone();
        let job_id = cluster
            .run_single_job(&spec.target(agent).docker(json!({})))
            .await?;
        jobs.push((lang, job_id));
    }
    wait_all(cluster, step, &jobs, failures).await
}

/// `set_variable` in one job, `get_variable` in a later job of another event of the same owner,
/// in every language and across languages (calls the agent forwards to the control plane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_variables_in_every_language() -> Result<()> {
    let (cluster, agent) = docker_cluster().await?;
    let mut failures = Vec::new();

    // One event sets the variables, another event of the same owner reads them in a later job.
    let setters = vec![
        EventSpec::bash("dv-set-bash", BASH_SET),
        EventSpec::python("dv-set-python", PYTHON_SET),
        EventSpec::nodejs("dv-set-node", NODE_SET),
    ];
    run_all(&cluster, &agent, "set_variable", setters, &mut failures).await?;
    if !failures.is_empty() {
        return report(&cluster, failures);
    }
    let getters = vec![
        EventSpec::bash("dv-get-bash", BASH_GET),
        EventSpec::python("dv-get-python", PYTHON_GET),
        EventSpec::nodejs("dv-get-node", NODE_GET),
    ];
    let jobs = run_all(&cluster, &agent, "get_variable", getters, &mut failures).await?;

    let expected = [
        json_value("bash"),
        json!({
            "json": json_value("python"),
            "text": "hello from python",
            "from_bash": json_value("bash"),
            "unset": null,
        }),
        json!({
            "json": json_value("node"),
            "text": "hello from node",
            "from_python": json_value("python"),
            "unset": null,
        }),
    ];
    for ((lang, job), expected) in ["bash", "python", "nodejs"].iter().zip(&jobs).zip(expected) {
        if job["status"] != "completed" {
            continue;
        }
        if job["result"] != expected {
            failures.push(format!(
                "{lang} get_variable: result {} instead of {expected}",
                job["result"]
            ));
        }
    }
    if let Some(bash) = jobs.first().filter(|job| job["status"] == "completed") {
        let output = bash["output"].as_str().unwrap_or_default();
        if !output.contains("text: [hello from bash]\n") {
            failures.push(format!(
                "bash get_variable does not print a string raw: {output:?}"
            ));
        }
        if !output.contains("unset: []\n") {
            failures.push(format!(
                "bash get_variable prints something for an unset variable: {output:?}"
            ));
        }
        let from_node = output
            .lines()
            .find_map(|line| line.strip_prefix("from node: "))
            .and_then(|text| serde_json::from_str::<Value>(text).ok());
        if from_node != Some(json_value("node")) {
            failures.push(format!(
                "bash get_variable does not print a node-set value as its JSON: {output:?}"
            ));
        }
    }
    report(&cluster, failures)
}

/// `notify` from a container in every language reaches the owner's webhook (delivered by the
/// control plane; the containers have no network).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_notify_in_every_language() -> Result<()> {
    let (cluster, agent) = docker_cluster().await?;
    let mut webhook = WebhookListener::start().await?;
    cluster.create_webhook_tool("hook", webhook.url()).await?;
    let mut failures = Vec::new();
    let notifiers = vec![
        EventSpec::bash(
            "dn-bash",
            ". ./cronium.sh\ncronium_notify --tool hook --title bash 'from a container'\n",
        ),
        EventSpec::python(
            "dn-python",
            "import cronium\ncronium.notify('from a container', tool='hook', title='python')\n",
        ),
        EventSpec::nodejs(
            "dn-node",
            "const cronium = require('./cronium');\ncronium.notify('from a container', { title: 'node' }).catch((e) => { console.error(e); process.exit(1); });\n",
        ),
    ];
    run_all(&cluster, &agent, "notify", notifiers, &mut failures).await?;
    if !failures.is_empty() {
        return report(&cluster, failures);
    }
    let mut titles = Vec::new();
    for _ in 0..3 {
        let body = webhook.next_body(JOB_TIMEOUT).await?;
        let payload: Value = serde_json::from_str(&body)?;
        if payload["message"] != "from a container" {
            failures.push(format!("webhook payload {payload}"));
        }
        titles.push(payload["title"].as_str().unwrap_or_default().to_owned());
    }
    titles.sort();
    if titles != ["bash", "node", "python"] {
        failures.push(format!("webhook titles {titles:?}"));
    }
    report(&cluster, failures)
}
