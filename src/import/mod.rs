//! The CSV import pipeline shared by `import tickets`, `import users` and `import comments`.
//!
//! A reader thread parses and validates records into batches while the main thread writes
//! the previous batch, so parsing overlaps database work; a kind may also have a prefetch
//! thread read what the next batch needs (tickets: the stored rows) on a second connection
//! meanwhile. Each batch is one short
//! transaction that also stores the operation's checkpoint, so a crash loses at most the
//! batch in flight and `--resume` continues exactly after the last committed one.

mod bounded;
pub mod comments;
mod copy_binary;
pub mod entities;
pub mod normalize;
pub mod rejects;
pub mod scan;
pub mod source;
pub mod tickets;
pub mod users;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use csv::ByteRecord;
use diesel::{Connection, PgConnection};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::db::{self, AdvisoryLock, BatchTimeouts};
use crate::exit::{self, UsageError};
use crate::job;
use crate::models::{NewBulkOperation, OperationStatus};
use crate::operation;
use crate::output::{self, Log};
use crate::signals::StopFlags;
use normalize::InputZone;
use rejects::{RejectTally, RejectsWriter};
use source::{ColumnMap, CsvSource, Encoding, FieldSpec, Input, Position, RecordFields, RowError, ValueMap};

/// How rows are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each batch commits on its own, with a checkpoint.
    Batched,
    /// The whole file in one transaction: on any failure nothing is committed.
    Atomic,
    /// Everything in one transaction that is rolled back at the end.
    DryRun,
}

#[derive(Debug, Clone, Copy)]
pub enum MaxRejects {
    Count(u64),
    Percent(f64),
}

impl MaxRejects {
    pub fn parse(value: &str) -> Result<MaxRejects, String> {
        let v = value.trim();
        if let Some(p) = v.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| format!("not a percentage: {value:?}"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("a percentage must be between 0 and 100, not {value:?}"));
            }
            return Ok(MaxRejects::Percent(pct));
        }
        v.parse()
            .map(MaxRejects::Count)
            .map_err(|_| format!("expected a number or a percentage like 5%, not {value:?}"))
    }

    /// Whether `rejected` of `read` rows is over the limit. A percentage is judged only once
    /// enough rows were read for it to mean something (or at the end).
    fn exceeded(self, rejected: u64, read: u64, at_end: bool) -> bool {
        match self {
            MaxRejects::Count(max) => rejected > max,
            MaxRejects::Percent(pct) => {
                (at_end || read >= 1000) && read > 0 && (rejected as f64) * 100.0 / (read as f64) > pct
            }
        }
    }
}

/// Everything the import commands share, from the command line.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub input: Input,
    pub delimiter: u8,
    pub encoding: Encoding,
    pub zone: InputZone,
    pub tag_separator: char,
    pub renames: Vec<(String, String)>,
    pub value_maps: Vec<String>,
    pub rejects: Option<PathBuf>,
    pub max_rejects: Option<MaxRejects>,
    /// `--max-field-size`: a record with a larger field is rejected unread.
    pub max_field_size: usize,
    pub batch_size: usize,
    pub mode: Mode,
    pub resume: bool,
    pub undelete: bool,
    pub initial_load: bool,
    pub timeouts: BatchTimeouts,
    /// How often a batch that lost a race (lock timeout, deadlock, serialization failure) is
    /// tried again in batched mode.
    pub retries: u32,
    /// Draw a progress bar on stderr.
    pub show_progress: bool,
    /// `-v`: say where the time went.
    pub verbose: bool,
}

/// Where every input row went. `rows_read` always equals the sum of the others.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub rows_read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub duplicate: u64,
    pub skipped_deleted: u64,
    pub rejected: u64,
}

impl Counts {
    pub fn accounted(&self) -> u64 {
        self.inserted + self.updated + self.unchanged + self.duplicate + self.skipped_deleted + self.rejected
    }
}

/// Parse-time settings an import kind needs.
pub struct ParseOptions {
    pub zone: InputZone,
    pub tag_separator: char,
}

/// A valid row with where it came from.
#[derive(Clone)]
pub struct Numbered<R> {
    pub record: u64,
    pub line: u64,
    /// The original fields, kept only for kinds that reject rows in the writer.
    pub raw: ByteRecord,
    pub row: R,
}

/// A row that a writer found invalid against the database (e.g. a comment on a ticket that
/// does not exist).
pub struct WriterReject {
    pub record: u64,
    pub line: u64,
    pub raw: ByteRecord,
    pub error: RowError,
}

/// One kind of import: its fields, how a record becomes a row, and how a batch is written.
pub trait ImportKind {
    type Row: Send + Clone + 'static;
    /// `tickets`, `users`, `comments`: the operation kind is `import <name>`.
    const NAME: &'static str;
    /// Whether `write_batch` may reject rows and so needs each row's original fields.
    const REJECTS_IN_WRITER: bool = false;
    const FIELDS: &'static [FieldSpec];

    fn parse(fields: &RecordFields<'_>, options: &ParseOptions) -> Result<Self::Row, RowError>;

    /// The key that identifies a row within a file (last occurrence wins), if any.
    fn key(row: &Self::Row) -> Option<&str>;

    /// The table and column where `key` is stored, to name the rows another session held
    /// when a batch gave up waiting for their locks.
    const KEY_COLUMN: Option<(&'static str, &'static str)> = None;

    /// The field holding that key, for the pre-import scan of a file.
    const KEY_FIELD: Option<usize> = Some(0);

    /// The key as `key` returns it, from the field's raw text.
    fn normalize_key(raw: &str) -> Cow<'_, str> {
        Cow::Borrowed(raw.trim())
    }

    /// Told which fields the file has, once its header is read.
    fn configure(&mut self, _columns: &ColumnMap) {}

    /// Told that the pre-import scan saw every key, so each key reaches `write_batch` at
    /// most once in the whole import (earlier occurrences are dropped as duplicates).
    fn keys_seen_once(&mut self) {}

    /// Called once inside the import's transaction (atomic modes) or before the first batch.
    fn begin(&mut self, _conn: &mut PgConnection, _op_id: i64) -> anyhow::Result<()> {
        Ok(())
    }

    /// What `prefetcher` reads for a batch (`()` for kinds that read nothing ahead).
    type Prefetched: Send + 'static;

    /// A lookup run for each batch on a second connection while the writer is busy with the
    /// batch before, so that the writer finds it done. Asked for only when every key reaches
    /// the writer once (the scan tracked them): then no batch of this import can change what
    /// the lookup for another batch read. It reads state committed just before the batch's
    /// own transaction, so a concurrent change in between is seen as one made just after.
    fn prefetcher(&self) -> Option<Prefetcher<Self::Row, Self::Prefetched>> {
        None
    }

    /// Writes one deduplicated batch, adding to `counts` and returning rows it rejected.
    /// `prefetched` is what `prefetcher` read for the batch, when it ran and succeeded.
    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<Numbered<Self::Row>>,
        prefetched: Option<Self::Prefetched>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>>;

    /// Called once after the last batch, in the same transaction as it (atomic modes).
    fn end(&mut self, _conn: &mut PgConnection) -> anyhow::Result<()> {
        Ok(())
    }

    /// Forgets cached state after a rolled-back batch.
    fn reset(&mut self) {}

    /// Whether this kind can insert rows (else the summary leaves `inserted` out of its line).
    const INSERTS: bool = true;
    /// What the summary line calls updated rows.
    const UPDATED_LABEL: &'static str = "updated";

    /// The `bulk_operations.kind` of a run.
    fn operation_kind() -> String {
        format!("import {}", Self::NAME)
    }

    /// Keys added to the JSON summary.
    fn summary_extra(&self) -> serde_json::Value {
        json!({})
    }
}

/// A kind's read-ahead for one batch's rows (see `ImportKind::prefetcher`).
pub type Prefetcher<R, P> = Box<dyn FnMut(&mut PgConnection, &[Numbered<R>]) -> anyhow::Result<P> + Send>;

/// What the reader thread hands to the writer (through the prefetch thread, if any).
struct Batch<R, P> {
    rows: Vec<Numbered<R>>,
    rejects: Vec<(u64, u64, ByteRecord, RowError)>,
    end: Position,
    rows_read: u64,
    prefetched: Option<P>,
}

type BatchResult<K> = anyhow::Result<Batch<<K as ImportKind>::Row, <K as ImportKind>::Prefetched>>;

/// What is stored in `bulk_operations.checkpoint` after each committed batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    position: Position,
    rejects_bytes: u64,
    counts: Counts,
    tally: RejectTally,
}

/// The result of one import, printed as the summary.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub operation_id: Option<i64>,
    pub kind: String,
    pub status: OperationStatus,
    pub file: String,
    pub counts: Counts,
    pub rejects_file: Option<String>,
    pub tally: RejectTally,
    pub elapsed: std::time::Duration,
    pub stop_reason: String,
    /// Why the import failed or stopped early, for the JSON summary.
    pub error: Option<String>,
    /// About the input as a whole (no line end at the end, the wrong encoding, …).
    pub warnings: Vec<String>,
    pub dry_run: bool,
    /// Whether the kind inserts rows, and what it calls updated ones (for the human line).
    pub inserts: bool,
    pub updated_label: &'static str,
}

impl ImportReport {
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.counts;
        let ms = self.elapsed.as_millis() as u64;
        json!({
            "operation_id": self.operation_id,
            "kind": self.kind,
            "status": self.status.as_str(),
            "file": self.file,
            "rows_read": c.rows_read,
            "inserted": c.inserted,
            "updated": c.updated,
            "unchanged": c.unchanged,
            "duplicate": c.duplicate,
            "skipped_deleted": c.skipped_deleted,
            "rejected": c.rejected,
            "rejects_file": self.rejects_file,
            "duration_ms": ms,
            "rows_per_sec": (output::rate(c.rows_read, self.elapsed) * 10.0).round() / 10.0,
            "dry_run": self.dry_run,
            "stopped": self.stop_reason,
            "error": self.error,
            "errors": self.tally,
            "warnings": self.warnings,
        })
    }

    pub fn print_human(&self) {
        let c = &self.counts;
        let verb = if self.dry_run { "would be " } else { "" };
        eprintln!(
            "{}{} {}: {} ({} rows in {:.1} s, {:.0} rows/s)",
            if self.dry_run { "dry run: " } else { "" },
            self.kind,
            self.file,
            self.status.as_str(),
            c.rows_read,
            self.elapsed.as_secs_f64(),
            output::rate(c.rows_read, self.elapsed)
        );
        let inserted = if self.inserts {
            format!("{verb}inserted {} + ", c.inserted)
        } else {
            String::new()
        };
        eprintln!(
            "  read {}  = {inserted}{verb}{} {} + unchanged {} + duplicate {} + skipped (deleted) {} + rejected {}",
            c.rows_read, self.updated_label, c.updated, c.unchanged, c.duplicate, c.skipped_deleted, c.rejected
        );
        for (reason, t) in &self.tally.0 {
            let lines: Vec<String> = t.first_lines.iter().map(|l| l.to_string()).collect();
            let more = if t.count as usize > t.first_lines.len() {
                ", …"
            } else {
                ""
            };
            eprintln!("  rejected {:>6}  {reason} (lines {}{more})", t.count, lines.join(", "));
        }
        if let Some(file) = &self.rejects_file {
            eprintln!("  rejected rows written to {file}");
        }
        for warning in &self.warnings {
            eprintln!("  warning: {warning}");
        }
        if let Some(id) = self.operation_id.filter(|_| !self.dry_run) {
            eprintln!("  operation {id}");
        }
    }
}

/// The default rejects path: next to the input, `<name>.rejects.csv`.
fn default_rejects_path(input: &Input) -> Option<PathBuf> {
    match input {
        Input::Stdin => None,
        Input::File(path) => {
            let name = path.file_name()?.to_string_lossy();
            let stem = name.strip_suffix(".csv").unwrap_or(&name);
            Some(path.with_file_name(format!("{stem}.rejects.csv")))
        }
    }
}

/// How many connections an import uses: the writer, the advisory lock and the read-ahead.
pub const CONNECTIONS: u32 = 3;

/// How an import ended, for the command to print: the summary, the kind's own JSON keys,
/// notes for stderr, and the exit code or the error.
pub struct ImportOutcome {
    pub report: ImportReport,
    pub extra: serde_json::Value,
    pub notes: Vec<String>,
    pub result: anyhow::Result<i32>,
}

/// Runs one import from start to end on `pool` (at least [`CONNECTIONS`] connections to
/// `url`). An error before anything was recorded (a bad header, a usage error) is returned as
/// such; everything after is in the outcome.
pub fn run<K: ImportKind>(
    pool: &db::Pool,
    url: &str,
    options: ImportOptions,
    kind: &mut K,
    args_json: serde_json::Value,
    log: Log,
) -> anyhow::Result<ImportOutcome> {
    let started = Instant::now();
    let op_kind = K::operation_kind();
    let stop = StopFlags::install()?;

    let rejects_path = match (&options.rejects, default_rejects_path(&options.input)) {
        (Some(path), _) => path.clone(),
        (None, Some(path)) => path,
        (None, None) => {
            return Err(UsageError("reading from stdin needs --rejects PATH for the rejected rows".into()).into());
        }
    };
    if options.resume && matches!(options.input, Input::Stdin) {
        return Err(UsageError("--resume needs a file: stdin cannot be read again".into()).into());
    }
    if options.resume && options.mode != Mode::Batched {
        return Err(UsageError("--resume works with batched imports, not with --atomic or --dry-run".into()).into());
    }

    let progress = output::byte_progress(options.show_progress, options.input.size());
    progress.set_prefix("scanning");
    let scan_started = Instant::now();
    let scanned = match &options.input {
        Input::File(path) => Some(scan::scan_file::<K>(path, &options, &progress)?),
        Input::Stdin => None,
    };
    if let Some(reason) = scanned.as_ref().and_then(|s| s.untracked_reason.as_ref())
        && reason.starts_with("more than")
    {
        log.info(format!(
            "warning: {reason}: a repeated key in another batch is found only when the later row is written"
        ));
    }
    if log.verbose && scanned.is_some() {
        eprintln!(
            "scanned the file (SHA-256 and repeated keys) in {:.2} s",
            scan_started.elapsed().as_secs_f64()
        );
    }
    let source_sha = scanned.as_ref().map(|s| s.sha256.clone());
    let repeated = scanned.and_then(|s| s.last_of_repeated);
    if repeated.is_some() {
        kind.keys_seen_once();
    }
    // One import of the same file at a time: a second one would race the first's checkpoints.
    let _lock = match &source_sha {
        Some(sha) if options.mode != Mode::DryRun => Some(AdvisoryLock::try_acquire(pool, &format!("import:{sha}"))?),
        _ => None,
    };
    let mut conn = db::get(pool)?;

    // A resume picks up the latest unfinished import of a file with the same content.
    let mut resumed: Option<(i64, Checkpoint)> = None;
    if options.resume {
        let sha = source_sha.as_deref().expect("files have a hash");
        match operation::latest_unfinished(&mut conn, &op_kind, sha).context("cannot look up unfinished imports")? {
            Some(op) => {
                let checkpoint = match op.checkpoint {
                    Some(value) => serde_json::from_value::<Checkpoint>(value)
                        .with_context(|| format!("operation {} has an unreadable checkpoint", op.id))?,
                    None => Checkpoint {
                        position: Position::default(),
                        rejects_bytes: 0,
                        counts: Counts::default(),
                        tally: RejectTally::default(),
                    },
                };
                log.info(format!(
                    "resuming operation {} ({}) after record {} (line {})",
                    op.id,
                    op.status.as_str(),
                    checkpoint.position.record,
                    checkpoint.position.line
                ));
                resumed = Some((op.id, checkpoint));
            }
            None => log.info("nothing to resume: no unfinished import of this file; starting from the beginning"),
        }
    }
    let resume_at = resumed.as_ref().map(|(_, c)| c.position).filter(|p| p.record > 0);
    let mut source = CsvSource::open(
        &options.input,
        options.delimiter,
        options.encoding,
        options.max_field_size,
        resume_at,
    )?;

    // Everything that can be wrong with the header is an error before anything is written.
    let empty_input = source.raw_header.is_empty();
    if empty_input {
        log.info(format!(
            "{}: the input is empty (no header, no rows); nothing to import",
            options.input.display()
        ));
    }
    let columns = if empty_input {
        None
    } else {
        Some(ColumnMap::resolve(&source.header, K::FIELDS, &options.renames).with_context(|| options.input.display())?)
    };
    let value_map = ValueMap::parse(&options.value_maps, K::FIELDS)?;
    if let Some(columns) = &columns {
        kind.configure(columns);
    }
    if let Some(ignored) = columns.as_ref().map(|c| &c.ignored).filter(|i| !i.is_empty()) {
        log.info(output::escape_controls(&format!(
            "warning: ignoring unknown column(s): {}",
            ignored.join(", ")
        )));
    }

    let (mut counts, mut tally, start_rejects_len) = match &resumed {
        Some((_, c)) => (c.counts, c.tally.clone(), Some(c.rejects_bytes)),
        None => (Counts::default(), RejectTally::default(), None),
    };
    if resumed.is_none() {
        rejects::remove_stale(&rejects_path, options.delimiter)?;
    }
    let mut rejects = RejectsWriter::new(rejects_path, &source.raw_header, options.delimiter, start_rejects_len);
    // The rejects file's length with the last committed batch, to cut a rolled-back one off.
    let mut committed_rejects = start_rejects_len.unwrap_or(0);

    let file_display = options.input.display();
    let operator = operation::operator();
    let new_op = NewBulkOperation {
        kind: &op_kind,
        args: args_json,
        operator: &operator,
        source_file: match &options.input {
            Input::File(p) => p.to_str(),
            Input::Stdin => None,
        },
        source_sha256: source_sha.as_deref(),
    };
    // The operation row is committed at once in batched and atomic modes, so that the outcome
    // can be recorded whatever happens to the import's own transaction; a dry run records it
    // inside the transaction it rolls back.
    let op_id = match (&resumed, options.mode) {
        (Some((id, _)), _) => {
            operation::reopen(&mut conn, *id).context("cannot reopen the operation")?;
            *id
        }
        (None, Mode::DryRun) => 0,
        (None, _) => operation::start(&mut conn, &new_op).context("cannot record the operation")?,
    };

    progress.set_prefix("importing");

    // The reader thread: parse and validate while the database works on the previous batch.
    // One batch in the channel, one being parsed, one being written: enough to keep both
    // threads busy, and memory bounded by three batches whatever the file size.
    let (sender, receiver) = mpsc::sync_channel::<BatchResult<K>>(0);
    // With a prefetcher, batches go reader → prefetch thread → writer.
    let prefetcher = kind.prefetcher().filter(|_| repeated.is_some() && columns.is_some());
    let (sender, prefetch) = match prefetcher {
        Some(fetch) => {
            let (reader_sender, reader_receiver) = mpsc::sync_channel::<BatchResult<K>>(0);
            let prefetch_conn = db::get(pool)?;
            let timeouts = options.timeouts;
            let thread = std::thread::spawn(move || {
                prefetch_batches::<K>(fetch, prefetch_conn, timeouts, reader_receiver, sender)
            });
            (reader_sender, Some(thread))
        }
        None => (sender, None),
    };
    let batch_size = options.batch_size.max(1);
    let parse_options = ParseOptions {
        zone: options.zone,
        tag_separator: options.tag_separator,
    };
    let settings = ReadSettings {
        encoding: options.encoding,
        batch_size,
        max_field_size: options.max_field_size,
        from_stdin: matches!(options.input, Input::Stdin),
    };
    let reader_progress = progress.clone();
    let reader = columns.map(|columns| {
        std::thread::spawn(move || {
            read_batches::<K>(
                &mut source,
                &columns,
                &value_map,
                &settings,
                &parse_options,
                &sender,
                &reader_progress,
            )
        })
    });

    let mut process =
        |conn: &mut PgConnection, counts: &mut Counts, tally: &mut RejectTally| -> anyhow::Result<LoopEnd> {
            let id = if options.mode == Mode::DryRun {
                operation::start(conn, &new_op).context("cannot record the operation")?
            } else {
                op_id
            };
            process_batches(
                conn,
                id,
                &receiver,
                kind,
                &options,
                repeated.as_ref(),
                &mut rejects,
                counts,
                tally,
                &stop,
                &progress,
                &mut committed_rejects,
            )
        };
    let result: anyhow::Result<LoopEnd> = if reader.is_none() {
        Ok(LoopEnd::default())
    } else {
        match options.mode {
            Mode::Batched => process(&mut conn, &mut counts, &mut tally),
            Mode::Atomic => {
                // A max-rejects abort or a signal rolls an atomic import back too.
                let mut unclean_end = None;
                let committed = conn.transaction(|c| {
                    let end = process(c, &mut counts, &mut tally)?;
                    if end.abort.is_none() && end.signal.is_none() {
                        Ok(end)
                    } else {
                        unclean_end = Some(end);
                        Err(anyhow::anyhow!("rolled back"))
                    }
                });
                match (committed, unclean_end) {
                    (Ok(end), _) => Ok(end),
                    (Err(_), Some(end)) => Ok(end),
                    (Err(e), None) => Err(e),
                }
            }
            Mode::DryRun => {
                let mut outcome = None;
                let _ = conn.transaction::<(), anyhow::Error, _>(|c| {
                    outcome = Some(process(c, &mut counts, &mut tally));
                    Err(anyhow::anyhow!("dry run: rolled back"))
                });
                outcome.expect("the transaction ran")
            }
        }
    };
    progress.finish_and_clear();
    drop(receiver);
    let prefetch_time = prefetch.and_then(|handle| handle.join().ok());
    let mut warnings = match reader {
        Some(handle) => handle.join().unwrap_or_default(),
        None => Vec::new(),
    };
    warnings.dedup();
    if let Some(t) = tally
        .0
        .get("invalid UTF-8")
        .filter(|_| options.encoding == Encoding::Utf8)
    {
        warnings.push(format!(
            "{} rows are not valid UTF-8: if the file is Latin-1 (ISO-8859-1), try --encoding latin1",
            t.count
        ));
    }
    if let Some(busy) = prefetch_time.filter(|_| options.verbose) {
        eprintln!(
            "read ahead for the writer on a second connection: {:.2} s",
            busy.as_secs_f64()
        );
    }
    rejects.flush()?;

    let result = result.map_err(db::name_lost_connection);
    let rolled_back = options.mode == Mode::Atomic;
    let (status, message, mut exit_code, stop_reason) = match &result {
        Err(e) => {
            let status = if rolled_back {
                OperationStatus::RolledBack
            } else {
                OperationStatus::Failed
            };
            (status, Some(format!("{e:#}")), exit::FAILURE, "error")
        }
        Ok(LoopEnd { abort: Some(msg), .. }) => {
            let status = if rolled_back {
                OperationStatus::RolledBack
            } else {
                OperationStatus::Failed
            };
            (status, Some(msg.clone()), exit::FAILURE, "max-rejects")
        }
        Ok(LoopEnd { signal: Some(code), .. }) => {
            let status = if rolled_back {
                OperationStatus::RolledBack
            } else {
                OperationStatus::Interrupted
            };
            (
                status,
                Some(format!("stopped by {}", StopFlags::signal_name(*code))),
                *code,
                "signal",
            )
        }
        Ok(_) => (OperationStatus::Succeeded, None, exit::SUCCESS, "done"),
    };
    if result.is_ok() && counts.accounted() != counts.rows_read {
        bail!(
            "internal error: {} rows read but {} accounted for ({counts:?})",
            counts.rows_read,
            counts.accounted()
        );
    }
    // The end is recorded on a fresh connection when the import's own one is gone; if even
    // that fails the import's own error stays the one reported, and the operation is marked
    // abandoned by the next command that reads operations.
    let mut end_not_recorded = None;
    if op_id != 0
        && let Err(err) = operation::record_end(
            &mut conn,
            url,
            op_id,
            status,
            &serde_json::to_value(counts)?,
            message.as_deref(),
        )
    {
        end_not_recorded = Some(format!(
            "{err:#}; the next ticketops command that reads operations marks operation {op_id} abandoned"
        ));
    }
    if status == OperationStatus::Succeeded && counts.rejected > 0 {
        exit_code = exit::REJECTED_ROWS;
    }

    let report = ImportReport {
        operation_id: (op_id != 0).then_some(op_id),
        kind: op_kind,
        status,
        file: file_display,
        counts,
        rejects_file: rejects.written().then(|| rejects.path().display().to_string()),
        tally,
        elapsed: started.elapsed(),
        stop_reason: stop_reason.to_string(),
        warnings,
        error: result
            .as_ref()
            .err()
            .map(|e| format!("{e:#}"))
            .or_else(|| message.clone().filter(|_| status != OperationStatus::Succeeded)),
        dry_run: options.mode == Mode::DryRun,
        inserts: K::INSERTS,
        updated_label: K::UPDATED_LABEL,
    };
    let mut notes = Vec::new();
    if let Some(note) = &end_not_recorded {
        notes.push(format!("warning: {note}"));
    }
    let result = match result {
        Err(e) => {
            let what_stays = match options.mode {
                Mode::Batched => format!(
                    "batches committed before it stay (operation {op_id}); fix the cause and run again, or add --resume"
                ),
                Mode::Atomic => "nothing was committed".to_string(),
                Mode::DryRun => "dry run, nothing was written".to_string(),
            };
            Err(e.context(format!("{} of {} failed; {what_stays}", report.kind, report.file)))
        }
        Ok(end) => {
            if let Some(msg) = end.abort {
                let what_stays = if rolled_back {
                    "nothing was committed"
                } else {
                    "batches committed before it stay"
                };
                notes.push(format!("error: {msg}; {what_stays}"));
            }
            match end_not_recorded.filter(|_| exit_code == exit::SUCCESS) {
                Some(note) => Err(anyhow::anyhow!("the import finished, but {note}")),
                None => Ok(exit_code),
            }
        }
    };
    Ok(ImportOutcome {
        report,
        extra: kind.summary_extra(),
        notes,
        result,
    })
}

/// How the batch loop ended when it did not fail.
#[derive(Debug, Default)]
struct LoopEnd {
    /// `--max-rejects` was exceeded.
    abort: Option<String>,
    /// A signal asked us to stop (its exit code).
    signal: Option<i32>,
}

#[allow(clippy::too_many_arguments)]
fn process_batches<K: ImportKind>(
    conn: &mut PgConnection,
    op_id: i64,
    receiver: &mpsc::Receiver<BatchResult<K>>,
    kind: &mut K,
    options: &ImportOptions,
    repeated: Option<&HashMap<u64, scan::LastOccurrence>>,
    rejects: &mut RejectsWriter,
    counts: &mut Counts,
    tally: &mut RejectTally,
    stop: &StopFlags,
    progress: &indicatif::ProgressBar,
    committed_rejects: &mut u64,
) -> anyhow::Result<LoopEnd> {
    if options.mode != Mode::Batched {
        // One transaction for the whole import: the timeouts hold for what `begin` does (an
        // initial load locks whole tables) as well as for every batch.
        db::set_local_timeouts(conn, options.timeouts)?;
    }
    kind.begin(conn, op_id)?;
    let started = Instant::now();
    // Time spent waiting for the reader thread: when it is large, parsing (not the
    // database) limits the import.
    let mut waited = std::time::Duration::ZERO;
    loop {
        let wait_started = Instant::now();
        let Ok(batch) = receiver.recv() else { break };
        waited += wait_started.elapsed();
        let mut batch = batch?;
        let mut prefetched = batch.prefetched.take();
        let first_line = batch
            .rows
            .first()
            .map(|r| r.line)
            .or(batch.rejects.first().map(|r| r.1))
            .unwrap_or(0);
        let mut base_counts = *counts;
        base_counts.rows_read += batch.rows_read;
        // Within a file the last occurrence of a key wins; earlier ones are duplicates.
        let mut rows = Some(dedupe::<K>(batch.rows, repeated, &mut base_counts));
        let reader_rejects = batch.rejects;
        let batched = options.mode == Mode::Batched;

        // Everything a batch writes, the rejects file included, is undone when its transaction
        // rolls back: the file is cut back to the length recorded with the last committed batch.
        let write = |conn: &mut PgConnection,
                     rows: Vec<Numbered<K::Row>>,
                     prefetched: Option<K::Prefetched>,
                     kind: &mut K,
                     c: &mut Counts,
                     t: &mut RejectTally,
                     rejects: &mut RejectsWriter|
         -> anyhow::Result<u64> {
            db::set_local_timeouts(conn, options.timeouts)?;
            for (record, line, raw, error) in &reader_rejects {
                rejects.write(raw, *record, *line, error)?;
                c.rejected += 1;
                t.add(&error.reason, *line);
            }
            let writer_rejects = kind.write_batch(conn, op_id, rows, prefetched, c)?;
            for r in &writer_rejects {
                rejects.write(&r.raw, r.record, r.line, &r.error)?;
                c.rejected += 1;
                t.add(&r.error.reason, r.line);
            }
            let rejects_bytes = rejects.flush()?;
            if batched {
                let checkpoint = Checkpoint {
                    position: batch.end,
                    rejects_bytes,
                    counts: *c,
                    tally: t.clone(),
                };
                operation::save_checkpoint(
                    conn,
                    op_id,
                    &serde_json::to_value(&checkpoint)?,
                    &serde_json::to_value(*c)?,
                )?;
            }
            Ok(rejects_bytes)
        };
        let mut attempt = 0;
        let (batch_counts, batch_tally) = loop {
            let mut batch_counts = base_counts;
            let mut batch_tally = tally.clone();
            // A batch that may fail and be tried again (or named) keeps its rows.
            let retry_left = batched && attempt < options.retries;
            let attempt_rows = if batched {
                rows.clone().unwrap_or_default()
            } else {
                rows.take().unwrap_or_default()
            };
            let write_this = |conn: &mut PgConnection| {
                write(
                    conn,
                    attempt_rows,
                    prefetched.take(),
                    kind,
                    &mut batch_counts,
                    &mut batch_tally,
                    rejects,
                )
            };
            let result = if batched {
                conn.transaction(write_this)
            } else {
                write_this(conn)
            };
            let err = match result {
                Ok(rejects_bytes) => {
                    *committed_rejects = rejects_bytes;
                    break (batch_counts, batch_tally);
                }
                Err(err) => err,
            };
            kind.reset();
            if batched {
                rejects.cut_back(*committed_rejects)?;
            }
            if job::is_transient(&err) && retry_left {
                attempt += 1;
                let wait = job::backoff(attempt);
                if options.verbose {
                    eprintln!(
                        "batch starting at line {first_line}: {err:#}; retry {attempt} of {} in {} ms",
                        options.retries,
                        wait.as_millis()
                    );
                }
                std::thread::sleep(wait);
                continue;
            }
            let mut err = err;
            if batched && job::is_transient(&err) {
                let keys: Vec<String> = rows
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| K::key(&r.row).map(str::to_string))
                    .collect();
                if let Some(held) = K::KEY_COLUMN.and_then(|(table, column)| held_keys(conn, table, column, &keys))
                    && !held.is_empty()
                {
                    let shown: Vec<&str> = held.iter().take(10).map(String::as_str).collect();
                    let more = if held.len() > shown.len() { ", …" } else { "" };
                    err = err.context(format!(
                        "another session held {} of the batch's rows past --lock-timeout ({} {}{more})",
                        held.len(),
                        K::KEY_COLUMN.map_or("key", |(_, c)| c),
                        shown.join(", ")
                    ));
                }
            }
            let tries = if attempt > 0 {
                format!(" (tried {} times)", attempt + 1)
            } else {
                String::new()
            };
            return Err(err.context(format!(
                "batch starting at line {first_line} of {} could not be written{tries}",
                options.input.display()
            )));
        };
        *counts = batch_counts;
        *tally = batch_tally;
        progress.set_message(format!(
            "{} rows, {:.0} rows/s",
            counts.rows_read,
            output::rate(counts.rows_read, started.elapsed())
        ));

        if let Some(limit) = options.max_rejects
            && limit.exceeded(counts.rejected, counts.rows_read, false)
        {
            return Ok(LoopEnd {
                abort: Some(format!(
                    "too many rejected rows: {} of {} read, over --max-rejects; stopped",
                    counts.rejected, counts.rows_read
                )),
                signal: None,
            });
        }
        if let Some(code) = stop.requested() {
            return Ok(LoopEnd {
                abort: None,
                signal: Some(code),
            });
        }
    }
    if let Some(limit) = options.max_rejects
        && limit.exceeded(counts.rejected, counts.rows_read, true)
    {
        return Ok(LoopEnd {
            abort: Some(format!(
                "too many rejected rows: {} of {} read, over --max-rejects",
                counts.rejected, counts.rows_read
            )),
            signal: None,
        });
    }
    if options.verbose {
        eprintln!(
            "waited {:.2} s for the reader (parsing, validation, read-ahead) in {:.2} s of writing",
            waited.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
    progress.set_prefix("finishing");
    kind.end(conn)?;
    Ok(LoopEnd::default())
}

/// Of `keys` in `table.column`, those whose rows another session holds locked now: the rows
/// that are not locked are taken with SKIP LOCKED in a transaction that is rolled back at
/// once. `None` when the lookup itself fails.
fn held_keys(conn: &mut PgConnection, table: &str, column: &str, keys: &[String]) -> Option<Vec<String>> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
    }
    let mut held = None;
    let _ = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let select = |lock: &str| {
            diesel::sql_query(format!(
                "SELECT {column}::text AS key FROM {table} WHERE {column} = ANY($1) ORDER BY 1 {lock}"
            ))
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(keys)
        };
        let all: Vec<Key> = select("").load(conn)?;
        let free: std::collections::HashSet<String> = select("FOR NO KEY UPDATE SKIP LOCKED")
            .load::<Key>(conn)?
            .into_iter()
            .map(|k| k.key)
            .collect();
        held = Some(all.into_iter().map(|k| k.key).filter(|k| !free.contains(k)).collect());
        Err(diesel::result::Error::RollbackTransaction)
    });
    held
}

/// Keeps the last row per key, in the batch and, where the file was scanned, in the whole
/// file; counts the others as duplicates.
fn dedupe<K: ImportKind>(
    rows: Vec<Numbered<K::Row>>,
    repeated: Option<&HashMap<u64, scan::LastOccurrence>>,
    counts: &mut Counts,
) -> Vec<Numbered<K::Row>> {
    let repeated = repeated.filter(|r| !r.is_empty());
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    let mut keep = vec![true; rows.len()];
    for (i, r) in rows.iter().enumerate() {
        let superseded_later = repeated.zip(K::key(&r.row)).is_some_and(|(repeated, key)| {
            repeated
                .get(&scan::key_hash(key))
                .is_some_and(|last| last.record > r.record && last.key == key)
        });
        if superseded_later {
            keep[i] = false;
            counts.duplicate += 1;
            continue;
        }
        if let Some(key) = K::key(&r.row)
            && let Some(previous) = last.insert(key, i)
        {
            keep[previous] = false;
            counts.duplicate += 1;
        }
    }
    rows.into_iter().zip(keep).filter(|(_, k)| *k).map(|(r, _)| r).collect()
}

/// The prefetch thread: runs the kind's read-ahead for each batch on its own connection,
/// each in a short read-only transaction, and passes the batch on. A failed read-ahead only
/// leaves the lookup to the writer. Returns the time spent reading.
fn prefetch_batches<K: ImportKind>(
    mut fetch: Prefetcher<K::Row, K::Prefetched>,
    mut conn: db::PooledConn,
    timeouts: BatchTimeouts,
    input: mpsc::Receiver<BatchResult<K>>,
    output: mpsc::SyncSender<BatchResult<K>>,
) -> std::time::Duration {
    let mut busy = std::time::Duration::ZERO;
    for batch in input {
        let batch = batch.map(|mut batch| {
            let started = Instant::now();
            batch.prefetched = conn
                .build_transaction()
                .read_only()
                .repeatable_read()
                .run(|conn| {
                    db::set_local_timeouts(conn, timeouts)?;
                    fetch(conn, &batch.rows)
                })
                .ok();
            busy += started.elapsed();
            batch
        });
        if output.send(batch).is_err() {
            break; // the writer stopped (error or signal)
        }
    }
    busy
}

/// What the reader thread needs to know besides the rows' own fields.
struct ReadSettings {
    encoding: Encoding,
    batch_size: usize,
    max_field_size: usize,
    /// A stream can end mid-record (a broken pipe, a cut download): its last record is then
    /// rejected. A file that does not end with a line end only gets a warning.
    from_stdin: bool,
}

/// Parses and validates records into batches for the writer; returns the warnings about the
/// input as a whole (it does not end with a line end, it looks like UTF-8 read as Latin-1).
#[allow(clippy::too_many_arguments)]
fn read_batches<K: ImportKind>(
    source: &mut CsvSource,
    columns: &ColumnMap,
    value_map: &ValueMap,
    settings: &ReadSettings,
    options: &ParseOptions,
    sender: &mpsc::SyncSender<BatchResult<K>>,
    progress: &indicatif::ProgressBar,
) -> Vec<String> {
    let batch_size = settings.batch_size;
    let encoding = settings.encoding;
    let mut warnings = Vec::new();
    let mut latin1_check = Latin1Check::default();
    let mut record = ByteRecord::new();
    let mut batch = Batch {
        rows: Vec::with_capacity(batch_size),
        rejects: Vec::new(),
        end: Position::default(),
        rows_read: 0,
        prefetched: None,
    };
    loop {
        let next = match source.next(&mut record) {
            Ok(next) => next,
            Err(e) => {
                let _ = sender.send(Err(e));
                return warnings;
            }
        };
        let Some(read) = next else { break };
        let (line, after) = (read.line, read.after);
        batch.rows_read += 1;
        batch.end = after;
        if encoding == Encoding::Latin1 {
            latin1_check.look_at(&record);
        }
        let parsed = if let Some(cut) = read.oversized {
            let column = source.header.get(cut.field).map(String::as_str).unwrap_or("?");
            Err(RowError::new(
                None,
                "field too large",
                if cut.whole_record {
                    format!(
                        "the record's fields add up to more than twice --max-field-size ({} bytes); \
                         the fields here are cut",
                        settings.max_field_size
                    )
                } else {
                    format!(
                        "field {} ({}) is {} bytes, over --max-field-size ({} bytes); the fields here are cut at that size",
                        cut.field + 1,
                        output::escape_controls(column),
                        cut.len,
                        settings.max_field_size
                    )
                },
            ))
        } else if read.unterminated && settings.from_stdin {
            Err(RowError::new(
                None,
                "truncated record",
                "the input ended inside this record, with no line end after it: was the stream cut off?",
            ))
        } else if record.len() != columns.header_len {
            Err(RowError::new(
                None,
                "wrong number of fields",
                format!(
                    "expected {} fields (as in the header), found {}",
                    columns.header_len,
                    record.len()
                ),
            ))
        } else {
            let fields = RecordFields {
                record: &record,
                columns,
                fields: K::FIELDS,
                encoding,
                value_map,
            };
            K::parse(&fields, options)
        };
        if read.unterminated && !settings.from_stdin {
            warnings.push(format!(
                "the input does not end with a line end: check that its last record (line {line}) is complete"
            ));
        }
        match parsed {
            Ok(row) => batch.rows.push(Numbered {
                record: after.record,
                line,
                raw: if K::REJECTS_IN_WRITER {
                    record.clone()
                } else {
                    ByteRecord::new()
                },
                row,
            }),
            Err(error) => batch.rejects.push((after.record, line, record.clone(), error)),
        }
        if batch.rows.len() + batch.rejects.len() >= batch_size {
            progress.set_position(after.byte);
            let full = std::mem::replace(
                &mut batch,
                Batch {
                    rows: Vec::with_capacity(batch_size),
                    rejects: Vec::new(),
                    end: after,
                    rows_read: 0,
                    prefetched: None,
                },
            );
            if sender.send(Ok(full)).is_err() {
                return warnings; // the writer stopped (error or signal)
            }
        }
    }
    if batch.rows_read > 0 {
        progress.set_position(batch.end.byte);
        let _ = sender.send(Ok(batch));
    }
    warnings.extend(latin1_check.warning());
    warnings
}

/// Whether a file read as Latin-1 is in fact UTF-8: then every field with bytes over 127 is
/// valid UTF-8, and reading it as Latin-1 turns `Café` into `CafÃ©`.
#[derive(Default)]
pub(crate) struct Latin1Check {
    utf8_fields: u64,
    other_fields: u64,
    sample: Option<String>,
}

impl Latin1Check {
    pub(crate) fn look_at(&mut self, record: &ByteRecord) {
        for field in record.iter().filter(|f| !f.is_ascii()) {
            match std::str::from_utf8(field) {
                Ok(text) => {
                    self.utf8_fields += 1;
                    if self.sample.is_none() {
                        self.sample = Some(text.chars().take(40).collect());
                    }
                }
                Err(_) => self.other_fields += 1,
            }
        }
    }

    pub(crate) fn warning(&self) -> Option<String> {
        (self.utf8_fields > 0 && self.other_fields == 0).then(|| {
            format!(
                "the input looks like UTF-8, not Latin-1: all {} fields with non-ASCII bytes are valid UTF-8 \
                 (e.g. {:?}); --encoding latin1 stores them garbled (Café as CafÃ©) — import without it",
                self.utf8_fields,
                output::escape_controls(self.sample.as_deref().unwrap_or(""))
            )
        })
    }
}
