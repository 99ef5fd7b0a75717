//! `ticketops restore --operation ID` and `ticketops restore [filters] --only-deleted`:
//! undo soft-deletes, batched like the cleanup that made them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;

use crate::args::BatchArgs;
use crate::context::Context;
use crate::db::{self};
use crate::exit::{self, UsageError};
use crate::filters::{DeletedScope, RestateUnchanged, TicketFilters};
use crate::job::{Job, Step};
use crate::restore::{self, undelete};
use crate::schema::tickets;

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
            let resolved = args.filters.resolve(&mut conn)?;
            if let Some(warning) = resolved.unmatched_ids_warning() {
                ctx.info(warning);
            }
            if args.dry_run {
                let count: i64 = resolved.query(DeletedScope::Only).count().get_result(&mut conn)?;
                return dry_run_report(ctx, count);
            }
            let job = Job::start(
                &pool,
                ctx.database_url()?,
                &mut conn,
                kind,
                json!({"filters": args.filters.to_json(), "all": args.all}),
            )?;
            let op_id = job.operation_id;
            let restate = RestateUnchanged::check(&mut conn)?;
            let layout = crate::layout::Layout::of(&mut conn)?;
            let mut last_id = 0i64;
            let watch = ctx.watch_counted(&job.kind, &mut conn, args.batching.max_rows, |c| {
                resolved.query(DeletedScope::Only).count().get_result(c)
            });
            let stats = job.run(&mut conn, &args.batching.settings(), &watch, |conn, limit| {
                let (ids, last_candidate) =
                    resolved.lock_batch(conn, DeletedScope::Only, last_id, limit as i64, layout)?;
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
            });
            let rows = stats.rows;
            ctx.finish_job(job.finish(&mut conn, stats, json!({"restored": rows})))
        }
    }
}

fn dry_run_report(ctx: &Context, count: i64) -> anyhow::Result<i32> {
    if ctx.global.json {
        ctx.print_json(&json!({"kind": "restore", "dry_run": true, "would_affect": count}))?;
    } else {
        crate::outln!("dry run: restore would bring back {count} ticket(s); nothing was written");
    }
    Ok(exit::SUCCESS)
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
    let settings = args.batching.settings();
    let preview = restore::preview_operation(conn, source_op, settings.batch_size as usize)?;
    if args.dry_run {
        ctx.info(preview.describe());
        return dry_run_report(ctx, preview.restorable);
    }
    let done = restore::restore_operation(
        pool,
        ctx.database_url()?,
        conn,
        source_op,
        &settings,
        &ctx.watch(restore::KIND).with_total(Some(preview.restorable as u64)),
    )?;
    if let Some(note) = done.skipped_note(source_op) {
        ctx.info(note);
    }
    ctx.finish_job(done.summary)
}
