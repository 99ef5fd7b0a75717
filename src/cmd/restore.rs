//! `ticketops restore --operation ID` and `ticketops restore [filters] --only-deleted`:
//! undo soft-deletes, batched like the cleanup that made them.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;

use crate::batch::{self, BatchArgs, Step};
use crate::cli::Context;
use crate::cmd::cleanup::SOFT_DELETE_ACTION;
use crate::db::{self, AdvisoryLock};
use crate::exit::{self, UsageError};
use crate::filters::{DeletedScope, TicketFilters};
use crate::operation;
use crate::schema::tickets;
use crate::signals::StopFlags;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ticketops restore --operation 42            # undo soft-delete run 42
  ticketops restore --only-deleted --tag vip --updated-after 2024-01-01

With --operation, exactly the rows that operation soft-deleted and that are still deleted by it
are restored; rows changed since (deleted again, or purged) are reported and left alone.")]
pub struct Args {
    /// Restore the tickets this soft-delete operation deleted
    #[arg(long, value_name = "ID", conflicts_with = "all")]
    pub operation: Option<i64>,
    #[command(flatten)]
    pub filters: TicketFilters,
    /// Allow restoring every soft-deleted ticket (no filter)
    #[arg(long)]
    pub all: bool,
    /// Show how many tickets would be restored; write nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub batching: BatchArgs,
}

pub const RESTORE_ACTION: &str = "restore";

#[derive(diesel::QueryableByName)]
struct AuditBatch {
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    after: serde_json::Value,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let kind = "restore";
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    match args.operation {
        Some(op) => restore_operation(ctx, &pool, &mut conn, op, &args),
        None => {
            if !args.filters.only_deleted {
                return Err(UsageError("restore needs --operation ID, or filters with --only-deleted".into()).into());
            }
            args.filters.require_filter_or_all(args.all, "restore")?;
            let resolved = args.filters.resolve()?;
            super::warn_about_unmatched_ids(ctx, &mut conn, &resolved)?;
            if args.dry_run {
                let count: i64 = resolved.query(DeletedScope::Only).count().get_result(&mut conn)?;
                return dry_run_report(ctx, count);
            }
            let _lock = AdvisoryLock::try_acquire(&pool, kind)?;
            let stop = StopFlags::install()?;
            let op_id = operation::start_job(
                &mut conn,
                "restore",
                json!({"filters": args.filters.to_json(), "all": args.all}),
            )?;
            let mut last_id = 0i64;
            let stats = batch::run(
                &mut conn,
                &args.batching,
                &stop,
                ctx.global.verbose > 0,
                |conn, limit| {
                    let (ids, last_candidate) = resolved.lock_batch(conn, DeletedScope::Only, last_id, limit as i64)?;
                    let Some(max) = last_candidate else {
                        return Ok(Step { rows: 0, done: true });
                    };
                    last_id = max;
                    if ids.is_empty() {
                        return Ok(Step { rows: 0, done: false });
                    }
                    let before: Vec<Option<DateTime<Utc>>> = tickets::table
                        .select(tickets::deleted_at)
                        .filter(tickets::id.eq_any(&ids))
                        .order(tickets::id)
                        .load(conn)?;
                    let restored = undelete(conn, op_id, &ids, before)?;
                    Ok(Step {
                        rows: restored,
                        done: false,
                    })
                },
            );
            let rows = stats.rows;
            batch::finish(ctx, &mut conn, op_id, kind, stats, json!({"restored": rows}))
        }
    }
}

fn dry_run_report(ctx: &Context, count: i64) -> anyhow::Result<i32> {
    if ctx.global.json {
        ctx.print_json(&json!({"kind": "restore", "dry_run": true, "would_affect": count}))?;
    } else {
        println!("dry run: restore would bring back {count} ticket(s); nothing was written");
    }
    Ok(exit::SUCCESS)
}

/// Clears deleted_at on `ids`, recording their before values; returns how many changed.
fn undelete(
    conn: &mut PgConnection,
    op_id: i64,
    ids: &[i64],
    before: Vec<Option<DateTime<Utc>>>,
) -> anyhow::Result<u64> {
    let changed = diesel::update(tickets::table.filter(tickets::id.eq_any(ids)))
        .set((
            tickets::deleted_at.eq(None::<DateTime<Utc>>),
            tickets::last_operation_id.eq(op_id),
        ))
        .execute(conn)?;
    operation::audit_batch(
        conn,
        op_id,
        "tickets",
        RESTORE_ACTION,
        ids[0],
        Some(json!({"ids": ids, "deleted_at": before})),
        Some(json!({"deleted_at": null})),
    )?;
    Ok(changed as u64)
}

fn restore_operation(
    ctx: &Context,
    pool: &db::Pool,
    conn: &mut PgConnection,
    source_op: i64,
    args: &Args,
) -> anyhow::Result<i32> {
    if !args.filters.is_empty() {
        return Err(UsageError("--operation restores exactly that operation's rows; drop the filters".into()).into());
    }
    let op = operation::find(conn, source_op)?
        .ok_or_else(|| UsageError(format!("there is no operation {source_op} (see `ticketops ops list`)")))?;
    // The ids it soft-deleted, batch by batch, with the deleted_at it set.
    let batches: Vec<AuditBatch> = diesel::sql_query(
        "SELECT after FROM audit_log WHERE operation_id = $1 AND action = $2 AND after IS NOT NULL ORDER BY id",
    )
    .bind::<diesel::sql_types::BigInt, _>(source_op)
    .bind::<diesel::sql_types::Text, _>(SOFT_DELETE_ACTION)
    .load(conn)?;
    if batches.is_empty() {
        return Err(UsageError(format!(
            "operation {source_op} ({}) soft-deleted no tickets; nothing to restore",
            op.kind
        ))
        .into());
    }
    let mut work: Vec<(DateTime<Utc>, Vec<i64>)> = Vec::new();
    for b in batches {
        let when: DateTime<Utc> = serde_json::from_value(b.after["deleted_at"].clone())
            .context("unreadable deleted_at in the audit trail")?;
        let ids: Vec<i64> =
            serde_json::from_value(b.after["ids"].clone()).context("unreadable ids in the audit trail")?;
        for chunk in ids.chunks(args.batching.batch_size as usize) {
            work.push((when, chunk.to_vec()));
        }
    }
    let total: usize = work.iter().map(|(_, ids)| ids.len()).sum();
    // Still deleted by that operation: not restored since, not deleted again, not purged.
    let still_its_own = |ids: &[i64], when: DateTime<Utc>| {
        tickets::table
            .filter(tickets::id.eq_any(ids.to_vec()))
            .filter(tickets::deleted_at.eq(when))
            .filter(tickets::last_operation_id.eq(source_op))
            .into_boxed()
    };
    if args.dry_run {
        let mut count = 0i64;
        for (when, ids) in &work {
            count += still_its_own(ids, *when).count().get_result::<i64>(conn)?;
        }
        if !ctx.global.quiet {
            eprintln!("operation {source_op} soft-deleted {total} ticket(s); {count} can be restored");
        }
        return dry_run_report(ctx, count);
    }
    let _lock = AdvisoryLock::try_acquire(pool, "restore")?;
    let stop = StopFlags::install()?;
    let op_id = operation::start_job(conn, "restore", json!({"operation": source_op}))?;
    let mut next = 0usize;
    let mut skipped = 0u64;
    let mut skipped_sample: Vec<i64> = Vec::new();
    let stats = batch::run(conn, &args.batching, &stop, ctx.global.verbose > 0, |conn, _limit| {
        let Some((when, ids)) = work.get(next) else {
            return Ok(Step { rows: 0, done: true });
        };
        let candidates: Vec<i64> = still_its_own(ids, *when).select(tickets::id).load(conn)?;
        let rows: Vec<(i64, Option<DateTime<Utc>>)> = tickets::table
            .select((tickets::id, tickets::deleted_at))
            .filter(tickets::id.eq_any(&candidates))
            .filter(tickets::deleted_at.eq(*when))
            .filter(tickets::last_operation_id.eq(source_op))
            .order(tickets::id)
            .for_update()
            .skip_locked()
            .load(conn)?;
        let restorable: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let restored = if restorable.is_empty() {
            0
        } else {
            undelete(conn, op_id, &restorable, rows.iter().map(|r| r.1).collect())?
        };
        let left: Vec<i64> = ids.iter().copied().filter(|id| !restorable.contains(id)).collect();
        skipped += left.len() as u64;
        skipped_sample.extend(left.iter().take(10usize.saturating_sub(skipped_sample.len())));
        next += 1;
        Ok(Step {
            rows: restored,
            done: next >= work.len(),
        })
    });
    if skipped > 0 && !ctx.global.quiet {
        eprintln!(
            "{skipped} ticket(s) changed since operation {source_op} (restored, deleted again, purged or locked) were left alone, e.g. ids {skipped_sample:?}"
        );
    }
    let rows = stats.rows;
    batch::finish(
        ctx,
        conn,
        op_id,
        "restore",
        stats,
        json!({"restored": rows, "skipped_changed": skipped, "of_operation": source_op}),
    )
}
