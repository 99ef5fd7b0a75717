//! The `bulk_operations` record every writing command keeps: started as `running`, given a
//! checkpoint after each committed batch, finished with a status, counts and message.

use diesel::prelude::*;
use diesel::{PgConnection, QueryResult};

use crate::models::{BulkOperation, NewBulkOperation, OperationStatus};
use crate::schema::bulk_operations::dsl as ops;

/// The OS user running the command, for the audit trail.
pub fn operator() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| {
            // Cron and containers often have no USER; fall back to the uid.
            std::fs::metadata("/proc/self")
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    format!("uid:{}", m.uid())
                })
                .unwrap_or_else(|_| "unknown".into())
        })
}

/// The high 32 bits of the session advisory lock each running operation holds: the low 32
/// bits are its id. While the lock is held the operation's process is alive; once it is
/// gone (the process died, or its connection did) the operation is `abandoned`.
const LIVENESS_LOCK_CLASS: i64 = 0x7469_636b; // "tick"

const LIVENESS_LOCK_SQL: &str = "SELECT pg_advisory_lock(($1::bigint << 32) | $2)";

/// Records a new operation as `running` and takes its liveness lock on `conn` in the same
/// transaction, so that no other session can ever see it running without the lock.
pub fn start(conn: &mut PgConnection, new: &NewBulkOperation<'_>) -> QueryResult<i64> {
    conn.transaction(|conn| {
        let id = diesel::insert_into(ops::bulk_operations)
            .values(new)
            .returning(ops::id)
            .get_result(conn)?;
        take_liveness_lock(conn, id)?;
        Ok(id)
    })
}

fn take_liveness_lock(conn: &mut PgConnection, id: i64) -> QueryResult<()> {
    use diesel::sql_types::BigInt;
    diesel::sql_query(LIVENESS_LOCK_SQL)
        .bind::<BigInt, _>(LIVENESS_LOCK_CLASS)
        .bind::<BigInt, _>(id)
        .execute(conn)?;
    Ok(())
}

/// Marks every `running` operation whose liveness lock no session holds as `abandoned`: its
/// process ended without recording the end (killed, or the server went away first). Called
/// by every command that reads operations, so a dead run is never shown as running.
pub fn mark_abandoned(conn: &mut PgConnection) -> QueryResult<usize> {
    use diesel::sql_types::{Array, BigInt, Timestamptz};
    // Found first, then marked by id with the time bound: on Citus bulk_operations is a
    // reference table, whose UPDATE takes no STABLE function of a column and no join with
    // the coordinator's own pg_locks.
    let dead: Vec<i64> = diesel::sql_query(
        "SELECT o.id FROM bulk_operations o
         WHERE o.status = 'running'
           AND NOT EXISTS (
               SELECT 1 FROM pg_locks l
               WHERE l.locktype = 'advisory' AND l.granted
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid::bigint = $1 AND l.objid::bigint = o.id AND l.objsubid = 1)",
    )
    .bind::<BigInt, _>(LIVENESS_LOCK_CLASS)
    .load::<crate::db::Id>(conn)?
    .into_iter()
    .map(|r| r.id)
    .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    diesel::sql_query(
        "UPDATE bulk_operations o
         SET status = 'abandoned', finished_at = $2,
             message = CASE WHEN o.message IS NULL THEN $3 ELSE o.message || '; ' || $3 END
         WHERE o.id = ANY($1) AND o.status = 'running'",
    )
    .bind::<Array<BigInt>, _>(&dead)
    .bind::<Timestamptz, _>(chrono::Utc::now())
    .bind::<diesel::sql_types::Text, _>("abandoned: its process ended without recording the end")
    .execute(conn)
}

/// Records the end of an operation on `conn`, or, when that connection is broken (the
/// server restarted, the session was killed), on a fresh one to `url`. An error means even
/// that failed: the next command that reads operations then marks it abandoned.
pub fn record_end(
    conn: &mut PgConnection,
    url: &str,
    id: i64,
    status: OperationStatus,
    counts: &serde_json::Value,
    message: Option<&str>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if finish(conn, id, status, counts, message).is_ok() {
        return Ok(());
    }
    let mut fresh = crate::db::establish(url).context("cannot record the end of the operation")?;
    finish(&mut fresh, id, status, counts, message).with_context(|| format!("cannot record the end of operation {id}"))
}

/// Starts an operation that reads no file (cleanup, restore, fix, undo), run by this OS user.
pub fn start_job(conn: &mut PgConnection, kind: &str, args: serde_json::Value) -> anyhow::Result<i64> {
    use anyhow::Context as _;
    let operator = operator();
    let new = NewBulkOperation {
        kind,
        args,
        operator: &operator,
        source_file: None,
        source_sha256: None,
    };
    start(conn, &new).context("cannot record the operation")
}

pub fn save_checkpoint(
    conn: &mut PgConnection,
    id: i64,
    checkpoint: &serde_json::Value,
    counts: &serde_json::Value,
) -> QueryResult<()> {
    diesel::update(ops::bulk_operations.find(id))
        .set((ops::checkpoint.eq(checkpoint), ops::counts.eq(counts)))
        .execute(conn)?;
    Ok(())
}

pub fn finish(
    conn: &mut PgConnection,
    id: i64,
    status: OperationStatus,
    counts: &serde_json::Value,
    message: Option<&str>,
) -> QueryResult<()> {
    diesel::update(ops::bulk_operations.find(id))
        .set((
            ops::status.eq(status),
            ops::counts.eq(counts),
            ops::message.eq(message),
            ops::finished_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Marks an earlier unfinished operation as running again (for `--resume`), with its
/// liveness lock taken on `conn`.
pub fn reopen(conn: &mut PgConnection, id: i64) -> QueryResult<()> {
    conn.transaction(|conn| {
        take_liveness_lock(conn, id)?;
        diesel::update(ops::bulk_operations.find(id))
            .set((
                ops::status.eq(OperationStatus::Running),
                ops::finished_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                ops::message.eq(None::<String>),
            ))
            .execute(conn)?;
        Ok(())
    })
}

/// The latest operation of `kind` on a file with this SHA-256 that did not finish.
pub fn latest_unfinished(conn: &mut PgConnection, kind: &str, sha256: &str) -> QueryResult<Option<BulkOperation>> {
    mark_abandoned(conn)?;
    ops::bulk_operations
        .filter(ops::kind.eq(kind))
        .filter(ops::source_sha256.eq(sha256))
        .filter(ops::status.eq_any([
            OperationStatus::Running,
            OperationStatus::Interrupted,
            OperationStatus::Failed,
            OperationStatus::Abandoned,
        ]))
        .order(ops::id.desc())
        .select(BulkOperation::as_select())
        .first(conn)
        .optional()
}

pub fn find(conn: &mut PgConnection, id: i64) -> QueryResult<Option<BulkOperation>> {
    mark_abandoned(conn)?;
    ops::bulk_operations
        .find(id)
        .select(BulkOperation::as_select())
        .first(conn)
        .optional()
}
