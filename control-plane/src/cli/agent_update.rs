//! `cronium agent-update set|show|clear`: the desired agent version, through the API
//! (`/api/v1/agent-update`, admins only), and each agent's update state.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::client::ApiArgs;
use super::parse_labels;

#[derive(Subcommand, Debug)]
pub enum AgentUpdateCommand {
    /// Announce VERSION to the agents (they verify it with their pinned release key and refuse
    /// anything not newer than what they run).
    Set {
        /// The version, e.g. 0.2.0 (publish it first: `cronium release publish`).
        version: String,
        /// Only agents carrying all of these labels (k=v,k2=v2).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Share of the (matching) agents, 0-100, chosen by a stable hash of their ids.
        #[arg(long, default_value_t = 100)]
        percentage: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the policy and every agent's version and update state.
    Show {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove the policy (agents keep the version they run).
    Clear {
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(command: AgentUpdateCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentUpdateCommand::Set {
            version,
            labels,
            percentage,
            api,
        } => {
            let client = api.client()?;
            let body = json!({"version": version, "labels": parse_labels(&labels)?, "percentage": percentage});
            let set = client.put("/agent-update", &body).await?;
            print_policy(&set);
        }
        AgentUpdateCommand::Show { api } => {
            let client = api.client()?;
            print_policy(&client.get("/agent-update").await?);
            let agents = client.get("/agents").await?;
            println!();
            println!(
                "{:<24} {:<8} {:<14} {:<12} {:<14} REASON",
                "AGENT", "STATUS", "VERSION", "STATE", "TARGET"
            );
            for agent in agents.as_array().into_iter().flatten() {
                let text = |value: &Value| value.as_str().unwrap_or("-").to_string();
                println!(
                    "{:<24} {:<8} {:<14} {:<12} {:<14} {}",
                    text(&agent["name"]),
                    text(&agent["status"]),
                    text(&agent["version"]),
                    text(&agent["update"]["state"]),
                    text(&agent["update"]["target_version"]),
                    agent["update"]["reason"].as_str().unwrap_or(""),
                );
            }
        }
        AgentUpdateCommand::Clear { api } => {
            api.client()?.delete("/agent-update").await?;
            println!("cleared the agent update policy");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_policy(answer: &Value) {
    let policy = &answer["policy"];
    if policy.is_null() {
        println!("no agent update policy");
        return;
    }
    let labels = policy["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|labels| !labels.is_empty())
        .unwrap_or_else(|| "(all agents)".into());
    let targets = policy["available_targets"]
        .as_array()
        .map(|targets| {
            targets
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "version:     {}",
        policy["version"].as_str().unwrap_or_default()
    );
    println!("labels:      {labels}");
    println!("percentage:  {}", policy["percentage"]);
    println!(
        "published:   {}",
        if targets.is_empty() {
            "(no release of this version in the releases dir)"
        } else {
            &targets
        }
    );
}
