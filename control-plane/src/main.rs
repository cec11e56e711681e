//! `cronium`: the control plane and the operator CLI. All logic lives in the library.

/// mimalloc instead of the C library's allocator: the control plane allocates and frees small
/// buffers on many threads at once (frames, rows, statements), and glibc's `malloc` spent about
/// a third of the runtime's time under a 1,000-agent fan-out (README, "Fan-out").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cronium_control_plane::cli::main()
}
