//! Command-line types shared by every subcommand: global options and the run context.

use std::io::IsTerminal;

use anyhow::Context as _;
use clap::{Args, Parser, ValueEnum};

use crate::cmd::Command;
use crate::db;
use crate::exit::{EXIT_CODES_HELP, UsageError};

/// Bulk import, cleanup and data fixes for a PostgreSQL customer-support database
/// (tickets, users, organizations, tags, comments).
#[derive(Debug, Parser)]
#[command(name = "ticketops", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// PostgreSQL connection URL (a `.env` file in the working directory is honoured)
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print the machine-readable result as JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// Progress bars on stderr: auto shows them only when stderr is a terminal
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,
    /// Print only errors on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More detail on stderr (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Auto,
    Always,
    Never,
}

/// What every command gets: the global options and ways to act on them.
pub struct Context {
    pub global: GlobalOpts,
    /// Whether the command printed its JSON object (with --json, a failure prints one too).
    json_printed: std::cell::Cell<bool>,
}

impl Context {
    pub fn new(global: GlobalOpts) -> Self {
        Context {
            global,
            json_printed: std::cell::Cell::new(false),
        }
    }

    pub fn json_printed(&self) -> bool {
        self.json_printed.get()
    }

    pub fn database_url(&self) -> anyhow::Result<&str> {
        match self.global.database_url.as_deref() {
            Some(url) if !url.trim().is_empty() => Ok(url),
            _ => Err(UsageError(
                "no database given: set DATABASE_URL or pass --database-url (scripts/pg start prints one for the local server)"
                    .into(),
            )
            .into()),
        }
    }

    /// A pool of `size` connections to the configured database, checked to be reachable and
    /// to have every migration of this binary applied.
    pub fn pool(&self, size: u32) -> anyhow::Result<db::Pool> {
        db::connect_pool(self.database_url()?, size, db::SchemaCheck::UpToDate)
    }

    /// A pool to a database whose schema may be behind (for `doctor`, which reports it).
    pub fn pool_any_schema(&self, size: u32) -> anyhow::Result<db::Pool> {
        db::connect_pool(self.database_url()?, size, db::SchemaCheck::None)
    }

    pub fn show_progress(&self) -> bool {
        if self.global.quiet {
            return false;
        }
        match self.global.progress {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        }
    }

    /// Prints a human message on stderr unless `--quiet`.
    pub fn info(&self, message: impl std::fmt::Display) {
        if !self.global.quiet {
            eprintln!("{message}");
        }
    }

    /// Prints a JSON value as one line on stdout.
    pub fn print_json(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, value).context("cannot write to stdout")?;
        writeln!(out).context("cannot write to stdout")?;
        self.json_printed.set(true);
        Ok(())
    }
}
