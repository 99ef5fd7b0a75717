//! The writer side of the pipeline: each batch deduplicated (the last occurrence of a key
//! wins), written in one transaction with its checkpoint and rejects, retried when it lost a
//! race; and the read-ahead thread that fetches what the next batch needs meanwhile.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Instant;

use diesel::{Connection, PgConnection};

use crate::db::{self, BatchTimeouts};
use crate::job;
use crate::operation;
use crate::output;
use crate::signals::StopFlags;
use rejects::{RejectTally, RejectsWriter};

use super::reader::{Batch, BatchResult};
use super::*;

/// How the batch loop ended when it did not fail.
#[derive(Debug, Default)]
pub(super) struct LoopEnd {
    /// `--max-rejects` was exceeded.
    pub(super) abort: Option<String>,
    /// A signal asked us to stop (its exit code).
    pub(super) signal: Option<i32>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn process_batches<K: ImportKind>(
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
        let (batch_counts, batch_tally) = write_batch(
            conn,
            op_id,
            batch?,
            kind,
            options,
            repeated,
            rejects,
            (counts, tally),
            committed_rejects,
        )?;
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

/// Writes one batch from the reader in its own transaction (batched mode) with its rejects
/// and checkpoint, retrying it with backoff when it lost a race; returns the counts and the
/// tally with it. Everything a batch writes, the rejects file included, is undone when its
/// transaction rolls back: the file is cut back to the length recorded with the last
/// committed batch.
#[allow(clippy::too_many_arguments)]
fn write_batch<K: ImportKind>(
    conn: &mut PgConnection,
    op_id: i64,
    mut batch: Batch<K::Row, K::Prefetched>,
    kind: &mut K,
    options: &ImportOptions,
    repeated: Option<&HashMap<u64, scan::LastOccurrence>>,
    rejects: &mut RejectsWriter,
    (counts, tally): (&Counts, &RejectTally),
    committed_rejects: &mut u64,
) -> anyhow::Result<(Counts, RejectTally)> {
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
    let rows = dedupe::<K>(batch.rows, repeated, &mut base_counts);
    let reader_rejects = batch.rejects;
    let batched = options.mode == Mode::Batched;

    // Everything a batch writes, the rejects file included, is undone when its transaction
    // rolls back: the file is cut back to the length recorded with the last committed batch.
    let write = |conn: &mut PgConnection,
                 rows: &[Numbered<K::Row>],
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
    loop {
        let mut batch_counts = base_counts;
        let mut batch_tally = tally.clone();
        let retry_left = batched && attempt < options.retries;
        let mut write_this = |conn: &mut PgConnection| {
            write(
                conn,
                &rows,
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
                return Ok((batch_counts, batch_tally));
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
/// distributed table are found first and then tried shard by shard. `None` when the lookup
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
    // The ticket id each distributed table is spread by.
    let ticket_column = match table {
        "tickets" if layout.distributed() => Some("id"),
        "comments" if layout.distributed() => Some("ticket_id"),
        _ => None,
    };
    let mut held = None;
    let _ = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let (all, free): (Vec<String>, Vec<String>) = if let Some(ticket_column) = ticket_column {
            let placed: Vec<Placed> = diesel::sql_query(format!(
                "SELECT {ticket_column} AS ticket_id, {column}::text AS key FROM {table} WHERE {column} = ANY($1)"
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
pub(super) fn prefetch_batches<K: ImportKind>(
    mut fetch: Prefetcher<K::Row, K::Prefetched>,
    mut conn: db::PooledConn,
    timeouts: BatchTimeouts,
    input: mpsc::Receiver<BatchResult<K>>,
    output: mpsc::SyncSender<BatchResult<K>>,
) -> std::time::Duration {
    let mut busy = std::time::Duration::ZERO;
    // On Citus, a batch's read reaches several shards of each worker over several connections;
    // Citus keeps one a worker between transactions and opened and closed the others at every
    // batch (a third of a re-import's read time). This session keeps them. Elsewhere the
    // setting is an unused placeholder.
    let _ =
        diesel::connection::SimpleConnection::batch_execute(&mut *conn, "SET citus.max_cached_conns_per_worker TO 4");
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
