//! `serve --config`: the order flags, environment, file, default, and the file's checks.
//!
//! clap reads the environment when the command is built, and a test must not change its own
//! process's environment (other tests run beside it), so each test runs its checks in a child:
//! this test binary, started again for that one test with a cleared environment plus the
//! variables the test names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::parse;
use crate::cli::{Cli, Command, ServeArgs, server_config};
use crate::crypto::EncryptionKey;
use cronium_agent::logging::LogFormat;

/// Set in the child to the name of the test it runs.
const CHILD: &str = "CRONIUM_CONFIG_TEST_CHILD";

/// In the child started for `test`: `true` (run the checks). In the test itself: starts the
/// child with only `env` set, requires it to pass that one test, and returns `false`.
fn in_child(test: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return true;
    }
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::{test}"), "--exact", "--test-threads=1"])
        .env_clear()
        .env(CHILD, test)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the child for {test} failed:\n{stdout}\n{stderr}"
    );
    false
}

fn write_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("cronium.conf");
    std::fs::write(&path, text).unwrap();
    path
}

/// `cronium serve ARGS…`, parsed.
fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
    let cli: Cli = parse(["cronium", "serve"].into_iter().chain(args.iter().copied()))?;
    match cli.command {
        Command::Serve(args) => Ok(args),
        other => panic!("parsed as {other:?}"),
    }
}

fn serve_with(config: &Path, args: &[&str]) -> Result<ServeArgs, clap::Error> {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    serve(&all)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// The message of a refused command line.
fn refusal(result: Result<ServeArgs, clap::Error>) -> String {
    match result {
        Ok(args) => panic!("accepted: {args:?}"),
        Err(error) => error.to_string(),
    }
}

const FILE: &str = "# the file's values
CRONIUM_HTTP_ADDR=127.0.0.1:1001
CRONIUM_PUBLIC_URL = \"https://file.example\"
";

#[test]
fn without_the_environment_a_flag_beats_the_file_and_the_file_beats_the_default() {
    if !in_child(
        "without_the_environment_a_flag_beats_the_file_and_the_file_beats_the_default",
        &[],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), FILE);

    // The built-in defaults.
    let args = serve(&[]).unwrap();
    assert_eq!(args.http_addr, addr("0.0.0.0:8080"));
    assert_eq!(args.public_url, None);

    // The file beats the defaults (a defaulted flag and an optional one).
    let args = serve_with(&file, &[]).unwrap();
    assert_eq!(args.http_addr, addr("127.0.0.1:1001"));
    assert_eq!(args.public_url.as_deref(), Some("https://file.example"));

    // Flags beat the file, wherever `--config` is.
    let flags = [
        "--http",
        "127.0.0.1:1003",
        "--public-url",
        "https://flag.example",
    ];
    let args = serve_with(&file, &flags).unwrap();
    assert_eq!(args.http_addr, addr("127.0.0.1:1003"));
    assert_eq!(args.public_url.as_deref(), Some("https://flag.example"));
    let mut before = flags.to_vec();
    before.extend(["--config", file.to_str().unwrap()]);
    let args = serve(&before).unwrap();
    assert_eq!(args.http_addr, addr("127.0.0.1:1003"));
    assert_eq!(args.public_url.as_deref(), Some("https://flag.example"));
}

#[test]
fn the_environment_beats_the_file_and_a_flag_beats_the_environment() {
    if !in_child(
        "the_environment_beats_the_file_and_a_flag_beats_the_environment",
        &[
            ("CRONIUM_HTTP_ADDR", "127.0.0.1:1002"),
            ("CRONIUM_PUBLIC_URL", "https://env.example"),
        ],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), FILE);

    // The environment beats the file.
    let args = serve_with(&file, &[]).unwrap();
    assert_eq!(args.http_addr, addr("127.0.0.1:1002"));
    assert_eq!(args.public_url.as_deref(), Some("https://env.example"));

    // Flags beat the environment.
    let args = serve_with(
        &file,
        &[
            "--http",
            "127.0.0.1:1003",
            "--public-url",
            "https://flag.example",
        ],
    )
    .unwrap();
    assert_eq!(args.http_addr, addr("127.0.0.1:1003"));
    assert_eq!(args.public_url.as_deref(), Some("https://flag.example"));
}

#[test]
fn every_kind_of_setting_comes_from_the_file_and_is_checked_at_start_up() {
    if !in_child(
        "every_kind_of_setting_comes_from_the_file_and_is_checked_at_start_up",
        &[],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = EncryptionKey::generate_base64();
    // Settings the old reader ignored: a number, a flag, a list, a global one, a duration.
    let text = format!(
        "ENCRYPTION_KEY='{key}'\n\
         CRONIUM_DATA_DIR=/srv/cronium\n\
         CRONIUM_HEARTBEAT_SECONDS=10\n\
         CRONIUM_HTTP_JOBS_PUBLIC_ONLY=true\n\
         CRONIUM_ALLOWED_ORIGINS=https://a.example,https://b.example\n\
         CRONIUM_LOG_FORMAT=json\n\
         CRONIUM_TERMINAL_IDLE_TIMEOUT=90s\n\
         CRONIUM_DOCKER_IMAGE_PYTHON=python:3.12-slim\n\n\
         # CRONIUM_QUIC_ADDR=commented out\n"
    );
    let file = write_file(dir.path(), &text);
    let cli = parse(["cronium", "serve", "--config", file.to_str().unwrap()]).unwrap();
    assert_eq!(cli.log_format, LogFormat::Json);
    let Command::Serve(args) = cli.command else {
        panic!("parsed as something else");
    };
    assert_eq!(
        args.quic_addr,
        addr("0.0.0.0:7443"),
        "the comment is skipped"
    );
    assert_eq!(args.docker_images.docker_image_python, "python:3.12-slim");
    let terminals = args.terminals.config().unwrap();
    assert_eq!(
        terminals.allowed_origins,
        vec!["https://a.example", "https://b.example"]
    );
    assert_eq!(terminals.idle_timeout, Duration::from_secs(90));
    let config = server_config(args).unwrap();
    assert_eq!(config.data_dir, Path::new("/srv/cronium"));
    assert_eq!(config.heartbeat, Duration::from_secs(10));
    assert!(config.delivery.http_jobs_public_only);

    // A heartbeat only the file sets reaches the start-up check (the lease is 30 s).
    let file = write_file(
        dir.path(),
        &format!("ENCRYPTION_KEY={key}\nCRONIUM_HEARTBEAT_SECONDS=20\n"),
    );
    let error = server_config(serve_with(&file, &[]).unwrap()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("--lease-seconds (CRONIUM_LEASE_SECONDS, 30 s) must be at least twice --heartbeat-seconds (CRONIUM_HEARTBEAT_SECONDS, 20 s)"),
        "{error:#}"
    );
    // … and a flag still beats it.
    let args = serve_with(&file, &["--heartbeat-seconds", "5"]).unwrap();
    assert_eq!(
        server_config(args).unwrap().heartbeat,
        Duration::from_secs(5)
    );
}

#[test]
fn unknown_keys_repeated_keys_malformed_lines_and_bad_values_are_refused() {
    if !in_child(
        "unknown_keys_repeated_keys_malformed_lines_and_bad_values_are_refused",
        &[],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("cronium.conf");
    let name = name.display();

    // A variable that is no `serve` setting (an API client's), and a misspelt one.
    for key in ["CRONIUM_TOKEN", "CRONIUM_HEARTBEAT_SECS"] {
        let file = write_file(
            dir.path(),
            &format!("CRONIUM_HTTP_ADDR=127.0.0.1:1\n{key}=5\n"),
        );
        let message = refusal(serve_with(&file, &[]));
        assert!(
            message.contains(&format!("{name}, line 2: unknown setting {key}")),
            "{message}"
        );
    }

    let file = write_file(dir.path(), "# ok\n\nENCRYPTION_KEY abc-secret\n");
    let message = refusal(serve_with(&file, &[]));
    assert!(
        message.contains(&format!("{name}, line 3: not a KEY=VALUE line")),
        "{message}"
    );
    assert!(
        !message.contains("abc-secret"),
        "the line is not quoted: {message}"
    );

    let file = write_file(dir.path(), "export CRONIUM_HTTP_ADDR=127.0.0.1:1\n");
    let message = refusal(serve_with(&file, &[]));
    assert!(
        message.contains(&format!(
            "{name}, line 1: \"export CRONIUM_HTTP_ADDR\" is not an environment variable name"
        )),
        "{message}"
    );

    let file = write_file(
        dir.path(),
        "CRONIUM_LEASE_SECONDS=60\nCRONIUM_HTTP_ADDR=127.0.0.1:1\nCRONIUM_LEASE_SECONDS=90\n",
    );
    let message = refusal(serve_with(&file, &[]));
    assert!(
        message.contains(&format!(
            "{name}, line 3: CRONIUM_LEASE_SECONDS is set again (first on line 1)"
        )),
        "{message}"
    );

    // A value the flag refuses, even where a flag would win over it.
    let file = write_file(dir.path(), "CRONIUM_HTTP_ADDR=localhost\n");
    let message = refusal(serve_with(&file, &["--http", "127.0.0.1:1"]));
    assert!(
        message.contains(&format!("{name}, line 1: CRONIUM_HTTP_ADDR: invalid value")),
        "{message}"
    );
    let file = write_file(dir.path(), "CRONIUM_HTTP_JOBS_PUBLIC_ONLY=yes please\n");
    let message = refusal(serve_with(&file, &[]));
    assert!(
        message.contains(&format!(
            "{name}, line 1: CRONIUM_HTTP_JOBS_PUBLIC_ONLY: invalid value"
        )),
        "{message}"
    );

    let missing = dir.path().join("missing.conf");
    let message = refusal(serve_with(&missing, &[]));
    assert!(
        message.contains(&format!(
            "cannot read the config file {}",
            missing.display()
        )),
        "{message}"
    );

    // Without --config nothing is read, and other commands never take it.
    assert!(serve(&[]).is_ok());
    assert!(parse(["cronium", "dev", "--config", "x"]).is_err());
}
