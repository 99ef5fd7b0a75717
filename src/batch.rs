//! The batch loop of the cron-safe commands (cleanup, restore): each batch is one short
//! transaction with `SET LOCAL` lock and statement timeouts, transient failures (lock
//! timeout, deadlock, serialization failure) are retried with backoff, and the run stops
//! cleanly on a signal, `--max-runtime` or `--max-rows`, saying why.

use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::db::{self, BatchTimeouts};
use crate::signals::StopFlags;

/// Batching flags shared by the cleanup commands.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Rows per batch transaction
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=100_000), help_heading = "Batching")]
    pub batch_size: u64,
    /// Pause between batches (e.g. 200ms, 1s) to leave room for the live application
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s", help_heading = "Batching")]
    pub sleep: Duration,
    /// Stop cleanly after this long (e.g. 30m, 2h)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Batching")]
    pub max_runtime: Option<Duration>,
    /// Stop cleanly after this many rows
    #[arg(long, value_name = "N", help_heading = "Batching")]
    pub max_rows: Option<u64>,
    /// Give up waiting for a row lock after this long (the batch is retried)
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "2s", help_heading = "Batching")]
    pub lock_timeout: Duration,
    /// Cancel a statement that runs longer than this
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "60s", help_heading = "Batching")]
    pub statement_timeout: Duration,
    /// How often a batch that hit a lock timeout, deadlock or serialization failure is retried
    #[arg(long, default_value_t = 5, help_heading = "Batching")]
    pub retries: u32,
}

impl BatchArgs {
    pub fn timeouts(&self) -> BatchTimeouts {
        BatchTimeouts {
            lock_timeout: self.lock_timeout,
            statement_timeout: self.statement_timeout,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_size": self.batch_size,
            "sleep_ms": self.sleep.as_millis() as u64,
            "max_runtime_s": self.max_runtime.map(|d| d.as_secs()),
            "max_rows": self.max_rows,
            "lock_timeout_ms": self.lock_timeout.as_millis() as u64,
            "statement_timeout_ms": self.statement_timeout.as_millis() as u64,
        })
    }
}

/// `500ms`, `2s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let (number, unit) = match v.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {value:?} (use e.g. 500ms, 2s, 5m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("not a duration: {value:?} (use e.g. 500ms, 2s, 5m, 1h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {value:?}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{value:?} is too long a duration"))
}

/// A lock or statement timeout: PostgreSQL takes whole milliseconds up to 2^31 - 1 (about
/// 24 days), and reads 0 as "wait forever", which is never what a bulk job on a live
/// database wants; so 0 and anything under a millisecond are refused.
pub fn parse_timeout(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration < Duration::from_millis(1) {
        return Err(format!(
            "{value:?} would mean \"wait forever\" to PostgreSQL; give at least 1ms (e.g. 1ms to barely wait)"
        ));
    }
    if duration.as_millis() > i32::MAX as u128 {
        return Err(format!("{value:?} is longer than PostgreSQL allows (24 days)"));
    }
    Ok(duration)
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

/// Whether a database error is worth retrying: the batch lost a race with another
/// transaction, and a moment later it will likely win.
pub fn is_transient(err: &anyhow::Error) -> bool {
    let text = format!("{err:#}");
    text.contains("lock timeout")
        || text.contains("deadlock detected")
        || text.contains("could not serialize access")
        || text.contains("could not obtain lock")
}

/// How long to wait before retry `attempt` (1, 2, …) of a batch: 200 ms doubling, at most 6.4 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 * (1 << attempt.min(6)))
}

/// Runs `step` in batches until it reports done or a limit or signal stops the run. `step`
/// gets the row limit for this batch and runs inside the batch's transaction; it must be
/// safe to call again after a rolled-back attempt.
pub fn run(
    conn: &mut PgConnection,
    args: &BatchArgs,
    stop: &StopFlags,
    verbose: bool,
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
            Some(max) => args.batch_size.min(max - stats.rows),
            None => args.batch_size,
        };
        let mut attempt = 0;
        let outcome = loop {
            let batch_started = Instant::now();
            let result = db::in_batch_transaction(conn, args.timeouts(), |c| step(c, limit));
            let took = batch_started.elapsed();
            match result {
                Err(err) if is_transient(&err) && attempt < args.retries => {
                    attempt += 1;
                    stats.retries += 1;
                    let backoff = backoff(attempt);
                    if verbose {
                        eprintln!(
                            "batch {}: {err:#}; retry {attempt} in {} ms",
                            stats.batches + 1,
                            backoff.as_millis()
                        );
                    }
                    std::thread::sleep(backoff);
                }
                other => break other.map(|s| (s, took)),
            }
        };
        match outcome {
            Ok((s, took)) => {
                if s.rows > 0 || !s.done {
                    stats.batches += 1;
                    stats.rows += s.rows;
                    stats.longest_batch = stats.longest_batch.max(took);
                    if verbose {
                        eprintln!(
                            "batch {}: {} rows in {} ms ({} in all)",
                            stats.batches,
                            s.rows,
                            took.as_millis(),
                            stats.rows
                        );
                    }
                }
                if s.done {
                    stats.stopped = StopReason::Done;
                    break;
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
        if !args.sleep.is_zero() {
            std::thread::sleep(args.sleep);
        }
    }
    stats.elapsed = started.elapsed();
    stats
}

/// Records the end of a batched operation, prints its summary (a human line on stderr, one
/// JSON line on stdout with --json) and returns the exit code.
pub fn finish(
    ctx: &crate::cli::Context,
    conn: &mut PgConnection,
    op_id: i64,
    kind: &str,
    stats: RunStats,
    mut counts: serde_json::Value,
) -> anyhow::Result<i32> {
    use crate::models::OperationStatus;
    let (status, code) = match stats.stopped {
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
        (Some(err), _) => format!("{err:#}"),
        (None, StopReason::Signal(code)) => format!("stopped by {}", StopFlags::signal_name(code)),
        (None, reason) => format!("stopped: {}", reason.as_str()),
    };
    // On a fresh connection when the job's own one is gone; failing that, the job's own
    // error stays the one reported and the next command marks the operation abandoned.
    let end_not_recorded =
        crate::operation::record_end(conn, ctx.database_url()?, op_id, status, &counts, Some(&message))
            .err()
            .map(|err| {
                format!("{err:#}; the next ticketops command that reads operations marks operation {op_id} abandoned")
            });
    let mut summary = serde_json::json!({
        "operation_id": op_id,
        "kind": kind,
        "status": status.as_str(),
        "stopped": stats.stopped.as_str(),
        "duration_ms": stats.elapsed.as_millis() as u64,
        "dry_run": false,
    });
    if let (Some(s), Some(c)) = (summary.as_object_mut(), counts.as_object()) {
        s.extend(c.clone());
        if let Some(err) = &stats.error {
            s.insert("error".into(), format!("{err:#}").into());
        }
    }
    ctx.info(format!(
        "{kind}: {} — {} rows in {} batches, {:.1} s (longest batch {} ms), stopped: {}; operation {op_id}",
        status.as_str(),
        stats.rows,
        stats.batches,
        stats.elapsed.as_secs_f64(),
        stats.longest_batch.as_millis(),
        stats.stopped.as_str()
    ));
    if ctx.global.json {
        ctx.print_json(&summary)?;
    }
    if let Some(note) = &end_not_recorded {
        eprintln!("warning: {note}");
    }
    if let Some(err) = stats.error {
        return Err(err.context(format!(
            "{kind} failed; batches committed before it stay (operation {op_id})"
        )));
    }
    if let Some(note) = end_not_recorded {
        anyhow::bail!("{kind} finished, but {note}");
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0.5ms").is_err());
        assert!(parse_timeout("30d").is_err());
        assert_eq!(parse_timeout("1ms").unwrap(), Duration::from_millis(1));
    }
}
