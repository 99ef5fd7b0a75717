//! Undo of the comments an import inserted, and undo of that undo, on every layout. Comments
//! have no soft-delete: the undo deletes them, recording each whole (`delete`), so that undoing
//! the undo puts them back with their ids (`insert`). A comment written again since (an audit
//! row after the import's for it) changed since: left alone unless --force. Every statement
//! reads the audit rows and the comments into MATERIALIZED CTEs first and decides there, which
//! on Citus runs on the coordinator (no correlated subqueries, no outer joins to shards).
//! Binds as every batch: $1 the operation undone, $2 the cursor (audit id, descending), $3 the
//! batch size, $4 --force.

use crate::audit::{DELETE_ACTION, INSERT_ACTION};
use crate::layout::Layout;

/// The import's `insert` rows of comments in the batch window (`a`), which of their comments
/// exist (`present`) and which were written since (`later`). Off Citus `later` probes the
/// audit rows of each comment of `a` (a LATERAL subquery with a LIMIT is never turned into a
/// join): as a join, with audit_log's statistics from before an import (one comment row), the
/// planner scanned every comment audit row against the whole batch — 4 s for 5,000 rows.
/// Citus runs no correlated subquery against its shards; there the join stays.
fn inserted_ctes(window: &str, layout: Layout) -> String {
    let later = if layout.distributed() {
        "SELECT DISTINCT a.row_id FROM a
             JOIN audit_log l ON l.table_name = 'comments' AND l.row_id = a.row_id AND l.id > a.audit_id"
    } else {
        "SELECT a.row_id FROM a CROSS JOIN LATERAL (
                 SELECT 1 FROM audit_log l
                 WHERE l.table_name = 'comments' AND l.row_id = a.row_id AND l.id > a.audit_id LIMIT 1) l"
    };
    format!(
        "a AS MATERIALIZED (
             SELECT id AS audit_id, row_id FROM audit_log
             WHERE operation_id = $1 AND table_name = 'comments' AND action = '{INSERT_ACTION}' {window}
         ), present AS MATERIALIZED (
             SELECT c.id FROM a JOIN comments c ON c.id = a.row_id
         ), later AS MATERIALIZED (
             {later}
         ), target AS MATERIALIZED (
             SELECT a.audit_id, a.row_id, a.row_id IN (SELECT id FROM present) AS present,
                    a.row_id IN (SELECT row_id FROM later) AS changed_since
             FROM a
         )"
    )
}

const WINDOW: &str = "AND id < $2 ORDER BY id DESC LIMIT $3";

/// Deletes a batch of the comments the import inserted.
pub(super) fn revert_inserted_sql(undo_op: i64, layout: Layout) -> String {
    let keys = if layout.keyed() {
        "keys AS (
             DELETE FROM comment_keys k USING deleted d WHERE k.external_id = d.external_id
         ),"
    } else {
        ""
    };
    format!(
        "WITH {ctes}, deleted AS (
             DELETE FROM comments c USING target v
             WHERE c.id = v.row_id AND v.present AND (NOT v.changed_since OR $4)
             RETURNING c.*
         ), {keys} audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {undo_op}, 'comments', d.id, '{DELETE_ACTION}', to_jsonb(d), NULL FROM deleted d
         )
         SELECT (SELECT count(*) FROM deleted) AS reverted,
                coalesce((SELECT min(audit_id) FROM target), $2) AS next,
                (SELECT count(*) FROM target) AS seen,
                (SELECT count(*) FROM target WHERE NOT present) AS already",
        ctes = inserted_ctes(WINDOW, layout),
    )
}

/// The dry run's counts of the inserted comments ($1 only).
pub(super) fn plan_inserted_sql(layout: Layout) -> String {
    format!(
        "WITH {ctes}
         SELECT count(*) FILTER (WHERE present AND NOT changed_since) AS revertible,
                count(*) FILTER (WHERE NOT present) AS already,
                count(*) FILTER (WHERE present AND changed_since) AS conflicts
         FROM target",
        ctes = inserted_ctes("", layout)
    )
}

/// An undo's `delete` rows in the window (`a`), decoded (`v`), and whether each can come back:
/// its id is free, its external_id too, its ticket and author exist.
fn deleted_ctes(window: &str, layout: Layout) -> String {
    // Where a comment's external_id is unique: comments itself, or on Citus and partitions its
    // key table.
    let keys = if layout.keyed() {
        "SELECT k.external_id FROM v JOIN comment_keys k ON k.external_id = v.external_id"
    } else {
        "SELECT c.external_id FROM v JOIN comments c ON c.external_id = v.external_id"
    };
    format!(
        "a AS MATERIALIZED (
             SELECT id AS audit_id, before FROM audit_log
             WHERE operation_id = $1 AND table_name = 'comments' AND action = '{DELETE_ACTION}' {window}
         ), v AS MATERIALIZED (
             SELECT a.audit_id, (a.before ->> 'id')::bigint AS id, a.before ->> 'external_id' AS external_id,
                    (a.before ->> 'ticket_id')::bigint AS ticket_id, (a.before ->> 'author_id')::bigint AS author_id,
                    a.before ->> 'body' AS body, (a.before ->> 'public')::boolean AS public,
                    (a.before ->> 'created_at')::timestamptz AS created_at
             FROM a
         ), present AS MATERIALIZED (
             SELECT c.id FROM v JOIN comments c ON c.id = v.id
         ), keys_taken AS MATERIALIZED (
             {keys}
         ), tickets_there AS MATERIALIZED (
             SELECT t.id FROM v JOIN tickets t ON t.id = v.ticket_id
         ), authors_there AS MATERIALIZED (
             SELECT u.id FROM v JOIN users u ON u.id = v.author_id
         ), target AS MATERIALIZED (
             SELECT v.*, v.id IN (SELECT id FROM present) AS present,
                    (v.external_id IS NULL OR v.external_id NOT IN (SELECT external_id FROM keys_taken))
                    AND v.ticket_id IN (SELECT id FROM tickets_there)
                    AND v.author_id IN (SELECT id FROM authors_there) AS possible
             FROM v
         )"
    )
}

/// Puts back a batch of the comments an undo deleted (undo of that undo).
pub(super) fn revert_deleted_sql(undo_op: i64, layout: Layout) -> String {
    let keys = if layout.keyed() {
        "keys AS (
             INSERT INTO comment_keys (external_id, comment_id, ticket_id)
             SELECT external_id, id, ticket_id FROM added WHERE external_id IS NOT NULL
         ),"
    } else {
        ""
    };
    // On partitions a comment comes back into its ticket's month as it is now.
    let (column, month, ticket_keys) = if layout.partitioned() {
        (
            ", ticket_created_at",
            ", k.created_at",
            " JOIN ticket_keys k ON k.ticket_id = target.ticket_id",
        )
    } else {
        ("", "", "")
    };
    format!(
        "WITH {ctes}, added AS (
             INSERT INTO comments (id, external_id, ticket_id, author_id, body, public, created_at{column})
             SELECT target.id, target.external_id, target.ticket_id, target.author_id, target.body, target.public,
                    target.created_at{month}
             FROM target{ticket_keys}
             WHERE NOT target.present AND target.possible AND $4 = $4
             RETURNING id, external_id, ticket_id
         ), {keys} audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {undo_op}, 'comments', id, '{INSERT_ACTION}', NULL, NULL FROM added
         )
         SELECT (SELECT count(*) FROM added) AS reverted,
                coalesce((SELECT min(audit_id) FROM target), $2) AS next,
                (SELECT count(*) FROM target) AS seen,
                (SELECT count(*) FROM target WHERE present) AS already",
        ctes = deleted_ctes(WINDOW, layout),
    )
}

/// The dry run's counts of the deleted comments ($1 only).
pub(super) fn plan_deleted_sql(layout: Layout) -> String {
    format!(
        "WITH {ctes}
         SELECT count(*) FILTER (WHERE NOT present AND possible) AS revertible,
                count(*) FILTER (WHERE present) AS already,
                count(*) FILTER (WHERE NOT present AND NOT possible) AS conflicts
         FROM target",
        ctes = deleted_ctes("", layout)
    )
}
