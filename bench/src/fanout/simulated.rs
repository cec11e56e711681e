//! Many agents in this process, each running the agent's own code (`cronium_agent::run`) over a
//! QUIC connection of its own, enrolled with labels so one event can target all of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::cluster::{enroll_in_process, wait_online};

/// A fleet of in-process agents; dropping it stops them (cancelled, then aborted).
pub struct InProcessFleet {
    stop: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    /// How long it took until `GET /agents` showed all of them online.
    pub online_after: Duration,
}

impl InProcessFleet {
    /// Enrolls `count` agents named `PREFIXNNNN` with `labels` under `root`, runs them (capacity
    /// 1 each) and waits until all are online.
    pub async fn start(
        api: &Api,
        root: &Path,
        prefix: &str,
        count: usize,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<InProcessFleet> {
        let identities = enroll_in_process(api, root, prefix, count, labels).await?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut names = Vec::with_capacity(count);
        for (state_dir, name) in identities {
            names.push(name);
            let options = cronium_agent::AgentOptions {
                state_dir,
                capacity: 1,
                max_log_bytes: 1024 * 1024,
                reconnect_max: Duration::from_secs(5),
                shutdown_grace: Duration::from_secs(5),
                force_stop: CancellationToken::new(),
                allow_run_as: Vec::new(),
            };
            tasks.spawn(cronium_agent::run(options, stop.child_token()));
        }
        let mut fleet = InProcessFleet {
            stop,
            tasks,
            online_after: Duration::ZERO,
        };
        let online_timeout = Duration::from_secs(60) + Duration::from_millis(100) * count as u32;
        fleet.online_after = wait_online(api, &names, online_timeout).await?;
        Ok(fleet)
    }

    /// Fails if an agent has stopped (it returned or panicked) while it should be running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(result) = self.tasks.try_join_next() {
            match result {
                Ok(Ok(())) => anyhow::bail!("an in-process agent stopped by itself"),
                Ok(Err(error)) => return Err(error.context("an in-process agent failed")),
                Err(error) => anyhow::bail!("an in-process agent task failed: {error}"),
            }
        }
        Ok(())
    }

    /// Stops every agent and waits for them (at most 30 s, then aborts the rest); returns how
    /// many stopped with an error.
    pub async fn stop(mut self) -> usize {
        self.stop.cancel();
        let mut errors = 0;
        let joined = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(result) = self.tasks.join_next().await {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        errors += 1;
                        eprintln!("an in-process agent stopped with an error: {error:#}");
                    }
                    Err(error) => {
                        errors += 1;
                        eprintln!("an in-process agent task failed: {error}");
                    }
                }
            }
        })
        .await;
        if joined.is_err() {
            eprintln!("some in-process agents did not stop within 30 s; aborting them");
            self.tasks.abort_all();
        }
        errors
    }
}

impl Drop for InProcessFleet {
    fn drop(&mut self) {
        // On an early return: the agents stop claiming and end their jobs; the JoinSet aborts
        // whatever is left when it is dropped right after.
        self.stop.cancel();
    }
}
