//! Build script of the control plane.
//!
//! - Rebuilds when the embedded migrations change.
//! - Builds the web console in `../web` with npm (`npm ci` when `web/node_modules` is missing or
//!   older than `package-lock.json`, then `npm run build` into `$OUT_DIR/web`) and writes
//!   `$OUT_DIR/web_assets.rs`, which embeds every built file with `include_bytes!`
//!   (`src/http/ui.rs` serves them). Cargo reruns this only when the console's sources change,
//!   so an unchanged `web/` costs nothing on later builds.
//! - `CRONIUM_WEB_DIST=DIR` embeds an already built console from `DIR` instead (no npm needed).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

/// The oldest Node.js the console's build tools (Vite) run on.
const MIN_NODE: (u32, u32) = (20, 19);

/// What to install when Node.js or npm is missing or too old.
const INSTALL_HINT: &str = "building the control plane builds its web console (web/) with npm: \
     install Node.js 20.19 or newer with npm (Debian 13: `apt-get install nodejs npm`; \
     `.ci/run` installs them when they are missing), or set CRONIUM_WEB_DIST to a directory \
     holding an already built console (`npm run build` in web/ makes web/dist)";

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-env-changed=CRONIUM_WEB_DIST");

    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let web = manifest_dir
        .parent()
        .map(|root| root.join("web"))
        .unwrap_or_else(|| fail("the control plane's manifest dir has no parent"));
    let dist = match std::env::var_os("CRONIUM_WEB_DIST") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            println!("cargo:rerun-if-changed={}", dir.display());
            if !dir.join("index.html").is_file() {
                fail(&format!(
                    "CRONIUM_WEB_DIST={} holds no index.html: point it at the output of `npm run build` in web/",
                    dir.display()
                ));
            }
            dir
        }
        None => {
            watch_sources(&web);
            let dist = out_dir.join("web");
            build_console(&web, &dist);
            dist
        }
    };
    write_asset_table(&dist, &out_dir.join("web_assets.rs"));
}

/// Tells cargo which files of `web/` the build depends on (never `node_modules/`).
fn watch_sources(web: &Path) {
    for name in [
        "src",
        "public",
        "package.json",
        "package-lock.json",
        "tsconfig.json",
    ] {
        // A path that does not exist would make cargo rerun this script on every build.
        let path = web.join(name);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let entries = std::fs::read_dir(web)
        .unwrap_or_else(|error| fail(&format!("cannot read {}: {error}", web.display())));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".html") || name.starts_with("vite.config.") {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
}

/// `npm ci` if needed, then `npm run build` into `dist`.
fn build_console(web: &Path, dist: &Path) {
    check_node();
    // Two builds sharing one web/ (e.g. two target dirs) must not run npm there at the same time.
    let lock_path = std::env::temp_dir().join(format!(
        "cronium-web-build-{:016x}.lock",
        fnv1a(web.to_string_lossy().as_bytes())
    ));
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|error| fail(&format!("cannot create {}: {error}", lock_path.display())));
    lock.lock()
        .unwrap_or_else(|error| fail(&format!("cannot lock {}: {error}", lock_path.display())));

    if dependencies_stale(web) {
        run_npm(web, &["ci", "--no-audit", "--no-fund"]);
    }
    let dist_arg = dist.to_string_lossy().into_owned();
    run_npm(
        web,
        &[
            "run",
            "build",
            "--",
            "--outDir",
            &dist_arg,
            "--emptyOutDir",
            "--logLevel",
            "warn",
        ],
    );
    if !dist.join("index.html").is_file() {
        fail(&format!(
            "`npm run build` wrote no index.html into {}",
            dist.display()
        ));
    }
}

/// Whether `node_modules` is missing or older than `package-lock.json` (npm writes
/// `node_modules/.package-lock.json` on every install).
fn dependencies_stale(web: &Path) -> bool {
    let modified = |path: PathBuf| {
        std::fs::metadata(path)
            .and_then(|metadata| metadata.modified())
            .ok()
    };
    match (
        modified(web.join("node_modules/.package-lock.json")),
        modified(web.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed < lock,
        (None, _) => true,
        (Some(_), None) => {
            fail("web/package-lock.json is missing: it is committed with web/package.json")
        }
    }
}

fn check_node() {
    let version = match Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(output) => fail(&format!(
            "`node --version` failed ({}); {INSTALL_HINT}",
            output.status
        )),
        Err(error) => fail(&format!(
            "Node.js (`node`) not found ({error}); {INSTALL_HINT}"
        )),
    };
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_NODE {
        fail(&format!("Node.js {version} is too old; {INSTALL_HINT}"));
    }
    if let Err(error) = Command::new("npm").arg("--version").output() {
        fail(&format!("npm not found ({error}); {INSTALL_HINT}"));
    }
}

fn run_npm(web: &Path, args: &[&str]) {
    let started = SystemTime::now();
    let output: Output = Command::new("npm")
        .args(args)
        .current_dir(web)
        // The console never needs npm's update check or colours in a build log.
        .env("NO_UPDATE_NOTIFIER", "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|error| fail(&format!("cannot run npm ({error}); {INSTALL_HINT}")));
    if !output.status.success() {
        fail(&format!(
            "`npm {}` in {} failed ({}):\n{}\n{}",
            args.join(" "),
            web.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    // Shown by `cargo build -vv`; keeps the cost of the console's build visible.
    eprintln!(
        "npm {} took {:.1} s",
        args.join(" "),
        started
            .elapsed()
            .map(|elapsed| elapsed.as_secs_f64())
            .unwrap_or(0.0)
    );
}

/// Writes `FILES: &[Asset]`, one entry per file under `dist`, sorted by path.
fn write_asset_table(dist: &Path, target: &Path) {
    let mut files = Vec::new();
    collect_files(dist, dist, &mut files);
    files.sort();
    let mut code = String::from(
        "// Generated by control-plane/build.rs from the built web console. Do not edit.\n\n\
         /// Every file of the built console: path relative to `/ui/`, contents, ETag.\n\
         pub static FILES: &[Asset] = &[\n",
    );
    for relative in &files {
        let absolute = dist.join(relative);
        let bytes = std::fs::read(&absolute)
            .unwrap_or_else(|error| fail(&format!("cannot read {}: {error}", absolute.display())));
        writeln!(
            code,
            "    Asset {{ path: {:?}, contents: include_bytes!({:?}), etag: \"\\\"{:016x}\\\"\" }},",
            relative,
            absolute.to_string_lossy(),
            fnv1a(&bytes),
        )
        .unwrap_or_else(|error| fail(&format!("formatting the asset table: {error}")));
    }
    code.push_str("];\n");
    std::fs::write(target, code)
        .unwrap_or_else(|error| fail(&format!("cannot write {}: {error}", target.display())));
}

fn collect_files(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|error| fail(&format!("cannot read {}: {error}", dir.display())));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, files);
        } else if let Ok(relative) = path.strip_prefix(root) {
            let relative = relative.to_string_lossy().replace('\\', "/");
            files.push(relative);
        }
    }
}

/// FNV-1a, 64 bits: ETags and the lock file's name (no dependency needed for either).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(&format!("cargo did not set {name}")))
}

/// Stops the build with `message` (cargo shows a build script's stderr when it fails).
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
