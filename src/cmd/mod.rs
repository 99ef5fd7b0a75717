//! One module per subcommand: each has its clap `Args` and a `run` returning the exit code.

use clap::Subcommand;

use crate::cli::Context;

pub mod doctor;
pub mod export;
pub mod import;
pub mod migrate;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply, revert or list the schema migrations embedded in this binary
    Migrate(migrate::Args),
    /// Check the connection, migrations, table sizes and foreign-key indexes
    Doctor(doctor::Args),
    /// Import a CSV dump of tickets, users or comments
    Import(import::Args),
    /// Export tickets, users or comments as CSV in the import format
    Export(export::Args),
}

pub fn dispatch(ctx: &Context, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Migrate(args) => migrate::run(ctx, args),
        Command::Doctor(args) => doctor::run(ctx, args),
        Command::Import(args) => import::run(ctx, args),
        Command::Export(args) => export::run(ctx, args),
    }
}
