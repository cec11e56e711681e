//! A throwaway OpenSSH server for tests: Debian's `/usr/sbin/sshd -D` with a temp config and a
//! generated host key on a free 127.0.0.1 port, killed and reaped on drop.
//!
//! The test's own user logs in with a generated ed25519 key (`AuthorizedKeysFile` in the temp
//! dir). With [`SshdOptions::password_user`] the server also accepts password logins and the
//! harness creates a system user with a random name and password for it (`useradd`, `chpasswd`,
//! a home in a temp dir); on drop its processes are killed and the user is deleted again. The
//! SFTP subsystem is on unless [`SshdOptions::sftp`] is false.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const START_DEADLINE: Duration = Duration::from_secs(30);
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct SshdOptions {
    /// Create a user with a password and allow password logins.
    pub password_user: bool,
    /// Offer the SFTP subsystem.
    pub sftp: bool,
    /// Allow Unix socket forwarding (`AllowStreamLocalForwarding`; off: the server refuses
    /// `streamlocal-forward@openssh.com`, and so the SSH fallback's runtime helpers).
    pub streamlocal_forwarding: bool,
}

impl Default for SshdOptions {
    fn default() -> SshdOptions {
        SshdOptions {
            password_user: false,
            sftp: true,
            streamlocal_forwarding: true,
        }
    }
}

/// A system user the harness created; deleted on drop.
pub struct PasswordUser {
    pub name: String,
    pub password: String,
    home: tempfile::TempDir,
}

impl PasswordUser {
    fn create() -> Result<PasswordUser> {
        let name = format!(
            "crt{}{}",
            std::process::id() % 100_000,
            hex::encode(crate::random_bytes(3))
        );
        let password = hex::encode(crate::random_bytes(12));
        let home = tempfile::Builder::new()
            .prefix("cronium-sshd-home-")
            .tempdir_in("/tmp")
            .context("home dir")?;
        let status = Command::new("useradd")
            .args(["-M", "-N", "-s", "/bin/sh", "-d"])
            .arg(home.path())
            .arg(&name)
            .status()
            .context("useradd (Debian passwd) is needed to test password logins")?;
        ensure!(status.success(), "useradd {name} failed: {status}");
        let user = PasswordUser {
            name,
            password,
            home,
        };
        let status = Command::new("chown")
            .arg(&user.name)
            .arg(user.home.path())
            .status()?;
        ensure!(status.success(), "chown of the home failed");
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .context("chpasswd")?;
        {
            use std::io::Write;
            let mut stdin = chpasswd.stdin.take().context("chpasswd stdin")?;
            writeln!(stdin, "{}:{}", user.name, user.password)?;
        }
        ensure!(chpasswd.wait()?.success(), "chpasswd failed");
        Ok(user)
    }

    /// The user's home directory.
    pub fn home(&self) -> &Path {
        self.home.path()
    }
}

impl Drop for PasswordUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .status();
        // userdel refuses while the user has processes: give the kills a moment.
        let started = Instant::now();
        loop {
            let status = Command::new("userdel").arg(&self.name).status();
            if status.is_ok_and(|status| status.success()) || started.elapsed() > START_DEADLINE {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running sshd.
pub struct Sshd {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    /// The test's own user (logs in with [`Sshd::private_key`]).
    pub user: String,
    /// The password user, with [`SshdOptions::password_user`].
    pub password_user: Option<PasswordUser>,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a new ed25519 key pair at `path` and `path.pub`.
pub fn ssh_keygen(path: &Path) -> Result<()> {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .context("ssh-keygen (Debian openssh-client) is needed")?;
    ensure!(status.success(), "ssh-keygen failed: {status}");
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Sshd {
    /// Starts a server with the default options (key login for the test's user, SFTP).
    pub fn start() -> Result<Sshd> {
        Sshd::start_with(SshdOptions::default())
    }

    pub fn start_with(options: SshdOptions) -> Result<Sshd> {
        if !Path::new("/usr/sbin/sshd").exists() {
            bail!(
                "this test needs Debian's openssh-server (/usr/sbin/sshd): apt-get install openssh-server"
            );
        }
        std::fs::create_dir_all("/run/sshd").context("/run/sshd")?;
        let dir = tempfile::tempdir()?;
        ssh_keygen(&dir.path().join("host"))?;
        ssh_keygen(&dir.path().join("client"))?;
        std::fs::copy(
            dir.path().join("client.pub"),
            dir.path().join("authorized_keys"),
        )?;
        let password_user = options
            .password_user
            .then(PasswordUser::create)
            .transpose()?;
        let port = free_port()?;
        let mut config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n\
             KbdInteractiveAuthentication no\n",
            d = dir.path().display()
        );
        config.push_str(if password_user.is_some() {
            "PasswordAuthentication yes\n"
        } else {
            "PasswordAuthentication no\n"
        });
        if options.sftp {
            config.push_str(&format!("Subsystem sftp {SFTP_SERVER}\n"));
        }
        if !options.streamlocal_forwarding {
            config.push_str("AllowStreamLocalForwarding no\n");
        }
        std::fs::write(dir.path().join("sshd_config"), config)?;
        let log = std::fs::File::create(dir.path().join("sshd.log"))?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting sshd")?;
        let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?
            .trim()
            .to_string();
        let mut sshd = Sshd {
            dir,
            port,
            child,
            user,
            password_user,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sshd.child.try_wait()? {
                bail!("sshd exited with {status}: {}", sshd.log());
            }
            ensure!(
                started.elapsed() < START_DEADLINE,
                "sshd did not listen: {}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sshd)
    }

    /// A file in the server's temp dir (`host.pub`, `client`, `sshd.log`, …).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The private key (OpenSSH format) the test's user logs in with.
    pub fn private_key(&self) -> String {
        std::fs::read_to_string(self.file("client")).unwrap_or_default()
    }

    /// The host's public key line.
    pub fn host_key(&self) -> String {
        std::fs::read_to_string(self.file("host.pub")).unwrap_or_default()
    }

    /// The listening sshd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of the processes serving this server's connections (the listener's children).
    pub fn session_pids(&self) -> Vec<i32> {
        let listener = self.pid().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: the comm may hold spaces, so split after the last ')'.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(listener.as_str())
                && let Ok(pid) = entry.file_name().to_string_lossy().parse()
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.file("sshd.log")).unwrap_or_default()
    }
}

/// The agent that `cronium server install-agent --service detached --prefix PREFIX` started in
/// the background on this host: killed when dropped (the installer's pid file names it).
pub struct DetachedAgent(PathBuf);

impl DetachedAgent {
    /// The agent installed under `prefix` (whether or not it was installed yet).
    pub fn under(prefix: &Path) -> DetachedAgent {
        DetachedAgent(prefix.join("var/lib/cronium-agent/agent.pid"))
    }
}

impl Drop for DetachedAgent {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the pid the installer recorded.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl crate::TestCluster {
    /// Creates the SSH server `name` with `labels` for `sshd` (key auth, pinned host key) through
    /// the API; returns its JSON.
    pub async fn add_ssh_server(
        &self,
        name: &str,
        labels: serde_json::Value,
        sshd: &Sshd,
    ) -> Result<serde_json::Value> {
        self.api()
            .post(
                "/api/v1/servers",
                &serde_json::json!({"name": name, "connection": "ssh", "labels": labels, "ssh": {
                    "host": "127.0.0.1", "port": sshd.port, "username": sshd.user,
                    "auth": "key", "private_key": sshd.private_key(), "host_key": sshd.host_key(),
                }}),
            )
            .await?
            .expect_status(201, "create the server")
    }

    /// Runs `cronium server install-agent SERVER --service detached --prefix PREFIX` (PREFIX in
    /// the cluster's dir) and returns its output with the guard of the agent it starts.
    pub async fn install_agent_detached(
        &self,
        server: &str,
    ) -> Result<(std::process::Output, DetachedAgent)> {
        let prefix = self.dir().join("remote-prefix");
        let agent = DetachedAgent::under(&prefix);
        let prefix_arg = prefix.to_str().context("prefix")?.to_owned();
        let output = self
            .cli(
                &[
                    "server",
                    "install-agent",
                    server,
                    "--service",
                    "detached",
                    "--prefix",
                    &prefix_arg,
                ],
                Duration::from_secs(300),
            )
            .await?;
        Ok((output, agent))
    }
}
