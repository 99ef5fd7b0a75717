//! The revert statements of `undo` on the distributed layout. Citus refuses what the other
//! layouts' statements do on the workers: casts of JSON values (STABLE functions) next to the
//! updated row's columns, correlated subqueries for the stored tag sets, row locks across
//! shards. So each batch first decodes its images on the coordinator (a MATERIALIZED CTE of
//! typed values), reads the stored tag sets as one aggregate per ticket, and the UPDATE then
//! compares and assigns plain values. Same binds and result columns as the other layouts.
//! With `--force` the values a row held before the undo (the undo's own before-images) come
//! from the row as the UPDATE found it (`b`, the same table joined on the row's key), turned
//! into JSON on the coordinator.

use super::{INSERTED_IDS_WINDOW, ImageSet, Part, all_of};
use crate::audit::{FIX_ACTION, UPDATE_ACTION};
use crate::filters::RestateUnchanged;
use crate::layout::Layout;

pub(super) fn revert_sql(part: &Part, undo_op: i64, force: bool, restate: RestateUnchanged) -> String {
    match part {
        Part::Images(images) => images_sql(images, undo_op, force, restate),
        Part::InsertedComments => super::comments::revert_inserted_sql(undo_op, Layout::Distributed),
        Part::DeletedComments => super::comments::revert_deleted_sql(undo_op, Layout::Distributed),
        Part::Inserted { .. } => {
            let now = format!("'{}'::timestamptz", chrono::Utc::now().to_rfc3339());
            format!(
                "WITH ids AS ({INSERTED_IDS_WINDOW}
                 ), live AS MATERIALIZED (
                     -- Read before the UPDATE: Citus runs the statement's parts one after the
                     -- other, and a count in the final SELECT would see the rows it soft-deleted.
                     -- A semi-join goes to the shards with the ids (as an outer join of the ids
                     -- to tickets, Citus pulled the whole table to the coordinator every batch).
                     SELECT t.id FROM tickets t WHERE t.id IN (SELECT id FROM ids) AND t.deleted_at IS NULL
                 ), changed AS (
                     UPDATE tickets t SET deleted_at = {now}, last_operation_id = {undo_op}
                     FROM live WHERE t.id = live.id AND t.deleted_at IS NULL AND (t.last_operation_id = $1 OR $4)
                     RETURNING t.id, t.deleted_at
                 ), audited AS (
                     INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                     SELECT {undo_op}, 'tickets', id, '{FIX_ACTION}',
                            jsonb_build_object('deleted_at', NULL, 'last_operation_id', $1),
                            jsonb_build_object('deleted_at', deleted_at, 'last_operation_id', {undo_op})
                     FROM changed
                 )
                 SELECT (SELECT count(*) FROM changed) AS reverted, $2 + $3 AS next, (SELECT count(*) FROM ids) AS seen,
                        (SELECT count(*) FROM ids) - (SELECT count(*) FROM live) AS already"
            )
        }
    }
}

/// `gone`: the audit rows (of `a`) whose before-image names a ticket or user removed since,
/// which are left alone like conflicts (see `ImageSet::references_kept`). Found on the
/// coordinator for the whole batch at once: a probe per row of a ticket on another shard is
/// not a statement Citus runs.
pub(super) fn gone_references(images: &ImageSet) -> String {
    let checks: Vec<String> = images
        .columns
        .iter()
        .filter_map(|(c, _)| {
            let (table, key) = super::referenced(&images.table, c, Layout::Distributed)?;
            Some(format!(
                "(a.before ->> '{c}')::bigint NOT IN (
                     SELECT {key} FROM {table} WHERE {key} IN (SELECT (before ->> '{c}')::bigint FROM a))"
            ))
        })
        .collect();
    let condition = if checks.is_empty() {
        "FALSE".to_string()
    } else {
        checks.join(" OR ")
    };
    format!("gone AS MATERIALIZED (SELECT a.row_id FROM a WHERE {condition})")
}

/// `v.<prefix>_has_<c>` and `v.<prefix>_<c>` for every column of the images, and the tag set.
fn decoded(images: &ImageSet) -> String {
    let mut out = Vec::new();
    for (img, prefix) in [("a.before", "b"), ("a.after", "a")] {
        for (c, ty) in &images.columns {
            out.push(format!(
                "{img} ? '{c}' AS {prefix}_has_{c}, ({img} ->> '{c}')::{ty} AS {prefix}_{c}"
            ));
        }
        if images.tags {
            out.push(format!(
                "{img} ? 'tag_ids' AS {prefix}_has_tags, coalesce({img} -> 'tag_ids', '[]') AS {prefix}_tags,
                 ARRAY(SELECT jsonb_array_elements_text(coalesce({img} -> 'tag_ids', '[]'))::bigint) AS {prefix}_tag_array"
            ));
        }
    }
    out.join(", ")
}

/// The columns [`decoded`] names, as columns of `v`.
fn decoded_names(images: &ImageSet) -> String {
    let mut out = Vec::new();
    for prefix in ["b", "a"] {
        for (c, _) in &images.columns {
            out.push(format!("v.{prefix}_has_{c}, v.{prefix}_{c}"));
        }
        if images.tags {
            out.push(format!("v.{prefix}_has_tags, v.{prefix}_tags, v.{prefix}_tag_array"));
        }
    }
    out.join(", ")
}

/// Whether row `t` (and its stored tags `st`) holds the decoded image `prefix`.
fn holds(images: &ImageSet, prefix: &str) -> String {
    let mut checks: Vec<String> = images
        .columns
        .iter()
        .map(|(c, _)| format!("(NOT v.{prefix}_has_{c} OR t.{c} IS NOT DISTINCT FROM v.{prefix}_{c})"))
        .collect();
    if images.tags {
        checks.push(format!(
            "(NOT v.{prefix}_has_tags OR v.{prefix}_tags = coalesce(st.tags, '[]'))"
        ));
    }
    all_of(&checks)
}

fn images_sql(images: &ImageSet, undo_op: i64, force: bool, restate: RestateUnchanged) -> String {
    let table = &images.table;
    let set: Vec<String> = images
        .columns
        .iter()
        // A comment's ticket is its distribution column, which an UPDATE cannot change on Citus:
        // the comments whose ticket comes back are moved by `moved_back` instead.
        .filter(|(c, _)| !(table == "comments" && *c == "ticket_id"))
        .map(|(c, _)| format!("{c} = CASE WHEN v.b_has_{c} THEN v.b_{c} ELSE t.{c} END"))
        .collect();
    let mut set = if set.is_empty() {
        "id = t.id".to_string()
    } else {
        set.join(", ")
    };
    if table == "tickets" {
        let assigned: Vec<&str> = images.columns.iter().map(|(c, _)| *c).collect();
        set += &restate.set_tail_of(&assigned, "t");
    }
    let (stored_tags, tags_join) = if images.tags {
        (
            "st AS MATERIALIZED (
                 SELECT ticket_id, to_jsonb(array_agg(tag_id ORDER BY tag_id)) AS tags FROM ticket_tags
                 WHERE ticket_id IN (SELECT row_id FROM v) GROUP BY ticket_id
             ),",
            "LEFT JOIN st ON st.ticket_id = v.row_id",
        )
    } else {
        ("", "")
    };
    let tag_writes = if images.tags {
        "tags_removed AS (
             DELETE FROM ticket_tags x USING changed c
             WHERE c.b_has_tags AND x.ticket_id = c.id AND NOT x.tag_id = ANY(c.b_tag_array)
         ), tags_added AS (
             INSERT INTO ticket_tags (ticket_id, tag_id)
             SELECT c.id, u FROM changed c, unnest(c.b_tag_array) u WHERE c.b_has_tags
             ON CONFLICT DO NOTHING
         ),"
    } else {
        ""
    };
    let keys = if table == "tickets" {
        "keys_moved AS (
             UPDATE ticket_keys k SET created_at = c.created_at
             FROM changed c WHERE k.external_id = c.external_id AND k.created_at <> c.created_at
         ),"
    } else {
        ""
    };
    let (returned, tag_columns) = if table == "tickets" {
        (
            "t.created_at, t.external_id,",
            if images.tags {
                "v.b_has_tags, v.b_tag_array,"
            } else {
                ""
            },
        )
    } else {
        ("", "")
    };
    // The row before this undo, `b`, joined on the row's key (a comment's includes its ticket,
    // the distribution column), and the undo's before-image: without --force a reverted row
    // held the after-image; with it, the image's keys read from `b` on the coordinator.
    let same_row = if table == "comments" {
        "b.ticket_id = t.ticket_id AND b.id = t.id"
    } else {
        "b.id = t.id"
    };
    let (to_revert, recheck, old_values) = if force {
        let tags = if images.tags {
            " || CASE WHEN a.before ? 'tag_ids' THEN jsonb_build_object('tag_ids', c.current_tags) ELSE '{}' END"
        } else {
            ""
        };
        (
            format!("NOT {}", holds(images, "b")),
            "TRUE".to_string(),
            format!(
                "(SELECT jsonb_object_agg(k, j -> k) FROM (SELECT to_jsonb(c.before_row){tags} AS j OFFSET 0) r,
                                                         jsonb_object_keys(a.before) k)"
            ),
        )
    } else {
        (
            format!("{} AND NOT {}", holds(images, "a"), holds(images, "b")),
            holds(
                &ImageSet {
                    tags: false,
                    ..images.clone()
                },
                "a",
            ),
            "a.after".to_string(),
        )
    };
    // The row as the UPDATE found it, for --force's old values only: a whole row a ticket back
    // to the coordinator.
    let before_row = if force { ", b AS before_row" } else { "" };
    let current_tags = if images.tags {
        "coalesce(st.tags, '[]') AS current_tags,"
    } else {
        ""
    };
    let returned_tags = if images.tags { "v.current_tags," } else { "" };
    let moves = table == "comments" && images.columns.iter().any(|(c, _)| *c == "ticket_id");
    let (ticket_now, stays, moved_back, reverted_rows) = if moves {
        (
            "t.ticket_id AS t_ticket_id,",
            "AND NOT (v.b_has_ticket_id AND v.b_ticket_id IS DISTINCT FROM t.ticket_id)",
            moved_back(images, &recheck, force),
            if force {
                "reverted_rows AS (
                     SELECT id, audit_id, before_row FROM changed UNION ALL SELECT id, audit_id, before_row FROM moved_out
                 ),"
            } else {
                "reverted_rows AS (
                     SELECT id, audit_id FROM changed UNION ALL SELECT id, audit_id FROM moved_out
                 ),"
            },
        )
    } else {
        ("", "", String::new(), "reverted_rows AS (SELECT * FROM changed),")
    };
    format!(
        "WITH a AS MATERIALIZED (
             SELECT id AS audit_id, row_id, before, after FROM audit_log
             WHERE operation_id = $1 AND table_name = '{table}'
               AND action IN ('{FIX_ACTION}', '{UPDATE_ACTION}') AND id < $2
             ORDER BY id DESC LIMIT $3
         ), v AS MATERIALIZED (
             -- The decoded values go to the shards (target, the UPDATE); the images stay on
             -- the coordinator for the audit rows: sent along and returned, a batch of 5,000
             -- ticket images took 3.0 s, 1.6 s without them.
             SELECT a.audit_id, a.row_id, {decoded} FROM a
         ), {gone}, {stored_tags} target AS MATERIALIZED (
             SELECT v.audit_id, v.row_id, {decoded_names}, {current_tags} {ticket_now}
                    {to_revert} AND $4 = $4 AND v.row_id NOT IN (SELECT row_id FROM gone) AS to_revert,
                    {before_t} AS already_reverted
             FROM v JOIN {table} t ON t.id = v.row_id {tags_join}
         ), changed AS (
             UPDATE {table} t SET {set}
             FROM target v, {table} b
             WHERE t.id = v.row_id AND {same_row} AND v.to_revert AND {recheck} -- re-checked on a row changed meanwhile
               {stays}
             RETURNING t.id, {returned} {tag_columns} {returned_tags} v.audit_id {before_row}
         ), {moved_back} {reverted_rows} {tag_writes} {keys} old AS MATERIALIZED (
             SELECT c.id, a.before, {old_values} AS old_values FROM reverted_rows c JOIN a ON a.audit_id = c.audit_id
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {undo_op}, '{table}', id, '{FIX_ACTION}', old_values, before FROM old
         )
         SELECT (SELECT count(*) FROM reverted_rows) AS reverted,
                coalesce((SELECT min(audit_id) FROM a), $2) AS next,
                (SELECT count(*) FROM a) AS seen,
                (SELECT count(*) FROM target WHERE already_reverted) AS already",
        decoded = decoded(images),
        decoded_names = decoded_names(images),
        gone = gone_references(images),
        before_t = holds(images, "b"),
    )
}

/// The CTEs that move comments back to the ticket of their before-image: each is deleted from
/// its ticket's shard (with the same re-check as the UPDATE) and inserted into the other with
/// the image's values, its key following; `moved_out` returns what `changed` does.
fn moved_back(images: &ImageSet, recheck: &str, force: bool) -> String {
    let before_row = if force { ", t AS before_row" } else { "" };
    let values: Vec<String> = ["ticket_id", "author_id", "body", "public", "created_at"]
        .iter()
        .map(|c| {
            if images.columns.iter().any(|(name, _)| name == c) {
                format!("CASE WHEN v.b_has_{c} THEN v.b_{c} ELSE t.{c} END AS {c}")
            } else {
                format!("t.{c}")
            }
        })
        .collect();
    format!(
        "moved_out AS (
             DELETE FROM comments t USING target v
             WHERE t.id = v.row_id AND t.ticket_id = v.t_ticket_id AND v.to_revert AND {recheck}
               AND v.b_has_ticket_id AND v.b_ticket_id IS DISTINCT FROM t.ticket_id
             RETURNING t.id, t.external_id, {values}, v.audit_id {before_row}
         ), moved_in AS (
             INSERT INTO comments (id, external_id, ticket_id, author_id, body, public, created_at)
             SELECT id, external_id, ticket_id, author_id, body, public, created_at FROM moved_out
         ), moved_keys AS (
             UPDATE comment_keys k SET ticket_id = m.ticket_id FROM moved_out m WHERE k.external_id = m.external_id
         ),",
        values = values.join(", ")
    )
}
