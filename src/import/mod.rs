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
mod columns;
pub mod comments;
mod copy_binary;
pub mod entities;
pub mod fingerprint;
mod initial_load;
mod kind;
pub mod mapping;
pub mod normalize;
mod reader;
pub mod rejects;
pub mod scan;
pub mod source;
pub mod tickets;
pub mod users;
mod writer;

use std::path::PathBuf;
use std::sync::{Mutex, mpsc};
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
use fingerprint::Fingerprinter;
pub use kind::{FingerprintLookup, Fingerprints, ImportKind, Numbered, ParseOptions, Prefetcher, WriterReject};
pub(crate) use reader::Latin1Check;
use reader::{BatchResult, ReadSettings, UnchangedSkip, read_batches};
use writer::{Committed, CommittedState, LoopEnd, WriterShared, prefetch_batches, process_batches};

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
    /// `--map`, `--value-map`, `--date-format` and `--map-file`.
    pub mapping: mapping::Mapping,
    pub rejects: Option<PathBuf>,
    pub max_rejects: Option<MaxRejects>,
    /// `--max-field-size`: a record with a larger field is rejected unread.
    pub max_field_size: usize,
    pub batch_size: usize,
    /// `--jobs`: how many connections write batches at the same time.
    pub jobs: usize,
    pub mode: Mode,
    pub resume: bool,
    pub undelete: bool,
    pub initial_load: bool,
    pub timeouts: BatchTimeouts,
    /// How often a batch that lost a race (lock timeout, deadlock, serialization failure) is
    /// tried again in batched mode.
    pub retries: u32,
    /// Draw a progress bar on stderr.
    pub progress: output::Draw,
    /// `-v`: say where the time went.
    pub verbose: bool,
}

/// The default rejects path: next to the input, `<name>.rejects.csv`.
fn default_rejects_path(input: &Input) -> Option<PathBuf> {
    match input {
        Input::Stdin => None,
        Input::File(path) => {
            let name = path.file_name()?.to_string_lossy();
            let name = [".gz", ".zst"]
                .iter()
                .find_map(|z| name.strip_suffix(z))
                .unwrap_or(&name);
            let stem = name.strip_suffix(".csv").unwrap_or(name);
            Some(path.with_file_name(format!("{stem}.rejects.csv")))
        }
    }
}

/// How many connections an import with one writer uses: the writer, the advisory lock, the
/// read-ahead and the reader's lookup of stored fingerprints; or the two of an initial load's
/// staged months (partitioned layout), which uses neither the read-ahead nor the lookup.
pub const CONNECTIONS: u32 = 4;

/// How many connections an import with `jobs` writers uses.
pub fn connections(jobs: usize) -> u32 {
    CONNECTIONS + jobs.saturating_sub(1) as u32
}

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
    let rejects_path = rejects_path_for(&options)?;

    let progress = output::byte_progress(options.progress, options.input.size());
    let (source_sha, repeated) = scan_input::<K>(&options, kind, &progress, log)?;
    let repeated = repeated.map(std::sync::Arc::new);
    // One import of the same file at a time: a second one would race the first's checkpoints.
    let _lock = match &source_sha {
        Some(sha) if options.mode != Mode::DryRun => Some(AdvisoryLock::try_acquire(pool, &format!("import:{sha}"))?),
        _ => None,
    };
    kind.use_pool(pool, options.mode);
    let mut conn = db::get(pool)?;
    let resumed = match source_sha.as_deref().filter(|_| options.resume) {
        Some(sha) => find_resume(&mut conn, &op_kind, sha, log)?,
        None => None,
    };
    let resume_at = resumed.as_ref().map(|(_, c)| c.position).filter(|p| p.record > 0);
    // Batches committed out of order (several writers) are skipped by where they start: the
    // resume reads in batches of the size they were written in.
    let mut options = options;
    if let Some(size) = resumed.as_ref().and_then(|(_, c)| c.batch_size)
        && size != options.batch_size
    {
        log.info(format!(
            "resuming in batches of {size} rows, as the interrupted run wrote them (not {})",
            options.batch_size
        ));
        options.batch_size = size;
    }
    let source = CsvSource::open(
        &options.input,
        options.delimiter,
        options.encoding,
        options.max_field_size,
        resume_at,
    )?;
    let (columns, value_map) = read_header::<K>(&source, &options, kind, log)?;

    if resumed.is_none() {
        rejects::remove_stale(&rejects_path, options.delimiter)?;
    }
    let start_rejects_len = resumed.as_ref().map(|(_, c)| c.rejects_bytes);
    let committed = Mutex::new(Committed {
        rejects: RejectsWriter::new(rejects_path, &source.raw_header, options.delimiter, start_rejects_len),
        batch_size: options.batch_size,
        state: match &resumed {
            Some((_, c)) => CommittedState {
                counts: c.counts,
                tally: c.tally.clone(),
                rejects_bytes: c.rejects_bytes,
                prefix: resume_at.unwrap_or_default(),
                done: c.done.iter().copied().collect(),
            },
            None => CommittedState::default(),
        },
        checkpoint_saved: std::time::Instant::now(),
    });

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
        (Some((id, _)), _) => operation::reopen(&mut conn, *id).map(|()| *id),
        (None, Mode::DryRun) => Ok(0),
        (None, _) => operation::start(&mut conn, &new_op),
    }
    .context("cannot record the operation")?;

    progress.set_prefix("importing");
    let has_rows = columns.is_some();
    let more_writers = more_writers(pool, &options, kind, repeated.is_some(), log)?;
    let pipeline = spawn_pipeline::<K>(
        pool,
        &options,
        kind,
        source,
        columns,
        value_map,
        repeated.clone(),
        resume_at.unwrap_or_default(),
        &progress,
    )?;
    let mut more_writers = Some(more_writers);
    let mut process = |conn: &mut PgConnection| {
        let id = if options.mode == Mode::DryRun {
            operation::start(conn, &new_op).context("cannot record the operation")?
        } else {
            op_id
        };
        let shared = WriterShared {
            op_id: id,
            receiver: &pipeline.receiver,
            options: &options,
            repeated: repeated.as_deref(),
            committed: &committed,
            stop: &stop,
            progress: &progress,
        };
        process_batches(conn, kind, more_writers.take().unwrap_or_default(), &shared)
    };
    let result = if has_rows {
        drive(options.mode, &mut conn, &mut process)
    } else {
        Ok(LoopEnd::default())
    };
    progress.finish_and_clear();
    let Committed {
        mut rejects,
        state: CommittedState { counts, tally, .. },
        ..
    } = committed.into_inner().unwrap_or_else(|e| e.into_inner());
    let warnings = pipeline.join(&options, &tally);
    rejects.flush()?;

    let result = result.map_err(db::name_lost_connection);
    let end = Ending::of(&result, options.mode);
    if result.is_ok() && counts.accounted() != counts.rows_read {
        bail!(
            "internal error: {} rows read but {} accounted for ({counts:?})",
            counts.rows_read,
            counts.accounted()
        );
    }
    // Part of the import's time, so before its end is recorded.
    let after_commit_warning = if end.status == OperationStatus::Succeeded && options.mode != Mode::DryRun {
        kind.after_commit(&mut conn, pool).err().map(|err| {
            format!("warning: the import is committed, but {err:#}; autovacuum gathers the statistics later")
        })
    } else {
        None
    };
    // If even a fresh connection cannot record the end, the import's own error stays the one
    // reported.
    let end_not_recorded = match op_id {
        0 => None,
        _ => record_end(&mut conn, url, op_id, &end, &counts)?,
    };
    let exit_code = if end.status == OperationStatus::Succeeded && counts.rejected > 0 {
        exit::REJECTED_ROWS
    } else {
        end.exit_code
    };
    let report = ImportReport {
        operation_id: (op_id != 0).then_some(op_id),
        kind: op_kind,
        status: end.status,
        file: options.input.display(),
        counts,
        rejects_file: rejects.written().then(|| rejects.path().display().to_string()),
        tally,
        elapsed: started.elapsed(),
        stop_reason: end.stop_reason.to_string(),
        warnings,
        error: result
            .as_ref()
            .err()
            .map(crate::exit::error_text)
            .or_else(|| end.message.clone().filter(|_| end.status != OperationStatus::Succeeded)),
        dry_run: options.mode == Mode::DryRun,
        inserts: K::INSERTS,
        updated_label: K::UPDATED_LABEL,
    };
    let (mut notes, result) = conclude(result, &report, options.mode, op_id, exit_code, end_not_recorded);
    notes.extend(after_commit_warning);
    Ok(ImportOutcome {
        report,
        extra: kind.summary_extra(),
        notes,
        result,
    })
}

/// Records the end of an import on `conn`, or on a fresh connection when that one is gone;
/// returns why it could not be recorded at all (the next command then marks it abandoned).
fn record_end(
    conn: &mut PgConnection,
    url: &str,
    op_id: i64,
    end: &Ending,
    counts: &Counts,
) -> anyhow::Result<Option<String>> {
    let counts = serde_json::to_value(counts)?;
    Ok(
        operation::record_end(conn, url, op_id, end.status, &counts, end.message.as_deref())
            .err()
            .map(|err| {
                format!("{err:#}; the next ticketops command that reads operations marks operation {op_id} abandoned")
            }),
    )
}

/// Where the rejected rows go, after the checks of the options that need no database.
fn rejects_path_for(options: &ImportOptions) -> anyhow::Result<PathBuf> {
    if options.resume && matches!(options.input, Input::Stdin) {
        return Err(UsageError("--resume needs a file: stdin cannot be read again".into()).into());
    }
    if options.jobs > 1 && options.mode != Mode::Batched {
        return Err(UsageError(
            "--jobs writes batches on several connections, each committing on its own: it does not work with \
             --atomic, --dry-run or --initial-load, which run in one transaction"
                .into(),
        )
        .into());
    }
    if options.resume && options.mode != Mode::Batched {
        return Err(UsageError("--resume works with batched imports, not with --atomic or --dry-run".into()).into());
    }
    match (&options.rejects, default_rejects_path(&options.input)) {
        (Some(path), _) => Ok(path.clone()),
        (None, Some(path)) => Ok(path),
        (None, None) => Err(UsageError("reading from stdin needs --rejects PATH for the rejected rows".into()).into()),
    }
}

/// The writers besides the main one for `--jobs N`, each with its own connection. One writer
/// where several could not give the result of one: when a key may reach the writers more than
/// once (stdin, which is not scanned, or a file with more keys than the scan tracks), the
/// order of their commits would decide which occurrence wins.
fn more_writers<K: ImportKind>(
    pool: &db::Pool,
    options: &ImportOptions,
    kind: &mut K,
    keys_tracked: bool,
    log: Log,
) -> anyhow::Result<Vec<(db::PooledConn, K)>> {
    if options.jobs <= 1 {
        return Ok(Vec::new());
    }
    let one_writer = |why: &str| {
        log.info(format!(
            "warning: --jobs {}: writing on one connection: {why}",
            options.jobs
        ));
        Ok(Vec::new())
    };
    if !keys_tracked {
        return one_writer(match options.input {
            Input::Stdin => "stdin is not scanned for repeated keys beforehand",
            Input::File(_) => "the scan could not track every key of the file",
        });
    }
    let mut more = Vec::with_capacity(options.jobs - 1);
    for _ in 1..options.jobs {
        match kind.another_writer() {
            Some(writer) => more.push((db::get(pool)?, writer)),
            None => return one_writer("this kind of import writes with one connection"),
        }
    }
    kind.share_caches(options.jobs);
    for (_, writer) in &mut more {
        writer.share_caches(options.jobs);
    }
    Ok(more)
}

/// The pre-import pass over a file (see `scan`): its SHA-256 and the keys that repeat.
#[allow(clippy::type_complexity)]
fn scan_input<K: ImportKind>(
    options: &ImportOptions,
    kind: &mut K,
    progress: &indicatif::ProgressBar,
    log: Log,
) -> anyhow::Result<(Option<String>, Option<scan::Repeated>)> {
    let Input::File(path) = &options.input else {
        return Ok((None, None));
    };
    progress.set_prefix("scanning");
    let scan_started = Instant::now();
    let scanned = scan::scan_file::<K>(path, options, progress)?;
    if let Some(reason) = scanned.untracked_reason.as_ref().filter(|r| r.starts_with("more than")) {
        log.info(format!(
            "warning: {reason}: a repeated key in another batch is found only when the later row is written"
        ));
    }
    log.detail(format!(
        "scanned the file (SHA-256 and repeated keys) in {:.2} s",
        scan_started.elapsed().as_secs_f64()
    ));
    if scanned.last_of_repeated.is_some() {
        kind.keys_seen_once();
    }
    Ok((Some(scanned.sha256), scanned.last_of_repeated))
}

/// The latest unfinished import of a file with the same content, and where it stopped.
fn find_resume(
    conn: &mut PgConnection,
    op_kind: &str,
    sha: &str,
    log: Log,
) -> anyhow::Result<Option<(i64, Checkpoint)>> {
    let Some(op) = operation::latest_unfinished(conn, op_kind, sha).context("cannot look up unfinished imports")?
    else {
        log.info("nothing to resume: no unfinished import of this file; starting from the beginning");
        return Ok(None);
    };
    let checkpoint = match op.checkpoint {
        Some(value) => serde_json::from_value::<Checkpoint>(value)
            .with_context(|| format!("operation {} has an unreadable checkpoint", op.id))?,
        None => Checkpoint {
            position: Position::default(),
            rejects_bytes: 0,
            counts: Counts::default(),
            tally: RejectTally::default(),
            done: Vec::new(),
            batch_size: None,
        },
    };
    log.info(format!(
        "resuming operation {} ({}) after record {} (line {})",
        op.id,
        op.status.as_str(),
        checkpoint.position.record,
        checkpoint.position.line
    ));
    Ok(Some((op.id, checkpoint)))
}

/// Which column feeds which field (`None` for an empty input), and the value maps: everything
/// that can be wrong with the header is an error before anything is written.
fn read_header<K: ImportKind>(
    source: &CsvSource,
    options: &ImportOptions,
    kind: &mut K,
    log: Log,
) -> anyhow::Result<(Option<ColumnMap>, ValueMap)> {
    let value_map = ValueMap::new(&options.mapping.values, K::FIELDS)?;
    let columns = if source.raw_header.is_empty() {
        log.info(format!(
            "{}: the input is empty (no header, no rows); nothing to import",
            options.input.display()
        ));
        None
    } else {
        Some(
            ColumnMap::resolve(&source.header, K::FIELDS, &options.mapping, options.tag_separator)
                .with_context(|| options.input.display())?,
        )
    };
    if let Some(columns) = &columns {
        kind.configure(columns).with_context(|| options.input.display())?;
        if !columns.ignored.is_empty() {
            log.info(output::escape_controls(&format!(
                "warning: ignoring unknown column(s): {}",
                columns.ignored.join(", ")
            )));
        }
    }
    Ok((columns, value_map))
}

/// The threads that feed the writer: the reader, and the kind's read-ahead when it has one.
struct Pipeline<K: ImportKind> {
    receiver: Mutex<mpsc::Receiver<BatchResult<K>>>,
    reader: Option<std::thread::JoinHandle<Vec<String>>>,
    prefetch: Option<std::thread::JoinHandle<std::time::Duration>>,
    verbose: bool,
}

impl<K: ImportKind> Pipeline<K> {
    /// Waits for the threads (the writer has stopped taking batches); returns the warnings
    /// about the input as a whole.
    fn join(self, options: &ImportOptions, tally: &RejectTally) -> Vec<String> {
        drop(self.receiver);
        let prefetch_time = self.prefetch.and_then(|handle| handle.join().ok());
        let mut warnings = match self.reader {
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
                "{} rows are not valid UTF-8: if the file comes from a Windows program, try --encoding windows-1252 \
                 (or latin1 for ISO-8859-1)",
                t.count
            ));
        }
        if let Some(busy) = prefetch_time.filter(|_| self.verbose) {
            eprintln!(
                "read ahead for the writer on a second connection: {:.2} s",
                busy.as_secs_f64()
            );
        }
        warnings
    }
}

/// Starts the reader thread (parse and validate while the database works on the previous
/// batch) and, with a read-ahead, the prefetch thread between it and the writer. One batch in
/// each channel, one being parsed, one being written: both sides stay busy, and memory is
/// bounded by a few batches whatever the file size.
#[allow(clippy::too_many_arguments)]
fn spawn_pipeline<K: ImportKind>(
    pool: &db::Pool,
    options: &ImportOptions,
    kind: &K,
    mut source: CsvSource,
    columns: Option<ColumnMap>,
    value_map: ValueMap,
    repeated: Option<std::sync::Arc<scan::Repeated>>,
    start: Position,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Pipeline<K>> {
    let keys_tracked = repeated.is_some();
    let (sender, receiver) = mpsc::sync_channel::<BatchResult<K>>(0);
    let prefetcher = kind.prefetcher().filter(|_| keys_tracked && columns.is_some());
    let (sender, prefetch) = match prefetcher {
        Some(fetch) => {
            let (reader_sender, reader_receiver) = mpsc::sync_channel::<BatchResult<K>>(0);
            let prefetch_conn = db::get(pool)?;
            let timeouts = options.timeouts;
            let one_transaction = options.mode != Mode::Batched;
            let thread = std::thread::spawn(move || {
                prefetch_batches::<K>(fetch, prefetch_conn, timeouts, one_transaction, reader_receiver, sender)
            });
            (reader_sender, Some(thread))
        }
        None => (sender, None),
    };
    let parse_options = ParseOptions {
        zone: options.zone,
        tag_separator: options.tag_separator,
        date_formats: options.mapping.date_formats.clone(),
    };
    let fingerprints = kind.fingerprints().zip(columns.as_ref());
    let fingerprinter = fingerprints.as_ref().map(|(f, columns)| {
        // Everything besides a record's fields that decides what it becomes.
        Fingerprinter::new(&format!(
            "{}\n{}\n{columns:?}\n{value_map:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            K::NAME,
            f.settings,
            options.mapping,
            options.encoding,
            options.zone,
            options.tag_separator
        ))
    });
    // Records are skipped by their fingerprint only where each key comes once (see
    // `UnchangedSkip`), and not on an initial load, which starts from an empty table.
    let skip = match (fingerprints, repeated, K::KEY_FIELD) {
        (Some((f, columns)), Some(repeated), Some(key_field)) if !options.initial_load => {
            match columns.positions[key_field] {
                Some(key_column) => Some(UnchangedSkip::new(
                    f.lookup,
                    db::get(pool)?,
                    key_column,
                    repeated,
                    options.mode != Mode::Batched,
                )),
                None => None,
            }
        }
        _ => None,
    };
    let settings = ReadSettings {
        encoding: options.encoding,
        batch_size: options.batch_size.max(1),
        max_field_size: options.max_field_size,
        from_stdin: matches!(options.input, Input::Stdin),
        start,
        fingerprinter,
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
                skip,
                &sender,
                &reader_progress,
            )
        })
    });
    Ok(Pipeline {
        receiver: Mutex::new(receiver),
        reader,
        prefetch,
        verbose: options.verbose,
    })
}

/// Runs the batch loop as the mode says: batch by batch, in one transaction, or in one that is
/// rolled back. A max-rejects abort or a signal rolls an atomic import back too.
fn drive(
    mode: Mode,
    conn: &mut PgConnection,
    process: &mut dyn FnMut(&mut PgConnection) -> anyhow::Result<LoopEnd>,
) -> anyhow::Result<LoopEnd> {
    match mode {
        Mode::Batched => process(conn),
        Mode::Atomic => {
            let mut unclean_end = None;
            let committed = conn.transaction(|c| {
                one_transaction_mode(c)?;
                let end = process(c)?;
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
                one_transaction_mode(c)?;
                outcome = Some(process(c));
                Err(anyhow::anyhow!("dry run: rolled back"))
            });
            outcome.expect("the transaction ran")
        }
    }
}

/// For a whole import in one transaction. On Citus a transaction that has written tickets on
/// many shards at once may not write the users, organizations or tags (reference tables that
/// tickets refer to) again: the next batch would fail. Sequential mode (one connection per
/// worker) allows it; elsewhere the setting is an unused placeholder.
fn one_transaction_mode(conn: &mut PgConnection) -> anyhow::Result<()> {
    diesel::connection::SimpleConnection::batch_execute(
        conn,
        "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'",
    )?;
    Ok(())
}

/// How the import ended, as recorded in its operation.
struct Ending {
    status: OperationStatus,
    message: Option<String>,
    exit_code: i32,
    stop_reason: &'static str,
}

impl Ending {
    fn of(result: &anyhow::Result<LoopEnd>, mode: Mode) -> Ending {
        let rolled_back = mode == Mode::Atomic;
        let unless_rolled_back = |status| {
            if rolled_back {
                OperationStatus::RolledBack
            } else {
                status
            }
        };
        match result {
            Err(e) => Ending {
                status: unless_rolled_back(OperationStatus::Failed),
                message: Some(crate::exit::error_text(e)),
                exit_code: exit::FAILURE,
                stop_reason: "error",
            },
            Ok(LoopEnd { abort: Some(msg), .. }) => Ending {
                status: unless_rolled_back(OperationStatus::Failed),
                message: Some(msg.clone()),
                exit_code: exit::FAILURE,
                stop_reason: "max-rejects",
            },
            Ok(LoopEnd { signal: Some(code), .. }) => Ending {
                status: unless_rolled_back(OperationStatus::Interrupted),
                message: Some(format!("stopped by {}", StopFlags::signal_name(*code))),
                exit_code: *code,
                stop_reason: "signal",
            },
            Ok(_) => Ending {
                status: OperationStatus::Succeeded,
                message: None,
                exit_code: exit::SUCCESS,
                stop_reason: "done",
            },
        }
    }
}

/// The notes for stderr and the command's result: the exit code, or the error with what
/// stays of the import.
fn conclude(
    result: anyhow::Result<LoopEnd>,
    report: &ImportReport,
    mode: Mode,
    op_id: i64,
    exit_code: i32,
    end_not_recorded: Option<String>,
) -> (Vec<String>, anyhow::Result<i32>) {
    let mut notes = Vec::new();
    if let Some(note) = &end_not_recorded {
        notes.push(format!("warning: {note}"));
    }
    let result = match result {
        Err(e) => {
            let what_stays = match mode {
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
                let what_stays = if mode == Mode::Atomic {
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
    (notes, result)
}
