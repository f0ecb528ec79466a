//! The `gavel` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    match gavel::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gavel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
