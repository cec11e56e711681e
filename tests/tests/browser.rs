//! The web console in a real browser: a control plane and an agent, users with passwords, and
//! scripts under `web/tests/` (playwright-core driving Debian's Chromium). `terminal.browser.mjs`
//! logs in through the form, runs a command in the agent's shell, reloads to re-attach and closes
//! the session; `console.browser.mjs` goes through the app shell's pages as an admin (an agent
//! installed over SSH through a real sshd, an event created in the editor, run, its log watched
//! live, a second run cancelled, the settings pages, a terminal tab in the Console with its
//! recording played back; the control plane records terminals) and as a viewer (no change
//! buttons, the API refuses); `live.browser.mjs` watches lists update without a reload (an agent
//! this test starts when the script asks, a run) and sets a workflow node's own targets.
//! Screenshots go to `$CRONIUM_TEST_ARTIFACTS` (default `target/test-artifacts/`).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium`), Node.js and `web/node_modules` (the control
//! plane's build installs it); without them the test fails and says what to install.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::CLUSTER_MARKER_VAR;
use cronium_e2e::cluster::ClusterOptions;
use cronium_e2e::sshd::{DetachedAgent, Sshd};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole terminal script: launching the browser, logging in, two page loads, a command, a
/// close.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);
/// The whole console script: two logins, every page, an agent installed over SSH, an event
/// created, two runs.
const CONSOLE_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

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

/// Runs one of `web/tests/*.browser.mjs` with `env` (plus the artifacts dir, a fresh Chromium
/// profile and the cluster marker) and fails with its output unless it exits 0; then checks no
/// browser process outlived it.
async fn run_browser_script(
    cluster: &TestCluster,
    script: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<()> {
    BrowserScript::start(cluster, script, env)?
        .finish(cluster, timeout)
        .await
}

/// A browser script running: started by [`BrowserScript::start`], waited for by
/// [`BrowserScript::finish`] (in between, the test may change the cluster). Dropping it kills
/// node (and the cluster kills the browser).
struct BrowserScript {
    child: tokio::process::Child,
    script: String,
    artifacts: PathBuf,
    /// Chromium's profile: new and empty, removed when the test ends however it ends.
    profile: tempfile::TempDir,
}

impl BrowserScript {
    fn start(cluster: &TestCluster, script: &str, env: &[(&str, &str)]) -> Result<BrowserScript> {
        let root = workspace_root();
        let web = root.join("web");
        let artifacts = std::env::var_os("CRONIUM_TEST_ARTIFACTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/test-artifacts"));
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("create {}", artifacts.display()))?;
        let profile = tempfile::Builder::new()
            .prefix("cronium-chromium-")
            .tempdir()
            .context("create the browser profile dir")?;

        let mut command = tokio::process::Command::new("node");
        command
            .arg(web.join("tests").join(script))
            .current_dir(&web)
            .env("CRONIUM_URL", cluster.http_url())
            .env("CRONIUM_TEST_ARTIFACTS", &artifacts)
            .env("CRONIUM_BROWSER_PROFILE", profile.path())
            .env("CHROMIUM", CHROMIUM)
            // Chromium inherits this, so the cluster kills it on drop even if node died first.
            .env(CLUSTER_MARKER_VAR, cluster.marker())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().context("start node")?;
        Ok(BrowserScript {
            child,
            script: script.to_owned(),
            artifacts,
            profile,
        })
    }

    /// Waits until `path` exists (the script asks for something), failing if the script ends
    /// first or after `timeout`.
    async fn wait_for_file(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} ended ({status}) before it created {}",
                    self.script,
                    path.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not create {} within {timeout:?}",
                    self.script,
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn finish(self, cluster: &TestCluster, timeout: Duration) -> Result<()> {
        let BrowserScript {
            child,
            script,
            artifacts,
            profile,
        } = self;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output.context("wait for node")?,
            Err(_) => bail!(
                "{script} did not finish within {timeout:?} (screenshots in {})",
                artifacts.display()
            ),
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{script} stdout:\n{stdout}\nstderr:\n{stderr}");

        assert!(
            output.status.success(),
            "{script} failed in the browser ({}):\n{stderr}\n{stdout}",
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_page_logs_in_runs_a_command_and_reattaches_after_a_reload() -> Result<()> {
    check_prerequisites(&workspace_root().join("web"))?;
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("browser-agent").await?;
    // An admin needs no grant to open a terminal on any agent.
    let password = cluster.cli_user_create("operator", "admin").await?;
    run_browser_script(
        &cluster,
        "terminal.browser.mjs",
        &[
            ("CRONIUM_USERNAME", "operator"),
            ("CRONIUM_PASSWORD", &password),
            ("CRONIUM_AGENT_ID", &agent.id),
        ],
        SCRIPT_TIMEOUT,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_creates_runs_and_streams_an_event_and_a_viewer_changes_nothing() -> Result<()>
{
    check_prerequisites(&workspace_root().join("web"))?;
    // Recording on: the Console page plays back the session it opens (the agent opts in there).
    let mut cluster =
        TestCluster::start_with_args(ClusterOptions::default(), &["--terminal-recording"]).await?;
    // Online when this returns.
    cluster.add_agent("console-agent").await?;
    let admin_password = cluster.cli_user_create("operator", "admin").await?;
    let viewer_password = cluster.cli_user_create("watcher", "viewer").await?;
    // A host to install an agent on over SSH from the console: a real sshd, a signed release.
    cluster.publish_agent_release(None, None).await?;
    let sshd = Sshd::start()?;
    let prefix = cluster.dir().join("remote-prefix");
    let _installed = DetachedAgent::under(&prefix);
    let ssh_port = sshd.port.to_string();
    let private_key = sshd.private_key();
    let prefix_arg = prefix.to_str().context("prefix")?.to_owned();
    run_browser_script(
        &cluster,
        "console.browser.mjs",
        &[
            ("CRONIUM_USERNAME", "operator"),
            ("CRONIUM_PASSWORD", &admin_password),
            ("CRONIUM_VIEWER_USERNAME", "watcher"),
            ("CRONIUM_VIEWER_PASSWORD", &viewer_password),
            ("CRONIUM_AGENT_NAME", "console-agent"),
            ("CRONIUM_SSH_PORT", &ssh_port),
            ("CRONIUM_SSH_USER", &sshd.user),
            ("CRONIUM_SSH_PRIVATE_KEY", &private_key),
            ("CRONIUM_SSH_PREFIX", &prefix_arg),
        ],
        CONSOLE_SCRIPT_TIMEOUT,
    )
    .await
}

/// Lists update without a reload (`GET /changes`): an agent started while the servers page is
/// open turns online, a run triggered while the runs page is open appears and ends completed;
/// and a workflow node's own targets are set in the builder's inspector, saved, shown again
/// after a reload and cleared (`web/tests/live.browser.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_update_without_a_reload_and_a_workflow_node_keeps_its_own_targets() -> Result<()> {
    check_prerequisites(&workspace_root().join("web"))?;
    let mut cluster = TestCluster::start().await?;
    let password = cluster.cli_user_create("operator", "admin").await?;
    // Enrolled but not running: the script watches it come online.
    let agent = cluster.enroll_agent("late-agent", &[]).await?;
    let signals = tempfile::tempdir().context("create the signal dir")?;
    let signal_dir = signals.path().to_str().context("signal dir")?.to_owned();
    let mut script = BrowserScript::start(
        &cluster,
        "live.browser.mjs",
        &[
            ("CRONIUM_USERNAME", "operator"),
            ("CRONIUM_PASSWORD", &password),
            ("CRONIUM_AGENT_NAME", &agent.name),
            ("CRONIUM_SIGNAL_DIR", &signal_dir),
        ],
    )?;
    script
        .wait_for_file(&signals.path().join("start-agent"), SCRIPT_TIMEOUT)
        .await?;
    cluster.spawn_agent(&agent, &Default::default())?;
    script.finish(&cluster, SCRIPT_TIMEOUT).await
}
