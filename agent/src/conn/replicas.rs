//! The control-plane addresses the agent dials, and the replicas it learned.
//!
//! `agent.json` holds the addresses given at enrollment (or by the operator); they are always
//! dialled. A control plane of several replicas also tells the agent the QUIC addresses of every
//! live replica, its own first (`Message::ReplicaAddrs`); the agent keeps the last list it was
//! told in `replicas.json` in its state dir (written atomically: a temporary file, fsync, rename),
//! so an agent restarted while its replica is down still finds another. The file records the
//! `agent.json` addresses it was learned under: when an operator points `agent.json` elsewhere,
//! the learned list is set aside.
//!
//! The dial order is the learned list, then the `agent.json` addresses not in it; the address
//! of a connection that was just lost is tried last, so an agent whose replica died goes to
//! another one at once instead of waiting for a handshake to the dead one to time out.

use std::path::{Path, PathBuf};

use cronium_protocol::replicas::valid_addrs;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, write_private};

/// The learned replica addresses, in the state dir next to `agent.json`.
pub const REPLICAS_FILE: &str = "replicas.json";

/// Largest `replicas.json` read (64 addresses of at most 261 bytes need far less).
const MAX_FILE_LEN: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct ReplicasFile {
    /// The `agent.json` addresses when the list was learned.
    configured: Vec<String>,
    /// The replicas' addresses, as last told (the telling replica's first).
    quic_addrs: Vec<String>,
}

/// Where the agent may find the control plane.
#[derive(Debug)]
pub(crate) struct Addresses {
    path: PathBuf,
    configured: Vec<String>,
    learned: Vec<String>,
    /// The address of the connection lost last, tried last until a connection succeeds.
    lost: Option<String>,
}

impl Addresses {
    /// The addresses of `identity`, with the replicas learned earlier (a missing, unreadable or
    /// foreign `replicas.json` is ignored: the `agent.json` addresses are enough to start).
    pub(crate) fn load(identity: &Identity) -> Addresses {
        let path = identity.state_dir.join(REPLICAS_FILE);
        let learned = match read_file(&path) {
            Ok(Some(file)) if file.configured == identity.quic_addrs => {
                valid_addrs(&file.quic_addrs)
            }
            Ok(Some(_)) => {
                tracing::info!(
                    file = %path.display(),
                    "agent.json names other control-plane addresses than those the replicas were learned under; dialling agent.json's"
                );
                Vec::new()
            }
            Ok(None) => Vec::new(),
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "ignoring the learned replica addresses");
                Vec::new()
            }
        };
        Addresses {
            path,
            configured: identity.quic_addrs.clone(),
            learned,
            lost: None,
        }
    }

    /// The addresses to dial, in order: the learned replicas, then the configured addresses not
    /// among them; the address of the connection lost last at the end.
    pub(crate) fn dial_order(&self) -> Vec<String> {
        let mut order: Vec<String> = Vec::new();
        for address in self.learned.iter().chain(&self.configured) {
            if !order.contains(address) {
                order.push(address.clone());
            }
        }
        if let Some(lost) = &self.lost
            && let Some(index) = order.iter().position(|address| address == lost)
        {
            let lost = order.remove(index);
            order.push(lost);
        }
        order
    }

    /// A session on `address` was welcomed: it is dialled in its turn again.
    pub(crate) fn connected(&mut self) {
        self.lost = None;
    }

    /// The connection to `address` was lost: try the others first.
    pub(crate) fn lost(&mut self, address: &str) {
        self.lost = Some(address.to_owned());
    }

    /// Takes the replica addresses a control plane told: the valid ones are kept (at most
    /// `MAX_REPLICA_ADDRS`) and stored when they changed (an error means they are used but
    /// not stored). A list without any valid address changes nothing. Returns how many offered
    /// entries were dropped as invalid or repeated.
    pub(crate) fn learn(&mut self, offered: &[String]) -> std::io::Result<usize> {
        let kept = valid_addrs(offered);
        let dropped = offered.len() - kept.len();
        if kept.is_empty() || kept == self.learned {
            return Ok(dropped);
        }
        self.learned = kept;
        let file = ReplicasFile {
            configured: self.configured.clone(),
            quic_addrs: self.learned.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        write_private(&self.path, &json).map_err(std::io::Error::other)?;
        Ok(dropped)
    }

    /// The learned replica addresses.
    pub(crate) fn learned(&self) -> &[String] {
        &self.learned
    }
}

fn read_file(path: &Path) -> std::io::Result<Option<ReplicasFile>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if metadata.len() > MAX_FILE_LEN {
        return Err(std::io::Error::other("the file is too large"));
    }
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Forgets the learned replica addresses of the state dir (a new enrollment).
pub(crate) fn forget(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(state_dir.join(REPLICAS_FILE)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(state_dir: &Path, configured: &[&str]) -> Identity {
        Identity {
            agent_id: "agent-1".into(),
            name: "host".into(),
            server_url: "http://127.0.0.1:8080".into(),
            quic_addrs: configured.iter().map(|address| (*address).into()).collect(),
            server_name: cronium_protocol::SERVER_NAME.into(),
            ca_sha256: "00".repeat(32),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn strings(addresses: &[&str]) -> Vec<String> {
        addresses.iter().map(|address| (*address).into()).collect()
    }

    #[test]
    fn learned_replicas_are_kept_validated_ordered_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let enrolled = identity(dir.path(), &["a:7443"]);
        let mut addresses = Addresses::load(&enrolled);
        assert_eq!(addresses.dial_order(), ["a:7443"]);
        // Losing the only address changes nothing: it is still dialled.
        addresses.lost("a:7443");
        assert_eq!(addresses.dial_order(), ["a:7443"]);

        // Told by A: A first, then B; junk and repeats dropped.
        let dropped = addresses
            .learn(&strings(&[
                "a:7443",
                "b:7443",
                "not an address",
                "b:7443",
                "c:0",
            ]))
            .unwrap();
        assert_eq!(dropped, 3);
        assert_eq!(addresses.learned(), ["a:7443", "b:7443"]);
        // A was lost last: B first.
        assert_eq!(addresses.dial_order(), ["b:7443", "a:7443"]);
        addresses.connected();
        assert_eq!(addresses.dial_order(), ["a:7443", "b:7443"]);

        // A list without any valid entry is ignored.
        assert_eq!(addresses.learn(&strings(&["", "x"])).unwrap(), 2);
        assert_eq!(addresses.learned(), ["a:7443", "b:7443"]);

        // Told by B (A gone from the registry): the configured address stays, last.
        addresses.learn(&strings(&["b:7443", "c:7443"])).unwrap();
        assert_eq!(addresses.dial_order(), ["b:7443", "c:7443", "a:7443"]);

        // A restarted agent dials what it learned.
        let restarted = Addresses::load(&enrolled);
        assert_eq!(restarted.dial_order(), ["b:7443", "c:7443", "a:7443"]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(REPLICAS_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        // agent.json pointed elsewhere by an operator: only its addresses.
        let moved = Addresses::load(&identity(dir.path(), &["d:7443"]));
        assert_eq!(moved.dial_order(), ["d:7443"]);

        // A damaged file is ignored, not fatal.
        std::fs::write(dir.path().join(REPLICAS_FILE), b"{not json").unwrap();
        assert_eq!(Addresses::load(&enrolled).dial_order(), ["a:7443"]);
        // Entries edited into the file are validated like the network's.
        std::fs::write(
            dir.path().join(REPLICAS_FILE),
            br#"{"configured":["a:7443"],"quic_addrs":["bad entry","e:1"]}"#,
        )
        .unwrap();
        assert_eq!(Addresses::load(&enrolled).dial_order(), ["e:1", "a:7443"]);

        forget(dir.path()).unwrap();
        forget(dir.path()).unwrap();
        assert_eq!(Addresses::load(&enrolled).dial_order(), ["a:7443"]);
    }
}
