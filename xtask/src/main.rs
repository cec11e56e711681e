//! `cargo xtask`: project automation.
//!
//! - `cargo xtask test [NEXTEST ARGS…]` — the whole test suite: builds every binary (the
//!   end-to-end tests start the real `cronium` and `cronium-agent`), installs web/'s npm
//!   packages if needed (the browser test uses playwright-core), then runs
//!   `cargo nextest run --workspace` (which includes the tidy checks below), then the suite
//!   again on PostgreSQL (unless nextest arguments were given; `cargo xtask test --postgres
//!   [NEXTEST ARGS…]` runs only that pass): `cronium-test-postgres` starts a throwaway server
//!   for the pass and `CRONIUM_TEST_DATABASE=postgres` gives every test a database of its own
//!   on it (see `postgres_pass`). The Docker tests
//!   need an engine: unless `DOCKER_HOST` names one, a private `dockerd` is started for the run
//!   (its own data dir and socket, no bridge, no iptables rules) and stopped afterwards.
//! - `cargo xtask tidy` — only the tidy checks.

mod docker;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    match args.first().map(String::as_str) {
        Some("test") => {
            let build = Command::new(cargo())
                .current_dir(&root)
                .args(["build", "--workspace", "--bins"])
                .status();
            if !matches!(build, Ok(status) if status.success()) {
                eprintln!("xtask: building the binaries failed");
                return ExitCode::FAILURE;
            }
            // The browser test runs web/'s playwright-core; the control plane's build script
            // installs web/node_modules, but only when the console needed building.
            if let Err(error) = install_web_dependencies(&root) {
                eprintln!("xtask: {error}");
                return ExitCode::FAILURE;
            }
            let engine = match docker::PrivateEngine::start_unless_configured() {
                Ok(engine) => engine,
                Err(error) => {
                    eprintln!("xtask: {error}");
                    return ExitCode::FAILURE;
                }
            };
            // `--postgres` first: only the PostgreSQL pass, with the nextest arguments after it.
            let postgres_only = args.get(1).map(String::as_str) == Some("--postgres");
            let nextest_args = &args[if postgres_only { 2 } else { 1 }..];
            if !postgres_only {
                let mut nextest = Command::new(cargo());
                if let Some(engine) = &engine {
                    nextest.env("DOCKER_HOST", engine.host());
                }
                nextest
                    .current_dir(&root)
                    .args(["nextest", "run", "--workspace"]);
                if std::env::var_os("CI").is_some() {
                    nextest.args(["--profile", "ci"]);
                }
                nextest.args(nextest_args);
                match nextest.status() {
                    Ok(status) if status.success() => {}
                    Ok(_) => return ExitCode::FAILURE,
                    Err(error) => {
                        eprintln!(
                            "xtask: cannot run cargo nextest ({error}); install it with `cargo install cargo-nextest --locked`"
                        );
                        return ExitCode::FAILURE;
                    }
                }
                // Arguments that narrow the run narrow it to the SQLite pass.
                if !nextest_args.is_empty() {
                    return ExitCode::SUCCESS;
                }
            }
            match postgres_pass(
                &root,
                engine.as_ref().map(|engine| engine.host()).as_deref(),
                nextest_args,
            ) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(error) => {
                    eprintln!("xtask: the PostgreSQL pass: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("tidy") => {
            let problems = tidy::check(&root);
            for problem in &problems {
                eprintln!("tidy: {problem}");
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => {
            eprintln!("usage: cargo xtask test [--postgres] [NEXTEST ARGS…] | cargo xtask tidy");
            ExitCode::FAILURE
        }
    }
}

/// The tests that touch a database (the control plane's and the end-to-end tests), again on
/// PostgreSQL: a throwaway server from `cronium-test-postgres` (stopped when its stdin closes,
/// so also when this process dies), and `CRONIUM_TEST_DATABASE=postgres` with its URL, so each
/// test's store, in-process control plane and `TestCluster` gets a database of its own on it.
/// Left out: `cronium dev` (embedded SQLite by design), the SQLite-only `cronium backup`, and the
/// control plane's full disk (its data dir on a small tmpfs: the SQLite file's disk; a
/// PostgreSQL server's disk is not the control plane's), and `pg_faults` and `exactly_once` (their
/// tests start a PostgreSQL cluster of their own in the first pass already; they would only
/// repeat).
/// Returns whether every test passed.
fn postgres_pass(
    root: &Path,
    docker_host: Option<&str>,
    nextest_args: &[String],
) -> Result<bool, String> {
    use std::io::BufRead;

    let binary = target_dir(root).join("debug").join("cronium-test-postgres");
    let mut server = Command::new(&binary)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {} ({error})", binary.display()))?;
    let mut line = String::new();
    let read = server
        .stdout
        .take()
        .map(|stdout| std::io::BufReader::new(stdout).read_line(&mut line));
    let url = match (read, line.trim().split_once('=')) {
        (Some(Ok(_)), Some(("CRONIUM_TEST_POSTGRES_URL", url))) => url.to_string(),
        _ => {
            let _ = server.kill();
            let _ = server.wait();
            return Err(format!(
                "cronium-test-postgres did not start a server (printed {line:?}); is the Debian postgresql package installed?"
            ));
        }
    };
    let mut nextest = Command::new(cargo());
    if let Some(host) = docker_host {
        nextest.env("DOCKER_HOST", host);
    }
    nextest
        .current_dir(root)
        .env("CRONIUM_TEST_DATABASE", "postgres")
        .env("CRONIUM_TEST_POSTGRES_URL", &url)
        // The whole workspace, as in the first pass, so nothing is compiled again with other
        // features; the filter picks the packages that touch a database.
        .args(["nextest", "run", "--workspace"]);
    if std::env::var_os("CI").is_some() {
        nextest.args(["--profile", "ci"]);
    }
    if nextest_args.is_empty() {
        nextest.args([
            "-E",
            "(package(cronium-control-plane) | package(cronium-e2e)) & not (binary(dev) | test(/backup/) | test(a_full_control_plane_disk_answers_507_stores_nothing_partial_and_recovers) | binary(pg_faults) | binary(exactly_once))",
        ]);
    }
    nextest.args(nextest_args);
    let status = nextest.status();
    // Closing stdin stops the server and removes its files.
    drop(server.stdin.take());
    let _ = server.wait();
    status
        .map(|status| status.success())
        .map_err(|error| format!("cannot run cargo nextest ({error})"))
}

/// Cargo's target dir: `CARGO_TARGET_DIR`, else `target/` in the workspace.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// `npm ci` in web/ when web/node_modules is missing or older than web/package-lock.json.
fn install_web_dependencies(root: &Path) -> Result<(), String> {
    let web = root.join("web");
    let modified = |path: PathBuf| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    let installed = modified(web.join("node_modules/.package-lock.json"));
    let locked = modified(web.join("package-lock.json"));
    if matches!((installed, locked), (Some(installed), Some(locked)) if installed >= locked) {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&web)
        .status()
        .map_err(|error| {
            format!("cannot run npm ({error}): install Node.js 20.19 or newer with npm")
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`npm ci` in {} failed ({status})", web.display()))
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The workspace root (the parent of this crate).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
