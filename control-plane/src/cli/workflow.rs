//! `cronium workflow list|create FILE|run NAME [--input JSON] [--wait]`, through the API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{ApiArgs, Client};

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// List workflows.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create a workflow from a JSON file (the body of `POST /api/v1/workflows`: name, nodes,
    /// edges, trigger). Prints its id, and the webhook secret once when the webhook trigger is on.
    Create {
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start a run of the workflow named NAME (or with id NAME).
    Run {
        name: String,
        /// The run's input, as JSON.
        #[arg(long)]
        input: Option<String>,
        /// Wait until the run ends, print each node's state, exit non-zero unless it completed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(command: WorkflowCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkflowCommand::List { api } => {
            let workflows = api.client()?.get("/workflows").await?;
            println!(
                "{:<34} {:<24} {:<6} {:<24} TRIGGERS",
                "ID", "NAME", "NODES", "NEXT RUN"
            );
            for workflow in workflows.as_array().into_iter().flatten() {
                let trigger = &workflow["trigger"];
                let mut triggers = Vec::new();
                if trigger["manual"] == true {
                    triggers.push("manual".to_string());
                }
                if let Some(cron) = trigger["schedule"]["cron"].as_str() {
                    triggers.push(format!("schedule {cron}"));
                }
                if trigger["webhook"] == true {
                    triggers.push("webhook".to_string());
                }
                println!(
                    "{:<34} {:<24} {:<6} {:<24} {}",
                    workflow["id"].as_str().unwrap_or_default(),
                    workflow["name"].as_str().unwrap_or_default(),
                    workflow["nodes"].as_array().map_or(0, Vec::len),
                    workflow["next_run_at"].as_str().unwrap_or("-"),
                    triggers.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCommand::Create { file, api } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let workflow = api.client()?.post("/workflows", &body).await?;
            println!("{}", workflow["id"].as_str().unwrap_or_default());
            if let Some(secret) = workflow["webhook_secret"].as_str() {
                eprintln!(
                    "webhook: POST {} signed with X-Cronium-Signature: sha256=HMAC-SHA256(secret, body)",
                    workflow["webhook_url"].as_str().unwrap_or_default()
                );
                eprintln!("webhook secret (shown once): {secret}");
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCommand::Run {
            name,
            input,
            wait,
            api,
        } => {
            let client = api.client()?;
            let input: Option<Value> = input
                .map(|input| serde_json::from_str(&input).context("--input is not JSON"))
                .transpose()?;
            let workflows = client.get("/workflows").await?;
            let workflow = workflows
                .as_array()
                .into_iter()
                .flatten()
                .find(|workflow| {
                    workflow["name"] == name.as_str() || workflow["id"] == name.as_str()
                })
                .with_context(|| format!("no workflow called {name:?}"))?;
            let id = workflow["id"].as_str().unwrap_or_default();
            let body = match input {
                Some(input) => json!({"input": input}),
                None => json!({}),
            };
            let run = client.post(&format!("/workflows/{id}/runs"), &body).await?;
            let run_id = run["id"].as_str().unwrap_or_default().to_string();
            println!("{run_id}");
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let run = wait_for(&client, &run_id).await?;
            for node in run["nodes"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<10} {}",
                    node["id"].as_str().unwrap_or_default(),
                    node["state"].as_str().unwrap_or_default(),
                    node["reason"].as_str().unwrap_or_default()
                );
            }
            let status = run["status"].as_str().unwrap_or_default();
            println!("workflow run {run_id}: {status}");
            Ok(if status == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Polls the run until it has ended (the API has no stream for workflow runs).
async fn wait_for(client: &Client, run_id: &str) -> anyhow::Result<Value> {
    let mut failures = 0;
    loop {
        match client.get(&format!("/workflow-runs/{run_id}")).await {
            Ok(run) if run["finished_at"].is_string() => return Ok(run),
            Ok(_) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures >= 10 {
                    bail!("could not follow the workflow run: {error:#}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
