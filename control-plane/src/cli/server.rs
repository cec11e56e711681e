//! `cronium server …`: servers through the API. `install-agent` bootstraps the agent on a
//! server over SSH (`POST /servers/{id}/install-agent`) and prints the progress as it streams.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::ApiArgs;

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// List servers.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Install the agent on a server over SSH (its stored credentials; host key pinned on first
    /// use), then switch the server to `connection: agent`. Progress is printed as it happens.
    InstallAgent {
        /// The server's name or id.
        name: String,
        /// How the agent runs on the host: systemd (needs root and systemd) or detached (in the
        /// background, for hosts without systemd).
        #[arg(long, default_value = "systemd")]
        service: String,
        /// Install under this prefix (binary in PREFIX/bin) instead of /usr/local.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(command: ServerCommand) -> anyhow::Result<ExitCode> {
    match command {
        ServerCommand::List { api } => {
            let servers = api.client()?.get("/servers").await?;
            println!(
                "{:<34} {:<24} {:<6} {:<34} ADDRESS",
                "ID", "NAME", "VIA", "AGENT"
            );
            for server in servers.as_array().into_iter().flatten() {
                println!(
                    "{:<34} {:<24} {:<6} {:<34} {}",
                    text(&server["id"]),
                    text(&server["name"]),
                    text(&server["connection"]),
                    server["agent_id"].as_str().unwrap_or("-"),
                    text(&server["address"]),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::InstallAgent {
            name,
            service,
            prefix,
            api,
        } => {
            let client = api.client()?;
            let servers = client.get("/servers").await?;
            let matching: Vec<&Value> = servers
                .as_array()
                .into_iter()
                .flatten()
                .filter(|server| server["id"] == name.as_str() || server["name"] == name.as_str())
                .collect();
            let server = match matching.as_slice() {
                [server] => *server,
                [] => bail!("no server named {name:?} (see `cronium server list`)"),
                _ => bail!("several servers are named {name:?}; give its id"),
            };
            let mut body = json!({"service": service});
            if let Some(prefix) = prefix {
                body["prefix"] = json!(prefix);
            }
            let mut outcome = None;
            client
                .post_lines(
                    &format!("/servers/{}/install-agent", text(&server["id"])),
                    &body,
                    |line| match line["type"].as_str() {
                        Some("step") => {
                            eprintln!("[{}] {}", text(&line["step"]), text(&line["message"]))
                        }
                        Some("output") => eprintln!("  | {}", text(&line["line"])),
                        Some("done") => {
                            println!("{}", text(&line["agent_id"]));
                            eprintln!(
                                "agent {} is online; server {name} now runs its jobs through it",
                                text(&line["agent_name"])
                            );
                            outcome = Some(true);
                        }
                        Some("failed") => {
                            eprintln!("error: {}", text(&line["message"]));
                            outcome = Some(false);
                        }
                        _ => {}
                    },
                )
                .await?;
            match outcome {
                Some(true) => Ok(ExitCode::SUCCESS),
                Some(false) => Ok(ExitCode::FAILURE),
                None => bail!(
                    "the answer ended before the install finished (the install goes on on the control plane; see `cronium server list`)"
                ),
            }
        }
    }
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}
