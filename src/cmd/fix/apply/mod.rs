//! `fix apply FILE.csv`: a spreadsheet of corrections keyed by external_id.
//!
//! The file goes through the import pipeline (header mapping, encodings, validation, the
//! rejects file, last occurrence of an external_id wins, accounting of every row, batches
//! with checkpoints, signals); each batch compares the corrected values with the stored ones
//! in one query, and only with `--apply` writes the tickets that differ, with their before and
//! after values in `audit_log`. The dry run (the default) runs the same comparison.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};
use serde_json::{Value, json};

mod sql;
mod unchangeable;

use self::unchangeable::{Unchangeable, stored_unchangeable};
use super::Sample;
use crate::args::{ApplyArgs, CsvArgs, confirm, parse_timeout};
use crate::context::Context;
use crate::db::BatchTimeouts;
use crate::exit::{self, UsageError};
use crate::import::entities::EntityCache;
use crate::import::normalize::{self, InputZone};
use crate::import::source::{ColumnMap, FieldSpec, Input, RecordFields, RowError};
use crate::import::{self, Counts, ImportKind, ImportOptions, Mode, Numbered, ParseOptions, WriterReject};
use crate::layout::{Layout, probe_tickets};
use crate::models::{TicketChannel, TicketPriority, TicketStatus};

pub const HELP: &str = "\
Columns (by header name, any subset besides external_id): status, priority, channel,
assignee_email (an e-mail, or `none` to unassign), organization (a name, or `none`), subject,
description, tags_add and tags_remove (lists separated by --tag-separator), or tags: the
whole tag set (a blank tags cell means no tags; not together with tags_add/tags_remove).
Any other blank cell changes nothing. A status set to solved or closed gives a ticket without
solved_at one (now); a status set back to an open state clears it.

The file of `export tickets` is read as it is: export, edit in a spreadsheet, apply. Its
columns that fix apply cannot change (requester_email, requester_name, created_at, solved_at)
are compared with the stored values, and a row that edits one is rejected with the reason
(a blank solved_at is not an edit: the status rule decides it); updated_at is ignored (the
fix sets it). A column fix apply does not know refuses the file
before anything is read, so that no edit is dropped silently; a column whose name starts
with `_` (a note, or a rejects file's _line/_error) is left alone.

Values are checked like an import's; bad rows, unknown external_ids, unknown assignees and
unknown organizations go to the rejects file with their reasons. Soft-deleted tickets are
skipped. Every row is accounted for: rows_read = changed + unchanged + duplicate +
skipped_deleted + rejected (`updated` in the import keys is `changed`).

Examples:
  ticketops fix apply corrections.csv                  # dry run: counts and a sample
  ticketops fix apply corrections.csv --apply --yes
  ticketops export tickets --tag vip -o vip.csv        # edit vip.csv, then:
  ticketops fix apply vip.csv --apply";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The corrections CSV file
    pub file: PathBuf,
    #[command(flatten)]
    pub csv: CsvArgs,
    /// Rows per batch transaction
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Give up waiting for a row lock after this long
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_timeout)]
    pub lock_timeout: Duration,
    /// Cancel a statement that runs longer than this
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_timeout)]
    pub statement_timeout: Duration,
    /// How often a batch that hit a lock timeout, deadlock or serialization failure is retried
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    #[command(flatten)]
    pub apply: ApplyArgs,
}

const KIND: &str = "fix apply";

const EXTERNAL_ID: usize = 0;
const STATUS: usize = 1;
const PRIORITY: usize = 2;
const ASSIGNEE_EMAIL: usize = 3;
const ORGANIZATION: usize = 4;
const SUBJECT: usize = 5;
const TAGS_ADD: usize = 6;
const TAGS_REMOVE: usize = 7;
const CHANNEL: usize = 8;
const DESCRIPTION: usize = 9;
const TAGS: usize = 10;
const REQUESTER_EMAIL: usize = 11;
const REQUESTER_NAME: usize = 12;
const CREATED_AT: usize = 13;
const SOLVED_AT: usize = 14;

const FIELDS: &[FieldSpec] = &[
    FieldSpec::required("external_id").indexed(),
    FieldSpec::optional("status"),
    FieldSpec::optional("priority"),
    FieldSpec::optional("assignee_email").indexed(),
    FieldSpec::optional("organization").indexed(),
    FieldSpec::optional("subject"),
    FieldSpec::optional("tags_add").list(),
    FieldSpec::optional("tags_remove").list(),
    FieldSpec::optional("channel"),
    FieldSpec::optional("description"),
    FieldSpec::optional("tags").list(),
    // The export's columns that fix apply does not change: checked against the stored values.
    FieldSpec::optional("requester_email").indexed(),
    FieldSpec::optional("requester_name"),
    FieldSpec::optional("created_at"),
    FieldSpec::optional("solved_at"),
    // Set by the fix itself; read and ignored so that an export's file is accepted as it is.
    FieldSpec::optional("updated_at"),
];

/// A cell that can set a value, clear it (`none`), or be blank (no change).
#[derive(Debug, Clone, PartialEq)]
enum Change<T> {
    Keep,
    Clear,
    Set(T),
}

/// One validated correction.
#[derive(Debug, Clone)]
pub struct Correction {
    external_id: String,
    status: Option<TicketStatus>,
    priority: Option<TicketPriority>,
    channel: Option<TicketChannel>,
    assignee: Change<String>,
    organization: Change<String>,
    subject: Option<String>,
    description: Option<String>,
    /// The whole tag set, when the file has a `tags` column.
    tags: Option<Vec<String>>,
    tags_add: Vec<String>,
    tags_remove: Vec<String>,
    /// Values of columns that cannot change, to compare with the stored ones.
    unchangeable: Unchangeable,
}

fn reference(fields: &RecordFields<'_>, index: usize) -> Result<Change<String>, RowError> {
    Ok(match fields.non_empty(index)? {
        None => Change::Keep,
        Some(v) if v.eq_ignore_ascii_case("none") => Change::Clear,
        Some(v) => Change::Set(v.into_owned()),
    })
}

/// The corrections kind of the import pipeline.
pub struct Corrections {
    dry_run: bool,
    cache: EntityCache,
    /// Rows shown by a dry run.
    sample: Vec<Sample>,
    /// Rows rejected because their external_id does not exist.
    unknown: u64,
    /// Rows changed (or, in a dry run, that would change).
    changed: u64,
    /// Read when the import begins.
    layout: Layout,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    if args.file.as_os_str() == "-" {
        return Err(UsageError(
            "fix apply needs a file, not stdin (-): it reads the file twice (a count for the confirmation, \
             then the changes); save the input to a file first"
                .into(),
        )
        .into());
    }
    if args.apply.apply && !args.apply.yes && !std::io::stdin().is_terminal() {
        // Refuse before reading anything, as confirm() would after the counting pass.
        confirm(&args.apply, KIND, 0)?;
    }
    let mapping = args.csv.mapping()?;
    let options = |mode: Mode| ImportOptions {
        input: Input::File(args.file.clone()),
        delimiter: args.csv.delimiter,
        encoding: args.csv.encoding,
        zone: InputZone::Utc,
        tag_separator: args.csv.tag_separator,
        mapping: mapping.clone(),
        rejects: args.csv.rejects.clone(),
        max_rejects: args.csv.max_rejects,
        max_field_size: args.csv.max_field_size,
        jobs: 1,
        batch_size: args.batch_size as usize,
        mode,
        resume: false,
        undelete: false,
        initial_load: false,
        timeouts: BatchTimeouts {
            lock_timeout: args.lock_timeout,
            statement_timeout: args.statement_timeout,
        },
        retries: args.retries,
        progress: ctx.progress(),
        verbose: ctx.global.verbose > 0,
    };
    let pool = ctx.pool(import::CONNECTIONS)?;
    let url = ctx.database_url()?;
    // The sample table (dry run) or the unknown ids (real run) follow the summary.
    let finish = |outcome: import::ImportOutcome, kind: &Corrections| -> anyhow::Result<i32> {
        let result = ctx.finish_import(outcome);
        if !ctx.global.json && !ctx.global.quiet {
            kind.print_extra()?;
        }
        result
    };
    let mut args_json = args.csv.to_json();
    args_json["file"] = json!(args.file.display().to_string());
    args_json["batch_size"] = json!(args.batch_size);
    args_json["apply"] = json!(args.apply.apply);
    if !args.apply.apply {
        let mut kind = Corrections::new(true);
        let outcome = import::run(&pool, url, options(Mode::DryRun), &mut kind, args_json, ctx.log())?;
        return finish(outcome, &kind);
    }
    if !args.apply.yes {
        // Count first (a dry run, its summary not printed), so the question can show the
        // number of rows.
        let mut counting = Corrections::new(true);
        let quiet = crate::output::Log {
            quiet: true,
            verbose: false,
        };
        import::run(
            &pool,
            url,
            options(Mode::DryRun),
            &mut counting,
            args_json.clone(),
            quiet,
        )?
        .result?;
        let would_change = counting.changed_in_dry_run();
        if !confirm(&args.apply, KIND, would_change)? {
            ctx.info("not confirmed; nothing was written");
            return Ok(exit::FAILURE);
        }
    }
    let mut kind = Corrections::new(false);
    let outcome = import::run(&pool, url, options(Mode::Batched), &mut kind, args_json, ctx.log())?;
    finish(outcome, &kind)
}

impl Corrections {
    /// Printed after the summary: a dry run's sample, or the rows naming no ticket.
    fn print_extra(&self) -> anyhow::Result<()> {
        if self.dry_run {
            super::print_dry_run_table(self.changed, &self.sample)?;
        } else if self.unknown > 0 {
            eprintln!(
                "  {} row(s) name an external_id that does not exist (in the rejects file)",
                self.unknown
            );
        }
        Ok(())
    }

    fn new(dry_run: bool) -> Corrections {
        Corrections {
            dry_run,
            cache: EntityCache::default(),
            sample: Vec::new(),
            unknown: 0,
            changed: 0,
            layout: Layout::Plain,
        }
    }

    fn changed_in_dry_run(&self) -> u64 {
        self.changed
    }
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    deleted: bool,
}

/// Ids by name (or e-mail) in `table`, live rows only where the table soft-deletes.
fn ids_by(conn: &mut PgConnection, table: &str, column: &str, keys: Vec<&str>) -> anyhow::Result<Vec<Found>> {
    let deleted = if table == "users" {
        "deleted_at IS NOT NULL"
    } else {
        "false"
    };
    sql_query(format!(
        "SELECT {column} AS key, id, {deleted} AS deleted FROM {table} WHERE {column} = ANY($1)"
    ))
    .bind::<Array<Text>, _>(keys)
    .load(conn)
    .with_context(|| format!("cannot look up {table}"))
}

/// A ticket a correction names.
#[derive(QueryableByName)]
struct FoundTicket {
    #[diesel(embed)]
    found: Found,
    /// On the partitioned layout, from the ticket's key: the partition it is in.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
}

/// A ticket found by its external_id: its id, whether it is soft-deleted, and on the
/// partitioned layout its created_at.
#[derive(Clone, Copy)]
pub(super) struct TicketRef {
    pub(super) id: i64,
    deleted: bool,
    created_at: Option<DateTime<Utc>>,
}

/// The tickets with these external ids. On the partitioned layout through their keys, each
/// ticket then read in its one partition (by the parent, a batch of 5,000 external ids took
/// 40 ms to plan and 125 ms to probe every partition's index); there a ticket without a key
/// (written by an application that skips them) is not found, as on the distributed layout:
/// tickets.external_id has no index there.
fn tickets_by_external_id(
    conn: &mut PgConnection,
    layout: Layout,
    keys: Vec<&str>,
) -> anyhow::Result<HashMap<String, TicketRef>> {
    let sql = if layout.partitioned() {
        format!(
            "SELECT k.external_id AS key, k.id, t.deleted_at IS NOT NULL AS deleted, k.created_at
             FROM (SELECT ticket_id AS id, created_at, external_id FROM ticket_keys WHERE external_id = ANY($1)) k
             {}",
            probe_tickets("k", "t")
        )
    } else {
        "SELECT external_id AS key, id, deleted_at IS NOT NULL AS deleted, NULL::timestamptz AS created_at
         FROM tickets WHERE external_id = ANY($1)"
            .to_string()
    };
    let found: Vec<FoundTicket> = sql_query(sql)
        .bind::<Array<Text>, _>(&keys)
        .load(conn)
        .context("cannot look up tickets")?;
    Ok(found
        .into_iter()
        .map(|FoundTicket { found, created_at }| {
            let ticket = TicketRef {
                id: found.id,
                deleted: found.deleted,
                created_at,
            };
            (found.key, ticket)
        })
        .collect())
}

/// Found rows by key: (id, soft-deleted).
fn by_key(found: Vec<Found>) -> HashMap<String, (i64, bool)> {
    found.into_iter().map(|f| (f.key, (f.id, f.deleted))).collect()
}

fn reject(r: &Numbered<Correction>, column: &str, reason: &str, message: String) -> WriterReject {
    WriterReject {
        error: RowError::new(Some(column), reason, message),
        record: r.record,
        line: r.line,
        raw: r.raw.clone().unwrap_or_default(), // rejects are rare
    }
}

impl ImportKind for Corrections {
    type Row = Correction;
    type Prefetched = ();
    const NAME: &'static str = "corrections";
    const REJECTS_IN_WRITER: bool = true;
    const FIELDS: &'static [FieldSpec] = FIELDS;
    const INSERTS: bool = false;
    const UPDATED_LABEL: &'static str = "changed";

    fn operation_kind() -> String {
        KIND.to_string()
    }

    fn parse(fields: &RecordFields<'_>, options: &ParseOptions) -> Result<Correction, RowError> {
        let external_id = fields.required(EXTERNAL_ID)?.into_owned();
        let status = match fields.non_empty(STATUS)? {
            Some(_) => Some(fields.parse(STATUS, "invalid status", normalize::ticket_status)?),
            None => None,
        };
        let priority = match fields.non_empty(PRIORITY)? {
            Some(_) => Some(fields.parse(PRIORITY, "invalid priority", normalize::ticket_priority)?),
            None => None,
        };
        let channel = match fields.non_empty(CHANNEL)? {
            Some(_) => Some(fields.parse(CHANNEL, "invalid channel", normalize::ticket_channel)?),
            None => None,
        };
        let assignee = match reference(fields, ASSIGNEE_EMAIL)? {
            Change::Set(_) => Change::Set(
                fields
                    .parse(ASSIGNEE_EMAIL, "invalid e-mail", normalize::email)?
                    .unwrap_or_default(),
            ),
            other => other,
        };
        let subject = fields.non_empty(SUBJECT)?.map(|v| v.into_owned());
        if let Some(s) = &subject
            && s.chars().count() > crate::import::tickets::MAX_SUBJECT_CHARS
        {
            return Err(RowError::new(
                Some("subject"),
                "subject too long",
                format!("subject has {} characters; at most 500", s.chars().count()),
            ));
        }
        let tags = |index: usize| -> Result<Vec<String>, RowError> {
            fields.parse(index, "invalid tags", |v| normalize::tags(v, options.tag_separator))
        };
        let (tags_add, tags_remove) = (tags(TAGS_ADD)?, tags(TAGS_REMOVE)?);
        let whole_tags = match fields.get(TAGS)? {
            Some(_) => Some(tags(TAGS)?),
            None => None,
        };
        let description = fields.non_empty(DESCRIPTION)?.map(|v| v.into_owned());
        let time = |index: usize| -> Result<Option<Option<DateTime<Utc>>>, RowError> {
            match fields.get(index)? {
                None => Ok(None),
                Some(_) => fields
                    .parse(index, "invalid timestamp", |v| {
                        normalize::timestamp_in(v, InputZone::Utc, &options.date_formats)
                    })
                    .map(Some),
            }
        };
        let unchangeable = Unchangeable {
            requester_email: fields.non_empty(REQUESTER_EMAIL)?.map(|v| v.into_owned()),
            requester_name: fields.get(REQUESTER_NAME)?.map(|v| v.into_owned()),
            created_at: time(CREATED_AT)?,
            solved_at: time(SOLVED_AT)?,
        };
        if let Some(both) = tags_add.iter().find(|t| tags_remove.contains(t)) {
            return Err(RowError::new(
                Some("tags_remove"),
                "tag added and removed",
                format!("tag {both:?} is in both tags_add and tags_remove"),
            ));
        }
        Ok(Correction {
            external_id,
            status,
            priority,
            channel,
            assignee,
            organization: reference(fields, ORGANIZATION)?,
            subject,
            description,
            tags: whole_tags,
            tags_add,
            tags_remove,
            unchangeable,
        })
    }

    fn key(row: &Correction) -> Option<&str> {
        Some(&row.external_id)
    }

    fn begin(&mut self, conn: &mut PgConnection, _op_id: i64) -> anyhow::Result<()> {
        self.layout = Layout::of(conn)?;
        Ok(())
    }

    fn configure(&mut self, columns: &ColumnMap) -> anyhow::Result<()> {
        if !columns.ignored.is_empty() {
            let known: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
            return Err(UsageError(format!(
                "fix apply does not know the column(s) {}: their edits would be lost, so nothing was read \
                 (the columns are: {}; rename with --map, remove the column, or start its name with `_` to keep it as a note)",
                crate::output::escape_controls(&columns.ignored.join(", ")),
                known.join(", ")
            ))
            .into());
        }
        if columns.has(TAGS) && (columns.has(TAGS_ADD) || columns.has(TAGS_REMOVE)) {
            return Err(UsageError(
                "the file has both a tags column (the whole tag set) and tags_add/tags_remove; keep one or the other"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: &[Numbered<Correction>],
        _prefetched: Option<()>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let (rejects, work, removable) = self.resolve(conn, rows, counts)?;
        if work.is_empty() {
            return Ok(rejects);
        }
        let changed = self.compare_or_apply(conn, op_id, &work, &removable)?;
        self.changed += changed;
        counts.updated += changed;
        counts.unchanged += work.len() as u64 - changed;
        Ok(rejects)
    }

    fn summary_extra(&self) -> Value {
        let mut extra = json!({"changed": self.changed, "unknown": self.unknown});
        if self.dry_run {
            extra["would_change"] = json!(self.changed);
            extra["sample"] = json!(
                self.sample
                    .iter()
                    .map(|s| json!({"external_id": s.external_id, "before": s.before, "after": s.after}))
                    .collect::<Vec<_>>()
            );
        }
        extra
    }
}

/// A correction resolved against the database: the ticket's id, the assignee and
/// organization as ids, the correction itself, and on the partitioned layout the ticket's
/// created_at.
type Work<'r> = (i64, Change<i64>, Change<i64>, &'r Correction, Option<DateTime<Utc>>);

impl Corrections {
    /// Looks up the tickets, assignees, organizations and tags a batch names; returns the rows
    /// rejected for naming what does not exist, the rest as work, and the tags to remove.
    fn resolve<'r>(
        &mut self,
        conn: &mut PgConnection,
        rows: &'r [Numbered<Correction>],
        counts: &mut Counts,
    ) -> anyhow::Result<(Vec<WriterReject>, Vec<Work<'r>>, Vec<Found>)> {
        // Tags to add are created like an import's (inside the dry run's rolled-back
        // transaction too, so that its sample can name them); tags to remove are only looked up.
        // First: on Citus tags is a reference table, which a transaction may not write after
        // reading tickets on many shards at once.
        self.cache
            .ensure_tags(
                conn,
                rows.iter().flat_map(|r| {
                    r.row
                        .tags_add
                        .iter()
                        .chain(r.row.tags.iter().flatten())
                        .map(String::as_str)
                }),
            )
            .context("cannot create the tags to add")?;
        let tickets = tickets_by_external_id(
            conn,
            self.layout,
            rows.iter().map(|r| r.row.external_id.as_str()).collect(),
        )?;
        let assignees = ids_by(
            conn,
            "users",
            "email",
            rows.iter()
                .filter_map(|r| match &r.row.assignee {
                    Change::Set(e) => Some(e.as_str()),
                    _ => None,
                })
                .collect(),
        )?;
        let organizations = ids_by(
            conn,
            "organizations",
            "name",
            rows.iter()
                .filter_map(|r| match &r.row.organization {
                    Change::Set(n) => Some(n.as_str()),
                    _ => None,
                })
                .collect(),
        )?;
        // By key, for the per-row lookups below (a batch holds thousands of rows).
        let (assignees, organizations) = (by_key(assignees), by_key(organizations));
        let find = |found: &HashMap<String, (i64, bool)>, key: &str| found.get(key).copied();
        let removable = ids_by(
            conn,
            "tags",
            "name",
            rows.iter()
                .flat_map(|r| r.row.tags_remove.iter().map(String::as_str))
                .collect(),
        )?;

        let stored = stored_unchangeable(conn, self.layout, rows, &tickets)?;

        let mut rejects = Vec::new();
        let mut work = Vec::new();
        for r in rows {
            let Some(&ticket) = tickets.get(&r.row.external_id) else {
                self.unknown += 1;
                let message = format!("there is no ticket {:?}", r.row.external_id);
                rejects.push(reject(r, "external_id", "unknown external_id", message));
                continue;
            };
            if ticket.deleted {
                counts.skipped_deleted += 1;
                continue;
            }
            if let Some((column, was, now)) = stored.get(&ticket.id).and_then(|s| r.row.unchangeable.edited(s)) {
                let message = format!(
                    "fix apply cannot change {column} (stored {was:?}, the file has {now:?}); \
                     restore the cell or remove the column"
                );
                rejects.push(reject(r, column, "column cannot be changed", message));
                continue;
            }
            let assignee = match &r.row.assignee {
                Change::Set(email) => match find(&assignees, email) {
                    Some((id, false)) => Change::Set(id),
                    _ => {
                        let message = format!("there is no (live) user {email}");
                        rejects.push(reject(r, "assignee_email", "unknown assignee", message));
                        continue;
                    }
                },
                Change::Clear => Change::Clear,
                Change::Keep => Change::Keep,
            };
            let organization = match &r.row.organization {
                Change::Set(name) => match find(&organizations, name) {
                    Some((id, _)) => Change::Set(id),
                    None => {
                        let message = format!("there is no organization {name:?}");
                        rejects.push(reject(r, "organization", "unknown organization", message));
                        continue;
                    }
                },
                Change::Clear => Change::Clear,
                Change::Keep => Change::Keep,
            };
            work.push((ticket.id, assignee, organization, &r.row, ticket.created_at));
        }
        Ok((rejects, work, removable))
    }
}
