//! The Docker engine the Docker tests use: the one `DOCKER_HOST` names (`.ci/run` starts a private
//! `dockerd` and exports it), the `docker` CLI, and a tiny test image built locally (no registry
//! is reachable in CI): busybox-static as `/bin/sh` and friends plus the host's `bash` with its
//! shared libraries, `docker import`ed as [`TEST_IMAGE`].

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// The locally built image with `/bin/sh` and `bash`.
pub const TEST_IMAGE: &str = "cronium-test/bash:1";

/// Runs the docker CLI and returns its stdout.
pub fn docker_cli(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the docker CLI")?;
    if !output.status.success() {
        bail!(
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Checks that a Docker engine is reachable (with a message saying how to get one when it is
/// not) and builds [`TEST_IMAGE`] if the engine lacks it.
pub fn require_engine() -> Result<()> {
    let reachable = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    ensure!(
        reachable,
        "the Docker tests need a Docker engine: start dockerd and set DOCKER_HOST=unix:///path/to/docker.sock \
         (`.ci/run` does both; see the README, \"Running the Docker tests\"); DOCKER_HOST is {:?}",
        std::env::var("DOCKER_HOST").ok()
    );
    build_test_image()
}

/// The ids of the containers (running or not) labelled with this job id.
pub fn containers_of_job(job_id: &str) -> Result<Vec<String>> {
    Ok(docker_cli(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=cronium.job={job_id}"),
    ])?
    .lines()
    .map(str::to_owned)
    .collect())
}

fn build_test_image() -> Result<()> {
    let present = Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let root_path = root.path().join("rootfs");
    let copy = |source: &Path, target: &Path| -> Result<()> {
        let target = root_path.join(target.strip_prefix("/").unwrap_or(target));
        std::fs::create_dir_all(target.parent().context("a parent")?)?;
        std::fs::copy(source, &target).with_context(|| format!("copying {}", source.display()))?;
        Ok(())
    };
    for dir in ["bin", "tmp", "job", "etc"] {
        std::fs::create_dir_all(root_path.join(dir))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root_path.join("tmp"),
        std::fs::Permissions::from_mode(0o1777),
    )?;
    std::fs::write(root_path.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n")?;
    copy(Path::new("/bin/busybox"), Path::new("/bin/busybox"))
        .context("the Docker tests need busybox-static (apt-get install busybox-static)")?;
    for applet in [
        "sh", "cat", "rm", "sleep", "ls", "env", "echo", "true", "id", "touch",
    ] {
        std::os::unix::fs::symlink("busybox", root_path.join("bin").join(applet))?;
    }
    copy(Path::new("/bin/bash"), Path::new("/bin/bash"))?;
    let ldd = Command::new("ldd").arg("/bin/bash").output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/…/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
            copy(&std::fs::canonicalize(path)?, Path::new(path))?;
        }
    }
    let tar = root.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root_path)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar failed");
    // Importing the same tag from two test processes at once is harmless.
    docker_cli(&["import", &tar.to_string_lossy(), TEST_IMAGE])?;
    Ok(())
}
