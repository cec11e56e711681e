//! The web console's terminal page in a real browser: a control plane and an agent, a user with a
//! password, and `web/tests/terminal.browser.mjs` (playwright-core driving Debian's Chromium)
//! logging in through the form, running a command in the agent's shell, reloading to re-attach
//! and closing the session. Screenshots go to `$CRONIUM_TEST_ARTIFACTS` (default
//! `target/test-artifacts/`).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium`), Node.js and `web/node_modules` (the control
//! plane's build installs it); without them the test fails and says what to install.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::CLUSTER_MARKER_VAR;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole script: launching the browser, logging in, two page loads, a command, a close.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Fails (never skips) with what to install when the browser, Node.js or the script's packages
/// are missing.
fn check_prerequisites(web: &Path) -> Result<()> {
    if !Path::new(CHROMIUM).is_file() {
        bail!(
            "{CHROMIUM} is missing: install Debian's Chromium (`apt-get install chromium`; .ci/run does)"
        );
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => bail!("`node --version` failed ({})", output.status),
        Err(error) => bail!(
            "Node.js is missing ({error}): install Node.js 20.19 or newer with npm (.ci/run does)"
        ),
    }
    if !web
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        bail!(
            "{} has no playwright-core: run `npm ci` in web/ (building the control plane does it)",
            web.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_page_logs_in_runs_a_command_and_reattaches_after_a_reload() -> Result<()> {
    let root = workspace_root();
    let web = root.join("web");
    check_prerequisites(&web)?;

    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("browser-agent").await?;
    // An admin needs no grant to open a terminal on any agent.
    let password = cluster.cli_user_create("operator", "admin").await?;

    let artifacts = std::env::var_os("CRONIUM_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/test-artifacts"));
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("create {}", artifacts.display()))?;
    // Chromium's profile: new and empty, removed when the test ends however it ends.
    let profile = tempfile::Builder::new()
        .prefix("cronium-chromium-")
        .tempdir()
        .context("create the browser profile dir")?;

    let mut command = tokio::process::Command::new("node");
    command
        .arg(web.join("tests/terminal.browser.mjs"))
        .current_dir(&web)
        .env("CRONIUM_URL", cluster.http_url())
        .env("CRONIUM_USERNAME", "operator")
        .env("CRONIUM_PASSWORD", &password)
        .env("CRONIUM_AGENT_ID", &agent.id)
        .env("CRONIUM_TEST_ARTIFACTS", &artifacts)
        .env("CRONIUM_BROWSER_PROFILE", profile.path())
        .env("CHROMIUM", CHROMIUM)
        // Chromium inherits this, so the cluster kills it on drop even if node died first.
        .env(CLUSTER_MARKER_VAR, cluster.marker())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().context("start node")?;
    let output = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.context("wait for node")?,
        Err(_) => bail!(
            "terminal.browser.mjs did not finish within {SCRIPT_TIMEOUT:?} (screenshots in {})",
            artifacts.display()
        ),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("terminal.browser.mjs stdout:\n{stdout}\nstderr:\n{stderr}");

    assert!(
        output.status.success(),
        "the terminal page failed in the browser ({}):\n{stderr}\n{stdout}",
        output.status
    );
    // The script closes the browser; nothing may keep running with its profile.
    let marker = profile.path().to_string_lossy().into_owned();
    cluster
        .wait_no_process_with_arg(&marker, Duration::from_secs(15))
        .await
        .context("browser processes outlived the script")?;
    Ok(())
}
