//! `ticketops restore --operation ID` and `ticketops restore [filters] --only-deleted`:
//! undo soft-deletes, batched like the cleanup that made them.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use serde_json::json;

use crate::batch::{self, BatchArgs, Step};
use crate::cli::Context;
use crate::cmd::cleanup::SOFT_DELETE_ACTION;
use crate::db::{self, AdvisoryLock};
use crate::exit::{self, UsageError};
use crate::filters::{DeletedScope, RestateUnchanged, TicketFilters};
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
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    after: serde_json::Value,
}

/// The tickets a soft-delete operation deleted, read from its audit trail one audit row (one
/// of its batches) at a time, so that memory does not grow with the operation's size, and cut
/// into chunks of at most `chunk` ids, each with the deleted_at that batch set.
struct DeletedBatches {
    source_op: i64,
    chunk: usize,
    /// The last audit row read.
    after_audit_id: i64,
    pending: std::collections::VecDeque<(DateTime<Utc>, Vec<i64>)>,
}

impl DeletedBatches {
    fn new(source_op: i64, chunk: usize) -> DeletedBatches {
        DeletedBatches {
            source_op,
            chunk: chunk.max(1),
            after_audit_id: 0,
            pending: Default::default(),
        }
    }

    /// The next chunk, left in place until [`DeletedBatches::done_with_front`] (a batch that
    /// is rolled back and retried gets it again); `None` at the end.
    fn front(&mut self, conn: &mut PgConnection) -> anyhow::Result<Option<&(DateTime<Utc>, Vec<i64>)>> {
        while self.pending.is_empty() {
            let row: Option<AuditBatch> = diesel::sql_query(
                "SELECT id, after FROM audit_log
                 WHERE operation_id = $1 AND action = $2 AND after IS NOT NULL AND id > $3
                 ORDER BY id LIMIT 1",
            )
            .bind::<BigInt, _>(self.source_op)
            .bind::<diesel::sql_types::Text, _>(SOFT_DELETE_ACTION)
            .bind::<BigInt, _>(self.after_audit_id)
            .get_result(conn)
            .optional()?;
            let Some(row) = row else { return Ok(None) };
            let when: DateTime<Utc> = serde_json::from_value(row.after["deleted_at"].clone())
                .with_context(|| format!("unreadable deleted_at in audit row {}", row.id))?;
            let ids: Vec<i64> = serde_json::from_value(row.after["ids"].clone())
                .with_context(|| format!("unreadable ids in audit row {}", row.id))?;
            self.pending
                .extend(ids.chunks(self.chunk).map(|chunk| (when, chunk.to_vec())));
            self.after_audit_id = row.id;
        }
        Ok(self.pending.front())
    }

    fn done_with_front(&mut self) {
        self.pending.pop_front();
    }
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
            let restate = RestateUnchanged::check(&mut conn)?;
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
                    let restored = undelete(conn, op_id, &ids, before, restate)?;
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

/// Clears deleted_at on `ids` (locked by the caller), recording their before values; returns
/// how many changed.
fn undelete(
    conn: &mut PgConnection,
    op_id: i64,
    ids: &[i64],
    before: Vec<Option<DateTime<Utc>>>,
    restate: RestateUnchanged,
) -> anyhow::Result<u64> {
    let changed = diesel::sql_query(format!(
        "UPDATE tickets SET deleted_at = NULL, last_operation_id = $1{} WHERE id = ANY($2)",
        restate.set_tail(&[])
    ))
    .bind::<BigInt, _>(op_id)
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)?;
    audit_restored(conn, op_id, ids, before)?;
    Ok(changed as u64)
}

#[derive(diesel::QueryableByName)]
struct RestoredId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// One batch of `restore --operation`: those of `ids` still deleted by `source_op` (deleted_at
/// as it set it, last_operation_id its own) that no other transaction holds, locked and
/// restored in one statement (reached by `ctid`, as the soft-delete does). Returns their ids in
/// order.
fn undelete_its_own(
    conn: &mut PgConnection,
    op_id: i64,
    source_op: i64,
    deleted_at: DateTime<Utc>,
    ids: &[i64],
    restate: RestateUnchanged,
) -> anyhow::Result<Vec<i64>> {
    let mut restored: Vec<i64> = diesel::sql_query(format!(
        "UPDATE tickets SET deleted_at = NULL, last_operation_id = $1{}
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM tickets
                                WHERE id = ANY($2) AND deleted_at = $3 AND last_operation_id = $4
                                FOR NO KEY UPDATE SKIP LOCKED))
         RETURNING id",
        restate.set_tail(&[])
    ))
    .bind::<BigInt, _>(op_id)
    .bind::<Array<BigInt>, _>(ids)
    .bind::<diesel::sql_types::Timestamptz, _>(deleted_at)
    .bind::<BigInt, _>(source_op)
    .load::<RestoredId>(conn)?
    .into_iter()
    .map(|row| row.id)
    .collect();
    restored.sort_unstable();
    if !restored.is_empty() {
        audit_restored(conn, op_id, &restored, vec![Some(deleted_at); restored.len()])?;
    }
    Ok(restored)
}

/// One audit row per restored batch: the ids and the deleted_at each had.
fn audit_restored(
    conn: &mut PgConnection,
    op_id: i64,
    ids: &[i64],
    before: Vec<Option<DateTime<Utc>>>,
) -> anyhow::Result<()> {
    operation::audit_batch(
        conn,
        op_id,
        "tickets",
        RESTORE_ACTION,
        ids[0],
        Some(json!({"ids": ids, "deleted_at": before})),
        Some(json!({"deleted_at": null})),
    )?;
    Ok(())
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
    let chunk = args.batching.batch_size as usize;
    if DeletedBatches::new(source_op, chunk).front(conn)?.is_none() {
        return Err(UsageError(format!(
            "operation {source_op} ({}) soft-deleted no tickets; nothing to restore",
            op.kind
        ))
        .into());
    }
    if args.dry_run {
        // Still deleted by that operation: not restored since, not deleted again, not purged.
        let mut batches = DeletedBatches::new(source_op, chunk);
        let (mut total, mut count) = (0usize, 0i64);
        while let Some((when, ids)) = batches.front(conn)? {
            total += ids.len();
            count += tickets::table
                .filter(tickets::id.eq_any(ids))
                .filter(tickets::deleted_at.eq(when))
                .filter(tickets::last_operation_id.eq(source_op))
                .count()
                .get_result::<i64>(conn)?;
            batches.done_with_front();
        }
        if !ctx.global.quiet {
            eprintln!("operation {source_op} soft-deleted {total} ticket(s); {count} can be restored");
        }
        return dry_run_report(ctx, count);
    }
    let _lock = AdvisoryLock::try_acquire(pool, "restore")?;
    let stop = StopFlags::install()?;
    let op_id = operation::start_job(conn, "restore", json!({"operation": source_op}))?;
    let restate = RestateUnchanged::check(conn)?;
    let mut batches = DeletedBatches::new(source_op, chunk);
    let mut skipped = 0u64;
    let mut skipped_sample: Vec<i64> = Vec::new();
    let stats = batch::run(conn, &args.batching, &stop, ctx.global.verbose > 0, |conn, _limit| {
        let Some((when, ids)) = batches.front(conn)?.cloned() else {
            return Ok(Step { rows: 0, done: true });
        };
        let restorable = undelete_its_own(conn, op_id, source_op, when, &ids, restate)?;
        let restored = restorable.len() as u64;
        let left: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| restorable.binary_search(id).is_err())
            .collect();
        skipped += left.len() as u64;
        skipped_sample.extend(left.iter().take(10usize.saturating_sub(skipped_sample.len())));
        batches.done_with_front();
        Ok(Step {
            rows: restored,
            done: false,
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
