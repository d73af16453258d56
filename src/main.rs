//! The `token-broker` binary: parses the command line and runs it (`token_broker::cli`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use token_broker::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let logs = token_broker::logging::init(cli.log_format, cli.long_running());
    let result = {
        let _flush = logs.flush_on_drop();
        cli::run(cli, logs.audit())
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            token_broker::console::eprintln(&format!("error: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// clap exits 2 on a usage error, which `verify-cert` and `token` use for "refused": a
/// usage error is a local problem (1). `--help` and `--version` succeed (0).
fn usage_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
