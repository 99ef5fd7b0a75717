//! The reader thread: records parsed and validated into batches while the writer works on the
//! previous one.

use std::sync::mpsc;

use csv::ByteRecord;

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
    pub(super) prefetched: Option<P>,
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
    sender: &mpsc::SyncSender<BatchResult<K>>,
    progress: &indicatif::ProgressBar,
) -> Vec<String> {
    let batch_size = settings.batch_size;
    let encoding = settings.encoding;
    let mut warnings = Vec::new();
    let mut latin1_check = Latin1Check::default();
    let mut record = ByteRecord::new();
    let mut batch = Batch {
        seq: 0,
        start: settings.start,
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
        if encoding.single_byte() {
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
                raw: K::REJECTS_IN_WRITER.then(|| record.clone()),
                row,
            }),
            // An oversized record's buffer moves into the reject instead of being copied, and
            // the reader starts again with a small one.
            Err(error) if read.oversized.is_some() => {
                batch
                    .rejects
                    .push((after.record, line, std::mem::take(&mut record), error))
            }
            Err(error) => batch.rejects.push((after.record, line, record.clone(), error)),
        }
        if batch.rows.len() + batch.rejects.len() >= batch_size {
            progress.set_position(source.progress_position(after));
            let seq = batch.seq + 1;
            let full = std::mem::replace(
                &mut batch,
                Batch {
                    seq,
                    start: after,
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
        progress.set_position(source.progress_position(batch.end));
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
                 (e.g. {:?}); read with a single-byte --encoding they are stored garbled (Café as CafÃ©) — import without it",
                self.utf8_fields,
                output::escape_controls(self.sample.as_deref().unwrap_or(""))
            )
        })
    }
}
