//! An SSH session to a server, shared by the fallback's job attempts (`job.rs`) and the agent
//! bootstrap (`bootstrap.rs`): connect with a deadline, check the host key against the pinned
//! one (or pin it on first use; a changed key is refused and never replaces the pin),
//! authenticate with the sealed key or password, and run fixed commands with bytes on stdin.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};

use super::SshSecrets;
use super::helper::Forwards;
use crate::AppState;
use crate::store::servers::{SshAuth, SshSettings};

/// Connecting, key exchange and authentication together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The setup and cleanup commands.
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks the server's host key against the pinned one; remembers what the server showed;
/// hands the channels of forwarded helper sockets to the attempts serving them.
pub(super) struct Client {
    pinned: Option<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
    forwards: Forwards,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not trusted: only a pinned plain key is.
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        *self.seen.lock().expect("seen key") = Some(key.clone());
        Ok(match &self.pinned {
            Some(pinned) => pinned.key_data() == key.key_data(),
            // Pinned after the connection succeeded (first use).
            None => true,
        })
    }

    /// A connection to a forwarded helper socket: accepted only for a socket an attempt on this
    /// connection asked for and still serves.
    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        match self.forwards.route(socket_path) {
            Some(route) => {
                reply.accept().await;
                // A route whose attempt just ended drops the channel, which closes it.
                let _ = route.send(channel);
            }
            None => {
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
    }
}

/// Connects, checks or pins the host key and authenticates.
pub(super) async fn connect(
    state: &AppState,
    server_id: &str,
    ssh: &SshSettings,
    note: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<Handle<Client>> {
    connect_with_forwards(state, server_id, ssh, Forwards::default(), note).await
}

/// [`connect`], with the table that routes the connection's forwarded helper sockets.
pub(super) async fn connect_with_forwards(
    state: &AppState,
    server_id: &str,
    ssh: &SshSettings,
    forwards: Forwards,
    note: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<Handle<Client>> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_inner(state, server_id, ssh, forwards, note),
    )
    .await
    .map_err(|_| anyhow!("connecting to {}:{} timed out", ssh.host, ssh.port))?
}

async fn connect_inner(
    state: &AppState,
    server_id: &str,
    ssh: &SshSettings,
    forwards: Forwards,
    note: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<Handle<Client>> {
    let pinned = match &ssh.host_key {
        Some(line) => Some(
            PublicKey::from_openssh(line)
                .map_err(|_| anyhow!("the pinned host key is unreadable"))?,
        ),
        None => None,
    };
    let seen = Arc::new(Mutex::new(None));
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        // A job's small messages (the temp dir's line, the forward request, the wrapper) go back
        // and forth: without TCP_NODELAY each would wait for a delayed ACK (about 40 ms).
        nodelay: true,
        ..Default::default()
    });
    let handler = Client {
        pinned: pinned.clone(),
        seen: seen.clone(),
        forwards,
    };
    let connected = client::connect(config, (ssh.host.as_str(), ssh.port), handler).await;
    let shown = seen.lock().expect("seen key").clone();
    let mut session = match connected {
        Ok(session) => session,
        Err(error) => {
            if let (Some(_), Some(shown)) = (&pinned, &shown)
                && pinned.as_ref().map(PublicKey::key_data) != Some(shown.key_data())
            {
                let fingerprint = shown.fingerprint(Default::default());
                bail!(
                    "host key changed: {}:{} showed {} {fingerprint}, which is not the pinned key; refused (if the change is expected, set the server's ssh.host_key)",
                    ssh.host,
                    ssh.port,
                    shown.algorithm().as_str()
                );
            }
            bail!("could not connect to {}:{}: {error}", ssh.host, ssh.port);
        }
    };
    let shown = shown.ok_or_else(|| anyhow!("the server showed no host key"))?;
    if pinned.is_none() {
        let line = super::normalize_host_key(
            &shown
                .to_openssh()
                .map_err(|error| anyhow!("host key: {error}"))?,
        )
        .ok_or_else(|| anyhow!("host key cannot be encoded"))?;
        let now_pinned = state.store.pin_host_key(server_id, &line).await?;
        if now_pinned != line {
            bail!("host key changed while it was being pinned; refused");
        }
        note(format!(
            "pinned host key {} on first use",
            shown.fingerprint(Default::default())
        ));
    }
    let secrets = SshSecrets::open(&state.key, &ssh.secrets)?;
    let auth = match ssh.auth {
        SshAuth::Key => {
            let text = secrets
                .private_key
                .as_deref()
                .ok_or_else(|| anyhow!("no private key is stored"))?;
            let key = russh::keys::decode_secret_key(text, secrets.passphrase.as_deref())
                .map_err(|_| anyhow!("the stored private key cannot be read"))?;
            let hash = session.best_supported_rsa_hash().await?.flatten();
            session
                .authenticate_publickey(
                    &ssh.username,
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await?
        }
        SshAuth::Password => {
            let password = secrets
                .password
                .ok_or_else(|| anyhow!("no password is stored"))?;
            session
                .authenticate_password(&ssh.username, password)
                .await?
        }
    };
    if !matches!(auth, AuthResult::Success) {
        bail!(
            "authentication as {:?} with a {} was refused",
            ssh.username,
            ssh.auth.as_str()
        );
    }
    Ok(session)
}

/// Runs `command` on a new channel, with `stdin` sent and closed; returns the exit status and
/// stdout (stderr is dropped).
pub(super) async fn exec_collect(
    session: &Handle<Client>,
    command: &str,
    stdin: &[u8],
) -> anyhow::Result<(u32, Vec<u8>)> {
    let step = async {
        let mut channel = session.channel_open_session().await?;
        channel.exec(true, command).await?;
        if !stdin.is_empty() {
            channel
                .data_bytes(bytes::Bytes::copy_from_slice(stdin))
                .await?;
        }
        channel.eof().await?;
        let (mut status, mut stdout) = (None, Vec::new());
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Failure => bail!("the server refused to run a command"),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>((status.unwrap_or(255), stdout))
    };
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .map_err(|_| anyhow!("a setup step timed out"))?
}

/// A temp dir path as printed by `mktemp -d`: absolute, and only characters that need no
/// quoting in a POSIX shell.
pub(super) fn checked_dir(output: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(output).ok()?.trim_end_matches('\n');
    let fine = text.starts_with('/')
        && text.len() < 512
        && !text.contains("..")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    fine.then(|| text.to_string())
}

/// A value single-quoted for a POSIX shell: nothing inside is expanded.
pub(super) fn single_quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}
