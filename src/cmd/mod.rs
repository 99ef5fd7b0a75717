//! One module per subcommand: each has its clap `Args` and a `run` returning the exit code.

use clap::Subcommand;

use crate::cli::Context;

pub mod cleanup;
pub mod doctor;
pub mod export;
pub mod fix;
pub mod import;
pub mod migrate;
pub mod ops;
pub mod report;
pub mod restore;
pub mod undo;

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
    }
}

/// Says on stderr which `--ids-file` values match no ticket (a typo in a spreadsheet of ids
/// would otherwise only select less), before a writing command's dry run or run.
pub fn warn_about_unmatched_ids(
    ctx: &Context,
    conn: &mut diesel::PgConnection,
    filters: &crate::filters::ResolvedFilters,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let unmatched = filters
        .unmatched_ids(conn)
        .context("cannot check the ids file against the tickets")?;
    if let Some(warning) = unmatched.as_ref().and_then(|u| u.warning()) {
        ctx.info(warning);
    }
    Ok(())
}
