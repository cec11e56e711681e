//! Runtime helpers end-to-end: real jobs in Bash, Python and Node.js use the libraries the agent
//! writes into their work dir and talk to the agent's per-attempt helper endpoint.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::{EventSpec, TestCluster};
use serde_json::{Value, json};

/// How long an ordinary job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The message every forwarded call answers in this version.
const NOT_YET: &str = "get_variable is not available yet on this control plane version";

const BASH: &str = r#"set -e
. ./cronium.sh
n=$(cronium_input | sed 's/[^0-9]//g')
cronium_output "{\"doubled\": $((n * 2)), \"lang\": \"bash\"}"
cronium_set_condition true
echo "event: $(cronium_event)"
if cronium_get_variable answer 2>err.txt; then echo "UNEXPECTED success"; fi
echo "helper error: $(cat err.txt)"
if cronium_set_condition maybe 2>/dev/null; then echo "UNEXPECTED condition"; fi
"#;

const PYTHON: &str = r#"import cronium
n = cronium.input()["n"]
cronium.output({"doubled": n * 2, "lang": "python"})
cronium.set_condition(False)
event = cronium.event()
print("event:", event["job_id"], event["run_id"], event["event_id"], event["attempt"])
try:
    cronium.get_variable("answer")
    print("UNEXPECTED success")
except cronium.CroniumError as error:
    print("helper error:", error)
"#;

const NODE: &str = r#"const cronium = require('./cronium');
(async () => {
  const input = await cronium.input();
  await cronium.output({ doubled: input.n * 2, lang: 'node' });
  await cronium.set_condition(true);
  const event = await cronium.event();
  console.log('event:', event.job_id, event.run_id, event.event_id, event.attempt);
  try {
    await cronium.get_variable('answer');
    console.log('UNEXPECTED success');
  } catch (error) {
    console.log('helper error:', error.message, error instanceof cronium.CroniumError);
  }
})().catch((error) => { console.error(error); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn input_output_condition_event_and_forwarded_calls_in_every_language() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    // A short agent name keeps the socket path well inside a Unix socket address.
    let agent = cluster.add_agent("h").await?;
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
        if !output.contains(&format!("helper error: cronium: {NOT_YET}"))
            && !output.contains(&format!("helper error: {NOT_YET}"))
        {
            failures.push(format!(
                "{what}: no clear error for a forwarded call: {output}"
            ));
        }
        if output.contains("UNEXPECTED") {
            failures.push(format!("{what}: {output}"));
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
