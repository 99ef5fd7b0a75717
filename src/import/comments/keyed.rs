//! A batch of comments where their external_id is kept unique by `comment_keys`: the
//! distributed and partitioned layouts. `ON CONFLICT (external_id)` has no unique key on
//! comments there (on Citus the keys are distributed by external_id; on partitions comments are
//! partitioned by their ticket's created_at, which a unique key would have to contain), and on
//! Citus the `NOT EXISTS` that matches a comment without external_id is a correlated subquery.
//! So a batch is read, classified here, and written in a few set-based statements (on Citus each
//! one distributed statement that the workers run in parallel): new comments with their keys,
//! changed comments with their audit images (made from the rows the statement returns, as for
//! tickets), and comments that move to another ticket (so to another shard or month) deleted
//! and inserted again with their ids.
//!
//! On partitions each comment is read and written in its ticket's month (`ticket_created_at`,
//! the ticket's key's `created_at`): joined to the keys, probed a comment at a time.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use super::{CommentRow, MergeCounts};
use crate::audit::{INSERT_ACTION, UPDATE_ACTION};
use crate::import::Numbered;
use crate::layout::Layout;

/// On partitions, a join of the ticket keys `k` to the ticket id `ticket_id` and the condition
/// that the comments `alias` are in that ticket's month; elsewhere nothing.
fn in_month(layout: Layout, ticket_id: &str, alias: &str) -> (String, String) {
    if layout.partitioned() {
        (
            format!(" JOIN ticket_keys k ON k.ticket_id = {ticket_id}"),
            format!(" AND {alias}.ticket_created_at = k.created_at"),
        )
    } else {
        (String::new(), String::new())
    }
}

/// A comment of the batch, resolved: its ticket and author ids.
pub(super) struct Resolved<'a> {
    pub row: &'a Numbered<CommentRow>,
    pub ticket_id: i64,
    pub author_id: i64,
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = BigInt)]
    comment_id: i64,
    #[diesel(sql_type = BigInt)]
    ticket_id: i64,
}

#[derive(QueryableByName)]
struct StoredComment {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    author_id: i64,
    #[diesel(sql_type = Text)]
    body: String,
    #[diesel(sql_type = Bool)]
    public: bool,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct Ordinal {
    #[diesel(sql_type = Integer)]
    ord: i32,
}

/// One comment to write: the values it gets.
struct Write<'a> {
    id: i64,
    external_id: Option<&'a str>,
    ticket_id: i64,
    author_id: i64,
    body: &'a str,
    public: bool,
    created_at: DateTime<Utc>,
}

/// The values of comments to write as arrays, bound by [`Arrays::bind`] in this order: ids,
/// tickets, authors, bodies, public, created_at (`unnest` turns them back into rows).
struct Arrays<'a> {
    ids: Vec<i64>,
    tickets: Vec<i64>,
    authors: Vec<i64>,
    bodies: Vec<&'a str>,
    public: Vec<bool>,
    created: Vec<DateTime<Utc>>,
}

impl<'a> Arrays<'a> {
    fn of<'w>(rows: impl Iterator<Item = &'w Write<'a>> + Clone) -> Arrays<'a>
    where
        'a: 'w,
    {
        Arrays {
            ids: rows.clone().map(|r| r.id).collect(),
            tickets: rows.clone().map(|r| r.ticket_id).collect(),
            authors: rows.clone().map(|r| r.author_id).collect(),
            bodies: rows.clone().map(|r| r.body).collect(),
            public: rows.clone().map(|r| r.public).collect(),
            created: rows.map(|r| r.created_at).collect(),
        }
    }

    fn bind<'q>(&'q self, query: BoxedSqlQuery<'q, Pg, SqlQuery>) -> BoxedSqlQuery<'q, Pg, SqlQuery> {
        query
            .bind::<Array<BigInt>, _>(&self.ids)
            .bind::<Array<BigInt>, _>(&self.tickets)
            .bind::<Array<BigInt>, _>(&self.authors)
            .bind::<Array<Text>, _>(&self.bodies)
            .bind::<Array<Bool>, _>(&self.public)
            .bind::<Array<Timestamptz>, _>(&self.created)
    }
}

/// Writes `rows` (their tickets exist, their authors are resolved) and returns the counts.
pub(super) fn merge(
    conn: &mut PgConnection,
    layout: Layout,
    op_id: i64,
    rows: &[Resolved<'_>],
    now: DateTime<Utc>,
) -> anyhow::Result<MergeCounts> {
    let keyed: Vec<&str> = rows.iter().filter_map(|r| r.row.row.external_id.as_deref()).collect();
    let keys: HashMap<String, Key> =
        sql_query("SELECT external_id, comment_id, ticket_id FROM comment_keys WHERE external_id = ANY($1)")
            .bind::<Array<Text>, _>(&keyed)
            .load::<Key>(conn)
            .context("cannot read the comments' keys")?
            .into_iter()
            .map(|k| (k.external_id.clone(), k))
            .collect();
    let (ticket_ids, ids): (Vec<i64>, Vec<i64>) = keys.values().map(|k| (k.ticket_id, k.comment_id)).unzip();
    if !layout.distributed() {
        // A probe a comment (on Citus this setting would reach the workers' plans).
        crate::layout::by_key_plans(conn)?;
    }
    let stored_sql = if layout.partitioned() {
        "SELECT c.id, c.author_id, c.body, c.public, c.created_at
         FROM unnest($1::bigint[], $2::bigint[]) AS i(ticket_id, id)
         JOIN ticket_keys k ON k.ticket_id = i.ticket_id
         CROSS JOIN LATERAL (SELECT * FROM comments c
                             WHERE c.id = i.id AND c.ticket_created_at = k.created_at OFFSET 0) c"
    } else {
        "SELECT id, author_id, body, public, created_at FROM comments WHERE ticket_id = ANY($1) AND id = ANY($2)"
    };
    let stored: HashMap<i64, StoredComment> = sql_query(stored_sql)
        .bind::<Array<BigInt>, _>(&ticket_ids)
        .bind::<Array<BigInt>, _>(&ids)
        .load::<StoredComment>(conn)
        .context("cannot read the stored comments")?
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let present = keyless_present(conn, layout, rows)?;

    let mut inserts: Vec<Write<'_>> = Vec::new();
    let mut updates: Vec<Write<'_>> = Vec::new();
    // (the ticket it is on, the comment as it is to be)
    let mut moves: Vec<(i64, Write<'_>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let row = &r.row.row;
        let stored_key = row.external_id.as_deref().and_then(|k| keys.get(k));
        let write = |id, created_at| Write {
            id,
            external_id: row.external_id.as_deref(),
            ticket_id: r.ticket_id,
            author_id: r.author_id,
            body: &row.body,
            public: row.public,
            created_at,
        };
        match stored_key {
            Some(key) => {
                let Some(s) = stored.get(&key.comment_id) else {
                    anyhow::bail!(
                        "comment_keys names comment {} on ticket {} for {:?}, which does not exist",
                        key.comment_id,
                        key.ticket_id,
                        key.external_id
                    );
                };
                let created_at = row.created_at.unwrap_or(s.created_at);
                // Compared as stored: to the microsecond.
                if key.ticket_id != r.ticket_id {
                    moves.push((key.ticket_id, write(s.id, created_at)));
                } else if (s.author_id, s.body.as_str(), s.public, s.created_at.timestamp_micros())
                    != (
                        r.author_id,
                        row.body.as_str(),
                        row.public,
                        created_at.timestamp_micros(),
                    )
                {
                    updates.push(write(s.id, created_at));
                }
            }
            None if row.external_id.is_none() && present.contains(&(i as i32)) => {}
            None => inserts.push(write(0, row.created_at.unwrap_or(now))),
        }
    }
    let inserted = insert(conn, layout, op_id, &mut inserts)?;
    let updated = update(conn, layout, op_id, &updates)? + move_to_tickets(conn, layout, op_id, &moves)?;
    Ok(MergeCounts { inserted, updated })
}

/// The positions in `rows` of the comments without external_id that are stored already
/// (same ticket, author and body, and time when the row has one).
fn keyless_present(conn: &mut PgConnection, layout: Layout, rows: &[Resolved<'_>]) -> anyhow::Result<HashSet<i32>> {
    let keyless: Vec<(i32, &Resolved<'_>)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.row.row.external_id.is_none())
        .map(|(i, r)| (i as i32, r))
        .collect();
    if keyless.is_empty() {
        return Ok(HashSet::new());
    }
    let ords: Vec<i32> = keyless.iter().map(|(i, _)| *i).collect();
    let tickets: Vec<i64> = keyless.iter().map(|(_, r)| r.ticket_id).collect();
    let authors: Vec<i64> = keyless.iter().map(|(_, r)| r.author_id).collect();
    let bodies: Vec<&str> = keyless.iter().map(|(_, r)| r.row.row.body.as_str()).collect();
    let created: Vec<Option<DateTime<Utc>>> = keyless.iter().map(|(_, r)| r.row.row.created_at).collect();
    let (keys, month) = in_month(layout, "i.ticket_id", "c");
    Ok(sql_query(format!(
        "SELECT DISTINCT i.ord FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::text[], $5::timestamptz[])
              AS i(ord, ticket_id, author_id, body, created_at){keys}
         JOIN comments c
           ON c.ticket_id = i.ticket_id AND c.author_id = i.author_id AND c.body = i.body
          AND (i.created_at IS NULL OR c.created_at = i.created_at){month}"
    ))
    .bind::<Array<Integer>, _>(&ords)
    .bind::<Array<BigInt>, _>(&tickets)
    .bind::<Array<BigInt>, _>(&authors)
    .bind::<Array<Text>, _>(&bodies)
    .bind::<Array<Nullable<Timestamptz>>, _>(&created)
    .load::<Ordinal>(conn)
    .context("cannot look up the comments without external_id")?
    .into_iter()
    .map(|o| o.ord)
    .collect())
}

/// Inserts new comments (ids drawn from the sequence first — on Citus the coordinator's —, for
/// their keys), their keys and their audit rows.
fn insert(conn: &mut PgConnection, layout: Layout, op_id: i64, rows: &mut [Write<'_>]) -> anyhow::Result<i64> {
    if rows.is_empty() {
        return Ok(0);
    }
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let ids: Vec<Id> =
        sql_query("SELECT nextval(pg_get_serial_sequence('comments', 'id')) AS id FROM generate_series(1, $1)")
            .bind::<Integer, _>(rows.len() as i32)
            .load(conn)
            .context("cannot draw comment ids")?;
    for (row, id) in rows.iter_mut().zip(ids) {
        row.id = id.id;
    }
    let arrays = Arrays::of(rows.iter());
    let external_ids: Vec<Option<&str>> = rows.iter().map(|r| r.external_id).collect();
    let (column, month, keys) = if layout.partitioned() {
        (
            ", ticket_created_at",
            ", k.created_at",
            " JOIN ticket_keys k ON k.ticket_id = i.ticket_id",
        )
    } else {
        ("", "", "")
    };
    let inserted = arrays
        .bind(
            sql_query(format!(
                "INSERT INTO comments (id, ticket_id, author_id, body, public, created_at, external_id{column})
                 SELECT i.*{month} FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bool[],
                                             $6::timestamptz[], $7::text[])
                     AS i(id, ticket_id, author_id, body, public, created_at, external_id){keys}"
            ))
            .into_boxed(),
        )
        .bind::<Array<Nullable<Text>>, _>(&external_ids)
        .execute(conn)
        .context("cannot insert comments")?;
    anyhow::ensure!(
        inserted == rows.len(),
        "{} of {} new comments were written: the others' tickets have no key in ticket_keys",
        inserted,
        rows.len()
    );
    let ids = &arrays.ids;
    let tickets = &arrays.tickets;
    sql_query(
        "INSERT INTO comment_keys (external_id, comment_id, ticket_id)
         SELECT k, id, ticket_id FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS i(k, id, ticket_id)
         WHERE k IS NOT NULL",
    )
    .bind::<Array<Nullable<Text>>, _>(&external_ids)
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(tickets)
    .execute(conn)
    .context("cannot insert the comments' keys")?;
    sql_query(format!(
        "INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
         SELECT $1, 'comments', id, '{INSERT_ACTION}', NULL, NULL FROM unnest($2::bigint[]) AS id"
    ))
    .bind::<BigInt, _>(op_id)
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)
    .context("cannot record the inserted comments")?;
    Ok(inserted as i64)
}

/// Updates changed comments in place (same ticket, so same shard or month), with before and
/// after images.
fn update(conn: &mut PgConnection, layout: Layout, op_id: i64, rows: &[Write<'_>]) -> anyhow::Result<i64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let arrays = Arrays::of(rows.iter());
    let (keys, month) = in_month(layout, "u.ticket_id", "c");
    let b_month = in_month(layout, "", "b").1;
    let query = sql_query(format!(
        "WITH u AS (
             SELECT * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::bool[], $7::timestamptz[])
                 AS u(id, ticket_id, author_id, body, public, created_at)
         ), written AS (
             UPDATE comments c SET author_id = u.author_id, body = u.body, public = u.public, created_at = u.created_at
             FROM u{keys}, comments b
             WHERE c.ticket_id = u.ticket_id AND c.id = u.id{month}
               AND b.ticket_id = c.ticket_id AND b.id = c.id{b_month}
             RETURNING c.id, c AS after_row, b AS before_row
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT $1, 'comments', id, '{UPDATE_ACTION}', to_jsonb(before_row), to_jsonb(after_row) FROM written
         )
         SELECT count(*) AS n FROM written"
    ))
    .into_boxed()
    .bind::<BigInt, _>(op_id);
    let count: crate::db::Count = arrays.bind(query).get_result(conn).context("cannot update comments")?;
    Ok(count.n)
}

/// Moves comments to another ticket, keeping their ids: the ticket is the distribution column,
/// which an UPDATE cannot change on Citus, so each is deleted from the shard of its old ticket
/// and inserted into that of its new one (on partitions: from the old ticket's month into the new
/// one's), its key following; the audit images are the whole row before and after, as the plain
/// layout's UPDATE writes them.
fn move_to_tickets(
    conn: &mut PgConnection,
    layout: Layout,
    op_id: i64,
    moves: &[(i64, Write<'_>)],
) -> anyhow::Result<i64> {
    if moves.is_empty() {
        return Ok(0);
    }
    let arrays = Arrays::of(moves.iter().map(|(_, r)| r));
    let old_tickets: Vec<i64> = moves.iter().map(|(old, _)| *old).collect();
    let (old_keys, old_month) = in_month(layout, "u.old_ticket_id", "c");
    let (column, new_month, new_keys) = if layout.partitioned() {
        (
            ", ticket_created_at",
            ", n.created_at",
            " JOIN ticket_keys n ON n.ticket_id = r.ticket_id",
        )
    } else {
        ("", "", "")
    };
    let query = sql_query(format!(
        "WITH u AS (
             SELECT * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::bool[], $7::timestamptz[],
                                  $8::bigint[])
                 AS u(id, ticket_id, author_id, body, public, created_at, old_ticket_id)
         ), removed AS (
             DELETE FROM comments c USING u{old_keys}
             WHERE c.ticket_id = u.old_ticket_id AND c.id = u.id{old_month}
             RETURNING c.id, c.external_id, u.ticket_id, u.author_id, u.body, u.public, u.created_at, c AS before_row
         ), added AS (
             INSERT INTO comments AS c (id, external_id, ticket_id, author_id, body, public, created_at{column})
             SELECT r.id, r.external_id, r.ticket_id, r.author_id, r.body, r.public, r.created_at{new_month}
             FROM removed r{new_keys}
             RETURNING c.* -- (a shard's row as a whole has the shard's type, which Citus cannot return)
         ), keys AS (
             UPDATE comment_keys k SET ticket_id = r.ticket_id FROM removed r WHERE k.external_id = r.external_id
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT $1, 'comments', a.id, '{UPDATE_ACTION}', to_jsonb(r.before_row), to_jsonb(a)
             FROM added a JOIN removed r ON r.id = a.id
         )
         SELECT count(*) AS n FROM added"
    ))
    .into_boxed()
    .bind::<BigInt, _>(op_id);
    let count: crate::db::Count = arrays
        .bind(query)
        .bind::<Array<BigInt>, _>(&old_tickets)
        .get_result(conn)
        .context("cannot move comments to their new tickets")?;
    anyhow::ensure!(
        count.n == moves.len() as i64,
        "{} of {} comments to move were found on the tickets comment_keys names",
        count.n,
        moves.len()
    );
    Ok(count.n)
}
