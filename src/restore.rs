//! Bringing soft-deleted tickets back: exactly the rows one soft-delete operation deleted
//! (`restore --operation`, and `undo` of a soft-delete run), or the rows a filter selects.
//! Each batch locks and restores its rows in one statement and leaves a `restore` audit row.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use serde_json::json;

use crate::audit::{self, Action, SOFT_DELETE_ACTION};
use crate::db::Pool;
use crate::exit::UsageError;
use crate::filters::RestateUnchanged;
use crate::job::{BatchSettings, Job, JobSummary, Step};
use crate::layout::partition_rows::{self, LOCKED_COLUMNS, PartitionRows};
use crate::operation;
use crate::schema::tickets;

/// The operation kind, and the advisory lock, of every restore.
pub const KIND: &str = "restore";

#[derive(diesel::QueryableByName)]
struct AuditBatch {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    after: serde_json::Value,
}

/// The tickets a soft-delete operation deleted, read from its audit trail one audit row (one
/// of its batches) at a time, so that memory does not grow with the operation's size, and
/// handed out as many at a time as each caller's batch takes, with the deleted_at that batch
/// set.
pub struct DeletedBatches {
    source_op: i64,
    /// The last audit row read.
    after_audit_id: i64,
    /// The ids of the audit row being worked through, those not done yet.
    pending: Option<(DateTime<Utc>, Vec<i64>)>,
}

impl DeletedBatches {
    fn new(source_op: i64) -> DeletedBatches {
        DeletedBatches {
            source_op,
            after_audit_id: 0,
            pending: None,
        }
    }

    /// The next at most `limit` ids (from one audit row: one soft-delete time), left in place
    /// until [`DeletedBatches::done_with`] (a batch that is rolled back and retried gets them
    /// again); `None` at the end.
    fn front(&mut self, conn: &mut PgConnection, limit: usize) -> anyhow::Result<Option<(DateTime<Utc>, &[i64])>> {
        while self.pending.as_ref().is_none_or(|(_, ids)| ids.is_empty()) {
            let row: Option<AuditBatch> = diesel::sql_query(
                "SELECT id, after FROM audit_log
                 WHERE operation_id = $1 AND action = $2 AND after IS NOT NULL AND id > $3
                 ORDER BY id LIMIT 1",
            )
            .bind::<BigInt, _>(self.source_op)
            .bind::<diesel::sql_types::Text, _>(SOFT_DELETE_ACTION)
            .bind::<BigInt, _>(self.after_audit_id)
            .get_result(conn)
            .optional()?;
            let Some(row) = row else { return Ok(None) };
            let when: DateTime<Utc> = serde_json::from_value(row.after["deleted_at"].clone())
                .with_context(|| format!("unreadable deleted_at in audit row {}", row.id))?;
            let ids: Vec<i64> = serde_json::from_value(row.after["ids"].clone())
                .with_context(|| format!("unreadable ids in audit row {}", row.id))?;
            self.pending = Some((when, ids));
            self.after_audit_id = row.id;
        }
        Ok(self
            .pending
            .as_ref()
            .map(|(when, ids)| (*when, &ids[..ids.len().min(limit.max(1))])))
    }

    /// The first `n` ids [`DeletedBatches::front`] gave are done.
    fn done_with(&mut self, n: usize) {
        if let Some((_, ids)) = &mut self.pending {
            ids.drain(..n.min(ids.len()));
        }
    }
}

/// Clears deleted_at on `ids` (locked by the caller), recording their before values; returns
/// how many changed.
pub fn undelete(
    conn: &mut PgConnection,
    op_id: i64,
    ids: &[i64],
    before: Vec<Option<DateTime<Utc>>>,
    restate: RestateUnchanged,
) -> anyhow::Result<u64> {
    let changed = diesel::sql_query(format!(
        "UPDATE tickets SET deleted_at = NULL, last_operation_id = $1{} WHERE id = ANY($2)",
        restate.set_tail(&[])
    ))
    .bind::<BigInt, _>(op_id)
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)?;
    audit_restored(conn, op_id, ids, before)?;
    Ok(changed as u64)
}

/// One batch of `restore --operation`: those of `ids` still deleted by `source_op` (deleted_at
/// as it set it, last_operation_id its own) that no other transaction holds, locked and
/// restored (reached by `ctid`, as the soft-delete does). Returns their ids in
/// order.
fn undelete_its_own(
    conn: &mut PgConnection,
    op_id: i64,
    source_op: i64,
    deleted_at: DateTime<Utc>,
    ids: &[i64],
    restate: RestateUnchanged,
    layout: crate::layout::Layout,
) -> anyhow::Result<Vec<i64>> {
    // By ctid on one table and in each partition (a ctid is unique only per partition); on
    // Citus locked shard by shard first (it locks rows only in one-shard statements).
    let (set, columns) = restate.assignments(&[("deleted_at", "NULL"), ("last_operation_id", "$1")]);
    let its_own = "id = ANY($2) AND deleted_at = $3 AND last_operation_id = $4";
    let mut restored: Vec<i64> = if layout.partitioned() {
        // The lock binds $1 too (unused there), so that `its_own` reads the same in both.
        let groups: Vec<PartitionRows> = diesel::sql_query(partition_rows::grouped_sql(
            &format!("SELECT {LOCKED_COLUMNS} FROM tickets WHERE {its_own} FOR NO KEY UPDATE SKIP LOCKED"),
            &columns,
        ))
        .bind::<BigInt, _>(op_id)
        .bind::<Array<BigInt>, _>(ids)
        .bind::<diesel::sql_types::Timestamptz, _>(deleted_at)
        .bind::<BigInt, _>(source_op)
        .load(conn)?;
        partition_rows::update_each(conn, &groups, &set, 1, |q| q.bind::<BigInt, _>(op_id))?
    } else {
        let mut locked: Vec<i64> = Vec::new();
        let addressed = if layout.distributed() {
            locked = layout.lock_per_shard(conn, ids, |conn, ids| {
                use crate::schema::tickets;
                use diesel::prelude::*;
                tickets::table
                    .select(tickets::id)
                    .filter(tickets::id.eq_any(ids))
                    .filter(tickets::deleted_at.eq(deleted_at))
                    .filter(tickets::last_operation_id.eq(source_op))
                    .for_no_key_update()
                    .skip_locked()
                    .load(conn)
            })?;
            format!("WHERE {its_own}")
        } else {
            format!("WHERE ctid = ANY(ARRAY(SELECT ctid FROM tickets WHERE {its_own} FOR NO KEY UPDATE SKIP LOCKED))")
        };
        diesel::sql_query(format!(
            "UPDATE tickets SET {set} {addressed} RETURNING tickets.id AS id"
        ))
        .bind::<BigInt, _>(op_id)
        .bind::<Array<BigInt>, _>(if layout.distributed() { &locked } else { ids })
        .bind::<diesel::sql_types::Timestamptz, _>(deleted_at)
        .bind::<BigInt, _>(source_op)
        .load::<crate::db::Id>(conn)?
        .into_iter()
        .map(|row| row.id)
        .collect()
    };
    restored.sort_unstable();
    if !restored.is_empty() {
        audit_restored(conn, op_id, &restored, vec![Some(deleted_at); restored.len()])?;
    }
    Ok(restored)
}

/// One audit row per restored batch: the ids and the deleted_at each had.
fn audit_restored(
    conn: &mut PgConnection,
    op_id: i64,
    ids: &[i64],
    before: Vec<Option<DateTime<Utc>>>,
) -> anyhow::Result<()> {
    audit::record_batch(
        conn,
        op_id,
        "tickets",
        Action::Restore,
        ids[0],
        Some(json!({"ids": ids, "deleted_at": before})),
        Some(json!({"deleted_at": null})),
    )?;
    Ok(())
}

/// What `restore --operation` would do: how many tickets the operation soft-deleted, and how
/// many of them are still deleted by it (not restored since, deleted again, or purged).
#[derive(Debug, Clone, Copy)]
pub struct OperationPreview {
    pub source_op: i64,
    pub deleted: usize,
    pub restorable: i64,
}

impl OperationPreview {
    pub fn describe(&self) -> String {
        format!(
            "operation {} soft-deleted {} ticket(s); {} can be restored",
            self.source_op, self.deleted, self.restorable
        )
    }
}

/// Checks that `source_op` exists and soft-deleted tickets (a usage error otherwise), and
/// counts what restoring it would do.
pub fn preview_operation(conn: &mut PgConnection, source_op: i64, chunk: usize) -> anyhow::Result<OperationPreview> {
    let op = operation::find(conn, source_op)?
        .ok_or_else(|| UsageError(format!("there is no operation {source_op} (see `ticketops ops list`)")))?;
    if DeletedBatches::new(source_op).front(conn, chunk)?.is_none() {
        return Err(UsageError(format!(
            "operation {source_op} ({}) soft-deleted no tickets; nothing to restore",
            op.kind
        ))
        .into());
    }
    let mut batches = DeletedBatches::new(source_op);
    let (mut deleted, mut restorable) = (0usize, 0i64);
    while let Some((when, ids)) = batches.front(conn, chunk)? {
        let taken = ids.len();
        deleted += taken;
        restorable += tickets::table
            .filter(tickets::id.eq_any(ids))
            .filter(tickets::deleted_at.eq(when))
            .filter(tickets::last_operation_id.eq(source_op))
            .count()
            .get_result::<i64>(conn)?;
        batches.done_with(taken);
    }
    Ok(OperationPreview {
        source_op,
        deleted,
        restorable,
    })
}

/// How a `restore --operation` run ended: the job, and the rows left alone because they
/// changed since the soft-delete.
#[derive(Debug)]
pub struct OperationRestored {
    pub summary: JobSummary,
    pub skipped: u64,
    pub skipped_sample: Vec<i64>,
}

impl OperationRestored {
    /// A note on the rows left alone, if any.
    pub fn skipped_note(&self, source_op: i64) -> Option<String> {
        (self.skipped > 0).then(|| {
            format!(
                "{} ticket(s) changed since operation {source_op} (restored, deleted again, purged or locked) were left alone, e.g. ids {:?}",
                self.skipped, self.skipped_sample
            )
        })
    }
}

/// Restores exactly the tickets `source_op` soft-deleted and that are still deleted by it, as
/// a batch job (lock `restore`, operation record, batches of the soft-delete's own chunks).
pub fn restore_operation(
    pool: &Pool,
    url: &str,
    conn: &mut PgConnection,
    source_op: i64,
    settings: &BatchSettings,
    watch: &crate::output::Watch,
) -> anyhow::Result<OperationRestored> {
    let job = Job::start(pool, url, conn, KIND, json!({"operation": source_op}))?;
    let op_id = job.operation_id;
    let restate = RestateUnchanged::check(conn)?;
    let layout = crate::layout::Layout::of(conn)?;
    let mut batches = DeletedBatches::new(source_op);
    let mut skipped = 0u64;
    let mut skipped_sample: Vec<i64> = Vec::new();
    let stats = job.run(conn, settings, watch, |conn, limit| {
        let Some((when, ids)) = batches.front(conn, limit as usize)? else {
            return Ok(Step { rows: 0, done: true });
        };
        let restorable = undelete_its_own(conn, op_id, source_op, when, ids, restate, layout)?;
        let restored = restorable.len() as u64;
        let left: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| restorable.binary_search(id).is_err())
            .collect();
        skipped += left.len() as u64;
        skipped_sample.extend(left.iter().take(10usize.saturating_sub(skipped_sample.len())));
        let taken = ids.len();
        batches.done_with(taken);
        Ok(Step {
            rows: restored,
            done: false,
        })
    });
    let rows = stats.rows;
    let summary = job.finish(
        conn,
        stats,
        json!({"restored": rows, "skipped_changed": skipped, "of_operation": source_op}),
    );
    Ok(OperationRestored {
        summary,
        skipped,
        skipped_sample,
    })
}
