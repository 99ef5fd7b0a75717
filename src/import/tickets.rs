//! `import tickets`: the fields of a ticket dump and how a batch of them is written.
//!
//! Write path, per batch:
//! 1. organizations, users and tags are resolved to ids (cached; missing ones upserted);
//! 2. one index lookup tells which external_ids exist already;
//! 3. new tickets get ids from the sequence and go in with binary `COPY`, with their tag
//!    links and an `insert` audit row each — the fastest way PostgreSQL takes rows;
//! 4. rows that exist are staged with binary `COPY` into a temporary table, compared with the
//!    stored row and tag set in one query, and only those that really differ are merged with
//!    `INSERT … ON CONFLICT (external_id) DO UPDATE … WHERE <differs> RETURNING`, their
//!    before-images written to `audit_log` by the same statement. Unchanged rows are never
//!    written, so a re-import leaves no dead tuples.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::pg::CopyFormat;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use diesel::{PgConnection, QueryableByName, sql_query};

use super::copy_binary::{BinaryCopy, write_error};
use super::entities::{EntityCache, UserRef};
use super::normalize;
use super::source::{ColumnMap, FieldSpec, RecordFields, RowError};
use super::{Counts, ImportKind, Numbered, ParseOptions, Prefetcher, WriterReject};
use crate::models::{Ticket, TicketChannel, TicketPriority, TicketStatus, TicketTag, UserRole};
use crate::schema::{ticket_tags, tickets};

const EXTERNAL_ID: usize = 0;
const SUBJECT: usize = 1;
const DESCRIPTION: usize = 2;
const STATUS: usize = 3;
const PRIORITY: usize = 4;
const CHANNEL: usize = 5;
const REQUESTER_EMAIL: usize = 6;
const REQUESTER_NAME: usize = 7;
const ASSIGNEE_EMAIL: usize = 8;
const ORGANIZATION: usize = 9;
const TAGS: usize = 10;
const CREATED_AT: usize = 11;
const UPDATED_AT: usize = 12;
const SOLVED_AT: usize = 13;

/// The import format, in the order `export tickets` writes it.
pub const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        name: "external_id",
        required: true,
        indexed: true,
    },
    FieldSpec {
        name: "subject",
        required: true,
        indexed: false,
    },
    FieldSpec {
        name: "description",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "status",
        required: true,
        indexed: false,
    },
    FieldSpec {
        name: "priority",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "channel",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "requester_email",
        required: true,
        indexed: true,
    },
    FieldSpec {
        name: "requester_name",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "assignee_email",
        required: false,
        indexed: true,
    },
    FieldSpec {
        name: "organization",
        required: false,
        indexed: true,
    },
    FieldSpec {
        name: "tags",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "created_at",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "updated_at",
        required: false,
        indexed: false,
    },
    FieldSpec {
        name: "solved_at",
        required: false,
        indexed: false,
    },
];

pub const MAX_SUBJECT_CHARS: usize = 500;

/// One valid ticket row, normalised.
#[derive(Debug, Clone)]
pub struct TicketRow {
    pub external_id: String,
    pub subject: String,
    pub description: Option<String>,
    pub status: TicketStatus,
    pub priority: TicketPriority,
    pub channel: TicketChannel,
    pub requester_email: String,
    pub requester_name: Option<String>,
    pub assignee_email: Option<String>,
    pub organization: Option<String>,
    pub tags: Vec<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub solved_at: Option<DateTime<Utc>>,
}

/// Which optional columns the file has: a column the file lacks leaves stored values alone.
#[derive(Debug, Clone, Copy, Default)]
struct Present {
    description: bool,
    priority: bool,
    channel: bool,
    assignee: bool,
    organization: bool,
    tags: bool,
    solved_at: bool,
}

pub struct TicketImport {
    present: Present,
    undelete: bool,
    initial_load: bool,
    cache: EntityCache,
    /// The time given to rows without created_at (the same for the whole import).
    import_time: DateTime<Utc>,
    warned_missing_created_at: bool,
    /// Indexes and foreign keys dropped by `--initial-load`, recreated by `end`.
    dropped: Rebuild,
    /// Time spent in each phase, printed with -v: what limits an import.
    phases: PhaseTimes,
    /// Tickets inserted by this run, to decide whether statistics need refreshing.
    inserted_here: u64,
    /// The sequence behind tickets.id, looked up once: resolving it inside the id query cost
    /// a catalog lookup per row (ten times the nextval itself).
    id_sequence: Option<String>,
    /// Each external_id reaches the writer once (see `ImportKind::keys_seen_once`).
    keys_seen_once: bool,
    /// Reads stored tickets when no read-ahead did.
    stored: StoredLookup,
}

/// Past this many inserted tickets an import ends with ANALYZE.
const ANALYZE_AFTER_ROWS: u64 = 50_000;

/// Accumulated wall time per phase of the write path.
#[derive(Default)]
struct PhaseTimes {
    verbose: bool,
    totals: Vec<(&'static str, std::time::Duration)>,
}

impl PhaseTimes {
    fn add(&mut self, phase: &'static str, since: std::time::Instant) {
        let elapsed = since.elapsed();
        match self.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += elapsed,
            None => self.totals.push((phase, elapsed)),
        }
    }

    fn report(&self) {
        if self.verbose {
            let parts: Vec<String> = self
                .totals
                .iter()
                .map(|(p, d)| format!("{p} {:.2} s", d.as_secs_f64()))
                .collect();
            eprintln!("time by phase: {}", parts.join(", "));
        }
    }
}

impl TicketImport {
    fn analyze(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        sql_query("ANALYZE tickets, ticket_tags")
            .execute(conn)
            .context("cannot ANALYZE after the import")?;
        self.phases.add("analyze", started);
        Ok(())
    }

    pub fn new(undelete: bool, initial_load: bool, verbose: bool) -> TicketImport {
        TicketImport {
            present: Present::default(),
            undelete,
            initial_load,
            cache: EntityCache::default(),
            import_time: Utc::now(),
            warned_missing_created_at: false,
            dropped: Rebuild::default(),
            inserted_here: 0,
            id_sequence: None,
            keys_seen_once: false,
            stored: StoredLookup::default(),
            phases: PhaseTimes {
                verbose,
                totals: Vec::new(),
            },
        }
    }
}

fn parse_email(fields: &RecordFields<'_>, index: usize) -> Result<Option<String>, RowError> {
    fields.parse(index, "invalid e-mail", normalize::email)
}

fn parse_time(
    fields: &RecordFields<'_>,
    index: usize,
    options: &ParseOptions,
) -> Result<Option<DateTime<Utc>>, RowError> {
    fields.parse(index, "invalid timestamp", |v| normalize::timestamp(v, options.zone))
}

fn optional_text(fields: &RecordFields<'_>, index: usize) -> Result<Option<String>, RowError> {
    Ok(fields.non_empty(index)?.map(|v| v.into_owned()))
}

impl ImportKind for TicketImport {
    type Row = TicketRow;
    type Prefetched = HashMap<String, Stored>;
    const NAME: &'static str = "tickets";
    const FIELDS: &'static [FieldSpec] = FIELDS;

    fn parse(fields: &RecordFields<'_>, options: &ParseOptions) -> Result<TicketRow, RowError> {
        let external_id = fields.required(EXTERNAL_ID)?.into_owned();
        let subject = fields.required(SUBJECT)?.into_owned();
        let subject_chars = subject.chars().count();
        if subject_chars > MAX_SUBJECT_CHARS {
            return Err(RowError::new(
                Some("subject"),
                "subject too long",
                format!("subject has {subject_chars} characters, at most {MAX_SUBJECT_CHARS} are allowed"),
            ));
        }
        let status = fields.parse(STATUS, "invalid status", normalize::ticket_status)?;
        let priority = fields.parse(PRIORITY, "invalid priority", normalize::ticket_priority)?;
        let channel = fields.parse(CHANNEL, "invalid channel", normalize::ticket_channel)?;
        let requester_email = parse_email(fields, REQUESTER_EMAIL)?.ok_or_else(|| {
            RowError::new(
                Some("requester_email"),
                "missing required value",
                "requester_email is empty",
            )
        })?;
        let tags = fields.parse(TAGS, "invalid tags", |v| normalize::tags(v, options.tag_separator))?;
        let created_at = parse_time(fields, CREATED_AT, options)?;
        let updated_at = parse_time(fields, UPDATED_AT, options)?;
        let solved_at = parse_time(fields, SOLVED_AT, options)?;
        Ok(TicketRow {
            external_id,
            subject,
            description: optional_text(fields, DESCRIPTION)?,
            status,
            priority,
            channel,
            requester_email,
            requester_name: optional_text(fields, REQUESTER_NAME)?,
            assignee_email: parse_email(fields, ASSIGNEE_EMAIL)?,
            organization: optional_text(fields, ORGANIZATION)?,
            tags,
            created_at,
            updated_at,
            solved_at,
        })
    }

    const KEY_COLUMN: Option<(&'static str, &'static str)> = Some(("tickets", "external_id"));

    fn key(row: &TicketRow) -> Option<&str> {
        Some(&row.external_id)
    }

    fn configure(&mut self, columns: &ColumnMap) {
        self.present = Present {
            description: columns.has(DESCRIPTION),
            priority: columns.has(PRIORITY),
            channel: columns.has(CHANNEL),
            assignee: columns.has(ASSIGNEE_EMAIL),
            organization: columns.has(ORGANIZATION),
            tags: columns.has(TAGS),
            solved_at: columns.has(SOLVED_AT),
        };
    }

    fn begin(&mut self, conn: &mut PgConnection, _op_id: i64) -> anyhow::Result<()> {
        sql_query(STAGE_TABLE_SQL)
            .execute(conn)
            .context("cannot create the staging table")?;
        if self.initial_load {
            self.dropped = drop_indexes_and_keys(conn, !self.keys_seen_once)?;
            self.cache
                .lock_users_for_load(conn)
                .context("cannot lock users for the initial load")?;
        }
        Ok(())
    }

    fn end(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        sql_query("SET LOCAL enable_seqscan = on").execute(conn)?;
        if self.initial_load {
            let started = std::time::Instant::now();
            self.cache
                .flush_held_users(conn)
                .context("cannot write the users the load held back")?;
            self.phases.add("write held-back users", started);
            let started = std::time::Instant::now();
            sql_query("SET LOCAL maintenance_work_mem = '256MB'").execute(conn)?;
            recreate(conn, &self.dropped.keys_and_indexes)?;
            self.phases.add("rebuild keys and indexes", started);
            // Statistics before the validations: they tell the planner that the frozen pages
            // are all visible, so that the rebuilt indexes can be read without the heap.
            self.analyze(conn)?;
            let started = std::time::Instant::now();
            // Each validation is an anti-join of two tables that the rebuilt indexes give in
            // key order: a merge join reads them as they are (tag links against tickets:
            // 0.24 s), where the planner's choice, hashing one side, took 0.5-0.6 s.
            sql_query("SET LOCAL enable_hashjoin = off").execute(conn)?;
            recreate(conn, &self.dropped.foreign_keys)?;
            sql_query("SET LOCAL enable_hashjoin TO DEFAULT").execute(conn)?;
            self.phases.add("validate foreign keys", started);
        } else if self.inserted_here > ANALYZE_AFTER_ROWS {
            // Fresh statistics after a large load: without them the planner misjudges the next
            // import's batch lookups (measured: 8 s instead of 2 s for 1,000,000 rows).
            self.analyze(conn)?;
        }
        self.phases.report();
        Ok(())
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    fn keys_seen_once(&mut self) {
        self.keys_seen_once = true;
    }

    /// The stored tickets of the next batch are read while this one is written: on a
    /// re-import that lookup is most of the work (an initial load needs none).
    fn prefetcher(&self) -> Option<Prefetcher<TicketRow, HashMap<String, Stored>>> {
        if self.initial_load {
            return None;
        }
        let with_tags = self.present.tags;
        let mut lookup = StoredLookup::default();
        Some(Box::new(move |conn, rows| {
            index_paths_only(conn)?;
            Ok(lookup.read(conn, rows, with_tags)?)
        }))
    }

    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<Numbered<TicketRow>>,
        prefetched: Option<HashMap<String, Stored>>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if !self.warned_missing_created_at && rows.iter().any(|r| r.row.created_at.is_none()) {
            self.warned_missing_created_at = true;
            eprintln!(
                "warning: some rows have no created_at (first at line {}); new tickets get the import time",
                rows.iter()
                    .find(|r| r.row.created_at.is_none())
                    .map(|r| r.line)
                    .unwrap_or(0)
            );
        }
        index_paths_only(conn)?;
        let started = std::time::Instant::now();
        self.resolve_entities(conn, &rows)
            .context("cannot resolve organizations, users and tags")?;
        self.phases.add("resolve users/orgs/tags", started);
        let started = std::time::Instant::now();

        // An initial load starts from an empty, locked table: when every key comes once, none
        // can exist yet and the lookup is skipped.
        let stored = match prefetched {
            Some(stored) => stored,
            None if self.initial_load && self.keys_seen_once => HashMap::new(),
            None => self
                .stored
                .read(conn, &rows, self.present.tags)
                .context("cannot look up existing tickets")?,
        };
        self.phases.add("fetch stored tickets", started);
        let started = std::time::Instant::now();
        let mut new = Vec::new();
        let mut old = Vec::new();
        for r in rows {
            match stored.get(&r.row.external_id) {
                None => new.push(r),
                // Rows equal to the stored ticket need neither staging nor the SQL comparison.
                Some(s) if self.certainly_unchanged(&r.row, s, op_id) => counts.unchanged += 1,
                Some(_) => old.push(r),
            }
        }
        self.phases.add("compare with stored", started);
        let started = std::time::Instant::now();
        self.insert_new(conn, op_id, new, counts)?;
        self.phases.add("COPY new tickets", started);
        self.merge_existing(conn, op_id, old, &stored, counts)?;
        Ok(Vec::new())
    }
}

/// Every statement of a batch touches a few thousand rows of large tables: index paths are
/// always right, and the planner, without statistics for a table that grows during the
/// import, otherwise picks sequential scans (measured: 5 s instead of 1 s per 1M rows).
/// For the rest of the current transaction.
fn index_paths_only(conn: &mut PgConnection) -> QueryResult<usize> {
    sql_query("SET LOCAL enable_seqscan = off").execute(conn)
}

/// Reads the stored tickets of a batch. Files are usually in the order their tickets were
/// inserted (a re-import of the same dump, an export), so a batch's tickets tend to be the
/// id range right after the previous batch's: one primary-key range scan reads them for a
/// fifth of the server time of 5,000 probes by external_id. The range is only a guess —
/// rows in it that are not the batch's are dropped, and keys it missed are probed — and it
/// is tried only while it keeps paying off.
#[derive(Default)]
struct StoredLookup {
    /// Where the next batch's tickets probably start.
    next_id: Option<i64>,
}

impl StoredLookup {
    /// The stored tickets with the external ids of `rows`, each with its sorted tag ids
    /// (when the file has tags), by external id (moved out of the ticket into the key).
    fn read(
        &mut self,
        conn: &mut PgConnection,
        rows: &[Numbered<TicketRow>],
        with_tags: bool,
    ) -> QueryResult<HashMap<String, Stored>> {
        let wanted: HashSet<&str> = rows.iter().map(|r| r.row.external_id.as_str()).collect();
        let mut stored: Vec<Ticket> = Vec::with_capacity(wanted.len());
        if let Some(first) = self.next_id {
            let in_range: Vec<Ticket> = tickets::table
                .filter(tickets::id.between(first, first + wanted.len() as i64 - 1))
                .select(Ticket::as_select())
                .load(conn)?;
            stored.extend(in_range.into_iter().filter(|t| wanted.contains(t.external_id.as_str())));
        }
        let guessed = stored.len();
        if stored.len() < wanted.len() {
            let found: HashSet<&str> = stored.iter().map(|t| t.external_id.as_str()).collect();
            let missing: Vec<&str> = wanted.iter().copied().filter(|k| !found.contains(k)).collect();
            let probed: Vec<Ticket> = tickets::table
                .filter(tickets::external_id.eq_any(&missing))
                .select(Ticket::as_select())
                .load(conn)?;
            stored.extend(probed);
        }
        stored.sort_unstable_by_key(|t| t.id);
        // A dense run: the batch's tickets fill at least half of their id range.
        let dense = match (stored.first(), stored.last()) {
            (Some(lo), Some(hi)) => hi.id - lo.id < 2 * stored.len() as i64,
            _ => false,
        };
        // Guess again while the guess found most rows, or, after a miss, when this batch's
        // tickets were a dense run themselves.
        let worked = self.next_id.is_some() && guessed * 2 >= wanted.len();
        self.next_id = stored.last().map(|t| t.id + 1).filter(|_| worked || dense);

        let mut links: Vec<(i64, i64)> = Vec::new();
        if with_tags && !stored.is_empty() {
            let query = ticket_tags::table
                .select((ticket_tags::ticket_id, ticket_tags::tag_id))
                .order((ticket_tags::ticket_id, ticket_tags::tag_id));
            links = if dense {
                // One index range scan; links of tickets in the range but not in the batch are
                // skipped below.
                let (lo, hi) = (stored[0].id, stored[stored.len() - 1].id);
                query.filter(ticket_tags::ticket_id.between(lo, hi)).load(conn)?
            } else {
                let ids: Vec<i64> = stored.iter().map(|t| t.id).collect();
                query.filter(ticket_tags::ticket_id.eq_any(&ids)).load(conn)?
            };
        }
        // Both in ticket id order: each ticket's links are the next run of `links`.
        let mut links = links.into_iter().peekable();
        let mut by_external_id = HashMap::with_capacity(stored.len());
        for mut ticket in stored {
            while links.next_if(|(ticket_id, _)| *ticket_id < ticket.id).is_some() {}
            let mut tags = Vec::new();
            while let Some((_, tag_id)) = links.next_if(|(ticket_id, _)| *ticket_id == ticket.id) {
                tags.push(tag_id);
            }
            by_external_id.insert(std::mem::take(&mut ticket.external_id), (ticket, tags));
        }
        Ok(by_external_id)
    }
}

/// The ids of the tickets with these external ids (those that exist).
pub(crate) fn ticket_ids_by_external_id(
    conn: &mut PgConnection,
    external_ids: &[&str],
) -> QueryResult<HashMap<String, i64>> {
    Ok(
        sql_query("SELECT id, external_id FROM tickets WHERE external_id = ANY($1)")
            .bind::<Array<Text>, _>(external_ids)
            .load::<IdExternal>(conn)?
            .into_iter()
            .map(|r| (r.external_id, r.id))
            .collect(),
    )
}

/// A stored ticket and its sorted tag ids (empty when the file has no tags column).
type Stored = (Ticket, Vec<i64>);

#[derive(QueryableByName)]
struct IdExternal {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    external_id: String,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct Classified {
    #[diesel(sql_type = BigInt)]
    rec: i64,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    deleted: bool,
    /// Written earlier in this same operation: an earlier occurrence in the file.
    #[diesel(sql_type = Bool)]
    mine: bool,
    #[diesel(sql_type = Bool)]
    differs: bool,
    #[diesel(sql_type = Bool)]
    tags_differ: bool,
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Bool)]
    inserted: bool,
}

// The staging table for rows that may already exist. Temporary (no WAL, private to the
// session) and emptied at each batch.
diesel::table! {
    use diesel::sql_types::*;
    use crate::schema::sql_types::{TicketStatus, TicketPriority, TicketChannel};

    ticketops_stage_tickets (rec) {
        rec -> Int8,
        ticket_id -> Int8,
        external_id -> Text,
        subject -> Text,
        description -> Nullable<Text>,
        status -> TicketStatus,
        priority -> TicketPriority,
        channel -> TicketChannel,
        requester_id -> Int8,
        assignee_id -> Nullable<Int8>,
        organization_id -> Nullable<Int8>,
        created_at -> Nullable<Timestamptz>,
        updated_at -> Nullable<Timestamptz>,
        solved_at -> Nullable<Timestamptz>,
        tag_ids -> Array<Int8>,
    }
}

const STAGE_TABLE_SQL: &str = "
CREATE TEMP TABLE IF NOT EXISTS ticketops_stage_tickets (
    rec bigint PRIMARY KEY,
    ticket_id bigint NOT NULL,
    external_id text COLLATE \"C\" NOT NULL,
    subject text NOT NULL,
    description text,
    status ticket_status NOT NULL,
    priority ticket_priority NOT NULL,
    channel ticket_channel NOT NULL,
    requester_id bigint NOT NULL,
    assignee_id bigint,
    organization_id bigint,
    created_at timestamptz,
    updated_at timestamptz,
    solved_at timestamptz,
    tag_ids bigint[] NOT NULL
)";

#[derive(Insertable)]
#[diesel(table_name = ticketops_stage_tickets, treat_none_as_default_value = false)]
struct StageRow {
    rec: i64,
    /// The id the lookup found; every query joins on it *and* restricts tickets to the
    /// batch's ids, so the planner never scans the whole table for a batch.
    ticket_id: i64,
    external_id: String,
    subject: String,
    description: Option<String>,
    status: TicketStatus,
    priority: TicketPriority,
    channel: TicketChannel,
    requester_id: i64,
    assignee_id: Option<i64>,
    organization_id: Option<i64>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    solved_at: Option<DateTime<Utc>>,
    tag_ids: Vec<i64>,
}

/// The stored columns compared and written, in order.
const COLUMNS: &[&str] = &[
    "subject",
    "description",
    "status",
    "priority",
    "channel",
    "requester_id",
    "assignee_id",
    "organization_id",
    "created_at",
    "updated_at",
    "solved_at",
    "deleted_at",
];

impl TicketImport {
    fn resolve_entities(&mut self, conn: &mut PgConnection, rows: &[Numbered<TicketRow>]) -> QueryResult<()> {
        self.cache
            .ensure_organizations(conn, rows.iter().filter_map(|r| r.row.organization.as_deref()))?;
        let mut users = Vec::with_capacity(rows.len() * 2);
        for r in rows {
            users.push(UserRef {
                email: &r.row.requester_email,
                name: r.row.requester_name.as_deref(),
                role: UserRole::Customer,
                organization_id: r
                    .row
                    .organization
                    .as_deref()
                    .and_then(|o| self.cache.organization_id(o)),
            });
            if let Some(assignee) = &r.row.assignee_email {
                users.push(UserRef {
                    email: assignee,
                    name: None,
                    role: UserRole::Agent,
                    organization_id: None,
                });
            }
        }
        self.cache.ensure_users(conn, &users)?;
        if self.present.tags {
            self.cache
                .ensure_tags(conn, rows.iter().flat_map(|r| r.row.tags.iter().map(String::as_str)))?;
        }
        Ok(())
    }

    /// Whether writing `row` would leave ticket `stored` exactly as it is, by the rules of
    /// `target_exprs` (absent columns and blank timestamps keep the stored value). Only a
    /// certain "equal" skips the SQL comparison: a deleted ticket, one this import wrote
    /// already, or a timestamp finer than PostgreSQL's microseconds all go through it.
    fn certainly_unchanged(&self, row: &TicketRow, (stored, stored_tags): &Stored, op_id: i64) -> bool {
        if stored.deleted_at.is_some() || stored.last_operation_id == Some(op_id) {
            return false;
        }
        let p = self.present;
        let (requester, assignee, organization, tag_ids) = self.ids_of(row);
        let same_time = |file: Option<DateTime<Utc>>, kept: Option<DateTime<Utc>>| match file {
            Some(t) => Some(t) == kept,
            None => true,
        };
        row.subject == stored.subject
            && (!p.description || row.description == stored.description)
            && row.status == stored.status
            && (!p.priority || row.priority == stored.priority)
            && (!p.channel || row.channel == stored.channel)
            && requester == stored.requester_id
            && (!p.assignee || assignee == stored.assignee_id)
            && (!p.organization || organization == stored.organization_id)
            && same_time(row.created_at, Some(stored.created_at))
            && same_time(row.updated_at, Some(stored.updated_at))
            && (!p.solved_at || row.solved_at == stored.solved_at)
            && (!p.tags || tag_ids == *stored_tags)
    }

    fn ids_of(&self, row: &TicketRow) -> (i64, Option<i64>, Option<i64>, Vec<i64>) {
        let requester = self.cache.user_id(&row.requester_email).expect("resolved before");
        let assignee = row.assignee_email.as_deref().and_then(|e| self.cache.user_id(e));
        let organization = row.organization.as_deref().and_then(|o| self.cache.organization_id(o));
        let mut tag_ids: Vec<i64> = row.tags.iter().filter_map(|t| self.cache.tag_id(t)).collect();
        tag_ids.sort_unstable();
        (requester, assignee, organization, tag_ids)
    }

    /// Tickets whose external_id is not in the table: binary COPY with ids from the sequence.
    /// A concurrent insert of the same external_id makes the COPY fail on the unique index,
    /// which fails the batch (nothing half-written) — run again and the row is merged.
    fn insert_new(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<Numbered<TicketRow>>,
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if self.id_sequence.is_none() {
            #[derive(QueryableByName)]
            struct Sequence {
                #[diesel(sql_type = Text)]
                name: String,
            }
            let seq: Sequence = sql_query("SELECT pg_get_serial_sequence('tickets', 'id') AS name")
                .get_result(conn)
                .context("cannot find the sequence of tickets.id")?;
            self.id_sequence = Some(seq.name);
        }
        let sequence = self.id_sequence.as_deref().expect("looked up above");
        let ids: Vec<i64> = if self.initial_load {
            // The initial load holds tickets exclusively (a nextval per id cost ~0.6 s per 1M).
            reserve_id_block(conn, "tickets", rows.len())
                .context("cannot allocate ticket ids")?
                .collect()
        } else {
            let ids: Vec<Id> = sql_query("SELECT nextval($1::regclass) AS id FROM generate_series(1, $2)")
                .bind::<Text, _>(sequence)
                .bind::<BigInt, _>(rows.len() as i64)
                .load(conn)
                .context("cannot allocate ticket ids")?;
            ids.into_iter().map(|i| i.id).collect()
        };
        // Each row is encoded as the COPY streams, so the lookups and the freeing of the
        // parsed rows overlap with the server ingesting the rows before.
        let pending = RefCell::new(Some(rows));
        let links = RefCell::new(Vec::new());
        let import_time = self.import_time;
        let this = &*self;
        let inserted = diesel::copy_from(tickets::table)
            .from_raw_data(
                // In the order the rows below are written.
                (
                    tickets::id,
                    tickets::external_id,
                    tickets::subject,
                    tickets::description,
                    tickets::status,
                    tickets::priority,
                    tickets::channel,
                    tickets::requester_id,
                    tickets::assignee_id,
                    tickets::organization_id,
                    tickets::created_at,
                    tickets::updated_at,
                    tickets::solved_at,
                    tickets::last_operation_id,
                ),
                |out| -> Result<(), diesel::result::Error> {
                    let rows = pending.take().expect("the COPY callback runs once");
                    let mut links = links.borrow_mut();
                    let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                    for (r, &id) in rows.into_iter().zip(&ids) {
                        let (requester_id, assignee_id, organization_id, tag_ids) = this.ids_of(&r.row);
                        links.extend(tag_ids.into_iter().map(|tag_id| TicketTag { ticket_id: id, tag_id }));
                        let row = r.row;
                        let created_at = row.created_at.unwrap_or(import_time);
                        (|| -> std::io::Result<()> {
                            copy.row(14)?;
                            copy.int8(id)?;
                            copy.text(&row.external_id)?;
                            copy.text(&row.subject)?;
                            copy.opt_text(row.description.as_deref())?;
                            copy.text(row.status.as_str())?;
                            copy.text(row.priority.as_str())?;
                            copy.text(row.channel.as_str())?;
                            copy.int8(requester_id)?;
                            copy.opt_int8(assignee_id)?;
                            copy.opt_int8(organization_id)?;
                            copy.timestamptz(created_at)?;
                            copy.timestamptz(row.updated_at.unwrap_or(created_at))?;
                            copy.opt_timestamptz(row.solved_at)?;
                            copy.int8(op_id)
                        })()
                        .map_err(write_error)?;
                    }
                    copy.finish().map_err(write_error)
                },
            )
            .with_format(CopyFormat::Binary)
            // The initial load truncated the tables in its transaction: its rows can be
            // written frozen and their pages marked all-visible, so the index builds and key
            // validations after it need not check each row's visibility (0.5-0.8 s per 1M).
            .with_freeze(self.initial_load)
            .execute(conn)
            .context("cannot COPY new tickets")?;
        let links = links.into_inner();
        if !links.is_empty() {
            diesel::copy_from(ticket_tags::table)
                .from_raw_data(
                    (ticket_tags::ticket_id, ticket_tags::tag_id),
                    |out| -> Result<(), diesel::result::Error> {
                        let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                        for link in &links {
                            (|| -> std::io::Result<()> {
                                copy.row(2)?;
                                copy.int8(link.ticket_id)?;
                                copy.int8(link.tag_id)
                            })()
                            .map_err(write_error)?;
                        }
                        copy.finish().map_err(write_error)
                    },
                )
                .with_format(CopyFormat::Binary)
                .with_freeze(self.initial_load)
                .execute(conn)
                .context("cannot COPY tag links")?;
        }
        // The audit trail of inserts is one row per batch listing the new ids as ranges (they
        // come from one sequence call, so usually one range): a row per ticket would cost as
        // much as a third table's worth of index and foreign-key work.
        let ranges = id_ranges(ids.iter().copied());
        crate::audit::record_batch(
            conn,
            op_id,
            "tickets",
            crate::audit::Action::InsertIds,
            ids[0],
            None,
            Some(serde_json::json!({ "ids": ranges })),
        )
        .context("cannot record the audit trail")?;
        counts.inserted += inserted as u64;
        self.inserted_here += inserted as u64;
        Ok(())
    }

    /// Rows whose external_id exists: stage, compare, merge only what differs.
    fn merge_existing(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<Numbered<TicketRow>>,
        existing: &HashMap<String, Stored>,
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        sql_query("TRUNCATE ticketops_stage_tickets").execute(conn)?;
        let stage: Vec<StageRow> = rows
            .into_iter()
            .map(|r| {
                let (requester_id, assignee_id, organization_id, tag_ids) = self.ids_of(&r.row);
                let row = r.row;
                StageRow {
                    rec: r.record as i64,
                    ticket_id: existing[&row.external_id].0.id,
                    external_id: row.external_id,
                    subject: row.subject,
                    description: row.description,
                    status: row.status,
                    priority: row.priority,
                    channel: row.channel,
                    requester_id,
                    assignee_id,
                    organization_id,
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                    solved_at: row.solved_at,
                    tag_ids,
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let staged_recs: Vec<i64> = stage.iter().map(|s| s.rec).collect();
        let staged_ids: Vec<i64> = stage.iter().map(|s| s.ticket_id).collect();
        diesel::copy_from(ticketops_stage_tickets::table)
            .from_insertable(&stage)
            .execute(conn)
            .context("cannot COPY into the staging table")?;
        drop(stage);

        self.phases.add("stage existing", started);
        let started = std::time::Instant::now();
        let classified: Vec<Classified> = sql_query(self.classify_sql(op_id))
            .bind::<Array<BigInt>, _>(&staged_ids)
            .load(conn)
            .context("cannot compare rows with the stored tickets")?;
        self.phases.add("compare existing", started);
        let mut to_write = Vec::new();
        let mut tag_changed = Vec::new();
        let mut no_audit = Vec::new();
        for c in &classified {
            if c.mine {
                // An earlier row of this file already wrote this ticket and was counted; this
                // later one wins, so the earlier one becomes the duplicate.
                counts.duplicate += 1;
                if c.differs {
                    to_write.push(c.rec);
                    no_audit.push(c.id);
                    if c.tags_differ {
                        tag_changed.push(c.id);
                    }
                }
            } else if c.deleted && !self.undelete {
                counts.skipped_deleted += 1;
            } else if c.differs {
                to_write.push(c.rec);
                if c.tags_differ {
                    tag_changed.push(c.id);
                }
            } else {
                counts.unchanged += 1;
            }
        }
        // Staged rows whose ticket vanished between lookup and compare are inserted by the
        // merge below like any new row.
        let classified_recs: HashSet<i64> = classified.iter().map(|c| c.rec).collect();
        to_write.extend(staged_recs.into_iter().filter(|rec| !classified_recs.contains(rec)));
        if to_write.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let written: Vec<Written> = sql_query(self.merge_sql(op_id))
            .bind::<Array<BigInt>, _>(&to_write)
            .bind::<Array<BigInt>, _>(&tag_changed)
            .bind::<Array<BigInt>, _>(&no_audit)
            .bind::<Array<BigInt>, _>(&staged_ids)
            .load(conn)
            .context("cannot merge changed tickets")?;
        let mine: HashSet<i64> = no_audit.iter().copied().collect();
        let mut written_ids = Vec::with_capacity(written.len());
        let mut written_keys = Vec::with_capacity(written.len());
        for w in &written {
            written_ids.push(w.id);
            written_keys.push(w.external_id.as_str());
            if mine.contains(&w.id) {
                continue; // already counted with its earlier occurrence
            }
            if w.inserted {
                counts.inserted += 1;
            } else {
                counts.updated += 1;
            }
        }
        // Rows the merge's own comparison found equal after all (a concurrent writer made
        // them so) were not written.
        let not_written = to_write.len() - written.len();
        let written_set: HashSet<i64> = written_ids.iter().copied().collect();
        let not_written_mine = no_audit.iter().filter(|id| !written_set.contains(id)).count();
        counts.unchanged += (not_written - not_written_mine) as u64;

        if self.present.tags && !written_ids.is_empty() {
            // The written tickets' (id, external_id) pairs come from RETURNING; ticket_tags is
            // restricted to those ids so only their links are read.
            sql_query(
                "DELETE FROM ticket_tags tt
                 USING unnest($1::bigint[], $2::text[]) AS w(id, external_id), ticketops_stage_tickets s
                 WHERE tt.ticket_id = w.id AND s.external_id = w.external_id AND tt.ticket_id = ANY($1)
                   AND NOT (tt.tag_id = ANY (s.tag_ids))",
            )
            .bind::<Array<BigInt>, _>(&written_ids)
            .bind::<Array<Text>, _>(&written_keys)
            .execute(conn)
            .context("cannot remove tag links")?;
            sql_query(
                "INSERT INTO ticket_tags (ticket_id, tag_id)
                 SELECT w.id, u.tag_id
                 FROM unnest($1::bigint[], $2::text[]) AS w(id, external_id)
                 JOIN ticketops_stage_tickets s ON s.external_id = w.external_id
                 CROSS JOIN LATERAL unnest(s.tag_ids) AS u(tag_id)
                 ON CONFLICT DO NOTHING",
            )
            .bind::<Array<BigInt>, _>(&written_ids)
            .bind::<Array<Text>, _>(&written_keys)
            .execute(conn)
            .context("cannot add tag links")?;
        }
        self.phases.add("merge changed", started);
        Ok(())
    }

    /// The value each stored column should have after the import, for staged row `s` and the
    /// stored ticket `e`. Columns the file lacks keep the stored value, and so do blank
    /// created_at/updated_at (so a file without them re-imports as unchanged).
    fn target_exprs(&self) -> Vec<String> {
        let p = self.present;
        let keep = |present: bool, col: &str, default: &str| -> String {
            if present {
                format!("s.{col}")
            } else if default.is_empty() {
                format!("e.{col}")
            } else {
                format!("coalesce(e.{col}, {default})")
            }
        };
        let now = format!("'{}'::timestamptz", self.import_time.to_rfc3339());
        vec![
            "s.subject".into(),
            keep(p.description, "description", ""),
            "s.status".into(),
            keep(p.priority, "priority", "'normal'"),
            keep(p.channel, "channel", "'other'"),
            "s.requester_id".into(),
            keep(p.assignee, "assignee_id", ""),
            keep(p.organization, "organization_id", ""),
            format!("coalesce(s.created_at, e.created_at, {now})"),
            format!("coalesce(s.updated_at, e.updated_at, s.created_at, {now})"),
            keep(p.solved_at, "solved_at", ""),
            if self.undelete {
                "NULL::timestamptz".into()
            } else {
                "e.deleted_at".into()
            },
        ]
    }

    fn tags_target(&self) -> &'static str {
        if self.present.tags {
            "s.tag_ids"
        } else {
            STORED_TAGS_OF_E
        }
    }

    fn classify_sql(&self, op_id: i64) -> String {
        let stored: Vec<String> = COLUMNS.iter().map(|c| format!("e.{c}")).collect();
        let target = self.target_exprs();
        // The stored tag set is read once per row (LATERAL), not once per use.
        let (tags_join, tags_differ) = if self.present.tags {
            (
                // OFFSET 0 keeps the planner from inlining the subquery into each use.
                format!("CROSS JOIN LATERAL (SELECT {STORED_TAGS_OF_E} AS tag_ids OFFSET 0) st"),
                "st.tag_ids IS DISTINCT FROM s.tag_ids",
            )
        } else {
            (String::new(), "false")
        };
        format!(
            "SELECT rec, id, deleted, mine, (fields_differ OR tags_differ) AS differs, tags_differ FROM (
                 SELECT s.rec, e.id, e.deleted_at IS NOT NULL AS deleted,
                        coalesce(e.last_operation_id = {op_id}, false) AS mine,
                        ({}) IS DISTINCT FROM ({}) AS fields_differ,
                        {tags_differ} AS tags_differ
                 FROM ticketops_stage_tickets s
                 JOIN tickets e ON e.id = s.ticket_id AND e.external_id = s.external_id
                 {tags_join}
                 WHERE e.id = ANY($1)
             ) c",
            stored.join(", "),
            target.join(", ")
        )
    }

    fn merge_sql(&self, op_id: i64) -> String {
        let target: Vec<String> = self
            .target_exprs()
            .into_iter()
            .zip(COLUMNS)
            .map(|(expr, col)| format!("{expr} AS {col}"))
            .collect();
        let cols = COLUMNS.join(", ");
        let set: Vec<String> = COLUMNS.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        let stored: Vec<String> = COLUMNS.iter().map(|c| format!("t.{c}")).collect();
        let incoming: Vec<String> = COLUMNS.iter().map(|c| format!("excluded.{c}")).collect();
        format!(
            "WITH target AS (
                 SELECT s.external_id, {target}, {tags} AS tag_ids
                 FROM ticketops_stage_tickets s
                 LEFT JOIN tickets e ON e.id = s.ticket_id AND e.external_id = s.external_id AND e.id = ANY($4)
                 WHERE s.rec = ANY($1)
             ), written AS (
                 INSERT INTO tickets AS t (external_id, {cols}, last_operation_id)
                 SELECT external_id, {cols}, {op_id} FROM target
                 ON CONFLICT (external_id) DO UPDATE SET {set}, last_operation_id = excluded.last_operation_id
                 WHERE ({stored}) IS DISTINCT FROM ({incoming}) OR t.id = ANY($2)
                 RETURNING t.id, t.external_id, (t.xmax = 0) AS inserted,
                           CASE WHEN t.xmax = 0 THEN NULL ELSE to_jsonb(t) END AS after_image
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op_id}, 'tickets', w.id,
                        CASE WHEN w.inserted THEN '{insert}' ELSE '{update}' END,
                        CASE WHEN w.inserted THEN NULL ELSE
                            to_jsonb(b) || jsonb_build_object('tag_ids', to_jsonb(ARRAY(
                                SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = b.id ORDER BY tag_id)))
                        END,
                        CASE WHEN w.inserted THEN NULL ELSE
                            w.after_image || jsonb_build_object('tag_ids', to_jsonb(g.tag_ids))
                        END
                 FROM written w
                 LEFT JOIN tickets b ON b.id = w.id AND b.id = ANY($4)
                 LEFT JOIN target g ON g.external_id = w.external_id
                 WHERE NOT (w.id = ANY($3))
             )
             SELECT id, external_id, inserted FROM written",
            target = target.join(", "),
            tags = self.tags_target(),
            set = set.join(", "),
            stored = stored.join(", "),
            incoming = incoming.join(", "),
            insert = crate::audit::INSERT_ACTION,
            update = crate::audit::UPDATE_ACTION,
        )
    }
}

/// Inclusive ranges of consecutive ids, in order.
fn id_ranges(ids: impl Iterator<Item = i64>) -> Vec<[i64; 2]> {
    let mut ranges: Vec<[i64; 2]> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some(last) if last[1] + 1 == id => last[1] = id,
            _ => ranges.push([id, id]),
        }
    }
    ranges
}

/// The stored tag set of ticket `e`, sorted like the staged one.
const STORED_TAGS_OF_E: &str = "ARRAY(SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = e.id ORDER BY tag_id)";

#[derive(QueryableByName)]
pub(super) struct Definition {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    definition: String,
    #[diesel(sql_type = Nullable<Text>)]
    kind: Option<String>,
}

/// `--initial-load`: with tickets and ticket_tags empty, lock them and drop every index and
/// key on them — primary keys and the external_id key too, with the foreign keys of other
/// tables that reference them — so that the load writes bare heaps. The keys stay when
/// `keep_keys` (the scan could not track the keys: the load then looks them up and may merge
/// a repeated one). Then truncates the tables, so that the load may `COPY … FREEZE`. Returns the
/// statements that recreate everything.
fn drop_indexes_and_keys(conn: &mut PgConnection, keep_keys: bool) -> anyhow::Result<Rebuild> {
    #[derive(QueryableByName)]
    struct Empty {
        #[diesel(sql_type = Bool)]
        empty: bool,
    }
    crate::db::lock_tables(conn, &["tickets", "ticket_tags"], "ACCESS EXCLUSIVE")
        .context("the initial load needs tickets and ticket_tags to itself")?;
    let empty: Empty =
        sql_query("SELECT NOT EXISTS (SELECT 1 FROM tickets) AND NOT EXISTS (SELECT 1 FROM ticket_tags) AS empty")
            .get_result(conn)?;
    if !empty.empty {
        anyhow::bail!(
            "--initial-load needs empty tickets and ticket_tags tables, and they hold rows; import without --initial-load"
        );
    }
    let definitions: Vec<Definition> = sql_query(
        "SELECT c.conname::text AS name, c.conrelid::regclass::text AS table_name,
                pg_get_constraintdef(c.oid) AS definition, c.contype::text AS kind
         FROM pg_constraint c
         WHERE (c.contype = 'f' AND (c.conrelid IN ('tickets'::regclass, 'ticket_tags'::regclass)
                                     OR c.confrelid IN ('tickets'::regclass, 'ticket_tags'::regclass)))
            OR (c.contype IN ('p', 'u') AND c.conrelid IN ('tickets'::regclass, 'ticket_tags'::regclass)
                AND NOT $1)
         UNION ALL
         SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid), NULL
         FROM pg_index i
         WHERE i.indrelid IN ('tickets'::regclass, 'ticket_tags'::regclass)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
    )
    .bind::<Bool, _>(keep_keys)
    .load(conn)?;
    let rebuild = drop_for_rebuild(conn, definitions)?;
    // Empty, and no foreign key points at them any more: COPY FREEZE needs the tables
    // created or truncated in the current transaction.
    sql_query("TRUNCATE tickets, ticket_tags")
        .execute(conn)
        .context("cannot truncate the empty tickets and ticket_tags for the initial load")?;
    Ok(rebuild)
}

/// Reserves `n` consecutive ids of `table`'s id sequence in one call, for a table this
/// transaction holds against other inserters: whatever inserts takes the table's lock before
/// it calls the sequence, so nobody else draws an id from the block.
pub(super) fn reserve_id_block(
    conn: &mut PgConnection,
    table: &str,
    n: usize,
) -> QueryResult<std::ops::RangeInclusive<i64>> {
    let last: Id = sql_query(
        "SELECT setval(s, nextval(s) + $2 - 1) AS id FROM (SELECT pg_get_serial_sequence($1, 'id')::regclass AS s) q",
    )
    .bind::<Text, _>(table)
    .bind::<BigInt, _>(n as i64)
    .get_result(conn)?;
    Ok(last.id - n as i64 + 1..=last.id)
}

/// The statements that recreate what a load dropped.
#[derive(Default)]
pub(super) struct Rebuild {
    /// Keys first (a duplicate fails the load before the long part), then indexes.
    pub keys_and_indexes: Vec<String>,
    /// Last: each validation reads the rebuilt keys.
    pub foreign_keys: Vec<String>,
}

/// Drops the constraints and indexes `definitions` describes; returns the statements that
/// recreate them. Dropped the other way round, since the foreign keys depend on the keys.
pub(super) fn drop_for_rebuild(conn: &mut PgConnection, mut definitions: Vec<Definition>) -> QueryResult<Rebuild> {
    let recreate_order = |d: &Definition| match d.kind.as_deref() {
        Some("f") => 2,
        Some(_) => 0,
        None => 1,
    };
    definitions.sort_by_key(|d| std::cmp::Reverse(recreate_order(d)));
    let mut rebuild = Rebuild::default();
    for d in &definitions {
        if d.kind.is_some() {
            sql_query(format!("ALTER TABLE {} DROP CONSTRAINT {}", d.table_name, d.name)).execute(conn)?;
            let statement = format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}",
                d.table_name, d.name, d.definition
            );
            if d.kind.as_deref() == Some("f") {
                rebuild.foreign_keys.push(statement);
            } else {
                rebuild.keys_and_indexes.push(statement);
            }
        } else {
            sql_query(format!("DROP INDEX {}", d.name)).execute(conn)?;
            rebuild.keys_and_indexes.push(d.definition.clone());
        }
    }
    rebuild.keys_and_indexes.reverse();
    rebuild.foreign_keys.reverse();
    Ok(rebuild)
}

fn recreate(conn: &mut PgConnection, statements: &[String]) -> anyhow::Result<()> {
    for statement in statements {
        sql_query(statement)
            .execute(conn)
            .with_context(|| format!("cannot recreate after the initial load: {statement}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::id_ranges;

    #[test]
    fn ranges_of_ids() {
        assert_eq!(
            id_ranges([5, 6, 7, 9, 10, 20].into_iter()),
            vec![[5, 7], [9, 10], [20, 20]]
        );
        assert!(id_ranges(std::iter::empty()).is_empty());
    }
}
