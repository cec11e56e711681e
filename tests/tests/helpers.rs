//! Runtime helpers end-to-end: real jobs in Bash, Python and Node.js use the libraries the agent
//! writes into their work dir and talk to the agent's per-attempt helper endpoint, which answers
//! some calls itself and forwards the others (variables, notifications) to the control plane.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::{EventSpec, TestCluster, WebhookListener};
use serde_json::{Value, json};

/// How long an ordinary job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

const BASH: &str = r#"set -e
. ./cronium.sh
n=$(cronium_input | sed 's/[^0-9]//g')
cronium_output "{\"doubled\": $((n * 2)), \"lang\": \"bash\"}"
cronium_set_condition true
echo "event: $(cronium_event)"
echo "greeting: $(cronium_get_variable greeting)"
echo "settings: $(cronium_get_variable settings)"
echo "unset: [$(cronium_get_variable never_set)]"
cronium_set_variable bash_doubled $((n * 2))
cronium_set_variable bash_text 'two words'
echo "read back: $(cronium_get_variable bash_text)"
if cronium_notify --tool no-such-tool "hello" 2>err.txt; then echo "UNEXPECTED notify"; fi
echo "notify error: $(cat err.txt)"
if cronium_set_condition maybe 2>/dev/null; then echo "UNEXPECTED condition"; fi
"#;

const PYTHON: &str = r#"import cronium
n = cronium.input()["n"]
cronium.output({"doubled": n * 2, "lang": "python"})
cronium.set_condition(False)
event = cronium.event()
print("event:", event["job_id"], event["run_id"], event["event_id"], event["attempt"])
print("greeting:", cronium.get_variable("greeting"))
print("settings:", cronium.get_variable("settings")["retries"])
print("unset:", cronium.get_variable("never_set"))
cronium.set_variable("python_doubled", n * 2)
cronium.set_variable("python_text", "two words")
print("read back:", cronium.get_variable("python_text"))
try:
    cronium.notify("hello", tool="no-such-tool")
    print("UNEXPECTED notify")
except cronium.CroniumError as error:
    print("notify error:", error)
"#;

const NODE: &str = r#"const cronium = require('./cronium');
(async () => {
  const input = await cronium.input();
  await cronium.output({ doubled: input.n * 2, lang: 'node' });
  await cronium.set_condition(true);
  const event = await cronium.event();
  console.log('event:', event.job_id, event.run_id, event.event_id, event.attempt);
  console.log('greeting:', await cronium.get_variable('greeting'));
  console.log('settings:', (await cronium.getVariable('settings')).retries);
  console.log('unset:', await cronium.get_variable('never_set'));
  await cronium.set_variable('node_doubled', input.n * 2);
  await cronium.setVariable('node_text', 'two words');
  console.log('read back:', await cronium.get_variable('node_text'));
  try {
    await cronium.notify('hello', { tool: 'no-such-tool' });
    console.log('UNEXPECTED notify');
  } catch (error) {
    console.log('notify error:', error.message, error instanceof cronium.CroniumError);
  }
})().catch((error) => { console.error(error); process.exit(1); });
"#;

/// Sets a variable through the API.
async fn put_variable(cluster: &TestCluster, name: &str, value: Value) -> Result<()> {
    let response = cluster
        .api()
        .send(
            reqwest::Method::PUT,
            &format!("/api/v1/variables/{name}"),
            Some(&json!({ "value": value })),
        )
        .await?;
    response.expect_status(200, &format!("PUT /variables/{name}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_helper_in_every_language() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    // A short agent name keeps the socket path well inside a Unix socket address.
    let agent = cluster.add_agent("h").await?;
    put_variable(&cluster, "greeting", json!("hello there")).await?;
    put_variable(&cluster, "settings", json!({"retries": 3})).await?;
    let cases = [
        (EventSpec::bash("helpers-bash", BASH), 3, "bash", true),
        (
            EventSpec::python("helpers-python", PYTHON),
            5,
            "python",
            false,
        ),
        (EventSpec::nodejs("helpers-node", NODE), 7, "node", true),
    ];
    let mut started = Vec::new();
    for (spec, n, lang, condition) in cases {
        let event_id = cluster.create_event(&spec.target(&agent.id)).await?;
        let run = cluster.run_event(&event_id, Some(json!({"n": n}))).await?;
        let job_id = run.single_job()?;
        started.push((event_id, run.run_id, job_id, n, lang, condition));
    }
    let mut failures = Vec::new();
    for (event_id, run_id, job_id, n, lang, condition) in started {
        let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
        let output = job["output"].as_str().unwrap_or_default().to_owned();
        let what = format!("{lang} job {job_id}");
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
        let unset = if lang == "bash" {
            "unset: []"
        } else if lang == "python" {
            "unset: None"
        } else {
            "unset: null"
        };
        let settings = if lang == "bash" {
            "settings: {\"retries\":3}"
        } else {
            "settings: 3"
        };
        for expected in [
            "greeting: hello there",
            settings,
            unset,
            "read back: two words",
            "no tool named \"no-such-tool\"",
        ] {
            if !output.contains(expected) {
                failures.push(format!("{what}: {expected:?} missing from: {output}"));
            }
        }
        if output.contains("UNEXPECTED") {
            failures.push(format!("{what}: {output}"));
        }
        // The writes are in the control plane, attributed to the job.
        let variable = cluster
            .api()
            .get_ok(&format!("/api/v1/variables/{lang}_doubled"))
            .await?;
        if variable["value"] != json!(n * 2) || variable["updated_by_job"] != json!(job_id) {
            failures.push(format!("{what}: stored variable {variable}"));
        }
        let text = cluster
            .api()
            .get_ok(&format!("/api/v1/variables/{lang}_text"))
            .await?;
        if text["value"] != json!("two words") {
            failures.push(format!("{what}: stored text variable {text}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{}\n(log tails)\n{}",
            failures.join("\n"),
            cluster.log_tails()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn variables_are_shared_by_the_events_of_one_owner() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("h").await?;
    let writer = EventSpec::bash(
        "writer",
        ". ./cronium.sh\ncronium_set_variable shared '{\"from\": \"bash\", \"list\": [1, 2]}'\n",
    )
    .target(&agent.id);
    let reader = EventSpec::python(
        "reader",
        "import cronium\ncronium.output(cronium.get_variable('shared'))\n",
    )
    .target(&agent.id);
    let written = cluster.run_single_job(&writer).await?;
    let written = cluster.wait_job_final(&written, JOB_TIMEOUT).await?;
    let read = cluster.run_single_job(&reader).await?;
    let read = cluster.wait_job_final(&read, JOB_TIMEOUT).await?;
    if written["status"] != "completed"
        || read["status"] != "completed"
        || read["result"] != json!({"from": "bash", "list": [1, 2]})
    {
        bail!(
            "writer {written}\nreader {read}\n(log tails)\n{}",
            cluster.log_tails()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_reaches_the_owners_webhook_from_every_language() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("h").await?;
    let mut webhook = WebhookListener::start().await?;
    cluster
        .create_webhook_tool("ops-hook", webhook.url())
        .await?;
    let cases = [
        EventSpec::bash(
            "notify-bash",
            ". ./cronium.sh\ncronium_notify --title 'from bash' 'disk almost full'\n",
        ),
        EventSpec::python(
            "notify-python",
            "import cronium\ncronium.notify('disk almost full', title='from python')\n",
        ),
        EventSpec::nodejs(
            "notify-node",
            "const cronium = require('./cronium');\ncronium.notify('disk almost full', { tool: 'ops-hook', title: 'from node' }).catch((e) => { console.error(e); process.exit(1); });\n",
        ),
    ];
    let mut jobs = Vec::new();
    for spec in cases {
        jobs.push(cluster.run_single_job(&spec.target(&agent.id)).await?);
    }
    for job_id in &jobs {
        let job = cluster.wait_job_final(job_id, JOB_TIMEOUT).await?;
        if job["status"] != "completed" {
            bail!("notifying job: {job}\n(log tails)\n{}", cluster.log_tails());
        }
    }
    let mut titles = Vec::new();
    for _ in &jobs {
        let body = webhook.next_body(JOB_TIMEOUT).await?;
        let payload: Value = serde_json::from_str(&body).context("the webhook body is JSON")?;
        if payload["message"] != "disk almost full"
            || !jobs.iter().any(|id| payload["job_id"] == json!(id))
        {
            bail!("webhook payload {payload}");
        }
        titles.push(payload["title"].as_str().unwrap_or_default().to_owned());
    }
    titles.sort();
    if titles != ["from bash", "from node", "from python"] {
        bail!("webhook titles {titles:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_made_while_the_control_plane_is_down_arrive_after_it_returns() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("h").await?;
    let shared = cluster.dir().join("shared");
    std::fs::create_dir_all(&shared)?;
    let (ready, go) = (shared.join("ready"), shared.join("go"));
    let script = format!(
        ". ./cronium.sh\ntouch {ready}\nfor i in $(seq 600); do [ -e {go} ] && break; sleep 0.1; done\n\
         cronium_set_variable offline_write '{{\"n\": 1}}' && echo 'write answered'\n\
         echo \"read back: $(cronium_get_variable offline_write)\"\n\
         cronium_set_variable offline_write '{{\"n\": 2}}'\n",
        ready = ready.display(),
        go = go.display(),
    );
    let job_id = cluster
        .run_single_job(&EventSpec::bash("offline-writer", &script).target(&agent.id))
        .await?;
    wait_for_file(&cluster, &ready).await?;
    // The job runs; take the control plane away, let the script write, then bring it back.
    cluster.kill_control_plane()?;
    std::fs::write(&go, b"go")?;
    let agent_dir = cluster.dir().to_path_buf();
    cluster
        .wait_until(JOB_TIMEOUT, "the script to finish its writes", || {
            let agent_dir = agent_dir.clone();
            async move {
                Ok(find_file(&agent_dir, "helper-writes.jsonl")
                    .and_then(|path| std::fs::read_to_string(path).ok())
                    .filter(|text| text.lines().count() >= 2)
                    .map(|_| ()))
            }
        })
        .await?;
    cluster.start_control_plane_again().await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let output = job["output"].as_str().unwrap_or_default();
    let variable = cluster
        .api()
        .get_ok("/api/v1/variables/offline_write")
        .await?;
    if job["status"] != "completed"
        || !output.contains("write answered")
        || !output.contains("read back: {\"n\":1}")
        || variable["value"] != json!({"n": 2})
        || variable["updated_by_job"] != json!(job_id)
    {
        bail!(
            "job {job}\nvariable {variable}\n(log tails)\n{}",
            cluster.log_tails()
        );
    }
    Ok(())
}

/// The first file called `name` under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|file| file == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_file(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// A Python job that calls the helper endpoint at `socket` with `token` (`None`: its own) and
/// prints `answer: …` or `refused: <message>`.
fn prober(name: &str, socket: &str, token: Option<&str>) -> EventSpec {
    let token_line = match token {
        Some(token) => format!("os.environ['CRONIUM_JOB_TOKEN'] = {token:?}\n"),
        None => String::new(),
    };
    EventSpec::python(
        name,
        &format!(
            "import os\n{token_line}os.environ['CRONIUM_HELPER_SOCKET'] = {socket:?}\nimport cronium\ntry:\n    print('answer:', cronium.event()['job_id'])\nexcept cronium.CroniumError as error:\n    print('refused:', error)\n"
        ),
    )
}

async fn wait_for_file(cluster: &TestCluster, path: &Path) -> Result<String> {
    cluster
        .wait_until(
            JOB_TIMEOUT,
            &format!("{} to appear", path.display()),
            || async { Ok(std::fs::read_to_string(path).ok()) },
        )
        .await
}

async fn output_of(cluster: &TestCluster, spec: EventSpec) -> Result<String> {
    let job_id = cluster.run_single_job(&spec).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    Ok(job["output"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_works_only_for_its_own_job_and_only_while_it_runs() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("h").await?;
    let shared = cluster.dir().join("shared");
    std::fs::create_dir_all(&shared)?;
    let info = shared.join("a.info");
    let go = shared.join("a.go");
    let script = format!(
        "printf '%s\\n%s\\n' \"$CRONIUM_HELPER_SOCKET\" \"$CRONIUM_JOB_TOKEN\" > {dir}/a.tmp\nmv {dir}/a.tmp {info}\nfor i in $(seq 600); do [ -e {go} ] && exit 0; sleep 0.1; done\nexit 1\n",
        dir = shared.display(),
        info = info.display(),
        go = go.display(),
    );
    let job_a = cluster
        .run_single_job(&EventSpec::bash("holder", &script).target(&agent.id))
        .await?;
    let text = wait_for_file(&cluster, &info).await?;
    let mut lines = text.lines();
    let (Some(socket), Some(token_a)) = (lines.next(), lines.next()) else {
        bail!("job A wrote {text:?}");
    };
    if !socket.starts_with('/') || !socket.ends_with("/.cronium/helper.sock") {
        bail!("job A's socket path {socket:?} is not an absolute path to .cronium/helper.sock");
    }
    if token_a.len() != 64 || !token_a.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        bail!("job A's token is not 32 bytes of hex: {token_a:?}");
    }

    // B's own token on A's socket: refused.
    let refused = output_of(
        &cluster,
        prober("other-token", socket, None).target(&agent.id),
    )
    .await?;
    // A's token on A's socket from another job: accepted (the check is the token, not the caller).
    let accepted = output_of(
        &cluster,
        prober("own-token", socket, Some(token_a)).target(&agent.id),
    )
    .await?;
    std::fs::write(&go, b"go")?;
    let job = cluster.wait_job_final(&job_a, JOB_TIMEOUT).await?;
    // After A ended its socket is gone, token or not.
    let after = output_of(
        &cluster,
        prober("after-end", socket, Some(token_a)).target(&agent.id),
    )
    .await?;

    let mut failures = Vec::new();
    if !refused.contains("refused: missing or wrong job token") {
        failures.push(format!("another job's token was not refused: {refused}"));
    }
    if !accepted.contains(&format!("answer: {job_a}")) {
        failures.push(format!(
            "A's own token did not work on A's socket: {accepted}"
        ));
    }
    if job["status"] != "completed" {
        failures.push(format!("job A did not complete: {job}"));
    }
    if !after.contains("refused: cannot reach the Cronium helper endpoint") {
        failures.push(format!("A's socket still answered after A ended: {after}"));
    }
    if !failures.is_empty() {
        bail!(
            "{}\n(log tails)\n{}",
            failures.join("\n"),
            cluster.log_tails()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn helper_values_are_absent_unless_set() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("h").await?;
    let job_id = cluster
        .run_single_job(&EventSpec::bash("plain", "echo plain\n").target(&agent.id))
        .await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let fields = (&job["status"], &job["result"], &job["condition"]);
    if fields != (&json!("completed"), &Value::Null, &Value::Null) {
        bail!("a job that used no helper: {job}");
    }
    let job: Value = cluster.job(&job_id).await.context("job")?;
    if job.get("condition").is_none() {
        bail!("GET /jobs/{{id}} has no condition field: {job}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_events_notify_tells_its_tools_when_real_jobs_fail_and_succeed() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("notify-host").await?;
    let mut webhook = WebhookListener::start().await?;
    cluster
        .create_webhook_tool("ops-hook", webhook.url())
        .await?;
    let mut jobs = Vec::new();
    for (name, script) in [
        (
            "notify-fails",
            "for i in $(seq 1 25); do echo \"line $i\"; done\nexit 3\n",
        ),
        ("notify-works", "echo all good\n"),
    ] {
        let event_id = cluster
            .create_event(&EventSpec::bash(name, script).target(&agent.id))
            .await?;
        cluster
            .api()
            .send(
                reqwest::Method::PATCH,
                &format!("/api/v1/events/{event_id}"),
                Some(&json!({"notify": {"on_failure": "ops-hook", "on_success": "ops-hook"}})),
            )
            .await?
            .expect_status(200, "set notify")?;
        jobs.push(cluster.run_event(&event_id, None).await?.single_job()?);
    }
    for (job_id, expected) in jobs.iter().zip(["failed", "completed"]) {
        let job = cluster.wait_job_final(job_id, JOB_TIMEOUT).await?;
        if job["status"] != expected {
            bail!(
                "job {job}, expected {expected}\n(log tails)\n{}",
                cluster.log_tails()
            );
        }
    }
    let mut seen = Vec::new();
    for _ in &jobs {
        let body = webhook.next_body(JOB_TIMEOUT).await?;
        let payload: Value = serde_json::from_str(&body).context("the webhook body is JSON")?;
        seen.push(payload);
    }
    seen.sort_by_key(|payload| payload["title"].as_str().unwrap_or_default().to_owned());
    let (failed, succeeded) = (&seen[0], &seen[1]);
    let message = failed["message"].as_str().unwrap_or_default();
    if failed["title"] != "cronium: notify-fails failed on notify-host"
        || failed["job_id"] != json!(jobs[0])
        || !message.contains("exit code: 3")
        || !message.ends_with("line 25")
        || message.contains("line 5\n")
    {
        bail!("failure payload {failed}");
    }
    if succeeded["title"] != "cronium: notify-works succeeded on notify-host"
        || succeeded["job_id"] != json!(jobs[1])
        || !succeeded["message"]
            .as_str()
            .unwrap_or_default()
            .ends_with("all good")
    {
        bail!("success payload {succeeded}");
    }
    // One notification per job in the outbox.
    let outbox = cluster
        .api()
        .get_ok("/api/v1/notifications?limit=100")
        .await?;
    for job_id in &jobs {
        let count = outbox
            .as_array()
            .map(|all| all.iter().filter(|n| n["job_id"] == json!(job_id)).count())
            .unwrap_or_default();
        if count != 1 {
            bail!("{count} notifications for job {job_id}: {outbox}");
        }
    }
    Ok(())
}
