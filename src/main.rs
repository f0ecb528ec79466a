//! The `gavel` binary: everything lives in the library.

/// mimalloc instead of the system allocator: requests allocate and free
/// small buffers on every worker thread, often freeing on another thread
/// than the one that allocated, which glibc's malloc handles slowly (it was
/// about a fifth of the process's CPU under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match gavel::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gavel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
