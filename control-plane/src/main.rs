//! `cronium`: the control plane and the operator CLI. All logic lives in the library.

fn main() -> std::process::ExitCode {
    cronium_control_plane::cli::main()
}
