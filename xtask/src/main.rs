//! `cargo xtask`: project automation.
//!
//! - `cargo xtask test [NEXTEST ARGS…]` — the whole test suite: builds every binary (the
//!   end-to-end tests start the real `cronium` and `cronium-agent`), installs web/'s npm
//!   packages if needed (the browser test uses playwright-core), then runs
//!   `cargo nextest run --workspace` (which includes the tidy checks below), then the store's
//!   tests again with `CRONIUM_TEST_DATABASE=postgres` (unless nextest arguments were given). The Docker tests
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
            nextest.args(&args[1..]);
            let postgres_pass = args.len() == 1;
            match nextest.status() {
                // The store's tests again, on PostgreSQL (store::test_db starts a throwaway
                // cluster); only for the whole suite, not when nextest arguments narrow it.
                Ok(status) if status.success() && postgres_pass => {
                    let mut postgres = Command::new(cargo());
                    postgres
                        .current_dir(&root)
                        .env("CRONIUM_TEST_DATABASE", "postgres")
                        .args(["nextest", "run", "-p", "cronium-control-plane", "--lib"]);
                    if std::env::var_os("CI").is_some() {
                        postgres.args(["--profile", "ci"]);
                    }
                    postgres.args(["-E", "test(/^store::/) | test(every_sealed_column)"]);
                    match postgres.status() {
                        Ok(status) if status.success() => ExitCode::SUCCESS,
                        _ => ExitCode::FAILURE,
                    }
                }
                Ok(status) if status.success() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(error) => {
                    eprintln!(
                        "xtask: cannot run cargo nextest ({error}); install it with `cargo install cargo-nextest --locked`"
                    );
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
            eprintln!("usage: cargo xtask test [NEXTEST ARGS…] | cargo xtask tidy");
            ExitCode::FAILURE
        }
    }
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
