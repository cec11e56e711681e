//! A private Docker engine for the test run, kept off the network.
//!
//! The Docker runner tests need a real engine. When `DOCKER_HOST` is not set, `cargo xtask test`
//! starts `dockerd` with its own data and exec roots and socket in a temp dir, without a bridge,
//! iptables rules or IP forwarding, waits until it answers, and stops it (and removes the dir)
//! when the run ends. Without `dockerd` installed, the tests run against nothing and the Docker
//! tests say what is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running private engine; dropping it stops the engine and removes its files.
pub struct PrivateEngine {
    child: Child,
    dir: PathBuf,
}

impl PrivateEngine {
    /// Starts an engine unless `DOCKER_HOST` already names one or `dockerd` is not installed.
    pub fn start_unless_configured() -> Result<Option<PrivateEngine>, String> {
        if std::env::var_os("DOCKER_HOST").is_some() {
            return Ok(None);
        }
        let installed = Command::new("dockerd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(installed, Ok(status) if status.success()) {
            eprintln!(
                "xtask: dockerd is not installed; the Docker tests will fail (apt-get install docker.io busybox-static)"
            );
            return Ok(None);
        }
        let dir = std::env::temp_dir().join(format!("cronium-xtask-docker-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("creating {}: {error}", dir.display()))?;
        let log = std::fs::File::create(dir.join("dockerd.log"))
            .map_err(|error| format!("creating the dockerd log: {error}"))?;
        let log_err = log.try_clone().map_err(|error| error.to_string())?;
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|error| format!("starting dockerd: {error}"))?;
        let mut engine = PrivateEngine { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answered = Command::new("docker")
                .env("DOCKER_HOST", engine.host())
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if matches!(answered, Ok(status) if status.success()) {
                eprintln!(
                    "xtask: started a private dockerd for the Docker tests ({})",
                    engine.host()
                );
                return Ok(Some(engine));
            }
            if let Ok(Some(status)) = engine.child.try_wait() {
                let log =
                    std::fs::read_to_string(engine.dir.join("dockerd.log")).unwrap_or_default();
                return Err(format!("dockerd exited ({status}):\n{log}"));
            }
            if Instant::now() > deadline {
                return Err("dockerd did not answer within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The `DOCKER_HOST` value of this engine.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
