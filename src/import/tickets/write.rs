//! Writing a batch of tickets: new ones by binary COPY, changed ones merged, unchanged ones left
//! alone.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::pg::{CopyFormat, CopyTarget};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Text};
use diesel::{PgConnection, QueryableByName, sql_query};

use crate::import::copy_binary::{BinaryCopy, write_error};
use crate::import::entities::UserRef;
use crate::import::{Counts, Numbered};
use crate::models::{TicketChannel, TicketPriority, TicketStatus, UserRole};
use crate::schema::{ticket_tags, tickets};

use super::*;
use crate::db::Id;
use crate::import::initial_load::reserve_id_block;
use crate::layout::Layout;
use crate::layout::partition_copy::{MonthRouter, NamedCopyTarget};

/// The columns a new ticket's COPY writes, in the order `copy_tickets` writes them (and
/// `insert_new` names them for tickets itself).
const TICKET_COPY_COLUMNS: &str = "id, external_id, subject, description, status, priority, channel, requester_id, \
     assignee_id, organization_id, created_at, updated_at, solved_at, last_operation_id, import_fingerprint";

#[derive(QueryableByName)]
struct Classified {
    #[diesel(sql_type = BigInt)]
    rec: i64,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    deleted: bool,
    /// Written earlier in this same operation: an earlier occurrence in the file.
    #[diesel(sql_type = Bool)]
    mine: bool,
    #[diesel(sql_type = Bool)]
    differs: bool,
    #[diesel(sql_type = Bool)]
    tags_differ: bool,
}

#[derive(QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Bool)]
    inserted: bool,
    /// The new created_at of a ticket whose key must follow (distributed layout only).
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    moved_to: Option<chrono::DateTime<chrono::Utc>>,
}

// The staging table for rows that may already exist. Temporary (no WAL, private to the
// session) and emptied at each batch.
diesel::table! {
    use diesel::sql_types::*;
    use crate::schema::sql_types::{TicketStatus, TicketPriority, TicketChannel};

    ticketops_stage_tickets (rec) {
        rec -> Int8,
        ticket_id -> Int8,
        external_id -> Text,
        subject -> Text,
        description -> Nullable<Text>,
        status -> TicketStatus,
        priority -> TicketPriority,
        channel -> TicketChannel,
        requester_id -> Int8,
        assignee_id -> Nullable<Int8>,
        organization_id -> Nullable<Int8>,
        created_at -> Nullable<Timestamptz>,
        updated_at -> Nullable<Timestamptz>,
        solved_at -> Nullable<Timestamptz>,
        tag_ids -> Array<Int8>,
        fingerprint -> Nullable<Binary>,
    }
}

pub(super) const STAGE_TABLE_SQL: &str = "
CREATE TEMP TABLE IF NOT EXISTS ticketops_stage_tickets (
    rec bigint PRIMARY KEY,
    ticket_id bigint NOT NULL,
    external_id text COLLATE \"C\" NOT NULL,
    subject text NOT NULL,
    description text,
    status ticket_status NOT NULL,
    priority ticket_priority NOT NULL,
    channel ticket_channel NOT NULL,
    requester_id bigint NOT NULL,
    assignee_id bigint,
    organization_id bigint,
    created_at timestamptz,
    updated_at timestamptz,
    solved_at timestamptz,
    tag_ids bigint[] NOT NULL,
    fingerprint bytea
)";

/// The staged rows by external_id: on partitions a changed ticket's tag links are compared with
/// its staged row by nested loops (each ticket's links probed in its month), which find the
/// staged row by this index (compared in its collation, "C").
pub(super) const STAGE_INDEX_SQL: &str =
    "CREATE INDEX IF NOT EXISTS ticketops_stage_tickets_external_id ON ticketops_stage_tickets (external_id)";

#[derive(Insertable)]
#[diesel(table_name = ticketops_stage_tickets, treat_none_as_default_value = false)]
struct StageRow<'a> {
    rec: i64,
    /// The id the lookup found; every query joins on it *and* restricts tickets to the
    /// batch's ids, so the planner never scans the whole table for a batch.
    ticket_id: i64,
    external_id: &'a str,
    subject: &'a str,
    description: Option<&'a str>,
    status: TicketStatus,
    priority: TicketPriority,
    channel: TicketChannel,
    requester_id: i64,
    assignee_id: Option<i64>,
    organization_id: Option<i64>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    solved_at: Option<DateTime<Utc>>,
    tag_ids: Vec<i64>,
    fingerprint: Option<&'a [u8]>,
}

impl TicketImport {
    /// The fingerprint a row's ticket is written with: none on the distributed layout, which
    /// has no triggers to forget one (see the migration `import_fingerprint`).
    fn fingerprint_of<'r>(&self, row: &'r Numbered<TicketRow>) -> Option<&'r [u8]> {
        row.fingerprint
            .as_ref()
            .map(|f| &f[..])
            .filter(|_| !self.layout.distributed())
    }

    pub(super) fn resolve_entities(
        &mut self,
        conn: &mut PgConnection,
        rows: &[Numbered<TicketRow>],
    ) -> QueryResult<()> {
        self.cache
            .ensure_organizations(conn, rows.iter().filter_map(|r| r.row.organization()))?;
        let mut users = Vec::with_capacity(rows.len() * 2);
        for r in rows {
            users.push(UserRef {
                email: r.row.requester_email(),
                name: r.row.requester_name(),
                role: UserRole::Customer,
                organization_id: r.row.organization().and_then(|o| self.cache.organization_id(o)),
            });
            if let Some(assignee) = r.row.assignee_email() {
                users.push(UserRef {
                    email: assignee,
                    name: None,
                    role: UserRole::Agent,
                    organization_id: None,
                });
            }
        }
        self.cache.ensure_users(conn, &users)?;
        if self.present.tags {
            self.cache.ensure_tags(conn, rows.iter().flat_map(|r| r.row.tags()))?;
        }
        Ok(())
    }

    /// Whether writing `row` would leave ticket `stored` exactly as it is, by the rules of
    /// `target_exprs` (absent columns and blank timestamps keep the stored value). Only a
    /// certain "equal" skips the SQL comparison: a deleted ticket, one this import wrote
    /// already, or a timestamp finer than PostgreSQL's microseconds all go through it.
    pub(super) fn certainly_unchanged(&self, row: &TicketRow, (stored, stored_tags): &Stored, op_id: i64) -> bool {
        if stored.deleted_at.is_some() || stored.last_operation_id == Some(op_id) {
            return false;
        }
        let p = self.present;
        let (requester, assignee, organization, tag_ids) = self.ids_of(row);
        let same_time = |file: Option<DateTime<Utc>>, kept: Option<DateTime<Utc>>| match file {
            Some(t) => Some(t) == kept,
            None => true,
        };
        row.subject() == stored.subject
            && (!p.description || row.description() == stored.description.as_deref())
            && row.status == stored.status
            && (!p.priority || row.priority == stored.priority)
            && (!p.channel || row.channel == stored.channel)
            && requester == stored.requester_id
            && (!p.assignee || assignee == stored.assignee_id)
            && (!p.organization || organization == stored.organization_id)
            && same_time(row.created_at, Some(stored.created_at))
            && same_time(row.updated_at, Some(stored.updated_at))
            && (!p.solved_at || row.solved_at == stored.solved_at)
            && (!p.tags || tag_ids == *stored_tags)
    }

    fn ids_of(&self, row: &TicketRow) -> (i64, Option<i64>, Option<i64>, Vec<i64>) {
        let requester = self.cache.user_id(row.requester_email()).expect("resolved before");
        let assignee = row.assignee_email().and_then(|e| self.cache.user_id(e));
        let organization = row.organization().and_then(|o| self.cache.organization_id(o));
        let mut tag_ids: Vec<i64> = row.tags().filter_map(|t| self.cache.tag_id(t)).collect();
        tag_ids.sort_unstable();
        (requester, assignee, organization, tag_ids)
    }

    /// Tickets whose external_id is not in the table: binary COPY with ids from the sequence.
    /// A concurrent insert of the same external_id makes the COPY fail on the unique index,
    /// which fails the batch (nothing half-written) — run again and the row is merged.
    pub(super) fn insert_new(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<&Numbered<TicketRow>>,
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // "COPY new tickets" is the time of this call but the keys' COPY, a phase of its own.
        let started = std::time::Instant::now();
        if self.id_sequence.is_none() {
            #[derive(QueryableByName)]
            struct Sequence {
                #[diesel(sql_type = Text)]
                name: String,
            }
            let seq: Sequence = sql_query("SELECT pg_get_serial_sequence('tickets', 'id') AS name")
                .get_result(conn)
                .context("cannot find the sequence of tickets.id")?;
            self.id_sequence = Some(seq.name);
        }
        let sequence = self.id_sequence.as_deref().expect("looked up above");
        let ids: Vec<i64> = if self.initial_load {
            // The initial load holds tickets exclusively (a nextval per id cost ~0.6 s per 1M).
            reserve_id_block(conn, "tickets", rows.len())
                .context("cannot allocate ticket ids")?
                .collect()
        } else {
            let ids: Vec<Id> = sql_query("SELECT nextval($1::regclass) AS id FROM generate_series(1, $2)")
                .bind::<Text, _>(sequence)
                .bind::<BigInt, _>(rows.len() as i64)
                .load(conn)
                .context("cannot allocate ticket ids")?;
            ids.into_iter().map(|i| i.id).collect()
        };
        let import_time = self.import_time;
        let rows: Vec<NewTicket> = rows
            .iter()
            .zip(&ids)
            .map(|(r, &id)| {
                (
                    &r.row,
                    id,
                    r.row.created_at.unwrap_or(import_time),
                    self.fingerprint_of(r),
                )
            })
            .collect();
        let started = if self.layout.keyed() {
            self.phases.add("COPY new tickets", started);
            // The keys first (the months were made by `resolve`), which the tickets reference:
            // a key that exists already (a concurrent insert) fails the batch like the unique
            // index does on the plain layout.
            let keys = rows
                .iter()
                .map(|&(row, id, created_at, _)| (id, row.external_id(), created_at));
            match &mut self.gathered {
                // Frozen: the initial load truncated ticket_keys, as its months.
                Some(gathered) if self.layout.partitioned() => {
                    gathered.held_keys.append(KEY_COPY_TARGET, true, rows.len(), |out| {
                        let mut copy = BinaryCopy::rows_only(out);
                        for key in keys {
                            encode_key(&mut copy, key)?;
                        }
                        copy.flush_rows()
                    })?
                }
                Some(gathered) => gathered
                    .keys
                    .extend(keys.map(|(id, external_id, created_at)| (id, external_id.to_string(), created_at))),
                None => {
                    let keys_started = std::time::Instant::now();
                    copy_keys(conn, self.layout, self.freeze_keys(), keys)?;
                    self.phases.add("COPY ticket keys", keys_started);
                }
            }
            std::time::Instant::now()
        } else {
            started
        };
        let links = RefCell::new(Vec::new());
        // Rows go into tickets itself, but on the initial load of the partitioned layout
        // straight into their months: PostgreSQL refuses COPY … FREEZE on a partitioned table
        // but takes it on a partition truncated or made in this transaction. A COPY for each
        // month of the batch; rows of no month of their own (the default partition) through
        // the parent, unfrozen.
        let into_months = self.initial_load && self.layout.partitioned();
        let routes = if self.layout.partitioned() {
            let created: Vec<DateTime<Utc>> = rows.iter().map(|&(_, _, created_at, _)| created_at).collect();
            let months = self
                .months
                .route(conn, &created)
                .context("cannot route the rows to their months")?;
            // Which months gained rows: the statistics refreshed after the import are theirs.
            let mut per_month: HashMap<Option<usize>, u64> = HashMap::new();
            for &month in &months {
                *per_month.entry(month).or_default() += 1;
            }
            for (month, n) in per_month {
                self.inserted_into.add(month.map(|m| self.months.name(m)), n);
            }
            if into_months { months } else { vec![None; rows.len()] }
        } else {
            vec![None; rows.len()]
        };
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| routes[i]);
        let mut inserted = 0;
        // Rows of a month are gathered over batches, as the keys and links are: a COPY per
        // month and batch was ~200 rows each (5,000 rows over two years), and their set-ups
        // cost more than the rows (2M rows: 6.4 s against plain's 3.7).
        let (gather, direct): (Vec<&[usize]>, Vec<&[usize]>) = order
            .chunk_by(|&a, &b| routes[a] == routes[b])
            .partition(|group| self.gathered.is_some() && routes[group[0]].is_some());
        if !gather.is_empty() {
            inserted += self.gather_tickets(&gather, &routes, &rows, op_id, &links)?;
        }
        for group in direct {
            let group_rows = group.iter().map(|&i| rows[i]);
            inserted += match routes[group[0]] {
                Some(month) => NamedCopyTarget::<tickets::table>::with(
                    &format!("{} ({})", self.months.name(month), TICKET_COPY_COLUMNS),
                    |target| self.copy_tickets(conn, target, true, group_rows, op_id, &links),
                )?,
                // The initial load truncated the tables in its transaction: its rows can be
                // written frozen and their pages marked all-visible, so the index builds and
                // key validations after it need not check each row's visibility (0.5-0.8 s
                // per 1M).
                None => self.copy_tickets(
                    conn,
                    (
                        tickets::id,
                        tickets::external_id,
                        tickets::subject,
                        tickets::description,
                        tickets::status,
                        tickets::priority,
                        tickets::channel,
                        tickets::requester_id,
                        tickets::assignee_id,
                        tickets::organization_id,
                        tickets::created_at,
                        tickets::updated_at,
                        tickets::solved_at,
                        tickets::last_operation_id,
                        tickets::import_fingerprint,
                    ),
                    self.initial_load && !into_months,
                    group_rows,
                    op_id,
                    &links,
                )?,
            };
        }
        let links = links.into_inner();
        match &mut self.gathered {
            Some(gathered) if into_months => {
                gather_month_links(conn, &mut self.link_months, &mut gathered.month_links, &links)?
            }
            Some(gathered) => gathered.links.extend(links),
            None => copy_links(conn, self.layout, &mut self.link_months, &links, self.initial_load)?,
        }
        // The audit trail of inserts is one row per batch listing the new ids as ranges (they
        // come from one sequence call, so usually one range): a row per ticket would cost as
        // much as a third table's worth of index and foreign-key work.
        let ranges = id_ranges(ids.iter().copied());
        crate::audit::record_batch(
            conn,
            op_id,
            "tickets",
            crate::audit::Action::InsertIds,
            ids[0],
            None,
            Some(serde_json::json!({ "ids": ranges })),
        )
        .context("cannot record the audit trail")?;
        self.phases.add("COPY new tickets", started);
        counts.inserted += inserted as u64;
        self.inserted_here += inserted as u64;
        Ok(())
    }

    /// Writes the gathered keys and tag links once there are `at_least` of either (0: all that
    /// wait, at the end of the load).
    pub(super) fn write_gathered(&mut self, conn: &mut PgConnection, at_least: usize) -> anyhow::Result<()> {
        let freeze_keys = self.freeze_keys();
        let Some(gathered) = &mut self.gathered else {
            return Ok(());
        };
        // (In any order: the load dropped the foreign keys of the months of links to the
        // months of tickets, and validates them at its end.)
        if gathered.tickets.bytes > 0 {
            let started = std::time::Instant::now();
            let tickets_conn = match &mut self.staged {
                Some(staged) => staged.conn(),
                None => &mut *conn,
            };
            gathered
                .tickets
                .copy_due(tickets_conn, tickets::table, "new tickets", at_least)?;
            self.phases.add("COPY new tickets", started);
        }
        if gathered.month_links.bytes > 0 {
            let started = std::time::Instant::now();
            gathered
                .month_links
                .copy_due(conn, ticket_tags::table, "tag links", at_least)?;
            self.phases.add("COPY tag links", started);
        }
        if gathered.held_keys.bytes > 0 {
            let started = std::time::Instant::now();
            gathered
                .held_keys
                .copy_due(conn, crate::layout::ticket_keys::table, "ticket keys", at_least)?;
            self.phases.add("COPY ticket keys", started);
        }
        if !gathered.keys.is_empty() && gathered.keys.len() >= at_least {
            let started = std::time::Instant::now();
            let keys = gathered
                .keys
                .iter()
                .map(|(id, external_id, created_at)| (*id, external_id.as_str(), *created_at));
            copy_keys(conn, self.layout, freeze_keys, keys)?;
            gathered.keys.clear();
            self.phases.add("COPY ticket keys", started);
        }
        if !gathered.links.is_empty() && gathered.links.len() >= at_least {
            let started = std::time::Instant::now();
            copy_links(conn, self.layout, &mut self.link_months, &gathered.links, true)?;
            gathered.links.clear();
            self.phases.add("COPY tag links", started);
        }
        Ok(())
    }

    /// The initial load's keys go in frozen on the partitioned layout, where ticket_keys was
    /// truncated in its transaction. Only where it was measured: on Citus the keys are a
    /// distributed table, and FREEZE there is not relied on.
    fn freeze_keys(&self) -> bool {
        self.initial_load && self.layout.partitioned()
    }

    /// Writes one new ticket's COPY row, in the order of [`TICKET_COPY_COLUMNS`], and adds its
    /// tag links to `links`.
    fn encode_ticket<W: std::io::Write>(
        &self,
        copy: &mut BinaryCopy<W>,
        (row, id, created_at, fingerprint): NewTicket<'_>,
        op_id: i64,
        links: &mut Vec<NewLink>,
    ) -> std::io::Result<()> {
        let (requester_id, assignee_id, organization_id, tag_ids) = self.ids_of(row);
        links.extend(tag_ids.into_iter().map(|tag_id| NewLink {
            ticket_id: id,
            tag_id,
            created_at,
        }));
        copy.row(15)?;
        copy.int8(id)?;
        copy.text(row.external_id())?;
        copy.text(row.subject())?;
        copy.opt_text(row.description())?;
        copy.text(row.status.as_str())?;
        copy.text(row.priority.as_str())?;
        copy.text(row.channel.as_str())?;
        copy.int8(requester_id)?;
        copy.opt_int8(assignee_id)?;
        copy.opt_int8(organization_id)?;
        copy.timestamptz(created_at)?;
        copy.timestamptz(row.updated_at.unwrap_or(created_at))?;
        copy.opt_timestamptz(row.solved_at)?;
        copy.int8(op_id)?;
        copy.opt_bytea(fingerprint)
    }

    /// Encodes the rows of `groups` (indexes into `rows`, each group of one month, routed by
    /// `routes`) into the initial load's gathered tickets, written by
    /// [`write_gathered`](Self::write_gathered); returns how many.
    fn gather_tickets(
        &mut self,
        groups: &[&[usize]],
        routes: &[Option<usize>],
        rows: &[NewTicket<'_>],
        op_id: i64,
        links: &RefCell<Vec<NewLink>>,
    ) -> anyhow::Result<usize> {
        // Into their months, or the tables staged for them (see `staged`).
        let mut targets = Vec::with_capacity(groups.len());
        for group in groups {
            let month = routes[group[0]].expect("routed to a month");
            let table = match &mut self.staged {
                Some(staged) => staged.table_for(self.months.month(month), group.len())?,
                None => self.months.name(month),
            };
            targets.push(format!("{table} ({TICKET_COPY_COLUMNS})"));
        }
        let mut gathered = self.gathered.take().expect("gathering");
        let result = (|| -> anyhow::Result<usize> {
            let mut links = links.borrow_mut();
            let mut n = 0;
            for (group, target) in groups.iter().zip(&targets) {
                gathered.tickets.append(target, true, group.len(), |out| {
                    let mut copy = BinaryCopy::rows_only(out);
                    for &i in group.iter() {
                        self.encode_ticket(&mut copy, rows[i], op_id, &mut links)?;
                    }
                    copy.flush_rows()
                })?;
                n += group.len();
            }
            Ok(n)
        })();
        self.gathered = Some(gathered);
        result
    }

    /// One binary COPY of `rows` (each with its id and created_at) into `target`, tickets or
    /// one of its partitions; their tag links are added to `links`. Each row is encoded as the
    /// COPY streams, so the cache lookups overlap with the server ingesting the rows before.
    fn copy_tickets<'r, C: CopyTarget<Table = tickets::table>>(
        &self,
        conn: &mut PgConnection,
        target: C,
        freeze: bool,
        rows: impl Iterator<Item = NewTicket<'r>>,
        op_id: i64,
        links: &RefCell<Vec<NewLink>>,
    ) -> anyhow::Result<usize> {
        let pending = RefCell::new(Some(rows));
        diesel::copy_from(tickets::table)
            .from_raw_data(target, |out| -> Result<(), diesel::result::Error> {
                let rows = pending.take().expect("the COPY callback runs once");
                let mut links = links.borrow_mut();
                let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                for ticket in rows {
                    self.encode_ticket(&mut copy, ticket, op_id, &mut links)
                        .map_err(write_error)?;
                }
                copy.finish().map_err(write_error)
            })
            .with_format(CopyFormat::Binary)
            .with_freeze(freeze)
            .execute(conn)
            .context("cannot COPY new tickets")
    }

    /// Rows whose external_id exists: stage, compare, merge only what differs.
    pub(super) fn merge_existing(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: Vec<&Numbered<TicketRow>>,
        existing: &StoredByKey,
        counts: &mut Counts,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let by_rec: HashMap<i64, &Numbered<TicketRow>> = rows.iter().map(|r| (r.record as i64, *r)).collect();
        sql_query("TRUNCATE ticketops_stage_tickets").execute(conn)?;
        let stage: Vec<StageRow> = rows
            .into_iter()
            .map(|r| {
                let (requester_id, assignee_id, organization_id, tag_ids) = self.ids_of(&r.row);
                let row = &r.row;
                StageRow {
                    rec: r.record as i64,
                    ticket_id: existing[row.external_id()].0.id,
                    external_id: row.external_id(),
                    subject: row.subject(),
                    description: row.description(),
                    status: row.status,
                    priority: row.priority,
                    channel: row.channel,
                    requester_id,
                    assignee_id,
                    organization_id,
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                    solved_at: row.solved_at,
                    tag_ids,
                    fingerprint: self.fingerprint_of(r),
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let staged_recs: Vec<i64> = stage.iter().map(|s| s.rec).collect();
        let staged_ids: Vec<i64> = stage.iter().map(|s| s.ticket_id).collect();
        diesel::copy_from(ticketops_stage_tickets::table)
            .from_insertable(&stage)
            .execute(conn)
            .context("cannot COPY into the staging table")?;
        drop(stage);

        self.phases.add("stage existing", started);
        let started = std::time::Instant::now();
        if self.layout.partitioned() {
            // Each stored ticket read and updated in its one partition, until the merge is
            // done (the months the rows move to were made by `resolve`).
            crate::layout::by_key_plans(conn)?;
        } else if self.layout.distributed() {
            crate::layout::shard_batch_plans(conn)?;
        }
        let classified: Vec<Classified> = sql_query(self.classify_sql(op_id))
            .bind::<Array<BigInt>, _>(&staged_ids)
            .load(conn)
            .context("cannot compare rows with the stored tickets")?;
        self.phases.add("compare existing", started);
        let mut to_write = Vec::new();
        let mut tag_changed = Vec::new();
        let mut no_audit = Vec::new();
        for c in &classified {
            if c.mine {
                // An earlier row of this file already wrote this ticket and was counted; this
                // later one wins, so the earlier one becomes the duplicate.
                counts.duplicate += 1;
                if c.differs {
                    to_write.push(c.rec);
                    no_audit.push(c.id);
                    if c.tags_differ {
                        tag_changed.push(c.id);
                    }
                }
            } else if c.deleted && !self.undelete {
                counts.skipped_deleted += 1;
            } else if c.differs {
                to_write.push(c.rec);
                if c.tags_differ {
                    tag_changed.push(c.id);
                }
            } else {
                counts.unchanged += 1;
            }
        }
        // Staged rows whose ticket vanished between lookup and compare are inserted like any
        // new row: by the merge's ON CONFLICT on the plain layout, by insert_new on the
        // partitioned one (whose merge is an UPDATE).
        let classified_recs: HashSet<i64> = classified.iter().map(|c| c.rec).collect();
        let vanished = staged_recs.into_iter().filter(|rec| !classified_recs.contains(rec));
        if self.layout.keyed() {
            let vanished: Vec<&Numbered<TicketRow>> = vanished.map(|rec| by_rec[&rec]).collect();
            self.insert_new(conn, op_id, vanished, counts)?;
        } else {
            to_write.extend(vanished);
        }
        if to_write.is_empty() {
            if self.layout.keyed() {
                crate::layout::any_plans(conn)?;
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let merge_sql = if self.layout.distributed() {
            self.distributed_update_sql(op_id)
        } else if self.layout.keyed() {
            self.update_sql(op_id)
        } else {
            self.merge_sql(op_id)
        };
        let written: Vec<Written> = sql_query(merge_sql)
            .bind::<Array<BigInt>, _>(&to_write)
            .bind::<Array<BigInt>, _>(&tag_changed)
            .bind::<Array<BigInt>, _>(&no_audit)
            .bind::<Array<BigInt>, _>(&staged_ids)
            .load(conn)
            .context("cannot merge changed tickets")?;
        if self.layout.keyed() {
            crate::layout::any_plans(conn)?;
        }
        let (moved_keys, moved_to): (Vec<&str>, Vec<chrono::DateTime<chrono::Utc>>) = written
            .iter()
            .filter_map(|w| w.moved_to.map(|at| (w.external_id.as_str(), at)))
            .unzip();
        if !moved_keys.is_empty() {
            // Pruned to the keys' shards by the ANY on the distribution column.
            sql_query(
                "UPDATE ticket_keys k SET created_at = m.created_at
                 FROM unnest($1::text[], $2::timestamptz[]) AS m(external_id, created_at)
                 WHERE k.external_id = m.external_id AND k.external_id = ANY($1)",
            )
            .bind::<Array<Text>, _>(&moved_keys)
            .bind::<Array<diesel::sql_types::Timestamptz>, _>(&moved_to)
            .execute(conn)
            .context("cannot move the keys of tickets whose created_at changed")?;
        }
        let mine: HashSet<i64> = no_audit.iter().copied().collect();
        let mut written_ids = Vec::with_capacity(written.len());
        let mut written_keys = Vec::with_capacity(written.len());
        for w in &written {
            written_ids.push(w.id);
            written_keys.push(w.external_id.as_str());
            if mine.contains(&w.id) {
                continue; // already counted with its earlier occurrence
            }
            if w.inserted {
                counts.inserted += 1;
            } else {
                counts.updated += 1;
            }
        }
        // Rows the merge's own comparison found equal after all (a concurrent writer made
        // them so) were not written.
        let not_written = to_write.len() - written.len();
        let written_set: HashSet<i64> = written_ids.iter().copied().collect();
        let not_written_mine = no_audit.iter().filter(|id| !written_set.contains(id)).count();
        counts.unchanged += (not_written - not_written_mine) as u64;

        if self.present.tags && !written_ids.is_empty() {
            // The written tickets' (id, external_id) pairs come from RETURNING: each written
            // ticket with its staged tag set; on partitions also the ticket's
            // created_at, from its key (moved with the ticket by the merge): its links are in
            // that month, probed there ticket by ticket (nested loops, the batch joined first).
            // The planner, pricing a probe as one of every month, read every month whole
            // (95 ms a batch of 2,000 at 1M tickets).
            let written = if self.layout.partitioned() {
                crate::layout::by_key_plans(conn)?;
                "SELECT w.id, k.created_at, s.tag_ids
                 FROM unnest($1::bigint[], $2::text[]) AS w(id, external_id)
                 JOIN ticket_keys k ON k.ticket_id = w.id
                 JOIN ticketops_stage_tickets s ON s.external_id = w.external_id COLLATE \"C\""
            } else {
                "SELECT w.id, NULL::timestamptz AS created_at, s.tag_ids
                 FROM unnest($1::bigint[], $2::text[]) AS w(id, external_id)
                 JOIN ticketops_stage_tickets s ON s.external_id = w.external_id"
            };
            // (Elsewhere restricted to the written ids, so that only their links are read.)
            let ids_condition = if self.layout.partitioned() {
                ""
            } else {
                " AND tt.ticket_id = ANY($1)"
            };
            sql_query(format!(
                "WITH w AS MATERIALIZED ({written})
                 DELETE FROM ticket_tags tt USING w
                 WHERE tt.ticket_id = w.id{ids_condition}{links_month} AND NOT (tt.tag_id = ANY (w.tag_ids))",
                links_month = self.layout.links_month("tt", "w.created_at"),
            ))
            .bind::<Array<BigInt>, _>(&written_ids)
            .bind::<Array<Text>, _>(&written_keys)
            .execute(conn)
            .context("cannot remove tag links")?;
            sql_query(format!(
                "WITH w AS MATERIALIZED ({written})
                 INSERT INTO ticket_tags ({columns})
                 SELECT w.id, u.tag_id{created_at} FROM w CROSS JOIN LATERAL unnest(w.tag_ids) AS u(tag_id)
                 ON CONFLICT DO NOTHING",
                columns = self.layout.link_columns(),
                created_at = self.layout.link_created_at("w.created_at"),
            ))
            .bind::<Array<BigInt>, _>(&written_ids)
            .bind::<Array<Text>, _>(&written_keys)
            .execute(conn)
            .context("cannot add tag links")?;
            if self.layout.partitioned() {
                crate::layout::any_plans(conn)?;
            }
        }
        self.phases.add("merge changed", started);
        Ok(())
    }
}

/// A new ticket as its COPY writes it: the row, its id, its created_at and its fingerprint.
type NewTicket<'r> = (&'r TicketRow, i64, DateTime<Utc>, Option<&'r [u8]>);

/// The initial load's ticket keys and tag links, gathered over its batches and written by one
/// COPY per [`GATHERED_BATCHES`] batches' worth (and at the end) instead of one per batch; on the
/// partitioned layout, with its new tickets, held in temporary files ([`HeldRows`]). A COPY
/// costs the server a set-up that grows with the rows it holds before its first flush —
/// PostgreSQL 15 registers each of up to 1,000 row slots with the statement's resource owner,
/// each registration and release searching the ones before — ~2 ms for a COPY of 1,000 rows or
/// more: of the 1M-row load in 5,000-row batches, the keys' COPYs took 0.63 s of server time
/// and the tag links' 0.58 s, gathered 0.44 and 0.41 s.
#[derive(Default)]
pub(super) struct Gathered {
    /// The keys (on the partitioned layout `held_keys`).
    keys: Vec<(i64, String, DateTime<Utc>)>,
    /// The tag links (on the partitioned layout `month_links`).
    links: Vec<NewLink>,
    /// On the partitioned layout, the new tickets and their tag links by month, and the keys.
    tickets: HeldRows,
    month_links: HeldRows,
    held_keys: HeldRows,
}

/// The keys' COPY target on the partitioned layout.
const KEY_COPY_TARGET: &str = "ticket_keys (ticket_id, external_id, created_at)";

/// Rows held for one COPY per target (a month of tickets or of tag links) over the initial
/// load's batches: their binary COPY rows (no header), each target's in an unnamed temporary
/// file of its own, so that the page cache holds them rather than the import, which stays within
/// its memory (held in its memory, they took a 2M load's peak from 29 to 75 MiB).
///
/// A batch writes the fullest target once it holds [`COPY_AT_BYTES`] or [`GATHERED_BATCHES`]
/// batches' rows (and more while all of them hold over [`HELD_BYTES`]): about a batch's rows a
/// batch, so that the reader keeps parsing the next batches while the server takes them.
/// Written all at once at 32 MiB — half a second of COPYs into every month — they had the
/// reader, one batch ahead, wait: 0.66 s of a 1M-row load.
#[derive(Default)]
struct HeldRows {
    /// What the targets hold, in bytes.
    bytes: u64,
    /// By target: the table and its columns, as the COPY names them.
    targets: HashMap<String, HeldTarget>,
}

/// One target's held rows: how many, their bytes from the start of its file, and whether they
/// go in frozen.
struct HeldTarget {
    file: std::fs::File,
    bytes: u64,
    rows: u64,
    freeze: bool,
}

/// How many bytes of tickets, of tag links and of keys are held at most for their COPYs:
/// ~110,000 tickets of the benchmark's, ~880,000 links.
const HELD_BYTES: u64 = 32 << 20;

/// How full a target is written by a batch: ~3,500 tickets of the benchmark's, ~35,000 links
/// or keys — COPYs of at least 1,000 rows, whose set-up (above) the rows outweigh.
const COPY_AT_BYTES: u64 = 1 << 20;

/// A target's file is cut back after its COPY once it grew past this (rows written over from
/// the start otherwise: their pages stay in the page cache for the next rows, where truncating
/// every file had them freed and allocated again, 1.7 s of system time a 2M load).
const FILE_KEPT_BYTES: u64 = 4 * COPY_AT_BYTES;

impl HeldRows {
    /// Appends `rows` rows for `target`, which `encode` writes to the target's file.
    fn append(
        &mut self,
        target: &str,
        freeze: bool,
        rows: usize,
        encode: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        use std::io::Seek as _;
        let held = || {
            format!(
                "cannot hold the rows for {} in a temporary file in {} (TMPDIR)",
                table_of(target),
                std::env::temp_dir().display()
            )
        };
        let held_target = match self.targets.get_mut(target) {
            Some(held_target) => held_target,
            None => self.targets.entry(target.to_owned()).or_insert(HeldTarget {
                file: tempfile::tempfile().with_context(held)?,
                bytes: 0,
                rows: 0,
                freeze,
            }),
        };
        encode(&held_target.file).with_context(held)?;
        let end = (&held_target.file).stream_position().with_context(held)?;
        self.bytes += end - held_target.bytes;
        held_target.bytes = end;
        held_target.rows += rows as u64;
        held_target.freeze = freeze;
        Ok(())
    }

    /// Writes what is due after a batch (see [`HeldRows`]): the fullest target once it holds
    /// [`COPY_AT_BYTES`] or `at_least` rows; everything when `at_least` is 0 (the load's end).
    fn copy_due<T>(&mut self, conn: &mut PgConnection, table: T, what: &str, at_least: usize) -> anyhow::Result<()>
    where
        T: diesel::Table + Copy,
        NamedCopyTarget<T>: CopyTarget<Table = T>,
    {
        let all = at_least == 0;
        let mut first = true;
        while let Some(target) = self.fullest() {
            let held = &self.targets[&target];
            let full = held.bytes >= COPY_AT_BYTES || held.rows >= at_least as u64;
            if !(all || (first && full) || self.bytes > HELD_BYTES) {
                break;
            }
            first = false;
            self.copy_target(conn, table, what, &target)?;
        }
        Ok(())
    }

    /// The target holding the most bytes of rows, if any holds rows.
    fn fullest(&self) -> Option<String> {
        self.targets
            .iter()
            .filter(|(_, held)| held.bytes > 0)
            .max_by_key(|(_, held)| held.bytes)
            .map(|(target, _)| target.clone())
    }

    /// One binary COPY of `target`'s held rows, checked to have taken every row; then starts
    /// its file over. `what` names the rows in errors.
    fn copy_target<T>(&mut self, conn: &mut PgConnection, table: T, what: &str, target: &str) -> anyhow::Result<()>
    where
        T: diesel::Table + Copy,
        NamedCopyTarget<T>: CopyTarget<Table = T>,
    {
        use std::io::Seek as _;
        use std::os::unix::fs::FileExt as _;
        let held = self.targets.get_mut(target).expect("a target held");
        let file = &held.file;
        let length = held.bytes;
        let copied = NamedCopyTarget::<T>::with(target, |copy_target| {
            diesel::copy_from(table)
                .from_raw_data(copy_target, |out| -> Result<(), diesel::result::Error> {
                    let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                    let mut buffer = vec![0u8; 256 * 1024];
                    let mut offset = 0;
                    while offset < length {
                        let n = (length - offset).min(buffer.len() as u64) as usize;
                        file.read_exact_at(&mut buffer[..n], offset).map_err(write_error)?;
                        copy.raw_rows(&buffer[..n]).map_err(write_error)?;
                        offset += n as u64;
                    }
                    copy.finish().map_err(write_error)
                })
                .with_format(CopyFormat::Binary)
                .with_freeze(held.freeze)
                .execute(conn)
                .with_context(|| format!("cannot COPY {what} into {}", table_of(target)))
        })?;
        if copied as u64 != held.rows {
            anyhow::bail!(
                "the COPY into {} took {copied} of {} {what}",
                table_of(target),
                held.rows
            );
        }
        let cut = || {
            format!(
                "cannot start over a temporary file of held rows in {}",
                std::env::temp_dir().display()
            )
        };
        if held.file.metadata().with_context(cut)?.len() > FILE_KEPT_BYTES {
            held.file.set_len(0).with_context(cut)?;
        }
        (&held.file).rewind().with_context(cut)?;
        self.bytes -= length;
        held.bytes = 0;
        held.rows = 0;
        Ok(())
    }
}

/// The table of a COPY target (`table (columns)`).
fn table_of(target: &str) -> &str {
    target.split_once(' ').map_or(target, |(table, _)| table)
}

/// The months of `links` (indexes of `months`; None: the default partition), and the links'
/// indexes in the order of their months.
fn route_links(
    conn: &mut PgConnection,
    months: &mut MonthRouter,
    links: &[NewLink],
) -> anyhow::Result<(Vec<Option<usize>>, Vec<usize>)> {
    let created: Vec<DateTime<Utc>> = links.iter().map(|l| l.created_at).collect();
    let routes = months
        .route(conn, &created)
        .context("cannot route the tag links to their months")?;
    let mut order: Vec<usize> = (0..links.len()).collect();
    order.sort_by_key(|&i| routes[i]);
    Ok((routes, order))
}

/// The COPY target of the initial load's tag links of a month (`route`, see [`route_links`]),
/// frozen; links of no month of their own (the default partition) go through the parent,
/// unfrozen.
fn link_copy_target(months: &MonthRouter, route: Option<usize>) -> (String, bool) {
    match route {
        Some(month) => (
            format!("{} (ticket_id, tag_id, ticket_created_at)", months.name(month)),
            true,
        ),
        None => ("ticket_tags (ticket_id, tag_id, ticket_created_at)".to_owned(), false),
    }
}

/// The tag links of a batch of the initial load on the partitioned layout, held by month (see
/// [`HeldRows`]); those of tickets of no month of their own (the default partition) go through
/// the parent, unfrozen.
fn gather_month_links(
    conn: &mut PgConnection,
    months: &mut MonthRouter,
    held: &mut HeldRows,
    links: &[NewLink],
) -> anyhow::Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let (routes, order) = route_links(conn, months, links)?;
    for group in order.chunk_by(|&a, &b| routes[a] == routes[b]) {
        let (target, freeze) = link_copy_target(months, routes[group[0]]);
        held.append(&target, freeze, group.len(), |out| {
            let mut copy = BinaryCopy::rows_only(out);
            for &i in group {
                encode_link(&mut copy, &links[i], true)?;
            }
            copy.flush_rows()
        })?;
    }
    Ok(())
}

/// How many batches' worth of keys (or tag links) wait for their COPY at most: with the
/// initial load's 5,000-row batches, 20,000 keys, ~1.5 MiB.
pub(super) const GATHERED_BATCHES: usize = 4;

/// A new ticket's tag link, with the ticket's created_at (by which the links are partitioned on
/// the partitioned layout).
#[derive(Debug, Clone, Copy)]
pub(super) struct NewLink {
    ticket_id: i64,
    tag_id: i64,
    created_at: DateTime<Utc>,
}

/// The tag links of new tickets, by binary COPY; `freeze` when ticket_tags was truncated in
/// this transaction (the initial load). On partitions with their tickets' created_at, and
/// frozen straight into their months (`months`), as the tickets.
fn copy_links(
    conn: &mut PgConnection,
    layout: Layout,
    months: &mut MonthRouter,
    links: &[NewLink],
    freeze: bool,
) -> anyhow::Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    if !layout.partitioned() {
        return NamedCopyTarget::<ticket_tags::table>::with("ticket_tags (ticket_id, tag_id)", |target| {
            copy_links_into(conn, target, links.iter(), false, freeze)
        });
    }
    if !freeze {
        return NamedCopyTarget::<ticket_tags::table>::with(
            "ticket_tags (ticket_id, tag_id, ticket_created_at)",
            |target| copy_links_into(conn, target, links.iter(), true, false),
        );
    }
    let (routes, order) = route_links(conn, months, links)?;
    for group in order.chunk_by(|&a, &b| routes[a] == routes[b]) {
        let group_links = group.iter().map(|&i| &links[i]);
        let (target, freeze) = link_copy_target(months, routes[group[0]]);
        NamedCopyTarget::<ticket_tags::table>::with(&target, |copy_target| {
            copy_links_into(conn, copy_target, group_links, true, freeze)
        })?;
    }
    Ok(())
}

/// One binary COPY of `links` into `target` (ticket_tags or one of its months), with their
/// tickets' created_at when `with_created_at`.
fn copy_links_into<'l, C: CopyTarget<Table = ticket_tags::table>>(
    conn: &mut PgConnection,
    target: C,
    links: impl Iterator<Item = &'l NewLink>,
    with_created_at: bool,
    freeze: bool,
) -> anyhow::Result<()> {
    let pending = RefCell::new(Some(links));
    diesel::copy_from(ticket_tags::table)
        .from_raw_data(target, |out| -> Result<(), diesel::result::Error> {
            let links = pending.take().expect("the COPY callback runs once");
            let mut copy = BinaryCopy::start(out).map_err(write_error)?;
            for link in links {
                encode_link(&mut copy, link, with_created_at).map_err(write_error)?;
            }
            copy.finish().map_err(write_error)
        })
        .with_format(CopyFormat::Binary)
        .with_freeze(freeze)
        .execute(conn)
        .context("cannot COPY tag links")?;
    Ok(())
}

/// One tag link's COPY row: ticket_id, tag_id (and ticket_created_at when `with_created_at`).
fn encode_link<W: std::io::Write>(
    copy: &mut BinaryCopy<W>,
    link: &NewLink,
    with_created_at: bool,
) -> std::io::Result<()> {
    copy.row(if with_created_at { 3 } else { 2 })?;
    copy.int8(link.ticket_id)?;
    copy.int8(link.tag_id)?;
    if with_created_at {
        copy.timestamptz(link.created_at)?;
    }
    Ok(())
}

/// One key's COPY row: ticket_id, external_id, created_at.
fn encode_key<W: std::io::Write>(
    copy: &mut BinaryCopy<W>,
    (id, external_id, created_at): (i64, &str, DateTime<Utc>),
) -> std::io::Result<()> {
    copy.row(3)?;
    copy.int8(id)?;
    copy.text(external_id)?;
    copy.timestamptz(created_at)
}

/// The key rows of new tickets (partitioned layout), by binary COPY; `freeze` when ticket_keys
/// was truncated in this transaction (the initial load).
fn copy_keys<'a>(
    conn: &mut PgConnection,
    layout: Layout,
    freeze: bool,
    keys: impl Iterator<Item = (i64, &'a str, DateTime<Utc>)>,
) -> anyhow::Result<()> {
    use crate::layout::ticket_keys;
    let keys = RefCell::new(Some(keys));
    diesel::copy_from(ticket_keys::table)
        .from_raw_data(
            (
                ticket_keys::ticket_id,
                ticket_keys::external_id,
                ticket_keys::created_at,
            ),
            |out| -> Result<(), diesel::result::Error> {
                let keys = keys.take().expect("the COPY callback runs once");
                let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                for key in keys {
                    encode_key(&mut copy, key).map_err(write_error)?;
                }
                copy.finish().map_err(write_error)
            },
        )
        .with_format(CopyFormat::Binary)
        .with_freeze(freeze)
        .execute(conn)
        .map_err(|e| keys_error(e, layout))?;
    Ok(())
}

/// The keys' COPY failed. A key that exists although the lookup found no ticket for it is
/// named (PostgreSQL's detail) with its two causes: another session inserted the ticket
/// meanwhile (a run again merges it), or, on partitions, a key left behind by a ticket whose
/// month was dropped outside ticketops — which fails every run until it is cleaned up.
fn keys_error(err: diesel::result::Error, layout: Layout) -> anyhow::Error {
    use diesel::result::{DatabaseErrorKind, Error};
    if let Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) = &err
        && info.constraint_name() == Some("ticket_keys_external_id_key")
    {
        let which = info
            .details()
            .unwrap_or("a key of the batch exists already")
            .trim_end_matches('.');
        let left_behind = if layout.partitioned() {
            ", or the key was left behind by a ticket whose month was dropped outside ticketops \
             (pg_partman's retention, DROP TABLE), which fails every run: see \"Removing old months\" in \
             docs/scaling.md"
        } else {
            ""
        };
        return anyhow::anyhow!(
            "cannot COPY the keys of new tickets: {which} in ticket_keys, but no ticket was found for it: \
             another session inserted that ticket meanwhile (run the import again: it is then merged){left_behind}"
        );
    }
    anyhow::Error::new(err).context("cannot COPY the keys of new tickets")
}

/// Inclusive ranges of consecutive ids, in order.
fn id_ranges(ids: impl Iterator<Item = i64>) -> Vec<[i64; 2]> {
    let mut ranges: Vec<[i64; 2]> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some(last) if last[1] + 1 == id => last[1] = id,
            _ => ranges.push([id, id]),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::id_ranges;

    #[test]
    fn ranges_of_ids() {
        assert_eq!(
            id_ranges([5, 6, 7, 9, 10, 20].into_iter()),
            vec![[5, 7], [9, 10], [20, 20]]
        );
        assert!(id_ranges(std::iter::empty()).is_empty());
    }
}
