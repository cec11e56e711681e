//! The control plane's replicas, as agents learn them (protocol version 2 and later).
//!
//! Several control-plane replicas may share one database; an agent connected to one of them is
//! told the QUIC addresses of every live replica (the replica it is connected to first) in
//! [`ReplicaAddrs`], after the welcome and again whenever the set changes, so it can fail over to
//! another replica when its own goes away. The message is sent only when the negotiated version
//! is at least [`REPLICA_ADDRS_VERSION`]: an agent of version 1 never sees it, and an agent of
//! version 2 connected to a version-1 control plane simply keeps the addresses it has.
//!
//! The list is network input: [`valid_addrs`] keeps at most [`MAX_REPLICA_ADDRS`] well-formed
//! `host:port` entries and drops the rest.

use serde::{Deserialize, Serialize};

/// The first protocol version whose control planes send [`ReplicaAddrs`].
pub const REPLICA_ADDRS_VERSION: u16 = 2;

/// Most addresses an agent keeps from one [`ReplicaAddrs`].
pub const MAX_REPLICA_ADDRS: usize = 64;

/// Longest `host:port` entry kept (a DNS name is at most 253 characters).
pub const MAX_REPLICA_ADDR_LEN: usize = 261;

/// Control plane → agent, on the control stream: the QUIC addresses (`host:port`) of every live
/// replica of the control plane, the sending replica's first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAddrs {
    pub quic_addrs: Vec<String>,
}

/// Whether `address` is a `host:port` an agent may dial: a port from 1 to 65535 after the last
/// `:`; the host an IPv6 address in brackets, or a name or IPv4 address of letters, digits, `.`,
/// `-` and `_` (no spaces, no control characters, nothing to interpret).
pub fn is_valid_addr(address: &str) -> bool {
    if address.is_empty() || address.len() > MAX_REPLICA_ADDR_LEN {
        return false;
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|byte| byte.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port != 0);
    if !port_ok || host.is_empty() {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok());
    }
    host.bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_'))
}

/// The entries of `addresses` an agent keeps: the valid ones ([`is_valid_addr`]), each once, in
/// their order, at most [`MAX_REPLICA_ADDRS`].
pub fn valid_addrs<'a>(addresses: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for address in addresses {
        if kept.len() == MAX_REPLICA_ADDRS {
            break;
        }
        if is_valid_addr(address) && !kept.contains(address) {
            kept.push(address.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_bounded() {
        for good in [
            "127.0.0.1:7443",
            "cronium-1.example.com:7443",
            "[::1]:1",
            "[2001:db8::7]:65535",
            "host_name:80",
        ] {
            assert!(is_valid_addr(good), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:",
            ":7443",
            "host:0",
            "host:65536",
            "host:+80",
            "host:７４４３",
            "::1:7443",
            "[::1:7443",
            "[not-v6]:7443",
            "host name:7443",
            "host\n:7443",
            "host/path:7443",
            "user@host:7443",
        ] {
            assert!(!is_valid_addr(bad), "{bad:?}");
        }
        let long = format!("{}:1", "a".repeat(MAX_REPLICA_ADDR_LEN));
        assert!(!is_valid_addr(&long));

        let mut offered: Vec<String> = vec!["b:1".into(), "bad".into(), "a:1".into(), "b:1".into()];
        assert_eq!(valid_addrs(&offered), ["b:1", "a:1"]);
        offered = (0..200).map(|port| format!("h:{}", port + 1)).collect();
        let kept = valid_addrs(&offered);
        assert_eq!(kept.len(), MAX_REPLICA_ADDRS);
        assert_eq!(kept[0], "h:1");
    }
}
