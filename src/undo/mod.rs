//! Undo of an operation from its audit trail: the engine of `ticketops undo`.
//!
//! - Rows recorded with before/after images (`fix` rows of the fixes, `update` rows of the
//!   imports, in tickets, users or comments) get their before-image back, tag sets included.
//! - Tickets an import inserted (`insert` rows and `insert_ids` ranges) are soft-deleted.
//! - Comments an import inserted are deleted, each recorded whole; an undo of that puts them
//!   back (`comments`).
//! - A soft-delete run is restored through the restore engine (the command calls it).
//!
//! A row changed since the operation (its current values differ from the operation's
//! after-image; for an inserted ticket, another operation wrote it last) is a conflict: left
//! alone unless `force`. Every batch records its own before/after images, so that an undo can
//! be undone in turn. On Citus the batch statements are others (`distributed`).

use anyhow::{Context as _, bail};
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

mod comments;
mod distributed;

use crate::audit::{DELETE_ACTION, FIX_ACTION, INSERT_ACTION, INSERT_IDS_ACTION, SOFT_DELETE_ACTION, UPDATE_ACTION};
use crate::exit::UsageError;
use crate::filters::RestateUnchanged;
use crate::job::Step;
use crate::layout::Layout;
use crate::models::BulkOperation;

/// What an operation's audit trail says its undo has to do.
#[derive(Debug)]
pub enum Undo {
    /// A soft-delete run: restored as `restore --operation` does (the restore engine).
    SoftDelete,
    /// Parts reverted in batches, one part after the other.
    Parts(Vec<Part>),
}

/// Reads which tables and actions operation `op` recorded and how each is undone: a usage
/// error for an operation that changed no rows, an error naming what it recorded for one that
/// cannot be undone.
pub fn what_to_undo(conn: &mut PgConnection, op: &BulkOperation) -> anyhow::Result<Undo> {
    if matches!(op.kind.as_str(), "cleanup purge" | "cleanup retention") {
        bail!("{}", removed_for_good(op));
    }
    let actions: Vec<ActionCount> =
        sql_query("SELECT DISTINCT table_name, action FROM audit_log WHERE operation_id = $1 ORDER BY 1, 2")
            .bind::<BigInt, _>(op.id)
            .load(conn)
            .context("cannot read the operation's audit trail")?;
    if actions.is_empty() {
        return Err(UsageError(format!(
            "operation {} ({}) changed no rows; there is nothing to undo",
            op.id, op.kind
        ))
        .into());
    }
    if actions.iter().all(|a| a.action == SOFT_DELETE_ACTION) {
        return Ok(Undo::SoftDelete);
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
                    parts.push(Part::Images(ImageSet::load(conn, op.id, &a.table_name)?));
                }
            }
            INSERT_ACTION | INSERT_IDS_ACTION if a.table_name == "tickets" => {}
            INSERT_ACTION if a.table_name == "comments" => parts.push(Part::InsertedComments),
            DELETE_ACTION if a.table_name == "comments" => parts.push(Part::DeletedComments),
            INSERT_ACTION => {} // users an import created stay (see `undo --help`)
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
    .get_result(conn)
    .context("cannot read the inserted tickets from the audit trail")?;
    if let (Some(low), Some(high)) = (span.low, span.high) {
        parts.push(Part::Inserted { low, high });
    }
    Ok(Undo::Parts(parts))
}

/// Why a purge or retention cannot be undone, and where what it removed is: its archives, by
/// the paths given to it, made absolute with the directory it ran in (recorded since
/// 2026-12-05; older operations name them as given).
fn removed_for_good(op: &BulkOperation) -> String {
    let text = |key: &str| op.args.get(key).and_then(serde_json::Value::as_str);
    let ran_in = text("working_directory").map(std::path::Path::new);
    let path = |key: &str| {
        text(key).map(|given| match ran_in {
            Some(dir) => shell_word(&dir.join(given).to_string_lossy()),
            None => shell_word(given),
        })
    };
    let head = format!(
        "undo of operation {} ({}) is not supported: what it removed is gone from the database",
        op.id, op.kind
    );
    let as_given = if ran_in.is_some() {
        ""
    } else {
        " (as given to that run, relative to where it ran)"
    };
    match (path("archive"), path("archive_comments")) {
        (None, _) => format!("{head}, and it was written to no archive"),
        (Some(tickets), None) => {
            format!("{head}; its archive has the tickets: ticketops import tickets {tickets}{as_given}")
        }
        (Some(tickets), Some(comments)) => format!(
            "{head}; its archives have them: ticketops import tickets {tickets}, then ticketops import comments \
             {comments}{as_given}"
        ),
    }
}

/// `word` as a shell reads it back: quoted when it holds anything but plain path characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._+-=@%,:".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What undoing `parts` of operation `op` would do: a pass over every row (for the dry run and
/// the confirmation question; the batches count the same things as they go).
pub fn plan(conn: &mut PgConnection, op: i64, parts: &[Part]) -> anyhow::Result<Plan> {
    let layout = Layout::of(conn)?;
    let mut plan = Plan::default();
    for part in parts {
        plan += plan_part(conn, op, part, layout)?;
    }
    Ok(plan)
}

/// The batches of an undo, for the batch-job runner: each [`step`](Reverter::step) reverts the
/// next batch of the current part and moves on to the next part when one is done.
pub struct Reverter {
    parts: Vec<Part>,
    /// Each part's batch statement.
    sql: Vec<String>,
    layout: Layout,
    source_op: i64,
    force: bool,
    current: usize,
    /// Images are walked by descending audit id, inserted tickets by ascending id window.
    cursor: i64,
    /// Audit rows (or inserted ids) looked at, and of those already as before.
    seen: i64,
    already: i64,
}

impl Reverter {
    /// The batches undoing `parts` of operation `source_op`, recorded as operation `undo_op`.
    pub fn new(
        conn: &mut PgConnection,
        source_op: i64,
        undo_op: i64,
        parts: Vec<Part>,
        force: bool,
    ) -> anyhow::Result<Reverter> {
        let layout = Layout::of(conn)?;
        let restate = RestateUnchanged::check(conn)?;
        let sql = parts
            .iter()
            .map(|p| {
                if layout.distributed() {
                    distributed::revert_sql(p, undo_op, force, restate)
                } else {
                    revert_sql(p, undo_op, force, restate, layout)
                }
            })
            .collect();
        let cursor = parts.first().map(start_of).unwrap_or(0);
        Ok(Reverter {
            parts,
            sql,
            layout,
            source_op,
            force,
            current: 0,
            cursor,
            seen: 0,
            already: 0,
        })
    }

    /// Reverts the next batch of at most `limit` rows.
    pub fn step(&mut self, conn: &mut PgConnection, limit: u64) -> anyhow::Result<Step> {
        let Some(part) = self.parts.get(self.current) else {
            return Ok(Step { rows: 0, done: true });
        };
        let layout = self.layout;
        if layout.distributed() && matches!(part, Part::Images(i) if i.table == "users") {
            // Citus refuses to write users (a reference table that tickets and comments refer
            // to) after reading the audit rows in parallel: one connection per worker.
            sql_query("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'").execute(conn)?;
        }
        // `--force` reads and locks each row of a batch first: joined by id as a hash, the
        // whole table was read for every batch (640 ms a batch at 1M tickets).
        let forced_images = self.force && !layout.distributed() && matches!(part, Part::Images(_));
        if by_partition(part, layout) || forced_images {
            crate::layout::by_key_plans(conn)?;
        }
        let r: Reverted = sql_query(&self.sql[self.current])
            .bind::<BigInt, _>(self.source_op)
            .bind::<BigInt, _>(self.cursor)
            .bind::<BigInt, _>(limit as i64)
            .bind::<Bool, _>(self.force)
            .get_result(conn)
            .context("cannot revert the batch")?;
        let finished = match part {
            Part::Images(_) | Part::InsertedComments | Part::DeletedComments => r.seen == 0,
            Part::Inserted { high, .. } => r.next >= *high,
        };
        self.cursor = r.next;
        self.seen += r.seen;
        self.already += r.already;
        if finished {
            self.current += 1;
            if let Some(next) = self.parts.get(self.current) {
                self.cursor = start_of(next);
            }
        }
        Ok(Step {
            rows: r.reverted as u64,
            done: self.current >= self.parts.len(),
        })
    }

    /// Rows looked at that were already as before the operation (or gone).
    pub fn already(&self) -> i64 {
        self.already
    }

    /// Rows looked at that were neither reverted (`reverted` of them) nor already as before:
    /// changed since the operation.
    pub fn conflicts(&self, reverted: u64) -> i64 {
        (self.seen - reverted as i64 - self.already).max(0)
    }
}

/// Where a part's cursor starts: images from the newest audit row down, inserted tickets from
/// their lowest id up.
fn start_of(part: &Part) -> i64 {
    match part {
        Part::Images(_) | Part::InsertedComments | Part::DeletedComments => i64::MAX,
        Part::Inserted { low, .. } => low - 1,
    }
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
pub struct ImageSet {
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

/// What an undo would do, counted over every row it looks at.
#[derive(QueryableByName, Default, Clone, Copy)]
pub struct Plan {
    /// Rows that hold what the operation left: reverted.
    #[diesel(sql_type = BigInt)]
    pub revertible: i64,
    /// Rows already as before the operation (or gone).
    #[diesel(sql_type = BigInt)]
    pub already: i64,
    /// Rows changed since: left alone unless --force.
    #[diesel(sql_type = BigInt)]
    pub conflicts: i64,
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
pub enum Part {
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
            } else if layout.partitioned() && table == "comments" {
                // The key of a comment that goes back to another ticket names that ticket.
                "keys_moved AS (
                     UPDATE comment_keys k SET ticket_id = (c.before ->> 'ticket_id')::bigint
                     FROM changed c
                     WHERE c.before ? 'ticket_id' AND k.ticket_id = (c.old_values ->> 'ticket_id')::bigint
                       AND k.comment_id = c.id AND k.ticket_id <> (c.before ->> 'ticket_id')::bigint
                 ),"
            } else {
                ""
            };
            // Tag sets are put back as a whole: links not in the image go, missing ones come.
            // On partitions the links of a ticket whose created_at comes back go to its month
            // with it, in this statement (each month of links references its month of
            // tickets); those that go are left where they are, those that come are made there
            // (unless the ticket has them in its old month: they move).
            let removed_link = "c.before ? 'tag_ids'
                       AND NOT x.tag_id IN (SELECT jsonb_array_elements_text(c.before -> 'tag_ids')::bigint)";
            let mut tags = String::new();
            if images.tags {
                tags += &format!(
                    "tags_removed AS (
                         DELETE FROM ticket_tags x USING changed c
                         WHERE x.ticket_id = c.id AND {removed_link}
                     ), tags_added AS (
                         INSERT INTO ticket_tags ({link_columns})
                         SELECT c.id, e::bigint{created_at} FROM changed c
                         CROSS JOIN LATERAL jsonb_array_elements_text(c.before -> 'tag_ids') e
                         WHERE c.before ? 'tag_ids'
                           AND NOT EXISTS (SELECT 1 FROM ticket_tags y WHERE y.ticket_id = c.id AND y.tag_id = e::bigint)
                         ON CONFLICT DO NOTHING
                     ),",
                    link_columns = layout.link_columns(),
                    created_at = layout.link_created_at("c.created_at"),
                );
            }
            if layout.partitioned() && table == "tickets" {
                let kept = if images.tags {
                    format!(" AND NOT coalesce(({removed_link}), false)")
                } else {
                    String::new()
                };
                tags += &format!(
                    "links_moved AS (
                         UPDATE ticket_tags x SET ticket_created_at = c.created_at FROM changed c
                         WHERE x.ticket_id = c.id AND x.ticket_created_at <> c.created_at{kept}
                     ), comments_moved AS (
                         UPDATE comments x SET ticket_created_at = c.created_at FROM changed c
                         WHERE x.ticket_id = c.id AND x.ticket_created_at <> c.created_at
                     ),"
                );
            }
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
            let mut set = images.restore("a.before", restate);
            if layout.partitioned() && table == "comments" && images.columns.iter().any(|(c, _)| *c == "ticket_id") {
                // A comment going back to another ticket goes to that ticket's month.
                set += ", ticket_created_at = coalesce((SELECT k.created_at FROM ticket_keys k
                           WHERE k.ticket_id = (a.before ->> 'ticket_id')::bigint), t.ticket_created_at)";
            }
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

#[cfg(test)]
mod tests {
    use super::shell_word;

    #[test]
    fn archive_paths_are_named_as_a_shell_reads_them_back() {
        assert_eq!(shell_word("/srv/archive/old-2026.csv"), "/srv/archive/old-2026.csv");
        assert_eq!(shell_word("/srv/my archive/old.csv"), "'/srv/my archive/old.csv'");
        assert_eq!(shell_word("it's.csv"), r"'it'\''s.csv'");
        assert_eq!(shell_word(""), "''");
    }
}
