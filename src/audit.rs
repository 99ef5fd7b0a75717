//! The audit vocabulary: every `audit_log.action`, what its `before` and `after` images hold,
//! and the one way a batch of rows changed alike is recorded. Every writer (imports, fixes,
//! cleanup, restore, undo) and every reader (`undo`, `restore --operation`) uses these names;
//! none is spelled anywhere else.
//!
//! | action | table | `before` | `after` |
//! |---|---|---|---|
//! | `insert` | tickets, users, comments | NULL | NULL (the row itself is the record) |
//! | `insert_ids` | tickets | NULL | `{"ids": [[first, last], …]}`: the ranges of ids a batch inserted |
//! | `update` | tickets, users, comments | the row as it was (`to_jsonb`, tickets add `tag_ids`) | the row as written |
//! | `fix` | tickets, users, comments | the changed columns (`tag_ids` for the tag set), `updated_at`, `last_operation_id` | the same columns after |
//! | `soft_delete` | tickets | `{"deleted_at": null}` | `{"deleted_at": T, "ids": [...]}` for the batch |
//! | `restore` | tickets | `{"ids": [...], "deleted_at": T}` as found | `{"deleted_at": null}` |
//! | `purge` | tickets | `{"ids": [...], "archive": F, "archive_comments": F}` (the rows are in the archive) | NULL |
//! | `purge` | users | `{"rows": [...]}`: the users removed, whole | NULL |
//! | `delete` | comments | the row as it was (`to_jsonb`): what `undo` of an import removed | NULL |

use diesel::prelude::*;
use diesel::{PgConnection, QueryResult};

/// An action's name as a string literal, for SQL text built with `concat!` (a `const` cannot
/// go there): `audit_action!(Insert)` is `"insert"`. The only place the names are spelled.
#[macro_export]
macro_rules! audit_action {
    (Insert) => {
        "insert"
    };
    (InsertIds) => {
        "insert_ids"
    };
    (Update) => {
        "update"
    };
    (Fix) => {
        "fix"
    };
    (SoftDelete) => {
        "soft_delete"
    };
    (Restore) => {
        "restore"
    };
    (Purge) => {
        "purge"
    };
    (Delete) => {
        "delete"
    };
}

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Insert,
    InsertIds,
    Update,
    Fix,
    SoftDelete,
    Restore,
    Purge,
    Delete,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::Insert,
        Action::InsertIds,
        Action::Update,
        Action::Fix,
        Action::SoftDelete,
        Action::Restore,
        Action::Purge,
        Action::Delete,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Insert => audit_action!(Insert),
            Action::InsertIds => audit_action!(InsertIds),
            Action::Update => audit_action!(Update),
            Action::Fix => audit_action!(Fix),
            Action::SoftDelete => audit_action!(SoftDelete),
            Action::Restore => audit_action!(Restore),
            Action::Purge => audit_action!(Purge),
            Action::Delete => audit_action!(Delete),
        }
    }

    pub fn parse(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// The names as constants, for SQL text built with `format!` (`'{FIX_ACTION}'`).
pub const INSERT_ACTION: &str = Action::Insert.as_str();
pub const INSERT_IDS_ACTION: &str = Action::InsertIds.as_str();
pub const UPDATE_ACTION: &str = Action::Update.as_str();
pub const FIX_ACTION: &str = Action::Fix.as_str();
pub const SOFT_DELETE_ACTION: &str = Action::SoftDelete.as_str();
pub const RESTORE_ACTION: &str = Action::Restore.as_str();
pub const PURGE_ACTION: &str = Action::Purge.as_str();
pub const DELETE_ACTION: &str = Action::Delete.as_str();

/// Records one audit row for a batch of rows changed the same way: `row_id` is the first
/// of them, and `before`/`after` say what changed (listing the ids where needed).
pub fn record_batch(
    conn: &mut PgConnection,
    operation_id: i64,
    table_name: &str,
    action: Action,
    first_row: i64,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> QueryResult<()> {
    use crate::models::NewAuditEntry;
    use crate::schema::audit_log;
    diesel::insert_into(audit_log::table)
        .values(NewAuditEntry {
            operation_id,
            table_name,
            row_id: first_row,
            action: action.as_str(),
            before,
            after,
        })
        .execute(conn)?;
    Ok(())
}

/// One changed value of one row, as `ops show --changes` lists it.
#[derive(Debug, Clone, diesel::QueryableByName, serde::Serialize)]
pub struct ChangedValue {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    #[serde(skip)]
    pub audit_id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub table: String,
    /// The row as people name it: a ticket's or comment's external_id, a user's e-mail; for a
    /// row that no longer exists, `id N`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub key: String,
    /// The column, or `(inserted)` / `(purged)` for a whole row.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub field: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    pub before: Option<serde_json::Value>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    pub after: Option<serde_json::Value>,
}

/// What the audit rows of `operation_id` after audit id `after` (at most `limit` of them)
/// changed, value by value: the columns that differ between a row's before and after images,
/// and each row of a batch recorded as a list of ids. In audit order, then by row.
///
/// Each row's key is looked up by its id, a probe a row. As an outer join of the page's rows
/// to tickets and comments, the planner (guessing hundreds of rows for each set-returning
/// function) hashed both whole tables for every page of 20 audit rows — 5 minutes for the
/// 20,000 rows of one undo at 1M tickets — and Citus pulled both tables to the coordinator.
/// Citus refuses a correlated subquery next to a CTE: there the rows of the page's ids are
/// read first, by a semi-join the shards run.
pub fn changes(
    conn: &mut PgConnection,
    layout: crate::layout::Layout,
    operation_id: i64,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<ChangedValue>> {
    use diesel::sql_types::BigInt;
    let (key, joins) = if layout.distributed() {
        (
            "CASE c.table_name WHEN 'tickets' THEN t.external_id WHEN 'users' THEN u.email
                               WHEN 'comments' THEN m.external_id END"
                .to_string(),
            "LEFT JOIN (SELECT id, external_id FROM tickets
                        WHERE id IN (SELECT row_id FROM changed WHERE table_name = 'tickets')) t
                   ON c.table_name = 'tickets' AND t.id = c.row_id
             LEFT JOIN users u ON c.table_name = 'users' AND u.id = c.row_id
             LEFT JOIN (SELECT id, external_id FROM comments
                        WHERE id IN (SELECT row_id FROM changed WHERE table_name = 'comments')) m
                   ON c.table_name = 'comments' AND m.id = c.row_id",
        )
    } else {
        // On partitions a ticket's key comes from `ticket_keys` (by id through tickets, every
        // partition was probed for each row: 20,000 rows in 2.65 s, now 2.21, plain 1.55); a
        // ticket without a key from tickets, which COALESCE only then reads.
        let ticket_key = if layout.partitioned() {
            "coalesce((SELECT k.external_id FROM ticket_keys k WHERE k.ticket_id = c.row_id),
                      (SELECT t.external_id FROM tickets t WHERE t.id = c.row_id LIMIT 1))"
        } else {
            "(SELECT t.external_id FROM tickets t WHERE t.id = c.row_id LIMIT 1)"
        };
        (
            format!(
                "CASE c.table_name
                     WHEN 'tickets' THEN {ticket_key}
                     WHEN 'users' THEN (SELECT u.email FROM users u WHERE u.id = c.row_id)
                     WHEN 'comments' THEN (SELECT m.external_id FROM comments m WHERE m.id = c.row_id) END"
            ),
            "",
        )
    };
    let query = diesel::sql_query(format!(
        "WITH a AS (
             SELECT id, table_name, row_id, action, before, after FROM audit_log
             WHERE operation_id = $1 AND id > $2 ORDER BY id LIMIT $3
         ), changed AS (
             SELECT a.id AS audit_id, a.table_name, a.row_id, k.key AS field, a.before -> k.key AS before,
                    a.after -> k.key AS after
             FROM a CROSS JOIN LATERAL jsonb_object_keys(coalesce(a.before, '{{}}') || coalesce(a.after, '{{}}')) k(key)
             WHERE a.action IN ('{FIX_ACTION}', '{UPDATE_ACTION}') AND k.key <> 'last_operation_id'
               AND (a.before -> k.key) IS DISTINCT FROM (a.after -> k.key)
             UNION ALL
             SELECT a.id, a.table_name, a.row_id, '(inserted)', NULL, NULL FROM a WHERE a.action = '{INSERT_ACTION}'
             UNION ALL
             SELECT a.id, a.table_name, a.row_id, '(deleted)', NULL, NULL FROM a WHERE a.action = '{DELETE_ACTION}'
             UNION ALL
             SELECT a.id, a.table_name, g.id, '(inserted)', NULL, NULL
             FROM a CROSS JOIN LATERAL jsonb_array_elements(a.after -> 'ids') r
                    CROSS JOIN LATERAL generate_series((r ->> 0)::bigint, (r ->> 1)::bigint) g(id)
             WHERE a.action = '{INSERT_IDS_ACTION}'
             UNION ALL
             SELECT a.id, a.table_name, i.value::bigint, 'deleted_at', 'null'::jsonb, a.after -> 'deleted_at'
             FROM a CROSS JOIN LATERAL jsonb_array_elements_text(a.after -> 'ids') i
             WHERE a.action = '{SOFT_DELETE_ACTION}'
             UNION ALL
             SELECT a.id, a.table_name, i.value::bigint, 'deleted_at', a.before -> 'deleted_at' -> (i.n::int - 1), 'null'::jsonb
             FROM a CROSS JOIN LATERAL jsonb_array_elements_text(a.before -> 'ids') WITH ORDINALITY i(value, n)
             WHERE a.action = '{RESTORE_ACTION}'
             UNION ALL
             SELECT a.id, a.table_name, coalesce(i.value ->> 'id', i.value #>> '{{}}')::bigint, '(purged)', NULL, NULL
             FROM a CROSS JOIN LATERAL jsonb_array_elements(coalesce(a.before -> 'ids', a.before -> 'rows')) i
             WHERE a.action = '{PURGE_ACTION}'
         )
         SELECT c.audit_id, c.table_name AS table, coalesce({key}, 'id ' || c.row_id) AS key,
                c.field, c.before, c.after
         FROM changed c
         {joins}
         ORDER BY c.audit_id, c.row_id, c.field"
    ))
    .bind::<BigInt, _>(operation_id)
    .bind::<BigInt, _>(after)
    .bind::<BigInt, _>(limit);
    // (Pooled sessions run without JIT: the planner's guesses for the set-returning functions
    // priced a page of 20 rows high enough to compile it, ~450 ms a page against 1 ms.)
    query.load(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_one_name_that_reads_back() {
        let mut names = std::collections::HashSet::new();
        for action in Action::ALL {
            assert!(names.insert(action.as_str()), "{action} twice");
            assert_eq!(Action::parse(action.as_str()), Some(action));
            assert!(action.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
        assert_eq!(Action::parse("remove"), None);
    }

    #[test]
    fn the_constants_and_the_macro_are_the_enum() {
        assert_eq!(INSERT_ACTION, Action::Insert.as_str());
        assert_eq!(INSERT_IDS_ACTION, audit_action!(InsertIds));
        assert_eq!(UPDATE_ACTION, Action::Update.to_string());
        assert_eq!(FIX_ACTION, "fix");
        assert_eq!(SOFT_DELETE_ACTION, "soft_delete");
        assert_eq!(RESTORE_ACTION, "restore");
        assert_eq!(PURGE_ACTION, "purge");
        assert_eq!(DELETE_ACTION, audit_action!(Delete));
    }
}
