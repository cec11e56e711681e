//! `cronium dev`: the whole product in one process on the embedded defaults: the control plane
//! on SQLite plus a local agent, enrolled through the real enrollment endpoint on first start
//! and connected over real QUIC. It also signs the `cronium-agent` built next to it with a
//! release key it keeps in the data dir, so `/install.sh` works on a laptop. Ctrl-C stops the
//! agent first, then the control plane.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::client::CLI_CONFIG_FILE;
use super::{DevArgs, create_api_token, watch_signals};
use crate::crypto::EncryptionKey;
use crate::http::enrollment::{CreateRequest, create_token};
use crate::{ServerConfig, create_private_dir, write_private_file};

/// Name of the generated key file in the data dir.
const KEY_FILE: &str = "encryption.key";

/// The local agent's state dir inside the data dir.
const AGENT_DIR: &str = "agent";

/// The release signing key `cronium dev` generates once (mode 0600; never in the releases dir).
const RELEASE_KEY_FILE: &str = "release-signing.key";

/// Signs the `cronium-agent` next to this executable (the same build) into
/// `<data dir>/releases/<version>/<host target>/` with the data dir's release key, made on first
/// use, so `/install.sh` works on a laptop. Returns the published version.
fn publish_local_agent(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let key_path = data_dir.join(RELEASE_KEY_FILE);
    if !key_path.exists() {
        write_private_file(
            &key_path,
            crate::release::ReleaseKey::generate().to_pem().as_bytes(),
        )?;
    }
    let key = crate::release::ReleaseKey::load(&key_path)?;
    let agent = std::env::current_exe()
        .context("locating this executable")?
        .with_file_name("cronium-agent");
    if !agent.is_file() {
        anyhow::bail!(
            "no cronium-agent next to this executable ({}); build it too (cargo build -p cronium-agent)",
            agent.display()
        );
    }
    crate::release::publish(
        &data_dir.join("releases"),
        &agent,
        &key,
        cronium_agent::VERSION,
        cronium_agent::TARGET,
    )?;
    Ok(cronium_agent::VERSION.to_owned())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    create_private_dir(&args.data_dir)?;
    let key = match std::env::var("ENCRYPTION_KEY") {
        Ok(key) => key,
        Err(_) => {
            let path = args.data_dir.join(KEY_FILE);
            if !path.exists() {
                write_private_file(&path, EncryptionKey::generate_base64().as_bytes())?;
            }
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        database_url: None,
        http_addr: args.http_addr,
        quic_addr: args.quic_addr,
        public_url: None,
        quic_public_addrs: Vec::new(),
        relay_url: None,
        encryption_key: EncryptionKey::from_base64(&key)?,
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        docker_images: args.docker_images.clone().into(),
        delivery: crate::tools::DeliveryOptions::default(),
        terminals: args.terminals.config()?,
        releases: crate::release::ReleaseConfig::default(),
        metrics_token_sha256: None,
    };
    let release = publish_local_agent(&args.data_dir);
    let server_shutdown = CancellationToken::new();
    let running = crate::start(config, server_shutdown.clone()).await?;
    let url = running.local_url();

    // A token for the CLI, kept in the data dir and reused while it is valid.
    let cli_path = args.data_dir.join(CLI_CONFIG_FILE);
    let saved_token = std::fs::read(&cli_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|saved| saved["token"].as_str().map(str::to_string));
    let token = match saved_token {
        Some(token)
            if running
                .state
                .store
                .user_by_api_token(&crate::crypto::sha256_hex(token.as_bytes()))
                .await?
                .is_some() =>
        {
            token
        }
        _ => create_api_token(&running.state.store, "admin", "cronium dev").await?,
    };
    write_private_file(
        &cli_path,
        json!({"url": url, "token": token}).to_string().as_bytes(),
    )?;

    // The local agent: enrolled once through the public enrollment endpoint, then run in-process.
    let agent_dir = args.data_dir.join(AGENT_DIR);
    if !agent_dir.join("agent.json").exists() {
        let request = CreateRequest {
            uses: Some(1),
            ttl_seconds: Some(300),
            ..CreateRequest::default()
        };
        let created = create_token(&running.state, &request, None)
            .await
            .map_err(|error| anyhow::anyhow!("{error:?}"))?;
        cronium_agent::enroll(cronium_agent::EnrollOptions {
            server_url: url.clone(),
            token: created.token,
            ca_sha256: running.ca_sha256(),
            name: Some("local".into()),
            labels: [("dev".to_string(), "true".to_string())].into(),
            state_dir: agent_dir.clone(),
            force: true,
        })
        .await
        .context("enrolling the local agent")?;
    }
    // The control plane may listen elsewhere than at the last start (other flags, port 0).
    let mut identity =
        cronium_agent::Identity::load(&agent_dir).context("loading the local agent's identity")?;
    let quic_addrs = vec![running.quic_addr.to_string()];
    if identity.quic_addrs != quic_addrs || identity.server_url != url {
        identity.quic_addrs = quic_addrs;
        identity.server_url = url.clone();
        identity
            .save_settings()
            .context("updating the local agent's settings")?;
    }
    let agent_shutdown = CancellationToken::new();
    let agent_options = cronium_agent::AgentOptions {
        state_dir: agent_dir,
        capacity: args.agent_capacity,
        max_log_bytes: 64 * 1024 * 1024,
        reconnect_max: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        force_stop: CancellationToken::new(),
        // The dev agent runs jobs as the user running `cronium dev` only.
        allow_run_as: Vec::new(),
    };
    let agent = tokio::spawn(cronium_agent::run(
        agent_options.clone(),
        agent_shutdown.clone(),
    ));

    println!();
    println!("Cronium is running.");
    println!("  console        {url}/ui/");
    println!("  API            {url}/api/v1");
    println!("  QUIC (agents)  {}", running.quic_addr);
    println!("  metrics        {url}/metrics (Prometheus; with the API token below)");
    println!("  data dir       {}", args.data_dir.display());
    if let Some(password) = &running.admin_password {
        println!("  login          admin / {password}   (shown on first start only)");
    }
    println!("  API token      {token}");
    println!("  local agent    \"local\" (labels dev=true)");
    match &release {
        Ok(version) => println!(
            "  install.sh     {url}/install.sh (serves the signed cronium-agent {version}, {})",
            cronium_agent::TARGET
        ),
        Err(problem) => println!("  install.sh     unavailable: {problem:#}"),
    }
    println!();
    println!("Try it (the CLI finds the URL and token in the data dir):");
    println!(
        "  cronium event create hello --script 'echo \"hello from $(hostname)\"' --agents local"
    );
    println!("  cronium run hello --wait");
    println!();
    println!("Press Ctrl-C to stop.");

    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    let mut agent = agent;
    let agent_ended = tokio::select! {
        _ = stop.cancelled() => None,
        ended = &mut agent => Some(ended),
    };
    if let Some(ended) = agent_ended {
        // The agent stopped by itself (e.g. revoked): report it and shut the rest down.
        match ended {
            Ok(Ok(())) => tracing::warn!("the local agent stopped"),
            Ok(Err(error)) => {
                tracing::error!(error = %format!("{error:#}"), "the local agent stopped")
            }
            Err(error) => tracing::error!(%error, "the local agent crashed"),
        }
    } else {
        agent_shutdown.cancel();
        // Dev mode does not keep jobs alive across a stop: kill them rather than wait.
        agent_options.force_stop.cancel();
        match tokio::time::timeout(Duration::from_secs(15), agent).await {
            Ok(Ok(Err(error))) => tracing::error!(
                error = %format!("{error:#}"),
                "the local agent stopped with an error"
            ),
            Err(_) => tracing::warn!("the local agent did not stop within 15 s"),
            _ => {}
        }
    }
    server_shutdown.cancel();
    running.wait().await;
    Ok(())
}
