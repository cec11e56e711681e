//! `cronium dev` end to end: one command brings up the control plane and a local agent, the CLI
//! finds them through the data dir, and Ctrl-C stops everything, leaving no process behind.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cronium_e2e::{ChildGuard, binary, live_processes_with_arg};

/// Runs a `cronium` CLI command against the dev data dir; returns (exit code, stdout, stderr).
fn cli(data_dir: &std::path::Path, args: &[&str]) -> Result<(i32, String, String)> {
    let output = Command::new(binary("cronium")?)
        .args(args)
        .env("CRONIUM_DATA_DIR", data_dir)
        .env_remove("CRONIUM_URL")
        .env_remove("CRONIUM_TOKEN")
        .output()
        .context("running the cronium CLI")?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn dev_runs_jobs_through_the_cli_and_ctrl_c_leaves_nothing_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let marker = format!("31{}.5", std::process::id());
    let mut command = Command::new(binary("cronium")?);
    command
        .args(["dev", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir);
    command.env("RUST_LOG", "info").env_remove("ENCRYPTION_KEY");
    let (mut dev, ready) = ChildGuard::spawn(
        "cronium dev",
        command,
        &dir.path().join("dev.log"),
        Some("Press Ctrl-C"),
    )?;
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .with_context(|| format!("cronium dev did not start:\n{}", dev.log_tail(40)))?
        .with_context(|| format!("cronium dev exited:\n{}", dev.log_tail(40)))?;
    let banner = std::fs::read_to_string(dev.log_path())?;
    assert!(
        banner.contains("login          admin / "),
        "first start prints the admin password:\n{banner}"
    );

    let (code, stdout, stderr) = cli(
        &data_dir,
        &[
            "event",
            "create",
            "hello",
            "--script",
            "echo hello-from-dev; exit 7",
            "--agents",
            "local",
        ],
    )?;
    assert_eq!(code, 0, "event create: {stdout}{stderr}");
    let (code, stdout, stderr) = cli(
        &data_dir,
        &[
            "event",
            "create",
            "configured",
            "--script",
            "echo \"greeting=$GREETING\"",
            "--agents",
            "local",
            "--env",
            "GREETING=hi there",
            "--memory-mb",
            "512",
            "--pids",
            "200",
        ],
    )?;
    assert_eq!(code, 0, "event create with flags: {stdout}{stderr}");
    let (code, stdout, stderr) = cli(&data_dir, &["run", "configured", "--wait"])?;
    assert_eq!(code, 0, "run configured: {stdout}{stderr}");
    assert!(stdout.contains("greeting=hi there"), "{stdout}{stderr}");
    let (code, stdout, stderr) = cli(&data_dir, &["run", "hello", "--wait"])?;
    assert_eq!(
        code,
        7,
        "run --wait exits with the job's exit code: {stdout}{stderr}\n{}",
        dev.log_tail(30)
    );
    assert_eq!(stdout, "hello-from-dev\n");

    // A job that would outlive the stop unless the agent kills it.
    let script = format!("sleep {marker} & sleep {marker}");
    let (code, stdout, stderr) = cli(
        &data_dir,
        &[
            "event", "create", "long", "--script", &script, "--agents", "local",
        ],
    )?;
    assert_eq!(code, 0, "event create: {stdout}{stderr}");
    let (code, stdout, stderr) = cli(&data_dir, &["run", "long"])?;
    assert_eq!(code, 0, "run: {stdout}{stderr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_processes_with_arg(&marker).len() < 2 {
        if Instant::now() > deadline {
            bail!("the long job never started:\n{}", dev.log_tail(40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Ctrl-C: everything stops, cleanly, and no job process survives.
    // SAFETY: kill(2) with a pid this test spawned and still owns (not yet reaped).
    unsafe { libc::kill(dev.pid() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "cronium dev did not stop after Ctrl-C:\n{}",
                dev.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "cronium dev exits 0 after Ctrl-C: {status:?}\n{}",
        dev.log_tail(40)
    );
    assert!(
        live_processes_with_arg(&marker).is_empty(),
        "job processes survived: {:?}",
        live_processes_with_arg(&marker)
    );

    // Data survives: a second start finds the same admin and token, and does not print the password again.
    let mut command = Command::new(binary("cronium")?);
    command
        .args(["dev", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir);
    let (mut again, ready) = ChildGuard::spawn(
        "cronium dev (again)",
        command,
        &dir.path().join("dev2.log"),
        Some("Press Ctrl-C"),
    )?;
    tokio::time::timeout(Duration::from_secs(60), ready).await??;
    let banner = std::fs::read_to_string(again.log_path())?;
    assert!(
        !banner.contains("login          admin / "),
        "the password is shown on first start only:\n{banner}"
    );
    let (code, stdout, stderr) = cli(&data_dir, &["run", "hello", "--wait"])?;
    assert_eq!(
        (code, stdout.as_str()),
        (7, "hello-from-dev\n"),
        "{stderr}\n{}",
        again.log_tail(40)
    );
    again.kill()?;
    Ok(())
}
