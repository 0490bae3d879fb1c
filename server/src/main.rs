//! `herald`: parse the command line and hand over to the library.

use clap::Parser;

/// mimalloc rather than glibc's malloc: 8–20% less CPU per publish and per
/// storm, for 0.6–1.0 KiB more RSS per idle session (docs/BENCHMARKS.md,
/// "mimalloc, third try").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    herald_server::cli::main(herald_server::cli::Cli::parse())
}
