//! The fan-out phase's peer: a Salt master and N minions (PyPI `salt`) on 127.0.0.1, run as the
//! current user from a virtualenv that is created once and reused (`--salt-venv`). Every daemon
//! runs in the foreground in a process group of its own under a [`ChildGuard`], with a config
//! dir, `root_dir` (keys, cache, sockets, logs) and ports of its own, so stopping the guard stops
//! it and the workers it forked, also on errors and Ctrl-C. Keys are accepted by the master
//! (`auto_accept`), and a fleet counts as up once `salt -L IDS test.ping` answers for every
//! minion.
//!
//! A fan-out is timed two ways: the `salt` CLI in a fresh process each time (how operators use
//! it), and `salt.client.LocalClient().cmd(…)` inside one long-lived Python process
//! (`salt_client.py`; the time is taken inside that process around the call), the fairer peer
//! for an API client.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::procs::{ChildGuard, run_output};

/// The long-lived LocalClient driver.
const CLIENT_SCRIPT: &str = include_str!("salt_client.py");

/// How long installing Salt into the virtualenv may take (it builds a wheel or two).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// How long the master may take to listen, and the minions to answer `test.ping`.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one timed fan-out (CLI or API) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A virtualenv with Salt in it.
#[derive(Debug, Clone)]
pub struct SaltInstall {
    /// The virtualenv's `bin` dir.
    pub bin: PathBuf,
    /// `salt.version.__version__`.
    pub version: String,
    /// The interpreter's version.
    pub python: String,
}

/// The Salt and Python versions in `venv`, if Salt imports there.
async fn installed_version(venv: &Path) -> Option<(String, String)> {
    let mut probe = tokio::process::Command::new(venv.join("bin/python"));
    probe.args([
        "-c",
        "import sys, salt.version; print(salt.version.__version__); print(sys.version.split()[0])",
    ]);
    let output = run_output("the Salt version probe", probe, Duration::from_secs(60))
        .await
        .ok()?;
    let mut lines = output.lines();
    Some((
        lines.next()?.trim().to_owned(),
        lines.next()?.trim().to_owned(),
    ))
}

/// Makes sure `venv` holds Salt: reused if Salt imports there, otherwise (re)created with
/// `python -m venv` and `pip install spec`. The error says exactly which step failed and how.
pub async fn ensure_installed(
    venv: &Path,
    python: &str,
    spec: &str,
) -> anyhow::Result<SaltInstall> {
    if let Some((version, python)) = installed_version(venv).await {
        return Ok(SaltInstall {
            bin: venv.join("bin"),
            version,
            python,
        });
    }
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the broken virtualenv {}", venv.display()))?;
    }
    let mut create = tokio::process::Command::new(python);
    create.args(["-m", "venv"]).arg(venv);
    run_output(
        &format!("{python} -m venv {}", venv.display()),
        create,
        Duration::from_secs(120),
    )
    .await?;
    let mut install = tokio::process::Command::new(venv.join("bin/pip"));
    install.args(["install", "--quiet", spec]);
    if let Err(error) = run_output(&format!("pip install {spec}"), install, INSTALL_TIMEOUT).await {
        // A half-installed virtualenv would be "reused" next time only if Salt imports; remove
        // it anyway so the next run starts clean.
        let _ = std::fs::remove_dir_all(venv);
        return Err(error);
    }
    let (version, python) = installed_version(venv).await.with_context(|| {
        format!(
            "pip installed {spec} into {}, but `import salt` fails there",
            venv.display()
        )
    })?;
    Ok(SaltInstall {
        bin: venv.join("bin"),
        version,
        python,
    })
}

/// A free TCP port on 127.0.0.1 (bound, then released for the daemon to take).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The current user's name (Salt's `user` setting must be the user it runs as).
fn current_user() -> anyhow::Result<String> {
    let output = Command::new("id")
        .arg("-un")
        .output()
        .context("cannot run id -un")?;
    let name = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || name.is_empty() {
        bail!("id -un did not print a user name");
    }
    Ok(name)
}

/// The long-lived `LocalClient` process.
struct ApiClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    log: PathBuf,
}

impl ApiClient {
    async fn start(install: &SaltInstall, root: &Path, master_conf: &Path) -> anyhow::Result<Self> {
        let script = root.join("salt_client.py");
        std::fs::write(&script, CLIENT_SCRIPT)?;
        let log = root.join("salt_client.log");
        let mut command = tokio::process::Command::new(install.bin.join("python"));
        command
            .arg(&script)
            .arg(master_conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .context("cannot start the Salt LocalClient process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut client = ApiClient {
            child,
            stdin,
            stdout,
            log,
        };
        let ready = client.answer().await?;
        if ready["ready"] != true {
            bail!("the Salt LocalClient process said {ready}");
        }
        Ok(client)
    }

    /// The next JSON line.
    async fn answer(&mut self) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(RUN_TIMEOUT, self.stdout.next_line())
            .await
            .context("the Salt LocalClient process did not answer in time")??;
        let Some(line) = line else {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!(
                "the Salt LocalClient process exited ({:?}); its stderr:\n{}",
                self.child.try_wait().ok().flatten(),
                tail(&log, 30)
            );
        };
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("the Salt LocalClient process printed {line:?}"))?;
        if let Some(error) = value["error"].as_str() {
            bail!("the Salt LocalClient process failed: {error}");
        }
        Ok(value)
    }

    async fn ask(&mut self, verb: &str, ids: &[String]) -> anyhow::Result<Value> {
        let line = format!("{verb} {}\n", ids.join(","));
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        self.answer().await
    }
}

impl Drop for ApiClient {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) of the process group this client leads (not yet reaped).
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A Salt master with its minions, all children of this process.
pub struct SaltFleet {
    install: SaltInstall,
    root: PathBuf,
    master_conf: PathBuf,
    user: String,
    publish_port: u16,
    ret_port: u16,
    // Field order is drop order: the client, then the minions, then the master.
    client: Option<ApiClient>,
    minions: Vec<(String, ChildGuard)>,
    master: ChildGuard,
}

impl SaltFleet {
    /// Starts a master under `root` and waits until it listens.
    pub async fn start(install: &SaltInstall, root: &Path) -> anyhow::Result<SaltFleet> {
        std::fs::create_dir_all(root)?;
        let root = root
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", root.display()))?;
        let user = current_user()?;
        let publish_port = free_port()?;
        let mut ret_port = free_port()?;
        while ret_port == publish_port {
            ret_port = free_port()?;
        }
        let master_conf = root.join("master-conf");
        std::fs::create_dir_all(&master_conf)?;
        let master_root = root.join("master");
        std::fs::write(
            master_conf.join("master"),
            [
                format!("root_dir: {}", master_root.display()),
                "interface: 127.0.0.1".to_owned(),
                format!("publish_port: {publish_port}"),
                format!("ret_port: {ret_port}"),
                format!("user: {user}"),
                "auto_accept: True".to_owned(),
                format!("log_file: {}", master_root.join("master.log").display()),
                format!("key_logfile: {}", master_root.join("key.log").display()),
                "log_level: warning".to_owned(),
                "log_level_logfile: warning".to_owned(),
            ]
            .join("\n")
                + "\n",
        )?;
        let mut command = Command::new(install.bin.join("salt-master"));
        command.arg("-c").arg(&master_conf);
        let master = ChildGuard::spawn_group("salt-master", &mut command, None)?;
        let mut fleet = SaltFleet {
            install: install.clone(),
            root,
            master_conf,
            user,
            publish_port,
            ret_port,
            client: None,
            minions: Vec::new(),
            master,
        };
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            fleet.master.ensure_running()?;
            let listening = [fleet.publish_port, fleet.ret_port].iter().all(|port| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
                    Duration::from_secs(1),
                )
                .is_ok()
            });
            if listening {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "salt-master did not listen on 127.0.0.1:{} and :{} within {UP_TIMEOUT:?}:\n{}",
                    fleet.publish_port,
                    fleet.ret_port,
                    fleet.master.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(fleet)
    }

    /// The ids of the first `count` minions.
    pub fn ids(&self, count: usize) -> Vec<String> {
        self.minions
            .iter()
            .take(count)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Starts minions until there are `count`, then waits until `salt -L IDS test.ping` answers
    /// for every one of them (their keys are accepted by the master on first contact).
    pub async fn grow_to(&mut self, count: usize) -> anyhow::Result<()> {
        while self.minions.len() < count {
            let id = format!("bench-minion-{:02}", self.minions.len() + 1);
            let conf = self.root.join(format!("{id}-conf"));
            let minion_root = self.root.join(&id);
            std::fs::create_dir_all(&conf)?;
            std::fs::write(
                conf.join("minion"),
                [
                    format!("root_dir: {}", minion_root.display()),
                    format!("id: {id}"),
                    "master: 127.0.0.1".to_owned(),
                    format!("master_port: {}", self.ret_port),
                    format!("publish_port: {}", self.publish_port),
                    format!("user: {}", self.user),
                    format!("log_file: {}", minion_root.join("minion.log").display()),
                    "log_level: warning".to_owned(),
                    "log_level_logfile: warning".to_owned(),
                    // Retry a pending key after 1 s rather than 10.
                    "acceptance_wait_time: 1".to_owned(),
                ]
                .join("\n")
                    + "\n",
            )?;
            let mut command = Command::new(self.install.bin.join("salt-minion"));
            command.arg("-c").arg(&conf);
            let guard = ChildGuard::spawn_group(&format!("salt-minion {id}"), &mut command, None)?;
            self.minions.push((id, guard));
        }
        let ids = self.ids(count);
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            self.master.ensure_running()?;
            for (_, minion) in &mut self.minions {
                minion.ensure_running()?;
            }
            let answered = self.cli(&ids, &["test.ping"], Duration::from_secs(5)).await;
            if let Ok(answered) = &answered
                && ids.iter().all(|id| answered[id.as_str()] == true)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "not every minion answered `salt -L … test.ping` within {UP_TIMEOUT:?} (last answer: {answered:?}); the master's output:\n{}",
                    self.master.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if self.client.is_none() {
            self.client =
                Some(ApiClient::start(&self.install, &self.root, &self.master_conf).await?);
        }
        // The long-lived client's first calls set up its event bus connection; make sure it sees
        // every minion before it is timed.
        let client = self.client.as_mut().expect("started above");
        let answered = client.ask("ping", &ids).await?;
        let seen = answered["answered"].as_array().map_or(0, Vec::len);
        if seen != ids.len() {
            bail!(
                "the LocalClient's test.ping saw {seen} of {} minions: {answered}",
                ids.len()
            );
        }
        Ok(())
    }

    /// `salt -c CONF -L IDS ARGS… --out json --static -t T`, its JSON answer.
    async fn cli(&self, ids: &[String], args: &[&str], timeout: Duration) -> anyhow::Result<Value> {
        let mut command = tokio::process::Command::new(self.install.bin.join("salt"));
        command
            .arg("-c")
            .arg(&self.master_conf)
            .args(["-L", &ids.join(",")])
            .args(args)
            .args(["--out", "json", "--static", "-t"])
            .arg(timeout.as_secs().to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout + RUN_TIMEOUT, command.output())
            .await
            .context("the salt CLI did not finish in time")?
            .context("cannot run the salt CLI")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "the salt CLI ({}) printed no JSON: {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// Times `salt -L IDS cmd.run 'echo hi'` in a fresh process; fails unless every minion
    /// answered `hi`. Milliseconds.
    pub async fn cli_run(&self, ids: &[String]) -> anyhow::Result<f64> {
        let started = Instant::now();
        let answer = self
            .cli(ids, &["cmd.run", "echo hi"], Duration::from_secs(30))
            .await?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        check_all_hi(ids, &answer).context("salt CLI")?;
        Ok(elapsed)
    }

    /// Times `LocalClient().cmd(IDS, 'cmd.run', ['echo hi'])` in the long-lived client; fails
    /// unless every minion answered `hi`. Milliseconds.
    pub async fn api_run(&mut self, ids: &[String]) -> anyhow::Result<f64> {
        let client = self
            .client
            .as_mut()
            .context("the Salt fleet has no minions yet")?;
        let answer = client.ask("run", ids).await?;
        check_all_hi(ids, &answer["returned"]).context("salt LocalClient")?;
        answer["ms"]
            .as_f64()
            .with_context(|| format!("no time in the LocalClient's answer {answer}"))
    }

    /// Fails if the master or a minion has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.master.ensure_running()?;
        for (_, minion) in &mut self.minions {
            minion.ensure_running()?;
        }
        Ok(())
    }
}

impl Drop for SaltFleet {
    fn drop(&mut self) {
        // Ask every daemon to stop at once; each guard then waits for its own (a minion takes a
        // few seconds), so the waits overlap instead of adding up.
        self.client = None;
        for (_, minion) in &mut self.minions {
            minion.signal(libc::SIGTERM);
        }
        self.master.signal(libc::SIGTERM);
    }
}

/// Fails unless `answer` maps every id to `hi`.
fn check_all_hi(ids: &[String], answer: &Value) -> anyhow::Result<()> {
    for id in ids {
        if answer[id.as_str()] != "hi" {
            bail!(
                "minion {id} answered {} (all: {answer})",
                answer[id.as_str()]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_minion_must_answer_hi() {
        let ids = vec!["a".to_owned(), "b".to_owned()];
        check_all_hi(&ids, &serde_json::json!({"a": "hi", "b": "hi"})).unwrap();
        assert!(check_all_hi(&ids, &serde_json::json!({"a": "hi"})).is_err());
        assert!(
            check_all_hi(
                &ids,
                &serde_json::json!({"a": "hi", "b": "Minion did not return."})
            )
            .is_err()
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("1\n2\n3\n", 2), "2\n3");
        assert_eq!(tail("1", 5), "1");
    }
}
