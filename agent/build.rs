//! Records the target triple so `cronium-agent version` can print it.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=CRONIUM_AGENT_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
