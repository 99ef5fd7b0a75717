//! `ticketops fix set|tag|reassign|merge-users|apply`: one-off data fixes with the safety model
//! of issue #5 — a dry run by default, `--apply` with a confirmation, short batches with lock
//! and statement timeouts, and the before and after values of every changed row in
//! `audit_log` so that `ticketops undo` can revert it.
//!
//! `set`, `tag` and `reassign` select tickets with the shared filters and run through one
//! driver ([`run_ticket_fix`]); `merge-users` and `apply` have their own selection.

mod apply;
mod merge_users;
mod set;
mod tag;

use diesel::PgConnection;
use diesel::prelude::*;
use serde_json::{Value, json};

use crate::args::{ApplyArgs, BatchArgs, confirm};
use crate::context::Context;
use crate::db::{self};
use crate::exit::{self};
use crate::filters::{ResolvedFilters, TicketFilters};
use crate::job::{Job, Step};
pub use crate::layout::BatchTickets;
use crate::operation;
use crate::schema::tickets;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Set fields on the matching tickets: status, priority, channel, assignee (e-mail or none),
    /// organization (name or none), subject
    #[command(after_help = set::HELP)]
    Set(set::Args),
    /// Add and remove tags on the matching tickets
    #[command(after_help = tag::HELP)]
    Tag(tag::Args),
    /// Move the tickets assigned to one agent to another (optionally only those matching filters)
    Reassign(set::ReassignArgs),
    /// Move a duplicate user's tickets (as requester and assignee) and comments to the canonical
    /// user, then soft-delete the duplicate
    #[command(after_help = merge_users::HELP)]
    MergeUsers(merge_users::Args),
    /// Apply a spreadsheet of corrections keyed by external_id (status, priority, channel,
    /// assignee_email, organization, subject, tags_add, tags_remove)
    #[command(after_help = apply::HELP)]
    Apply(apply::Args),
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    match args.action {
        Action::Set(a) => set::run(ctx, a),
        Action::Tag(a) => tag::run(ctx, a),
        Action::Reassign(a) => set::reassign(ctx, a),
        Action::MergeUsers(a) => merge_users::run(ctx, a),
        Action::Apply(a) => apply::run(ctx, a),
    }
}

/// What every filter-driven ticket fix takes: which tickets (filters, or `--all`), dry run or
/// `--apply`, and the batching.
#[derive(Debug, clap::Args)]
pub struct FixScope {
    #[command(flatten)]
    pub filters: TicketFilters,
    /// Allow a fix without any filter (every ticket)
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub apply: ApplyArgs,
    #[command(flatten)]
    pub batching: BatchArgs,
}

/// How many changed rows a dry run shows.
pub const SAMPLE_SIZE: usize = 10;

/// One row a dry run shows: the values that would change, before and after, as people read
/// them (e-mails and names rather than ids).
#[derive(Debug, Clone, QueryableByName)]
pub struct Sample {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub external_id: String,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    pub before: Value,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    pub after: Value,
}

/// How many rows a fix statement changed (or would change): `SELECT count(*) AS changed …`.
#[derive(QueryableByName)]
pub struct Changed {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub changed: i64,
}

/// A fix of ticket columns or tags, batch by batch. The dry run and the real run share the
/// SQL that decides which rows differ, so the two cannot drift.
pub trait TicketFix {
    /// The fix as people read it, e.g. `status=closed priority=low` or `+vip -spam`.
    fn describe(&self) -> String;

    /// Among the batch's tickets, how many would change, and up to `sample` of them with
    /// their before and after values. Writes nothing.
    fn preview(
        &self,
        conn: &mut PgConnection,
        batch: &BatchTickets<'_>,
        sample: usize,
    ) -> anyhow::Result<(u64, Vec<Sample>)>;

    /// Changes the batch's tickets that differ, with their before and after values in
    /// `audit_log` under operation `op_id`, and returns how many changed.
    fn apply(&self, conn: &mut PgConnection, batch: &BatchTickets<'_>, op_id: i64) -> anyhow::Result<u64>;

    /// Runs once before the first batch of a real run (e.g. creates tags to add).
    fn prepare(&mut self, _conn: &mut PgConnection) -> anyhow::Result<()> {
        Ok(())
    }
}

/// What a ticket fix selects and how it runs.
pub struct FixRun<'a> {
    /// Two connections: the work, and the advisory lock.
    pub pool: &'a db::Pool,
    pub kind: &'a str,
    pub args: Value,
    pub filters: &'a ResolvedFilters,
    pub apply: &'a ApplyArgs,
    pub batching: &'a BatchArgs,
    /// Extra keys for the dry run's JSON (e.g. the assignments of `fix set`).
    pub extra: Value,
}

/// The dry run (batches of matching tickets compared, nothing written) and, with `--apply`,
/// the confirmation, the advisory lock, the operation row and the batched real run.
pub fn run_ticket_fix(ctx: &Context, run: FixRun<'_>, fix: &mut dyn TicketFix) -> anyhow::Result<i32> {
    let pool = run.pool;
    let mut conn = db::get(pool)?;
    if let Some(warning) = run.filters.unmatched_ids_warning() {
        ctx.info(warning);
    }
    let scope = run.filters.deleted_scope();
    let batch_size = run.batching.batch_size as i64;
    let layout = crate::layout::Layout::of(&mut conn)?;

    // The dry run: every matching ticket, in the batches of the real run, compared the same
    // way. With --apply --yes nobody reads its count, so the real run goes straight ahead.
    let mut total = None;
    if !(run.apply.apply && run.apply.yes) {
        let mut would_change = 0u64;
        let mut sample = Vec::new();
        let mut last_id = 0i64;
        loop {
            let ids: Vec<i64> = run
                .filters
                .query(scope)
                .select(tickets::id)
                .filter(tickets::id.gt(last_id))
                .order(tickets::id)
                .limit(batch_size)
                .load(&mut conn)?;
            let Some(&max) = ids.last() else { break };
            let batch = BatchTickets::read(&mut conn, layout, &ids)?;
            let (changed, rows) = fix.preview(&mut conn, &batch, SAMPLE_SIZE - sample.len())?;
            would_change += changed;
            sample.extend(rows);
            last_id = max;
        }
        if !run.apply.apply {
            print_dry_run(ctx, run.kind, &fix.describe(), would_change, &sample, run.extra)?;
            return Ok(exit::SUCCESS);
        }
        total = Some(would_change);
        if would_change == 0 {
            ctx.info("nothing to change");
        } else {
            if !run.apply.yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                // The person asked sees what would change before answering.
                eprintln!("{} ({})", run.kind, fix.describe());
                sample_table(&sample, would_change, &mut std::io::stderr().lock())?;
            }
            if !confirm(run.apply, run.kind, would_change)? {
                ctx.info("not confirmed; nothing was written");
                return Ok(exit::FAILURE);
            }
        }
    }
    let job = Job::start(pool, ctx.database_url()?, &mut conn, run.kind, run.args)?;
    let op_id = job.operation_id;
    fix.prepare(&mut conn)?;
    let mut last_id = 0i64;
    let mut unchanged = 0u64;
    let stats = job.run(
        &mut conn,
        &run.batching.settings(),
        &ctx.watch(&job.kind).with_total(total),
        |conn, limit| {
            let (ids, last_candidate) = run.filters.lock_batch(conn, scope, last_id, limit as i64, layout)?;
            let Some(max) = last_candidate else {
                return Ok(Step { rows: 0, done: true });
            };
            let changed = if ids.is_empty() {
                0
            } else {
                let batch = BatchTickets::read(conn, layout, &ids)?;
                fix.apply(conn, &batch, op_id)?
            };
            unchanged += ids.len() as u64 - changed;
            operation::save_checkpoint(conn, op_id, &json!({"last_id": max}), &json!({}))?;
            last_id = max;
            Ok(Step {
                rows: changed,
                done: false,
            })
        },
    );
    let rows = stats.rows;
    ctx.finish_job(job.finish(&mut conn, stats, json!({"changed": rows, "unchanged": unchanged})))
}

/// The dry run's report: the count, and a table of the sample, before → after.
pub fn print_dry_run(
    ctx: &Context,
    kind: &str,
    described: &str,
    would_change: u64,
    sample: &[Sample],
    extra: Value,
) -> anyhow::Result<()> {
    if ctx.global.json {
        let mut out = json!({
            "kind": kind,
            "dry_run": true,
            "would_change": would_change,
            "sample": sample.iter().map(|s| json!({"external_id": s.external_id, "before": s.before, "after": s.after})).collect::<Vec<_>>(),
        });
        if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        return ctx.print_json(&out);
    }
    crate::outln!("dry run: {would_change} row(s) would change ({described}); nothing was written");
    print_dry_run_table(would_change, sample)
}

/// The sample of a dry run as a table, before → after, and how to go on.
pub fn print_dry_run_table(would_change: u64, sample: &[Sample]) -> anyhow::Result<()> {
    sample_table(sample, would_change, &mut std::io::stdout().lock())?;
    crate::outln!("run again with --apply to write");
    Ok(())
}

/// The sample as a table, before → after, with how many more rows there are.
fn sample_table(sample: &[Sample], would_change: u64, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if !sample.is_empty() {
        let mut table = crate::output::Table::new(["external_id", "before", "after"]);
        for s in sample {
            table.push(vec![
                crate::output::Cell::text(&s.external_id),
                crate::output::Cell::text(flat(&s.before)),
                crate::output::Cell::text(flat(&s.after)),
            ]);
        }
        table.write_aligned(out)?;
        if would_change as usize > sample.len() {
            writeln!(out, "… and {} more", would_change as usize - sample.len())?;
        }
    }
    Ok(())
}

/// `{"status": "open", "tags": ["a", "b"]}` as `status=open tags=a;b`, for the sample table.
fn flat(image: &Value) -> String {
    match image.as_object() {
        Some(map) => map
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    Value::Null => "none".to_string(),
                    Value::String(s) => s.clone(),
                    Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().map(str::to_string).unwrap_or_else(|| i.to_string()))
                        .collect::<Vec<_>>()
                        .join(";"),
                    other => other.to_string(),
                };
                format!("{k}={shown}")
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => image.to_string(),
    }
}
