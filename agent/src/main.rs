//! The `porin` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    porin::cli::main()
}
