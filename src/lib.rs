//! ticketops: bulk operations on a PostgreSQL customer-support database.
//!
//! `cli` holds the command-line types, `cmd` one module per subcommand, `db` the pool,
//! timeouts and advisory locks, `import` the CSV import pipeline, `models` one file per table.

pub mod batch;
pub mod cli;
pub mod cmd;
pub mod conninfo;
pub mod db;
pub mod exit;
pub mod filters;
pub mod import;
pub mod models;
pub mod operation;
pub mod output;
pub mod schema;
pub mod signals;

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: cli::Cli) -> anyhow::Result<i32> {
    let ctx = cli::Context::new(cli.global);
    cmd::dispatch(&ctx, cli.command)
}
