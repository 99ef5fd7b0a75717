//! `import comments`: ticket_external_id, author_email, body, public, created_at and an
//! optional external_id (the upsert key). A comment without external_id is matched on
//! (ticket, author, body, created_at), so importing the same file twice adds nothing. A batch
//! is one merge statement, or where comment_keys keeps external_id unique (distributed and
//! partitioned layouts) the steps of `comments/keyed.rs`.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use super::entities::{EntityCache, UserRef};
use super::normalize;
use super::source::{FieldSpec, RecordFields, RowError};
use super::{Counts, ImportKind, Numbered, ParseOptions, WriterReject};
use crate::layout::Layout;
use crate::layout::ticket_ids_by_external_id;
use crate::models::UserRole;

mod keyed;

const EXTERNAL_ID: usize = 0;
const TICKET_EXTERNAL_ID: usize = 1;
const AUTHOR_EMAIL: usize = 2;
const BODY: usize = 3;
const PUBLIC: usize = 4;
const CREATED_AT: usize = 5;

pub const FIELDS: &[FieldSpec] = &[
    FieldSpec::optional("external_id").indexed(),
    FieldSpec::required("ticket_external_id").indexed(),
    FieldSpec::required("author_email").indexed(),
    FieldSpec::optional("body"),
    FieldSpec::optional("public"),
    FieldSpec::optional("created_at"),
];

#[derive(Debug, Clone)]
pub struct CommentRow {
    pub external_id: Option<String>,
    pub ticket_external_id: String,
    pub author_email: String,
    pub body: String,
    pub public: bool,
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub struct CommentImport {
    cache: EntityCache,
    /// The layout, read by the first batch.
    layout: Option<Layout>,
    /// One of several writers (`--jobs`): comments without external_id are matched under locks.
    parallel: bool,
}

#[derive(QueryableByName)]
struct MergeCounts {
    #[diesel(sql_type = BigInt)]
    inserted: i64,
    #[diesel(sql_type = BigInt)]
    updated: i64,
}

const MERGE_COMMENTS_SQL: &str = concat!(
    "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bool[], $6::timestamptz[])
        AS i(external_id, ticket_id, author_id, body, public, created_at)
), target AS (
    SELECT i.external_id, i.ticket_id, i.author_id, i.body, i.public,
           coalesce(i.created_at, e.created_at, $7) AS created_at
    FROM input i LEFT JOIN comments e ON e.external_id = i.external_id
    WHERE (i.external_id IS NOT NULL AND (e.id IS NULL OR (e.ticket_id, e.author_id, e.body, e.public, e.created_at)
                 IS DISTINCT FROM (i.ticket_id, i.author_id, i.body, i.public, coalesce(i.created_at, e.created_at))))
       OR (i.external_id IS NULL AND NOT EXISTS (
              SELECT 1 FROM comments c
              WHERE c.ticket_id = i.ticket_id AND c.author_id = i.author_id AND c.body = i.body
                AND (i.created_at IS NULL OR c.created_at = i.created_at)))
), written AS (
    INSERT INTO comments AS c (external_id, ticket_id, author_id, body, public, created_at)
    SELECT external_id, ticket_id, author_id, body, public, created_at FROM target
    ON CONFLICT (external_id) DO UPDATE SET
        ticket_id = excluded.ticket_id, author_id = excluded.author_id, body = excluded.body,
        public = excluded.public, created_at = excluded.created_at
    WHERE (c.ticket_id, c.author_id, c.body, c.public, c.created_at) IS DISTINCT FROM
          (excluded.ticket_id, excluded.author_id, excluded.body, excluded.public, excluded.created_at)
    RETURNING c.id, (c.xmax = 0) AS inserted, CASE WHEN c.xmax = 0 THEN NULL ELSE to_jsonb(c) END AS after_image
), audited AS (
    INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
    SELECT $8, 'comments', w.id, CASE WHEN w.inserted THEN '",
    crate::audit_action!(Insert),
    "' ELSE '",
    crate::audit_action!(Update),
    "' END,
           CASE WHEN w.inserted THEN NULL ELSE to_jsonb(b) END, w.after_image
    FROM written w LEFT JOIN comments b ON b.id = w.id
)
SELECT (SELECT count(*) FROM written WHERE inserted) AS inserted,
       (SELECT count(*) FROM written WHERE NOT inserted) AS updated"
);

impl ImportKind for CommentImport {
    type Row = CommentRow;
    type Prefetched = ();
    const NAME: &'static str = "comments";
    const REJECTS_IN_WRITER: bool = true;
    const FIELDS: &'static [FieldSpec] = FIELDS;

    fn parse(fields: &RecordFields<'_>, options: &ParseOptions) -> Result<CommentRow, RowError> {
        let ticket_external_id = fields.required(TICKET_EXTERNAL_ID)?.into_owned();
        let author_email = fields
            .parse(AUTHOR_EMAIL, "invalid e-mail", normalize::email)?
            .ok_or_else(|| RowError::new(Some("author_email"), "missing required value", "author_email is empty"))?;
        Ok(CommentRow {
            external_id: fields.non_empty(EXTERNAL_ID)?.map(|v| v.into_owned()),
            ticket_external_id,
            author_email,
            body: fields.get(BODY)?.map(|v| v.into_owned()).unwrap_or_default(),
            public: fields
                .parse(PUBLIC, "invalid boolean", normalize::boolean)?
                .unwrap_or(true),
            created_at: fields.parse(CREATED_AT, "invalid timestamp", |v| {
                normalize::timestamp_in(v, options.zone, &options.date_formats)
            })?,
        })
    }

    const KEY_COLUMN: Option<(&'static str, &'static str)> = Some(("comments", "external_id"));

    fn key(row: &CommentRow) -> Option<&str> {
        row.external_id.as_deref()
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    /// Comments fill in nothing of their authors (created without a name), so the order in
    /// which writers resolve them does not matter.
    fn another_writer(&self) -> Option<CommentImport> {
        Some(CommentImport::default())
    }

    fn share_caches(&mut self, writers: usize) {
        self.cache.share_limit(writers);
        self.parallel = writers > 1;
    }

    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: &[Numbered<CommentRow>],
        _prefetched: Option<()>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let layout = match self.layout {
            Some(layout) => layout,
            None => *self.layout.insert(Layout::of(conn)?),
        };
        if layout.distributed() {
            sequential_mode(conn)?;
        }
        let ticket_keys: Vec<&str> = rows.iter().map(|r| r.row.ticket_external_id.as_str()).collect();
        let tickets = ticket_ids_by_external_id(conn, layout, &ticket_keys).context("cannot look up tickets")?;
        // A comment on a ticket that does not exist cannot be stored: reject it with that reason.
        let (rows, orphans): (Vec<_>, Vec<_>) = rows
            .iter()
            .partition(|r| tickets.contains_key(&r.row.ticket_external_id));
        let rejects: Vec<WriterReject> = orphans
            .into_iter()
            .map(|r| {
                reject(
                    r,
                    RowError::new(
                        Some("ticket_external_id"),
                        "unknown ticket",
                        format!(
                            "ticket {:?} does not exist; import the tickets first",
                            r.row.ticket_external_id
                        ),
                    ),
                )
            })
            .collect();
        let orphan_count = rejects.len() as u64;
        // A comment without external_id that an earlier row of the batch already makes is
        // unchanged, as it is when that row came in an earlier batch: the same file gives the
        // same comments whatever the batch size.
        let (rows, made_earlier) = without_made_earlier(rows);
        counts.unchanged += made_earlier;
        if rows.is_empty() {
            return Ok(rejects);
        }
        if self.parallel {
            lock_keyless_tickets(conn, &rows, &tickets)?;
        }
        let authors: Vec<UserRef<'_>> = rows
            .iter()
            .map(|r| UserRef {
                email: &r.row.author_email,
                name: None,
                role: UserRole::Customer,
                organization_id: None,
            })
            .collect();
        self.cache
            .ensure_users(conn, &authors)
            .context("cannot resolve comment authors")?;
        let author_id = |r: &Numbered<CommentRow>| self.cache.user_id(&r.row.author_email).expect("resolved above");

        let merged = if layout.keyed() {
            let resolved: Vec<keyed::Resolved<'_>> = rows
                .iter()
                .map(|r| keyed::Resolved {
                    row: r,
                    ticket_id: tickets[&r.row.ticket_external_id],
                    author_id: author_id(r),
                })
                .collect();
            keyed::merge(conn, layout, op_id, &resolved, Utc::now())?
        } else {
            let external_ids: Vec<Option<&str>> = rows.iter().map(|r| r.row.external_id.as_deref()).collect();
            let ticket_ids: Vec<i64> = rows.iter().map(|r| tickets[&r.row.ticket_external_id]).collect();
            let author_ids: Vec<i64> = rows.iter().map(|r| author_id(r)).collect();
            let bodies: Vec<&str> = rows.iter().map(|r| r.row.body.as_str()).collect();
            let public: Vec<bool> = rows.iter().map(|r| r.row.public).collect();
            let created: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.row.created_at).collect();
            // Joined to the stored comments by key, an index probe a row; left to itself the
            // planner hashed the whole comments table for every batch.
            crate::layout::by_key_plans(conn)?;
            sql_query(MERGE_COMMENTS_SQL)
                .bind::<Array<Nullable<Text>>, _>(&external_ids)
                .bind::<Array<BigInt>, _>(&ticket_ids)
                .bind::<Array<BigInt>, _>(&author_ids)
                .bind::<Array<Text>, _>(&bodies)
                .bind::<Array<Bool>, _>(&public)
                .bind::<Array<Nullable<Timestamptz>>, _>(&created)
                .bind::<Timestamptz, _>(Utc::now())
                .bind::<BigInt, _>(op_id)
                .get_result::<MergeCounts>(conn)
                .context("cannot merge comments")?
        };
        let kept = rows.len() as u64 + orphan_count - rejects.len() as u64;
        counts.inserted += merged.inserted as u64;
        counts.updated += merged.updated as u64;
        counts.unchanged += kept - merged.inserted as u64 - merged.updated as u64;
        Ok(rejects)
    }
}

/// The rows less the comments without external_id that an earlier row makes (same ticket,
/// author and body, and time when the row has one), and how many those were.
fn without_made_earlier(rows: Vec<&Numbered<CommentRow>>) -> (Vec<&Numbered<CommentRow>>, u64) {
    type Made<'r> = (&'r str, &'r str, &'r str);
    let mut made: HashSet<(Made<'_>, Option<DateTime<Utc>>)> = HashSet::new();
    let mut made_any_time: HashSet<Made<'_>> = HashSet::new();
    let mut kept = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for r in rows {
        let row = &r.row;
        let comment = (
            row.ticket_external_id.as_str(),
            row.author_email.as_str(),
            row.body.as_str(),
        );
        let made_before = row.external_id.is_none()
            && match row.created_at {
                None => made_any_time.contains(&comment),
                Some(at) => made.contains(&(comment, Some(at))),
            };
        if !made_before {
            made.insert((comment, row.created_at));
            made_any_time.insert(comment);
            kept.push(r);
        } else {
            dropped += 1;
        }
    }
    (kept, dropped)
}

/// With several writers, two batches holding the same comment without external_id would each
/// find it missing and both insert it: a batch with such comments first locks their tickets
/// (hashed into 1,024 transaction-level advisory locks, taken in order, so that writers cannot
/// deadlock on them), and the second batch looks after the first one committed.
fn lock_keyless_tickets(
    conn: &mut PgConnection,
    rows: &[&Numbered<CommentRow>],
    tickets: &HashMap<String, i64>,
) -> anyhow::Result<()> {
    let mut buckets: Vec<i32> = rows
        .iter()
        .filter(|r| r.row.external_id.is_none())
        .map(|r| (tickets[&r.row.ticket_external_id].rem_euclid(KEYLESS_LOCK_BUCKETS)) as i32)
        .collect();
    if buckets.is_empty() {
        return Ok(());
    }
    buckets.sort_unstable();
    buckets.dedup();
    sql_query("SELECT count(pg_advisory_xact_lock($1, b)) AS n FROM unnest($2::int[]) AS b")
        .bind::<Integer, _>(KEYLESS_LOCK_CLASS)
        .bind::<Array<Integer>, _>(&buckets)
        .execute(conn)
        .context("cannot lock the tickets of the comments without external_id")?;
    Ok(())
}

/// The advisory locks of [`lock_keyless_tickets`]: their class (the two-number key space,
/// apart from the jobs' one-number locks) and how many tickets' hashes they spread over.
const KEYLESS_LOCK_CLASS: i32 = 0x7469_636b; // "tick"
const KEYLESS_LOCK_BUCKETS: i64 = 1024;

fn reject(r: &Numbered<CommentRow>, error: RowError) -> WriterReject {
    // Rejects are rare: their fields are copied for the rejects file.
    WriterReject {
        error,
        record: r.record,
        line: r.line,
        raw: r.raw.clone().unwrap_or_default(),
    }
}

/// On Citus, a transaction that has read tickets from many shards at once may not write users
/// (a reference table) afterwards, nor read comments (which refer to users) in parallel after
/// it has: a batch of comments runs one connection per worker (each worker's shards in turn).
fn sequential_mode(conn: &mut PgConnection) -> anyhow::Result<()> {
    sql_query("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'").execute(conn)?;
    Ok(())
}
