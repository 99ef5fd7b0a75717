//! The CSV import pipeline shared by `import tickets`, `import users` and `import comments`.
//!
//! A reader thread parses and validates records into batches while the main thread writes
//! the previous batch, so parsing overlaps database work; a kind may also have a prefetch
//! thread read what the next batch needs (tickets: the stored rows) on a second connection
//! meanwhile. Each batch is one short
//! transaction that also stores the operation's checkpoint, so a crash loses at most the
//! batch in flight and `--resume` continues exactly after the last committed one.

mod accounting;
mod bounded;
pub mod comments;
mod copy_binary;
pub mod entities;
mod initial_load;
mod kind;
pub mod normalize;
mod reader;
pub mod rejects;
pub mod scan;
pub mod source;
pub mod tickets;
pub mod users;
mod writer;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use diesel::{Connection, PgConnection};

use crate::db::{self, AdvisoryLock, BatchTimeouts};
use crate::exit::{self, UsageError};
use crate::models::{NewBulkOperation, OperationStatus};
use crate::operation;
use crate::output::{self, Log};
use crate::signals::StopFlags;
use normalize::InputZone;
use rejects::{RejectTally, RejectsWriter};
use source::{ColumnMap, CsvSource, Encoding, Input, Position, ValueMap};

use accounting::Checkpoint;
pub use accounting::{Counts, ImportReport, MaxRejects};
pub use kind::{ImportKind, Numbered, ParseOptions, Prefetcher, WriterReject};
pub(crate) use reader::Latin1Check;
use reader::{BatchResult, ReadSettings, read_batches};
use writer::{LoopEnd, prefetch_batches, process_batches};

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
