//! The reader thread: records parsed and validated into batches while the writer works on the
//! previous one.

use std::sync::{Arc, mpsc};

use csv::ByteRecord;

use super::fingerprint::{Fingerprint, Fingerprinter};

use crate::output::{self};
use source::{ColumnMap, CsvSource, Encoding, Position, RecordFields, RowError, ValueMap};

use super::*;

/// What the reader thread hands to the writer (through the prefetch thread, if any).
pub(super) struct Batch<R, P> {
    /// The batch's number in this run (0, 1, …), and where the input stood before its first
    /// record.
    pub(super) seq: u64,
    pub(super) start: Position,
    pub(super) rows: Vec<Numbered<R>>,
    pub(super) rejects: Vec<(u64, u64, ByteRecord, RowError)>,
    pub(super) end: Position,
    pub(super) rows_read: u64,
    /// Records skipped because their fingerprint is the stored one: unchanged.
    pub(super) unchanged: u64,
    pub(super) prefetched: Option<P>,
}

impl<R, P> Batch<R, P> {
    fn new(seq: u64, start: Position, batch_size: usize) -> Batch<R, P> {
        Batch {
            seq,
            start,
            rows: Vec::with_capacity(batch_size),
            rejects: Vec::new(),
            end: start,
            rows_read: 0,
            unchanged: 0,
            prefetched: None,
        }
    }
}

pub(super) type BatchResult<K> = anyhow::Result<Batch<<K as ImportKind>::Row, <K as ImportKind>::Prefetched>>;

/// What the reader thread needs to know besides the rows' own fields.
pub(super) struct ReadSettings {
    pub(super) encoding: Encoding,
    pub(super) batch_size: usize,
    pub(super) max_field_size: usize,
    /// A stream can end mid-record (a broken pipe, a cut download): its last record is then
    /// rejected. A file that does not end with a line end only gets a warning.
    pub(super) from_stdin: bool,
    /// Where reading starts (a resume's checkpoint).
    pub(super) start: Position,
    /// Each record's fingerprint, for kinds that store one.
    pub(super) fingerprinter: Option<Fingerprinter>,
}

/// Skipping the records whose fingerprint is stored already (see `fingerprint`): a batch's
/// records are split and hashed, the stored fingerprints of their keys read in one query, and
/// only the others parsed. Only where every key comes once in the file (the scan saw them all):
/// an earlier occurrence of a key is a duplicate, whatever its fingerprint.
pub(super) struct UnchangedSkip {
    lookup: FingerprintLookup,
    conn: db::PooledConn,
    /// The key's column in the file.
    key_column: usize,
    repeated: Arc<scan::Repeated>,
    /// The import runs in one transaction: a lock that stops a lookup is likely the import's
    /// own, held to its end, so the first failure ends the lookups (as for the read-ahead).
    one_transaction: bool,
    /// The next batch whose fingerprints are looked up, and the gap after it.
    next_lookup: u64,
    gap: u64,
}

/// The longest run of batches read without looking up fingerprints after lookups that found
/// few (a first import, a dump where most rows changed): the lookups cost almost nothing then.
const MAX_LOOKUP_GAP: u64 = 32;

impl UnchangedSkip {
    pub(super) fn new(
        lookup: FingerprintLookup,
        conn: db::PooledConn,
        key_column: usize,
        repeated: Arc<scan::Repeated>,
        one_transaction: bool,
    ) -> UnchangedSkip {
        UnchangedSkip {
            lookup,
            conn,
            key_column,
            repeated,
            one_transaction,
            next_lookup: 0,
            gap: 1,
        }
    }

    fn due(&self, seq: u64) -> bool {
        seq >= self.next_lookup
    }

    /// After a lookup for batch `seq`: look again at the next batch while most records were
    /// skipped, else after twice the gap.
    fn schedule(&mut self, seq: u64, looked_for: usize, skipped: usize) {
        self.gap = if looked_for > 0 && skipped * 2 >= looked_for {
            1
        } else {
            (self.gap * 2).min(MAX_LOOKUP_GAP)
        };
        self.next_lookup = seq + self.gap;
    }

    /// Which of `pending` can be skipped: those whose key comes once in the file and has their
    /// fingerprint stored. A failed lookup (a lock it would not wait for) skips none and is
    /// tried again after a gap, as one that found few (in one transaction, never): the
    /// writer's comparison finds the same rows unchanged.
    fn unchanged(
        &mut self,
        seq: u64,
        pending: &[Pending],
        encoding: Encoding,
        key_of: impl Fn(&str) -> String,
    ) -> Vec<bool> {
        let keys: Vec<Option<String>> = pending
            .iter()
            .map(|p| {
                let key = key_of(&encoding.decode_lossy(p.record.get(self.key_column).unwrap_or(b"")));
                let once = !key.is_empty() && !self.repeated.contains_key(&scan::key_hash(&key));
                once.then_some(key)
            })
            .collect();
        let wanted: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
        let stored = match (self.lookup)(&mut self.conn, &wanted) {
            Ok(Some(stored)) => stored,
            failed => {
                if matches!(failed, Ok(None)) || self.one_transaction {
                    self.next_lookup = u64::MAX;
                } else {
                    self.schedule(seq, 0, 0);
                }
                return vec![false; pending.len()];
            }
        };
        // `stored` follows `wanted`: the records with a key to look for, in order.
        let mut stored = stored.into_iter();
        let skip: Vec<bool> = pending
            .iter()
            .zip(&keys)
            .map(|(p, key)| key.is_some() && stored.next().flatten() == Some(p.fingerprint))
            .collect();
        self.schedule(seq, wanted.len(), skip.iter().filter(|s| **s).count());
        skip
    }
}

/// A record of the right shape kept unparsed until the batch's fingerprints are looked up.
struct Pending {
    record: ByteRecord,
    number: u64,
    line: u64,
    fingerprint: Fingerprint,
}

/// Parses and validates records into batches for the writer; returns the warnings about the
/// input as a whole (it does not end with a line end, it looks like UTF-8 read as Latin-1).
#[allow(clippy::too_many_arguments)]
pub(super) fn read_batches<K: ImportKind>(
    source: &mut CsvSource,
    columns: &ColumnMap,
    value_map: &ValueMap,
    settings: &ReadSettings,
    options: &ParseOptions,
    mut skip: Option<UnchangedSkip>,
    sender: &mpsc::SyncSender<BatchResult<K>>,
    progress: &indicatif::ProgressBar,
) -> Vec<String> {
    let batch_size = settings.batch_size;
    let encoding = settings.encoding;
    let mut warnings = Vec::new();
    let mut latin1_check = Latin1Check::default();
    let mut record = ByteRecord::new();
    let mut batch = Batch::new(0, settings.start, batch_size);
    let mut pending: Vec<Pending> = Vec::new();
    let parse = |record: &ByteRecord| {
        let fields = RecordFields {
            record,
            columns,
            fields: K::FIELDS,
            encoding,
            value_map,
        };
        K::parse(&fields, options)
    };
    let fingerprint = |record: &ByteRecord| settings.fingerprinter.as_ref().map(|f| f.of(record));
    // A parsed record goes into the batch's rows or rejects.
    let add = |batch: &mut Batch<K::Row, K::Prefetched>,
               record: &ByteRecord,
               number: u64,
               line: u64,
               fingerprint: Option<Fingerprint>| {
        match parse(record) {
            Ok(row) => batch.rows.push(Numbered {
                record: number,
                line,
                raw: K::REJECTS_IN_WRITER.then(|| record.clone()),
                fingerprint,
                row,
            }),
            Err(error) => batch.rejects.push((number, line, record.clone(), error)),
        }
    };
    let mut deferring = skip.as_ref().is_some_and(|s| s.due(0));
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
        if encoding.single_byte() {
            latin1_check.look_at(&record);
        }
        let shape_error = if let Some(cut) = read.oversized {
            let column = source.header.get(cut.field).map(String::as_str).unwrap_or("?");
            Some(RowError::new(
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
            Some(RowError::new(
                None,
                "truncated record",
                "the input ended inside this record, with no line end after it: was the stream cut off?",
            ))
        } else if record.len() != columns.header_len {
            Some(RowError::new(
                None,
                "wrong number of fields",
                format!(
                    "expected {} fields (as in the header), found {}",
                    columns.header_len,
                    record.len()
                ),
            ))
        } else {
            None
        };
        if read.unterminated && !settings.from_stdin {
            warnings.push(format!(
                "the input does not end with a line end: check that its last record (line {line}) is complete"
            ));
        }
        match shape_error {
            // An oversized record's buffer moves into the reject instead of being copied, and
            // the reader starts again with a small one.
            Some(error) if read.oversized.is_some() => {
                batch
                    .rejects
                    .push((after.record, line, std::mem::take(&mut record), error))
            }
            Some(error) => batch.rejects.push((after.record, line, record.clone(), error)),
            None if deferring => pending.push(Pending {
                fingerprint: fingerprint(&record).expect("deferred only with fingerprints"),
                record: record.clone(),
                number: after.record,
                line,
            }),
            None => add(&mut batch, &record, after.record, line, fingerprint(&record)),
        }
        if batch.rows.len() + batch.rejects.len() + pending.len() >= batch_size {
            if let Some(skip) = skip.as_mut().filter(|_| !pending.is_empty()) {
                finish_deferred::<K>(&mut batch, std::mem::take(&mut pending), skip, encoding, &add);
            }
            progress.set_position(source.progress_position(after));
            let seq = batch.seq + 1;
            let full = std::mem::replace(&mut batch, Batch::new(seq, after, batch_size));
            deferring = skip.as_ref().is_some_and(|s| s.due(seq));
            if sender.send(Ok(full)).is_err() {
                return warnings; // the writer stopped (error or signal)
            }
        }
    }
    if let Some(skip) = skip.as_mut().filter(|_| !pending.is_empty()) {
        finish_deferred::<K>(&mut batch, std::mem::take(&mut pending), skip, encoding, &add);
    }
    if batch.rows_read > 0 {
        progress.set_position(source.progress_position(batch.end));
        let _ = sender.send(Ok(batch));
    }
    warnings.extend(latin1_check.warning());
    warnings
}

/// The records of `batch` kept back for the lookup: counted unchanged or parsed. The batch's
/// rejects stay in record order.
fn finish_deferred<K: ImportKind>(
    batch: &mut Batch<K::Row, K::Prefetched>,
    pending: Vec<Pending>,
    skip: &mut UnchangedSkip,
    encoding: Encoding,
    add: &impl Fn(&mut Batch<K::Row, K::Prefetched>, &ByteRecord, u64, u64, Option<Fingerprint>),
) {
    let unchanged = skip.unchanged(batch.seq, &pending, encoding, |raw| K::normalize_key(raw).into_owned());
    let had_rejects = !batch.rejects.is_empty();
    for (p, unchanged) in pending.into_iter().zip(unchanged) {
        if unchanged {
            batch.unchanged += 1;
        } else {
            add(batch, &p.record, p.number, p.line, Some(p.fingerprint));
        }
    }
    if had_rejects {
        batch.rejects.sort_by_key(|r| r.0);
    }
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
                 (e.g. {:?}); read with a single-byte --encoding they are stored garbled (Café as CafÃ©) — import without it",
                self.utf8_fields,
                output::escape_controls(self.sample.as_deref().unwrap_or(""))
            )
        })
    }
}
