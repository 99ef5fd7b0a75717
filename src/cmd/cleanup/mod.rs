//! `ticketops cleanup soft-delete | purge | purge-users | retention`: the nightly cron jobs. Batched by
//! primary key with `SKIP LOCKED` row locks (`FOR NO KEY UPDATE` to soft-delete, `FOR UPDATE`
//! to purge; never waiting on rows the live application holds), short transactions with lock and statement timeouts, one advisory lock per job
//! (a second run exits 75), a clean stop on signals and limits, and a one-line JSON summary.

use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{PgConnection, sql_query};
use serde_json::json;

mod retention;

use crate::archive::{Archive, COMMENT_COLUMNS, Marks, TICKET_COLUMNS, archive_batch, cut_back};
use crate::args::BatchArgs;
use crate::audit::{self, Action};
use crate::context::Context;
use crate::db::{self};
use crate::exit;
use crate::filters::{DeletedScope, RestateUnchanged, TicketFilters, WalkPosition, parse_when};
use crate::job::{self, Step};
use crate::layout::Layout;
use crate::operation;
use crate::schema::{tickets, users};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub job: Job,
}

#[derive(Debug, clap::Subcommand)]
pub enum Job {
    /// Soft-delete the matching tickets (sets deleted_at) in batches; undo with `restore --operation ID`
    #[command(after_help = SOFT_DELETE_HELP)]
    SoftDelete {
        #[command(flatten)]
        filters: TicketFilters,
        /// Allow a run without any filter (every ticket)
        #[arg(long)]
        all: bool,
        /// Count and show a sample of the tickets that would be soft-deleted; write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        batching: BatchArgs,
    },
    /// Hard-delete tickets soft-deleted before AGE, with their comments and tag links
    #[command(after_help = PURGE_HELP)]
    Purge {
        /// Purge tickets soft-deleted before this: an age like 90d or a date/time
        #[arg(long, value_name = "AGE", value_parser = parse_when)]
        deleted_before: DateTime<Utc>,
        /// Append each batch's tickets to this CSV (import format) before deleting them
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
        /// Append each batch's comments to this CSV (import format) before deleting them
        #[arg(long, value_name = "FILE")]
        archive_comments: Option<PathBuf>,
        /// Count what would be purged; write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        batching: BatchArgs,
    },
    /// Remove tickets created before AGE for good (comments, tag links, audit rows too), archived first
    #[command(after_help = retention::HELP)]
    Retention(Box<retention::Args>),
    /// Hard-delete users soft-deleted before AGE who own no tickets and wrote no comments
    PurgeUsers {
        /// Purge users soft-deleted before this: an age like 180d or a date/time
        #[arg(long, value_name = "AGE", value_parser = parse_when)]
        deleted_before: DateTime<Utc>,
        /// Count what would be purged; write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        batching: BatchArgs,
    },
}

const SOFT_DELETE_HELP: &str = "\
Examples:
  ticketops cleanup soft-delete --status closed --updated-before 365d --dry-run
  ticketops cleanup soft-delete --status closed --updated-before 365d --sleep 100ms --max-runtime 30m --json

Rows locked by another transaction are skipped, not waited on; the next run picks them up.
Exit codes: 0 done (or stopped by --max-runtime/--max-rows), 1 failure, 2 usage, 75 another run
holds the lock, 130/143 stopped by a signal after the current batch.";

const PURGE_HELP: &str = "\
With --archive, each batch's tickets are appended to the archive in the import format and flushed
to disk before that batch's delete commits; if writing the archive fails, the batch is rolled back
and the run stops, so a ticket is never gone from both places. `ticketops import tickets ARCHIVE`
brings them back.

Example:
  ticketops cleanup purge --deleted-before 90d --archive purged.csv --archive-comments purged-comments.csv";

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    match args.job {
        Job::SoftDelete {
            filters,
            all,
            dry_run,
            batching,
        } => soft_delete(ctx, filters, all, dry_run, batching),
        Job::Purge {
            deleted_before,
            archive,
            archive_comments,
            dry_run,
            batching,
        } => purge(ctx, deleted_before, archive, archive_comments, dry_run, batching),
        Job::PurgeUsers {
            deleted_before,
            dry_run,
            batching,
        } => purge_users(ctx, deleted_before, dry_run, batching),
        Job::Retention(args) => retention::run(ctx, *args),
    }
}

#[derive(QueryableByName)]
struct SampleRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Text)]
    updated_at: String,
    #[diesel(sql_type = Text)]
    subject: String,
}

/// Prints the dry-run report: how many rows, and a sample.
fn print_dry_run(ctx: &Context, kind: &str, count: i64, sample: &[SampleRow]) -> anyhow::Result<i32> {
    if ctx.global.json {
        let rows: Vec<_> = sample
            .iter()
            .map(|r| json!({"id": r.id, "external_id": r.external_id, "status": r.status, "updated_at": r.updated_at, "subject": r.subject}))
            .collect();
        ctx.print_json(&json!({"kind": kind, "dry_run": true, "would_affect": count, "sample": rows}))?;
    } else {
        crate::outln!("dry run: {kind} would affect {count} ticket(s); nothing was written");
        if !sample.is_empty() {
            crate::outln!(
                "{:>10}  {:<14} {:<8} {:<20} subject",
                "id",
                "external_id",
                "status",
                "updated_at"
            );
            for r in sample {
                let subject: String = r.subject.chars().take(60).collect();
                crate::outln!(
                    "{:>10}  {:<14} {:<8} {:<20} {subject}",
                    r.id,
                    r.external_id,
                    r.status,
                    r.updated_at
                );
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// A dry run: how many tickets `query` selects, and a sample of them.
fn preview(
    ctx: &Context,
    conn: &mut PgConnection,
    kind: &str,
    query: impl Fn() -> tickets::BoxedQuery<'static, diesel::pg::Pg>,
) -> anyhow::Result<i32> {
    let count: i64 = query().count().get_result(conn)?;
    let ids: Vec<i64> = query()
        .select(tickets::id)
        .order(tickets::id)
        .limit(SAMPLE_SIZE)
        .load(conn)?;
    let sample = sample_of(conn, &ids)?;
    print_dry_run(ctx, kind, count, &sample)
}

fn sample_of(conn: &mut PgConnection, ids: &[i64]) -> anyhow::Result<Vec<SampleRow>> {
    sql_query(
        "SELECT id, external_id, status::text AS status,
                to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS updated_at, subject::text AS subject
         FROM tickets WHERE id = ANY($1) ORDER BY id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .load(conn)
    .context("cannot read the sample")
}

const SAMPLE_SIZE: i64 = 10;

fn soft_delete(
    ctx: &Context,
    filters: TicketFilters,
    all: bool,
    dry_run: bool,
    batching: BatchArgs,
) -> anyhow::Result<i32> {
    let kind = "cleanup soft-delete";
    filters.require_filter_or_all(all, kind)?;
    if filters.only_deleted || filters.include_deleted {
        return Err(exit::UsageError(
            "soft-delete works on tickets that are not deleted; drop --include-deleted/--only-deleted".into(),
        )
        .into());
    }
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let resolved = filters.resolve(&mut conn)?;
    if let Some(warning) = resolved.unmatched_ids_warning() {
        ctx.info(warning);
    }
    if dry_run {
        return preview(ctx, &mut conn, kind, || resolved.query(DeletedScope::Exclude));
    }
    let job = job::Job::start(
        &pool,
        ctx.database_url()?,
        &mut conn,
        kind,
        json!({"filters": filters.to_json(), "all": all, "batching": batching.settings().to_json()}),
    )?;
    let op_id = job.operation_id;
    let restate = RestateUnchanged::check(&mut conn)?;
    let layout = Layout::of(&mut conn)?;
    if !restate.allowed() && ctx.global.verbose > 0 {
        eprintln!(
            "tickets has column triggers or column privileges: the soft-delete names only deleted_at and \
             last_operation_id (slower: index inserts clean up earlier batches' row versions as they go)"
        );
    }
    let walk = resolved.month_walk(&mut conn, layout)?;
    let mut at = WalkPosition::default();
    let watch = ctx.watch_counted(&job.kind, &mut conn, batching.max_rows, |c| {
        resolved.query(DeletedScope::Exclude).count().get_result(c)
    });
    let stats = job.run(&mut conn, &batching.settings(), &watch, |conn, limit| {
        let now = Utc::now();
        let (ids, next) = resolved.soft_delete_batch(conn, &walk, at, limit as i64, now, op_id, restate, layout)?;
        let Some(next) = next else {
            return Ok(Step { rows: 0, done: true });
        };
        if ids.is_empty() {
            at = next;
            return Ok(Step { rows: 0, done: false });
        }
        let changed = ids.len();
        // One audit row per batch: every row changed the same way (deleted_at from NULL to
        // now), so the ids list is the whole before/after record.
        audit::record_batch(
            conn,
            op_id,
            "tickets",
            Action::SoftDelete,
            ids[0],
            Some(json!({"deleted_at": null})),
            Some(json!({"deleted_at": now, "ids": ids})),
        )?;
        operation::save_checkpoint(
            conn,
            op_id,
            &json!({"last_id": next.after_id}),
            &json!({"soft_deleted": null}),
        )?;
        at = next;
        Ok(Step {
            rows: changed as u64,
            done: false,
        })
    });
    let rows = stats.rows;
    ctx.finish_job(job.finish(&mut conn, stats, json!({"soft_deleted": rows})))
}

fn purge(
    ctx: &Context,
    deleted_before: DateTime<Utc>,
    archive: Option<PathBuf>,
    archive_comments: Option<PathBuf>,
    dry_run: bool,
    batching: BatchArgs,
) -> anyhow::Result<i32> {
    let kind = "cleanup purge";
    if let Some(tickets) = &archive {
        crate::archive::check_distinct(tickets, archive_comments.as_deref())?;
    }
    let mut tickets_archive = archive.clone().map(|p| Archive::open(p, TICKET_COLUMNS)).transpose()?;
    let mut comments_archive = (archive_comments.clone())
        .map(|p| Archive::open(p, COMMENT_COLUMNS))
        .transpose()?;
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let purgeable = || {
        tickets::table
            .filter(tickets::deleted_at.lt(deleted_before))
            .into_boxed()
    };
    if dry_run {
        return preview(ctx, &mut conn, kind, purgeable);
    }
    let job = job::Job::start(
        &pool,
        ctx.database_url()?,
        &mut conn,
        kind,
        json!({"deleted_before": deleted_before, "archive": archive, "archive_comments": archive_comments,
               "working_directory": crate::archive::working_directory(), "batching": batching.settings().to_json()}),
    )?;
    let op_id = job.operation_id;
    let layout = Layout::of(&mut conn)?;
    let mut last_id = 0i64;
    let mut comments_purged = 0u64;
    let watch = ctx.watch_counted(&job.kind, &mut conn, batching.max_rows, |c| {
        purgeable().count().get_result(c)
    });
    let stats = job.run(&mut conn, &batching.settings(), &watch, |conn, limit| {
        // Found and locked in one ordered primary-key scan: rows another transaction holds are
        // skipped (left for the next run), and PostgreSQL re-checks `deleted_at` on a row
        // restored meanwhile before locking it.
        let (batch, max) = crate::filters::lock_next_for_removal(
            conn,
            layout,
            || Box::new(tickets::deleted_at.assume_not_null().lt(deleted_before)),
            last_id,
            limit as i64,
        )?;
        let Some(max) = max else {
            return Ok(Step { rows: 0, done: true });
        };
        if batch.is_empty() {
            last_id = max;
            return Ok(Step { rows: 0, done: false });
        }
        let (ids, created_at): (Vec<i64>, Vec<DateTime<Utc>>) = batch.into_iter().unzip();
        // Archive first, durably; delete only after. Any failure rolls the batch back and
        // cuts the archive back to where it was.
        let mut marks = Marks::default();
        let result = (|| -> anyhow::Result<(usize, u64)> {
            let batch = crate::layout::BatchTickets::with_created(layout, &ids, &created_at);
            archive_batch(
                conn,
                &batch,
                tickets_archive.as_mut(),
                comments_archive.as_mut(),
                &mut marks,
            )?;
            let comments: i64 = crate::schema::comments::table
                .filter(crate::schema::comments::ticket_id.eq_any(&ids))
                .count()
                .get_result(conn)?;
            let deleted = layout.delete_tickets(conn, &ids, &created_at)?;
            audit::record_batch(
                conn,
                op_id,
                "tickets",
                Action::Purge,
                ids[0],
                Some(json!({"ids": ids, "archive": archive, "archive_comments": archive_comments})),
                None,
            )?;
            operation::save_checkpoint(conn, op_id, &json!({"last_id": max}), &json!({}))?;
            Ok((deleted, comments as u64))
        })();
        match result {
            Ok((deleted, comments)) => {
                comments_purged += comments;
                last_id = max;
                Ok(Step {
                    rows: deleted as u64,
                    done: false,
                })
            }
            Err(err) => {
                cut_back(tickets_archive.as_mut(), comments_archive.as_mut(), marks);
                Err(err)
            }
        }
    });
    let rows = stats.rows;
    ctx.finish_job(job.finish(
        &mut conn,
        stats,
        json!({"purged": rows, "comments_purged": comments_purged}),
    ))
}

fn purge_users(
    ctx: &Context,
    deleted_before: DateTime<Utc>,
    dry_run: bool,
    batching: BatchArgs,
) -> anyhow::Result<i32> {
    let kind = "cleanup purge-users";
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    if dry_run {
        let count = purgeable_users_count(&mut conn, deleted_before)?;
        if ctx.global.json {
            ctx.print_json(&json!({"kind": kind, "dry_run": true, "would_affect": count}))?;
        } else {
            crate::outln!("dry run: {kind} would purge {count} user(s); nothing was written");
        }
        return Ok(exit::SUCCESS);
    }
    let distributed = Layout::of(&mut conn)?.distributed();
    let job = job::Job::start(
        &pool,
        ctx.database_url()?,
        &mut conn,
        kind,
        json!({"deleted_before": deleted_before, "batching": batching.settings().to_json()}),
    )?;
    let op_id = job.operation_id;
    let mut last_id = 0i64;
    let watch = ctx.watch_counted(&job.kind, &mut conn, batching.max_rows, |c| {
        purgeable_users_count(c, deleted_before)
    });
    let stats = job.run(&mut conn, &batching.settings(), &watch, |conn, limit| {
        if distributed {
            // Citus refuses to write users (a reference table that tickets and comments refer
            // to) in a transaction that has read those in parallel: one connection per worker.
            sql_query("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'").execute(conn)?;
        }
        let candidates = soft_deleted_users(conn, deleted_before, last_id, limit as i64)?;
        let Some(&max) = candidates.last() else {
            return Ok(Step { rows: 0, done: true });
        };
        let locked: Vec<i64> = users::table
            .select(users::id)
            .filter(users::id.eq_any(&candidates))
            .order(users::id)
            .for_update()
            .skip_locked()
            .load(conn)?;
        // Checked under the lock: nothing may have started referring to them.
        let ids = unreferenced_users(conn, &locked)?;
        if ids.is_empty() {
            last_id = max;
            return Ok(Step { rows: 0, done: false });
        }
        let before: Vec<serde_json::Value> =
            sql_query("SELECT to_jsonb(u)::text AS fields FROM users u WHERE id = ANY($1) ORDER BY id")
                .bind::<Array<BigInt>, _>(&ids)
                .load::<JsonText>(conn)?
                .into_iter()
                .map(|r| serde_json::from_str(&r.fields).unwrap_or(serde_json::Value::Null))
                .collect();
        let deleted = diesel::delete(users::table.filter(users::id.eq_any(&ids))).execute(conn)?;
        audit::record_batch(
            conn,
            op_id,
            "users",
            Action::Purge,
            ids[0],
            Some(json!({"rows": before})),
            None,
        )?;
        last_id = max;
        Ok(Step {
            rows: deleted as u64,
            done: false,
        })
    });
    let rows = stats.rows;
    ctx.finish_job(job.finish(&mut conn, stats, json!({"purged": rows})))
}

/// Users soft-deleted before `deleted_before`, by id after `after_id`, at most `limit`.
fn soft_deleted_users(
    conn: &mut PgConnection,
    deleted_before: DateTime<Utc>,
    after_id: i64,
    limit: i64,
) -> QueryResult<Vec<i64>> {
    users::table
        .select(users::id)
        .filter(users::deleted_at.lt(deleted_before))
        .filter(users::id.gt(after_id))
        .order(users::id)
        .limit(limit)
        .load(conn)
}

/// Of the users `candidates`, those nothing refers to: no ticket names them as requester or
/// assignee, no comment as author. Probed by the candidates' ids (an index on each column)
/// rather than with a correlated `NOT EXISTS`, which Citus refuses over its distributed tables.
fn unreferenced_users(conn: &mut PgConnection, candidates: &[i64]) -> QueryResult<Vec<i64>> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sql_query(
        "SELECT u AS id FROM unnest($1::bigint[]) u
         WHERE u NOT IN (SELECT requester_id FROM tickets WHERE requester_id = ANY($1))
           AND u NOT IN (SELECT assignee_id FROM tickets WHERE assignee_id = ANY($1))
           AND u NOT IN (SELECT author_id FROM comments WHERE author_id = ANY($1))
         ORDER BY u",
    )
    .bind::<Array<BigInt>, _>(candidates)
    .load::<db::Id>(conn)?
    .into_iter()
    .map(|r| r.id)
    .collect())
}

/// How many users `cleanup purge-users` would remove, counted in chunks of soft-deleted users.
fn purgeable_users_count(conn: &mut PgConnection, deleted_before: DateTime<Utc>) -> QueryResult<i64> {
    let (mut count, mut after_id) = (0, 0);
    loop {
        let chunk = soft_deleted_users(conn, deleted_before, after_id, 10_000)?;
        let Some(&last) = chunk.last() else {
            return Ok(count);
        };
        count += unreferenced_users(conn, &chunk)?.len() as i64;
        after_id = last;
    }
}

#[derive(QueryableByName)]
struct JsonText {
    #[diesel(sql_type = Text)]
    fields: String,
}
