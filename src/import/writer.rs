//! The writer side of the pipeline: each batch deduplicated (the last occurrence of a key
//! wins), written in one transaction with its checkpoint and rejects, retried when it lost a
//! race; and the read-ahead thread that fetches what the next batch needs meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};

use crate::db::{self, BatchTimeouts};
use crate::job;
use crate::operation;
use crate::output;
use crate::signals::StopFlags;
use rejects::{RejectTally, RejectsWriter};

use super::reader::{Batch, BatchResult};
use super::*;
use source::Position;

/// How the batch loop ended when it did not fail.
#[derive(Debug, Default)]
pub(super) struct LoopEnd {
    /// `--max-rejects` was exceeded.
    pub(super) abort: Option<String>,
    /// A signal asked us to stop (its exit code).
    pub(super) signal: Option<i32>,
}

/// What the batches have committed so far, shared by the writers under one lock: the sums of
/// their counts and rejects, the rejects file, and how far the input is done. A batch takes
/// the lock to write its rejects and checkpoint and keeps it through its COMMIT, so that the
/// file can be cut back to the committed length when the COMMIT fails.
pub(super) struct Committed {
    pub(super) rejects: RejectsWriter,
    pub(super) batch_size: usize,
    pub(super) state: CommittedState,
    /// When a batch last saved the checkpoint (see [`CHECKPOINT_AT_LEAST_EVERY`]).
    pub(super) checkpoint_saved: Instant,
}

/// A batch that wrote no row and rejected none saves no checkpoint unless this long has passed
/// since one was last saved: on Citus every checkpoint is a write to a reference table, a
/// two-phase commit over all nodes each batch (measured: a quarter of an unchanged re-import's
/// time there). Nothing is lost: the next checkpoint records the batches committed before it,
/// and a `--resume` reads again what the last one does not cover — batches that change nothing.
const CHECKPOINT_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// What is committed, as a batch's checkpoint records it.
#[derive(Clone, Default)]
pub(super) struct CommittedState {
    pub(super) counts: Counts,
    pub(super) tally: RejectTally,
    /// The rejects file's length with the last committed batch.
    pub(super) rejects_bytes: u64,
    /// The end of the committed prefix of the input.
    pub(super) prefix: Position,
    /// Batches committed beyond the prefix: the record each starts after → its end.
    pub(super) done: BTreeMap<u64, Position>,
}

impl CommittedState {
    /// Whether the batch that starts at `start` is committed: one the run this one resumes
    /// committed beyond its prefix, before or after this run's batches joined them to it.
    fn has(&self, start: Position) -> bool {
        start.record < self.prefix.record || self.done.contains_key(&start.record)
    }

    /// This state with one more batch, from `start` to `end`, with its counts and tally, and
    /// the rejects file now `rejects_bytes` long.
    fn with_batch(
        &self,
        (start, end): (Position, Position),
        counts: &Counts,
        tally: &RejectTally,
        rejects_bytes: u64,
    ) -> CommittedState {
        let mut next = self.clone();
        next.counts.add(counts);
        next.tally.merge(tally);
        next.rejects_bytes = rejects_bytes;
        next.done.insert(start.record, end);
        while let Some(end) = next.done.remove(&next.prefix.record) {
            next.prefix = end;
        }
        next
    }
}

/// The order in which batches resolve their users, organizations and tags (see
/// `ImportKind::resolve`): batch `n` waits until batch `n - 1` has. A writer that stops sets
/// `halted`, so that no one waits for a batch that will not come.
#[derive(Default)]
struct Turns {
    next: Mutex<Next>,
    changed: Condvar,
    halted: AtomicBool,
}

/// The batch whose turn it is, and the later ones that already passed out of turn.
#[derive(Default)]
struct Next {
    seq: u64,
    passed_early: std::collections::BTreeSet<u64>,
}

impl Turns {
    /// Waits for batch `seq`'s turn; false when the import is stopping: another writer halted
    /// it, or `stopping` (a signal) says so — looked at every 100 ms, so that a turn that does
    /// not come (as one once did not, see `pass`) cannot keep SIGTERM from ending the import.
    fn wait(&self, seq: u64, stopping: impl Fn() -> bool) -> bool {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if next.seq >= seq {
                return true;
            }
            if self.halted.load(Ordering::SeqCst) || stopping() {
                return false;
            }
            next = self
                .changed
                .wait_timeout(next, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Batch `seq` has resolved (or will not): the next may. A batch may pass before its turn
    /// — one that a resumed import skips, committed by the run it resumes, passes as soon as a
    /// writer takes it — and is remembered until its turn comes: forgotten, the turn stopped
    /// there and every writer waited for ever (seen once, a `--resume --jobs 2` after a kill).
    fn pass(&self, seq: u64) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if seq >= next.seq {
            next.passed_early.insert(seq);
        }
        loop {
            let seq = next.seq;
            if !next.passed_early.remove(&seq) {
                break;
            }
            next.seq = seq + 1;
        }
        self.changed.notify_all();
    }

    fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
        let _guard = self.next.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    fn halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }
}

/// What every writer reads.
pub(super) struct WriterShared<'a, K: ImportKind> {
    pub(super) op_id: i64,
    pub(super) receiver: &'a Mutex<mpsc::Receiver<BatchResult<K>>>,
    pub(super) options: &'a ImportOptions,
    pub(super) repeated: Option<&'a scan::Repeated>,
    pub(super) committed: &'a Mutex<Committed>,
    pub(super) stop: &'a StopFlags,
    pub(super) progress: &'a indicatif::ProgressBar,
}

/// Writes the batches from the reader until the input ends, a writer fails, too many rows
/// are rejected or a signal asks to stop: on `conn` with `kind`, and on each of `more` (other
/// connections with their own writers) at the same time.
pub(super) fn process_batches<K: ImportKind>(
    conn: &mut PgConnection,
    kind: &mut K,
    more: Vec<(db::PooledConn, K)>,
    shared: &WriterShared<'_, K>,
) -> anyhow::Result<LoopEnd> {
    let options = shared.options;
    if options.mode != Mode::Batched {
        // One transaction for the whole import: the timeouts hold for what `begin` does (an
        // initial load locks whole tables) as well as for every batch.
        db::set_local_timeouts(conn, options.timeouts)?;
    }
    let started = Instant::now();
    let turns = Turns::default();
    let writers = more.len() + 1;
    let results: Vec<(anyhow::Result<LoopEnd>, Duration)> = std::thread::scope(|scope| {
        let turns = &turns;
        let handles: Vec<_> = more
            .into_iter()
            .enumerate()
            .map(|(i, (mut conn, mut kind))| {
                scope.spawn(move || write_batches(&mut conn, &mut kind, (i + 1, writers), shared, turns, started))
            })
            .collect();
        let mut results = vec![write_batches(conn, kind, (0, writers), shared, turns, started)];
        results.extend(handles.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| (Err(anyhow::anyhow!("a writer thread panicked")), Duration::ZERO))
        }));
        results
    });
    let mut end = LoopEnd::default();
    for (i, (result, waited)) in results.into_iter().enumerate() {
        if options.verbose {
            let who = if writers > 1 {
                format!("writer {}: ", i + 1)
            } else {
                String::new()
            };
            eprintln!(
                "{who}waited {:.2} s for the reader (parsing, validation, read-ahead) in {:.2} s of writing",
                waited.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
        let this = result?;
        end.abort = end.abort.or(this.abort);
        end.signal = end.signal.or(this.signal);
    }
    if end.abort.is_some() || end.signal.is_some() {
        return Ok(end);
    }
    let counts = lock(shared.committed).state.counts;
    if let Some(limit) = options.max_rejects
        && limit.exceeded(counts.rejected, counts.rows_read, true)
    {
        end.abort = Some(format!(
            "too many rejected rows: {} of {} read, over --max-rejects",
            counts.rejected, counts.rows_read
        ));
    }
    Ok(end)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One writer's loop: takes the next batch from the reader and writes it, until there are
/// none or the import stops. Returns how it ended and how long it waited for batches.
fn write_batches<K: ImportKind>(
    conn: &mut PgConnection,
    kind: &mut K,
    (writer, writers): (usize, usize),
    shared: &WriterShared<'_, K>,
    turns: &Turns,
    started: Instant,
) -> (anyhow::Result<LoopEnd>, Duration) {
    let mut waited = Duration::ZERO;
    let result = (|| {
        kind.begin(conn, shared.op_id)?;
        loop {
            if turns.halted() {
                // Another writer stopped the import; its reason is the one reported.
                return Ok(LoopEnd::default());
            }
            let wait_started = Instant::now();
            let next = lock(shared.receiver).recv();
            waited += wait_started.elapsed();
            let Ok(batch) = next else { break };
            let batch = batch?;
            let seq = batch.seq;
            if lock(shared.committed).state.has(batch.start) {
                // Committed by the run this one resumes.
                turns.pass(seq);
                continue;
            }
            let written = write_batch(conn, batch, kind, shared, turns, writers > 1);
            turns.pass(seq);
            if !written? {
                // Stopped before the batch's turn: by a signal (reported like any other stop
                // between batches), or by another writer, whose reason is the one reported.
                return Ok(LoopEnd {
                    abort: None,
                    signal: shared.stop.requested(),
                });
            }
            let counts = lock(shared.committed).state.counts;
            shared.progress.set_message(format!(
                "{} rows, {:.0} rows/s",
                counts.rows_read,
                output::rate(counts.rows_read, started.elapsed())
            ));
            if let Some(limit) = shared.options.max_rejects
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
            if let Some(code) = shared.stop.requested() {
                return Ok(LoopEnd {
                    abort: None,
                    signal: Some(code),
                });
            }
        }
        if writer == 0 {
            shared.progress.set_prefix("finishing");
        }
        kind.end(conn)?;
        Ok(LoopEnd::default())
    })();
    if !matches!(&result, Ok(end) if end.abort.is_none() && end.signal.is_none()) {
        turns.halt();
    }
    (result, waited)
}

/// Writes one batch from the reader in its own transaction (batched mode) with its rejects
/// and checkpoint, retrying it with backoff when it lost a race, and adds it to what is
/// committed. Everything a batch writes, the rejects file included, is undone when its
/// transaction rolls back: the file is cut back to the length recorded with the last
/// committed batch. False when the import stopped before the batch's turn came.
///
/// With one writer, what the batch needs made before it (`ImportKind::prepare`) is committed
/// first in a short transaction of its own.
///
/// With several writers (`parallel`), the batch's new users, organizations and tags are
/// committed first, in a short transaction of their own in the batch's turn: inside the
/// batch's transaction they would stay uncommitted until it ends, and the next batch that
/// names one of them would wait for that (measured: two writers slower than one on a first
/// import, where most batches bring new users). A batch that then fails leaves them in place;
/// a retry, a re-run or `--resume` finds them.
fn write_batch<K: ImportKind>(
    conn: &mut PgConnection,
    mut batch: Batch<K::Row, K::Prefetched>,
    kind: &mut K,
    shared: &WriterShared<'_, K>,
    turns: &Turns,
    parallel: bool,
) -> anyhow::Result<bool> {
    let options = shared.options;
    let op_id = shared.op_id;
    let mut prefetched = batch.prefetched.take();
    let first_line = batch
        .rows
        .first()
        .map(|r| r.line)
        .or(batch.rejects.first().map(|r| r.1))
        .unwrap_or(0);
    // This batch's own counts, added to the committed ones when it commits.
    let mut base_counts = Counts {
        rows_read: batch.rows_read,
        unchanged: batch.unchanged,
        unchanged_by_fingerprint: batch.unchanged,
        ..Counts::default()
    };
    // Within a file the last occurrence of a key wins; earlier ones are duplicates.
    let rows = dedupe::<K>(batch.rows, shared.repeated, &mut base_counts);
    let reader_rejects = batch.rejects;
    let batched = options.mode == Mode::Batched;
    // Whether the batch's users, organizations and tags are made already (see above); one
    // writer makes them inside the batch's transaction, in turn by construction.
    let mut resolved = false;
    if parallel && batched {
        if !turns.wait(batch.seq, || shared.stop.requested().is_some()) {
            return Ok(false);
        }
        let result = conn.transaction(|conn| {
            db::set_local_timeouts(conn, options.timeouts)?;
            kind.resolve(conn, &rows)
        });
        turns.pass(batch.seq);
        match result {
            Ok(()) => resolved = true,
            // Resolved again inside the batch's transaction, as a retry would.
            Err(_) => kind.reset(),
        }
    }

    let mut attempt = 0;
    loop {
        let mut batch_counts = base_counts;
        let mut batch_tally = RejectTally::default();
        let retry_left = batched && attempt < options.retries;
        let prepared = if !parallel && batched && kind.needs_preparing(&rows) {
            conn.transaction(|conn| {
                db::set_local_timeouts(conn, options.timeouts)?;
                kind.prepare(conn, &rows)
            })
        } else {
            Ok(())
        };
        // The batch's own transaction, once what it needs made is committed.
        let write = |conn: &mut PgConnection| {
            db::set_local_timeouts(conn, options.timeouts)?;
            if !std::mem::take(&mut resolved) {
                kind.resolve(conn, &rows)?;
            }
            let writer_rejects = kind.write_batch(conn, op_id, &rows, prefetched.take(), &mut batch_counts)?;
            // From here on the batch holds the lock on what is committed, through its COMMIT.
            let mut committed = lock(shared.committed);
            let written = (|| {
                for (record, line, raw, error) in &reader_rejects {
                    committed.rejects.write(raw, *record, *line, error)?;
                    batch_counts.rejected += 1;
                    batch_tally.add(&error.reason, *line);
                }
                for r in &writer_rejects {
                    committed.rejects.write(&r.raw, r.record, r.line, &r.error)?;
                    batch_counts.rejected += 1;
                    batch_tally.add(&r.error.reason, r.line);
                }
                let rejects_bytes = committed.rejects.flush()?;
                let next =
                    committed
                        .state
                        .with_batch((batch.start, batch.end), &batch_counts, &batch_tally, rejects_bytes);
                let wrote = batch_counts.inserted + batch_counts.updated + batch_counts.rejected > 0;
                if batched && (wrote || committed.checkpoint_saved.elapsed() >= CHECKPOINT_AT_LEAST_EVERY) {
                    committed.checkpoint_saved = Instant::now();
                    let checkpoint = Checkpoint {
                        position: next.prefix,
                        rejects_bytes,
                        counts: next.counts,
                        tally: next.tally.clone(),
                        done: next.done.iter().map(|(start, end)| (*start, *end)).collect(),
                        batch_size: (!next.done.is_empty()).then_some(committed.batch_size),
                    };
                    operation::save_checkpoint(
                        conn,
                        op_id,
                        &serde_json::to_value(&checkpoint)?,
                        &serde_json::to_value(next.counts)?,
                    )?;
                }
                anyhow::Ok(next)
            })();
            match written {
                Ok(next) => Ok((committed, next)),
                Err(e) => {
                    let committed_len = committed.state.rejects_bytes;
                    let _ = committed.rejects.cut_back(committed_len);
                    Err(e)
                }
            }
        };
        let result = prepared.and_then(|()| in_batch_transaction(conn, batched, write));
        let err = match result {
            Ok((mut committed, next)) => {
                committed.state = next;
                return Ok(true);
            }
            Err(err) => err,
        };
        kind.reset();
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
        let err = if batched && job::is_transient(&err) {
            name_held_rows::<K>(conn, &rows, err)
        } else {
            err
        };
        let tries = if attempt > 0 {
            format!(" (tried {} times)", attempt + 1)
        } else {
            String::new()
        };
        return Err(err.context(format!(
            "batch starting at line {first_line} of {} could not be written{tries}",
            options.input.display()
        )));
    }
}

/// Runs `work` in a transaction of its own when `batched` (else inside the import's one) and
/// commits it while what `work` returns — the lock on what is committed — is still held.
/// When the COMMIT fails, the rejects file is cut back under that same lock.
fn in_batch_transaction<'m>(
    conn: &mut PgConnection,
    batched: bool,
    work: impl FnOnce(&mut PgConnection) -> anyhow::Result<(MutexGuard<'m, Committed>, CommittedState)>,
) -> anyhow::Result<(MutexGuard<'m, Committed>, CommittedState)> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    if !batched {
        return work(conn);
    }
    AnsiTransactionManager::begin_transaction(conn)?;
    match work(conn) {
        Ok((mut committed, next)) => match AnsiTransactionManager::commit_transaction(conn) {
            Ok(()) => Ok((committed, next)),
            Err(e) => {
                let _ = AnsiTransactionManager::rollback_transaction(conn);
                let committed_len = committed.state.rejects_bytes;
                let _ = committed.rejects.cut_back(committed_len);
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = AnsiTransactionManager::rollback_transaction(conn);
            Err(e)
        }
    }
}

/// Adds to a batch's lock-timeout error which of its rows another session holds (by key).
fn name_held_rows<K: ImportKind>(
    conn: &mut PgConnection,
    rows: &[Numbered<K::Row>],
    err: anyhow::Error,
) -> anyhow::Error {
    let keys: Vec<String> = rows.iter().filter_map(|r| K::key(&r.row).map(str::to_string)).collect();
    match K::KEY_COLUMN.and_then(|(table, column)| held_keys(conn, table, column, &keys)) {
        Some(held) if !held.is_empty() => {
            let shown: Vec<&str> = held.iter().take(10).map(String::as_str).collect();
            let more = if held.len() > shown.len() { ", …" } else { "" };
            err.context(format!(
                "another session held {} of the batch's rows past --lock-timeout ({} {}{more})",
                held.len(),
                K::KEY_COLUMN.map_or("key", |(_, c)| c),
                shown.join(", ")
            ))
        }
        _ => err,
    }
}

/// Of `keys` in `table.column`, those whose rows another session holds locked now: the rows
/// that are not locked are taken with SKIP LOCKED in a transaction that is rolled back at
/// once. On Citus, which takes row locks only in one-shard statements, the rows of a
/// distributed table are found first and then tried shard by shard; where the key has no index
/// on the table itself (the tickets' on partitions, the comments' on both keyed layouts) the
/// rows are found through their key table, then taken by their tickets. `None` when the lookup
/// itself fails.
pub(super) fn held_keys(conn: &mut PgConnection, table: &str, column: &str, keys: &[String]) -> Option<Vec<String>> {
    use diesel::RunQueryDsl;
    use diesel::sql_types::{Array, BigInt, Text};
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = Text)]
        key: String,
    }
    #[derive(diesel::QueryableByName)]
    struct Placed {
        #[diesel(sql_type = BigInt)]
        ticket_id: i64,
        #[diesel(sql_type = Text)]
        key: String,
    }
    let layout = crate::layout::Layout::of(conn).ok()?;
    // On the keyed layouts: where the keys are found with their ticket's id (that column
    // there), and the column of `table` holding the ticket's id, which the rows are taken by.
    let by_ticket = match table {
        "tickets" if layout.partitioned() => Some(("ticket_keys", "ticket_id", "id")),
        "tickets" if layout.distributed() => Some(("tickets", "id", "id")),
        "comments" if layout.keyed() => Some(("comment_keys", "ticket_id", "ticket_id")),
        _ => None,
    };
    let mut held = None;
    let _ = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let (all, free): (Vec<String>, Vec<String>) =
            if let Some((keys_table, placed_ticket, ticket_column)) = by_ticket {
                let placed: Vec<Placed> = diesel::sql_query(format!(
                    "SELECT {placed_ticket} AS ticket_id, {column}::text AS key
                     FROM {keys_table} WHERE {column} = ANY($1)"
                ))
                .bind::<Array<Text>, _>(keys)
                .load(conn)?;
                let mut tickets: Vec<i64> = placed.iter().map(|p| p.ticket_id).collect();
                tickets.sort_unstable();
                tickets.dedup();
                let free = layout.lock_per_shard(conn, &tickets, |conn, tickets| {
                    diesel::sql_query(format!(
                        "SELECT {column}::text AS key FROM {table}
                         WHERE {ticket_column} = ANY($1) AND {column} = ANY($2) FOR NO KEY UPDATE SKIP LOCKED"
                    ))
                    .bind::<Array<BigInt>, _>(tickets)
                    .bind::<Array<Text>, _>(keys)
                    .load::<Key>(conn)
                })?;
                (
                    placed.into_iter().map(|p| p.key).collect(),
                    free.into_iter().map(|k| k.key).collect(),
                )
            } else {
                let select = |lock: &str| {
                    diesel::sql_query(format!(
                        "SELECT {column}::text AS key FROM {table} WHERE {column} = ANY($1) ORDER BY 1 {lock}"
                    ))
                    .bind::<Array<Text>, _>(keys)
                };
                let all: Vec<Key> = select("").load(conn)?;
                let free: Vec<Key> = select("FOR NO KEY UPDATE SKIP LOCKED").load(conn)?;
                (
                    all.into_iter().map(|k| k.key).collect(),
                    free.into_iter().map(|k| k.key).collect(),
                )
            };
        let free: std::collections::HashSet<String> = free.into_iter().collect();
        let mut still_held: Vec<String> = all.into_iter().filter(|k| !free.contains(k)).collect();
        still_held.sort();
        held = Some(still_held);
        Err(diesel::result::Error::RollbackTransaction)
    });
    held
}

/// Keeps the last row per key, in the batch and, where the file was scanned, in the whole
/// file; counts the others as duplicates.
pub(super) fn dedupe<K: ImportKind>(
    rows: Vec<Numbered<K::Row>>,
    repeated: Option<&scan::Repeated>,
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

/// The longest a read-ahead waits for a lock before it leaves the batch's lookup to the writer.
const PREFETCH_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// The prefetch thread: runs the kind's read-ahead for each batch on its own connection,
/// each in a short read-only transaction, and passes the batch on. A failed read-ahead only
/// leaves the lookup to the writer, so it never waits long for a lock
/// ([`PREFETCH_LOCK_TIMEOUT`]). When the import runs in one transaction (`one_transaction`), a
/// lock that stops it is likely the import's own, held to the end — a month the partitioned
/// layout made keeps the default partition locked, and every read through the parent waits
/// for it — so after one failure the writer does every lookup. Returns the time spent reading.
pub(super) fn prefetch_batches<K: ImportKind>(
    mut fetch: Prefetcher<K::Row, K::Prefetched>,
    mut conn: db::PooledConn,
    timeouts: BatchTimeouts,
    one_transaction: bool,
    input: mpsc::Receiver<BatchResult<K>>,
    output: mpsc::SyncSender<BatchResult<K>>,
) -> std::time::Duration {
    let timeouts = BatchTimeouts {
        lock_timeout: timeouts.lock_timeout.min(PREFETCH_LOCK_TIMEOUT),
        ..timeouts
    };
    let mut failed = false;
    let mut busy = std::time::Duration::ZERO;
    // On Citus, a batch's read reaches several shards of each worker over several connections;
    // Citus keeps one a worker between transactions and opened and closed the others at every
    // batch (a third of a re-import's read time). This session keeps them. Elsewhere the
    // setting is an unused placeholder.
    let _ =
        diesel::connection::SimpleConnection::batch_execute(&mut *conn, "SET citus.max_cached_conns_per_worker TO 4");
    for batch in input {
        let batch = batch.map(|mut batch| {
            if failed && one_transaction {
                return batch;
            }
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
            failed |= batch.prefetched.is_none();
            busy += started.elapsed();
            batch
        });
        if output.send(batch).is_err() {
            break; // the writer stopped (error or signal)
        }
    }
    busy
}

#[cfg(test)]
mod tests {
    use super::Turns;

    /// A batch that passes before its turn (a resumed import's committed batch, skipped) still
    /// counts when its turn comes: the batches after it are not kept waiting.
    #[test]
    fn a_batch_passed_before_its_turn_lets_the_next_ones_through() {
        let turns = Turns::default();
        turns.pass(1);
        turns.pass(2);
        assert!(!turns.halted());
        assert_eq!(turns.next.lock().unwrap().seq, 0, "batch 0 has not passed yet");
        turns.pass(0);
        assert_eq!(turns.next.lock().unwrap().seq, 3);
        assert!(turns.wait(3, || false));
        // Passing again, or a batch already behind, changes nothing.
        turns.pass(1);
        assert_eq!(turns.next.lock().unwrap().seq, 3);
    }

    /// A writer waiting for a turn that does not come stops when asked to.
    #[test]
    fn a_writer_waiting_for_its_turn_stops_on_a_signal() {
        let turns = Turns::default();
        let asked = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| turns.wait(5, || asked.load(std::sync::atomic::Ordering::SeqCst)));
            std::thread::sleep(std::time::Duration::from_millis(150));
            assert!(!waiter.is_finished(), "batch 5's turn has not come");
            asked.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(!waiter.join().unwrap(), "stopped, not its turn");
        });
    }
}
