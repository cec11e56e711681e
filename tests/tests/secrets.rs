//! Secrets end-to-end: an event's secret environment variable reaches a real job on a real
//! agent, and its value never appears unmasked in the live log (SSE), the stored log, the job's
//! result or the processes' own logs; `cronium keys rotate` on a stopped cluster; the
//! control plane refuses to start without a key or with the wrong one.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::{EventSpec, TestCluster, WebhookListener, follow_job_logs};
use serde_json::json;
use sha2::{Digest, Sha256};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Echoes the secret in several ways: whole, split across two writes with a pause between them
/// (so the halves travel in different log chunks), on stderr, inside other text, in the `output`
/// helper value and in a notification; proves it had the value by printing its length and
/// SHA-256.
const SCRIPT: &str = r#". ./cronium.sh
echo "plain: $CANARY_TOKEN"
printf 'split: %s' "${CANARY_TOKEN:0:9}"
sleep 1
printf '%s :end\n' "${CANARY_TOKEN:9}"
echo "stderr: [$CANARY_TOKEN]" >&2
echo "inline:x${CANARY_TOKEN}y"
echo "length: ${#CANARY_TOKEN}"
echo "sha256: $(printf %s "$CANARY_TOKEN" | sha256sum | cut -d' ' -f1)"
cronium_output "{\"token\": \"$CANARY_TOKEN\", \"text\": \"t=$CANARY_TOKEN\"}"
cronium_notify --title "title $CANARY_TOKEN" "message $CANARY_TOKEN"
printf 'tail: %s' "${CANARY_TOKEN:0:12}"
"#;

fn canary() -> String {
    format!(
        "canary-{}-secret",
        hex::encode(Sha256::digest(std::process::id().to_be_bytes()))
            .get(..16)
            .unwrap_or("0123456789abcdef")
    )
}

#[tokio::test]
async fn secret_env_reaches_the_job_and_is_masked_everywhere() -> Result<()> {
    let canary = canary();
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("secrets").await?;
    let mut webhook = WebhookListener::start().await?;
    cluster
        .create_webhook_tool("ops-hook", webhook.url())
        .await?;
    let mut body = EventSpec::bash("with-secret", SCRIPT)
        .target(&agent.id)
        .to_json(cluster.marker());
    body["secret_env"] = json!({ "CANARY_TOKEN": canary });
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create the event")?;
    ensure!(
        event["secret_env_names"] == json!(["CANARY_TOKEN"])
            && !event.to_string().contains(&canary),
        "the event answer shows the value or not the name: {event}"
    );
    let event_id = event["id"].as_str().context("event id")?.to_owned();
    let job_id = cluster.run_event(&event_id, None).await?.single_job()?;

    // Live, from the start of the job.
    let followed = follow_job_logs(cluster.api(), &job_id, JOB_TIMEOUT).await?;
    let live = followed.text();
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let stored = String::from_utf8(cluster.job_logs(&job_id).await?)?;

    // The job did receive the value.
    let sha = hex::encode(Sha256::digest(canary.as_bytes()));
    ensure!(job["status"] == "completed", "job: {job}\nlog:\n{stored}");
    ensure!(
        stored.contains(&format!("length: {}\n", canary.len()))
            && stored.contains(&format!("sha256: {sha}\n")),
        "the job did not see the value:\n{stored}"
    );
    // …and it is masked wherever it was printed. stdout and stderr are separate pipes, each
    // masked on its own, so the stderr line may land inside the split line (whose start waits for
    // the rest of the value): take it out before looking at stdout's lines.
    ensure!(
        stored.matches("stderr: [***]\n").count() == 1,
        "stored log lacks the masked stderr line:\n{stored}"
    );
    let stdout_only = stored.replacen("stderr: [***]\n", "", 1);
    for expected in [
        "plain: ***\n",
        "split: *** :end\n",
        "inline:x***y\n",
        // A part of the value is not the value: it is kept (and flushed at the end).
        "tail: canary-",
    ] {
        ensure!(
            stdout_only.contains(expected),
            "stored log lacks {expected:?}:\n{stored}"
        );
    }
    ensure!(
        live == stored,
        "live log differs from the stored one:\nlive:\n{live}\nstored:\n{stored}"
    );
    ensure!(
        !stored.contains(&canary),
        "stored log leaks the value:\n{stored}"
    );
    ensure!(!live.contains(&canary), "live log leaks the value:\n{live}");
    let result = job["result"].to_string();
    ensure!(
        !job.to_string().contains(&canary) && result.contains("***"),
        "the job (result) leaks or lost the value: {job}"
    );
    let run = cluster
        .run(job["run_id"].as_str().context("run id")?)
        .await?;
    ensure!(
        !run.to_string().contains(&canary),
        "the run leaks the value: {run}"
    );
    let shown = cluster
        .api()
        .get_ok(&format!("/api/v1/events/{event_id}"))
        .await?;
    ensure!(
        !shown.to_string().contains(&canary),
        "the event leaks the value: {shown}"
    );
    // The notification the script sent is masked before it leaves the agent.
    let notification = webhook.next_body(JOB_TIMEOUT).await?;
    ensure!(
        notification.contains("message ***") && !notification.contains(&canary),
        "the notification leaks or lost the value: {notification}"
    );
    // The processes' own logs never carry it either.
    let leaking = cluster.logs_containing(&canary);
    ensure!(leaking.is_empty(), "logs with the value: {leaking:?}");

    // Rotation is refused while the control plane runs (it keeps the key in memory): the
    // running lock, a file on SQLite and an advisory lock on PostgreSQL.
    let old_key = cluster.encryption_key().to_owned();
    let old_key_file = cluster.dir().join("old.key");
    std::fs::write(&old_key_file, &old_key)?;
    let data_dir = cluster.data_dir().display().to_string();
    let rotate = [
        "keys",
        "rotate",
        "--data-dir",
        &data_dir,
        "--current-key-file",
        &old_key_file.display().to_string(),
    ];
    let output = cluster.cli(&rotate, Duration::from_secs(60)).await?;
    let refusal = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        !output.status.success() && refusal.contains("a control plane is running"),
        "keys rotate under a running control plane was not refused: {refusal}"
    );
    ensure!(
        std::fs::read_to_string(&old_key_file)?.trim() == old_key,
        "the refused rotation replaced the key file"
    );

    // Rotation on the stopped cluster; the new key starts it again and jobs still get the value.
    cluster.kill_control_plane()?;
    let output = cluster.cli(&rotate, Duration::from_secs(60)).await?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "keys rotate failed: {printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        printed.contains("event secret env vars: 1") && printed.contains("key check: 1"),
        "keys rotate printed: {printed}"
    );
    let new_key = std::fs::read_to_string(&old_key_file)?.trim().to_owned();
    ensure!(new_key != old_key, "the key file was not replaced");
    ensure!(!printed.contains(&new_key), "keys rotate printed the key");

    // The old key is refused with a clear message; no key at all too.
    let refused = serve_once(&cluster, Some(&old_key)).await?;
    ensure!(
        refused.contains("ENCRYPTION_KEY does not match"),
        "the old key was not refused clearly: {refused}"
    );
    let refused = serve_once(&cluster, None).await?;
    ensure!(
        refused.contains("ENCRYPTION_KEY is not set") && refused.contains("plaintext"),
        "a missing key was not refused clearly: {refused}"
    );

    cluster.set_encryption_key(&new_key);
    cluster.start_control_plane_again().await?;
    cluster.wait_agent_online(&agent.id, JOB_TIMEOUT).await?;
    let job_id = cluster.run_event(&event_id, None).await?.single_job()?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let stored = String::from_utf8(cluster.job_logs(&job_id).await?)?;
    ensure!(
        job["status"] == "completed" && stored.contains(&format!("sha256: {sha}\n")),
        "after the rotation the job did not see the value: {job}\n{stored}"
    );
    ensure!(
        !stored.contains(&canary),
        "log leaks the value after rotation:\n{stored}"
    );
    Ok(())
}

/// `cronium event create --secret-env NAME` reads the value from its own environment (never
/// from its command line), the event shows only the name, and the job gets the value masked.
#[tokio::test]
async fn cli_secret_env_comes_from_the_environment() -> Result<()> {
    let canary = canary();
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("cli-secrets").await?;
    let script = r#"echo "seen: $CLI_SECRET"; echo "length: ${#CLI_SECRET}""#;
    let args = [
        "event",
        "create",
        "cli-secret",
        "--script",
        script,
        "--agents",
        agent.id.as_str(),
        "--secret-env",
        "CLI_SECRET",
    ];
    // Without the variable: refused before anything is sent, saying what to do.
    let output = cluster.cli(&args, JOB_TIMEOUT).await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("set the environment variable CLI_SECRET"),
        "created without a value: {:?} {stderr}",
        output.status
    );
    let output = cluster
        .cli_with_env(&args, &[("CLI_SECRET", canary.as_str())], JOB_TIMEOUT)
        .await?;
    ensure!(
        output.status.success(),
        "cronium event create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let event_id = String::from_utf8(output.stdout)?.trim().to_owned();
    let event = cluster
        .api()
        .get_ok(&format!("/api/v1/events/{event_id}"))
        .await?;
    ensure!(
        event["secret_env_names"] == json!(["CLI_SECRET"]) && !event.to_string().contains(&canary),
        "the event shows the value or not the name: {event}"
    );
    let job_id = cluster.run_event(&event_id, None).await?.single_job()?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let stored = String::from_utf8(cluster.job_logs(&job_id).await?)?;
    ensure!(
        job["status"] == "completed"
            && stored.contains("seen: ***\n")
            && stored.contains(&format!("length: {}\n", canary.len()))
            && !stored.contains(&canary),
        "job: {job}\nlog:\n{stored}"
    );
    Ok(())
}

/// Runs `cronium serve` on the cluster's data dir with `key` (none: ENCRYPTION_KEY unset) and
/// expects it to exit with an error; returns its stderr.
async fn serve_once(cluster: &TestCluster, key: Option<&str>) -> Result<String> {
    let mut command = tokio::process::Command::new(cronium_e2e::binary("cronium")?);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("CRONIUM_") || name_text == "ENCRYPTION_KEY" {
            command.env_remove(&name);
        }
    }
    if let Some(key) = key {
        command.env("ENCRYPTION_KEY", key);
    }
    if let Some(url) = cluster.database_url() {
        command.env("CRONIUM_DATABASE_URL", url);
    }
    command
        .args(["serve", "--data-dir"])
        .arg(cluster.data_dir())
        .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().context("spawn cronium serve")?;
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("cronium serve did not exit")??;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        bail!("cronium serve started: {stderr}");
    }
    Ok(stderr)
}
