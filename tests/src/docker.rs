//! The Docker engine the Docker tests use: the one `DOCKER_HOST` names (`.ci/run` starts a private
//! `dockerd` and exports it), the `docker` CLI, and tiny test images built locally (no registry
//! is reachable in CI), one per script kind ([`TestImage`]):
//!
//! - [`TEST_IMAGE`]: busybox-static as `/bin/sh` and friends, the host's `bash` and `curl`;
//! - [`PYTHON_IMAGE`]: busybox and Debian's `/usr/bin/python3` (3.11) with its standard library
//!   (without the test suite, IDLE, tkinter, ensurepip and the build configuration);
//! - [`NODE_IMAGE`]: busybox and the host's `/usr/bin/node`.
//!
//! Every program comes with the shared libraries `ldd` lists for it ([`copy_with_libraries`]).
//! An image is built only when a test asks for it and cached in the engine by its tag, so a
//! change of an image's content must bump its tag. Test processes run in parallel: builders take
//! a lock file in turn (the second one finds the image built) and import under a unique tag that
//! they then tag with the final name, so a tag always names a complete image.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

/// The locally built image with `/bin/sh`, `bash` and `curl`.
pub const TEST_IMAGE: &str = "cronium-test/bash:2";
/// The locally built image with `/bin/sh` and `python3`.
pub const PYTHON_IMAGE: &str = "cronium-test/python:1";
/// The locally built image with `/bin/sh` and `node`.
pub const NODE_IMAGE: &str = "cronium-test/node:1";

/// The busybox applets linked into every image (what test scripts and the helpers use).
const APPLETS: &[&str] = &[
    "sh", "cat", "cut", "date", "echo", "env", "false", "grep", "head", "id", "ls", "mkdir", "mv",
    "printf", "rm", "sed", "seq", "sleep", "tail", "test", "touch", "tr", "true", "wc",
];

/// Directories of `/usr/lib/python3.11` left out of the Python image.
const PYTHON_SKIPPED_DIRS: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "ensurepip",
    "config-3.11-x86_64-linux-gnu",
];

/// The Python the image is made of: Debian's, not a pyenv shim that may come first on `PATH`.
const PYTHON_BINARY: &str = "/usr/bin/python3";
/// Its standard library.
const PYTHON_STDLIB: &str = "/usr/lib/python3.11";
/// The Node.js the image is made of.
const NODE_BINARY: &str = "/usr/bin/node";

/// One of the locally built test images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestImage {
    /// [`TEST_IMAGE`].
    Bash,
    /// [`PYTHON_IMAGE`].
    Python,
    /// [`NODE_IMAGE`].
    Node,
}

impl TestImage {
    /// Every test image.
    pub const ALL: [TestImage; 3] = [TestImage::Bash, TestImage::Python, TestImage::Node];

    /// The image's tag.
    pub fn tag(self) -> &'static str {
        match self {
            TestImage::Bash => TEST_IMAGE,
            TestImage::Python => PYTHON_IMAGE,
            TestImage::Node => NODE_IMAGE,
        }
    }

    /// The event kind (`bash`, `python`, `nodejs`) whose interpreter the image has.
    pub fn kind(self) -> &'static str {
        match self {
            TestImage::Bash => "bash",
            TestImage::Python => "python",
            TestImage::Node => "nodejs",
        }
    }

    /// Builds the image if the engine lacks it.
    pub fn ensure(self) -> Result<()> {
        if image_present(self.tag()) {
            return Ok(());
        }
        let _lock = BuildLock::acquire()?;
        // Another process may have built it while this one waited for the lock.
        if image_present(self.tag()) {
            return Ok(());
        }
        let started = Instant::now();
        let temp = tempfile::Builder::new()
            .prefix("cronium-test-image-")
            .tempdir()?;
        let root = temp.path().join("rootfs");
        base_root(&root)?;
        match self {
            TestImage::Bash => {
                copy_with_libraries(&root, Path::new("/bin/bash"))?;
                copy_with_libraries(&root, Path::new("/usr/bin/curl"))
                    .context("the bash test image needs curl (apt-get install curl)")?;
            }
            TestImage::Python => {
                copy_with_libraries(&root, Path::new(PYTHON_BINARY)).context(
                    "the python test image needs Debian's python3 (apt-get install python3)",
                )?;
                copy_python_stdlib(&root)?;
            }
            TestImage::Node => {
                copy_with_libraries(&root, Path::new(NODE_BINARY))
                    .context("the node test image needs /usr/bin/node (apt-get install nodejs)")?;
            }
        }
        import(&root, &temp.path().join("rootfs.tar"), self.tag())?;
        eprintln!(
            "built the test image {} in {:.1} s",
            self.tag(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// The images Docker events without an `image` get: the control plane's
/// `--docker-image-bash`, `--docker-image-python` and `--docker-image-nodejs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultImages {
    pub bash: String,
    pub python: String,
    pub nodejs: String,
}

impl DefaultImages {
    /// The locally built test images ([`TEST_IMAGE`], [`PYTHON_IMAGE`], [`NODE_IMAGE`]).
    pub fn test_images() -> DefaultImages {
        DefaultImages {
            bash: TEST_IMAGE.to_owned(),
            python: PYTHON_IMAGE.to_owned(),
            nodejs: NODE_IMAGE.to_owned(),
        }
    }

    /// The control plane's command-line flags for these defaults.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--docker-image-bash", &self.bash),
            ("--docker-image-python", &self.python),
            ("--docker-image-nodejs", &self.nodejs),
        ]
        .into_iter()
        .flat_map(|(flag, image)| [flag.to_owned(), image.clone()])
        .collect()
    }
}

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
    require_engine_with(&[TestImage::Bash])
}

/// Checks that a Docker engine is reachable (with a message saying how to get one when it is
/// not) and builds those of `images` the engine lacks.
pub fn require_engine_with(images: &[TestImage]) -> Result<()> {
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
    for image in images {
        image
            .ensure()
            .with_context(|| format!("cannot build the test image {}", image.tag()))?;
    }
    Ok(())
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

fn image_present(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// An exclusive `flock` on a lock file per engine, held while an image is built.
struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    fn acquire() -> Result<BuildLock> {
        let engine = std::env::var("DOCKER_HOST").unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "cronium-test-images-{}.lock",
            &crate::sha256_hex(engine.as_bytes())[..16]
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: plain syscall on a descriptor this function owns; the lock goes with the file.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error).with_context(|| format!("lock {}", path.display()));
            }
        }
        Ok(BuildLock { _file: file })
    }
}

/// The part every image shares: `/bin/busybox` with its applets, `/tmp` (1777), `/job`, and an
/// `/etc/passwd` with root alone.
fn base_root(root: &Path) -> Result<()> {
    for dir in ["bin", "tmp", "job", "etc"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n")?;
    copy_file(root, Path::new("/bin/busybox"), Path::new("/bin/busybox"))
        .context("the Docker tests need busybox-static (apt-get install busybox-static)")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(())
}

/// Copies `source` to `target` (an absolute path inside the image) under `root`, following
/// symlinks and keeping the mode; a target that exists already is left alone.
fn copy_file(root: &Path, source: &Path, target: &Path) -> Result<()> {
    let target = root.join(target.strip_prefix("/").unwrap_or(target));
    if target.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(target.parent().context("a parent")?)?;
    std::fs::copy(source, &target).with_context(|| format!("copying {}", source.display()))?;
    Ok(())
}

/// Copies the executable or shared object `path` to the same path under `root`, with every
/// shared library `ldd` lists for it (at the path the loader asks for, the file behind it copied).
pub fn copy_with_libraries(root: &Path, path: &Path) -> Result<()> {
    copy_file(root, path, path)?;
    copy_libraries_of(root, path)
}

/// Copies the shared libraries `ldd` lists for `path` to the same paths under `root`.
fn copy_libraries_of(root: &Path, path: &Path) -> Result<()> {
    let ldd = Command::new("ldd")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ldd")?;
    // A static executable: ldd fails with "not a dynamic executable" and lists nothing.
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if line.contains("not found") {
            bail!(
                "ldd {}: a library is missing: {}",
                path.display(),
                line.trim()
            );
        }
        // `libc.so.6 => /lib/…/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        if let Some(library) = line.split_whitespace().find(|word| word.starts_with('/')) {
            let library = Path::new(library);
            let source = std::fs::canonicalize(library)
                .with_context(|| format!("resolving {}", library.display()))?;
            copy_file(root, &source, library)?;
        }
    }
    Ok(())
}

/// Copies the standard library (minus [`PYTHON_SKIPPED_DIRS`]) and the libraries its extension
/// modules need.
fn copy_python_stdlib(root: &Path) -> Result<()> {
    let stdlib = Path::new(PYTHON_STDLIB);
    ensure!(
        stdlib.join("os.py").is_file(),
        "the python test image needs Debian's python3.11 standard library in {PYTHON_STDLIB}"
    );
    let mut pending: Vec<PathBuf> = vec![stdlib.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if dir == stdlib
                && path
                    .file_name()
                    .is_some_and(|name| PYTHON_SKIPPED_DIRS.iter().any(|skip| name == *skip))
            {
                continue;
            }
            // Follows symlinks; a dangling one is left out.
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(path);
            } else if metadata.is_file() {
                copy_file(root, &path, &path)?;
                if path.extension().is_some_and(|extension| extension == "so") {
                    copy_libraries_of(root, &path)?;
                }
            }
        }
    }
    Ok(())
}

/// Packs `root` into `tar` and imports it as `tag`: under a unique tag first, then tagged, so
/// `tag` never names a half-imported image.
fn import(root: &Path, tar: &Path, tag: &str) -> Result<()> {
    let status = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .stdin(Stdio::null())
        .status()
        .context("running tar")?;
    ensure!(status.success(), "tar failed");
    let (repository, _) = tag.rsplit_once(':').unwrap_or((tag, ""));
    let unique = format!("{repository}:{}", crate::unique_marker("building"));
    docker_cli(&["import", &tar.to_string_lossy(), &unique])?;
    let tagged = docker_cli(&["tag", &unique, tag]);
    // Only the unique name goes; the image stays under `tag`.
    let untagged = docker_cli(&["rmi", &unique]);
    tagged?;
    untagged?;
    Ok(())
}
