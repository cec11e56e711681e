//! Tidy checks: conventions a reviewer would otherwise have to remember.
//!
//! They run as a unit test (so `cargo xtask test` runs them) and as `cargo xtask tidy`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Crates whose sources are checked.
const CRATES: &[&str] = &[
    "protocol",
    "control-plane",
    "agent",
    "tests",
    "bench",
    "xtask",
];

/// The marker in docs/protocol.md recording the hash of protocol/src.
const PROTOCOL_HASH_MARKER: &str = "protocol-src-sha256:";

/// Every problem found, as a readable line.
pub fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for krate in CRATES {
        collect_rust_files(&root.join(krate), &mut files);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let relative = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        if !text.trim_start().starts_with("//!") {
            problems.push(format!("{relative}: every module starts with `//!` docs"));
        }
        // Built from pieces so this file does not trip its own check.
        for forbidden in [concat!("#[", "ignore"), concat!("#[", "should_panic")] {
            if text.contains(forbidden) {
                problems.push(format!("{relative}: `{forbidden}]` is not allowed (fix the test, or make it deterministic)"));
            }
        }
    }
    problems.extend(check_protocol_doc(root));
    problems.extend(check_code_map(root));
    problems
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if path.is_dir() {
            if name != "target" && name != "fuzz" && !name.starts_with('.') {
                collect_rust_files(&path, files);
            }
        } else if name.ends_with(".rs") && name != "build.rs" {
            files.push(path);
        }
    }
}

/// SHA-256 over the protocol crate's sources (paths and contents, in path order).
pub fn protocol_hash(root: &Path) -> String {
    let mut files = Vec::new();
    collect_rust_files(&root.join("protocol/src"), &mut files);
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(
            file.strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string()
                .as_bytes(),
        );
        hasher.update(std::fs::read(&file).unwrap_or_default());
    }
    hex::encode(hasher.finalize())
}

/// docs/protocol.md must be reviewed whenever the protocol changes: it records the hash of the
/// protocol sources it describes.
fn check_protocol_doc(root: &Path) -> Vec<String> {
    let doc = std::fs::read_to_string(root.join("docs/protocol.md")).unwrap_or_default();
    let expected = protocol_hash(root);
    let recorded = doc
        .lines()
        .find_map(|line| line.split(PROTOCOL_HASH_MARKER).nth(1))
        .map(|rest| rest.trim().trim_end_matches("-->").trim());
    if recorded == Some(expected.as_str()) {
        Vec::new()
    } else {
        vec![format!(
            "docs/protocol.md is stale: protocol/src changed; update the document, then set its marker to `<!-- {PROTOCOL_HASH_MARKER} {expected} -->`"
        )]
    }
}

/// ARCHITECTURE.md's code map must name every module directory and top-level module file.
fn check_code_map(root: &Path) -> Vec<String> {
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap_or_default();
    let mut problems = Vec::new();
    for krate in ["protocol", "control-plane", "agent"] {
        let Ok(entries) = std::fs::read_dir(root.join(krate).join("src")) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let module = name.trim_end_matches(".rs");
            if matches!(module, "lib" | "main") {
                continue;
            }
            let shown = if entry.path().is_dir() {
                format!("{krate}/src/{module}/")
            } else {
                format!("{krate}/src/{name}")
            };
            if !map.contains(&shown) {
                problems.push(format!(
                    "ARCHITECTURE.md's code map does not mention `{shown}`"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tree_is_tidy() {
        let problems = super::check(&crate::project_root());
        assert!(
            problems.is_empty(),
            "tidy problems:\n{}",
            problems.join("\n")
        );
    }
}
