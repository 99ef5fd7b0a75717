//! Ticket filters shared by every command that selects tickets (cleanup, restore, and later
//! fix, export and report). Built with Diesel's query builder: every value the user gives is
//! a bound parameter, never SQL text.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Bool, Timestamptz};

use crate::exit::UsageError;
use crate::import::normalize::{self, InputZone};
use crate::layout::partition_rows::{self, LOCKED_COLUMNS, LockedByPartition, PartitionRows};
use crate::layout::ticket_ids_by_external_id;
use crate::layout::{Layout, Span};
use crate::models::{TicketChannel, TicketPriority, TicketStatus};
use crate::schema::{organizations, tags, ticket_tags, tickets, users};

/// Which tickets a command works on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TicketFilters {
    /// Only tickets with this status (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = normalize::ticket_status, help_heading = "Filters")]
    pub status: Vec<TicketStatus>,
    /// Only tickets with this priority (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = normalize::ticket_priority, help_heading = "Filters")]
    pub priority: Vec<TicketPriority>,
    /// Only tickets from this channel (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = normalize::ticket_channel, help_heading = "Filters")]
    pub channel: Vec<TicketChannel>,
    /// Only tickets assigned to this e-mail, or `none` for unassigned ones
    #[arg(long, value_name = "EMAIL|none", help_heading = "Filters")]
    pub assignee: Option<String>,
    /// Only tickets requested by this e-mail
    #[arg(long, value_name = "EMAIL", help_heading = "Filters")]
    pub requester: Option<String>,
    /// Only tickets of this organization (by name)
    #[arg(long, value_name = "NAME", help_heading = "Filters")]
    pub organization: Option<String>,
    /// Only tickets with this tag
    #[arg(long, value_name = "NAME", help_heading = "Filters")]
    pub tag: Option<String>,
    /// Created before: a date/time (UTC unless it has an offset) or an age like 90d, 12h, 2w, 7y
    #[arg(long, value_name = "WHEN", value_parser = parse_when, help_heading = "Filters")]
    pub created_before: Option<DateTime<Utc>>,
    /// Created at or after: a date/time or an age
    #[arg(long, value_name = "WHEN", value_parser = parse_when, help_heading = "Filters")]
    pub created_after: Option<DateTime<Utc>>,
    /// Updated before: a date/time or an age like 90d
    #[arg(long, value_name = "WHEN", value_parser = parse_when, help_heading = "Filters")]
    pub updated_before: Option<DateTime<Utc>>,
    /// Updated at or after: a date/time or an age
    #[arg(long, value_name = "WHEN", value_parser = parse_when, help_heading = "Filters")]
    pub updated_after: Option<DateTime<Utc>>,
    /// Only the tickets listed in a CSV file with an `external_id` or `id` column (with both, a
    /// row's id counts where its external_id is blank)
    #[arg(long, value_name = "FILE", value_parser = readable_ids_file, help_heading = "Filters")]
    pub ids_file: Option<PathBuf>,
    /// Include soft-deleted tickets
    #[arg(long, help_heading = "Filters", conflicts_with = "only_deleted")]
    pub include_deleted: bool,
    /// Only soft-deleted tickets
    #[arg(long, help_heading = "Filters")]
    pub only_deleted: bool,
}

/// An absolute date/time, or an age (`90d`, `12h`, `2w`, `30m`, `45s`) before now.
pub fn parse_when(value: &str) -> Result<DateTime<Utc>, String> {
    let v = value.trim();
    let out_of_range = || format!("{v:?} is out of range: dates from the year 1 to 9999 are accepted");
    let when = match parse_age(v) {
        Some(age) => Utc::now().checked_sub_signed(age).ok_or_else(out_of_range)?,
        None => match normalize::timestamp(v, InputZone::Utc)? {
            Some(when) => when,
            None => return Err("a date/time or an age like 90d is needed".into()),
        },
    };
    // PostgreSQL and chrono disagree on the oldest and newest instants; this range is
    // exact in both, and no ticket lies outside it.
    if !(1..=9999).contains(&chrono::Datelike::year(&when)) {
        return Err(out_of_range());
    }
    Ok(when)
}

/// `--ids-file`: opened and its header checked when the arguments are parsed, so that a missing
/// file or one without an id column is said at once, before any connection is made (the file
/// is read again, and looked up, when the command runs).
fn readable_ids_file(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    let mut reader = open_ids_file(&path).map_err(|e| format!("{e:#}"))?;
    id_columns(&mut reader, &path).map_err(|e| format!("{e:#}"))?;
    Ok(path)
}

/// `90d`, `12h`, `2w`, `30m`, `45s`, `7y` (365 days a year) as a duration.
pub fn parse_age(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let number: i64 = value[..value.len() - unit.len_utf8()].trim().parse().ok()?;
    if number < 0 {
        return None;
    }
    match unit {
        's' => Duration::try_seconds(number),
        'm' => Duration::try_minutes(number),
        'h' => Duration::try_hours(number),
        'd' => Duration::try_days(number),
        'w' => Duration::try_weeks(number),
        // A retention policy's years: 365 days each (leap days are not counted).
        'y' => number.checked_mul(365).and_then(Duration::try_days),
        _ => None,
    }
}

/// What reading an ids file found: how many values it lists (as read, a value listed twice
/// counting twice), how many of them match no ticket, and the first few of those (in sorted
/// order, each once).
#[derive(Debug, Clone, Default)]
pub struct UnmatchedIds {
    pub listed: usize,
    pub unmatched: usize,
    pub first_unmatched: Vec<String>,
}

/// How many of the values that match no ticket the warning names.
const UNMATCHED_SHOWN: usize = 5;

impl UnmatchedIds {
    /// A warning line, or `None` when every value matched.
    pub fn warning(&self) -> Option<String> {
        if self.unmatched == 0 {
            return None;
        }
        let more = if self.unmatched > self.first_unmatched.len() {
            ", …"
        } else {
            ""
        };
        Some(format!(
            "warning: {} of the {} values in the ids file match no ticket: {}{more}",
            self.unmatched,
            self.listed,
            self.first_unmatched.join(", ")
        ))
    }

    /// Counts one more value that matches no ticket, keeping the first few in sorted order.
    fn add(&mut self, value: String) {
        self.unmatched += 1;
        let at = self.first_unmatched.partition_point(|v| *v < value);
        if at < UNMATCHED_SHOWN && self.first_unmatched.get(at) != Some(&value) {
            self.first_unmatched.insert(at, value);
            self.first_unmatched.truncate(UNMATCHED_SHOWN);
        }
    }
}

/// Filters with everything from files already read, ready to apply to queries.
#[derive(Debug, Clone)]
pub struct ResolvedFilters {
    pub filters: TicketFilters,
    /// The tickets `--ids-file` names, looked up as it was read.
    listed: Option<ListedTickets>,
}

/// The tickets an ids file names, and the values that name none.
#[derive(Debug, Clone, Default)]
struct ListedTickets {
    /// Their ids, ascending, each once.
    ids: Vec<i64>,
    unmatched: UnmatchedIds,
}

/// Values of an ids file looked up per statement, as the file is read: what stays in memory
/// is the ids of the tickets found (8 bytes each), not the file's values.
const LOOKUP_CHUNK: usize = 10_000;

/// Reads an ids file, looking its values up `LOOKUP_CHUNK` at a time: a row names its ticket
/// by external_id or, with both columns, by id where its external_id is blank (a spreadsheet
/// mixing both must not lose those rows). Tickets count deleted or not.
fn read_ids_file(conn: &mut PgConnection, path: &Path) -> anyhow::Result<ListedTickets> {
    let mut reader = open_ids_file(path)?;
    let (external_column, id_column) = id_columns(&mut reader, path)?;
    let layout = Layout::of(conn)?;
    let mut lookup = ListedLookup {
        layout,
        // Ids as they are in a file of ids, as "id N" beside external ids.
        label_ids: external_column.is_some(),
        external_ids: Vec::new(),
        ids: Vec::new(),
        listed: ListedTickets::default(),
        deduplicated: 0,
    };
    let mut record = csv::StringRecord::new();
    let mut n = 0usize;
    while reader
        .read_record(&mut record)
        .with_context(|| format!("cannot read {}", path.display()))?
    {
        n += 1;
        let field = |column: Option<usize>| {
            column
                .and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        if let Some(external_id) = field(external_column) {
            lookup.external_ids.push(external_id.to_string());
        } else if let Some(value) = field(id_column) {
            let id = value.parse().map_err(|_| {
                let line = record
                    .position()
                    .map_or(String::new(), |p| format!(" (line {})", p.line()));
                UsageError(format!(
                    "{} record {n}{line}, column id: {value:?} is not a number",
                    path.display()
                ))
            })?;
            lookup.ids.push(id);
        }
        lookup.flush(conn, LOOKUP_CHUNK)?;
    }
    lookup.flush(conn, 1)?;
    let mut listed = lookup.listed;
    listed.deduplicate();
    Ok(listed)
}

fn open_ids_file(path: &Path) -> anyhow::Result<csv::Reader<std::fs::File>> {
    csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open the ids file {}", path.display()))
}

/// The positions of an ids file's `external_id` and `id` columns; at least one is there.
fn id_columns(reader: &mut csv::Reader<std::fs::File>, path: &Path) -> anyhow::Result<(Option<usize>, Option<usize>)> {
    let header = reader
        .headers()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let position = |name: &str| header.iter().position(|h| crate::import::source::header_key(h) == name);
    let columns = (position("externalid"), position("id"));
    if columns == (None, None) {
        return Err(UsageError(format!("{} has no external_id or id column", path.display())).into());
    }
    Ok(columns)
}

impl ListedTickets {
    /// Sorts the ids found and drops repeats.
    fn deduplicate(&mut self) {
        self.ids.sort_unstable();
        self.ids.dedup();
    }
}

/// The values of an ids file read but not yet looked up, and what the lookups found.
struct ListedLookup {
    layout: Layout,
    label_ids: bool,
    external_ids: Vec<String>,
    ids: Vec<i64>,
    listed: ListedTickets,
    /// How many ids `listed` held when last deduplicated.
    deduplicated: usize,
}

impl ListedLookup {
    /// Looks up the pending values of each kind once there are `at_least` of them: external ids
    /// through `ticket_ids_by_external_id` (on partitions the keys), ids by themselves.
    fn flush(&mut self, conn: &mut PgConnection, at_least: usize) -> QueryResult<()> {
        let listed = &mut self.listed;
        if !self.external_ids.is_empty() && self.external_ids.len() >= at_least {
            let values: Vec<&str> = self.external_ids.iter().map(String::as_str).collect();
            let found = ticket_ids_by_external_id(conn, self.layout, &values)?;
            for value in self.external_ids.drain(..) {
                listed.unmatched.listed += 1;
                match found.get(&value) {
                    Some(&id) => listed.ids.push(id),
                    None => listed.unmatched.add(value),
                }
            }
        }
        if !self.ids.is_empty() && self.ids.len() >= at_least {
            let found: Vec<i64> = tickets::table
                .select(tickets::id)
                .filter(tickets::id.eq_any(&self.ids))
                .order(tickets::id)
                .load(conn)?;
            for id in self.ids.drain(..) {
                listed.unmatched.listed += 1;
                if found.binary_search(&id).is_ok() {
                    listed.ids.push(id);
                } else {
                    listed.unmatched.add(if self.label_ids {
                        format!("id {id}")
                    } else {
                        id.to_string()
                    });
                }
            }
        }
        // A file that names the same tickets over and over holds 8 bytes per distinct ticket
        // found, not per line: deduplicated whenever the list doubled since the last time.
        if listed.ids.len() >= 2 * self.deduplicated.max(LOOKUP_CHUNK) {
            listed.deduplicate();
            self.deduplicated = listed.ids.len();
        }
        Ok(())
    }
}

impl TicketFilters {
    /// Whether any filter narrows the selection (deleted-row scope alone does not).
    pub fn is_empty(&self) -> bool {
        self.status.is_empty()
            && self.priority.is_empty()
            && self.channel.is_empty()
            && self.assignee.is_none()
            && self.requester.is_none()
            && self.organization.is_none()
            && self.tag.is_none()
            && self.created_before.is_none()
            && self.created_after.is_none()
            && self.updated_before.is_none()
            && self.updated_after.is_none()
            && self.ids_file.is_none()
    }

    /// Refuses a writing command with no filter unless `--all` was given.
    pub fn require_filter_or_all(&self, all: bool, command: &str) -> anyhow::Result<()> {
        if self.is_empty() && !all {
            return Err(UsageError(format!(
                "{command} with no filter would touch every ticket; add filters, or --all if that is really meant"
            ))
            .into());
        }
        Ok(())
    }

    /// The filters with `--ids-file` read and its tickets looked up.
    pub fn resolve(&self, conn: &mut PgConnection) -> anyhow::Result<ResolvedFilters> {
        let listed = match &self.ids_file {
            Some(path) => Some(read_ids_file(conn, path)?),
            None => None,
        };
        Ok(ResolvedFilters {
            filters: self.clone(),
            listed,
        })
    }

    /// The filters as JSON, for `bulk_operations.args`.
    pub fn to_json(&self) -> serde_json::Value {
        let times = |t: &Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
        serde_json::json!({
            "status": self.status.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "priority": self.priority.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "channel": self.channel.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "assignee": self.assignee,
            "requester": self.requester,
            "organization": self.organization,
            "tag": self.tag,
            "created_before": times(&self.created_before),
            "created_after": times(&self.created_after),
            "updated_before": times(&self.updated_before),
            "updated_after": times(&self.updated_after),
            "ids_file": self.ids_file.as_ref().map(|p| p.display().to_string()),
            "include_deleted": self.include_deleted,
            "only_deleted": self.only_deleted,
        })
    }
}

/// How the filters treat soft-deleted rows, unless a command overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletedScope {
    Exclude,
    Include,
    Only,
}

impl ResolvedFilters {
    /// A warning naming the `--ids-file` values that match no ticket, deleted or not (a typo in
    /// a spreadsheet of ids would otherwise only select less), or `None`.
    pub fn unmatched_ids_warning(&self) -> Option<String> {
        self.listed.as_ref().and_then(|listed| listed.unmatched.warning())
    }

    pub fn deleted_scope(&self) -> DeletedScope {
        if self.filters.only_deleted {
            DeletedScope::Only
        } else if self.filters.include_deleted {
            DeletedScope::Include
        } else {
            DeletedScope::Exclude
        }
    }

    /// The next batch after `after_id`: up to `limit` matching tickets, locked FOR NO KEY
    /// UPDATE SKIP LOCKED so that rows a live application holds are skipped rather than waited
    /// on (NO KEY: inserts of comments and tag links that reference a ticket are not blocked).
    /// The candidates are read in primary-key order, then those that still match are locked
    /// (PostgreSQL re-checks the filters on the newest version of a row changed meanwhile).
    /// Returns the locked ids and the highest candidate id (to continue after, past rows that
    /// were skipped). On Citus the candidates are locked shard by shard.
    pub fn lock_batch(
        &self,
        conn: &mut PgConnection,
        scope: DeletedScope,
        after_id: i64,
        limit: i64,
        layout: Layout,
    ) -> QueryResult<(Vec<i64>, Option<i64>)> {
        if layout.distributed() {
            let candidates: Vec<i64> = self.candidates(scope, after_id, limit).load(conn)?;
            let held = layout.lock_tickets(conn, &candidates, "FOR NO KEY UPDATE SKIP LOCKED")?;
            // Checked again once held (as in `lock_next_for_removal`).
            let mut locked: Vec<i64> = tickets::table
                .select(tickets::id)
                .filter(tickets::id.eq_any(&held))
                .filter(self.condition(scope))
                .load(conn)?;
            locked.sort_unstable();
            return Ok((locked, candidates.last().copied()));
        }
        // The candidates are read first and locked by their ids, given as values. As one
        // statement, with the candidates a subquery, the planner — its statistics from before a
        // large soft-delete, guessing one deleted ticket — ran the subquery again for every
        // ticket it locked: a `restore --only-deleted` right after soft-deleting 100,000 of 1M
        // tickets hit the statement timeout in its first batch.
        let listed = self.listed_window(after_id, limit);
        let read;
        let (candidates, condition) = match listed {
            // An ids file: the batch's candidates are the next `limit` of the tickets it lists
            // (read once), checked against the other filters as they are locked. With the
            // whole list in each batch's statements, every batch looked up every value of the
            // file again, in every partition on that layout (a `fix set` of 25,000 of 100,000
            // listed tickets on 41 partitions: 26.5 s, the longest batch 4.9 s).
            Some(window) => (window, self.condition_of(scope, false)),
            None => {
                read = self.candidates(scope, after_id, limit).load::<i64>(conn)?;
                (read.as_slice(), self.condition(scope))
            }
        };
        let Some(&last) = candidates.last() else {
            return Ok((Vec::new(), None));
        };
        let locked: Vec<i64> = tickets::table
            .select(tickets::id)
            .filter(tickets::id.eq_any(candidates))
            .filter(condition)
            .order(tickets::id)
            .for_no_key_update()
            .skip_locked()
            .load(conn)?;
        Ok((locked, Some(last)))
    }

    /// With an ids file: the next `limit` ids after `after_id` among the tickets it lists
    /// (deleted or not, whatever the other filters say).
    fn listed_window(&self, after_id: i64, limit: i64) -> Option<&[i64]> {
        let ids = self.listed.as_ref()?.ids.as_slice();
        let from = ids.partition_point(|&id| id <= after_id);
        let to = ids
            .len()
            .min(from.saturating_add(usize::try_from(limit).unwrap_or(usize::MAX)));
        Some(&ids[from..to])
    }

    /// The soft-delete of the next batch after `after_id`, in one statement: the first
    /// `limit` matching tickets that no other transaction holds, locked FOR NO KEY UPDATE
    /// SKIP LOCKED in the same index scan that finds them, then updated by their physical
    /// address (`ctid`: no second index probe per row; a locked row cannot move). Returns the
    /// soft-deleted ids in order and the id to continue after (`None`: nothing was left to
    /// take). Rows skipped because another transaction held them are left for the next run,
    /// and so is a row another transaction changed between this statement's start and its
    /// lock (its new version is not in the statement's snapshot).
    ///
    /// On the partitioned layout a `ctid` is unique only within one partition — an UPDATE of
    /// the parent by ctid would also change rows of other partitions at the same address — so
    /// the locked rows are grouped by partition and each partition is updated by ctid
    /// ([`partition_rows`]).
    ///
    /// `walk` and `at` say where: on the partitioned layout the batches go month by month, each
    /// month in id order (see [`MonthWalk`]). Returns where the next batch starts (`None`: the
    /// walk is done).
    #[allow(clippy::too_many_arguments)]
    pub fn soft_delete_batch(
        &self,
        conn: &mut PgConnection,
        walk: &MonthWalk,
        at: WalkPosition,
        limit: i64,
        now: DateTime<Utc>,
        op_id: i64,
        restate: RestateUnchanged,
        layout: Layout,
    ) -> QueryResult<(Vec<i64>, Option<WalkPosition>)> {
        if !walk.by_month {
            let (deleted, last) =
                self.soft_delete_batch_in(conn, Span::ALL, at.after_id, limit, now, op_id, restate, layout)?;
            return Ok((deleted, last.map(|after_id| WalkPosition { after_id, ..at })));
        }
        // A month with fewer rows left than the batch takes is done: the batch goes on into the
        // next (batches stay full however the rows spread over the months).
        let mut at = at;
        let mut deleted = Vec::new();
        let mut next = None;
        while let Some(&span) = walk.spans.get(at.span) {
            let want = limit - deleted.len() as i64;
            let (more, last) = self.soft_delete_batch_in(conn, span, at.after_id, want, now, op_id, restate, layout)?;
            let full = more.len() as i64 >= want;
            deleted.extend(more);
            if let (true, Some(last)) = (full, last) {
                next = Some(WalkPosition { after_id: last, ..at });
                break;
            }
            at = WalkPosition {
                span: at.span + 1,
                after_id: 0,
            };
        }
        // Past the last range: done once a batch finds nothing more.
        let next = next.or((!deleted.is_empty()).then_some(at));
        deleted.sort_unstable();
        Ok((deleted, next))
    }

    /// [`Self::soft_delete_batch`] within the created_at range `span`.
    #[allow(clippy::too_many_arguments)]
    fn soft_delete_batch_in(
        &self,
        conn: &mut PgConnection,
        span: Span,
        after_id: i64,
        limit: i64,
        now: DateTime<Utc>,
        op_id: i64,
        restate: RestateUnchanged,
        layout: Layout,
    ) -> QueryResult<(Vec<i64>, Option<i64>)> {
        if layout.distributed() {
            // Locked shard by shard first (Citus locks rows only in one-shard statements),
            // then changed in one statement that every worker runs on its shards.
            let (locked, last) = self.lock_batch(conn, DeletedScope::Exclude, after_id, limit, layout)?;
            let mut deleted: Vec<i64> = diesel::sql_query(format!(
                "UPDATE tickets SET deleted_at = $1, last_operation_id = $2{} WHERE id = ANY($3) RETURNING id",
                restate.set_tail(&[])
            ))
            .bind::<Timestamptz, _>(now)
            .bind::<BigInt, _>(op_id)
            .bind::<diesel::sql_types::Array<BigInt>, _>(&locked)
            .load::<crate::db::Id>(conn)?
            .into_iter()
            .map(|r| r.id)
            .collect();
            deleted.sort_unstable();
            return Ok((deleted, last));
        }
        // With an ids file, the next of the tickets it lists (see `lock_batch`).
        let window = self.listed_window(after_id, limit);
        if window.is_some_and(<[i64]>::is_empty) {
            return Ok((Vec::new(), None));
        }
        let condition = || -> TicketCondition {
            let mut condition: TicketCondition = match window {
                Some(ids) => Box::new(
                    tickets::id
                        .eq_any(ids.to_vec())
                        .and(self.condition_of(DeletedScope::Exclude, false)),
                ),
                None => self.condition(DeletedScope::Exclude),
            };
            if let Some(from) = span.from {
                condition = Box::new(condition.and(tickets::created_at.ge(from)));
            }
            if let Some(until) = span.until {
                condition = Box::new(condition.and(tickets::created_at.lt(until)));
            }
            condition
        };
        let locking = |address: &str| {
            tickets::table
                // Rendered into the UPDATE, never loaded itself: the SQL type is only a label.
                .select(diesel::dsl::sql::<Tid>(address))
                .filter(condition())
                .filter(tickets::id.gt(after_id))
                .order(tickets::id)
                .limit(limit)
                .for_no_key_update()
                .skip_locked()
        };
        let mut deleted: Vec<i64> = if layout.partitioned() {
            crate::layout::by_key_plans(conn)?;
            let (set, columns) = restate.assignments(&[("deleted_at", "$1"), ("last_operation_id", "$2")]);
            let groups: Vec<PartitionRows> = LockedByPartition {
                locking: locking(LOCKED_COLUMNS),
                columns: &columns,
            }
            .load(conn)?;
            partition_rows::update_each(conn, &groups, &set, 2, |q| {
                q.bind::<Timestamptz, _>(now).bind::<BigInt, _>(op_id)
            })?
        } else {
            SoftDeleteLocked {
                locking: locking("tickets.ctid"),
                now,
                op_id,
                restate,
            }
            .load(conn)?
        };
        deleted.sort_unstable();
        // Past the whole window, also when none of it was left to soft-delete.
        let last = window.and_then(<[i64]>::last).or(deleted.last()).copied();
        Ok((deleted, last))
    }

    /// The walk of a batched soft-delete: on the partitioned layout (without an ids file) the
    /// created_at ranges of the partitions the filters can reach, one after another, else every
    /// ticket in id order. Month by month, each batch's new row versions and index entries go
    /// into one month's pages, which stay in the cache, where batches in id order over the whole
    /// table touched every month's indexes at once: soft-deleting a year of 2M tickets took
    /// 34.2 s that way and 26.1 s month by month (one `UPDATE`: 26.5 s).
    pub fn month_walk(&self, conn: &mut PgConnection, layout: Layout) -> anyhow::Result<MonthWalk> {
        if !layout.partitioned() || self.listed.is_some() {
            return Ok(MonthWalk {
                by_month: false,
                spans: vec![Span::ALL],
            });
        }
        let months = crate::layout::monthly_partitions(conn)?;
        let (after, before) = (self.filters.created_after, self.filters.created_before);
        Ok(MonthWalk {
            by_month: true,
            spans: crate::layout::partition_spans(&months)
                .into_iter()
                .filter(|span| span.meets(after, before))
                .collect(),
        })
    }

    fn candidates(&self, scope: DeletedScope, after_id: i64, limit: i64) -> tickets::BoxedQuery<'static, Pg, BigInt> {
        self.query(scope)
            .select(tickets::id)
            .filter(tickets::id.gt(after_id))
            .order(tickets::id)
            .limit(limit)
    }

    /// The tickets the filters select, as a boxed query the caller can narrow further.
    pub fn query(&self, scope: DeletedScope) -> tickets::BoxedQuery<'static, Pg> {
        tickets::table.filter(self.condition(scope)).into_boxed()
    }

    /// The filters as one boolean expression on `tickets`, for queries a boxed query cannot
    /// express (GROUP BY in the reports). Unset filters add nothing; no filter at all is TRUE.
    pub fn condition(&self, scope: DeletedScope) -> TicketCondition {
        self.condition_of(scope, true)
    }

    /// `condition`, with or without the ids file's part (left out where the ids are given
    /// otherwise).
    fn condition_of(&self, scope: DeletedScope, with_ids: bool) -> TicketCondition {
        let f = &self.filters;
        let mut parts: Vec<TicketCondition> = Vec::new();
        if !f.status.is_empty() {
            parts.push(Box::new(tickets::status.eq_any(f.status.clone())));
        }
        if !f.priority.is_empty() {
            parts.push(Box::new(tickets::priority.eq_any(f.priority.clone())));
        }
        if !f.channel.is_empty() {
            parts.push(Box::new(tickets::channel.eq_any(f.channel.clone())));
        }
        match f.assignee.as_deref().map(str::trim) {
            Some(a) if a.eq_ignore_ascii_case("none") => parts.push(Box::new(tickets::assignee_id.is_null())),
            Some(email) => {
                let ids = users::table
                    .select(users::id)
                    .filter(users::email.eq(email.to_lowercase()));
                // NULL never equals anything in SQL, so treating the column as non-null for the
                // comparison selects the same rows and keeps the expression a plain boolean.
                parts.push(Box::new(tickets::assignee_id.assume_not_null().eq_any(ids)));
            }
            None => {}
        }
        if let Some(email) = &f.requester {
            let ids = users::table
                .select(users::id)
                .filter(users::email.eq(email.trim().to_lowercase()));
            parts.push(Box::new(tickets::requester_id.eq_any(ids)));
        }
        if let Some(name) = &f.organization {
            let ids = organizations::table
                .select(organizations::id)
                .filter(organizations::name.eq(name.trim().to_string()));
            parts.push(Box::new(tickets::organization_id.assume_not_null().eq_any(ids)));
        }
        if let Some(tag) = &f.tag {
            let tag_ids = tags::table
                .select(tags::id)
                .filter(tags::name.eq(tag.trim().to_lowercase()));
            let ticket_ids = ticket_tags::table
                .select(ticket_tags::ticket_id)
                .filter(ticket_tags::tag_id.eq_any(tag_ids));
            parts.push(Box::new(tickets::id.eq_any(ticket_ids)));
        }
        if let Some(t) = f.created_before {
            parts.push(Box::new(tickets::created_at.lt(t)));
        }
        if let Some(t) = f.created_after {
            parts.push(Box::new(tickets::created_at.ge(t)));
        }
        if let Some(t) = f.updated_before {
            parts.push(Box::new(tickets::updated_at.lt(t)));
        }
        if let Some(t) = f.updated_after {
            parts.push(Box::new(tickets::updated_at.ge(t)));
        }
        if let Some(listed) = self.listed.as_ref().filter(|_| with_ids) {
            parts.push(Box::new(tickets::id.eq_any(listed.ids.clone())));
        }
        match scope {
            DeletedScope::Exclude => parts.push(Box::new(tickets::deleted_at.is_null())),
            DeletedScope::Only => parts.push(Box::new(tickets::deleted_at.is_not_null())),
            DeletedScope::Include => {}
        }
        let mut parts = parts.into_iter();
        match parts.next() {
            None => Box::new(diesel::dsl::sql::<Bool>("TRUE")),
            Some(first) => parts.fold(first, |all, part| Box::new(all.and(part))),
        }
    }
}

/// PostgreSQL's `tid`, the physical address of a row version (`ctid`).
#[derive(diesel::sql_types::SqlType)]
#[diesel(postgres_type(name = "tid"))]
struct Tid;

/// The created_at ranges a batched walk goes through, in turn ([`ResolvedFilters::month_walk`]).
#[derive(Debug, Clone)]
pub struct MonthWalk {
    /// Whether it goes by the partitions' ranges (else in id order alone, as one range).
    by_month: bool,
    spans: Vec<Span>,
}

/// Where a walk has got to: its range, and the last id done in it.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkPosition {
    span: usize,
    pub after_id: i64,
}

/// A condition on `tickets` built from user filters (every value bound, never SQL text).
pub type TicketCondition = Box<dyn BoxableExpression<tickets::table, Pg, SqlType = Bool>>;

/// A ticket's id and created_at: its key on every layout.
pub type TicketKey = (i64, DateTime<Utc>);

/// The next `limit` tickets after `after_id`, in id order, that `condition` selects and no
/// other transaction holds, locked FOR UPDATE SKIP LOCKED, with their created_at; and the
/// highest candidate id, to continue after (`None`: nothing was left). For the batches that
/// remove tickets (purge, retention). On Citus, which locks rows only in one-shard statements,
/// the candidates are read first and then locked shard by shard. (A comment or tag link being
/// added to a locked ticket waits: its foreign-key check takes the ticket's row, on partitions
/// in the ticket's month.)
pub fn lock_next_for_removal(
    conn: &mut PgConnection,
    layout: Layout,
    condition: impl Fn() -> TicketCondition,
    after_id: i64,
    limit: i64,
) -> QueryResult<(Vec<TicketKey>, Option<i64>)> {
    if layout.distributed() {
        let candidates: Vec<i64> = tickets::table
            .select(tickets::id)
            .filter(condition())
            .filter(tickets::id.gt(after_id))
            .order(tickets::id)
            .limit(limit)
            .load(conn)?;
        let held = layout.lock_tickets(conn, &candidates, "FOR UPDATE SKIP LOCKED")?;
        // Checked again once held: the filters may hold subqueries (a tag, a requester's
        // e-mail), which Citus takes in no row-locking statement, so the lock is by id alone.
        // The rows cannot change while held; one that stopped matching since the candidates
        // were read stays locked until the batch commits, and is left alone.
        let mut locked: Vec<TicketKey> = tickets::table
            .select((tickets::id, tickets::created_at))
            .filter(tickets::id.eq_any(&held))
            .filter(condition())
            .load(conn)?;
        locked.sort_unstable_by_key(|&(id, _)| id);
        return Ok((locked, candidates.last().copied()));
    }
    let batch: Vec<TicketKey> = tickets::table
        .select((tickets::id, tickets::created_at))
        .filter(condition())
        .filter(tickets::id.gt(after_id))
        .order(tickets::id)
        .limit(limit)
        .for_update()
        .skip_locked()
        .load(conn)?;
    let last = batch.last().map(|&(id, _)| id);
    Ok((batch, last))
}

/// The indexed columns of `tickets` that a soft-delete never changes. Naming them in its SET
/// list (`requester_id = requester_id`) turns off PostgreSQL's "logically unchanged index" hint
/// for their indexes, which is decided from the SET list alone. With the hint, every batch's
/// index inserts run bottom-up deletion passes over leaf pages holding the rows of the batches
/// committed just before, whose old versions are now dead: each pass reads heap pages under
/// the batch's row locks, and the passes were a third of a soft-delete's time (1M rows: 25.9
/// s with them, 18.9 s without; the single `UPDATE` takes 17.5 s). Without the hint the
/// inserts behave as in one `UPDATE` (a full page splits) and VACUUM removes the dead entries
/// in one sweep, as it must visit their heap rows anyway. Unique indexes are left out: a
/// duplicate key prompts the same pass whatever the hint.
pub const UNCHANGED_INDEXED_COLUMNS: &[&str] = &[
    "requester_id",
    "assignee_id",
    "organization_id",
    "status",
    "created_at",
    "updated_at",
    "solved_at",
];

/// What every such UPDATE also clears itself, where it may: the fingerprint of the record that
/// imported the ticket, which the tickets' trigger `ticketops_forget_fingerprint` would clear
/// row by row anyway (an UPDATE that leaves it as it was cannot keep it). Cleared in the SET
/// list, the trigger's `WHEN` is false and its PL/pgSQL call is saved: a soft-delete of 521,563
/// rows of the partitioned 1M copy took 16.4-17.3 s with the call and 15.5 s without it.
const CLEARED_FINGERPRINT: &str = "import_fingerprint";

/// Whether the UPDATEs of a run may name [`UNCHANGED_INDEXED_COLUMNS`] (and
/// [`CLEARED_FINGERPRINT`]) in their SET lists: decided once per run by
/// [`RestateUnchanged::check`], used by every statement of the run.
#[derive(Debug, Clone, Copy)]
pub struct RestateUnchanged {
    allowed: bool,
    /// Whether `created_at` is among them: not on the partitioned layout, where it is part of
    /// the tickets' primary key, which the months of tag links and comments reference. Named in
    /// the SET list, a key column makes PostgreSQL lock each row FOR UPDATE before the tickets'
    /// BEFORE trigger runs (it decides from the SET list, not the values), and a comment being
    /// added (its foreign-key check holds the ticket FOR KEY SHARE) kept a soft-delete waiting.
    created_at: bool,
}

impl RestateUnchanged {
    /// Naming is safe unless tickets has a trigger limited to columns, or the user may not
    /// update one of them (see [`crate::db::can_restate_columns`]).
    pub fn check(conn: &mut PgConnection) -> anyhow::Result<RestateUnchanged> {
        let created_at = !crate::layout::Layout::of(conn)?.partitioned();
        let columns: Vec<&str> = Self::named_columns(created_at).collect();
        let allowed = crate::db::can_restate_columns(conn, "tickets", &columns)
            .context("cannot read the triggers and column privileges of tickets")?;
        Ok(RestateUnchanged { allowed, created_at })
    }

    /// Every column the SET lists name besides the statement's own: what the user must be
    /// allowed to update.
    fn named_columns(created_at: bool) -> impl Iterator<Item = &'static str> {
        UNCHANGED_INDEXED_COLUMNS
            .iter()
            .copied()
            .filter(move |column| created_at || *column != "created_at")
            .chain([CLEARED_FINGERPRINT])
    }

    pub fn allowed(self) -> bool {
        self.allowed
    }

    /// The SET list of an UPDATE assigning `values` (column, SQL expression) with
    /// [`Self::set_tail`], and every column it names (what a user must be allowed to update
    /// where a partition is updated directly): one list makes both, so they cannot drift apart.
    pub fn assignments<'c>(self, values: &[(&'c str, &str)]) -> (String, Vec<&'c str>) {
        let assigned: Vec<&'c str> = values.iter().map(|(column, _)| *column).collect();
        let set = values
            .iter()
            .map(|(column, value)| format!("{column} = {value}"))
            .collect::<Vec<_>>()
            .join(", ")
            + &self.set_tail(&assigned);
        let mut columns = assigned.clone();
        if self.allowed {
            for column in Self::named_columns(self.created_at) {
                if !assigned.contains(&column) {
                    columns.push(column);
                }
            }
        }
        (set, columns)
    }

    /// `, requester_id = requester_id, …, import_fingerprint = NULL` for the columns of
    /// [`UNCHANGED_INDEXED_COLUMNS`] and [`CLEARED_FINGERPRINT`] that are not in `assigned` (the
    /// statement sets those itself): the tail of an UPDATE's SET list, empty when naming them is
    /// not safe.
    pub fn set_tail(self, assigned: &[&str]) -> String {
        self.set_tail_of(assigned, "")
    }

    /// [`Self::set_tail`] with the values named as columns of `row` (`, requester_id =
    /// t.requester_id, …`), for an UPDATE that joins another copy of its table.
    pub fn set_tail_of(self, assigned: &[&str], row: &str) -> String {
        if !self.allowed {
            return String::new();
        }
        let prefix = if row.is_empty() {
            String::new()
        } else {
            format!("{row}.")
        };
        let mut tail: String = Self::named_columns(self.created_at)
            .filter(|column| *column != CLEARED_FINGERPRINT)
            .filter(|column| !assigned.contains(column))
            .map(|column| format!(", {column} = {prefix}{column}"))
            .collect();
        if !assigned.contains(&CLEARED_FINGERPRINT) {
            tail += &format!(", {CLEARED_FINGERPRINT} = NULL");
        }
        tail
    }
}

/// `UPDATE tickets SET deleted_at = $now, last_operation_id = $op[, <unchanged> = <unchanged>…]
/// WHERE ctid = ANY(ARRAY(<locking query>)) RETURNING id`: Diesel's update builder cannot take
/// a locking subquery (plain layout).
struct SoftDeleteLocked<Q> {
    locking: Q,
    now: DateTime<Utc>,
    op_id: i64,
    /// Whether to name [`UNCHANGED_INDEXED_COLUMNS`] in the SET list too.
    restate: RestateUnchanged,
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for SoftDeleteLocked<Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE tickets SET deleted_at = ");
        out.push_bind_param::<Timestamptz, _>(&self.now)?;
        out.push_sql(", last_operation_id = ");
        out.push_bind_param::<BigInt, _>(&self.op_id)?;
        out.push_sql(&self.restate.set_tail(&[]));
        out.push_sql(" WHERE ctid = ANY(ARRAY(");
        self.locking.walk_ast(out.reborrow())?;
        out.push_sql(")) RETURNING id");
        Ok(())
    }
}

impl<Q> QueryId for SoftDeleteLocked<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> Query for SoftDeleteLocked<Q> {
    type SqlType = BigInt;
}

impl<Q> RunQueryDsl<PgConnection> for SoftDeleteLocked<Q> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("90d"), Duration::try_days(90));
        assert_eq!(parse_age("12h"), Duration::try_hours(12));
        assert_eq!(parse_age("2w"), Duration::try_weeks(2));
        assert_eq!(parse_age("d"), None);
        assert_eq!(parse_age("-3d"), None);
        assert_eq!(parse_age("3y"), Duration::try_days(3 * 365));
        assert_eq!(parse_age("3x"), None);
        assert_eq!(parse_age(&format!("{}y", i64::MAX / 100)), None, "overflow is no age");
    }

    #[test]
    fn when() {
        assert_eq!(
            parse_when("2024-01-02").unwrap().to_rfc3339(),
            "2024-01-02T00:00:00+00:00"
        );
        let ninety = parse_when("90d").unwrap();
        let expected = Utc::now() - Duration::try_days(90).unwrap();
        assert!((ninety - expected).num_seconds().abs() < 5);
        assert!(parse_when("last tuesday").is_err());
    }

    #[test]
    fn unmatched_values_keep_the_first_few_in_order_and_count_all() {
        let mut unmatched = UnmatchedIds {
            listed: 9,
            ..UnmatchedIds::default()
        };
        assert_eq!(unmatched.warning(), None);
        // A value listed twice counts twice but is named once.
        for value in ["g", "c", "h", "a", "f", "b", "a", "e"] {
            unmatched.add(value.to_string());
        }
        assert_eq!(unmatched.unmatched, 8);
        assert_eq!(unmatched.first_unmatched, ["a", "b", "c", "e", "f"]);
        assert_eq!(
            unmatched.warning().unwrap(),
            "warning: 8 of the 9 values in the ids file match no ticket: a, b, c, e, f, …"
        );
    }
}
