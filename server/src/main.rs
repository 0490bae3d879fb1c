//! `herald`: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    herald_server::cli::main(herald_server::cli::Cli::parse())
}
