//! Reading tickets for people: one page of a filtered list (keyset pagination: a cursor, not
//! OFFSET, so a page costs the same however deep it is), and one ticket in full with its tags,
//! its comments and the operations that changed it.

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Jsonb, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, sql_query};
use serde::Serialize;

use crate::filters::ResolvedFilters;
use crate::schema::tickets;

/// The order of a list: the key, then the id to break ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    Created,
    Updated,
}

/// One ticket in a list, as people read it.
#[derive(Debug, Clone, QueryableByName, Serialize)]
pub struct ListedTicket {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub external_id: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Text)]
    pub priority: String,
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub requester: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub assignee: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub organization: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub deleted_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    pub subject: String,
}

/// A page of a list, and the cursor of the next one when there may be more.
#[derive(Debug, Serialize)]
pub struct Page {
    pub tickets: Vec<ListedTicket>,
    pub next: Option<String>,
}

/// Where a page starts: after this sort value and id.
struct Cursor {
    at: Option<DateTime<Utc>>,
    id: i64,
}

impl Cursor {
    fn parse(text: &str, sort: SortKey) -> anyhow::Result<Cursor> {
        let bad = || anyhow::anyhow!("--after {text:?} is not a cursor of this list (copy the `next` it printed)");
        match sort {
            SortKey::Id => Ok(Cursor {
                at: None,
                id: text.parse().map_err(|_| bad())?,
            }),
            SortKey::Created | SortKey::Updated => {
                let (at, id) = text.rsplit_once('/').ok_or_else(bad)?;
                Ok(Cursor {
                    at: Some(DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.to_utc()),
                    id: id.parse().map_err(|_| bad())?,
                })
            }
        }
    }

    fn after(ticket: &ListedTicket, sort: SortKey) -> String {
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        match sort {
            SortKey::Id => ticket.id.to_string(),
            SortKey::Created => format!("{}/{}", at(ticket.created_at), ticket.id),
            SortKey::Updated => format!("{}/{}", at(ticket.updated_at), ticket.id),
        }
    }
}

const LISTED_SQL: &str = "
    SELECT t.id, t.external_id, t.status::text AS status, t.priority::text AS priority,
           t.channel::text AS channel, r.email AS requester, a.email AS assignee, o.name AS organization,
           t.created_at, t.updated_at, t.deleted_at, t.subject::text AS subject
    FROM tickets t JOIN users r ON r.id = t.requester_id
    LEFT JOIN users a ON a.id = t.assignee_id LEFT JOIN organizations o ON o.id = t.organization_id
    WHERE t.id = ANY($1)";

/// Up to `limit` tickets the filters select, in `sort` order (descending with `desc`), after
/// the cursor `after` (from the previous page's `next`).
pub fn page(
    conn: &mut PgConnection,
    filters: &ResolvedFilters,
    sort: SortKey,
    desc: bool,
    after: Option<&str>,
    limit: i64,
) -> anyhow::Result<Page> {
    let cursor = after.map(|a| Cursor::parse(a, sort)).transpose()?;
    let mut query = filters.query(filters.deleted_scope()).select(tickets::id);
    // The keyset condition: strictly after the cursor in the list's order.
    macro_rules! after_key {
        ($key:expr, $at:expr, $id:expr) => {
            if desc {
                query.filter($key.lt($at).or($key.eq($at).and(tickets::id.lt($id))))
            } else {
                query.filter($key.gt($at).or($key.eq($at).and(tickets::id.gt($id))))
            }
        };
    }
    query = match (sort, cursor) {
        (SortKey::Id, Some(c)) if desc => query.filter(tickets::id.lt(c.id)),
        (SortKey::Id, Some(c)) => query.filter(tickets::id.gt(c.id)),
        (SortKey::Created, Some(Cursor { at: Some(at), id })) => after_key!(tickets::created_at, at, id),
        (SortKey::Updated, Some(Cursor { at: Some(at), id })) => after_key!(tickets::updated_at, at, id),
        _ => query,
    };
    query = match (sort, desc) {
        (SortKey::Id, false) => query.order(tickets::id.asc()),
        (SortKey::Id, true) => query.order(tickets::id.desc()),
        (SortKey::Created, false) => query.order((tickets::created_at.asc(), tickets::id.asc())),
        (SortKey::Created, true) => query.order((tickets::created_at.desc(), tickets::id.desc())),
        (SortKey::Updated, false) => query.order((tickets::updated_at.asc(), tickets::id.asc())),
        (SortKey::Updated, true) => query.order((tickets::updated_at.desc(), tickets::id.desc())),
    };
    let ids: Vec<i64> = query.limit(limit).load(conn).context("cannot list the tickets")?;
    let mut rows: Vec<ListedTicket> = sql_query(LISTED_SQL)
        .bind::<Array<BigInt>, _>(&ids)
        .load(conn)
        .context("cannot read the listed tickets")?;
    rows.sort_by_key(|r| ids.iter().position(|id| *id == r.id));
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|t| Cursor::after(t, sort)))
        .flatten();
    Ok(Page { tickets: rows, next })
}

/// How many tickets the filters select.
pub fn count(conn: &mut PgConnection, filters: &ResolvedFilters) -> anyhow::Result<i64> {
    filters
        .query(filters.deleted_scope())
        .count()
        .get_result(conn)
        .context("cannot count the tickets")
}

/// One ticket in full.
#[derive(Debug, Serialize)]
pub struct TicketDetail {
    #[serde(flatten)]
    pub ticket: ListedTicket,
    pub description: Option<String>,
    pub solved_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub comments: Vec<CommentRow>,
    pub comment_count: i64,
    pub operations: Vec<OperationRef>,
}

#[derive(Debug, QueryableByName, Serialize)]
pub struct CommentRow {
    #[diesel(sql_type = Nullable<Text>)]
    pub external_id: Option<String>,
    #[diesel(sql_type = Text)]
    pub author: String,
    #[diesel(sql_type = Bool)]
    pub public: bool,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub body: String,
}

/// An operation that changed the ticket, from the audit trail.
#[derive(Debug, QueryableByName, Serialize)]
pub struct OperationRef {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Timestamptz)]
    pub started_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub operator: String,
    #[diesel(sql_type = Array<Text>)]
    pub actions: Vec<String>,
}

#[derive(QueryableByName)]
struct Extra {
    #[diesel(sql_type = Nullable<Text>)]
    description: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    solved_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Jsonb)]
    tags: serde_json::Value,
    #[diesel(sql_type = BigInt)]
    comment_count: i64,
}

/// The ticket with this external id, or `None`; with its newest `comments` comments. Found by
/// its key on the partitioned layout (its tickets.external_id has no index).
pub fn show(conn: &mut PgConnection, external_id: &str, comments: i64) -> anyhow::Result<Option<TicketDetail>> {
    let layout = crate::layout::Layout::of(conn)?;
    let found = crate::layout::ticket_ids_by_external_id(conn, layout, &[external_id])?;
    let Some(&id) = found.get(external_id) else {
        return Ok(None);
    };
    let Some(ticket) = sql_query(LISTED_SQL)
        .bind::<Array<BigInt>, _>(vec![id])
        .load::<ListedTicket>(conn)?
        .pop()
    else {
        bail!("ticket {external_id} vanished while it was read");
    };
    let extra: Extra = sql_query(
        "SELECT t.description, t.solved_at,
                coalesce((SELECT jsonb_agg(g.name ORDER BY g.name) FROM ticket_tags x JOIN tags g ON g.id = x.tag_id
                          WHERE x.ticket_id = t.id), '[]') AS tags,
                (SELECT count(*) FROM comments c WHERE c.ticket_id = t.id) AS comment_count
         FROM tickets t WHERE t.id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(conn)?;
    let comment_rows: Vec<CommentRow> = sql_query(
        "SELECT c.external_id, u.email AS author, c.public, c.created_at, c.body
         FROM comments c JOIN users u ON u.id = c.author_id
         WHERE c.ticket_id = $1 ORDER BY c.created_at DESC, c.id DESC LIMIT $2",
    )
    .bind::<BigInt, _>(id)
    .bind::<BigInt, _>(comments)
    .load(conn)?;
    // The audit rows that name the ticket: by row id, in a batch's list of ids, or in an
    // import's ranges of inserted ids.
    let operations: Vec<OperationRef> = sql_query(
        "SELECT o.id, o.kind, o.status::text AS status, o.started_at, o.operator,
                array_agg(DISTINCT a.action ORDER BY a.action) AS actions
         FROM audit_log a JOIN bulk_operations o ON o.id = a.operation_id
         WHERE a.table_name = 'tickets'
           AND (a.row_id = $1
                OR coalesce(a.after -> 'ids', a.before -> 'ids') @> to_jsonb($1)
                OR EXISTS (SELECT 1 FROM jsonb_array_elements(CASE jsonb_typeof(a.after -> 'ids')
                                                                   WHEN 'array' THEN a.after -> 'ids' ELSE '[]' END) r
                           WHERE jsonb_typeof(r) = 'array' AND $1 BETWEEN (r ->> 0)::bigint AND (r ->> 1)::bigint))
         GROUP BY o.id ORDER BY o.id",
    )
    .bind::<BigInt, _>(id)
    .load(conn)
    .context("cannot read the ticket's history")?;
    Ok(Some(TicketDetail {
        ticket,
        description: extra.description,
        solved_at: extra.solved_at,
        tags: serde_json::from_value(extra.tags).unwrap_or_default(),
        comments: comment_rows,
        comment_count: extra.comment_count,
        operations,
    }))
}
