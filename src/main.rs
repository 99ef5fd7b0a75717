//! The `ticketops` binary: parse the command line, run the command, turn the result into an
//! exit code. Everything else lives in the library so that tests can call it.

use clap::Parser;
use ticketops::cli::Cli;
use ticketops::exit;

fn main() {
    // A `.env` file in the working directory is honoured, before arguments are parsed, so
    // that `DATABASE_URL` from it feeds clap's `env` fallback. A missing file is not an error.
    if std::path::Path::new(".env").is_file()
        && let Err(err) = dotenvy::from_path(".env")
    {
        eprintln!("warning: ignoring .env: {err}");
    }
    let cli = Cli::parse();
    let code = match ticketops::run(cli) {
        Ok(code) => code,
        Err(err) => exit::report(&err),
    };
    std::process::exit(code);
}
