//! The one-line installer end to end: `/install.sh` from a real control plane with a signed
//! release, run with `sh` (dash) and bash into a temp `--prefix` with `--no-service`; the agent
//! it starts comes online and runs a job. And the refusals: a tampered binary, a missing or
//! garbage signature, a modified manifest, another key, a binary that does not match its signed
//! manifest, an older version than the installed one, no openssl, a reused token; each with a
//! clear message, a non-zero exit, and nothing placed under the prefix or executed. And the
//! systemd path, with the unit written into a temp `CRONIUM_SYSTEMD_DIR` and a stand-in
//! `systemctl` that runs the unit's `ExecStart`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::cluster::json_str;
use cronium_e2e::release::{agent_target, keygen, run_installer, sign, spawn_installer};
use cronium_e2e::{EventSpec, TestCluster};
use serde_json::json;

/// Both shells the installer must work with (dash is Debian's `sh`).
const SHELLS: [&str; 2] = ["/bin/dash", "/bin/bash"];

/// Waits until an agent called `name` is online and returns its id.
async fn wait_agent_named(cluster: &TestCluster, name: &str) -> Result<String> {
    cluster
        .wait_until(
            Duration::from_secs(120),
            &format!("agent {name} online"),
            || async {
                let agents = cluster.api().get_ok("/api/v1/agents").await?;
                Ok(agents
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|agent| agent["name"] == name && agent["status"] == "online")
                    .and_then(|agent| agent["id"].as_str().map(str::to_owned)))
            },
        )
        .await
}

async fn one_use_token(cluster: &TestCluster) -> Result<String> {
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let command = json_str(&created, "install_command")?;
    ensure!(
        command.starts_with(&format!(
            "curl -fsSL {}/install.sh | sudo sh -s -- --token ",
            cluster.http_url()
        )),
        "install_command: {command}"
    );
    json_str(&created, "token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_a_verified_agent_that_comes_online_and_runs_a_job() -> Result<()> {
    let cluster = TestCluster::start().await?;
    cluster.publish_agent_release(None, None).await?;
    let script = cluster.download_install_script().await?;
    for (index, shell) in SHELLS.iter().enumerate() {
        let token = one_use_token(&cluster).await?;
        let prefix = cluster.dir().join(format!("prefix-{index}"));
        let name = format!("installed-{index}");
        let command = cluster.installer_command(
            shell,
            &script,
            &[
                "--token",
                &token,
                "--name",
                &name,
                "--labels",
                "via=install",
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
            ],
            &[],
        );
        let log = cluster.dir().join(format!("install-{index}.log"));
        let mut installer = spawn_installer(&name, command, &log)?;
        let agent_id = match wait_agent_named(&cluster, &name).await {
            Ok(id) => id,
            Err(error) => bail!("{error:#}\ninstaller log:\n{}", installer.log_tail(40)),
        };
        let binary = prefix.join("bin/cronium-agent");
        ensure!(binary.is_file(), "{} was not installed", binary.display());
        ensure!(
            prefix.join("var/lib/cronium-agent/agent.json").is_file(),
            "the state dir is under the prefix"
        );
        let marker = cronium_e2e::unique_marker("installed");
        let job = cluster
            .run_single_job(
                &EventSpec::bash(&format!("hello-{index}"), &format!("echo {marker}"))
                    .target(&agent_id),
            )
            .await?;
        let finished = cluster
            .wait_job_final(&job, Duration::from_secs(60))
            .await?;
        ensure!(finished["status"] == "completed", "job: {finished}");
        ensure!(
            finished["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&marker),
            "job output: {finished}"
        );

        // Running it again is safe: same version kept, enrollment skipped (no token needed).
        installer.kill()?;
        let again = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
                "--version",
                "0.0.0-does-not-exist",
            ],
            &[],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&again.stderr);
        ensure!(
            !again.status.success() && stderr.contains("cannot download"),
            "a missing version is refused: {stderr}"
        );
        let rerun_log = cluster.dir().join(format!("install-{index}-again.log"));
        let mut rerun = spawn_installer(
            &format!("{name} again"),
            cluster.installer_command(
                shell,
                &script,
                &[
                    "--prefix",
                    prefix.to_str().context("utf-8 path")?,
                    "--no-service",
                ],
                &[],
            ),
            &rerun_log,
        )?;
        let text = cluster
            .wait_until(
                Duration::from_secs(60),
                "the second run to start the agent",
                || async {
                    let text = std::fs::read_to_string(&rerun_log)?;
                    Ok(text
                        .contains("starting the agent in the foreground")
                        .then_some(text))
                },
            )
            .await?;
        ensure!(
            text.contains("is installed already: keeping it") && text.contains("already enrolled"),
            "second run: {text}"
        );
        ensure!(
            rerun.try_wait()?.is_none(),
            "the second run's agent exited: {text}"
        );
        rerun.kill()?;
    }
    Ok(())
}

/// Everything under `dir`, for "nothing was placed here" checks.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_refuses_tampered_unsigned_foreign_and_older_releases() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let keys = cluster.publish_agent_release(None, None).await?;
    let target = agent_target()?;
    let releases = cluster.releases_dir();
    let script = cluster.download_install_script().await?;
    let other_key = keygen(&cluster.dir().join("other-key")).await?;

    // Each bad release is a script that would leave a trace if it were ever executed.
    let ran = cluster.dir().join("unverified-binary-ran");
    let evil = format!("#!/bin/sh\ntouch {}\n", ran.display());
    let make = |version: &str| -> Result<PathBuf> {
        let dir = releases.join(version).join(&target);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("cronium-agent");
        std::fs::write(&file, &evil)?;
        Ok(file)
    };
    let with = |file: &Path, suffix: &str| {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };

    // 0.3.1: binary modified after signing.
    let file = make("0.3.1")?;
    sign(&file, &keys.private, "0.3.1", &target).await?;
    std::fs::write(&file, format!("{evil}# tampered\n"))?;
    // 0.3.2: signature missing.
    let file = make("0.3.2")?;
    sign(&file, &keys.private, "0.3.2", &target).await?;
    std::fs::remove_file(with(&file, ".sig"))?;
    // 0.3.3: signature garbage.
    let file = make("0.3.3")?;
    sign(&file, &keys.private, "0.3.3", &target).await?;
    std::fs::write(with(&file, ".sig"), b"garbage")?;
    // 0.3.4: manifest modified after signing (another sha256).
    let file = make("0.3.4")?;
    sign(&file, &keys.private, "0.3.4", &target).await?;
    let manifest_path = with(&file, ".manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let sha = cronium_e2e::sha256_hex(evil.as_bytes());
    std::fs::write(
        &manifest_path,
        manifest.replace(&sha, &cronium_e2e::sha256_hex(b"something else")),
    )?;
    // 0.3.5: everything signed with another key.
    let file = make("0.3.5")?;
    sign(&file, &other_key.private, "0.3.5", &target).await?;
    // 0.3.6: both signatures valid, but the binary is not the one the manifest describes.
    let file = make("0.3.6")?;
    sign(&file, &keys.private, "0.3.6", &target).await?;
    let other_binary = cluster.dir().join("other-binary");
    std::fs::write(&other_binary, format!("{evil}# another build\n"))?;
    sign(&other_binary, &keys.private, "0.3.6", &target).await?;
    std::fs::copy(&other_binary, &file)?;
    std::fs::copy(with(&other_binary, ".sig"), with(&file, ".sig"))?;

    let cases = [
        ("0.3.1", "the signature of the agent binary does not verify"),
        ("0.3.2", "cannot download"),
        ("0.3.3", "the signature of the agent binary does not verify"),
        (
            "0.3.4",
            "the signature of the release manifest does not verify",
        ),
        (
            "0.3.5",
            "the signature of the release manifest does not verify",
        ),
        ("0.3.6", "sha256 differs from the signed manifest"),
    ];
    for shell in SHELLS {
        for (version, expected) in cases {
            let prefix = cluster
                .dir()
                .join(format!("bad-{version}-{}", shell.replace('/', "_")));
            let output = run_installer(cluster.installer_command(
                shell,
                &script,
                &[
                    "--prefix",
                    prefix.to_str().context("utf-8 path")?,
                    "--no-service",
                    "--version",
                    version,
                ],
                &[("CRONIUM_ENROLL_TOKEN", "cre_never-used")],
            ))
            .await?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(
                !output.status.success(),
                "{shell}: release {version} was accepted: {stderr}"
            );
            ensure!(
                stderr.contains(expected) && stderr.contains("error:"),
                "{shell}: release {version}: expected {expected:?}, got: {stderr}"
            );
            let placed = files_under(&prefix);
            ensure!(
                placed.is_empty(),
                "{shell}: release {version} left files under the prefix: {placed:?}"
            );
            ensure!(
                !ran.exists(),
                "{shell}: the unverified binary of {version} was executed"
            );
        }

        // No openssl on the PATH: a clear refusal before anything is downloaded.
        let empty_path = cluster.dir().join("empty-path");
        std::fs::create_dir_all(&empty_path)?;
        let prefix = cluster.dir().join("no-openssl");
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
            ],
            &[
                ("CRONIUM_ENROLL_TOKEN", "cre_never-used"),
                ("PATH", empty_path.to_str().context("utf-8 path")?),
            ],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("openssl not found"),
            "{shell} without openssl: {stderr}"
        );
        ensure!(
            files_under(&prefix).is_empty(),
            "nothing placed without openssl"
        );
    }

    // A real install of the current version, then: an older signed version is refused, and a
    // used-up token is refused with nothing left behind.
    let token = one_use_token(&cluster).await?;
    let prefix = cluster.dir().join("installed");
    let prefix_text = prefix.to_str().context("utf-8 path")?.to_owned();
    let log = cluster.dir().join("install-real.log");
    let current = cronium_e2e_version(&cronium_e2e::binary("cronium-agent")?)?;
    let mut installer = spawn_installer(
        "installer",
        cluster.installer_command(
            SHELLS[0],
            &script,
            &[
                "--name",
                "real",
                "--prefix",
                &prefix_text,
                "--no-service",
                "--version",
                &current,
            ],
            &[("CRONIUM_ENROLL_TOKEN", &token)],
        ),
        &log,
    )?;
    if let Err(error) = wait_agent_named(&cluster, "real").await {
        bail!("{error:#}\ninstaller log:\n{}", installer.log_tail(40));
    }
    installer.kill()?;
    let binary = prefix.join("bin/cronium-agent");
    let before = cronium_e2e::sha256_hex(&std::fs::read(&binary)?);
    let older = releases.join("0.0.1").join(&target);
    std::fs::create_dir_all(&older)?;
    std::fs::write(older.join("cronium-agent"), &evil)?;
    sign(
        &older.join("cronium-agent"),
        &keys.private,
        "0.0.1",
        &target,
    )
    .await?;
    for shell in SHELLS {
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                &prefix_text,
                "--no-service",
                "--version",
                "0.0.1",
            ],
            &[],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("downgrades are refused"),
            "{shell}: downgrade: {stderr}"
        );
        ensure!(
            cronium_e2e::sha256_hex(&std::fs::read(&binary)?) == before,
            "the installed binary changed"
        );
        ensure!(!ran.exists(), "the older binary was executed");
        let leftovers: Vec<_> = files_under(&prefix.join("bin"))
            .into_iter()
            .filter(|path| path != &binary)
            .collect();
        ensure!(leftovers.is_empty(), "left in bin: {leftovers:?}");

        let reused = cluster
            .dir()
            .join(format!("reused-{}", shell.replace('/', "_")));
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                reused.to_str().context("utf-8 path")?,
                "--no-service",
                "--version",
                &current,
            ],
            &[("CRONIUM_ENROLL_TOKEN", &token)],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success()
                && stderr.contains("already been used")
                && stderr.contains("enrollment was refused"),
            "{shell}: reused token: {stderr}"
        );
        ensure!(
            !reused.join("bin/cronium-agent").exists(),
            "{shell}: a refused enrollment left the binary installed"
        );
    }
    Ok(())
}

/// The version an installed agent reports.
fn cronium_e2e_version(binary: &Path) -> Result<String> {
    let output = std::process::Command::new(binary).arg("version").output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("cronium-agent version output")
}

/// A stand-in for `systemctl`, first on the installer's `PATH`: it records every call (one line
/// of arguments each) in `DIR/calls` and does what systemd would do with the unit the installer
/// wrote: `restart` runs the unit's `ExecStart` line (split on blanks, clean environment) in the
/// background in its own session, its pid in `DIR/pid` (and every pid it started in
/// `DIR/started`); `stop` and `disable --now` SIGTERM it and wait for it. Anything it does not
/// know fails, so an unexpected call fails the installer. `is-system-running` answers `STATE`.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
set -u
dir='@DIR@'
unit='@UNIT_DIR@/cronium-agent.service'
printf '%s\n' "$*" >>"$dir/calls"
alive() {
	[ -r "/proc/$1/stat" ] || return 1
	state=$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)
	[ "$state" != Z ] && [ "$state" != X ]
}
stop() {
	[ -f "$dir/pid" ] || return 0
	pid=$(cat "$dir/pid")
	kill -TERM "$pid" 2>/dev/null || true
	tries=0
	while alive "$pid" && [ "$tries" -lt 300 ]; do
		sleep 0.1
		tries=$((tries + 1))
	done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$dir/pid"
}
start() {
	command=$(sed -n 's/^ExecStart=//p' "$unit")
	if [ -z "$command" ]; then
		echo "fake systemctl: no ExecStart in $unit" >&2
		exit 1
	fi
	set -f
	# shellcheck disable=SC2086
	setsid env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		'@MARKER_VAR@=@MARKER@' $command </dev/null >>"$dir/agent.log" 2>&1 &
	echo "$!" >"$dir/pid"
	echo "$!" >>"$dir/started"
}
case "$*" in
is-system-running)
	echo '@STATE@'
	[ '@STATE@' = running ]
	;;
daemon-reload) ;;
"enable cronium-agent.service")
	if [ ! -f "$unit" ]; then
		echo "fake systemctl: $unit does not exist" >&2
		exit 1
	fi
	;;
"restart cronium-agent.service")
	stop
	start
	;;
"disable --now cronium-agent.service") stop ;;
*)
	echo "fake systemctl: unexpected call: $*" >&2
	exit 1
	;;
esac
"#;

/// One fake `systemctl` (see [`FAKE_SYSTEMCTL`]) and what it recorded. Dropping it SIGKILLs every
/// process it started that still runs.
struct FakeSystemd {
    dir: PathBuf,
    unit_dir: PathBuf,
}

impl FakeSystemd {
    fn new(cluster: &TestCluster, name: &str, unit_dir: &Path, state: &str) -> Result<FakeSystemd> {
        use std::os::unix::fs::PermissionsExt;
        let dir = cluster.dir().join(name);
        std::fs::create_dir_all(dir.join("bin"))?;
        let script = FAKE_SYSTEMCTL
            .replace("@DIR@", dir.to_str().context("utf-8 path")?)
            .replace("@UNIT_DIR@", unit_dir.to_str().context("utf-8 path")?)
            .replace("@MARKER_VAR@", cronium_e2e::cluster::CLUSTER_MARKER_VAR)
            .replace("@MARKER@", cluster.marker())
            .replace("@STATE@", state);
        let path = dir.join("bin/systemctl");
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(FakeSystemd {
            dir,
            unit_dir: unit_dir.to_path_buf(),
        })
    }

    /// The installer's environment: this `systemctl` first on the `PATH`, the unit dir.
    fn env(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            (
                "PATH",
                format!(
                    "{}:{}",
                    self.dir.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            (
                "CRONIUM_SYSTEMD_DIR",
                self.unit_dir.to_str().context("utf-8 path")?.to_owned(),
            ),
        ])
    }

    fn unit(&self) -> PathBuf {
        self.unit_dir.join("cronium-agent.service")
    }

    /// Every call so far, one string of arguments each.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The pid of the running service, if it runs.
    fn service_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn agent_log(&self) -> String {
        cronium_e2e::process::log_tail(&self.dir.join("agent.log"), 40)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        let started = std::fs::read_to_string(self.dir.join("started")).unwrap_or_default();
        for pid in started
            .lines()
            .filter_map(|line| line.trim().parse::<i32>().ok())
        {
            let is_agent = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("cronium-agent"));
            if is_agent {
                // SAFETY: plain syscall on a pid this fake started that still runs the agent.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie nobody reaped).
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next()?.chars().next()
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The process's arguments.
fn process_args(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The agents called `name`.
async fn agents_named(cluster: &TestCluster, name: &str) -> Result<Vec<serde_json::Value>> {
    let agents = cluster.api().get_ok("/api/v1/agents").await?;
    Ok(agents
        .as_array()
        .into_iter()
        .flatten()
        .filter(|agent| agent["name"] == name)
        .cloned()
        .collect())
}

async fn run_job_on(cluster: &TestCluster, agent_id: &str, name: &str) -> Result<()> {
    let marker = cronium_e2e::unique_marker(name);
    let job = cluster
        .run_single_job(&EventSpec::bash(name, &format!("echo {marker}")).target(agent_id))
        .await?;
    let finished = cluster
        .wait_job_final(&job, Duration::from_secs(60))
        .await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&marker),
        "job {name}: {finished}"
    );
    Ok(())
}

/// The systemd path of `install.sh`, with a `systemctl` that really runs the unit the installer
/// wrote (see [`FAKE_SYSTEMCTL`]) and `CRONIUM_SYSTEMD_DIR` pointing into the test's dir: the
/// unit's content (and `systemd-analyze verify` of it), the calls, the agent the unit starts
/// online and running a job, a second run that restarts the same agent, `--uninstall`; and the
/// refusals when systemd does not run or the unit dir is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_starts_restarts_and_uninstalls_the_systemd_service() -> Result<()> {
    let cluster = TestCluster::start().await?;
    cluster.publish_agent_release(None, None).await?;
    let script = cluster.download_install_script().await?;
    let unit_dir = cluster.dir().join("systemd-system");
    std::fs::create_dir_all(&unit_dir)?;
    let prefix = cluster.dir().join("svc-prefix");
    let prefix_text = prefix.to_str().context("utf-8 path")?.to_owned();
    let state_dir = prefix.join("var/lib/cronium-agent");
    let bin = prefix.join("bin/cronium-agent");

    // Refused before anything is downloaded: systemctl present but systemd not running (as in a
    // container), and a unit dir that does not exist.
    let offline = FakeSystemd::new(&cluster, "systemctl-offline", &unit_dir, "offline")?;
    let missing = FakeSystemd::new(
        &cluster,
        "systemctl-no-unit-dir",
        &cluster.dir().join("no-such-dir"),
        "running",
    )?;
    for (fake, expected) in [
        (&offline, "systemd is not running on this host"),
        (&missing, "no-such-dir does not exist"),
    ] {
        let mut env = fake.env()?;
        env.push(("CRONIUM_ENROLL_TOKEN", "cre_never-used".into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let output = run_installer(cluster.installer_command(
            "/bin/dash",
            &script,
            &["--prefix", &prefix_text],
            &env,
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains(expected) && stderr.contains("error:"),
            "expected {expected:?}: {stderr}"
        );
        ensure!(
            fake.calls() == ["is-system-running"],
            "calls: {:?}",
            fake.calls()
        );
        ensure!(files_under(&prefix).is_empty(), "nothing is installed");
        ensure!(files_under(&unit_dir).is_empty(), "no unit is written");
    }

    let systemd = FakeSystemd::new(&cluster, "systemctl", &unit_dir, "running")?;
    let env = systemd.env()?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let token = one_use_token(&cluster).await?;
    let output = run_installer(cluster.installer_command(
        "/bin/dash",
        &script,
        &[
            "--token",
            &token,
            "--name",
            "svc",
            "--labels",
            "via=systemd",
            "--prefix",
            &prefix_text,
        ],
        &env,
    ))
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && stderr.contains("the cronium-agent service is running"),
        "install: {stderr}"
    );

    // The unit is the packaged one with the paths filled in, and systemd's own parser accepts it.
    let written = std::fs::read_to_string(systemd.unit())?;
    let packaged = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/cronium-agent.service"),
    )?;
    let state_text = state_dir.to_str().context("utf-8 path")?;
    let bin_text = bin.to_str().context("utf-8 path")?;
    let expected = packaged
        .replace("@BIN@", bin_text)
        .replace("@BIN_DIR@", &format!("{prefix_text}/bin"))
        .replace("@STATE_DIR@", state_text);
    ensure!(
        written.trim_end() == expected.trim_end(),
        "the unit differs from packaging/cronium-agent.service (rebuild cronium?):\n{written}"
    );
    let lines: Vec<&str> = written.lines().collect();
    for line in [
        format!("ExecStart={bin_text} run --state-dir {state_text}").as_str(),
        format!("ReadWritePaths={state_text} {prefix_text}/bin").as_str(),
        "Type=simple",
        "Restart=on-failure",
        "KillMode=mixed",
        "Delegate=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictSUIDSGID=yes",
        "UMask=0077",
        "WantedBy=multi-user.target",
    ] {
        ensure!(lines.contains(&line), "the unit lacks {line:?}:\n{written}");
    }
    ensure!(
        !written.contains('@') && !lines.iter().any(|line| line.starts_with("User=")),
        "placeholders left, or a User= line (the agent runs as root):\n{written}"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(systemd.unit())?.permissions());
    ensure!(mode & 0o777 == 0o644, "unit mode {mode:o}");
    let verified = tokio::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(systemd.unit())
        .output()
        .await
        .context("systemd-analyze (Debian: apt-get install systemd) must be installed")?;
    ensure!(
        verified.status.success() && verified.stderr.is_empty() && verified.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let sequence = [
        "is-system-running",
        "daemon-reload",
        "enable cronium-agent.service",
        "restart cronium-agent.service",
    ];
    ensure!(systemd.calls() == sequence, "calls: {:?}", systemd.calls());

    // The agent systemd started is the unit's ExecStart; it comes online and runs a job.
    let first_pid = systemd
        .service_pid()
        .context("the service was not started")?;
    ensure!(
        process_args(first_pid) == [bin_text, "run", "--state-dir", state_text],
        "the service runs {:?}",
        process_args(first_pid)
    );
    let agent_id = match wait_agent_named(&cluster, "svc").await {
        Ok(id) => id,
        Err(error) => bail!("{error:#}\nagent log:\n{}", systemd.agent_log()),
    };
    run_job_on(&cluster, &agent_id, "under-systemd").await?;

    // A second run (bash this time, no token: enrolled already) keeps the binary and the identity,
    // rewrites the same unit and restarts the service: still one agent process, one agent.
    let output = run_installer(cluster.installer_command(
        "/bin/bash",
        &script,
        &["--prefix", &prefix_text],
        &env,
    ))
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success()
            && stderr.contains("is installed already: keeping it")
            && stderr.contains("already enrolled"),
        "second run: {stderr}"
    );
    ensure!(
        std::fs::read_to_string(systemd.unit())? == written,
        "the second run wrote another unit"
    );
    let twice: Vec<&str> = sequence.iter().chain(sequence.iter()).copied().collect();
    ensure!(systemd.calls() == twice, "calls: {:?}", systemd.calls());
    let second_pid = systemd
        .service_pid()
        .context("the service is not running")?;
    ensure!(
        second_pid != first_pid && !process_alive(first_pid) && process_alive(second_pid),
        "restart: first {first_pid}, second {second_pid}"
    );
    let running: Vec<_> = cronium_e2e::process::live_processes_with_arg(bin_text)
        .into_iter()
        .map(|process| process.pid)
        .collect();
    ensure!(running == [second_pid], "agent processes: {running:?}");
    let same = cluster
        .wait_until(
            Duration::from_secs(60),
            "the restarted agent online",
            || async {
                let agents = agents_named(&cluster, "svc").await?;
                Ok((agents.len() == 1 && agents[0]["status"] == "online").then_some(agents))
            },
        )
        .await?;
    ensure!(
        same[0]["id"] == agent_id.as_str(),
        "another identity: {same:?}"
    );
    run_job_on(&cluster, &agent_id, "after-restart").await?;

    // --uninstall: the service is stopped and disabled, the unit and the binary removed, the
    // identity kept (no --purge); the control plane sees the agent go.
    let output = run_installer(cluster.installer_command(
        "/bin/dash",
        &script,
        &["--uninstall", "--prefix", &prefix_text],
        &env,
    ))
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && stderr.contains("removed the cronium-agent service"),
        "uninstall: {stderr}"
    );
    let mut expected_calls = twice.clone();
    expected_calls.extend(["disable --now cronium-agent.service", "daemon-reload"]);
    ensure!(
        systemd.calls() == expected_calls,
        "calls: {:?}",
        systemd.calls()
    );
    ensure!(!systemd.unit().exists(), "the unit was not removed");
    ensure!(!bin.exists(), "the binary was not removed");
    ensure!(
        !process_alive(second_pid) && systemd.service_pid().is_none(),
        "the agent still runs after --uninstall"
    );
    ensure!(
        cronium_e2e::process::live_processes_with_arg(bin_text).is_empty(),
        "an agent process is left"
    );
    ensure!(
        state_dir.join("agent.json").is_file(),
        "the identity is kept without --purge"
    );
    cluster
        .wait_until(Duration::from_secs(60), "the agent offline", || async {
            let agents = agents_named(&cluster, "svc").await?;
            Ok((agents.len() == 1 && agents[0]["status"] != "online").then_some(()))
        })
        .await?;
    Ok(())
}
