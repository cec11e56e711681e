//! HTTP request jobs run by the control plane: the same exchange as the agent's HTTP runner
//! (`cronium_agent::runner::http::exchange`), with the control plane's TLS roots and, with
//! `--http-jobs-public-only`, an address policy: names resolve only to public addresses
//! ([`PublicOnlyResolver`]) and IP literals, in the URL or in a redirect, must be public.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cronium_agent::runner::http::{Exchange, exchange};
use cronium_protocol::{FailReason, FinalStatus, Masker, RuntimeSpec};

use super::{Clients, Ending, Output, Stopped};
use crate::store::jobs::{ClaimedJob, JobStatus, Reason};

/// Runs the HTTP request of `job` (its `runtime_spec` is the wire's `RuntimeSpec::Http`).
pub(super) async fn run(
    clients: &Clients,
    job: &ClaimedJob,
    secret_env: &[(String, String)],
    masker: &Masker,
    output: &mut Output,
    stop: impl Future<Output = Stopped> + Send,
) -> Result<Ending, Stopped> {
    let spec = match crate::agents::session::runtime_spec(job.runtime_spec.as_deref()) {
        Ok(RuntimeSpec::Http(spec)) => spec,
        _ => {
            output.system("the job has no readable HTTP request");
            return Ok(Ending::failed(Reason::Spawn));
        }
    };
    let context = Exchange {
        configure: &clients.http,
        secrets: secret_env,
        masker,
        input: job.input.as_deref(),
        job_timeout: (job.timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(job.timeout_seconds))),
        refuse_address: clients
            .public_only
            .then_some(is_not_public as fn(IpAddr) -> bool),
    };
    let ending = exchange(context, &spec, output, stop).await?;
    Ok(Ending {
        status: match ending.status {
            FinalStatus::Completed => JobStatus::Completed,
            FinalStatus::Failed => JobStatus::Failed,
            FinalStatus::Cancelled => JobStatus::Cancelled,
        },
        reason: ending.reason.map(|reason| match reason {
            FailReason::HttpStatus => Reason::HttpStatus,
            FailReason::HttpError => Reason::HttpError,
            FailReason::Timeout => Reason::Timeout,
            FailReason::Lost => Reason::Lost,
            _ => Reason::Spawn,
        }),
        result: ending.result,
    })
}

/// Whether `address` is not a public unicast address: loopback, private, link-local,
/// carrier-grade NAT, documentation, benchmarking, unspecified, broadcast, multicast, unique
/// local (IPv6), or an IPv4-mapped IPv6 address of one of those.
pub fn is_not_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_not_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// Resolves names with the system resolver and keeps only public addresses; a name with none
/// fails to resolve (so the request fails with reason `http_error`).
pub struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| !is_not_public(address.ip()))
                .collect();
            if resolved.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (this control plane refuses private networks)"
                )
                .into());
            }
            Ok(Box::new(resolved.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_not_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!is_not_public(public.parse().unwrap()), "{public}");
        }
    }
}
