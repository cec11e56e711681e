//! `cronium run … --wait` for fan-out runs and `cronium retry RUN_ID`: a live per-host table
//! (host, status, exit code, duration) pushed by `GET /runs/{id}/events`, redrawn in
//! place on a terminal and printed as one line per change otherwise; then the rollout's stop
//! reason and the grouped outputs. The exit code is 0 only when every host completed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use super::client::{ApiArgs, Client};

/// How long to wait before reopening a run stream that dropped.
const RECONNECT: Duration = Duration::from_millis(500);

/// Most lines of a group's sample output printed.
const SAMPLE_LINES: usize = 5;

#[derive(Args, Debug)]
pub struct RetryArgs {
    /// The run whose hosts to retry.
    run: String,
    /// Also retry the hosts that never started (skipped offline, stopped rollout, cancelled
    /// while queued), not only the failed ones.
    #[arg(long)]
    not_started: bool,
    /// Watch the new run until it ends; exit non-zero if a host did not complete.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// `cronium retry RUN_ID`.
pub async fn retry(args: RetryArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let only = if args.not_started {
        "failed_and_not_started"
    } else {
        "failed"
    };
    let run = client
        .post(&format!("/runs/{}/retry", args.run), &json!({"only": only}))
        .await?;
    let run_id = run["run_id"].as_str().context("no run_id in the answer")?;
    let hosts = run["jobs"].as_array().map_or(0, Vec::len);
    println!("run {run_id} retries {hosts} host(s) of run {}", args.run);
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    watch(&client, run_id).await
}

/// Names of agents and servers by id, for the table.
async fn host_names(client: &Client) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for path in ["/agents", "/servers"] {
        if let Ok(Value::Array(items)) = client.get(path).await {
            for item in items {
                if let (Some(id), Some(name)) = (item["id"].as_str(), item["name"].as_str()) {
                    names.insert(id.to_string(), name.to_string());
                }
            }
        }
    }
    names
}

fn host_of(job: &Value, names: &BTreeMap<String, String>) -> String {
    let id = job["agent_id"]
        .as_str()
        .or_else(|| job["server_id"].as_str())
        .unwrap_or("-");
    names.get(id).cloned().unwrap_or_else(|| id.to_string())
}

fn millis(value: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?)
        .ok()
        .map(|time| time.timestamp_millis())
}

/// How long a job ran (or has been running), as text.
fn duration(job: &Value, now: i64) -> String {
    let Some(start) = millis(&job["claimed_at"]).or_else(|| millis(&job["started_at"])) else {
        return "-".into();
    };
    let end = millis(&job["finished_at"]).unwrap_or(now);
    format!("{:.1}s", (end - start).max(0) as f64 / 1000.0)
}

/// One row: host, status (with the reason when it did not complete), exit code, duration.
fn row(job: &Value, names: &BTreeMap<String, String>, now: i64) -> [String; 4] {
    let status = job["status"].as_str().unwrap_or("?");
    let status = match job["reason"].as_str() {
        Some(reason) if status != "completed" && reason != "exit_code" => {
            format!("{status} ({reason})")
        }
        _ => status.to_string(),
    };
    let exit = job["exit_code"]
        .as_i64()
        .map_or_else(|| "-".to_string(), |code| code.to_string());
    [host_of(job, names), status, exit, duration(job, now)]
}

fn format_row(cells: &[String; 4]) -> String {
    format!(
        "{:<24} {:<28} {:<5} {}",
        cells[0], cells[1], cells[2], cells[3]
    )
}

/// The live table: redrawn in place on a terminal, one line per changed host otherwise.
struct Table {
    names: BTreeMap<String, String>,
    tty: bool,
    drawn_lines: usize,
    /// Non-TTY: the last (status, exit code) printed per job.
    printed: BTreeMap<String, (String, String)>,
}

impl Table {
    fn draw(&mut self, jobs: &[Value]) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        let now = chrono::Utc::now().timestamp_millis();
        let mut rows: Vec<(String, [String; 4])> = jobs
            .iter()
            .map(|job| {
                (
                    job["id"].as_str().unwrap_or_default().to_string(),
                    row(job, &self.names, now),
                )
            })
            .collect();
        rows.sort_by(|a, b| a.1[0].cmp(&b.1[0]));
        if self.tty {
            // Back to the table's first line, then redraw it.
            if self.drawn_lines > 0 {
                write!(stdout, "\x1b[{}A", self.drawn_lines)?;
            }
            for (_, cells) in &rows {
                writeln!(stdout, "\x1b[2K{}", format_row(cells))?;
            }
            self.drawn_lines = rows.len();
        } else {
            for (job_id, cells) in &rows {
                let key = (cells[1].clone(), cells[2].clone());
                if self.printed.get(job_id) != Some(&key) {
                    writeln!(stdout, "{}", format_row(cells))?;
                    self.printed.insert(job_id.clone(), key);
                }
            }
        }
        stdout.flush()
    }
}

/// Watches a run until it ends (pushed by `GET /runs/{id}/events`; a dropped stream is
/// reopened, and starts again with the whole run), then prints the summary. Exit code 0 only if
/// every host completed.
pub async fn watch(client: &Client, run_id: &str) -> anyhow::Result<ExitCode> {
    let mut table = Table {
        names: host_names(client).await,
        tty: std::io::stdout().is_terminal(),
        drawn_lines: 0,
        printed: BTreeMap::new(),
    };
    let header = format_row(&[
        "HOST".into(),
        "STATUS".into(),
        "EXIT".into(),
        "DURATION".into(),
    ]);
    println!("{header}");
    let run = loop {
        // The run's jobs in the order the summary lists them.
        let mut jobs: Vec<Value> = Vec::new();
        let end = client
            .events(&format!("/runs/{run_id}/events"), |kind, value| {
                match kind {
                    "run" => jobs = value["jobs"].as_array().cloned().unwrap_or_default(),
                    "end" => {
                        jobs = value["jobs"].as_array().cloned().unwrap_or_default();
                        table.draw(&jobs)?;
                        return Ok(Some(value));
                    }
                    "job" => match jobs.iter_mut().find(|job| job["id"] == value["id"]) {
                        Some(job) => *job = value,
                        None => jobs.push(value),
                    },
                    "error" => anyhow::bail!(
                        "{}",
                        value["message"].as_str().unwrap_or("the run stream failed")
                    ),
                    _ => return Ok(None),
                }
                table.draw(&jobs)?;
                Ok(None)
            })
            .await?;
        if let Some(run) = end {
            break run;
        }
        tokio::time::sleep(RECONNECT).await;
    };
    let full = client.get(&format!("/runs/{run_id}")).await?;
    print_summary(&run, &full)
}

fn print_summary(run: &Value, full: &Value) -> anyhow::Result<ExitCode> {
    let jobs = run["jobs"].as_array().cloned().unwrap_or_default();
    let completed = jobs
        .iter()
        .filter(|job| job["status"] == "completed")
        .count();
    let failed = jobs.iter().filter(|job| job["status"] == "failed").count();
    let other = jobs.len() - completed - failed;
    println!();
    if let Some(reason) = full["rollout"]["stopped_reason"].as_str() {
        println!("rollout stopped: {reason}");
    }
    println!(
        "run {}: {} — {completed} completed, {failed} failed, {other} not run, of {} host(s)",
        run["id"].as_str().unwrap_or_default(),
        run["status"].as_str().unwrap_or("?"),
        jobs.len()
    );
    if let Some(groups) = full["groups"].as_array() {
        for group in groups {
            println!(
                "\n{} host(s): {} exit {}  (output sha256 {})",
                group["count"],
                group["status"].as_str().unwrap_or("?"),
                group["exit_code"]
                    .as_i64()
                    .map_or_else(|| "-".to_string(), |code| code.to_string()),
                group["output_sha256"]
                    .as_str()
                    .map_or("", |sha| &sha[..sha.len().min(12)]),
            );
            let sample = group["sample_output"].as_str().unwrap_or_default();
            let lines: Vec<&str> = sample.trim_end().lines().collect();
            let start = lines.len().saturating_sub(SAMPLE_LINES);
            for line in &lines[start..] {
                println!("  | {line}");
            }
        }
    }
    Ok(if completed == jobs.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
