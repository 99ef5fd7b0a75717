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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::{PgConnection, sql_query};

use super::entities::EntityCache;
use super::normalize;
use super::source::{ColumnMap, FieldSpec, RecordFields, RowError};
use super::{Counts, Fingerprints, ImportKind, Numbered, ParseOptions, Prefetcher, WriterReject};
use crate::layout::partition_copy::MonthRouter;
use crate::layout::{Layout, Partitions, RowsByPartition};

mod merge_sql;
mod row;
mod staged;
mod stored;
mod write;

use row::RowValues;
pub use row::TicketRow;
use write::{GATHERED_BATCHES, Gathered};

use super::initial_load::{Rebuild, drop_indexes_and_keys, recreate, recreate_by_month};
use stored::{Stored, StoredByKey, StoredFingerprints, StoredLookup, index_paths_only};
use write::{STAGE_INDEX_SQL, STAGE_TABLE_SQL};

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
    FieldSpec::required("external_id").indexed(),
    FieldSpec::required("subject"),
    FieldSpec::optional("description"),
    FieldSpec::required("status"),
    FieldSpec::optional("priority"),
    FieldSpec::optional("channel"),
    FieldSpec::required("requester_email").indexed(),
    FieldSpec::optional("requester_name"),
    FieldSpec::optional("assignee_email").indexed(),
    FieldSpec::optional("organization").indexed(),
    FieldSpec::optional("tags").list(),
    FieldSpec::optional("created_at"),
    FieldSpec::optional("updated_at"),
    FieldSpec::optional("solved_at"),
];

pub const MAX_SUBJECT_CHARS: usize = 500;

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
    /// Indexes and foreign keys dropped by `--initial-load`, recreated by `end`.
    dropped: Rebuild,
    /// Time spent in each phase, printed with -v: what limits an import.
    phases: PhaseTimes,
    /// Tickets inserted by this run, to decide whether statistics need refreshing.
    inserted_here: u64,
    /// The same by partition (partitioned layout): which months' statistics need refreshing.
    inserted_into: RowsByPartition,
    /// What the writers of one import (`--jobs`) share.
    writers: Arc<Writers>,
    /// This writer's number (1 for the first).
    writer: usize,
    /// The sequence behind tickets.id, looked up once: resolving it inside the id query cost
    /// a catalog lookup per row (ten times the nextval itself).
    id_sequence: Option<String>,
    /// Each external_id reaches the writer once (see `ImportKind::keys_seen_once`).
    keys_seen_once: bool,
    /// Reads stored tickets when no read-ahead did.
    stored: StoredLookup,
    /// The schema's layout, read when the import begins.
    layout: Layout,
    /// The monthly partitions known to exist (partitioned layout).
    partitions: Partitions,
    /// Where the initial load's rows go on the partitioned layout: straight into their month.
    months: MonthRouter,
    /// The same for their tag links.
    link_months: MonthRouter,
    /// The initial load's keys and tag links not yet written, when every key comes once.
    gathered: Option<Gathered>,
    /// Where the initial load's staged months (partitioned layout, see `staged`) get their
    /// connections; None where they are not staged (a dry run).
    staging_pool: Option<crate::db::Pool>,
    /// The initial load's months of tickets, staged.
    staged: Option<staged::StagedMonths>,
}

/// What the writers of one import share: how many there are, how many have ended, and the
/// tickets they inserted (the last to end refreshes the statistics once), and whether the
/// warning about rows without created_at was printed (once per import).
#[derive(Default)]
struct Writers {
    count: AtomicUsize,
    ended: AtomicUsize,
    inserted: AtomicU64,
    inserted_into: std::sync::Mutex<RowsByPartition>,
    warned_missing_created_at: AtomicBool,
    /// Statistics are due once the rows are committed (`after_commit`).
    analyze_after_commit: AtomicBool,
}

/// The requester's foreign key as `pg_get_constraintdef` gives it (validated by hashing users,
/// see `end`).
const REQUESTER_KEY: &str = "FOREIGN KEY (requester_id) REFERENCES users(id)";

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

    /// Prints the times with -v; `writer` names the writer when there are several (one that
    /// wrote no batch says nothing).
    fn report(&self, writer: Option<usize>) {
        if self.verbose && !self.totals.is_empty() {
            let parts: Vec<String> = self
                .totals
                .iter()
                .map(|(p, d)| format!("{p} {:.2} s", d.as_secs_f64()))
                .collect();
            let who = writer.map(|n| format!("writer {n}: ")).unwrap_or_default();
            eprintln!("{who}time by phase: {}", parts.join(", "));
        }
    }
}

impl TicketImport {
    /// Fresh statistics now, in the import's transaction; on the partitioned layout once the
    /// rows are committed, where two connections share the partitions
    /// (`layout::analyze_partitioned_tickets`).
    fn analyze(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        if self.layout.partitioned() {
            self.writers.analyze_after_commit.store(true, Ordering::SeqCst);
            return Ok(());
        }
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
            dropped: Rebuild::default(),
            inserted_here: 0,
            inserted_into: RowsByPartition::default(),
            writers: Arc::new(Writers {
                count: AtomicUsize::new(1),
                ..Writers::default()
            }),
            writer: 1,
            id_sequence: None,
            keys_seen_once: false,
            stored: StoredLookup::default(),
            layout: Layout::Plain,
            partitions: Partitions::for_import(initial_load),
            months: MonthRouter::default(),
            link_months: MonthRouter::of("ticket_tags"),
            gathered: None,
            staging_pool: None,
            staged: None,
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
    fields.parse(index, "invalid timestamp", |v| {
        normalize::timestamp_in(v, options.zone, &options.date_formats)
    })
}

/// The created_at each row's ticket gets: its own, or the import's time when it has none.
fn created_at_of(rows: &[Numbered<TicketRow>], import_time: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    rows.iter().map(move |r| r.row.created_at.unwrap_or(import_time))
}

impl ImportKind for TicketImport {
    type Row = TicketRow;
    type Prefetched = StoredByKey;
    const NAME: &'static str = "tickets";
    const FIELDS: &'static [FieldSpec] = FIELDS;

    fn parse(fields: &RecordFields<'_>, options: &ParseOptions) -> Result<TicketRow, RowError> {
        let external_id = fields.required(EXTERNAL_ID)?;
        let subject = fields.required(SUBJECT)?;
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
        // The order of the checks decides which column a row with several errors is rejected for.
        let created_at = parse_time(fields, CREATED_AT, options)?;
        let updated_at = parse_time(fields, UPDATED_AT, options)?;
        let solved_at = parse_time(fields, SOLVED_AT, options)?;
        let description = fields.non_empty(DESCRIPTION)?;
        // Or the display name of a `Name <address>` requester.
        let requester_name = match fields.non_empty(REQUESTER_NAME)? {
            Some(name) => Some(name),
            None => fields
                .get(REQUESTER_EMAIL)?
                .and_then(|v| normalize::display_name(&v))
                .map(std::borrow::Cow::Owned),
        };
        let assignee_email = parse_email(fields, ASSIGNEE_EMAIL)?;
        let organization = fields.non_empty(ORGANIZATION)?;
        TicketRow::new(RowValues {
            external_id: &external_id,
            subject: &subject,
            description: description.as_deref(),
            requester_email: &requester_email,
            requester_name: requester_name.as_deref(),
            assignee_email: assignee_email.as_deref(),
            organization: organization.as_deref(),
            tags: &tags,
            status,
            priority,
            channel,
            created_at,
            updated_at,
            solved_at,
        })
        .map_err(|message| RowError::new(None, "row too long", message))
    }

    const KEY_COLUMN: Option<(&'static str, &'static str)> = Some(("tickets", "external_id"));

    fn key(row: &TicketRow) -> Option<&str> {
        Some(row.external_id())
    }

    fn configure(&mut self, columns: &ColumnMap) -> anyhow::Result<()> {
        self.present = Present {
            description: columns.has(DESCRIPTION),
            priority: columns.has(PRIORITY),
            channel: columns.has(CHANNEL),
            assignee: columns.has(ASSIGNEE_EMAIL),
            organization: columns.has(ORGANIZATION),
            tags: columns.has(TAGS),
            solved_at: columns.has(SOLVED_AT),
        };
        Ok(())
    }

    fn use_pool(&mut self, pool: &crate::db::Pool, mode: super::Mode) {
        self.staging_pool = (mode != super::Mode::DryRun).then(|| pool.clone());
    }

    fn begin(&mut self, conn: &mut PgConnection, _op_id: i64) -> anyhow::Result<()> {
        self.layout = Layout::of(conn)?;
        sql_query(STAGE_TABLE_SQL)
            .execute(conn)
            .context("cannot create the staging table")?;
        if self.layout.partitioned() {
            sql_query(STAGE_INDEX_SQL)
                .execute(conn)
                .context("cannot create the staging table")?;
        }
        if self.initial_load {
            // (Staged where the rows are gathered: see `staged`.)
            let staged_columns = match &self.staging_pool {
                Some(_) if self.layout.partitioned() && self.keys_seen_once => staged::columns_of_tickets(conn)?,
                _ => None,
            };
            self.dropped = drop_indexes_and_keys(conn, !self.keys_seen_once, self.layout)?;
            // Nothing reads a key or a tag link back before the load ends when no key comes
            // twice: they can wait for larger COPYs.
            self.gathered = self.keys_seen_once.then(Gathered::default);
            self.staged = None;
            if let (Some(pool), Some(columns)) = (&self.staging_pool, staged_columns) {
                self.staged =
                    Some(staged::StagedMonths::start(pool, columns).context("cannot stage the months of tickets")?);
            }
            self.cache
                .lock_users_for_load(conn)
                .context("cannot lock users for the initial load")?;
        }
        Ok(())
    }

    fn end(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        // What `index_paths_only` turned off, back for the rebuilds, validations and ANALYZE.
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            "SET LOCAL enable_seqscan = on; SET LOCAL max_parallel_workers_per_gather TO DEFAULT",
        )?;
        if self.initial_load {
            self.write_gathered(conn, 0)?;
            // What follows takes as long as the whole table needs — index builds, validations of
            // every row — with the load's locks held either way: --statement-timeout, a bound for
            // each batch's statements, cancelled a large load there, at its very end.
            sql_query("SET LOCAL statement_timeout = 0").execute(conn)?;
            sql_query("SET LOCAL maintenance_work_mem = '256MB'").execute(conn)?;
            let started = std::time::Instant::now();
            let mut held_users_and_keys = |conn: &mut PgConnection| -> anyhow::Result<()> {
                self.cache
                    .flush_held_users(conn)
                    .context("cannot write the users the load held back")?;
                recreate(conn, &self.dropped.keys_and_indexes)
            };
            // The staged months' indexes are built on two other connections meanwhile.
            let ready = match &mut self.staged {
                Some(staged) => {
                    staged.build(&self.dropped.by_month, || held_users_and_keys(conn))?;
                    staged.swap_in(conn, &self.dropped.by_month)?
                }
                None => {
                    held_users_and_keys(conn)?;
                    Default::default()
                }
            };
            recreate_by_month(conn, &self.dropped.by_month, &ready)?;
            self.phases.add("rebuild keys and indexes", started);
            // Statistics before the validations: they tell the planner that the frozen pages
            // are all visible, so that the rebuilt indexes can be read without the heap (on the
            // partitioned layout after the commit, where they take two connections).
            self.analyze(conn)?;
            let started = std::time::Instant::now();
            // Each validation is an anti-join of two tables that the rebuilt indexes give in
            // key order: a merge join reads them as they are (tag links against tickets:
            // 0.24 s), where the planner's choice, hashing one side, took 0.5-0.6 s. On the
            // partitioned layout too, now that the months are loaded frozen: 1.26 s against
            // 1.65 s with hash joins (keys not yet loaded frozen then), for the seven
            // validations of 1M tickets. But the requester key on partitions: each month
            // names nearly every user, and the merge join reads the whole users index a month,
            // visiting each user's row (written in this transaction, users are not all-visible):
            // hashing users a month took 0.38 s of 1M tickets' 23 months, merging 0.59 s.
            for statement in &self.dropped.foreign_keys {
                let hashed = self.layout.partitioned() && statement.contains(REQUESTER_KEY);
                sql_query(if hashed {
                    "SET LOCAL enable_hashjoin TO DEFAULT"
                } else {
                    "SET LOCAL enable_hashjoin = off"
                })
                .execute(conn)?;
                recreate(conn, std::slice::from_ref(statement))?;
            }
            sql_query("SET LOCAL enable_hashjoin TO DEFAULT").execute(conn)?;
            self.phases.add("validate foreign keys", started);
        } else {
            // Fresh statistics after a large load: without them the planner misjudges the next
            // import's batch lookups (measured: 8 s instead of 2 s for 1,000,000 rows). Once,
            // by the last writer to end.
            let inserted = self.writers.inserted.fetch_add(self.inserted_here, Ordering::SeqCst) + self.inserted_here;
            self.writers
                .inserted_into
                .lock()
                .expect("no writer panics holding it")
                .merge(std::mem::take(&mut self.inserted_into));
            let last =
                self.writers.ended.fetch_add(1, Ordering::SeqCst) + 1 == self.writers.count.load(Ordering::SeqCst);
            // On partitions the months it changed enough, whatever its size (see `after_commit`).
            if last && (self.layout.partitioned() || inserted > ANALYZE_AFTER_ROWS) {
                self.analyze(conn)?;
            }
        }
        let several = self.writers.count.load(Ordering::SeqCst) > 1;
        self.phases.report(several.then_some(self.writer));
        Ok(())
    }

    fn after_commit(&mut self, conn: &mut PgConnection, pool: &crate::db::Pool) -> anyhow::Result<()> {
        if self.writers.analyze_after_commit.swap(false, Ordering::SeqCst) {
            let started = std::time::Instant::now();
            // The initial load made every month anew; an import refreshes the months it
            // changed enough, or everything when it added more than ANALYZE_AFTER_ROWS and a
            // tenth of the table.
            let changed = if self.initial_load {
                None
            } else {
                Some(std::mem::take(
                    &mut *self.writers.inserted_into.lock().expect("no writer panics holding it"),
                ))
            };
            let whole_table_due = self.writers.inserted.load(Ordering::SeqCst) > ANALYZE_AFTER_ROWS;
            let Some(analyzed) =
                crate::layout::analyze_partitioned_tickets(conn, pool, changed.as_ref(), whole_table_due)?
            else {
                return Ok(());
            };
            if self.phases.verbose {
                eprintln!(
                    "analyze after the commit (two connections): {analyzed} in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.cache.clear();
        // A rolled-back load's staged months are dropped.
        self.staged = None;
        // Months made by a rolled-back batch are gone with it.
        self.partitions = Partitions::for_import(self.initial_load);
        self.months = MonthRouter::default();
        self.link_months = MonthRouter::of("ticket_tags");
    }

    fn keys_seen_once(&mut self) {
        self.keys_seen_once = true;
    }

    /// The stored tickets of the next batch are read while this one is written: on a
    /// re-import that lookup is most of the work (an initial load needs none).
    fn prefetcher(&self) -> Option<Prefetcher<TicketRow, StoredByKey>> {
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

    /// A ticket remembers the record that wrote it; only `--undelete` changes what a record
    /// does besides the column mapping and parse options.
    fn fingerprints(&self) -> Option<Fingerprints> {
        let mut stored = StoredFingerprints::default();
        Some(Fingerprints {
            settings: format!("undelete={}", self.undelete),
            lookup: Box::new(move |conn, keys| stored.read(conn, keys)),
        })
    }

    fn needs_preparing(&self, rows: &[Numbered<TicketRow>]) -> bool {
        self.layout.partitioned() && self.partitions.any_missing(created_at_of(rows, self.import_time))
    }

    /// The months the rows need (see `ImportKind::prepare`).
    fn prepare(&mut self, conn: &mut PgConnection, rows: &[Numbered<TicketRow>]) -> anyhow::Result<()> {
        if self.layout.partitioned() {
            let started = std::time::Instant::now();
            self.partitions.ensure(conn, created_at_of(rows, self.import_time))?;
            self.phases.add("make months", started);
        }
        Ok(())
    }

    fn resolve(&mut self, conn: &mut PgConnection, rows: &[Numbered<TicketRow>]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        index_paths_only(conn)?;
        let started = std::time::Instant::now();
        self.resolve_entities(conn, rows)
            .context("cannot resolve organizations, users and tags")?;
        self.phases.add("resolve users/orgs/tags", started);
        // The months the rows need, unless `prepare` made them already: with several writers
        // this runs in turn in a transaction of its own, so that two writers never make the
        // same month at once.
        self.prepare(conn, rows)
    }

    fn another_writer(&self) -> Option<TicketImport> {
        let mut writer = TicketImport::new(self.undelete, self.initial_load, self.phases.verbose);
        writer.present = self.present;
        writer.import_time = self.import_time;
        writer.writer = self.writers.count.fetch_add(1, Ordering::SeqCst) + 1;
        writer.writers = Arc::clone(&self.writers);
        writer.keys_seen_once = self.keys_seen_once;
        Some(writer)
    }

    fn share_caches(&mut self, writers: usize) {
        self.cache.share_limit(writers);
    }

    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: &[Numbered<TicketRow>],
        prefetched: Option<StoredByKey>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows.iter().any(|r| r.row.created_at.is_none())
            && !self.writers.warned_missing_created_at.swap(true, Ordering::SeqCst)
        {
            eprintln!(
                "warning: some rows have no created_at (first at line {}); new tickets get the import time",
                rows.iter()
                    .find(|r| r.row.created_at.is_none())
                    .map(|r| r.line)
                    .unwrap_or(0)
            );
        }
        index_paths_only(conn)?;
        // The tag links this batch writes come with the fingerprints it writes: the trigger
        // that forgets a ticket's fingerprint when its links change leaves them alone.
        crate::db::keep_fingerprints(conn)?;
        let started = std::time::Instant::now();

        // An initial load starts from an empty, locked table: when every key comes once, none
        // can exist yet and the lookup is skipped.
        let stored = match prefetched {
            Some(stored) => stored,
            None if self.initial_load && self.keys_seen_once => StoredByKey::default(),
            None => self
                .stored
                .read(conn, rows, self.present.tags)
                .context("cannot look up existing tickets")?,
        };
        self.phases.add("fetch stored tickets", started);
        let started = std::time::Instant::now();
        let mut new = Vec::new();
        let mut old = Vec::new();
        for r in rows {
            match stored.get(r.row.external_id()) {
                None => new.push(r),
                // Rows equal to the stored ticket need neither staging nor the SQL comparison.
                Some(s) if self.certainly_unchanged(&r.row, s, op_id) => counts.unchanged += 1,
                Some(_) => old.push(r),
            }
        }
        self.phases.add("compare with stored", started);
        self.insert_new(conn, op_id, new, counts)?;
        self.write_gathered(conn, GATHERED_BATCHES * rows.len())?;
        self.merge_existing(conn, op_id, old, &stored, counts)?;
        Ok(Vec::new())
    }
}
