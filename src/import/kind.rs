//! What an import kind is: its fields, how a record becomes a row, how a batch is written.

use std::borrow::Cow;

use csv::ByteRecord;
use diesel::PgConnection;
use serde_json::json;

use normalize::InputZone;
use source::{ColumnMap, FieldSpec, RecordFields, RowError};

use super::*;
use fingerprint::Fingerprint;

/// Parse-time settings an import kind needs.
pub struct ParseOptions {
    pub zone: InputZone,
    pub tag_separator: char,
    /// `--date-format`s, tried in order before the built-in shapes.
    pub date_formats: Vec<String>,
}

/// A valid row with where it came from. A batch's rows are lent to the kind that writes
/// them, so that a batch that lost a race can be written again without a copy.
#[derive(Clone)]
pub struct Numbered<R> {
    pub record: u64,
    pub line: u64,
    /// The original fields, kept only for kinds that reject rows in the writer (an empty
    /// record would still be an allocation per row).
    pub raw: Option<ByteRecord>,
    /// The record's fingerprint, for kinds that store one (see `fingerprint`).
    pub fingerprint: Option<Fingerprint>,
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
pub trait ImportKind: Send {
    type Row: Send + 'static;
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

    /// Told which fields the file has, once its header is read; an error refuses the file.
    fn configure(&mut self, _columns: &ColumnMap) -> anyhow::Result<()> {
        Ok(())
    }

    /// Told that the pre-import scan saw every key, so each key reaches `write_batch` at
    /// most once in the whole import (earlier occurrences are dropped as duplicates).
    fn keys_seen_once(&mut self) {}

    /// Given the import's pool and mode before anything is read (connections of its own).
    fn use_pool(&mut self, _pool: &crate::db::Pool, _mode: super::Mode) {}

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

    /// For kinds that store the fingerprint of the record that wrote each row: what decides,
    /// besides a record's own fields, what it becomes (the column mapping and options are
    /// added by the pipeline), and how the stored fingerprints of a batch's keys are read.
    /// The reader then skips the records whose fingerprint is stored already, as unchanged.
    fn fingerprints(&self) -> Option<Fingerprints> {
        None
    }

    /// What a batch needs made that is better committed at once, before the batch's own
    /// transaction (one writer runs this in a short transaction of its own; several writers
    /// make it in `resolve`, which they run in a transaction of its own anyway, and one
    /// transaction for the whole file does it there too). The partitioned layout's new months:
    /// making one locks the default partitions exclusively and users, organizations, tags and
    /// bulk_operations against writes until its transaction ends.
    fn prepare(&mut self, _conn: &mut PgConnection, _rows: &[Numbered<Self::Row>]) -> anyhow::Result<()> {
        Ok(())
    }

    /// Whether `prepare` has anything to make for these rows (without it, no transaction).
    fn needs_preparing(&self, _rows: &[Numbered<Self::Row>]) -> bool {
        false
    }

    /// Creates or finds what the batch's rows refer to (users, organizations, tags), in the
    /// batch's transaction before `write_batch`. With several writers the batches do this in
    /// file order, one after the other, so that where the file fills in a value (a user's
    /// first name seen) the first row in the file wins, as with one writer.
    fn resolve(&mut self, _conn: &mut PgConnection, _rows: &[Numbered<Self::Row>]) -> anyhow::Result<()> {
        Ok(())
    }

    /// A writer for another connection (`--jobs`): the same settings, its own caches. `None`
    /// when the kind writes with one connection only.
    fn another_writer(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }

    /// This writer is one of `writers` (`--jobs`): its caches keep their share of the limit,
    /// so that memory does not grow with the number of writers.
    fn share_caches(&mut self, _writers: usize) {}

    /// Writes one deduplicated batch, adding to `counts` and returning rows it rejected.
    /// `prefetched` is what `prefetcher` read for the batch, when it ran and succeeded.
    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: &[Numbered<Self::Row>],
        prefetched: Option<Self::Prefetched>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>>;

    /// Called once after the last batch, in the same transaction as it (atomic modes).
    fn end(&mut self, _conn: &mut PgConnection) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called once after the import succeeded and its rows are committed (not on a dry run),
    /// with a connection and the pool: work that needs to see the rows from other sessions,
    /// such as statistics gathered on several connections. An error is reported as a warning.
    fn after_commit(&mut self, _conn: &mut PgConnection, _pool: &crate::db::Pool) -> anyhow::Result<()> {
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

/// What a kind that stores record fingerprints gives the reader (`ImportKind::fingerprints`).
pub struct Fingerprints {
    pub settings: String,
    pub lookup: FingerprintLookup,
}

/// Reads the fingerprints stored for some keys, one for each key in their order (`None` for a
/// key stored without one, or not stored); `None` when this database keeps none that can be
/// trusted (the distributed layout).
pub type FingerprintLookup =
    Box<dyn FnMut(&mut PgConnection, &[&str]) -> anyhow::Result<Option<Vec<Option<Fingerprint>>>> + Send>;

/// A kind's read-ahead for one batch's rows (see `ImportKind::prefetcher`).
pub type Prefetcher<R, P> = Box<dyn FnMut(&mut PgConnection, &[Numbered<R>]) -> anyhow::Result<P> + Send>;
