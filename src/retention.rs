//! `cleanup retention`: tickets created before a cut-off removed for good, with their comments,
//! tag links and per-row audit rows, for data-protection rules ("delete tickets older than 7
//! years"). Everything removed is first written to the archive (import format) and synced.
//!
//! On the partitioned layout, with no filter but the cut-off, each monthly partition that lies
//! wholly before it goes in one step — archived by `COPY … TO` from the partition (locked
//! against writes meanwhile), then dropped with its keys — no row-by-row DELETE of tickets, no
//! dead tuples in them, and tickets itself is locked only for the drop. The
//! boundary partition, filtered runs and the plain layout go in batches like `cleanup purge`.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, sql_query};
use serde_json::json;

use crate::archive::{Archive, Marks, archive_batch, archive_staged, cut_back};
use crate::audit::{self, Action};
use crate::db::{self, BatchTimeouts};
use crate::export;
use crate::filters::{DeletedScope, ResolvedFilters};
use crate::layout::Layout;
use crate::schema::tickets;

pub const KIND: &str = "cleanup retention";

/// How runs of earlier versions, which detached a partition and dropped it in two transactions,
/// marked one detached and archived whose drop had not committed: the next run finishes it.
const DETACHED_MARK: &str = "ticketops retention: detached and archived by operation ";

/// A monthly partition that lies wholly before the cut-off.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WholePartition {
    /// As the catalog names it (quoted where needed).
    pub name: String,
    pub until: DateTime<Utc>,
    pub tickets: i64,
}

/// What a retention run would remove.
#[derive(Debug, serde::Serialize)]
pub struct Plan {
    pub tickets: i64,
    pub comments: i64,
    /// Dropped whole (partitioned layout, no filter but the cut-off).
    pub partitions: Vec<WholePartition>,
    /// Removed in batches (the rest).
    pub batched: i64,
    /// Partitions an earlier run detached and archived but did not drop.
    pub leftover: Vec<String>,
    /// Months wholly before the cut-off that this role may not drop whole (that takes the
    /// owner of the month and of tickets): removed in batches instead.
    pub months_not_owned: Vec<String>,
}

/// The scope retention works in: every ticket, soft-deleted or not, unless `--only-deleted`.
pub fn scope(filters: &ResolvedFilters) -> DeletedScope {
    if filters.filters.only_deleted {
        DeletedScope::Only
    } else {
        DeletedScope::Include
    }
}

/// Whether whole partitions may go: nothing but the cut-off (and the deleted-row scope, which
/// retention ignores) selects.
fn by_partition(layout: Layout, filters: &ResolvedFilters) -> bool {
    let f = &filters.filters;
    let mut only_cutoff = f.clone();
    only_cutoff.created_before = None;
    layout.partitioned() && only_cutoff.is_empty() && !f.only_deleted
}

pub fn plan(
    conn: &mut PgConnection,
    layout: Layout,
    filters: &ResolvedFilters,
    cutoff: DateTime<Utc>,
) -> anyhow::Result<Plan> {
    let scope = scope(filters);
    let tickets: i64 = filters.query(scope).count().get_result(conn)?;
    let comments: i64 = crate::schema::comments::table
        .filter(crate::schema::comments::ticket_id.eq_any(filters.query(scope).select(tickets::id)))
        .count()
        .get_result(conn)?;
    let (partitions, months_not_owned) = if by_partition(layout, filters) {
        whole_partitions(conn, cutoff)?
    } else {
        (Vec::new(), Vec::new())
    };
    let whole: i64 = partitions.iter().map(|p| p.tickets).sum();
    let leftover = if layout.partitioned() {
        detached_leftovers(conn)?
    } else {
        Vec::new()
    };
    Ok(Plan {
        tickets,
        comments,
        batched: tickets - whole,
        partitions,
        leftover,
        months_not_owned,
    })
}

/// The monthly partitions of tickets that end at or before `cutoff`, oldest first, with their
/// row counts (read through tickets, as the role may read no partition by name), and apart the
/// names of those this role does not own with tickets: retention asks that before it drops one whole.
fn whole_partitions(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
) -> anyhow::Result<(Vec<WholePartition>, Vec<String>)> {
    let mut partitions = Vec::new();
    let mut not_owned = Vec::new();
    for month in crate::layout::monthly_partitions(conn)?
        .into_iter()
        .filter(|m| m.until <= cutoff)
    {
        if !month.owned {
            not_owned.push(month.name);
            continue;
        }
        let count: db::Count =
            sql_query("SELECT count(*) AS n FROM tickets WHERE created_at >= $1 AND created_at < $2")
                .bind::<diesel::sql_types::Timestamptz, _>(month.from)
                .bind::<diesel::sql_types::Timestamptz, _>(month.until)
                .get_result(conn)?;
        partitions.push(WholePartition {
            name: month.name,
            until: month.until,
            tickets: count.n,
        });
    }
    Ok((partitions, not_owned))
}

/// Tables an earlier run detached and archived but did not get to drop.
fn detached_leftovers(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let names: Vec<db::Name> = sql_query(
        "SELECT c.oid::regclass::text AS name FROM pg_class c
         WHERE c.relkind = 'r' AND NOT c.relispartition AND obj_description(c.oid, 'pg_class') LIKE $1 || '%'
         ORDER BY 1",
    )
    .bind::<Text, _>(DETACHED_MARK)
    .load(conn)?;
    Ok(names.into_iter().map(|n| n.name).collect())
}

/// What removing one partition did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Removed {
    pub tickets: u64,
    pub comments: u64,
}

/// Removes one whole partition, in one `REPEATABLE READ` transaction: locks it and its months of
/// tag links and comments against writes, appends its tickets and their comments to the
/// archives (`COPY … TO`, synced) on `archive_conn` while it deletes their per-row audit rows
/// and their keys (tickets' and comments'), then drops the months of links and comments and
/// itself (tickets, ticket_tags and comments themselves, and their default partitions, are
/// locked only for that last step, and nothing else the application reads is). A failure rolls
/// back and cuts the archives back.
///
/// Each month of links and of comments references its month of tickets, so its lock keeps every
/// writer of the month's tickets, links and comments out until the month is gone: the archive's
/// snapshot and the deletes', both taken after the lock, see the same rows.
pub fn remove_partition(
    conn: &mut PgConnection,
    archive_conn: &mut PgConnection,
    op_id: i64,
    partition: &WholePartition,
    archive: &mut Archive,
    comments_archive: Option<&mut Archive>,
    timeouts: BatchTimeouts,
) -> anyhow::Result<Removed> {
    let name = &partition.name;
    // Its tag links and comments, in their own months, go with it. Looked up before the
    // transaction: a query in it would take its snapshot before the lock, and rows written in
    // between would be dropped unseen.
    let months = MonthParts {
        links: crate::layout::same_month_of(conn, "ticket_tags", name)?,
        comments: crate::layout::same_month_of(conn, "comments", name)?,
    };
    let mut marks = Marks::default();
    let mut comments_archive = comments_archive;
    let removed = conn
        .build_transaction()
        .repeatable_read()
        .run(|conn| -> anyhow::Result<Removed> {
            db::set_local_timeouts(conn, timeouts)?;
            // Before the snapshot, which LOCK does not take: it then holds every write to the
            // month.
            let locked: Vec<&str> = std::iter::once(name.as_str()).chain(months.names()).collect();
            let locked = locked.join(", ");
            sql_query(format!("LOCK TABLE {locked} IN SHARE MODE"))
                .execute(conn)
                .with_context(|| format!("cannot lock {locked} against writes while it is archived"))?;
            // The archive on the second connection while this one deletes the keys and audit
            // rows: the two take the machine's cores side by side instead of in turn (the
            // deletes were ~40% of a month's time besides its archive).
            let (archived, removed) = std::thread::scope(|scope| {
                let archiving = scope.spawn(|| {
                    archive_month(
                        archive_conn,
                        name,
                        &months,
                        archive,
                        comments_archive.as_deref_mut(),
                        &mut marks,
                        timeouts,
                    )
                });
                let removed = remove_month_rows(conn, name, &months);
                let archived = archiving
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (archived, removed)
            });
            let (archived, removed) = (archived?, removed?);
            if archived != removed.tickets {
                anyhow::bail!(
                    "the archive of {name} holds {archived} tickets but {} were to go; nothing is removed",
                    removed.tickets
                );
            }
            // The parents first, in the order readers lock them (a parent, then its
            // partitions): dropping a month of links or comments takes the tickets' month
            // exclusively (its foreign key's triggers live there), and holding that while
            // waiting for tickets itself deadlocked with a reader of tickets. In short tries:
            // readers queue behind the lock while it waits. ONLY: the other months are not
            // this step's to hold.
            let parents: Vec<&str> = std::iter::once("tickets").chain(months.parents()).collect();
            let only: Vec<String> = parents.iter().map(|parent| format!("ONLY {parent}")).collect();
            db::lock_in_short_tries(
                conn,
                &format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", only.join(", ")),
                timeouts.lock_timeout,
            )
            .with_context(|| format!("cannot lock {} to drop the month", parents.join(", ")))?;
            months.drop_attached(conn, name)?;
            // Dropped while attached, not detached first: a detached month's foreign keys
            // (to users, organizations, tags, bulk_operations) become constraints of their own
            // with triggers on those tables, which its DROP then takes exclusively to remove —
            // every reader of users waited for that.
            sql_query(format!("DROP TABLE {name}"))
                .execute(conn)
                .with_context(|| format!("cannot drop {name} (nothing of it was removed)"))?;
            record_month(conn, op_id, name, removed)?;
            Ok(removed)
        });
    if removed.is_err() {
        cut_back(Some(archive), comments_archive, marks);
    }
    removed
}

/// Appends the month `name`'s tickets and their comments to the archives, synced, in a
/// transaction of `conn`'s own, which ends (releasing its locks on the month) before the month
/// is dropped. Returns how many tickets it archived.
fn archive_month(
    conn: &mut PgConnection,
    name: &str,
    months: &MonthParts,
    archive: &mut Archive,
    comments_archive: Option<&mut Archive>,
    marks: &mut Marks,
    timeouts: BatchTimeouts,
) -> anyhow::Result<u64> {
    conn.build_transaction()
        .repeatable_read()
        .run(|conn| -> anyhow::Result<u64> {
            db::set_local_timeouts(conn, timeouts)?;
            export::stage_partition(conn, name, months.comments.as_deref())?;
            let archived = archive_staged(conn, archive, comments_archive, marks)?;
            export::unstage(conn)?;
            Ok(archived)
        })
}

/// The months of tag links and of comments that go with a month of tickets, those that exist
/// (each references it; a month made by hand may lack them, and its rows are then deleted
/// row by row).
struct MonthParts {
    links: Option<String>,
    comments: Option<String>,
}

impl MonthParts {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.links.iter().chain(&self.comments).map(String::as_str)
    }

    /// The parents of the months that exist.
    fn parents(&self) -> impl Iterator<Item = &'static str> {
        let links = self.links.as_ref().map(|_| "ticket_tags");
        let comments = self.comments.as_ref().map(|_| "comments");
        links.into_iter().chain(comments)
    }

    /// Drops them, attached (see [`remove_partition`]).
    fn drop_attached(&self, conn: &mut PgConnection, tickets_month: &str) -> anyhow::Result<()> {
        for month in self.names() {
            sql_query(format!("DROP TABLE {month}"))
                .execute(conn)
                .with_context(|| format!("cannot drop {month} (nothing of {tickets_month} was removed)"))?;
        }
        Ok(())
    }
}

/// Stages the ids of the tickets of the month `name` in [`GONE`] and deletes what hangs off them
/// and does not go with the months of `months`: their per-row audit rows and those of their
/// comments, the comments' keys and the tickets' keys (and the links and comments themselves
/// where their month is missing).
fn remove_month_rows(conn: &mut PgConnection, name: &str, months: &MonthParts) -> anyhow::Result<Removed> {
    stage_gone(conn)?;
    let tickets = sql_query(format!("INSERT INTO {GONE} SELECT id FROM {name}")).execute(conn)? as u64;
    analyze_gone(conn, true)?;
    let comments = match &months.comments {
        Some(month) => {
            sql_query(format!(
                "DELETE FROM audit_log WHERE table_name = 'comments' AND row_id IN (SELECT id FROM {month})"
            ))
            .execute(conn)?;
            sql_query(format!(
                "DELETE FROM comment_keys WHERE external_id IN (SELECT external_id FROM {month})"
            ))
            .execute(conn)?;
            sql_query(format!("SELECT count(*) AS n FROM {month}"))
                .get_result::<db::Count>(conn)?
                .n as u64
        }
        None => remove_comments(conn)?,
    };
    remove_ticket_rows(conn, months.links.is_none())?;
    sql_query(format!(
        "DELETE FROM ticket_keys WHERE ticket_id IN (SELECT id FROM {GONE})"
    ))
    .execute(conn)?;
    Ok(Removed { tickets, comments })
}

/// The operation's audit row for a month that went whole.
fn record_month(conn: &mut PgConnection, op_id: i64, name: &str, removed: Removed) -> anyhow::Result<()> {
    audit::record_batch(
        conn,
        op_id,
        "tickets",
        Action::Purge,
        0,
        Some(json!({"partition": name, "tickets": removed.tickets})),
        None,
    )?;
    Ok(())
}

/// Drops a partition that a run of an earlier version detached and archived but did not get to
/// drop (it went in two transactions then), and everything that hangs off its tickets.
pub fn drop_detached(
    conn: &mut PgConnection,
    op_id: i64,
    name: &str,
    timeouts: BatchTimeouts,
) -> anyhow::Result<Removed> {
    db::in_batch_transaction(conn, timeouts, |conn| -> anyhow::Result<Removed> {
        // Its months of tag links and comments (archived with it), which reference it.
        let referencing: Vec<Referencing> = sql_query(
            "SELECT c.conrelid::regclass::text AS name, i.inhparent::regclass::text AS parent FROM pg_constraint c
             JOIN pg_inherits i ON i.inhrelid = c.conrelid
              AND i.inhparent IN ('ticket_tags'::regclass, 'comments'::regclass)
             WHERE c.contype = 'f' AND c.confrelid = $1::regclass",
        )
        .bind::<Text, _>(name)
        .load(conn)?;
        let month = |parent: &str| referencing.iter().find(|r| r.parent == parent).map(|r| r.name.clone());
        let months = MonthParts {
            links: month("ticket_tags"),
            comments: month("comments"),
        };
        let removed = remove_month_rows(conn, name, &months)?;
        months.drop_attached(conn, name)?;
        sql_query(format!("DROP TABLE {name}")).execute(conn)?;
        record_month(conn, op_id, name, removed)?;
        Ok(removed)
    })
    .with_context(|| format!("cannot drop the detached partition {name} (archived; the next run finishes it)"))
}

#[derive(QueryableByName)]
struct Referencing {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    parent: String,
}

/// The ids of the tickets a step removes, in a temporary table with a primary key: a join to
/// it can probe either way, so no plan of [`remove_hanging`] is quadratic whatever the
/// statistics say. (A batch's ids as `unnest(…)` were a hash aggregate that the planner,
/// trusting audit_log's statistics from before an import, scanned once per audit row: 15 s
/// for one batch of 5,000 tickets.)
const GONE: &str = "ticketops_retention_gone";

/// Creates [`GONE`], empty, for the rest of the transaction.
fn stage_gone(conn: &mut PgConnection) -> anyhow::Result<()> {
    sql_query(format!(
        "CREATE TEMPORARY TABLE {GONE} (id bigint PRIMARY KEY) ON COMMIT DROP"
    ))
    .execute(conn)
    .context("cannot stage the ids of the tickets to remove")?;
    Ok(())
}

/// Statistics for the filled [`GONE`] and, with `by_key` (not on Citus, where the setting would
/// reach the workers' plans), joins to it as index probes for the rest of the transaction: a
/// month's or a batch's tickets against every ticket's links and keys, not hashed against a scan
/// of the whole tables (at 1M tickets, a month's links 78 ms against 150, a plain batch's 7 ms
/// against 42; the scans grow with the table, the probes only with what goes).
fn analyze_gone(conn: &mut PgConnection, by_key: bool) -> anyhow::Result<()> {
    sql_query(format!("ANALYZE {GONE}")).execute(conn)?;
    if by_key {
        crate::layout::by_key_plans(conn)?;
    }
    Ok(())
}

/// Deletes the comments of the tickets in [`GONE`] and their per-row audit rows (and on the
/// keyed layouts their keys); returns how many went. Set-based, before the tickets go (on plain
/// and Citus their cascades then find nothing to do; on partitions they could not go before).
fn remove_comments(conn: &mut PgConnection) -> anyhow::Result<u64> {
    let ids_sql = format!("SELECT id FROM {GONE}");
    sql_query(format!(
        "DELETE FROM audit_log WHERE table_name = 'comments'
           AND row_id IN (SELECT id FROM comments WHERE ticket_id IN ({ids_sql}))"
    ))
    .execute(conn)?;
    Ok(sql_query(format!("DELETE FROM comments WHERE ticket_id IN ({ids_sql})")).execute(conn)? as u64)
}

/// [`remove_comments`] on the partitioned layout, for the tickets `ids` created at
/// `created_at`: in their months of comments alone (their keys go with the tickets').
fn remove_comments_in_months(
    conn: &mut PgConnection,
    ids: &[i64],
    created_at: &[DateTime<Utc>],
) -> anyhow::Result<u64> {
    use diesel::sql_types::{Array, Timestamptz};
    let of_batch = "ticket_id = ANY($1) AND ticket_created_at = ANY($2)";
    sql_query(format!(
        "DELETE FROM audit_log WHERE table_name = 'comments' AND row_id IN (SELECT id FROM comments WHERE {of_batch})"
    ))
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Timestamptz>, _>(created_at)
    .execute(conn)?;
    Ok(sql_query(format!("DELETE FROM comments WHERE {of_batch}"))
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Timestamptz>, _>(created_at)
        .execute(conn)? as u64)
}

/// Deletes the per-row audit rows of the tickets in [`GONE`] and (with `links`) their tag links.
fn remove_ticket_rows(conn: &mut PgConnection, links: bool) -> anyhow::Result<()> {
    let ids_sql = format!("SELECT id FROM {GONE}");
    sql_query(format!(
        "DELETE FROM audit_log WHERE table_name = 'tickets' AND row_id IN ({ids_sql})"
    ))
    .execute(conn)?;
    // Their tickets go in this transaction: no fingerprint to forget (see the migration
    // `import_fingerprint`). Without this, on partitions, each link's trigger probed every
    // month for a ticket whose month was already dropped: 48 s a month of 120,000 links.
    if links {
        db::keep_fingerprints(conn)?;
        sql_query(format!("DELETE FROM ticket_tags WHERE ticket_id IN ({ids_sql})")).execute(conn)?;
    }
    Ok(())
}

/// One batch of the rows that do not go by partition: the next `limit` matching tickets after
/// `after_id` that nobody else holds (`FOR UPDATE SKIP LOCKED`), archived and synced, then
/// deleted with what hangs off them. Returns what it removed and the highest id it looked at
/// (`None`: nothing was left).
#[allow(clippy::too_many_arguments)]
pub fn remove_batch(
    conn: &mut PgConnection,
    layout: Layout,
    filters: &ResolvedFilters,
    op_id: i64,
    after_id: i64,
    limit: i64,
    archive: &mut Archive,
    comments_archive: Option<&mut Archive>,
) -> anyhow::Result<(Removed, Option<i64>)> {
    let (batch, last) =
        crate::filters::lock_next_for_removal(conn, layout, || filters.condition(scope(filters)), after_id, limit)?;
    let Some(last) = last else {
        return Ok((Removed::default(), None));
    };
    if batch.is_empty() {
        return Ok((Removed::default(), Some(last)));
    }
    let (ids, created_at): (Vec<i64>, Vec<DateTime<Utc>>) = batch.into_iter().unzip();
    let mut marks = Marks::default();
    let mut comments_archive = comments_archive;
    let result = (|| -> anyhow::Result<Removed> {
        let batch = crate::layout::BatchTickets::with_created(layout, &ids, &created_at);
        archive_batch(
            conn,
            &batch,
            Some(&mut *archive),
            comments_archive.as_deref_mut(),
            &mut marks,
        )?;
        stage_gone(conn)?;
        sql_query(format!("INSERT INTO {GONE} SELECT unnest($1::bigint[])"))
            .bind::<diesel::sql_types::Array<BigInt>, _>(&ids)
            .execute(conn)?;
        analyze_gone(conn, !layout.distributed())?;
        // On partitions in the batch's months (by ticket id alone each ticket would probe
        // every month of comments).
        let comments = if layout.partitioned() {
            remove_comments_in_months(conn, &ids, &created_at)?
        } else {
            remove_comments(conn)?
        };
        // On partitions the tickets' delete takes their links in their months (by ticket id alone
        // each ticket would probe every month of links).
        remove_ticket_rows(conn, !layout.partitioned())?;
        let removed = Removed {
            comments,
            tickets: layout.delete_tickets(conn, &ids, &created_at)? as u64,
        };
        audit::record_batch(
            conn,
            op_id,
            "tickets",
            Action::Purge,
            ids[0],
            Some(json!({"ids": ids})),
            None,
        )?;
        Ok(removed)
    })();
    match result {
        Ok(removed) => Ok((removed, Some(last))),
        Err(err) => {
            cut_back(Some(archive), comments_archive, marks);
            Err(err)
        }
    }
}

/// A few of the tickets that would go, for the dry run and the question.
pub fn sample(
    conn: &mut PgConnection,
    filters: &ResolvedFilters,
    limit: i64,
) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
    Ok(filters
        .query(scope(filters))
        .select((tickets::external_id, tickets::created_at))
        .order((tickets::created_at, tickets::id))
        .limit(limit)
        .load(conn)?)
}
