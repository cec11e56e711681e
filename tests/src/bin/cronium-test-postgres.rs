//! `cronium-test-postgres`: a throwaway PostgreSQL server for a whole test run.
//!
//! Starts a [`PgCluster`], prints `CRONIUM_TEST_POSTGRES_URL=<server URL>` (over the cluster's
//! Unix socket, so control planes in network namespaces reach it too) on one line of
//! stdout, then waits until its stdin is closed (by its parent, or because the parent died) and
//! stops and removes the cluster. `cargo xtask test` runs the suite's PostgreSQL pass against
//! it; by hand: `target/debug/cronium-test-postgres` in a terminal, the printed line exported in
//! another, and `CRONIUM_TEST_DATABASE=postgres cargo nextest run …` there.

use std::io::{Read, Write};

use cronium_e2e::postgres::{PgCluster, SERVER_URL_VAR};

fn main() -> anyhow::Result<()> {
    // Ctrl-C in a terminal reaches the whole process group: the parent ends, closes stdin, and
    // this process then stops the cluster instead of dying with it still running.
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let cluster = PgCluster::start()?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{SERVER_URL_VAR}={}", cluster.socket_server_url())?;
    stdout.flush()?;
    // Until EOF (or an error): nothing is expected on stdin but its end.
    let mut sink = [0u8; 64];
    while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    drop(cluster);
    Ok(())
}
