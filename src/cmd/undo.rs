//! `ticketops undo OPERATION_ID`: reverts a fix, a merge, an import or a soft-delete run.
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

use anyhow::{Context as _, bail};
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};
use serde_json::json;

mod comments;
mod distributed;

use crate::args::{ApplyArgs, BatchArgs, confirm};
use crate::audit::{DELETE_ACTION, FIX_ACTION, INSERT_ACTION, INSERT_IDS_ACTION, SOFT_DELETE_ACTION, UPDATE_ACTION};
use crate::context::Context;
use crate::db::{self};
use crate::exit::{self, UsageError};
use crate::filters::RestateUnchanged;
use crate::job::{Job, Step};
use crate::layout::Layout;
use crate::operation;
use crate::output::{Cell, Table, escape_controls};
use crate::restore;

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

/// The columns an image may restore, per table, with their SQL types (keys absent from an
/// image keep their value; `id` and the natural keys never change).
fn restorable_columns(table: &str) -> &'static [(&'static str, &'static str)] {
    match table {
        "tickets" => &[
            ("subject", "varchar"),
            ("description", "text"),
            ("status", "ticket_status"),
            ("priority", "ticket_priority"),
            ("channel", "ticket_channel"),
            ("requester_id", "bigint"),
            ("assignee_id", "bigint"),
            ("organization_id", "bigint"),
            ("created_at", "timestamptz"),
            ("updated_at", "timestamptz"),
            ("solved_at", "timestamptz"),
            ("deleted_at", "timestamptz"),
            ("last_operation_id", "bigint"),
        ],
        "users" => &[
            ("name", "text"),
            ("role", "user_role"),
            ("organization_id", "bigint"),
            ("updated_at", "timestamptz"),
            ("deleted_at", "timestamptz"),
        ],
        _ => &[
            ("ticket_id", "bigint"),
            ("author_id", "bigint"),
            ("body", "text"),
            ("public", "boolean"),
            ("created_at", "timestamptz"),
        ],
    }
}

/// The rows an image's column names that may be removed for good (tickets by purge and
/// retention, users by `purge-users`), as the table and key its foreign key refers to;
/// `None` for a column that names nothing removable (organizations, tags and operations stay).
fn referenced(table: &str, column: &str, layout: Layout) -> Option<(&'static str, &'static str)> {
    match (table, column) {
        ("tickets", "requester_id" | "assignee_id") | ("comments", "author_id") => Some(("users", "id")),
        // On partitions a comment's foreign key goes to the ticket's key.
        ("comments", "ticket_id") if layout.partitioned() => Some(("ticket_keys", "ticket_id")),
        ("comments", "ticket_id") => Some(("tickets", "id")),
        _ => None,
    }
}

/// The image rows of one table in an operation, and which columns (and whether the tag set)
/// its images hold: the SQL compares and restores just those.
#[derive(Debug, Clone)]
struct ImageSet {
    table: String,
    columns: Vec<(&'static str, &'static str)>,
    tags: bool,
}

impl ImageSet {
    /// Reads which keys the operation's images of `table` use.
    fn load(conn: &mut PgConnection, op: i64, table: &str) -> anyhow::Result<ImageSet> {
        #[derive(QueryableByName)]
        struct Key {
            #[diesel(sql_type = Text)]
            key: String,
        }
        let keys: Vec<Key> = sql_query(format!(
            "SELECT DISTINCT k AS key FROM audit_log a, jsonb_object_keys(a.before) k
             WHERE a.operation_id = $1 AND a.table_name = $2 AND a.action IN ('{FIX_ACTION}', '{UPDATE_ACTION}')"
        ))
        .bind::<BigInt, _>(op)
        .bind::<Text, _>(table)
        .load(conn)
        .context("cannot read the operation's audit images")?;
        let has = |name: &str| keys.iter().any(|k| k.key == name);
        Ok(ImageSet {
            table: table.to_string(),
            columns: restorable_columns(table)
                .iter()
                .copied()
                .filter(|(c, _)| has(c))
                .collect(),
            tags: table == "tickets" && has("tag_ids"),
        })
    }

    /// Whether row `t` holds every value of image `img`, compared typed (so time zones and
    /// number formats in the JSON do not matter); a ticket's tag set must be equal to the
    /// image's, not merely contain it.
    fn holds(&self, img: &str) -> String {
        let mut checks: Vec<String> = self
            .columns
            .iter()
            .map(|(c, ty)| format!("(NOT {img} ? '{c}' OR t.{c} IS NOT DISTINCT FROM ({img} ->> '{c}')::{ty})"))
            .collect();
        if self.tags {
            checks.push(format!(
                "(NOT {img} ? 'tag_ids' OR {img} -> 'tag_ids' = to_jsonb(ARRAY(
                     SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = t.id ORDER BY tag_id)))"
            ));
        }
        all_of(&checks)
    }

    /// Whether the tickets and users image `img` names still exist. One removed since (a purge,
    /// retention, `purge-users`) cannot be named again — the foreign key refuses it — so such a
    /// row is left alone and counted with the conflicts, with or without --force. Plain and
    /// partitioned layouts (a probe a row); Citus checks the same in `distributed`.
    fn references_kept(&self, img: &str, layout: Layout) -> String {
        let checks: Vec<String> = self
            .columns
            .iter()
            .filter_map(|(c, _)| {
                let (table, key) = referenced(&self.table, c, layout)?;
                Some(format!(
                    "({img} ->> '{c}' IS NULL OR EXISTS (SELECT 1 FROM {table} r WHERE r.{key} = ({img} ->> '{c}')::bigint))"
                ))
            })
            .collect();
        all_of(&checks)
    }

    /// `SET` assignments putting image `img`'s values back (other columns keep theirs). A
    /// ticket's indexed columns the images do not hold are named too where `restate` allows, so
    /// that the batches' index inserts do not run bottom-up deletion passes (see
    /// [`crate::filters::UNCHANGED_INDEXED_COLUMNS`]).
    fn restore(&self, img: &str, restate: RestateUnchanged) -> String {
        let set: Vec<String> = self
            .columns
            .iter()
            .map(|(c, ty)| format!("{c} = CASE WHEN {img} ? '{c}' THEN ({img} ->> '{c}')::{ty} ELSE t.{c} END"))
            .collect();
        // Only the tag set: touch nothing but still let the row through RETURNING.
        let set = if set.is_empty() {
            "id = t.id".to_string()
        } else {
            set.join(", ")
        };
        if self.table == "tickets" {
            let assigned: Vec<&str> = self.columns.iter().map(|(c, _)| *c).collect();
            set + &restate.set_tail(&assigned)
        } else {
            set
        }
    }
}

/// The SQL conjunction of `checks` (`TRUE` when there are none).
fn all_of(checks: &[String]) -> String {
    if checks.is_empty() {
        "TRUE".to_string()
    } else {
        format!("({})", checks.join(" AND "))
    }
}

/// The values of row `t` under the keys of image `img`, as JSON (tag ids included).
fn values_of(table: &str, img: &str) -> String {
    let tags = if table == "tickets" {
        format!(
            " || CASE WHEN {img} ? 'tag_ids' THEN jsonb_build_object('tag_ids', to_jsonb(ARRAY(
                 SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = t.id ORDER BY tag_id))) ELSE '{{}}' END"
        )
    } else {
        String::new()
    };
    // OFFSET 0: flattened, the row's JSON was built again for each key (60 µs a row, not 15).
    format!(
        "(SELECT jsonb_object_agg(k, j -> k) FROM (SELECT to_jsonb(t){tags} AS j OFFSET 0) c, jsonb_object_keys({img}) k)"
    )
}

#[derive(QueryableByName)]
struct ActionCount {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    action: String,
}

#[derive(QueryableByName, Default, Clone, Copy)]
struct Plan {
    #[diesel(sql_type = BigInt)]
    revertible: i64,
    #[diesel(sql_type = BigInt)]
    already: i64,
    #[diesel(sql_type = BigInt)]
    conflicts: i64,
}

impl std::ops::AddAssign for Plan {
    fn add_assign(&mut self, other: Plan) {
        self.revertible += other.revertible;
        self.already += other.already;
        self.conflicts += other.conflicts;
    }
}

#[derive(QueryableByName)]
struct Reverted {
    #[diesel(sql_type = BigInt)]
    reverted: i64,
    #[diesel(sql_type = BigInt)]
    next: i64,
    /// Audit rows (or inserted ids) the batch looked at.
    #[diesel(sql_type = BigInt)]
    seen: i64,
    /// Of those, rows already as before the operation (or gone).
    #[diesel(sql_type = BigInt)]
    already: i64,
}

#[derive(QueryableByName)]
struct Span {
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    low: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    high: Option<i64>,
}

/// One part of an undo, run in batches one after the other.
#[derive(Debug, Clone)]
enum Part {
    /// Image rows of one table, newest first (a row written twice by the operation goes back
    /// through its images in reverse order).
    Images(ImageSet),
    /// Tickets the operation inserted, by id window.
    Inserted { low: i64, high: i64 },
    /// Comments the operation inserted (deleted by the undo), newest first.
    InsertedComments,
    /// Comments an undo deleted (put back), newest first.
    DeletedComments,
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
    let actions: Vec<ActionCount> =
        sql_query("SELECT DISTINCT table_name, action FROM audit_log WHERE operation_id = $1 ORDER BY 1, 2")
            .bind::<BigInt, _>(op.id)
            .load(&mut conn)?;
    if actions.is_empty() {
        return Err(UsageError(format!(
            "operation {} ({}) changed no rows; there is nothing to undo",
            op.id, op.kind
        ))
        .into());
    }
    if actions.iter().all(|a| a.action == SOFT_DELETE_ACTION) {
        return undo_soft_delete(ctx, &pool, &mut conn, op.id, &args);
    }
    let mut parts = Vec::new();
    let mut unsupported = Vec::new();
    for a in &actions {
        match a.action.as_str() {
            FIX_ACTION | UPDATE_ACTION => {
                if !parts
                    .iter()
                    .any(|p| matches!(p, Part::Images(i) if i.table == a.table_name))
                {
                    parts.push(Part::Images(ImageSet::load(&mut conn, op.id, &a.table_name)?));
                }
            }
            INSERT_ACTION | INSERT_IDS_ACTION if a.table_name == "tickets" => {}
            INSERT_ACTION if a.table_name == "comments" => parts.push(Part::InsertedComments),
            DELETE_ACTION if a.table_name == "comments" => parts.push(Part::DeletedComments),
            INSERT_ACTION => {} // users an import created stay (see --help)
            other => unsupported.push(format!("{other} on {}", a.table_name)),
        }
    }
    if !unsupported.is_empty() {
        bail!(
            "undo of operation {} ({}) is not supported: it recorded {}; supported: fixes, imports, \
             cleanup soft-delete, undos",
            op.id,
            op.kind,
            unsupported.join(", ")
        );
    }
    let span: Span = sql_query(format!(
        "SELECT min(id) AS low, max(id) AS high FROM ({INSERTED_IDS_ALL}) i"
    ))
    .bind::<BigInt, _>(op.id)
    .get_result(&mut conn)
    .context("cannot read the inserted tickets from the audit trail")?;
    if let (Some(low), Some(high)) = (span.low, span.high) {
        parts.push(Part::Inserted { low, high });
    }

    // The plan (a pass over every row) is for the dry run and the confirmation question; with
    // --apply --yes the batches count the same things as they go.
    if args.apply.apply && args.apply.yes {
        return revert(ctx, &pool, &mut conn, op.id, &parts, &args, None);
    }
    let layout = Layout::of(&mut conn)?;
    let mut plan = Plan::default();
    for part in &parts {
        plan += plan_part(&mut conn, op.id, part, layout)?;
    }
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
    revert(ctx, &pool, &mut conn, op.id, &parts, &args, Some(would))
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
    parts: &[Part],
    args: &Args,
    total: Option<u64>,
) -> anyhow::Result<i32> {
    let layout = Layout::of(conn)?;
    let job = Job::start(
        pool,
        ctx.database_url()?,
        conn,
        "undo",
        json!({"operation": source_op, "force": args.force}),
    )?;
    let undo_op = job.operation_id;

    let restate = RestateUnchanged::check(conn)?;
    let sql: Vec<String> = parts
        .iter()
        .map(|p| {
            if layout.distributed() {
                distributed::revert_sql(p, undo_op, args.force, restate)
            } else {
                revert_sql(p, undo_op, args.force, restate, layout)
            }
        })
        .collect();
    let mut current = 0usize;
    // Images are walked by descending audit id, inserted tickets by ascending id window.
    let start_of = |p: &Part| match p {
        Part::Images(_) | Part::InsertedComments | Part::DeletedComments => i64::MAX,
        Part::Inserted { low, .. } => low - 1,
    };
    let mut cursor = parts.first().map(start_of).unwrap_or(0);
    let (mut seen, mut already) = (0i64, 0i64);
    let watch = ctx.watch(&job.kind).with_total(total);
    let stats = job.run(conn, &args.batching.settings(), &watch, |conn, limit| {
        let Some(part) = parts.get(current) else {
            return Ok(Step { rows: 0, done: true });
        };
        if layout.distributed() && matches!(part, Part::Images(i) if i.table == "users") {
            // Citus refuses to write users (a reference table that tickets and comments refer
            // to) after reading the audit rows in parallel: one connection per worker.
            sql_query("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'").execute(conn)?;
        }
        // `--force` reads and locks each row of a batch first: joined by id as a hash, the
        // whole table was read for every batch (640 ms a batch at 1M tickets).
        let forced_images = args.force && !layout.distributed() && matches!(part, Part::Images(_));
        if by_partition(part, layout) || forced_images {
            crate::layout::by_key_plans(conn)?;
        }
        let r: Reverted = sql_query(&sql[current])
            .bind::<BigInt, _>(source_op)
            .bind::<BigInt, _>(cursor)
            .bind::<BigInt, _>(limit as i64)
            .bind::<Bool, _>(args.force)
            .get_result(conn)
            .context("cannot revert the batch")?;
        let finished = match part {
            Part::Images(_) | Part::InsertedComments | Part::DeletedComments => r.seen == 0,
            Part::Inserted { high, .. } => r.next >= *high,
        };
        cursor = r.next;
        seen += r.seen;
        already += r.already;
        if finished {
            current += 1;
            if let Some(next) = parts.get(current) {
                cursor = start_of(next);
            }
        }
        Ok(Step {
            rows: r.reverted as u64,
            done: current >= parts.len(),
        })
    });
    let rows = stats.rows;
    let conflicts = (seen - rows as i64 - already).max(0);
    if conflicts > 0 && !ctx.global.quiet {
        eprintln!(
            "{conflicts} row(s) changed since operation {source_op} were left alone (use --force to revert them too)"
        );
    }
    ctx.finish_job(job.finish(
        conn,
        stats,
        json!({"reverted": rows, "of_operation": source_op, "conflicts": conflicts, "already_reverted": already}),
    ))
}

/// Every ticket id an import inserted: `insert_ids` ranges and `insert` rows ($1: operation).
const INSERTED_IDS_ALL: &str = "
    SELECT g.id FROM audit_log a
    CROSS JOIN LATERAL jsonb_array_elements(a.after -> 'ids') r
    CROSS JOIN LATERAL generate_series((r ->> 0)::bigint, (r ->> 1)::bigint) g(id)
    WHERE a.operation_id = $1 AND a.action = 'insert_ids' AND a.table_name = 'tickets'
    UNION ALL
    SELECT row_id FROM audit_log WHERE operation_id = $1 AND action = 'insert' AND table_name = 'tickets'";

/// The inserted ticket ids in the window ($2, $2 + $3]: each batch generates at most $3 ids
/// whatever the size of the import.
const INSERTED_IDS_WINDOW: &str = "
    SELECT g.id FROM audit_log a
    CROSS JOIN LATERAL jsonb_array_elements(a.after -> 'ids') r
    CROSS JOIN LATERAL generate_series(greatest((r ->> 0)::bigint, $2 + 1), least((r ->> 1)::bigint, $2 + $3)) g(id)
    WHERE a.operation_id = $1 AND a.action = 'insert_ids' AND a.table_name = 'tickets'
    UNION ALL
    SELECT row_id FROM audit_log
    WHERE operation_id = $1 AND action = 'insert' AND table_name = 'tickets' AND row_id > $2 AND row_id <= $2 + $3";

fn plan_part(conn: &mut PgConnection, op: i64, part: &Part, layout: Layout) -> anyhow::Result<Plan> {
    let sql = match part {
        Part::InsertedComments => comments::plan_inserted_sql(layout),
        Part::DeletedComments => comments::plan_deleted_sql(layout),
        // On Citus comments are distributed by their ticket, so joining them to their audit rows
        // (by row_id) is not co-located: the audit rows come to the coordinator first, and those
        // whose comment is gone are the ones the inner join does not find.
        Part::Images(images) if layout.distributed() && images.table == "comments" => format!(
            "WITH a AS MATERIALIZED (
                 SELECT row_id, before, after FROM audit_log
                 WHERE operation_id = $1 AND table_name = 'comments' AND action IN ('{FIX_ACTION}', '{UPDATE_ACTION}')
             ), {gone}, found AS MATERIALIZED (
                 SELECT {after} AS holds_after, {before} AS holds_before, a.row_id IN (SELECT row_id FROM gone) AS gone
                 FROM a JOIN comments t ON t.id = a.row_id
             )
             SELECT count(*) FILTER (WHERE holds_after AND NOT holds_before AND NOT gone) AS revertible,
                    count(*) FILTER (WHERE holds_before) AS already,
                    (SELECT count(*) FROM a) - count(*) FILTER (WHERE (holds_after AND NOT gone) OR holds_before) AS conflicts
             FROM found",
            after = images.holds("a.after"),
            before = images.holds("a.before"),
            gone = distributed::gone_references(images),
        ),
        Part::Images(images) => format!(
            "SELECT count(*) FILTER (WHERE t.id IS NOT NULL AND {after} AND NOT {before} AND {refs}) AS revertible,
                    count(*) FILTER (WHERE t.id IS NOT NULL AND {before}) AS already,
                    count(*) FILTER (WHERE t.id IS NULL OR NOT (({after} AND {refs}) OR {before})) AS conflicts
             FROM audit_log a LEFT JOIN {table} t ON t.id = a.row_id
             WHERE a.operation_id = $1 AND a.table_name = '{table}' AND a.action IN ('{FIX_ACTION}', '{UPDATE_ACTION}')",
            table = images.table,
            after = images.holds("a.after"),
            before = images.holds("a.before"),
            // On Citus only ticket images come here, whose references (users) every node holds.
            refs = images.references_kept("a.before", layout),
        ),
        // An inserted ticket is revertible while this operation wrote it last; one that is
        // deleted (or purged) is already as before.
        Part::Inserted { .. } => format!(
            "SELECT count(*) FILTER (WHERE t.deleted_at IS NULL AND t.last_operation_id = $1) AS revertible,
                    count(*) FILTER (WHERE t.id IS NULL OR t.deleted_at IS NOT NULL) AS already,
                    count(*) FILTER (WHERE t.deleted_at IS NULL AND t.last_operation_id IS DISTINCT FROM $1) AS conflicts
             FROM ({INSERTED_IDS_ALL}) i LEFT JOIN tickets t ON t.id = i.id"
        ),
    };
    sql_query(sql)
        .bind::<BigInt, _>(op)
        .get_result(conn)
        .context("cannot compare the operation's rows with their current values")
}

/// Whether a part's batches address tickets by (id, created_at), each in its one partition:
/// the images of tickets and an import's inserted tickets on the partitioned layout. By id
/// alone, every partition was probed for each ticket (19,000 reverted rows at 1M tickets:
/// 3.0 s against plain's 1.65).
fn by_partition(part: &Part, layout: Layout) -> bool {
    layout.partitioned()
        && match part {
            Part::Images(images) => images.table == "tickets",
            Part::Inserted { .. } => true,
            Part::InsertedComments | Part::DeletedComments => false,
        }
}

/// One batch of a part. Binds: $1 the operation undone, $2 the cursor, $3 the batch size,
/// $4 --force. Returns how many rows were reverted, the next cursor and how many audit rows
/// (or ids) the batch looked at.
fn revert_sql(part: &Part, undo_op: i64, force: bool, restate: RestateUnchanged, layout: Layout) -> String {
    match part {
        Part::InsertedComments => comments::revert_inserted_sql(undo_op, layout),
        Part::DeletedComments => comments::revert_deleted_sql(undo_op, layout),
        Part::Images(images) => {
            let table = &images.table;
            // A ticket whose created_at comes back moves to its month; on partitions its key
            // (which routes lookups) follows.
            let keys = if layout.keyed() && table == "tickets" {
                "keys_moved AS (
                     UPDATE ticket_keys k SET created_at = c.created_at
                     FROM changed c WHERE k.ticket_id = c.id AND k.created_at <> c.created_at
                 ),"
            } else {
                ""
            };
            // Tag sets are put back as a whole: links not in the image go, missing ones come.
            let tags = if images.tags {
                "tags_removed AS (
                     DELETE FROM ticket_tags x USING changed c
                     WHERE c.before ? 'tag_ids' AND x.ticket_id = c.id
                       AND NOT x.tag_id IN (SELECT jsonb_array_elements_text(c.before -> 'tag_ids')::bigint)
                 ), tags_added AS (
                     INSERT INTO ticket_tags (ticket_id, tag_id)
                     SELECT c.id, e::bigint FROM changed c
                     CROSS JOIN LATERAL jsonb_array_elements_text(c.before -> 'tag_ids') e
                     WHERE c.before ? 'tag_ids'
                     ON CONFLICT DO NOTHING
                 ),"
            } else {
                ""
            };
            // Without --force a reverted row held the after-image, so its values before this
            // undo are that image; the comparison sits in the UPDATE's own WHERE, which
            // PostgreSQL re-checks on the newest version of a row changed concurrently. With
            // --force the old values are read from the locked row instead.
            // `--force`: each row read and locked first, its old values kept for the audit row;
            // a row that holds the before-image already is neither (nothing to revert).
            let values = values_of(table, "a.before");
            let locked = |join: &str, condition: &str, lock: &str| {
                format!(
                    "(SELECT a.*, {values} AS old_values FROM a {join} WHERE {condition} AND NOT {before} {lock}) a",
                    before = images.holds("a.before")
                )
            };
            let refs = images.references_kept("a.before", layout);
            let (old_values, condition) = if force {
                ("a.old_values", format!("NOT {} AND {refs}", images.holds("a.before")))
            } else {
                (
                    "a.after",
                    format!(
                        "{} AND NOT {} AND {refs}",
                        images.holds("a.after"),
                        images.holds("a.before")
                    ),
                )
            };
            let window = format!(
                "SELECT id AS audit_id, row_id, before, after FROM audit_log
                 WHERE operation_id = $1 AND table_name = '{table}'
                   AND action IN ('{FIX_ACTION}', '{UPDATE_ACTION}') AND id < $2
                 ORDER BY id DESC LIMIT $3"
            );
            let set = images.restore("a.before", restate);
            let returning = format!("RETURNING t.id, t.created_at, a.before, {old_values} AS old_values");
            let before = images.holds("a.before");
            // On partitions each ticket is read, updated and counted where its key says it is
            // (nested loops: a probe a ticket); a ticket without a key (written by hand) by id.
            let (window, changed, already) = if by_partition(part, layout) {
                let (in_month, without_key) = if force {
                    (
                        locked(
                            "CROSS JOIN LATERAL (SELECT * FROM tickets t
                             WHERE t.id = a.row_id AND t.created_at = a.partition_key OFFSET 0 FOR UPDATE) t",
                            "true",
                            "",
                        ),
                        locked(
                            "JOIN tickets t ON t.id = a.row_id",
                            "a.partition_key IS NULL",
                            "FOR UPDATE OF t",
                        ),
                    )
                } else {
                    ("a".to_string(), "a".to_string())
                };
                (
                    format!(
                        "SELECT w.*, k.created_at AS partition_key FROM ({window}) w
                         LEFT JOIN ticket_keys k ON k.ticket_id = w.row_id"
                    ),
                    format!(
                        "changed_in_month AS (
                             UPDATE tickets t SET {set} FROM {in_month}
                             WHERE a.partition_key IS NOT NULL AND t.id = a.row_id AND t.created_at = a.partition_key
                               AND {condition} AND $4 = $4 -- every batch statement takes $1…$4
                             {returning}
                         ), changed_without_key AS (
                             UPDATE tickets t SET {set} FROM {without_key}
                             WHERE a.partition_key IS NULL AND t.id = a.row_id AND {condition}
                             {returning}
                         ), changed AS (
                             SELECT * FROM changed_in_month UNION ALL SELECT * FROM changed_without_key
                         )"
                    ),
                    format!(
                        "(SELECT count(*) FROM left_alone a {probe} WHERE {before})",
                        probe = crate::layout::probe_ticket_at("t", "a.row_id", "a.partition_key"),
                    ),
                )
            } else {
                let source = if force {
                    locked(&format!("JOIN {table} t ON t.id = a.row_id"), "true", "FOR UPDATE OF t")
                } else {
                    "a".to_string()
                };
                (
                    window,
                    format!(
                        "changed AS (
                             UPDATE {table} t SET {set}
                             FROM {source}
                             WHERE t.id = a.row_id AND {condition} AND $4 = $4 -- every batch statement takes $1…$4
                             {returning}
                         )"
                    ),
                    format!("(SELECT count(*) FROM left_alone a JOIN {table} t ON t.id = a.row_id WHERE {before})"),
                )
            };
            format!(
                "WITH a AS ({window}
                 ), {changed}, {tags} {keys} audited AS (
                     INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                     SELECT {undo_op}, '{table}', id, '{FIX_ACTION}', old_values, before FROM changed
                 ), left_alone AS MATERIALIZED (
                     SELECT * FROM a WHERE row_id NOT IN (SELECT id FROM changed)
                 )
                 SELECT (SELECT count(*) FROM changed) AS reverted,
                        coalesce((SELECT min(audit_id) FROM a), $2) AS next,
                        (SELECT count(*) FROM a) AS seen,
                        {already} AS already"
            )
        }
        Part::Inserted { .. } if layout.partitioned() => inserted_by_partition_sql(undo_op),
        Part::Inserted { .. } => format!(
            "WITH ids AS ({INSERTED_IDS_WINDOW}
             ), work AS (
                 SELECT t.id, t.last_operation_id FROM tickets t JOIN ids ON ids.id = t.id
                 WHERE t.deleted_at IS NULL AND (t.last_operation_id = $1 OR $4)
                 FOR UPDATE OF t
             ), changed AS (
                 UPDATE tickets t SET deleted_at = now(), last_operation_id = {undo_op}
                 FROM work w WHERE t.id = w.id
                 RETURNING t.id, w.last_operation_id AS old_operation_id, t.deleted_at
             ), {audited}
             SELECT (SELECT count(*) FROM changed) AS reverted, $2 + $3 AS next, (SELECT count(*) FROM ids) AS seen,
                    -- A probe an id (a subquery in an aggregate's FILTER is never made a join): as a
                    -- join, planned for generate_series' guess of 1,000 ids a range, it hashed the
                    -- whole table every batch (330 ms at 1M tickets).
                    (SELECT count(*) FILTER (WHERE NOT EXISTS (
                                SELECT 1 FROM tickets t WHERE t.id = ids.id AND t.deleted_at IS NULL))
                     FROM ids) AS already",
            audited = inserted_audited(undo_op),
        ),
    }
}

/// The audit rows of a batch of inserted tickets soft-deleted by undo `undo_op` (`changed`).
fn inserted_audited(undo_op: i64) -> String {
    format!(
        "audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {undo_op}, 'tickets', id, '{FIX_ACTION}',
                    jsonb_build_object('deleted_at', NULL, 'last_operation_id', old_operation_id),
                    jsonb_build_object('deleted_at', deleted_at, 'last_operation_id', {undo_op})
             FROM changed
         )"
    )
}

/// A batch of an import's inserted tickets on the partitioned layout: each id's created_at read
/// from its key, and the ticket locked, counted and soft-deleted in its one partition (nested
/// loops, run-time pruning); by id alone, every partition was probed for each ticket (20,000
/// tickets at 1M: 2.1 s against plain's 0.7). A ticket without a key (written by hand, or
/// purged since) by id. Needs `layout::by_key_plans`.
fn inserted_by_partition_sql(undo_op: i64) -> String {
    format!(
        "WITH ids AS ({INSERTED_IDS_WINDOW}
         ), keyed AS MATERIALIZED (
             SELECT ids.id, k.created_at FROM ids LEFT JOIN ticket_keys k ON k.ticket_id = ids.id
         ), work AS (
             SELECT t.id, t.created_at, t.last_operation_id FROM keyed k
             CROSS JOIN LATERAL (SELECT t.id, t.created_at, t.last_operation_id FROM tickets t
                                 WHERE t.id = k.id AND t.created_at = k.created_at
                                   AND t.deleted_at IS NULL AND (t.last_operation_id = $1 OR $4)
                                 OFFSET 0 FOR UPDATE) t
             UNION ALL
             SELECT * FROM (SELECT t.id, t.created_at, t.last_operation_id FROM keyed k JOIN tickets t ON t.id = k.id
                            WHERE k.created_at IS NULL AND t.deleted_at IS NULL AND (t.last_operation_id = $1 OR $4)
                            FOR UPDATE OF t) without_key
         ), changed AS (
             UPDATE tickets t SET deleted_at = now(), last_operation_id = {undo_op}
             FROM work w WHERE t.id = w.id AND t.created_at = w.created_at
             RETURNING t.id, w.last_operation_id AS old_operation_id, t.deleted_at
         ), {audited}
         SELECT (SELECT count(*) FROM changed) AS reverted, $2 + $3 AS next, (SELECT count(*) FROM keyed) AS seen,
                (SELECT count(*) FILTER (WHERE CASE WHEN k.created_at IS NULL
                            THEN NOT EXISTS (SELECT 1 FROM tickets t WHERE t.id = k.id AND t.deleted_at IS NULL)
                            ELSE NOT EXISTS (SELECT 1 FROM tickets t WHERE t.id = k.id AND t.created_at = k.created_at
                                                                     AND t.deleted_at IS NULL) END)
                 FROM keyed k) AS already",
        audited = inserted_audited(undo_op),
    )
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
