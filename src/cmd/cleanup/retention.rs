//! `ticketops cleanup retention --created-before AGE --archive FILE [filters]`: the dry run,
//! the question, and the run — whole partitions first (partitioned layout), then batches —
//! as one job (advisory lock, operation record, one-line JSON summary).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::archive::{Archive, COMMENT_COLUMNS, TICKET_COLUMNS};
use crate::args::{ApplyArgs, BatchArgs, confirm};
use crate::context::Context;
use crate::db;
use crate::exit::{self, UsageError};
use crate::filters::TicketFilters;
use crate::job::{self, BatchSettings, RunStats, Step, StopReason};
use crate::layout::Layout;
use crate::retention::{self, KIND, Removed};

pub const HELP: &str = "\
Removes for good the tickets created before --created-before (soft-deleted or not; with
--only-deleted, only those), with their comments, tag links and per-row audit rows, as a
retention policy asks. Everything removed is first appended to --archive (and the comments to
--archive-comments) in the import format and synced to disk; `ticketops import tickets ARCHIVE`
brings it back. A dry run until --apply, which asks (count and sample) unless --yes.

On the partitioned layout with no other filter, each monthly partition wholly before the
cut-off is archived by COPY (on a second connection, while its keys and audit rows are
deleted), and it is dropped with its months of tag links and comments in one transaction: no
row-by-row DELETE of them, no dead tuples;
tickets, ticket_tags and comments themselves are locked only for the drop, nothing else the
application reads is (a month's COPY is one statement: give big months a longer
--statement-timeout). A month goes whole or not at all; a comment being added to it meanwhile
waits for it, never deleted unarchived. The boundary month, filtered runs, months this role does
not own (dropping takes the owner) and the plain layout go in batches like `cleanup purge` (rows
the application holds are skipped for the next run). Exit codes as the other cleanup jobs.

Examples:
  ticketops cleanup retention --created-before 7y --archive old.csv             # dry run
  ticketops cleanup retention --created-before 2019-01-01 --archive old.csv \\
      --archive-comments old-comments.csv --apply --yes --json";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filters: TicketFilters,
    /// Append the removed tickets to this CSV (import format), synced before anything is removed
    #[arg(long, value_name = "FILE")]
    pub archive: PathBuf,
    /// Append the removed tickets' comments to this CSV (import format) too
    #[arg(long, value_name = "FILE")]
    pub archive_comments: Option<PathBuf>,
    #[command(flatten)]
    pub apply: ApplyArgs,
    #[command(flatten)]
    pub batching: BatchArgs,
}

const SAMPLE_SIZE: i64 = 5;

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let Some(cutoff) = args.filters.created_before else {
        return Err(
            UsageError("cleanup retention needs --created-before AGE (a date, or an age like 2555d)".into()).into(),
        );
    };
    crate::archive::check_distinct(&args.archive, args.archive_comments.as_deref())?;
    let mut archive = Archive::open(args.archive.clone(), TICKET_COLUMNS)?;
    let mut comments_archive = (args.archive_comments.clone())
        .map(|p| Archive::open(p, COMMENT_COLUMNS))
        .transpose()?;
    // This connection, the job's lock and the whole months' archive (written alongside).
    let pool = ctx.pool(3)?;
    let mut conn = db::get(&pool)?;
    let filters = args.filters.resolve(&mut conn)?;
    if let Some(warning) = filters.unmatched_ids_warning() {
        ctx.info(warning);
    }
    let layout = Layout::of(&mut conn)?;
    let plan = retention::plan(&mut conn, layout, &filters, cutoff)?;
    let sample = retention::sample(&mut conn, &filters, SAMPLE_SIZE)?;
    let partition_names: Vec<&str> = plan.partitions.iter().map(|p| p.name.as_str()).collect();
    if !args.apply.apply {
        if ctx.global.json {
            ctx.print_json(&json!({
                "kind": KIND, "dry_run": true, "created_before": cutoff, "would_remove": plan.tickets,
                "comments": plan.comments, "partitions": plan.partitions, "batched": plan.batched,
                "leftover_detached": plan.leftover, "months_not_owned": plan.months_not_owned,
                "sample": sample.iter().map(|(id, at)| json!({"external_id": id, "created_at": at})).collect::<Vec<_>>(),
            }))?;
        } else {
            crate::outln!(
                "dry run: {KIND} would remove {} ticket(s) created before {} and {} comment(s); nothing was written",
                plan.tickets,
                cutoff.format("%Y-%m-%d %H:%M:%S UTC"),
                plan.comments
            );
            if !plan.partitions.is_empty() {
                crate::outln!(
                    "  {} whole partition(s) to archive and drop: {}",
                    plan.partitions.len(),
                    partition_names.join(", ")
                );
            }
            crate::outln!("  {} ticket(s) to remove in batches", plan.batched);
            if !plan.months_not_owned.is_empty() {
                crate::outln!(
                    "  in batches too, as this role does not own them and tickets (dropping takes the owner): {}",
                    plan.months_not_owned.join(", ")
                );
            }
            if !plan.leftover.is_empty() {
                crate::outln!(
                    "  detached and archived by an earlier run, to be dropped: {}",
                    plan.leftover.join(", ")
                );
            }
            for (external_id, created_at) in &sample {
                crate::outln!("  {external_id}  created {}", created_at.format("%Y-%m-%d"));
            }
            crate::outln!(
                "run again with --apply to remove them (archived to {} first)",
                args.archive.display()
            );
        }
        return Ok(exit::SUCCESS);
    }
    if plan.tickets > 0 || !plan.leftover.is_empty() {
        if !args.apply.yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!(
                "{KIND}: tickets created before {}, for example:",
                cutoff.format("%Y-%m-%d")
            );
            for (external_id, created_at) in &sample {
                eprintln!("  {external_id}  created {}", created_at.format("%Y-%m-%d"));
            }
        }
        if !confirm(&args.apply, KIND, plan.tickets as u64)? {
            ctx.info("not confirmed; nothing was written");
            return Ok(exit::FAILURE);
        }
    }

    let settings = args.batching.settings();
    let job = job::Job::start(
        &pool,
        ctx.database_url()?,
        &mut conn,
        KIND,
        json!({"created_before": cutoff, "filters": args.filters.to_json(), "archive": args.archive,
               "archive_comments": args.archive_comments, "working_directory": crate::archive::working_directory(),
               "batching": settings.to_json()}),
    )?;
    let op_id = job.operation_id;
    let watch = ctx.watch(&job.kind).with_total(Some(plan.tickets as u64));

    // Whole partitions (and any an earlier run left detached) first: one step each.
    let started = Instant::now();
    let mut dropped = Vec::new();
    let mut whole = Removed::default();
    let mut longest = Duration::ZERO;
    let mut stopped = None;
    let mut error = None;
    let mut partition_retries = 0u64;
    let mut archive_conn = (!plan.partitions.is_empty()).then(|| db::get(&pool)).transpose()?;
    // A leftover is a name (its archive is written); a planned month, the partition itself.
    let leftover = plan.leftover.iter().map(|name| (name.clone(), None));
    let partitions = plan.partitions.iter().map(|p| (p.name.clone(), Some(p)));
    for (i, (name, whole_month)) in leftover.chain(partitions).enumerate() {
        // --sleep between months as between batches: room for the application.
        if i > 0 {
            job.stop.sleep(settings.sleep);
        }
        if let Some(code) = job.stop.requested() {
            stopped = Some(StopReason::Signal(code));
            break;
        }
        if settings.max_runtime.is_some_and(|max| started.elapsed() >= max) {
            stopped = Some(StopReason::MaxRuntime);
            break;
        }
        // A month goes whole or not at all: --max-rows stops before the one that reaches it.
        if settings.max_rows.is_some_and(|max| whole.tickets >= max) {
            stopped = Some(StopReason::MaxRows);
            break;
        }
        // Retried as a batch is: a lock held elsewhere, or a comment added meanwhile.
        let (result, took, attempts) = job::retry_transient(
            settings.retries,
            &watch,
            &format!("partition {name}"),
            || match whole_month {
                None => retention::drop_detached(&mut conn, op_id, &name, settings.timeouts),
                Some(partition) => retention::remove_partition(
                    &mut conn,
                    archive_conn.as_mut().expect("got with the months to remove"),
                    op_id,
                    partition,
                    &mut archive,
                    comments_archive.as_mut(),
                    settings.timeouts,
                ),
            },
        );
        partition_retries += u64::from(attempts);
        match result {
            Ok(removed) => {
                longest = longest.max(took);
                whole.tickets += removed.tickets;
                whole.comments += removed.comments;
                watch.advance(removed.tickets, whole.tickets, started);
                watch.line(format!(
                    "partition {name}: {} tickets and {} comments archived and dropped in {} ms",
                    removed.tickets,
                    removed.comments,
                    took.as_millis()
                ));
                dropped.push(name);
            }
            Err(err) => {
                error = Some(err);
                break;
            }
        }
    }

    // Then the rest in batches, unless the partitions stopped the run.
    let mut batched_comments = 0u64;
    let mut stats = if stopped.is_some() || error.is_some() {
        watch.progress.finish_and_clear();
        RunStats {
            batches: 0,
            rows: 0,
            retries: 0,
            longest_batch: Duration::ZERO,
            elapsed: started.elapsed(),
            stopped: if error.is_some() {
                StopReason::Error
            } else {
                stopped.unwrap_or(StopReason::Done)
            },
            error,
        }
    } else {
        let mut last_id = 0i64;
        // The limits hold for the whole run, the partitions included.
        let rest = BatchSettings {
            max_runtime: settings.max_runtime.map(|max| max.saturating_sub(started.elapsed())),
            max_rows: settings.max_rows.map(|max| max.saturating_sub(whole.tickets)),
            ..settings.clone()
        };
        job.run(&mut conn, &rest, &watch, |conn, limit| {
            let (removed, last) = retention::remove_batch(
                conn,
                layout,
                &filters,
                op_id,
                last_id,
                limit as i64,
                &mut archive,
                comments_archive.as_mut(),
            )?;
            let Some(last) = last else {
                return Ok(Step { rows: 0, done: true });
            };
            last_id = last;
            batched_comments += removed.comments;
            Ok(Step {
                rows: removed.tickets,
                done: false,
            })
        })
    };
    stats.rows += whole.tickets;
    stats.batches += dropped.len() as u64;
    stats.retries += partition_retries;
    stats.elapsed = started.elapsed();
    stats.longest_batch = stats.longest_batch.max(longest);
    let removed = stats.rows;
    ctx.finish_job(job.finish(
        &mut conn,
        stats,
        json!({"removed": removed, "comments_removed": whole.comments + batched_comments,
               "partitions_dropped": dropped, "archive": args.archive, "archive_comments": args.archive_comments}),
    ))
}
