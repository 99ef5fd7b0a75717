//! The batch-job runner every batched command uses (cleanup, restore, fixes, merge-users,
//! undo): take the job's advisory lock (exit 75 when another run holds it), install the signal
//! handlers, record the operation, then run batches — each one short transaction with `SET
//! LOCAL` lock and statement timeouts, transient failures (lock timeout, deadlock,
//! serialization failure) retried with backoff, a clean stop on a signal, `--max-runtime` or
//! `--max-rows` — and record the end. It returns a [`JobSummary`]; the command prints it.

use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::db::{self, AdvisoryLock, BatchTimeouts, Pool};
use crate::models::OperationStatus;
use crate::operation;
use crate::output::Watch;
use crate::signals::StopFlags;

/// How a job's batches run, as plain values (the command line's `BatchArgs` give them).
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Rows per batch; with `batch_time`, the first batch's and the largest.
    pub batch_size: u64,
    /// Resize the batches so that each takes about this long (`--batch-time`).
    pub batch_time: Option<Duration>,
    pub sleep: Duration,
    pub max_runtime: Option<Duration>,
    pub max_rows: Option<u64>,
    pub timeouts: BatchTimeouts,
    pub retries: u32,
}

impl BatchSettings {
    /// What is recorded in `bulk_operations.args`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_size": self.batch_size,
            "batch_time_ms": self.batch_time.map(|d| d.as_millis() as u64),
            "sleep_ms": self.sleep.as_millis() as u64,
            "max_runtime_s": self.max_runtime.map(|d| d.as_secs()),
            "max_rows": self.max_rows,
            "lock_timeout_ms": self.timeouts.lock_timeout.as_millis() as u64,
            "statement_timeout_ms": self.timeouts.statement_timeout.as_millis() as u64,
        })
    }
}

/// Why a run stopped: also the `stopped` key of the JSON summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Done,
    MaxRuntime,
    MaxRows,
    Signal(i32),
    Error,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Done => "done",
            StopReason::MaxRuntime => "max-runtime",
            StopReason::MaxRows => "max-rows",
            StopReason::Signal(_) => "signal",
            StopReason::Error => "error",
        }
    }
}

/// What one batch did.
pub struct Step {
    /// Rows the batch changed.
    pub rows: u64,
    /// Nothing is left to do.
    pub done: bool,
}

/// The outcome of a batch loop.
#[derive(Debug)]
pub struct RunStats {
    pub batches: u64,
    pub rows: u64,
    pub retries: u64,
    pub longest_batch: Duration,
    pub elapsed: Duration,
    pub stopped: StopReason,
    pub error: Option<anyhow::Error>,
}

/// Begins an error that is not PostgreSQL's own but means the same as its serialization
/// failures: another transaction changed what the batch had read, and trying again will do.
pub const CONCURRENT_CHANGE: &str = "changed concurrently";

/// Whether a database error is worth retrying: the batch lost a race with another
/// transaction, and a moment later it will likely win. A serialization failure is told by its
/// SQLSTATE (Diesel's one transient kind); the others by their English text, which
/// `db::MessageLanguage` keeps untranslated where the server allows.
pub fn is_transient(err: &anyhow::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    let serialization_failure = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<Error>(),
            Some(Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _))
        )
    });
    let text = format!("{err:#}");
    serialization_failure
        || text.contains("lock timeout")
        || text.contains(CONCURRENT_CHANGE)
        || text.contains("deadlock detected")
        || text.contains("could not serialize access")
        || text.contains("could not obtain lock")
}

/// How long to wait before retry `attempt` (1, 2, …) of a batch: 200 ms doubling, at most 6.4 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 * (1 << attempt.min(6)))
}

/// Runs `step` again after each transient failure ([`is_transient`]), at most `retries` times,
/// waiting [`backoff`] between and naming each retry on `watch` (`what`: "batch 3"). Returns
/// the last result, how long the attempt that gave it took, and how many retries there were.
pub fn retry_transient<T>(
    retries: u32,
    watch: &Watch,
    what: &str,
    mut step: impl FnMut() -> anyhow::Result<T>,
) -> (anyhow::Result<T>, Duration, u32) {
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        let result = step();
        let took = started.elapsed();
        match result {
            Err(err) if is_transient(&err) && attempt < retries => {
                attempt += 1;
                let backoff = backoff(attempt);
                watch.line(format!(
                    "{what}: {err:#}; retry {attempt} in {} ms",
                    backoff.as_millis()
                ));
                std::thread::sleep(backoff);
            }
            other => return (other, took, attempt),
        }
    }
}

/// The fewest rows a batch is shrunk to by `--batch-time`: below that, a batch's time is
/// mostly its transaction's fixed cost, and smaller batches would not be shorter.
const MIN_ADAPTED_BATCH: u64 = 100;

/// The size of the next batch under `--batch-time`: the last one's scaled by how far its time
/// was from the target — shrunk at once (to a tenth at most), grown at most twofold (one quick
/// batch is no proof) — within [`MIN_ADAPTED_BATCH`] and `max`, like pt-online-schema-change's
/// `--chunk-time`.
pub fn next_batch_size(last: u64, took: Duration, target: Duration, max: u64) -> u64 {
    let factor = (target.as_secs_f64() / took.as_secs_f64().max(1e-6)).clamp(0.1, 2.0);
    ((last as f64 * factor).round() as u64).clamp(MIN_ADAPTED_BATCH.min(max), max)
}

/// Runs `step` in batches until it reports done or a limit or signal stops the run. `step`
/// gets the row limit for this batch and runs inside the batch's transaction; it must be
/// safe to call again after a rolled-back attempt.
pub fn run_batches(
    conn: &mut PgConnection,
    args: &BatchSettings,
    stop: &StopFlags,
    watch: &Watch,
    mut step: impl FnMut(&mut PgConnection, u64) -> anyhow::Result<Step>,
) -> RunStats {
    let started = Instant::now();
    let mut stats = RunStats {
        batches: 0,
        rows: 0,
        retries: 0,
        longest_batch: Duration::ZERO,
        elapsed: Duration::ZERO,
        stopped: StopReason::Done,
        error: None,
    };
    let mut batch_size = args.batch_size;
    loop {
        if let Some(code) = stop.requested() {
            stats.stopped = StopReason::Signal(code);
            break;
        }
        if args.max_runtime.is_some_and(|max| started.elapsed() >= max) {
            stats.stopped = StopReason::MaxRuntime;
            break;
        }
        let limit = match args.max_rows {
            Some(max) if stats.rows >= max => {
                stats.stopped = StopReason::MaxRows;
                break;
            }
            Some(max) => batch_size.min(max - stats.rows),
            None => batch_size,
        };
        let (outcome, took, attempt) =
            retry_transient(args.retries, watch, &format!("batch {}", stats.batches + 1), || {
                db::in_batch_transaction(conn, args.timeouts, |c| step(c, limit))
            });
        stats.retries += u64::from(attempt);
        match outcome {
            Ok(s) => {
                if s.rows > 0 || !s.done {
                    stats.batches += 1;
                    stats.rows += s.rows;
                    stats.longest_batch = stats.longest_batch.max(took);
                    watch.advance(s.rows, stats.rows, started);
                    let of_total = watch.total.map(|t| format!(" of {t}")).unwrap_or_default();
                    watch.line(format!(
                        "batch {}: {} rows in {} ms ({}{of_total} in all, {:.0} rows/s)",
                        stats.batches,
                        s.rows,
                        took.as_millis(),
                        stats.rows,
                        crate::output::rate(stats.rows, started.elapsed())
                    ));
                }
                if s.done {
                    stats.stopped = StopReason::Done;
                    break;
                }
                // Measured by the rows asked for: the work a batch does (rows locked, compared,
                // skipped) follows its limit more closely than the rows it changed.
                if let Some(target) = args.batch_time
                    && limit == batch_size
                {
                    batch_size = next_batch_size(limit, took, target, args.batch_size);
                }
            }
            Err(err) => {
                stats.stopped = StopReason::Error;
                stats.error = Some(crate::db::name_lost_connection(
                    err.context(format!("batch {} failed (after {attempt} retries)", stats.batches + 1)),
                ));
                break;
            }
        }
        stop.sleep(args.sleep);
    }
    watch.progress.finish_and_clear();
    stats.elapsed = started.elapsed();
    stats
}

/// A started job: its lock (held until the job is dropped), its signal flags and its
/// operation record.
pub struct Job {
    pub kind: String,
    pub operation_id: i64,
    pub stop: StopFlags,
    url: String,
    _lock: AdvisoryLock,
}

impl Job {
    /// Takes the advisory lock named `kind` (another holder: exit 75, nothing done), installs
    /// the signal handlers and records the operation as running on `conn`.
    pub fn start(
        pool: &Pool,
        url: &str,
        conn: &mut PgConnection,
        kind: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<Job> {
        let lock = AdvisoryLock::try_acquire(pool, kind)?;
        let stop = StopFlags::install()?;
        let operation_id = operation::start_job(conn, kind, args)?;
        Ok(Job {
            kind: kind.to_string(),
            operation_id,
            stop,
            url: url.to_string(),
            _lock: lock,
        })
    }

    /// Runs the job's batches (see [`run_batches`]).
    pub fn run(
        &self,
        conn: &mut PgConnection,
        settings: &BatchSettings,
        watch: &Watch,
        step: impl FnMut(&mut PgConnection, u64) -> anyhow::Result<Step>,
    ) -> RunStats {
        run_batches(conn, settings, &self.stop, watch, step)
    }

    /// Records the end of the operation — on a fresh connection when the job's own one is
    /// gone; failing that, the job's own error stays the one reported and the next command
    /// marks the operation abandoned — and returns what to report. `counts` are the job's own
    /// (`soft_deleted`, `purged`, …).
    pub fn finish(self, conn: &mut PgConnection, stats: RunStats, mut counts: serde_json::Value) -> JobSummary {
        let (status, exit_code) = match stats.stopped {
            StopReason::Done | StopReason::MaxRuntime | StopReason::MaxRows => {
                (OperationStatus::Succeeded, crate::exit::SUCCESS)
            }
            StopReason::Signal(code) => (OperationStatus::Interrupted, code),
            StopReason::Error => (OperationStatus::Failed, crate::exit::FAILURE),
        };
        if let Some(obj) = counts.as_object_mut() {
            obj.insert("rows".into(), stats.rows.into());
            obj.insert("batches".into(), stats.batches.into());
            obj.insert("retries".into(), stats.retries.into());
            obj.insert(
                "longest_batch_ms".into(),
                (stats.longest_batch.as_millis() as u64).into(),
            );
        }
        let message = match (&stats.error, stats.stopped) {
            (Some(err), _) => crate::exit::error_text(err),
            (None, StopReason::Signal(code)) => format!("stopped by {}", StopFlags::signal_name(code)),
            (None, reason) => format!("stopped: {}", reason.as_str()),
        };
        let op_id = self.operation_id;
        let end_not_recorded = operation::record_end(conn, &self.url, op_id, status, &counts, Some(&message))
            .err()
            .map(|err| {
                format!("{err:#}; the next ticketops command that reads operations marks operation {op_id} abandoned")
            });
        let mut json = serde_json::json!({
            "operation_id": op_id,
            "kind": self.kind,
            "status": status.as_str(),
            "stopped": stats.stopped.as_str(),
            "duration_ms": stats.elapsed.as_millis() as u64,
            "dry_run": false,
            // Stopped at --max-runtime or --max-rows: the next run goes on where this one stopped.
            "more_to_do": matches!(stats.stopped, StopReason::MaxRuntime | StopReason::MaxRows),
        });
        if let (Some(s), Some(c)) = (json.as_object_mut(), counts.as_object()) {
            s.extend(c.clone());
            if let Some(err) = &stats.error {
                s.insert("error".into(), crate::exit::error_text(err).into());
            }
        }
        JobSummary {
            kind: self.kind.clone(),
            operation_id: op_id,
            status,
            exit_code,
            json,
            end_not_recorded,
            stats,
        }
    }
}

/// How a job ended, for the command to print.
#[derive(Debug)]
pub struct JobSummary {
    pub kind: String,
    pub operation_id: i64,
    pub status: OperationStatus,
    pub exit_code: i32,
    /// The one-line JSON summary.
    pub json: serde_json::Value,
    /// Why the end could not be recorded, if it could not.
    pub end_not_recorded: Option<String>,
    pub stats: RunStats,
}

impl JobSummary {
    /// The human summary line.
    pub fn line(&self) -> String {
        let s = &self.stats;
        format!(
            "{}: {} — {} rows in {} {}, {:.1} s (longest batch {} ms), stopped: {}; operation {}",
            self.kind,
            self.status.as_str(),
            s.rows,
            s.batches,
            if s.batches == 1 { "batch" } else { "batches" },
            s.elapsed.as_secs_f64(),
            s.longest_batch.as_millis(),
            s.stopped.as_str(),
            self.operation_id
        )
    }

    /// The job's outcome as the command's result: its exit code, or its error with what stays.
    pub fn into_result(self) -> anyhow::Result<i32> {
        if let Some(err) = self.stats.error {
            return Err(err.context(format!(
                "{} failed; batches committed before it stay (operation {})",
                self.kind, self.operation_id
            )));
        }
        if let Some(note) = self.end_not_recorded {
            anyhow::bail!("{} finished, but {note}", self.kind);
        }
        Ok(self.exit_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn transient_errors_by_sqlstate_or_english_text() {
        use diesel::result::{DatabaseErrorKind, Error};
        let database = |kind, message: &str| {
            anyhow::Error::from(Error::DatabaseError(kind, Box::new(message.to_string())))
                .context("cannot merge changed tickets")
        };
        let german = "konnte Zugriff nicht serialisieren wegen Lese/Schreib-Abhängigkeiten zwischen Transaktionen";
        assert!(is_transient(&database(DatabaseErrorKind::SerializationFailure, german)));
        assert!(is_transient(&database(
            DatabaseErrorKind::Unknown,
            "canceling statement due to lock timeout"
        )));
        assert!(is_transient(&database(DatabaseErrorKind::Unknown, "deadlock detected")));
        assert!(!is_transient(&database(
            DatabaseErrorKind::UniqueViolation,
            "duplicate key value violates unique constraint"
        )));
        assert!(!is_transient(&database(
            DatabaseErrorKind::Unknown,
            "canceling statement due to statement timeout"
        )));
    }

    #[test]
    fn a_slow_batch_shrinks_the_next_at_once_and_a_quick_one_grows_it_at_most_twofold() {
        assert_eq!(next_batch_size(5000, MS(500), MS(250), 5000), 2500);
        assert_eq!(
            next_batch_size(5000, MS(100_000), MS(250), 5000),
            500,
            "a tenth at most"
        );
        assert_eq!(next_batch_size(1000, MS(125), MS(250), 5000), 2000);
        assert_eq!(next_batch_size(1000, MS(1), MS(250), 5000), 2000, "twofold at most");
        assert_eq!(next_batch_size(1000, MS(250), MS(250), 5000), 1000);
    }

    #[test]
    fn an_adapted_batch_stays_within_100_rows_and_the_batch_size() {
        assert_eq!(next_batch_size(4000, MS(10), MS(250), 5000), 5000);
        assert_eq!(next_batch_size(150, MS(1000), MS(250), 5000), 100);
        assert_eq!(
            next_batch_size(30, MS(1000), MS(250), 30),
            30,
            "a batch size under 100 is kept"
        );
        assert_eq!(next_batch_size(100, Duration::ZERO, MS(250), 5000), 200);
    }
}
