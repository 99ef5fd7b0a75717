//! Reading the stored tickets a batch refers to.

use crate::import::entities::{StrMap, StrSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{PgConnection, QueryableByName, sql_query};

use crate::import::Numbered;
use crate::import::fingerprint::Fingerprint;
use crate::models::Ticket;
use crate::schema::{ticket_tags, tickets};

use super::*;

/// Every statement of a batch touches a few thousand rows of large tables: index paths are
/// always right, and the planner, without statistics for a table that grows during the
/// import, otherwise picks sequential scans (measured: 5 s instead of 1 s per 1M rows).
/// Parallel workers never pay off at that size either: starting them costs ~10 ms a
/// statement, and with them the planner preferred a parallel scan of the whole key index of
/// the partitioned layout to 2,000 probes of its external_id index (a 1M-row import into an
/// empty database: 500 lookups took 26 s, 52 ms each, on the read-ahead's connection).
/// For the rest of the current transaction.
pub(super) fn index_paths_only(conn: &mut PgConnection) -> QueryResult<()> {
    use diesel::connection::SimpleConnection as _;
    conn.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL max_parallel_workers_per_gather = 0")
}

/// Reads the stored tickets of a batch. Files are usually in the order their tickets were
/// inserted (a re-import of the same dump, an export), so a batch's tickets tend to be the
/// id range right after the previous batch's: one primary-key range scan reads them for a
/// fifth of the server time of 5,000 probes by external_id. The range is only a guess —
/// rows in it that are not the batch's are dropped, and keys it missed are probed — and it
/// is tried only while it keeps paying off.
#[derive(Default)]
pub(super) struct StoredLookup {
    /// Where the next batch's tickets probably start.
    next_id: Option<i64>,
    /// The layout, read on first use.
    layout: Option<crate::layout::Layout>,
}

/// The earliest and latest created_at of `rows`, when every row has one.
fn created_at_bounds(rows: &[Numbered<TicketRow>]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let mut times = rows.iter().map(|r| r.row.created_at);
    let first = times.next()??;
    times.try_fold((first, first), |(lo, hi), t| t.map(|t| (lo.min(t), hi.max(t))))
}

impl StoredLookup {
    /// The stored tickets with the external ids of `rows`, each with its sorted tag ids
    /// (when the file has tags), by external id (moved out of the ticket into the key).
    pub(super) fn read(
        &mut self,
        conn: &mut PgConnection,
        rows: &[Numbered<TicketRow>],
        with_tags: bool,
    ) -> QueryResult<StoredByKey> {
        let wanted: StrSet<&str> = rows.iter().map(|r| r.row.external_id()).collect();
        let mut stored: Vec<Ticket> = Vec::with_capacity(wanted.len());
        if let Some(first) = self.next_id {
            let mut query = tickets::table
                .filter(tickets::id.between(first, first + wanted.len() as i64 - 1))
                .select(Ticket::as_select())
                .into_boxed();
            // On partitions id prunes nothing: the range is looked for in every month, each
            // adding to the planning (2.8 ms against 0.1 on plain, for 41 partitions). The
            // file's created_at values of the batch bound the months to look in; a ticket
            // stored under another created_at is missed here and probed through its key below.
            if self.layout(conn)?.partitioned()
                && let Some((earliest, latest)) = created_at_bounds(rows)
            {
                query = query.filter(tickets::created_at.between(earliest, latest));
            }
            let in_range: Vec<Ticket> = query.load(conn)?;
            stored.extend(in_range.into_iter().filter(|t| wanted.contains(t.external_id.as_str())));
        }
        let guessed = stored.len();
        if stored.len() < wanted.len() {
            let found: StrSet<&str> = stored.iter().map(|t| t.external_id.as_str()).collect();
            let missing: Vec<&str> = wanted.iter().copied().filter(|k| !found.contains(k)).collect();
            let layout = self.layout(conn)?;
            let probed: Vec<Ticket> = if layout.partitioned() {
                // Through the keys, whose created_at names the one partition to look in: a
                // probe a key (hashed, the whole table was read for a batch of scattered keys,
                // 360 ms a batch at 1M tickets).
                crate::layout::by_key_plans(conn)?;
                let probed = tickets::table
                    .filter(
                        diesel::dsl::sql::<diesel::sql_types::Bool>(
                            "(tickets.id, tickets.created_at) IN \
                             (SELECT ticket_id, created_at FROM ticket_keys WHERE external_id = ANY(",
                        )
                        .bind::<Array<Text>, _>(&missing)
                        .sql("))"),
                    )
                    .select(Ticket::as_select())
                    .load(conn)?;
                crate::layout::any_plans(conn)?;
                probed
            } else {
                tickets::table
                    .filter(tickets::external_id.eq_any(&missing))
                    .select(Ticket::as_select())
                    .load(conn)?
            };
            stored.extend(probed);
        }
        stored.sort_unstable_by_key(|t| t.id);
        // A dense run: the batch's tickets fill at least half of their id range.
        let dense = match (stored.first(), stored.last()) {
            (Some(lo), Some(hi)) => hi.id - lo.id < 2 * stored.len() as i64,
            _ => false,
        };
        self.next_id = next_guess(
            self.next_id.is_some(),
            guessed,
            wanted.len(),
            stored.first().map(|t| t.id),
            stored.last().map(|t| t.id),
            stored.len(),
        );

        let mut links: Vec<(i64, i64)> = Vec::new();
        if with_tags && !stored.is_empty() {
            let query = ticket_tags::table
                .select((ticket_tags::ticket_id, ticket_tags::tag_id))
                .order((ticket_tags::ticket_id, ticket_tags::tag_id));
            links = if self.layout(conn)?.distributed() {
                aggregated_links(conn, &stored, dense)?
            } else if dense {
                // One index range scan; links of tickets in the range but not in the batch are
                // skipped below.
                let (lo, hi) = (stored[0].id, stored[stored.len() - 1].id);
                query.filter(ticket_tags::ticket_id.between(lo, hi)).load(conn)?
            } else if self.layout(conn)?.partitioned() {
                links_in_months(conn, &stored)?
            } else {
                let ids: Vec<i64> = stored.iter().map(|t| t.id).collect();
                query.filter(ticket_tags::ticket_id.eq_any(&ids)).load(conn)?
            };
        }
        // Both in ticket id order: each ticket's links are the next run of `links`.
        let mut links = links.into_iter().peekable();
        let mut by_external_id = StoredByKey::with_capacity_and_hasher(stored.len(), Default::default());
        for mut ticket in stored {
            while links.next_if(|(ticket_id, _)| *ticket_id < ticket.id).is_some() {}
            let mut tags = Vec::new();
            while let Some((_, tag_id)) = links.next_if(|(ticket_id, _)| *ticket_id == ticket.id) {
                tags.push(tag_id);
            }
            by_external_id.insert(std::mem::take(&mut ticket.external_id), Box::new((ticket, tags)));
        }
        Ok(by_external_id)
    }

    /// The layout, read once (this runs on the read-ahead's own connection).
    fn layout(&mut self, conn: &mut PgConnection) -> QueryResult<crate::layout::Layout> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        let layout = crate::layout::Layout::of(conn).map_err(|e| diesel::result::Error::QueryBuilderError(e.into()))?;
        Ok(*self.layout.insert(layout))
    }
}

/// The tag links of `stored` (sorted by id) as (ticket id, tag id), in that order, on the
/// partitioned layout: each ticket's probed in its month of links (nested loops). By id alone,
/// every month was read for the batch's ids (~90 ms a batch of 2,000 at 1M tickets).
fn links_in_months(conn: &mut PgConnection, stored: &[Ticket]) -> QueryResult<Vec<(i64, i64)>> {
    #[derive(QueryableByName)]
    struct Link {
        #[diesel(sql_type = BigInt)]
        ticket_id: i64,
        #[diesel(sql_type = BigInt)]
        tag_id: i64,
    }
    let ids: Vec<i64> = stored.iter().map(|t| t.id).collect();
    let created: Vec<chrono::DateTime<chrono::Utc>> = stored.iter().map(|t| t.created_at).collect();
    crate::layout::by_key_plans(conn)?;
    let links: Vec<Link> = sql_query(
        "SELECT x.ticket_id, x.tag_id FROM unnest($1::bigint[], $2::timestamptz[]) AS p(id, created_at)
         JOIN ticket_tags x ON x.ticket_id = p.id AND x.ticket_created_at = p.created_at
         ORDER BY x.ticket_id, x.tag_id",
    )
    .bind::<Array<BigInt>, _>(&ids)
    .bind::<Array<diesel::sql_types::Timestamptz>, _>(&created)
    .load(conn)?;
    crate::layout::any_plans(conn)?;
    Ok(links.into_iter().map(|l| (l.ticket_id, l.tag_id)).collect())
}

/// The tag links of `stored` (sorted by id) as (ticket id, tag id), in that order, aggregated
/// per ticket on the Citus workers, where the links live with their tickets: one row a ticket
/// through the coordinator instead of one a link (the coordinator's CPU is what a distributed
/// re-import waits for).
fn aggregated_links(conn: &mut PgConnection, stored: &[Ticket], dense: bool) -> QueryResult<Vec<(i64, i64)>> {
    #[derive(QueryableByName)]
    struct TagSet {
        #[diesel(sql_type = BigInt)]
        ticket_id: i64,
        #[diesel(sql_type = Array<BigInt>)]
        tag_ids: Vec<i64>,
    }
    let (lo, hi) = (stored[0].id, stored[stored.len() - 1].id);
    let ids: Vec<i64> = if dense {
        Vec::new()
    } else {
        stored.iter().map(|t| t.id).collect()
    };
    // Both forms bind all three parameters; each uses those it needs.
    let filter = if dense {
        "ticket_id BETWEEN $1 AND $2"
    } else {
        "ticket_id = ANY($3)"
    };
    let sets: Vec<TagSet> = sql_query(format!(
        "SELECT ticket_id, array_agg(tag_id ORDER BY tag_id) AS tag_ids FROM ticket_tags
         WHERE {filter} GROUP BY ticket_id ORDER BY ticket_id"
    ))
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .bind::<Array<BigInt>, _>(&ids)
    .load(conn)?;
    Ok(sets
        .into_iter()
        .flat_map(|set| set.tag_ids.into_iter().map(move |tag| (set.ticket_id, tag)))
        .collect())
}

/// Reads the import fingerprints stored for a batch's keys, for the reader to skip the records
/// that did not change. Like [`StoredLookup`], it guesses that a batch's tickets are the id
/// range after the previous batch's: one primary-key range scan instead of 5,000 probes of the
/// external_id index (those took 2 of a re-import's 3.5 seconds at 1M rows). A range read
/// covers the next few batches at once (see [`RANGE_READ`]).
#[derive(Default)]
pub(super) struct StoredFingerprints {
    next_id: Option<i64>,
    layout: Option<crate::layout::Layout>,
    /// The tickets of the last id range read (`range`, both ends included), by the hash of
    /// their external id (`scan::key_hash`; a quarter of the memory of the keys themselves):
    /// their ids and stored fingerprints. Two keys with one hash cannot make a record skipped
    /// that should not be: the other ticket's fingerprint would have to be the record's own,
    /// whose fields hold its key (at worst a miss: the record is compared in full).
    window: StrMap<u64, (i64, Option<Fingerprint>)>,
    range: Option<(i64, i64)>,
}

/// About how many ids one range read covers (whole batches of them). Each read costs a
/// statement's fixed part besides its rows — on the partitioned layout a lock and an index
/// scan on every month, 2.5 ms a read at 41 months against 0.2 on plain, which made a
/// re-import there 0.7 of plain's speed when it was paid for every batch of 2,000; at 4,000 ids
/// a read a 1M re-import took 3.1 s there, at 14,000 2.7 s (plain 2.3). The window holds this
/// many tickets whatever the size of the file: 14,000 fit the map's 16,384 slots (~40 bytes
/// each; at 16,000 it doubled, +1.5 MB of peak memory).
const RANGE_READ: usize = 14_000;

impl StoredFingerprints {
    /// The fingerprints stored for `keys`, in their order (see `FingerprintLookup`), or
    /// `None` on the distributed layout, which keeps none that can be trusted (see the
    /// migration `import_fingerprint`). In a read-only transaction of its own when it reads.
    /// A range read ahead of the batch that uses it is as good as one at its time: a record
    /// skipped is one that matched its ticket at some moment of the import, and keys that
    /// come more than once are never skipped, so no batch of the import itself writes a
    /// ticket read ahead for another.
    pub(super) fn read(
        &mut self,
        conn: &mut PgConnection,
        keys: &[&str],
    ) -> anyhow::Result<Option<Vec<Option<Fingerprint>>>> {
        #[derive(QueryableByName)]
        struct Probed {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Text)]
            external_id: String,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
            import_fingerprint: Option<Vec<u8>>,
        }
        let layout = match self.layout {
            Some(layout) => layout,
            None => *self.layout.insert(crate::layout::Layout::of(conn)?),
        };
        if layout.distributed() {
            return Ok(None);
        }
        let next_id = self.next_id;
        // The range to read for this batch, unless the last one read covers it.
        let to_read = next_id.and_then(|first| {
            let last = first + keys.len() as i64 - 1;
            let covered = self.range.is_some_and(|(low, high)| low <= first && last <= high);
            let batches = RANGE_READ.div_ceil(keys.len().max(1));
            (!covered).then(|| (first, first + (keys.len() * batches) as i64 - 1))
        });
        let mut found: Vec<Option<(i64, Option<Fingerprint>)>> = vec![None; keys.len()];
        let from_window = |window: &StrMap<u64, (i64, Option<Fingerprint>)>, found: &mut [Option<_>]| {
            for (slot, key) in found.iter_mut().zip(keys) {
                *slot = window.get(&crate::import::scan::key_hash(key)).copied();
            }
            found.iter().flatten().count()
        };
        let mut guessed = match next_id {
            Some(_) if to_read.is_none() => from_window(&self.window, &mut found),
            _ => 0,
        };
        let mut probed = Vec::new();
        if to_read.is_some() || guessed < keys.len() {
            if to_read.is_some() {
                self.range = None; // until the window holds it
            }
            let window = &mut self.window;
            probed = conn.build_transaction().read_only().run(|conn| {
                // Never waits long: the reader waits for this, and the import may itself hold
                // the lock in the way (a month the partitioned layout made in an --atomic
                // import keeps the default partition locked to its end).
                diesel::connection::SimpleConnection::batch_execute(conn, LOOKUP_LOCK_TIMEOUT)?;
                if let Some((low, high)) = to_read {
                    // Planned at every read, for every month (the range prunes none): a
                    // generic plan kept for the connection measured the same (a re-import of
                    // 1M on partitions 2.49-2.60 s against 2.52-2.57, 2026-12-04).
                    window.clear();
                    let in_range = tickets::table
                        .filter(tickets::id.between(low, high))
                        .select((tickets::id, tickets::external_id, tickets::import_fingerprint))
                        .load_iter::<(i64, String, Option<Vec<u8>>), diesel::connection::DefaultLoadingMode>(conn)?;
                    for row in in_range {
                        let (id, key, stored) = row?;
                        let stored = stored.and_then(|f| Fingerprint::try_from(f).ok());
                        window.insert(crate::import::scan::key_hash(&key), (id, stored));
                    }
                    guessed = from_window(window, &mut found);
                }
                let missing: Vec<&str> = keys
                    .iter()
                    .zip(&found)
                    .filter_map(|(key, slot)| slot.is_none().then_some(*key))
                    .collect();
                if missing.is_empty() {
                    return QueryResult::Ok(Vec::new());
                }
                let sql = if layout.partitioned() {
                    // Each ticket in its one partition, through its key (see `by_key_plans`).
                    crate::layout::by_key_plans(conn)?;
                    "SELECT t.id, t.external_id, t.import_fingerprint FROM ticket_keys k
                     JOIN tickets t ON t.id = k.ticket_id AND t.created_at = k.created_at
                     WHERE k.external_id = ANY($1)"
                } else {
                    "SELECT id, external_id, import_fingerprint FROM tickets WHERE external_id = ANY($1)"
                };
                sql_query(sql).bind::<Array<Text>, _>(&missing).load::<Probed>(conn)
            })?;
        }
        if to_read.is_some() {
            self.range = to_read;
        }
        if !probed.is_empty() {
            let probed: StrMap<String, (i64, Option<Fingerprint>)> = probed
                .into_iter()
                .map(|t| {
                    let stored = t.import_fingerprint.and_then(|f| Fingerprint::try_from(f).ok());
                    (t.external_id, (t.id, stored))
                })
                .collect();
            for (slot, key) in found.iter_mut().zip(keys).filter(|(slot, _)| slot.is_none()) {
                *slot = probed.get(*key).copied();
            }
        }
        let ids = found.iter().flatten().map(|(id, _)| *id);
        self.next_id = next_guess(
            next_id.is_some(),
            guessed,
            keys.len(),
            ids.clone().min(),
            ids.max(),
            found.iter().flatten().count(),
        );
        if self.next_id.is_none() {
            // No guess for the next batch, so no use for the range read: its memory goes.
            self.window = StrMap::default();
            self.range = None;
        }
        Ok(Some(
            found
                .into_iter()
                .map(|slot| slot.and_then(|(_, stored)| stored))
                .collect(),
        ))
    }
}

/// A lookup of fingerprints that waits longer for a lock gives up (the records are parsed).
const LOOKUP_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '200ms'";

/// Where the next batch's tickets probably start: right after this batch's (ids `lowest` to
/// `highest`, `found` of the `wanted`), while the guess found most of them (`guessed`), or,
/// after a miss, when this batch's tickets were a dense run themselves (at least half of
/// their id range).
fn next_guess(
    tried: bool,
    guessed: usize,
    wanted: usize,
    lowest: Option<i64>,
    highest: Option<i64>,
    found: usize,
) -> Option<i64> {
    let (lowest, highest) = lowest.zip(highest)?;
    let dense = highest - lowest < 2 * found as i64;
    let worked = tried && guessed * 2 >= wanted;
    (worked || dense).then_some(highest + 1)
}

/// A stored ticket and its sorted tag ids (empty when the file has no tags column).
pub(super) type Stored = (Ticket, Vec<i64>);

/// A batch's stored tickets by external id. Boxed: a map sized for a batch has about twice
/// as many slots as tickets, and an empty slot then takes a pointer instead of a ticket
/// (1.1 MB instead of 0.6 for 2,000 tickets, with two or three batches in flight).
pub(super) type StoredByKey = StrMap<String, Box<Stored>>;
