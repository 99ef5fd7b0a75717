//! The command line: global options, the list of subcommands and the dispatch to them. Clap
//! types only; imported by `main` (through `lib::run`), never by an engine.

use clap::{Args, Parser, Subcommand};

use crate::cmd::*;
use crate::context::{Context, ProgressMode};
use crate::exit::EXIT_CODES_HELP;

/// Bulk import, cleanup and data fixes for a PostgreSQL customer-support database
/// (tickets, users, organizations, tags, comments).
#[derive(Debug, Parser)]
#[command(name = "ticketops", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// PostgreSQL connection URL or key/value string (a `.env` file in the working directory is
    /// honoured; without any, libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSERVICE are used)
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print the machine-readable result as JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// Progress bars on stderr (rows done of the total, rate, ETA; a spinner when the total is
    /// not cheap to count): auto draws them only when stderr is a terminal, always even when not
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,
    /// Print only errors on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More detail on stderr (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

impl GlobalArgs {
    pub fn into_opts(self) -> crate::context::GlobalOpts {
        crate::context::GlobalOpts {
            database_url: self.database_url,
            json: self.json,
            progress: self.progress,
            quiet: self.quiet,
            verbose: self.verbose,
        }
    }
}

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
    /// Cron-safe batch cleanup: soft-delete, purge (with archive), purge users
    Cleanup(cleanup::Args),
    /// Undo a soft-delete run, or bring back soft-deleted tickets matching filters
    Restore(restore::Args),
    /// The history of writing runs (bulk_operations)
    Ops(ops::Args),
    /// One-off data fixes: a dry run by default, --apply to write, every change audited
    Fix(fix::Args),
    /// Reports on the tickets: summary, backlog, flow, agents (table, CSV or JSON)
    Report(report::Args),
    /// Revert a fix, a merge, an import or a soft-delete run (a dry run by default)
    Undo(undo::Args),
    /// See tickets: a page of what filters select, or one ticket with its comments and history
    Tickets(tickets::Args),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish)
    Completions(completions::CompletionsArgs),
    /// Print the manual page (or write every page into a directory)
    Man(completions::ManArgs),
}

pub fn dispatch(ctx: &Context, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Migrate(args) => migrate::run(ctx, args),
        Command::Doctor(args) => doctor::run(ctx, args),
        Command::Import(args) => import::run(ctx, args),
        Command::Export(args) => export::run(ctx, args),
        Command::Cleanup(args) => cleanup::run(ctx, args),
        Command::Restore(args) => restore::run(ctx, args),
        Command::Ops(args) => ops::run(ctx, args),
        Command::Fix(args) => fix::run(ctx, args),
        Command::Report(args) => report::run(ctx, args),
        Command::Undo(args) => undo::run(ctx, args),
        Command::Tickets(args) => tickets::run(ctx, args),
        Command::Completions(args) => completions::completions(ctx, args, <Cli as clap::CommandFactory>::command()),
        Command::Man(args) => completions::man(ctx, args, <Cli as clap::CommandFactory>::command()),
    }
}
