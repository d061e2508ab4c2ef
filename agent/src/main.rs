//! The `porin` binary; everything lives in the library.

/// jemalloc with background threads: memory freed after a burst of connections goes back to the
/// system within seconds (glibc's malloc keeps it in its arenas).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    porin::cli::main()
}
