//! `ticketops undo OPERATION_ID`: reverts a fix, a merge, an import or a soft-delete run
//! (the engine: `crate::undo`).
//!
//! - Rows recorded with before/after images (`fix` rows of the fixes, `update` rows of the
//!   imports, in tickets, users or comments) get their before-image back, tag sets included.
//! - Tickets an import inserted (`insert` rows and `insert_ids` ranges) are soft-deleted.
//! - A soft-delete run is restored (`restore --operation`).
//!
//! A row changed since the operation (its current values differ from the operation's
//! after-image; for an inserted ticket, another operation wrote it last) is a conflict:
//! reported and left alone unless `--force`. An undo is an operation itself, a dry run by
//! default, and records its own before/after images, so it can be undone in turn.

use std::io::Write as _;

use anyhow::Context as _;
use diesel::PgConnection;
use serde_json::json;

use crate::args::{ApplyArgs, BatchArgs, confirm};
use crate::context::Context;
use crate::db::{self};
use crate::exit::{self, UsageError};
use crate::layout::Layout;
use crate::operation;
use crate::output::{Cell, Table, escape_controls};
use crate::restore;
use crate::undo::{Part, Reverter, Undo};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --apply this is a dry run: it says how many rows would be reverted, how many are
already as they were, and how many changed since (conflicts). Undoing twice does nothing the
second time. Supported: every fix (set, tag, reassign, merge-users, apply), imports (updated
rows get their before-image back, inserted tickets are soft-deleted, inserted comments are
deleted, each recorded whole so that undoing the undo puts it back; users, organizations and
tags an import created stay), cleanup soft-delete runs, and undos.

Examples:
  ticketops undo 42
  ticketops undo 42 --apply --yes")]
pub struct Args {
    /// The operation to undo (see `ticketops ops list`)
    pub operation_id: i64,
    /// Also revert rows that changed since the operation
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub apply: ApplyArgs,
    #[command(flatten)]
    pub batching: BatchArgs,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let op = operation::find(&mut conn, args.operation_id)?.ok_or_else(|| {
        UsageError(format!(
            "there is no operation {} (see `ticketops ops list`)",
            args.operation_id
        ))
    })?;
    let parts = match crate::undo::what_to_undo(&mut conn, &op)? {
        Undo::SoftDelete => return undo_soft_delete(ctx, &pool, &mut conn, op.id, &args),
        Undo::Parts(parts) => parts,
    };

    // The plan (a pass over every row) is for the dry run and the confirmation question; with
    // --apply --yes the batches count the same things as they go.
    if args.apply.apply && args.apply.yes {
        return revert(ctx, &pool, &mut conn, op.id, parts, &args, None);
    }
    let plan = crate::undo::plan(&mut conn, op.id, &parts)?;
    let would = (plan.revertible + if args.force { plan.conflicts } else { 0 }) as u64;
    if !args.apply.apply {
        if ctx.global.json {
            ctx.print_json(
                &json!({"kind": "undo", "dry_run": true, "of_operation": op.id, "would_revert": would,
                                   "already_reverted": plan.already, "conflicts": plan.conflicts,
                                   "force": args.force}),
            )?;
        } else {
            crate::outln!(
                "dry run: undo of operation {} ({}) would revert {would} row(s); {} already as before; {} changed since{}",
                op.id,
                op.kind,
                plan.already,
                plan.conflicts,
                if args.force {
                    " (reverted too: --force)"
                } else {
                    " (left alone; --force reverts them)"
                }
            );
        }
        return Ok(exit::SUCCESS);
    }
    if would > 0 && asking(&args.apply) {
        print_sample(&mut conn, op.id, would)?;
    }
    if would > 0 && !confirm(&args.apply, "undo", would)? {
        ctx.info("not confirmed; nothing was written");
        return Ok(exit::FAILURE);
    }
    revert(ctx, &pool, &mut conn, op.id, parts, &args, Some(would))
}

/// Whether `confirm` will ask at a terminal (and the sample should be shown first).
fn asking(apply: &ApplyArgs) -> bool {
    !apply.yes && std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// What the question shows on stderr: a few values the undo puts back, as the operation left
/// them → as they were before it (an inserted row is removed).
fn print_sample(conn: &mut PgConnection, op: i64, would: u64) -> anyhow::Result<()> {
    const SAMPLE_VALUES: usize = 8;
    let shown = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => "∅".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let layout = Layout::of(conn)?;
    let changes = crate::audit::changes(conn, layout, op, 0, 3).context("cannot read the operation's audit trail")?;
    let mut table = Table::new(["key", "field", "now", "after undo"]);
    for c in changes.iter().take(SAMPLE_VALUES) {
        let (now, restored) = match c.field.as_str() {
            "(inserted)" => ("(inserted)".to_string(), "(removed)".to_string()),
            "(deleted)" => ("(deleted)".to_string(), "(put back)".to_string()),
            _ => (shown(&c.after), shown(&c.before)),
        };
        table.push(vec![
            Cell::text(escape_controls(&c.key)),
            Cell::text(&c.field),
            Cell::text(escape_controls(&now)),
            Cell::text(escape_controls(&restored)),
        ]);
    }
    let mut err = std::io::stderr().lock();
    writeln!(err, "undo of operation {op}: {would} row(s), for example:")?;
    table.write_aligned(&mut err)?;
    Ok(())
}

/// The real run: every part in batches, counting what was reverted, what was already as
/// before and what changed since.
fn revert(
    ctx: &Context,
    pool: &db::Pool,
    conn: &mut PgConnection,
    source_op: i64,
    parts: Vec<Part>,
    args: &Args,
    total: Option<u64>,
) -> anyhow::Result<i32> {
    let job = crate::job::Job::start(
        pool,
        ctx.database_url()?,
        conn,
        "undo",
        json!({"operation": source_op, "force": args.force}),
    )?;
    let mut reverter = Reverter::new(conn, source_op, job.operation_id, parts, args.force)?;
    let watch = ctx.watch(&job.kind).with_total(total);
    let stats = job.run(conn, &args.batching.settings(), &watch, |conn, limit| {
        reverter.step(conn, limit)
    });
    let rows = stats.rows;
    let conflicts = reverter.conflicts(rows);
    if conflicts > 0 && !ctx.global.quiet {
        eprintln!(
            "{conflicts} row(s) changed since operation {source_op} were left alone (use --force to revert them too)"
        );
    }
    ctx.finish_job(job.finish(
        conn,
        stats,
        json!({"reverted": rows, "of_operation": source_op, "conflicts": conflicts, "already_reverted": reverter.already()}),
    ))
}

/// An undo of a soft-delete run is a `restore --operation` of it, through the restore engine.
fn undo_soft_delete(
    ctx: &Context,
    pool: &db::Pool,
    conn: &mut PgConnection,
    op: i64,
    args: &Args,
) -> anyhow::Result<i32> {
    let settings = args.batching.settings();
    let preview = restore::preview_operation(conn, op, settings.batch_size as usize)?;
    if !args.apply.apply {
        ctx.info(preview.describe());
        if ctx.global.json {
            ctx.print_json(&json!({"kind": "undo", "dry_run": true, "of_operation": op,
                                   "would_revert": preview.restorable, "would_affect": preview.restorable}))?;
        } else {
            crate::outln!(
                "dry run: undo of operation {op} would restore {} ticket(s); nothing was written",
                preview.restorable
            );
        }
        return Ok(exit::SUCCESS);
    }
    if asking(&args.apply) {
        print_sample(conn, op, preview.restorable as u64)?;
    }
    if !confirm(&args.apply, "undo", preview.restorable as u64)? {
        ctx.info("not confirmed; nothing was written");
        return Ok(exit::FAILURE);
    }
    let done = restore::restore_operation(
        pool,
        ctx.database_url()?,
        conn,
        op,
        &settings,
        &ctx.watch(restore::KIND).with_total(Some(preview.restorable as u64)),
    )?;
    if let Some(note) = done.skipped_note(op) {
        ctx.info(note);
    }
    ctx.finish_job(done.summary)
}
