//! Entry point: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use nexus_analytics::cli::{Cli, ConfigFailure, execute};

fn main() -> ExitCode {
    match execute(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigFailure>() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
