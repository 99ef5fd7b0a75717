//! `fix apply FILE.csv`: a spreadsheet of corrections keyed by external_id.
//!
//! The file goes through the import pipeline (header mapping, encodings, validation, the
//! rejects file, last occurrence of an external_id wins, accounting of every row, batches
//! with checkpoints, signals); each batch compares the corrected values with the stored ones
//! in one query, and only with `--apply` writes the tickets that differ, with their before and
//! after values in `audit_log`. The dry run (the default) runs the same comparison.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};
use serde_json::{Value, json};

use super::{Changed, SAMPLE_SIZE, Sample};
use crate::args::{ApplyArgs, CsvArgs, confirm, parse_timeout};
use crate::audit::FIX_ACTION;
use crate::context::Context;
use crate::db::BatchTimeouts;
use crate::exit::{self, UsageError};
use crate::import::entities::EntityCache;
use crate::import::normalize::{self, InputZone};
use crate::import::source::{ColumnMap, FieldSpec, Input, RecordFields, RowError};
use crate::import::{self, Counts, ImportKind, ImportOptions, Mode, Numbered, ParseOptions, WriterReject};
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

/// The export's columns that fix apply does not change, as the file has them (`None` when
/// the file lacks the column; for the timestamps, `Some(None)` is a blank cell).
#[derive(Debug, Clone, Default)]
struct Unchangeable {
    requester_email: Option<String>,
    requester_name: Option<String>,
    created_at: Option<Option<DateTime<Utc>>>,
    solved_at: Option<Option<DateTime<Utc>>>,
}

impl Unchangeable {
    fn is_empty(&self) -> bool {
        self.requester_email.is_none()
            && self.requester_name.is_none()
            && self.created_at.is_none()
            && self.solved_at.is_none()
    }

    /// The first column whose value differs from the stored ticket's, with both values.
    fn edited(&self, stored: &Stored) -> Option<(&'static str, String, String)> {
        let time = |t: &Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_default()
        };
        if let Some(email) = &self.requester_email
            && !email.eq_ignore_ascii_case(&stored.requester_email)
        {
            return Some(("requester_email", stored.requester_email.clone(), email.clone()));
        }
        let stored_name = stored.requester_name.clone().unwrap_or_default();
        if let Some(name) = &self.requester_name
            && name.trim() != stored_name.trim()
        {
            return Some(("requester_name", stored_name, name.clone()));
        }
        if let Some(created_at) = &self.created_at
            && *created_at != Some(stored.created_at)
        {
            return Some(("created_at", time(&Some(stored.created_at)), time(created_at)));
        }
        // A blank solved_at is never an edit: the status rule sets or clears it.
        if let Some(solved_at @ Some(_)) = &self.solved_at
            && *solved_at != stored.solved_at
        {
            return Some(("solved_at", time(&stored.solved_at), time(solved_at)));
        }
        None
    }
}

/// What a ticket stores in the columns fix apply does not change.
#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    requester_email: String,
    #[diesel(sql_type = Nullable<Text>)]
    requester_name: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    solved_at: Option<DateTime<Utc>>,
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
        }
    }

    fn changed_in_dry_run(&self) -> u64 {
        self.changed
    }
}

/// The corrections of one batch as arrays ($1…$14), compared with the stored tickets as JSON
/// objects of the correctable values (tag sets as sorted tag ids); `target` holds the tickets
/// whose values differ, with both objects.
const TARGET_SQL: &str = "
WITH i AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bool[], $5::bigint[], $6::bool[],
                         $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bool[],
                         $13::text[], $14::text[])
        AS i(id, status, priority, set_assignee, assignee_id, set_organization, organization_id, subject,
             tags_add, tags_remove, channel, set_tags, tags, description)
), cur AS (
    SELECT t.id, t.external_id, t.updated_at AS old_updated_at, t.last_operation_id AS old_operation_id,
           jsonb_build_object('status', t.status, 'priority', t.priority, 'channel', t.channel,
                              'assignee_id', t.assignee_id,
                              'organization_id', t.organization_id, 'subject', t.subject,
                              'description', t.description, 'solved_at', t.solved_at,
                              'tag_ids', to_jsonb(ARRAY(SELECT tag_id FROM ticket_tags x
                                                        WHERE x.ticket_id = t.id ORDER BY tag_id))) AS old,
           i.status, i.priority, i.channel, i.set_assignee, i.assignee_id, i.set_organization, i.organization_id,
           i.subject, i.tags_add, i.tags_remove, i.set_tags, i.tags, i.description
    FROM i JOIN tickets t ON t.id = i.id
), want AS (
    SELECT c.id, c.external_id, c.old_updated_at, c.old_operation_id, c.old,
           jsonb_build_object(
               'status', coalesce(c.status, c.old ->> 'status'),
               -- the importer's rule: solved or closed without solved_at gets one, an open
               -- state has none; a status that does not change keeps what is stored
               'solved_at', CASE WHEN coalesce(c.status, c.old ->> 'status') = c.old ->> 'status' THEN c.old -> 'solved_at'
                                 WHEN c.status IN ('solved', 'closed')
                                     THEN coalesce(nullif(c.old -> 'solved_at', 'null'::jsonb), to_jsonb(now()))
                                 ELSE 'null'::jsonb END,
               'priority', coalesce(c.priority, c.old ->> 'priority'),
               'channel', coalesce(c.channel, c.old ->> 'channel'),
               'assignee_id', CASE WHEN c.set_assignee THEN to_jsonb(c.assignee_id) ELSE c.old -> 'assignee_id' END,
               'organization_id', CASE WHEN c.set_organization THEN to_jsonb(c.organization_id)
                                       ELSE c.old -> 'organization_id' END,
               'subject', coalesce(c.subject, c.old ->> 'subject'),
               'description', coalesce(c.description, c.old ->> 'description'),
               'tag_ids', CASE WHEN c.set_tags
                   THEN to_jsonb(ARRAY(SELECT DISTINCT u FROM unnest(
                            coalesce(string_to_array(nullif(c.tags, ''), ',')::bigint[], '{}')) u ORDER BY u))
                   ELSE to_jsonb(ARRAY(
                   SELECT DISTINCT u FROM unnest(
                       ARRAY(SELECT jsonb_array_elements_text(c.old -> 'tag_ids')::bigint)
                       || coalesce(string_to_array(c.tags_add, ',')::bigint[], '{}')) u
                   WHERE u <> ALL(coalesce(string_to_array(c.tags_remove, ',')::bigint[], '{}'))
                   ORDER BY u)) END) AS new
    FROM cur c
), target AS (
    SELECT * FROM want WHERE old <> new
)";

/// The keys of `a` whose value differs in `b`, as an object of `a`'s values.
fn changed_keys(a: &str, b: &str) -> String {
    format!(
        "(SELECT jsonb_object_agg(k, {a} -> k) FROM jsonb_object_keys({a}) k WHERE {a} -> k IS DISTINCT FROM {b} -> k)"
    )
}

/// Like `changed_keys`, with ids shown as people read them (e-mail, organization and tag names).
fn shown_keys(a: &str, b: &str) -> String {
    format!(
        "(SELECT jsonb_object_agg(
             CASE k WHEN 'assignee_id' THEN 'assignee' WHEN 'organization_id' THEN 'organization'
                    WHEN 'tag_ids' THEN 'tags' ELSE k END,
             CASE k WHEN 'assignee_id' THEN to_jsonb((SELECT email FROM users WHERE id = ({a} ->> k)::bigint))
                    WHEN 'organization_id' THEN to_jsonb((SELECT name FROM organizations WHERE id = ({a} ->> k)::bigint))
                    WHEN 'tag_ids' THEN to_jsonb(ARRAY(SELECT name FROM tags WHERE id IN (
                                            SELECT jsonb_array_elements_text({a} -> k)::bigint) ORDER BY name))
                    ELSE {a} -> k END)
         FROM jsonb_object_keys({a}) k WHERE {a} -> k IS DISTINCT FROM {b} -> k)"
    )
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

/// The stored values of the columns fix apply does not change, for the tickets of the rows
/// that have any of them (none when the file lacks those columns).
fn stored_unchangeable(
    conn: &mut PgConnection,
    rows: &[Numbered<Correction>],
    tickets: &[Found],
) -> anyhow::Result<Vec<Stored>> {
    let ids: Vec<i64> = rows
        .iter()
        .filter(|r| !r.row.unchangeable.is_empty())
        .filter_map(|r| tickets.iter().find(|t| t.key == r.row.external_id).map(|t| t.id))
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sql_query(
        "SELECT t.id, r.email AS requester_email, r.name AS requester_name, t.created_at, t.solved_at
         FROM tickets t JOIN users r ON r.id = t.requester_id WHERE t.id = ANY($1)",
    )
    .bind::<Array<BigInt>, _>(ids)
    .load(conn)
    .context("cannot read the tickets' stored values")
}

/// Ids by name (or e-mail) in `table`, live rows only where the table soft-deletes.
fn ids_by(conn: &mut PgConnection, table: &str, column: &str, keys: Vec<&str>) -> anyhow::Result<Vec<Found>> {
    let deleted = if table == "tickets" || table == "users" {
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

fn reject(r: &Numbered<Correction>, column: &str, reason: &str, message: String) -> WriterReject {
    WriterReject {
        error: RowError::new(Some(column), reason, message),
        record: r.record,
        line: r.line,
        raw: r.raw.clone(), // rejects are rare
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
/// organization as ids, and the correction itself.
type Work<'r> = (i64, Change<i64>, Change<i64>, &'r Correction);

impl Corrections {
    /// Looks up the tickets, assignees, organizations and tags a batch names; returns the rows
    /// rejected for naming what does not exist, the rest as work, and the tags to remove.
    fn resolve<'r>(
        &mut self,
        conn: &mut PgConnection,
        rows: &'r [Numbered<Correction>],
        counts: &mut Counts,
    ) -> anyhow::Result<(Vec<WriterReject>, Vec<Work<'r>>, Vec<Found>)> {
        let tickets = ids_by(
            conn,
            "tickets",
            "external_id",
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
        let find = |found: &[Found], key: &str| found.iter().find(|f| f.key == key).map(|f| (f.id, f.deleted));
        // Tags to add are created like an import's (inside the dry run's rolled-back
        // transaction too, so that its sample can name them); tags to remove are only looked up.
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
        let removable = ids_by(
            conn,
            "tags",
            "name",
            rows.iter()
                .flat_map(|r| r.row.tags_remove.iter().map(String::as_str))
                .collect(),
        )?;

        let stored = stored_unchangeable(conn, rows, &tickets)?;

        let mut rejects = Vec::new();
        let mut work = Vec::new();
        for r in rows {
            let Some((ticket_id, deleted)) = find(&tickets, &r.row.external_id) else {
                self.unknown += 1;
                let message = format!("there is no ticket {:?}", r.row.external_id);
                rejects.push(reject(r, "external_id", "unknown external_id", message));
                continue;
            };
            if deleted {
                counts.skipped_deleted += 1;
                continue;
            }
            if let Some((column, was, now)) = stored
                .iter()
                .find(|s| s.id == ticket_id)
                .and_then(|s| r.row.unchangeable.edited(s))
            {
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
            work.push((ticket_id, assignee, organization, &r.row));
        }
        Ok((rejects, work, removable))
    }

    /// Compares the work with the tickets (a dry run: counts and samples what would change)
    /// or applies it, with the before and after images in the audit trail; returns how many
    /// tickets change.
    fn compare_or_apply(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        work: &[Work<'_>],
        removable: &[Found],
    ) -> anyhow::Result<u64> {
        let find = |found: &[Found], key: &str| found.iter().find(|f| f.key == key).map(|f| (f.id, f.deleted));
        let ids: Vec<i64> = work.iter().map(|w| w.0).collect();
        let statuses: Vec<Option<&str>> = work.iter().map(|w| w.3.status.map(TicketStatus::as_str)).collect();
        let priorities: Vec<Option<&str>> = work.iter().map(|w| w.3.priority.map(TicketPriority::as_str)).collect();
        let channels: Vec<Option<&str>> = work.iter().map(|w| w.3.channel.map(TicketChannel::as_str)).collect();
        let set_assignee: Vec<bool> = work.iter().map(|w| w.1 != Change::Keep).collect();
        let assignee_ids: Vec<Option<i64>> = work
            .iter()
            .map(|w| if let Change::Set(id) = w.1 { Some(id) } else { None })
            .collect();
        let set_organization: Vec<bool> = work.iter().map(|w| w.2 != Change::Keep).collect();
        let organization_ids: Vec<Option<i64>> = work
            .iter()
            .map(|w| if let Change::Set(id) = w.2 { Some(id) } else { None })
            .collect();
        let subjects: Vec<Option<&str>> = work.iter().map(|w| w.3.subject.as_deref()).collect();
        let descriptions: Vec<Option<&str>> = work.iter().map(|w| w.3.description.as_deref()).collect();
        let set_tags: Vec<bool> = work.iter().map(|w| w.3.tags.is_some()).collect();
        let whole_tags: Vec<Option<String>> = work
            .iter()
            .map(|w| {
                w.3.tags.as_ref().map(|names| {
                    let ids: Vec<String> = names
                        .iter()
                        .filter_map(|n| self.cache.tag_id(n))
                        .map(|id| id.to_string())
                        .collect();
                    ids.join(",")
                })
            })
            .collect();
        let id_list = |names: &[String], id_of: &dyn Fn(&str) -> Option<i64>| -> Option<String> {
            let ids: Vec<String> = names.iter().filter_map(|n| id_of(n)).map(|id| id.to_string()).collect();
            (!ids.is_empty()).then(|| ids.join(","))
        };
        let tags_add: Vec<Option<String>> = work
            .iter()
            .map(|w| id_list(&w.3.tags_add, &|n| self.cache.tag_id(n)))
            .collect();
        let tags_remove: Vec<Option<String>> = work
            .iter()
            .map(|w| id_list(&w.3.tags_remove, &|n| find(removable, n).map(|f| f.0)))
            .collect();

        let bind = |sql: String| {
            sql_query(sql)
                .into_boxed()
                .bind::<Array<BigInt>, _>(ids.clone())
                .bind::<Array<Nullable<Text>>, _>(statuses.clone())
                .bind::<Array<Nullable<Text>>, _>(priorities.clone())
                .bind::<Array<Bool>, _>(set_assignee.clone())
                .bind::<Array<Nullable<BigInt>>, _>(assignee_ids.clone())
                .bind::<Array<Bool>, _>(set_organization.clone())
                .bind::<Array<Nullable<BigInt>>, _>(organization_ids.clone())
                .bind::<Array<Nullable<Text>>, _>(subjects.clone())
                .bind::<Array<Nullable<Text>>, _>(tags_add.clone())
                .bind::<Array<Nullable<Text>>, _>(tags_remove.clone())
                .bind::<Array<Nullable<Text>>, _>(channels.clone())
                .bind::<Array<Bool>, _>(set_tags.clone())
                .bind::<Array<Nullable<Text>>, _>(whole_tags.clone())
                .bind::<Array<Nullable<Text>>, _>(descriptions.clone())
        };
        let changed: Changed = if self.dry_run {
            if self.sample.len() < SAMPLE_SIZE {
                let rows: Vec<Sample> = bind(format!(
                    "{TARGET_SQL} SELECT external_id, {before} AS before, {after} AS after FROM target ORDER BY id LIMIT {}",
                    SAMPLE_SIZE - self.sample.len(),
                    before = shown_keys("old", "new"),
                    after = shown_keys("new", "old"),
                ))
                .load(conn)
                .context("cannot compare the corrections with the tickets")?;
                self.sample.extend(rows);
            }
            bind(format!("{TARGET_SQL} SELECT count(*) AS changed FROM target"))
                .get_result(conn)
                .context("cannot compare the corrections with the tickets")?
        } else {
            bind(format!(
                "{TARGET_SQL}, changed AS (
                     UPDATE tickets t
                     SET status = (g.new ->> 'status')::ticket_status,
                         priority = (g.new ->> 'priority')::ticket_priority,
                         channel = (g.new ->> 'channel')::ticket_channel,
                         assignee_id = (g.new ->> 'assignee_id')::bigint,
                         organization_id = (g.new ->> 'organization_id')::bigint,
                         subject = g.new ->> 'subject',
                         description = g.new ->> 'description',
                         solved_at = (g.new ->> 'solved_at')::timestamptz,
                         updated_at = now(), last_operation_id = {op_id}
                     FROM target g WHERE t.id = g.id
                     RETURNING t.id, t.updated_at, g.old, g.new, g.old_updated_at, g.old_operation_id
                 ), tags_removed AS (
                     DELETE FROM ticket_tags x USING target g
                     WHERE x.ticket_id = g.id
                       AND NOT x.tag_id IN (SELECT jsonb_array_elements_text(g.new -> 'tag_ids')::bigint)
                 ), tags_added AS (
                     INSERT INTO ticket_tags (ticket_id, tag_id)
                     SELECT g.id, e::bigint FROM target g CROSS JOIN LATERAL jsonb_array_elements_text(g.new -> 'tag_ids') e
                     ON CONFLICT DO NOTHING
                 ), audited AS (
                     INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                     SELECT {op_id}, 'tickets', id, '{FIX_ACTION}',
                            {before} || jsonb_build_object('updated_at', old_updated_at, 'last_operation_id', old_operation_id),
                            {after} || jsonb_build_object('updated_at', updated_at, 'last_operation_id', {op_id})
                     FROM changed
                 )
                 SELECT count(*) AS changed FROM changed",
                before = changed_keys("old", "new"),
                after = changed_keys("new", "old"),
            ))
            .get_result(conn)
            .context("cannot apply the corrections")?
        };
        Ok(changed.changed as u64)
    }
}
