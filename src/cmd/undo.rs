//! `ticketops undo OPERATION_ID`: reverts a fix (from the before-images in `audit_log`) or a
//! soft-delete run. A row changed since the operation (its current values differ from the
//! operation's after-image) is a conflict: reported and left alone unless `--force`. An undo
//! is an operation itself, a dry run by default, and can be undone in turn.

use anyhow::{Context as _, bail};
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};
use serde_json::json;

use crate::batch::{self, BatchArgs, Step};
use crate::cli::Context;
use crate::cmd::cleanup::SOFT_DELETE_ACTION;
use crate::cmd::fix::{ApplyArgs, FIX_ACTION, confirm};
use crate::cmd::restore;
use crate::db::{self, AdvisoryLock};
use crate::exit::{self, UsageError};
use crate::filters::TicketFilters;
use crate::operation;
use crate::signals::StopFlags;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --apply this is a dry run: it says how many rows would be reverted, how many are
already as they were, and how many changed since (conflicts). Undoing twice does nothing the
second time. Supported: `fix` operations and `cleanup soft-delete` runs.

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

#[derive(QueryableByName)]
struct Action {
    #[diesel(sql_type = Text)]
    action: String,
}

#[derive(QueryableByName)]
struct Plan {
    #[diesel(sql_type = BigInt)]
    revertible: i64,
    #[diesel(sql_type = BigInt)]
    already: i64,
    #[diesel(sql_type = BigInt)]
    conflicts: i64,
}

#[derive(QueryableByName)]
struct Reverted {
    #[diesel(sql_type = BigInt)]
    reverted: i64,
    #[diesel(sql_type = BigInt)]
    last_audit_id: i64,
    #[diesel(sql_type = BigInt)]
    seen: i64,
}

/// The columns a fix can change, restored from the before-image (others keep their value).
const RESTORED_COLUMNS: &[&str] = &[
    "subject",
    "status",
    "priority",
    "channel",
    "assignee_id",
    "organization_id",
    "updated_at",
    "last_operation_id",
];

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    // Images hold timestamps as JSON text; compare them in one time zone whatever the session's.
    sql_query("SET TIME ZONE 'UTC'").execute(&mut conn)?;
    let op = operation::find(&mut conn, args.operation_id)?.ok_or_else(|| {
        UsageError(format!(
            "there is no operation {} (see `ticketops ops list`)",
            args.operation_id
        ))
    })?;
    let actions: Vec<Action> = sql_query("SELECT DISTINCT action FROM audit_log WHERE operation_id = $1")
        .bind::<BigInt, _>(op.id)
        .load(&mut conn)?;
    let has = |a: &str| actions.iter().any(|x| x.action == a);
    if has(FIX_ACTION) {
        undo_fix(ctx, &pool, &mut conn, op.id, &args)
    } else if has(SOFT_DELETE_ACTION) {
        if args.apply.apply && !confirm(&args.apply, "undo", 0)? {
            ctx.info("not confirmed; nothing was written");
            return Ok(exit::FAILURE);
        }
        let restore_args = restore::Args {
            operation: Some(op.id),
            filters: TicketFilters::default(),
            all: false,
            dry_run: !args.apply.apply,
            batching: args.batching.clone(),
        };
        restore::run(ctx, restore_args)
    } else if actions.is_empty() {
        Err(UsageError(format!(
            "operation {} ({}) changed no rows; there is nothing to undo",
            op.id, op.kind
        ))
        .into())
    } else {
        bail!(
            "undo of `{}` operations is not supported yet (operation {}); supported: fix, cleanup soft-delete",
            op.kind,
            op.id
        )
    }
}

fn plan(conn: &mut PgConnection, op_id: i64) -> anyhow::Result<Plan> {
    sql_query(
        "SELECT count(*) FILTER (WHERE to_jsonb(t) @> a.after) AS revertible,
                count(*) FILTER (WHERE NOT to_jsonb(t) @> a.after AND to_jsonb(t) @> a.before) AS already,
                count(*) FILTER (WHERE t.id IS NULL OR NOT (to_jsonb(t) @> a.after OR to_jsonb(t) @> a.before)) AS conflicts
         FROM audit_log a LEFT JOIN tickets t ON t.id = a.row_id
         WHERE a.operation_id = $1 AND a.action = $2 AND a.table_name = 'tickets'",
    )
    .bind::<BigInt, _>(op_id)
    .bind::<Text, _>(FIX_ACTION)
    .get_result(conn)
    .context("cannot compare the operation's rows with their current values")
}

fn undo_fix(
    ctx: &Context,
    pool: &db::Pool,
    conn: &mut PgConnection,
    source_op: i64,
    args: &Args,
) -> anyhow::Result<i32> {
    let p = plan(conn, source_op)?;
    let would = if args.force {
        p.revertible + p.conflicts
    } else {
        p.revertible
    } as u64;
    if !args.apply.apply {
        if ctx.global.json {
            ctx.print_json(
                &json!({"kind": "undo", "dry_run": true, "of_operation": source_op, "would_revert": would,
                                   "already_reverted": p.already, "conflicts": p.conflicts, "force": args.force}),
            )?;
        } else {
            println!(
                "dry run: undo of operation {source_op} would revert {would} row(s); {} already as before; {} changed since{}",
                p.already,
                p.conflicts,
                if args.force {
                    " (reverted too: --force)"
                } else {
                    " (left alone; --force reverts them)"
                }
            );
        }
        return Ok(exit::SUCCESS);
    }
    if would > 0 && !confirm(&args.apply, "undo", would)? {
        ctx.info("not confirmed; nothing was written");
        return Ok(exit::FAILURE);
    }
    let _lock = AdvisoryLock::try_acquire(pool, "undo")?;
    let stop = StopFlags::install()?;
    let op_id = operation::start_job(conn, "undo", json!({"operation": source_op, "force": args.force}))?;
    let set: Vec<String> = RESTORED_COLUMNS
        .iter()
        .map(|c| format!("{c} = (jsonb_populate_record(t, w.before)).{c}"))
        .collect();
    // Per batch of the operation's audit rows: lock the rows that may be reverted (skipping
    // rows others hold), put the before-image back, and record this undo's own before/after
    // so that it can be undone too.
    let sql = format!(
        "WITH a AS (
             SELECT id AS audit_id, row_id, before, after FROM audit_log
             WHERE operation_id = $1 AND action = '{FIX_ACTION}' AND table_name = 'tickets' AND id > $2
             ORDER BY id LIMIT $3
         ), work AS (
             SELECT t.id, a.before,
                    (SELECT jsonb_object_agg(k, to_jsonb(t) -> k) FROM jsonb_object_keys(a.before) k) AS current
             FROM tickets t JOIN a ON a.row_id = t.id
             WHERE (to_jsonb(t) @> a.after OR $4) AND NOT to_jsonb(t) @> a.before
             FOR UPDATE OF t SKIP LOCKED
         ), changed AS (
             UPDATE tickets t SET {set}
             FROM work w WHERE t.id = w.id
             RETURNING t.id, w.current, w.before
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {op_id}, 'tickets', id, '{FIX_ACTION}', current, before FROM changed
         )
         SELECT (SELECT count(*) FROM changed) AS reverted,
                coalesce((SELECT max(audit_id) FROM a), $2) AS last_audit_id,
                (SELECT count(*) FROM a) AS seen",
        set = set.join(", "),
    );
    let mut last_audit_id = 0i64;
    let stats = batch::run(conn, &args.batching, &stop, ctx.global.verbose > 0, |conn, limit| {
        let r: Reverted = sql_query(&sql)
            .bind::<BigInt, _>(source_op)
            .bind::<BigInt, _>(last_audit_id)
            .bind::<BigInt, _>(limit as i64)
            .bind::<Bool, _>(args.force)
            .get_result(conn)
            .context("cannot revert the batch")?;
        last_audit_id = r.last_audit_id;
        Ok(Step {
            rows: r.reverted as u64,
            done: r.seen == 0,
        })
    });
    let rows = stats.rows;
    let skipped = if args.force { 0 } else { p.conflicts };
    if skipped > 0 && !ctx.global.quiet {
        eprintln!(
            "{skipped} row(s) changed since operation {source_op} were left alone (use --force to revert them too)"
        );
    }
    batch::finish(
        ctx,
        conn,
        op_id,
        "undo",
        stats,
        json!({"reverted": rows, "of_operation": source_op, "conflicts": skipped, "already_reverted": p.already}),
    )
}
