//! `hermes modules …` without the `hermes` binary: the same subcommands, for tests and for
//! trying the installer on a host (`cargo run -p hermes-modules --example hermes-modules -- resolve --help`).

use std::process::ExitCode;

use clap::Parser;
use hermes_modules::cli::{ModulesCommand, run_command};

/// Memory module installer.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ModulesCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", hermes_node_api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
