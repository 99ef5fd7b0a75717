//! The schema's layout: `plain` (one tickets table), `partitioned` (tickets, their tag links
//! and comments range-partitioned by the ticket's month with pg_partman, external_id kept
//! unique by `ticket_keys` and `comment_keys`), and `distributed`
//! (Citus: tickets hash-distributed by id over the workers, keys in `ticket_keys`). Chosen once, on an empty database, by `migrate run --layout`; recorded in
//! `ticketops_layout`; every engine whose SQL differs between layouts reads it with
//! [`Layout::of`] at its start.

pub mod cluster;
pub mod partition_copy;
pub mod partition_rows;

use anyhow::{Context as _, bail};
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One tickets table (the default)
    Plain,
    /// tickets range-partitioned by created_at, a partition a month, with pg_partman
    Partitioned,
    /// on a Citus coordinator: tickets, tag links, comments and audit rows distributed by
    /// ticket id over the workers; users, organizations, tags and operations reference tables
    Distributed,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Plain => "plain",
            Layout::Partitioned => "partitioned",
            Layout::Distributed => "distributed",
        }
    }

    /// The layout recorded in the database.
    pub fn of(conn: &mut PgConnection) -> anyhow::Result<Layout> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            layout: String,
        }
        let row: Row = sql_query("SELECT layout FROM ticketops_layout")
            .get_result(conn)
            .context("cannot read the schema's layout (ticketops_layout)")?;
        match row.layout.as_str() {
            "plain" => Ok(Layout::Plain),
            "partitioned" => Ok(Layout::Partitioned),
            "distributed" => Ok(Layout::Distributed),
            other => bail!("the database has the layout {other:?}, which this ticketops does not know"),
        }
    }

    /// Whether tickets are partitioned by month (pg_partman).
    pub fn partitioned(self) -> bool {
        self == Layout::Partitioned
    }

    /// Whether external_id is kept unique by `ticket_keys` rather than by tickets itself, and
    /// rows are addressed by key rather than by `ctid` (which is unique only per partition or
    /// shard).
    pub fn keyed(self) -> bool {
        matches!(self, Layout::Partitioned | Layout::Distributed)
    }

    /// Whether tickets live on Citus workers.
    pub fn distributed(self) -> bool {
        self == Layout::Distributed
    }

    /// The columns an `INSERT INTO ticket_tags` names: on partitions also the ticket's
    /// created_at, by which the links are partitioned.
    pub fn link_columns(self) -> &'static str {
        if self.partitioned() {
            "ticket_id, tag_id, ticket_created_at"
        } else {
            "ticket_id, tag_id"
        }
    }

    /// After the ticket id and tag id a link's `SELECT` yields for [`Layout::link_columns`]:
    /// on partitions `, created_at` (the expression of its ticket's created_at), elsewhere
    /// nothing.
    pub fn link_created_at(self, created_at: &str) -> String {
        if self.partitioned() {
            format!(", {created_at}")
        } else {
            String::new()
        }
    }

    /// A condition on the links `alias` of a ticket whose created_at is `created_at`, for
    /// PostgreSQL to read that ticket's month of links alone: on partitions ` AND
    /// alias.ticket_created_at = created_at`, elsewhere nothing (the links of a ticket are
    /// found by its id alone; on partitions that reads every month).
    pub fn links_month(self, alias: &str, created_at: &str) -> String {
        if self.partitioned() {
            format!(" AND {alias}.ticket_created_at = {created_at}")
        } else {
            String::new()
        }
    }

    /// Deletes the tickets `ids` (with their `created_at`) with their comments and tag links
    /// (cascading from tickets on plain and distributed; on partitions deleted here first, in
    /// the tickets' months: each month of them references its month of tickets, NO ACTION), and
    /// their keys where keys are kept; returns how many tickets went.
    pub fn delete_tickets(
        self,
        conn: &mut PgConnection,
        ids: &[i64],
        created_at: &[chrono::DateTime<chrono::Utc>],
    ) -> diesel::QueryResult<usize> {
        use diesel::sql_types::{Array, Timestamptz};
        if self.keyed() {
            for keys in ["ticket_keys", "comment_keys"] {
                sql_query(format!("DELETE FROM {keys} WHERE ticket_id = ANY($1)"))
                    .bind::<Array<BigInt>, _>(ids)
                    .execute(conn)?;
            }
        }
        if !self.partitioned() {
            return sql_query("DELETE FROM tickets WHERE id = ANY($1)")
                .bind::<Array<BigInt>, _>(ids)
                .execute(conn);
        }
        // The tickets go in this transaction: no fingerprint to forget for their links.
        crate::db::keep_fingerprints(conn)?;
        for table in ["comments", "ticket_tags"] {
            sql_query(format!(
                "DELETE FROM {table} WHERE ticket_id = ANY($1) AND ticket_created_at = ANY($2)"
            ))
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<Timestamptz>, _>(created_at)
            .execute(conn)?;
        }
        by_key_plans(conn)?;
        sql_query(
            "DELETE FROM tickets t USING unnest($1::bigint[], $2::timestamptz[]) AS b(id, created_at)
             WHERE t.id = b.id AND t.created_at = b.created_at",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Timestamptz>, _>(created_at)
        .execute(conn)
    }
}

impl Layout {
    /// Runs `lock` (a `… WHERE id = ANY(ids) … FOR UPDATE SKIP LOCKED`) on `ids` and returns
    /// what it returned. On Citus, which takes row locks only in a statement that reaches one
    /// shard, once for each shard of tickets that holds some of them (a router query each, all
    /// in the caller's transaction); elsewhere once for all.
    pub fn lock_per_shard<T>(
        self,
        conn: &mut PgConnection,
        ids: &[i64],
        mut lock: impl FnMut(&mut PgConnection, &[i64]) -> diesel::QueryResult<Vec<T>>,
    ) -> diesel::QueryResult<Vec<T>> {
        if ids.is_empty() {
            // (On Citus an empty list reaches every shard, where no row lock may be taken.)
            return Ok(Vec::new());
        }
        if !self.distributed() {
            return lock(conn, ids);
        }
        #[derive(QueryableByName)]
        struct ShardIds {
            #[diesel(sql_type = diesel::sql_types::Array<BigInt>)]
            ids: Vec<i64>,
        }
        let groups: Vec<ShardIds> = sql_query(
            "SELECT array_agg(i ORDER BY i) AS ids FROM unnest($1::bigint[]) i
             GROUP BY get_shard_id_for_distribution_column('tickets', i) ORDER BY min(i)",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
        .load(conn)?;
        let mut locked = Vec::with_capacity(ids.len());
        for group in groups {
            locked.extend(lock(conn, &group.ids)?);
        }
        Ok(locked)
    }
}

impl Layout {
    /// Locks the tickets `ids` by id alone (`lock`: a locking clause such as `FOR UPDATE SKIP
    /// LOCKED`) through [`Layout::lock_per_shard`]; returns the ids locked.
    pub fn lock_tickets(self, conn: &mut PgConnection, ids: &[i64], lock: &str) -> diesel::QueryResult<Vec<i64>> {
        let locked = self.lock_per_shard(conn, ids, |conn, ids| {
            sql_query(format!("SELECT id FROM tickets WHERE id = ANY($1) {lock}"))
                .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
                .load::<crate::db::Id>(conn)
        })?;
        Ok(locked.into_iter().map(|r| r.id).collect())
    }
}

/// The ids of the tickets with these external ids (those that exist). On the partitioned
/// layout from the keys, which are written with their tickets: tickets.external_id has no index
/// there (a ticket an application wrote without its key is not found, as on the distributed
/// layout), and a probe of the parent would be a probe of every partition.
pub fn ticket_ids_by_external_id(
    conn: &mut PgConnection,
    layout: Layout,
    external_ids: &[&str],
) -> diesel::QueryResult<std::collections::HashMap<String, i64>> {
    #[derive(QueryableByName)]
    struct IdExternal {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        external_id: String,
    }
    let sql = if layout.partitioned() {
        "SELECT ticket_id AS id, external_id FROM ticket_keys WHERE external_id = ANY($1)"
    } else {
        "SELECT id, external_id FROM tickets WHERE external_id = ANY($1)"
    };
    Ok(sql_query(sql)
        .bind::<diesel::sql_types::Array<Text>, _>(external_ids)
        .load::<IdExternal>(conn)?
        .into_iter()
        .map(|r| (r.external_id, r.id))
        .collect())
}

/// The tickets of one batch as a statement addresses them. By id everywhere; on the partitioned
/// layout also by each ticket's `created_at` (read from the keys), so that PostgreSQL reads only
/// the partitions that hold them: by id alone, which is not the partition key, each batch read
/// or hashed every partition (a `fix tag` batch of 5,000 at 1M tickets: ~320 ms to hash the
/// whole table in its UPDATE, growing with the table).
pub struct BatchTickets<'a> {
    pub ids: &'a [i64],
    pub layout: Layout,
    /// Partitioned layout: the created_at of each of `ids`, in the same order.
    created: Option<Vec<chrono::DateTime<chrono::Utc>>>,
}

impl<'a> BatchTickets<'a> {
    /// `ids` in ascending order, as batches are taken.
    pub fn read(conn: &mut PgConnection, layout: Layout, ids: &'a [i64]) -> diesel::QueryResult<BatchTickets<'a>> {
        #[derive(QueryableByName)]
        struct Key {
            #[diesel(sql_type = BigInt)]
            ticket_id: i64,
            #[diesel(sql_type = diesel::sql_types::Timestamptz)]
            created_at: chrono::DateTime<chrono::Utc>,
        }
        let mut created = None;
        if layout.partitioned() && !ids.is_empty() && ids.windows(2).all(|w| w[0] < w[1]) {
            let keys: Vec<Key> =
                sql_query("SELECT ticket_id, created_at FROM ticket_keys WHERE ticket_id = ANY($1) ORDER BY ticket_id")
                    .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
                    .load(conn)?;
            // A ticket without its key (written by hand) leaves the batch addressed by id alone.
            if keys.len() == ids.len() && keys.iter().zip(ids).all(|(k, id)| k.ticket_id == *id) {
                created = Some(keys.into_iter().map(|k| k.created_at).collect());
            }
        }
        Ok(BatchTickets { ids, layout, created })
    }

    /// A batch whose tickets' created_at values are known already: the batches that remove
    /// tickets lock them with it.
    pub fn with_created(
        layout: Layout,
        ids: &'a [i64],
        created_at: &[chrono::DateTime<chrono::Utc>],
    ) -> BatchTickets<'a> {
        BatchTickets {
            ids,
            layout,
            created: layout.partitioned().then(|| created_at.to_vec()),
        }
    }

    /// The condition on `alias` (ids in `$1`); on partitions also its created_at among the
    /// batch's, in `$created`, the statement's next free parameter (bound by
    /// [`BatchTickets::bind_created`]): PostgreSQL then plans for those partitions alone.
    pub fn condition(&self, alias: &str, created: usize) -> String {
        match self.created {
            Some(_) => format!("{alias}.id = ANY($1) AND {alias}.created_at = ANY(${created})"),
            None => format!("{alias}.id = ANY($1)"),
        }
    }

    /// For a statement run after [`BatchTickets::row_by_row`]: on partitions each ticket as
    /// the pair (id, created_at), looked up in its one partition (pruned at run time, ticket by
    /// ticket); elsewhere as [`BatchTickets::condition`].
    pub fn each_row(&self, alias: &str, created: usize) -> String {
        match self.created {
            Some(_) => format!(
                "({alias}.id, {alias}.created_at) IN (SELECT * FROM unnest($1::bigint[], ${created}::timestamptz[]))"
            ),
            None => self.condition(alias, created),
        }
    }

    /// Whether the statements address each ticket by (id, created_at).
    pub fn by_partition(&self) -> bool {
        self.created.is_some()
    }

    /// On partitions, joins as nested loops for the rest of the transaction ([`by_key_plans`]),
    /// so that [`BatchTickets::each_row`] probes one partition a ticket: even pruned to the
    /// batch's months, a batch spread over every month otherwise read every partition.
    pub fn row_by_row(&self, conn: &mut PgConnection) -> diesel::QueryResult<()> {
        if self.created.is_some() {
            by_key_plans(conn)?;
        }
        Ok(())
    }

    /// Binds the created_at values when [`BatchTickets::condition`] or
    /// [`BatchTickets::each_row`] named them.
    pub fn bind_created<'q>(
        &'q self,
        query: diesel::query_builder::BoxedSqlQuery<'q, diesel::pg::Pg, diesel::query_builder::SqlQuery>,
    ) -> diesel::query_builder::BoxedSqlQuery<'q, diesel::pg::Pg, diesel::query_builder::SqlQuery> {
        match &self.created {
            Some(created) => query.bind::<diesel::sql_types::Array<diesel::sql_types::Timestamptz>, _>(created),
            None => query,
        }
    }
}

/// On the partitioned layout, `tickets` as `alias`, each row of `pairs` (a FROM item with
/// columns `id` and `created_at`) looked up in its one partition: a LATERAL subquery, which
/// PostgreSQL runs once a pair with the partition pruned at run time. `OFFSET 0` keeps it from
/// being flattened into a join, which the planner, pricing a probe as one of every partition,
/// would run as a hash of the whole table (`fix apply`: 480 ms a batch at 1M tickets).
pub fn probe_tickets(pairs: &str, alias: &str) -> String {
    format!(
        "CROSS JOIN LATERAL (SELECT * FROM tickets {alias} \
         WHERE {alias}.id = {pairs}.id AND {alias}.created_at = {pairs}.created_at OFFSET 0) {alias}"
    )
}

/// Like [`probe_tickets`], for a ticket named by the expressions `id` and `created_at` (its
/// key's, NULL when the ticket has none — written by hand): a ticket without a key is looked
/// up by id in every partition, a branch PostgreSQL skips for the others.
pub fn probe_ticket_at(alias: &str, id: &str, created_at: &str) -> String {
    format!(
        "CROSS JOIN LATERAL (SELECT * FROM tickets {alias} \
         WHERE {alias}.id = {id} AND {alias}.created_at = {created_at} \
         UNION ALL SELECT * FROM tickets {alias} WHERE {created_at} IS NULL AND {alias}.id = {id} OFFSET 0) {alias}"
    )
}

/// For the rest of the transaction, joins of a batch's keys to a large table as nested loops:
/// an index probe a row. The planner, weighing a batch's probes against reading the whole
/// table, would rather hash the batch and scan the table, at a cost growing with the table: on
/// the partitioned tickets (each probe pruned to one partition at run time; measured 0.3-0.7 s
/// a batch at 1M tickets, against 50 ms) and for the stored comments a batch of them is merged
/// with (96 ms against 3 ms a batch at 300,000 comments).
pub fn by_key_plans(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection as _;
    conn.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
}

/// On Citus, for the rest of the transaction, the statements of a batch find its tickets on
/// each shard by primary key and join by hash or merge. Every shard gets the whole batch's
/// ids, and its planner — with statistics from before the rows were rewritten — read the
/// whole shard for them and re-ran the aggregate of stored tag links once per ticket: a batch
/// of 2,000 changed tickets took 0.9 s to compare at 300,000 tickets, growing with the table
/// (one shard's part of a batch: 63 → 18 ms).
pub fn shard_batch_plans(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection as _;
    conn.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_nestloop = off")
}

/// Undoes [`by_key_plans`] and [`shard_batch_plans`] for the rest of the transaction: a
/// statement that joins a batch to itself or to another batch-sized set needs hash joins (as
/// nested loops, a batch of 2,000 tag links compared every row with every other: 0.76 s a
/// batch).
pub fn any_plans(conn: &mut PgConnection) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection as _;
    conn.batch_execute(
        "SET LOCAL enable_hashjoin TO DEFAULT; SET LOCAL enable_mergejoin TO DEFAULT; \
         SET LOCAL enable_seqscan TO DEFAULT; SET LOCAL enable_nestloop TO DEFAULT",
    )
}

/// Refuses, before anything is migrated, to make the partitioned layout where this session
/// would create the tables in a schema other than `public`: its SQL and pg_partman's
/// configuration name `public.tickets` (and the migrations do, which are history). A role or
/// database whose `search_path` puts another schema first got the plain tables made there and
/// then failed half way. Later commands find the tables in `public` through such a path.
pub fn require_public_schema(conn: &mut PgConnection, to: Layout) -> anyhow::Result<()> {
    #[derive(QueryableByName)]
    struct Schema {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        schema: Option<String>,
        #[diesel(sql_type = Text)]
        search_path: String,
    }
    if to != Layout::Partitioned {
        return Ok(());
    }
    let here: Schema = sql_query("SELECT current_schema() AS schema, current_setting('search_path') AS search_path")
        .get_result(conn)
        .context("cannot read the session's search_path")?;
    if here.schema.as_deref() == Some("public") {
        return Ok(());
    }
    Err(crate::exit::UsageError(format!(
        "the partitioned layout keeps its tables in the schema public, but this session would make them in {} \
         (search_path = {}): migrate with public first, e.g. PGOPTIONS='-c search_path=public' ticketops migrate run \
         --layout partitioned (later commands find the tables in public through the same search_path)",
        here.schema
            .map_or_else(|| "no schema".to_owned(), |s| format!("\"{s}\"")),
        here.search_path
    ))
    .into())
}

/// Turns the freshly migrated, empty plain schema into `to`. Refuses when tickets, comments
/// or users hold rows: a layout is chosen before the data comes.
pub fn choose(conn: &mut PgConnection, to: Layout) -> anyhow::Result<()> {
    let current = Layout::of(conn)?;
    if current == to {
        return Ok(());
    }
    let rows: crate::db::Count = sql_query(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM tickets LIMIT 1) t)
              + (SELECT count(*) FROM (SELECT 1 FROM users LIMIT 1) u)
              + (SELECT count(*) FROM (SELECT 1 FROM comments LIMIT 1) c) AS n",
    )
    .get_result(conn)?;
    if current != Layout::Plain || rows.n > 0 {
        return Err(crate::exit::UsageError(format!(
            "the database has the {} layout{}; a layout is chosen once, on an empty database \
             (export, migrate a new database with --layout {}, import)",
            current.as_str(),
            if rows.n > 0 { " and holds data" } else { "" },
            to.as_str()
        ))
        .into());
    }
    let sql = match to {
        Layout::Plain => unreachable!("plain is where every database starts"),
        Layout::Partitioned => include_str!("layout/partitioned.sql"),
        Layout::Distributed => {
            workers_are_registered(conn)?;
            include_str!("layout/distributed.sql")
        }
    };
    // One statement at a time: Citus refuses some of its functions inside a multi-statement
    // query string.
    conn.build_transaction()
        .run(|conn| {
            statements(sql)
                .try_for_each(|statement| diesel::connection::SimpleConnection::batch_execute(conn, statement))
        })
        .map_err(|e| {
            let hint = if e.to_string().contains("pg_partman") {
                " (the partitioned layout needs pg_partman on the server: apt-get install postgresql-15-partman)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot set up the {} layout: {e}{hint}", to.as_str())
        })
}

/// The statements of a layout script: split at semicolons that end a line outside a
/// dollar-quoted body.
fn statements(script: &str) -> impl Iterator<Item = &str> {
    let mut in_body = false;
    let mut start = 0;
    let mut ends = Vec::new();
    let mut offset = 0;
    for line in script.split_inclusive('\n') {
        in_body ^= line.matches("$$").count() % 2 == 1;
        offset += line.len();
        if !in_body && line.trim_end().ends_with(';') && !line.trim_start().starts_with("--") {
            ends.push(offset);
        }
    }
    ends.push(script.len());
    ends.into_iter()
        .map(move |end| {
            let statement = &script[start..end];
            start = end;
            statement
        })
        .filter(|s| {
            s.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        })
}

/// The distributed layout needs the Citus extension in this database and at least one worker.
fn workers_are_registered(conn: &mut PgConnection) -> anyhow::Result<()> {
    #[derive(QueryableByName)]
    struct Workers {
        #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
        n: Option<i64>,
    }
    let citus: Workers =
        sql_query("SELECT count(*) AS n FROM pg_extension WHERE extname = 'citus'").get_result(conn)?;
    if citus.n != Some(1) {
        return Err(crate::exit::UsageError(
            "the distributed layout needs a Citus coordinator: this database has no citus extension \
             (CREATE EXTENSION citus, then SELECT citus_add_node(host, port) for each worker)"
                .into(),
        )
        .into());
    }
    let workers: Workers =
        sql_query("SELECT count(*) AS n FROM pg_dist_node WHERE noderole = 'primary' AND groupid <> 0 AND isactive")
            .get_result(conn)?;
    if workers.n.unwrap_or(0) == 0 {
        return Err(crate::exit::UsageError(
            "the distributed layout needs workers: none is registered on this coordinator \
             (SELECT citus_add_node(host, port) for each)"
                .into(),
        )
        .into());
    }
    Ok(())
}

// The key table of the partitioned layout (not in schema.rs, which is the plain schema that
// `diesel print-schema` writes).
diesel::table! {
    ticket_keys (ticket_id) {
        ticket_id -> Int8,
        external_id -> Text,
        created_at -> Timestamptz,
    }
}

/// The months that have a partition of tickets, as far as this process knows: an import makes
/// the months its rows need before writing them (pg_partman makes a year back and four months
/// ahead; older dumps need older months), so that no row lands in the default partition.
#[derive(Debug, Default)]
pub struct Partitions {
    known: std::collections::HashSet<(i32, u32)>,
    /// The initial load: the months' foreign keys from links to tickets come after it (the
    /// tickets' keys are dropped meanwhile).
    month_keys_later: bool,
}

impl Partitions {
    /// For an import; `initial_load`: without the months' foreign keys, which the load adds at
    /// its end.
    pub fn for_import(initial_load: bool) -> Partitions {
        Partitions {
            known: Default::default(),
            month_keys_later: initial_load,
        }
    }

    /// Whether a month of `times` is not known to have its partitions yet (`ensure` would ask
    /// for it).
    pub fn any_missing(&self, times: impl IntoIterator<Item = chrono::DateTime<chrono::Utc>>) -> bool {
        use chrono::Datelike;
        times.into_iter().any(|t| !self.known.contains(&(t.year(), t.month())))
    }

    /// Makes sure each month of `times` has its partition of tickets, ticket_tags and comments,
    /// with the foreign keys between them (`ticketops_create_months`: pg_partman's
    /// `create_partition_time`, which skips those that exist and attaches the others — a SHARE
    /// UPDATE EXCLUSIVE lock on the parent, and an exclusive one on the default partition while
    /// it checks that none of its rows belong to the month, held to the end of the caller's
    /// transaction). Asked once per
    /// month per process, for the month's first and last instant in UTC, so that the months
    /// are right whatever the server's time zone.
    pub fn ensure(
        &mut self,
        conn: &mut PgConnection,
        times: impl IntoIterator<Item = chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<()> {
        use chrono::{Datelike, TimeZone};
        let mut bounds: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
        for t in times {
            let month = (t.year(), t.month());
            if !self.known.insert(month) {
                continue;
            }
            let first = chrono::Utc.with_ymd_and_hms(month.0, month.1, 1, 0, 0, 0).single();
            let next = if month.1 == 12 {
                chrono::Utc.with_ymd_and_hms(month.0 + 1, 1, 1, 0, 0, 0).single()
            } else {
                chrono::Utc.with_ymd_and_hms(month.0, month.1 + 1, 1, 0, 0, 0).single()
            };
            bounds.extend(first);
            bounds.extend(next.map(|n| n - chrono::Duration::microseconds(1)));
        }
        if bounds.is_empty() {
            return Ok(());
        }
        // The same months of tag links and comments, and the foreign keys between them.
        sql_query("SELECT ticketops_create_months($1::timestamptz[], $2)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Timestamptz>, _>(&bounds)
            .bind::<diesel::sql_types::Bool, _>(!self.month_keys_later)
            .execute(conn)
            .map_err(|err| {
                use diesel::result::{DatabaseErrorKind, Error};
                match err {
                    // Kept as they are, for the callers that tell a lost connection apart.
                    Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _) | Error::BrokenTransactionManager => {
                        anyhow::Error::from(err)
                            .context("cannot create the monthly partitions of tickets the rows need")
                    }
                    other => months_error(&other.to_string(), &bounds),
                }
            })?;
        Ok(())
    }
}

/// What `create_partition_time` failed with, on one line: pg_partman re-raises the error with
/// its CONTEXT, DETAIL and HINT on lines of their own, empty ones included. A permission error
/// (a role that may write tickets but does not own it: pg_partman attaches the new month) gets
/// the months the rows need and what the owner can do.
fn months_error(message: &str, bounds: &[chrono::DateTime<chrono::Utc>]) -> anyhow::Error {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|part| {
            !part.is_empty()
                && !part.starts_with("CONTEXT:")
                // (the context of ticketops_create_months, which called pg_partman)
                && !part.starts_with("SQL statement \"")
                && !part.starts_with("PL/pgSQL function ")
                && !matches!(*part, "DETAIL:" | "HINT:")
        })
        .collect();
    let reason = parts.join("; ");
    let mut months: Vec<String> = bounds.iter().map(|t| t.format("%Y-%m").to_string()).collect();
    months.sort();
    months.dedup();
    let next = if reason.contains("out of shared memory") {
        // Each month made or written holds locks on its partitions and their indexes until the
        // transaction ends: hundreds of months in one transaction overflow the lock table.
        " — a transaction locks every month it makes or writes, with its indexes, until it ends: raise \
         max_locks_per_transaction (a server restart; see docs/scaling.md)"
            .to_owned()
    } else if reason.contains("permission denied") || reason.contains("must be owner") {
        let first_days: Vec<String> = months.iter().map(|m| format!("'{m}-01'")).collect();
        format!(
            " — the owner of tickets makes them: run the import as the owner, or have the owner run \
             SELECT ticketops_create_months(ARRAY[{}]::timestamptz[]) first",
            first_days.join(", ")
        )
    } else {
        String::new()
    };
    // A dump of decades names hundreds of months: the first ones say enough.
    const SHOWN: usize = 12;
    let shown = if months.len() > SHOWN {
        format!("{}, and {} more", months[..SHOWN].join(", "), months.len() - SHOWN)
    } else {
        months.join(", ")
    };
    anyhow::anyhow!("cannot create the monthly partitions of tickets the rows need ({shown}): {reason}{next}")
}

/// A monthly partition of tickets, as the catalog bounds it.
#[derive(Debug, Clone, QueryableByName)]
pub struct MonthlyPartition {
    /// As the catalog names it (quoted where needed).
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub from: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub until: chrono::DateTime<chrono::Utc>,
    /// Whether this user may write the partition itself (not only through the parent).
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub insertable: bool,
    /// Whether this user owns (is a member of the owner of) both the partition and tickets, as
    /// retention asks before it drops the month whole (dropping takes the owner of the month).
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub owned: bool,
}

/// The monthly partitions of tickets (the default partition left out), oldest first.
pub fn monthly_partitions(conn: &mut PgConnection) -> anyhow::Result<Vec<MonthlyPartition>> {
    monthly_partitions_of(conn, "tickets")
}

/// The monthly partitions of `table` (tickets or ticket_tags), oldest first; `owned` as for
/// tickets.
pub fn monthly_partitions_of(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<MonthlyPartition>> {
    sql_query(format!(
        "SELECT name, lo AS \"from\", hi AS until, insertable, owned FROM (
             SELECT c.oid::regclass::text AS name, has_table_privilege(c.oid, 'INSERT') AS insertable,
                    pg_has_role(c.relowner, 'USAGE')
                      AND pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'tickets'::regclass), 'USAGE') AS owned,
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz AS lo,
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz AS hi
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = '{table}'::regclass AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
         ) p ORDER BY lo",
    ))
    .load(conn)
    .with_context(|| format!("cannot list the partitions of {table}"))
}

/// A range of created_at that reaches one partition of tickets (`None`: open on that side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

impl Span {
    /// Every created_at.
    pub const ALL: Span = Span {
        from: None,
        until: None,
    };

    /// Whether some created_at at or after `after` and before `before` falls in it.
    pub fn meets(
        &self,
        after: Option<chrono::DateTime<chrono::Utc>>,
        before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> bool {
        let starts_before_it_ends = match (after, self.until) {
            (Some(after), Some(until)) => after < until,
            _ => true,
        };
        let ends_after_it_starts = match (before, self.from) {
            (Some(before), Some(from)) => from < before,
            _ => true,
        };
        starts_before_it_ends && ends_after_it_starts
    }
}

/// The created_at ranges that each reach one partition of tickets, oldest first: each month's
/// bounds and, before, between and after the months, what goes to the default partition.
/// `months` oldest first, as `monthly_partitions` lists them.
pub fn partition_spans(months: &[MonthlyPartition]) -> Vec<Span> {
    let mut spans = Vec::with_capacity(months.len() * 2 + 1);
    let mut covered_until = None;
    for month in months {
        if covered_until.is_none_or(|until| until < month.from) {
            spans.push(Span {
                from: covered_until,
                until: Some(month.from),
            });
        }
        spans.push(Span {
            from: Some(month.from),
            until: Some(month.until),
        });
        covered_until = Some(month.until);
    }
    spans.push(Span {
        from: covered_until,
        until: None,
    });
    spans
}

/// The month of `table` (ticket_tags or comments) with the bounds of `tickets_month` (a
/// partition of tickets, as the catalog names it), if it exists.
pub fn same_month_of(conn: &mut PgConnection, table: &str, tickets_month: &str) -> anyhow::Result<Option<String>> {
    Ok(same_months_of(conn, table, &[tickets_month])?.pop())
}

/// The months of `table` (ticket_tags or comments) with the bounds of `tickets_months`
/// (partitions of tickets), those that exist.
pub fn same_months_of(conn: &mut PgConnection, table: &str, tickets_months: &[&str]) -> anyhow::Result<Vec<String>> {
    let months: Vec<crate::db::Name> = sql_query(
        "SELECT l.oid::regclass::text AS name
         FROM unnest($1::text[]) AS m(name)
         JOIN pg_class t ON t.oid = m.name::regclass
         JOIN pg_inherits i ON i.inhparent = $2::regclass
         JOIN pg_class l ON l.oid = i.inhrelid
         WHERE pg_get_expr(l.relpartbound, l.oid) = pg_get_expr(t.relpartbound, t.oid)",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(tickets_months)
    .bind::<Text, _>(table)
    .load(conn)
    .with_context(|| format!("cannot find the months of {table} of {}", tickets_months.join(", ")))?;
    Ok(months.into_iter().map(|l| l.name).collect())
}

/// How the partitions of tickets stand (partitioned layout), for `doctor`.
#[derive(Debug, serde::Serialize)]
pub struct PartitionHealth {
    /// Monthly partitions (the default one left out).
    pub partitions: i64,
    pub first_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the newest partition ends: rows from then on go to the default partition.
    pub last_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows in tickets_default: a month that gets a partition later must not have rows there.
    pub default_rows: i64,
    /// Months pg_partman keeps ahead.
    pub premake: Option<i32>,
    /// Where the months from the current one on, without a gap, end (`None`: the current month
    /// has no partition). A month made further out (an import of future-dated rows) is not
    /// "ahead" if a month before it is missing.
    pub ahead_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The month pg_partman's maintenance (or the set-up) last ran in, at the earliest: each run
    /// makes the months up to `premake` after its own, and no table records when that was.
    pub maintenance_ran_since: Option<chrono::DateTime<chrono::Utc>>,
    /// pg_partman's own retention for tickets, if set: its maintenance then drops old months
    /// without their keys, comments and tag links.
    pub partman_retention: Option<String>,
    /// Months of tickets (the default partition too) without their month of tag links, by the
    /// first day (`default` for the default partition).
    pub months_without_links: Vec<String>,
    /// Months of tag links without their foreign key to their month of tickets (made by
    /// pg_partman's maintenance since ticketops last made months).
    pub links_months_without_key: Vec<String>,
    /// The same two for comments.
    pub months_without_comments: Vec<String>,
    pub comments_months_without_key: Vec<String>,
    /// Tickets created since `recent_since` (the previous month's first day, in UTC: the months
    /// applications write into) without a row in ticket_keys: written by an application that
    /// does not write keys, so their external_id is kept unique by nothing and lookups by it do
    /// not find them. Older months are not read (an anti-join of every ticket: minutes at 10^8).
    pub recent_without_key: i64,
    pub recent_since: chrono::DateTime<chrono::Utc>,
    /// The server's lock table, for every session together: `max_locks_per_transaction` ×
    /// (`max_connections` + `max_prepared_transactions`).
    pub lock_table: i64,
    /// Months of tickets and tag links that hold rows but have no statistics yet: after an
    /// initial load (or an import of a tenth of the table), autovacuum's to analyze.
    pub months_without_statistics: i64,
    /// Tables of an initial load's staged months (`ticketops_staged_<pid>_<n>`) whose load's
    /// connection is gone: left by a load that was killed (the next initial load drops them).
    pub staged_tables_left: Vec<String>,
    /// Whether autovacuum will analyze them (on, and not off for any month).
    pub autovacuum_analyzes_months: bool,
}

/// The locks one statement over every month of tickets takes through the parent, a month:
/// the partition and its indexes (measured: 4,942 for 449 months; with the tag links joined,
/// 6,290).
const LOCKS_PER_MONTH: i64 = 11;

/// The locks an initial load takes a month: the months of tickets, tag links and comments with
/// their indexes, some in two modes (measured: 29,849 for 449 months).
const LOAD_LOCKS_PER_MONTH: i64 = 66;

/// The locks one statement over `months` months of tickets takes.
fn statement_locks(months: i64) -> i64 {
    months * LOCKS_PER_MONTH
}

/// The problem, if any, of `months` monthly partitions for a server whose lock table holds
/// `lock_table` locks: past half of it, a report over all time or an export of all tickets, with
/// any other session's locks, can fail with "out of shared memory".
fn lock_table_problem(months: i64, lock_table: i64) -> Option<String> {
    let statement = statement_locks(months);
    (statement > lock_table / 2).then(|| {
        format!(
            "{months} months of tickets: a statement over all of them takes ~{statement} locks (their partitions and \
             indexes; an initial load ~{} and more with tag links and comments), against ~{lock_table} in the server's \
             lock table for every session together: raise max_locks_per_transaction (a server restart), or remove old \
             months with `ticketops cleanup retention` (docs/scaling.md)",
            months * LOAD_LOCKS_PER_MONTH
        )
    })
}

/// The months of tickets (the default partition too) without their month of `table`
/// (ticket_tags or comments), by the first day (`default` for the default partition).
fn months_without(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let months: Vec<crate::db::Name> = sql_query(
        "SELECT coalesce(to_char(m.starts, 'YYYY-MM-DD'), 'default') AS name FROM (
             SELECT pg_get_expr(c.relpartbound, c.oid) AS bound,
                    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz
                      AS starts
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'tickets'::regclass
         ) m
         WHERE NOT EXISTS (SELECT 1 FROM pg_inherits li JOIN pg_class l ON l.oid = li.inhrelid
                           WHERE li.inhparent = $1::regclass
                             AND pg_get_expr(l.relpartbound, l.oid) = m.bound)
         ORDER BY m.starts NULLS LAST",
    )
    .bind::<Text, _>(table)
    .load(conn)
    .with_context(|| format!("cannot compare the months of tickets and of {table}"))?;
    Ok(months.into_iter().map(|m| m.name).collect())
}

/// The prefix of the tables an initial load stages its months of tickets in
/// (`ticketops_staged_<pid>_<n>`, the pid of the connection that made them; see
/// `import::tickets::staged`).
pub const STAGED_TABLE_PREFIX: &str = "ticketops_staged_";

/// The tables of initial loads' staged months, in the schema of tickets; `abandoned`: only those
/// whose load's connection (the pid in their name) is gone.
pub fn staged_tables(conn: &mut PgConnection, abandoned: bool) -> anyhow::Result<Vec<String>> {
    let tables: Vec<crate::db::Name> = sql_query(
        "SELECT c.oid::regclass::text AS name FROM pg_class c
         WHERE c.relname LIKE $1 AND c.relkind = 'r'
           AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'tickets'::regclass)
           AND NOT ($2 AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                   WHERE a.pid::text = split_part(c.relname, '_', 3)))
         ORDER BY 1",
    )
    .bind::<Text, _>(format!("{}%", STAGED_TABLE_PREFIX.replace('_', "\\_")))
    .bind::<diesel::sql_types::Bool, _>(abandoned)
    .load(conn)
    .context("cannot look for the tables of initial loads' staged months")?;
    Ok(tables.into_iter().map(|t| t.name).collect())
}

/// The months of `table` (ticket_tags or comments) without their foreign key to their month of
/// tickets.
fn months_without_key(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let months: Vec<crate::db::Name> = sql_query(
        "SELECT l.oid::regclass::text AS name
         FROM pg_inherits li JOIN pg_class l ON l.oid = li.inhrelid
         WHERE li.inhparent = $1::regclass
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                           JOIN pg_inherits ti ON ti.inhrelid = c.confrelid AND ti.inhparent = 'tickets'::regclass
                           WHERE c.conrelid = l.oid AND c.contype = 'f')
         ORDER BY 1",
    )
    .bind::<Text, _>(table)
    .load(conn)
    .with_context(|| format!("cannot read the foreign keys of the months of {table}"))?;
    Ok(months.into_iter().map(|m| m.name).collect())
}

impl PartitionHealth {
    /// About how many locks one statement over every month takes.
    pub fn statement_locks(&self) -> i64 {
        statement_locks(self.partitions)
    }

    pub fn read(conn: &mut PgConnection) -> anyhow::Result<PartitionHealth> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = BigInt)]
            default_rows: i64,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
            premake: Option<i32>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            retention: Option<String>,
        }
        let months = monthly_partitions(conn)?;
        let row: Row = sql_query(
            "SELECT (SELECT count(*) FROM tickets t
                      WHERE t.tableoid IN (SELECT c.oid FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                                           WHERE i.inhparent = 'tickets'::regclass
                                             AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT')) AS default_rows,
                    c.premake, c.retention
             FROM (SELECT 1) one
             LEFT JOIN partman.part_config c ON c.parent_table = 'public.tickets'",
        )
        .get_result(conn)
        .context("cannot read the default partition of tickets")?;
        let now = chrono::Utc::now();
        let spans: Vec<_> = months.iter().map(|m| (m.from, m.until)).collect();
        let ahead_until = contiguous_until(&spans, now);
        let recent_since = previous_month_start(now);
        let recent_without_key: crate::db::Count = sql_query(
            "SELECT count(*) AS n FROM tickets t
             WHERE t.created_at >= $1
               AND NOT EXISTS (SELECT 1 FROM ticket_keys k WHERE k.ticket_id = t.id)",
        )
        .bind::<diesel::sql_types::Timestamptz, _>(recent_since)
        .get_result(conn)
        .context("cannot look for recent tickets without their key")?;
        let lock_table: crate::db::Count = sql_query(
            "SELECT current_setting('max_locks_per_transaction')::bigint
                    * (current_setting('max_connections')::bigint + current_setting('max_prepared_transactions')::bigint)
                    AS n",
        )
        .get_result(conn)
        .context("cannot read the size of the server's lock table")?;
        // By pg_stats, which outlives the server's activity counters (reset by a crash).
        let without_statistics: crate::db::Count = sql_query(format!(
            "SELECT count(*) AS n
             FROM ({MONTHS_OF_TICKETS_AND_LINKS}) t
             JOIN pg_class c ON c.oid = t.relid
             WHERE c.reltuples > 0
               AND NOT EXISTS (SELECT 1 FROM pg_stats s
                               WHERE s.schemaname = c.relnamespace::regnamespace::text AND s.tablename = c.relname)"
        ))
        .get_result(conn)
        .context("cannot look for months without statistics")?;
        Ok(PartitionHealth {
            partitions: months.len() as i64,
            first_from: months.iter().map(|m| m.from).min(),
            last_until: months.iter().map(|m| m.until).max(),
            default_rows: row.default_rows,
            premake: row.premake,
            ahead_until,
            maintenance_ran_since: ahead_until
                .zip(row.premake)
                .and_then(|(until, premake)| until.checked_sub_months(chrono::Months::new(premake.max(0) as u32 + 1))),
            partman_retention: row.retention,
            months_without_links: months_without(conn, "ticket_tags")?,
            links_months_without_key: months_without_key(conn, "ticket_tags")?,
            months_without_comments: months_without(conn, "comments")?,
            comments_months_without_key: months_without_key(conn, "comments")?,
            recent_without_key: recent_without_key.n,
            recent_since,
            lock_table: lock_table.n,
            months_without_statistics: without_statistics.n,
            staged_tables_left: staged_tables(conn, true)?,
            autovacuum_analyzes_months: autovacuum_analyzes_months(conn)?,
        })
    }

    /// What needs doing, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let now = chrono::Utc::now();
        let schedule = "run `SELECT partman.run_maintenance()` from cron, or pg_partman_bgw";
        match self.ahead_until {
            _ if self.partitions == 0 => problems.push("tickets has no monthly partitions".into()),
            Some(until) if until >= now + chrono::Duration::days(31) => {}
            Some(until) => problems.push(format!(
                "the partitions of tickets end on {}: pg_partman's maintenance has not run lately \
                 ({schedule}); newer rows go to the default partition",
                until.format("%Y-%m-%d")
            )),
            None => problems.push(format!(
                "the current month has no partition of tickets: pg_partman's maintenance has not run lately \
                 ({schedule}); its rows go to the default partition"
            )),
        }
        // Before the months run out: a month with no run at all (each run makes the month
        // `premake` after its own).
        if let Some(since) = self.maintenance_ran_since
            && self
                .ahead_until
                .is_some_and(|until| until >= now + chrono::Duration::days(31))
            && since
                .checked_add_months(chrono::Months::new(2))
                .is_some_and(|t| t <= now)
        {
            problems.push(format!(
                "pg_partman's maintenance has not run since {} ({schedule}): the months made ahead end on {}",
                since.format("%Y-%m"),
                self.ahead_until
                    .map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_default()
            ));
        }
        if let Some(retention) = &self.partman_retention {
            problems.push(format!(
                "pg_partman's retention is set for tickets ({retention}): its maintenance drops old months without \
                 their keys, comments and tag links, and an import of such a ticket then fails on its key; unset it \
                 (UPDATE partman.part_config SET retention = NULL WHERE parent_table = 'public.tickets') and remove \
                 old months with `ticketops cleanup retention`"
            ));
        }
        for (what, without, without_key) in [
            ("tag links", &self.months_without_links, &self.links_months_without_key),
            (
                "comments",
                &self.months_without_comments,
                &self.comments_months_without_key,
            ),
        ] {
            if !without.is_empty() {
                let firsts: Vec<String> = without
                    .iter()
                    .filter(|m| *m != "default")
                    .map(|m| format!("'{m}'"))
                    .collect();
                problems.push(format!(
                    "{} month(s) of tickets have no month of {what} ({}), which pg_partman makes with them: \
                     {what} of their tickets cannot be written; make them with \
                     SELECT ticketops_create_months(ARRAY[{}]::timestamptz[])",
                    without.len(),
                    without.join(", "),
                    firsts.join(", ")
                ));
            }
            if !without_key.is_empty() {
                problems.push(format!(
                    "{} month(s) of {what} lack the foreign key to their month of tickets ({}; made by pg_partman's \
                     maintenance since ticketops last made months): SELECT ticketops_month_keys() adds them (an import \
                     does too)",
                    without_key.len(),
                    without_key.join(", ")
                ));
            }
        }
        if self.recent_without_key > 0 {
            problems.push(format!(
                "{} ticket(s) created since {} have no row in ticket_keys: something writes tickets without their \
                 keys, so nothing keeps their external_id unique and no lookup by external_id finds them (an import \
                 would add a second ticket); write the key in the ticket's transaction (docs/scaling.md), and for \
                 these: INSERT INTO ticket_keys (ticket_id, external_id, created_at) SELECT id, external_id, \
                 created_at FROM tickets t WHERE created_at >= '{}' AND NOT EXISTS \
                 (SELECT 1 FROM ticket_keys k WHERE k.ticket_id = t.id)",
                self.recent_without_key,
                self.recent_since.format("%Y-%m-%d"),
                self.recent_since.format("%Y-%m-%d"),
            ));
        }
        problems.extend(lock_table_problem(self.partitions, self.lock_table));
        if !self.staged_tables_left.is_empty() {
            problems.push(format!(
                "{} table(s) left by an initial load that did not end ({}): they hold its months' rows, which it \
                 never put in place; the next initial load drops them, or DROP TABLE them",
                self.staged_tables_left.len(),
                self.staged_tables_left.join(", ")
            ));
        }
        if self.months_without_statistics > 0 && !self.autovacuum_analyzes_months {
            problems.push(format!(
                "{} month(s) of tickets and tag links hold rows but have no statistics, and autovacuum will not \
                 analyze them (off on the server or for a month): the planner guesses their rows' values; run \
                 ANALYZE tickets, ticket_tags",
                self.months_without_statistics
            ));
        }
        if self.default_rows > 0 {
            problems.push(format!(
                "{} row(s) in the default partition tickets_default: a partition for their month cannot be made \
                 until they move (SELECT partman.partition_data_time('public.tickets'))",
                self.default_rows
            ));
        }
        problems
    }
}

/// Midnight UTC of the first day of the month before `now`'s.
fn previous_month_start(now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    use chrono::Datelike;
    let first = now.date_naive().with_day(1).expect("every month has a first day");
    let previous = first.checked_sub_months(chrono::Months::new(1)).unwrap_or(first);
    previous.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// Where the spans (each `[from, until)`, sorted by `from`) cover time without a gap from the
/// one that holds `now` on; `None` when none holds it.
fn contiguous_until(
    spans: &[(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)],
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let start = spans.iter().position(|&(from, until)| from <= now && now < until)?;
    let mut until = spans[start].1;
    for &(from, next_until) in &spans[start + 1..] {
        if from != until {
            break;
        }
        until = next_until;
    }
    Some(until)
}

/// Rows an import added to tickets, by partition (as the catalog names it), and those that
/// went to no monthly partition it knew (the default partition, or one it may not write).
#[derive(Debug, Default)]
pub struct RowsByPartition {
    by_name: std::collections::BTreeMap<String, u64>,
    elsewhere: u64,
}

impl RowsByPartition {
    pub fn add(&mut self, partition: Option<&str>, rows: u64) {
        match partition {
            Some(name) => match self.by_name.get_mut(name) {
                Some(n) => *n += rows,
                None => {
                    self.by_name.insert(name.to_owned(), rows);
                }
            },
            None => self.elsewhere += rows,
        }
    }

    pub fn merge(&mut self, other: RowsByPartition) {
        for (name, rows) in other.by_name {
            self.add(Some(&name), rows);
        }
        self.elsewhere += other.elsewhere;
    }

    fn total(&self) -> u64 {
        self.by_name.values().sum::<u64>() + self.elsewhere
    }

    /// Of the partitions (name, rows before), those whose statistics these rows made stale:
    /// more than 50 rows and a tenth of theirs, autovacuum's rule. None when the whole table
    /// is due (only if `whole_table_allowed`): the rows are a tenth of it, or some went where
    /// they cannot be told apart.
    pub fn partitions_due<'p>(&self, partitions: &[(&'p str, f64)], whole_table_allowed: bool) -> Option<Vec<&'p str>> {
        let table_rows: f64 = partitions.iter().map(|&(_, rows)| rows).sum();
        if whole_table_allowed && (self.elsewhere > 0 || self.total() as f64 >= 0.1 * table_rows) {
            return None;
        }
        Some(
            partitions
                .iter()
                .filter(|&&(name, rows)| self.by_name.get(name).is_some_and(|&n| n as f64 > 50.0 + 0.1 * rows))
                .map(|&(name, _)| name)
                .collect(),
        )
    }
}

/// Fresh statistics for tickets (and ticket_tags) on the partitioned layout after an import,
/// with its rows committed; returns what was analyzed, for `-v` (None: nothing was due).
///
/// `ANALYZE tickets` samples the parent and then analyzes every partition, one after another
/// (no `ANALYZE ONLY` before PostgreSQL 18): 3 s for 1M tickets over 24 months, against 0.3 s
/// for one table, and on a table of years of large months minutes of reading. So it runs
/// only when `changed` is None (the initial load) or, `whole_table_allowed`, the import added
/// a tenth of the table (the parent's own statistics, which autovacuum never refreshes, then
/// drift); otherwise only the months that gained more than autovacuum's threshold (50 rows
/// and a tenth of theirs) are analyzed, what autovacuum would do a minute later.
///
/// For the whole table only the parents are analyzed where autovacuum will analyze the months
/// (`analyze_parents_only`). Otherwise two connections share the work: for the whole table each
/// side analyzes in a transaction, so it holds what it analyzed, skips what the other holds
/// (`SKIP_LOCKED`), and commits only when both are done — each partition is analyzed once, by
/// whichever side came to it first. A partition autovacuum is analyzing at that moment is left
/// to it.
pub fn analyze_partitioned_tickets(
    conn: &mut PgConnection,
    pool: &crate::db::Pool,
    changed: Option<&RowsByPartition>,
    whole_table_allowed: bool,
) -> anyhow::Result<Option<String>> {
    use diesel::Connection as _;
    #[derive(QueryableByName)]
    struct Leaf {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Double)]
        rows: f64,
    }
    // The parent's ANALYZE takes its partitions in the order of their OIDs: the helper starts
    // from the other end.
    let leaves: Vec<Leaf> = sql_query(
        "SELECT t.relid::regclass::text AS name, greatest(c.reltuples, 0)::float8 AS rows
         FROM pg_partition_tree('tickets') t JOIN pg_class c ON c.oid = t.relid
         WHERE t.isleaf ORDER BY t.relid DESC",
    )
    .load(conn)
    .context("cannot list the partitions of tickets")?;
    let months_due = changed.and_then(|changed| {
        let sizes: Vec<(&str, f64)> = leaves.iter().map(|l| (l.name.as_str(), l.rows)).collect();
        changed.partitions_due(&sizes, whole_table_allowed)
    });
    if months_due.as_ref().is_some_and(Vec::is_empty) {
        return Ok(None);
    }
    let mut helper_conn = crate::db::get(pool)?;
    if let Some(months) = months_due {
        // Their months of tag links too (`ANALYZE ticket_tags` would analyze every month of
        // them). Every other month on each side, each ANALYZE committed on its own.
        let links = same_months_of(conn, "ticket_tags", &months)?;
        let all: Vec<&str> = months.iter().copied().chain(links.iter().map(String::as_str)).collect();
        return std::thread::scope(|scope| {
            let helper = scope.spawn(|| analyze_each(&mut helper_conn, all.iter().copied().step_by(2)));
            let main = analyze_each(conn, all.iter().copied().skip(1).step_by(2));
            let helper = helper
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the ANALYZE helper thread panicked")));
            main.and(helper).context("cannot ANALYZE tickets after the import")?;
            Ok(Some(format!(
                "{} month(s) of {} of tickets and of their tag links",
                months.len(),
                leaves.len()
            )))
        });
    }
    let partitions = leaves.len();
    if autovacuum_analyzes_months(conn)? {
        analyze_parents_only(conn, &mut helper_conn)?;
        return Ok(Some(format!(
            "ticket_tags and tickets, their months left to autovacuum ({partitions} of tickets)"
        )));
    }
    let (main_done, main_done_rx) = std::sync::mpsc::channel::<()>();
    let (helper_done, helper_done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let helper = scope.spawn(move || {
            helper_conn.transaction(move |c| -> anyhow::Result<()> {
                analyze_each(
                    c,
                    std::iter::once("ticket_tags").chain(leaves.iter().map(|l| l.name.as_str())),
                )?;
                let _ = helper_done.send(());
                // Until the parent's side is done too (or gone): committing earlier would let it
                // take this side's partitions again.
                let _ = main_done_rx.recv();
                Ok(())
            })
        });
        let main = conn.transaction(move |c| -> anyhow::Result<()> {
            sql_query("ANALYZE (SKIP_LOCKED) tickets")
                .execute(c)
                .context("cannot ANALYZE tickets")?;
            let _ = main_done.send(());
            let _ = helper_done_rx.recv();
            Ok(())
        });
        let helper = helper
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the ANALYZE helper thread panicked")));
        main.and(helper).context("cannot ANALYZE tickets after the import")?;
        Ok(Some(format!("ticket_tags, tickets and its {partitions} partitions")))
    })
}

/// The partitions (`relid`) of tickets and of ticket_tags, the default ones too: a subquery.
const MONTHS_OF_TICKETS_AND_LINKS: &str = "SELECT relid FROM pg_partition_tree('tickets') WHERE isleaf
     UNION ALL SELECT relid FROM pg_partition_tree('ticket_tags') WHERE isleaf";

/// Whether autovacuum will analyze the months of tickets and ticket_tags that a load filled: it
/// runs, counts rows, and neither its analyze scale factor (1 or more: never for a table that was
/// empty) nor a month's own `autovacuum_enabled = false` keeps it away.
fn autovacuum_analyzes_months(conn: &mut PgConnection) -> anyhow::Result<bool> {
    #[derive(QueryableByName)]
    struct Will {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        analyzes: bool,
    }
    let will: Will = sql_query(format!(
        "SELECT current_setting('autovacuum')::bool
                AND current_setting('track_counts')::bool
                AND current_setting('autovacuum_analyze_scale_factor')::float8 < 1
                AND NOT EXISTS (
                    SELECT FROM ({MONTHS_OF_TICKETS_AND_LINKS}) t
                    JOIN pg_class c ON c.oid = t.relid, unnest(c.reloptions) o
                    WHERE o ~* '^autovacuum_enabled=(f|fa|fal|fals|false|n|no|of|off|0)$'
                ) AS analyzes"
    ))
    .get_result(conn)
    .context("cannot read the autovacuum settings")?;
    Ok(will.analyzes)
}

/// `ANALYZE tickets, ticket_tags` for the parents' own statistics alone (the inherited sample,
/// which autovacuum never takes): the helper holds every month the role may write in the lock
/// ANALYZE takes, so the parents' `ANALYZE (SKIP_LOCKED)` samples the months through the parent
/// (a lesser lock) and skips analyzing each of them. Analyzing every month read nearly all of it
/// (1.7 s of a 1M-ticket load over 41 months, against 0.3 s for the parents); autovacuum
/// analyzes each within its naptime, as after pg_restore.
fn analyze_parents_only(conn: &mut PgConnection, helper: &mut PgConnection) -> anyhow::Result<()> {
    use diesel::Connection as _;
    let months: Vec<String> = sql_query(format!(
        "SELECT t.relid::regclass::text AS name FROM ({MONTHS_OF_TICKETS_AND_LINKS}) t
         WHERE has_table_privilege(t.relid, 'UPDATE')"
    ))
    .load::<crate::db::Name>(conn)
    .context("cannot list the partitions of tickets and ticket_tags")?
    .into_iter()
    .map(|month| month.name)
    .collect();
    helper.transaction(|helper| -> anyhow::Result<()> {
        if !months.is_empty() {
            // Behind a vacuum that will not yield (one against wraparound) the import would wait
            // as long: better a warning that the months' statistics are not fresh.
            sql_query("SET LOCAL lock_timeout = '10s'").execute(helper)?;
            sql_query(format!(
                "LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE",
                months.join(", ")
            ))
            .execute(helper)
            .context("cannot hold the months while their parents are analyzed")?;
        }
        for parent in ["tickets", "ticket_tags"] {
            sql_query(format!("ANALYZE (SKIP_LOCKED) {parent}"))
                .execute(conn)
                .with_context(|| format!("cannot ANALYZE {parent}"))?;
        }
        Ok(())
    })
}

/// `ANALYZE (SKIP_LOCKED)` of each table in turn (one a partition autovacuum holds is left to it).
fn analyze_each<'t>(conn: &mut PgConnection, tables: impl Iterator<Item = &'t str>) -> anyhow::Result<()> {
    for table in tables {
        sql_query(format!("ANALYZE (SKIP_LOCKED) {table}"))
            .execute(conn)
            .with_context(|| format!("cannot ANALYZE {table}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spans_of_the_partitions_cover_every_time_once() {
        let day = |s: &str| {
            Some(
                format!("{s}T00:00:00Z")
                    .parse::<chrono::DateTime<chrono::Utc>>()
                    .unwrap(),
            )
        };
        let month = |from: &str, until: &str| MonthlyPartition {
            name: from.into(),
            from: day(from).unwrap(),
            until: day(until).unwrap(),
            insertable: true,
            owned: true,
        };
        assert_eq!(partition_spans(&[]), [Span::ALL]);
        let spans = partition_spans(&[
            month("2023-01-01", "2023-02-01"),
            month("2023-02-01", "2023-03-01"),
            month("2024-07-01", "2024-08-01"),
        ]);
        let span = |from: Option<_>, until: Option<_>| Span { from, until };
        assert_eq!(
            spans,
            [
                span(None, day("2023-01-01")),
                span(day("2023-01-01"), day("2023-02-01")),
                span(day("2023-02-01"), day("2023-03-01")),
                span(day("2023-03-01"), day("2024-07-01")),
                span(day("2024-07-01"), day("2024-08-01")),
                span(day("2024-08-01"), None),
            ]
        );
        // --created-after 2023-02-01 --created-before 2023-03-01: February alone.
        let met: Vec<_> = spans
            .iter()
            .filter(|s| s.meets(day("2023-02-01"), day("2023-03-01")))
            .collect();
        assert_eq!(met, [&span(day("2023-02-01"), day("2023-03-01"))]);
        assert_eq!(spans.iter().filter(|s| s.meets(None, day("2023-01-01"))).count(), 1);
        assert_eq!(spans.iter().filter(|s| s.meets(None, None)).count(), 6);
    }

    fn added(rows: &[(Option<&str>, u64)]) -> RowsByPartition {
        let mut added = RowsByPartition::default();
        for &(partition, n) in rows {
            added.add(partition, n);
        }
        added
    }

    /// Midnight UTC of a `YYYY-MM-DD`.
    fn day(date: &str) -> chrono::DateTime<chrono::Utc> {
        format!("{date}T00:00:00Z").parse().unwrap()
    }

    #[test]
    fn pg_partmans_error_reads_as_one_line_with_the_months_and_the_next_step() {
        let bounds = [
            day("2019-05-01"),
            day("2019-05-31"),
            day("2019-07-01"),
            day("2019-07-31"),
        ];
        let message = "permission denied for schema public\nCONTEXT: PL/pgSQL function partman.create_partition_time(text) line 230 at EXECUTE\nDETAIL: \nHINT: ";
        assert_eq!(
            months_error(message, &bounds).to_string(),
            "cannot create the monthly partitions of tickets the rows need (2019-05, 2019-07): permission denied for \
             schema public — the owner of tickets makes them: run the import as the owner, or have the owner run \
             SELECT ticketops_create_months(ARRAY['2019-05-01', '2019-07-01']::timestamptz[]) first"
        );
        let other = months_error("lock timeout\nDETAIL: something held it\nHINT: ", &bounds[..2]).to_string();
        assert_eq!(
            other,
            "cannot create the monthly partitions of tickets the rows need (2019-05): lock timeout; DETAIL: something held it"
        );
        // Thirty years of months: the first twelve named, the lock table's remedy said.
        let decades: Vec<_> = (0..360)
            .map(|m| day(&format!("{}-{:02}-01", 1990 + m / 12, 1 + m % 12)))
            .collect();
        let full = months_error(
            "out of shared memory\nHINT: You might need to increase max_locks_per_transaction.",
            &decades,
        )
        .to_string();
        assert!(
            full.starts_with(
                "cannot create the monthly partitions of tickets the rows need (1990-01, 1990-02, 1990-03, 1990-04, \
                 1990-05, 1990-06, 1990-07, 1990-08, 1990-09, 1990-10, 1990-11, 1990-12, and 348 more): out of shared \
                 memory; HINT: You might need to increase max_locks_per_transaction. — a transaction locks every month"
            ),
            "{full}"
        );
    }

    #[test]
    fn hundreds_of_months_on_a_default_lock_table_are_a_problem() {
        // A default server: 64 × (100 + 0).
        assert_eq!(lock_table_problem(240, 6_400), None, "20 years");
        let problem = lock_table_problem(449, 6_400).expect("37 years");
        assert!(
            problem.starts_with("449 months of tickets: a statement over all of them takes ~4939 locks"),
            "{problem}"
        );
        assert_eq!(
            lock_table_problem(449, 64 * 1_000),
            None,
            "a raised max_locks_per_transaction"
        );
    }

    #[test]
    fn the_months_ahead_end_at_the_first_gap_after_the_current_one() {
        let spans = [
            (day("2026-10-01"), day("2026-11-01")),
            (day("2026-11-01"), day("2026-12-01")),
            (day("2026-12-01"), day("2027-01-01")),
            (day("2027-01-01"), day("2027-02-01")),
            (day("2030-01-01"), day("2030-02-01")),
        ];
        assert_eq!(contiguous_until(&spans, day("2026-11-15")), Some(day("2027-02-01")));
        assert_eq!(contiguous_until(&spans, day("2027-01-31")), Some(day("2027-02-01")));
        assert_eq!(
            contiguous_until(&spans, day("2027-03-01")),
            None,
            "the current month is missing"
        );
        assert_eq!(contiguous_until(&spans[..0], day("2026-11-15")), None);
    }

    const MONTHS: [(&str, f64); 4] = [("p1", 400_000.0), ("p2", 400_000.0), ("p3", 100_000.0), ("p4", 0.0)];

    #[test]
    fn an_import_of_less_than_a_tenth_of_the_table_refreshes_the_months_it_changed_enough() {
        let rows = added(&[
            (Some("p1"), 30_000),
            (Some("p3"), 10_051),
            (Some("p4"), 51),
            (Some("p2"), 40_000),
        ]);
        assert_eq!(rows.partitions_due(&MONTHS, true), Some(vec!["p3", "p4"]));
        let few = added(&[(Some("p4"), 50)]);
        assert_eq!(
            few.partitions_due(&MONTHS, true),
            Some(vec![]),
            "50 rows into an empty month"
        );
    }

    #[test]
    fn a_tenth_of_the_table_or_rows_of_no_known_month_refresh_everything() {
        let mut rows = added(&[(Some("p1"), 60_000), (Some("p3"), 20_000)]);
        assert!(rows.partitions_due(&MONTHS, true).is_some());
        rows.merge(added(&[(Some("p3"), 10_000)]));
        assert_eq!(rows.partitions_due(&MONTHS, true), None, "90,000 of 900,000");
        let elsewhere = added(&[(Some("p3"), 20_000), (None, 1)]);
        assert_eq!(elsewhere.partitions_due(&MONTHS, true), None);
        assert_eq!(
            elsewhere.partitions_due(&MONTHS, false),
            Some(vec!["p3"]),
            "a small import: its months only"
        );
        assert_eq!(rows.partitions_due(&MONTHS, false), Some(vec!["p1", "p3"]));
        assert_eq!(
            added(&[(Some("p4"), 100)]).partitions_due(&[("p4", 0.0)], true),
            None,
            "an empty table"
        );
    }
}
