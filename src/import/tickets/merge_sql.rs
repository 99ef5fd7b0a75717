//! The SQL of the write path's comparison and merge of changed tickets: what each stored
//! column becomes, the classification of staged rows, and the merge itself — an upsert on the
//! plain layout, an UPDATE that may move rows between months on the partitioned one.

use super::*;

/// The stored columns compared and written, in order.
const COLUMNS: &[&str] = &[
    "subject",
    "description",
    "status",
    "priority",
    "channel",
    "requester_id",
    "assignee_id",
    "organization_id",
    "created_at",
    "updated_at",
    "solved_at",
    "deleted_at",
];

impl TicketImport {
    /// The value each stored column should have after the import, for staged row `s` and the
    /// stored ticket `e`. Columns the file lacks keep the stored value, and so do blank
    /// created_at/updated_at (so a file without them re-imports as unchanged).
    pub(super) fn target_exprs(&self) -> Vec<String> {
        let p = self.present;
        let keep = |present: bool, col: &str, default: &str| -> String {
            if present {
                format!("s.{col}")
            } else if default.is_empty() {
                format!("e.{col}")
            } else {
                format!("coalesce(e.{col}, {default})")
            }
        };
        let now = format!("'{}'::timestamptz", self.import_time.to_rfc3339());
        vec![
            "s.subject".into(),
            keep(p.description, "description", ""),
            "s.status".into(),
            keep(p.priority, "priority", "'normal'"),
            keep(p.channel, "channel", "'other'"),
            "s.requester_id".into(),
            keep(p.assignee, "assignee_id", ""),
            keep(p.organization, "organization_id", ""),
            format!("coalesce(s.created_at, e.created_at, {now})"),
            format!("coalesce(s.updated_at, e.updated_at, s.created_at, {now})"),
            keep(p.solved_at, "solved_at", ""),
            if self.undelete {
                "NULL::timestamptz".into()
            } else {
                "e.deleted_at".into()
            },
        ]
    }

    pub(super) fn tags_target(&self) -> String {
        if self.present.tags {
            "s.tag_ids".into()
        } else if self.layout.distributed() {
            STORED_TAGS_OF_ST.into()
        } else {
            stored_tags_of_e(self.layout)
        }
    }

    pub(super) fn classify_sql(&self, op_id: i64) -> String {
        let stored: Vec<String> = COLUMNS.iter().map(|c| format!("e.{c}")).collect();
        let target = self.target_exprs();
        // The stored tag set is read once per row (LATERAL), not once per use; on Citus, which
        // takes no correlated subquery here, joined as one aggregate per ticket on its shard.
        let (tags_join, tags_differ) = if self.present.tags && self.layout.distributed() {
            (
                stored_tags_join("$1"),
                "coalesce(st.tag_ids, '{}') IS DISTINCT FROM s.tag_ids",
            )
        } else if self.present.tags {
            (
                // OFFSET 0 keeps the planner from inlining the subquery into each use.
                format!(
                    "CROSS JOIN LATERAL (SELECT {} AS tag_ids OFFSET 0) st",
                    stored_tags_of_e(self.layout)
                ),
                "st.tag_ids IS DISTINCT FROM s.tag_ids",
            )
        } else {
            (String::new(), "false")
        };
        let (stored_ticket, stored_ids) = self.stored_ticket_join("$1");
        format!(
            "SELECT rec, id, deleted, mine, (fields_differ OR tags_differ) AS differs, tags_differ FROM (
                 SELECT s.rec, e.id, e.deleted_at IS NOT NULL AS deleted,
                        coalesce(e.last_operation_id = {op_id}, false) AS mine,
                        ({}) IS DISTINCT FROM ({}) AS fields_differ,
                        {tags_differ} AS tags_differ
                 FROM ticketops_stage_tickets s
                 {stored_ticket}
                 {tags_join}
                 WHERE {stored_ids}
             ) c",
            stored.join(", "),
            target.join(", "),
        )
    }

    /// The column lists of a merge: the target expressions `AS` their columns, the SET list
    /// from the row `incoming` (`g`, or `excluded` for an upsert), the stored row `t` and the
    /// incoming one.
    fn lists(&self, incoming: &str) -> Lists {
        let target: Vec<String> = self
            .target_exprs()
            .into_iter()
            .zip(COLUMNS)
            .map(|(expr, col)| format!("{expr} AS {col}"))
            .collect();
        let column_list = |f: &dyn Fn(&str) -> String| COLUMNS.iter().map(|c| f(c)).collect::<Vec<_>>().join(", ");
        Lists {
            target: target.join(", "),
            set: column_list(&|c| format!("{c} = {incoming}.{c}")),
            stored: column_list(&|c| format!("t.{c}")),
            incoming: column_list(&|c| format!("{incoming}.{c}")),
        }
    }

    /// The partitioned layout's merge: an UPDATE (ON CONFLICT cannot move a row to another
    /// partition, and there is no unique external_id on tickets to conflict on). A changed
    /// created_at moves the ticket to its month; its key follows in the same statement.
    pub(super) fn update_sql(&self, op_id: i64) -> String {
        let Lists {
            target,
            set,
            stored,
            incoming,
        } = self.lists("g");
        let (stored_ticket, stored_ids) = self.stored_ticket_join("$4");
        // The before-image comes with the target and the after-image from the UPDATE, which
        // returns both: joined back to the batch, each written row would be looked up again
        // in every partition and compared with every target row (nested loops, which the
        // UPDATE needs): 14 s a 2,000-row batch at 1M tickets.
        format!(
            "WITH target AS (
                 SELECT s.external_id, e.id, e.created_at AS stored_created_at, {target}, {tags} AS tag_ids,
                        s.fingerprint,
                        {image_of_e} || jsonb_build_object('tag_ids', to_jsonb({stored_tags})) AS before_image
                 FROM ticketops_stage_tickets s
                 {stored_ticket}
                 WHERE s.rec = ANY($1) AND {stored_ids}
             ), written AS (
                 UPDATE tickets AS t SET {set}, last_operation_id = {op_id}, import_fingerprint = g.fingerprint
                 FROM target g
                 WHERE t.id = g.id AND t.created_at = g.stored_created_at
                   AND (({stored}) IS DISTINCT FROM ({incoming}) OR t.id = ANY($2))
                 RETURNING t.id, t.external_id, t.created_at, false AS inserted, g.before_image,
                           {image_of_t} || jsonb_build_object('tag_ids', to_jsonb(g.tag_ids)) AS after_image,
                           g.stored_created_at
             ), moved AS (
                 UPDATE ticket_keys k SET created_at = w.created_at
                 FROM written w WHERE k.ticket_id = w.id AND k.created_at <> w.created_at
             ), links_moved AS (
                 -- (each month of links references its month of tickets: the links go with it)
                 UPDATE ticket_tags x SET ticket_created_at = w.created_at
                 FROM written w
                 WHERE x.ticket_id = w.id AND x.ticket_created_at = w.stored_created_at
                   AND w.created_at <> w.stored_created_at
             ), comments_moved AS (
                 -- (and comments, likewise)
                 UPDATE comments x SET ticket_created_at = w.created_at
                 FROM written w
                 WHERE x.ticket_id = w.id AND x.ticket_created_at = w.stored_created_at
                   AND w.created_at <> w.stored_created_at
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op_id}, 'tickets', w.id, '{update}', w.before_image, w.after_image
                 FROM written w
                 WHERE NOT (w.id = ANY($3))
             )
             SELECT id, external_id, inserted, NULL::timestamptz AS moved_to FROM written",
            tags = self.tags_target(),
            stored_tags = stored_tags_of_e(self.layout),
            update = crate::audit::UPDATE_ACTION,
            image_of_e = image_of("e"),
            image_of_t = image_of("t"),
        )
    }

    /// The stored ticket `e` of each staged row `s` whose stored id is in parameter `ids`: the
    /// joins, and the condition for the WHERE clause. On the partitioned layout each is read in
    /// its one partition through its key (by id through the parent, every partition was probed
    /// for each row: a changed import of 20,000 tickets spread over 1M took 148 s against
    /// plain's 3.4); elsewhere by id.
    fn stored_ticket_join(&self, ids: &str) -> (String, String) {
        if self.layout.partitioned() {
            (
                format!(
                    "LEFT JOIN ticket_keys k ON k.ticket_id = s.ticket_id {}",
                    crate::layout::probe_ticket_at("e", "s.ticket_id", "k.created_at")
                ),
                format!("s.ticket_id = ANY({ids}) AND e.external_id = s.external_id"),
            )
        } else {
            (
                "JOIN tickets e ON e.id = s.ticket_id AND e.external_id = s.external_id".to_string(),
                format!("e.id = ANY({ids})"),
            )
        }
    }

    /// The distributed layout's merge: the partitioned one's UPDATE, with what Citus needs.
    /// The keys of tickets whose created_at changed are updated afterwards by the caller
    /// (`moved_to`): joined in this statement to every written row, a key shard is read whole.
    /// The images are made on the coordinator from the rows the workers return (`t` after,
    /// `b` before: a self-join on the distribution column, read in the UPDATE's own
    /// snapshot), as Citus takes no non-immutable function such as `to_jsonb` in RETURNING;
    /// the stored tags come joined per shard, not from a correlated subquery.
    pub(super) fn distributed_update_sql(&self, op_id: i64) -> String {
        let Lists {
            target,
            set,
            stored,
            incoming,
        } = self.lists("g");
        format!(
            "WITH target AS (
                 SELECT s.external_id, e.id, {target}, {tags} AS tag_ids, {STORED_TAGS_OF_ST} AS stored_tag_ids
                 FROM ticketops_stage_tickets s
                 JOIN tickets e ON e.id = s.ticket_id AND e.external_id = s.external_id AND e.id = ANY($4)
                 {stored_tags}
                 WHERE s.rec = ANY($1)
             ), written AS (
                 UPDATE tickets AS t SET {set}, last_operation_id = {op_id}
                 FROM target g, tickets b
                 WHERE t.id = g.id AND b.id = t.id AND t.id = ANY($4) -- (each shard probes its ids)
                   AND (({stored}) IS DISTINCT FROM ({incoming}) OR t.id = ANY($2))
                 RETURNING t.id, t.external_id, t.created_at, false AS inserted, t AS after_row, b AS before_row,
                           t.created_at <> b.created_at AS created_at_changed
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op_id}, 'tickets', w.id, '{update}',
                        {before} || jsonb_build_object('tag_ids', to_jsonb(g.stored_tag_ids)),
                        {after} || jsonb_build_object('tag_ids', to_jsonb(g.tag_ids))
                 FROM written w
                 JOIN target g ON g.external_id = w.external_id
                 WHERE NOT (w.id = ANY($3))
             )
             SELECT id, external_id, inserted, CASE WHEN created_at_changed THEN created_at END AS moved_to FROM written",
            tags = self.tags_target(),
            update = crate::audit::UPDATE_ACTION,
            stored_tags = stored_tags_join("$4"),
            before = image_of("w.before_row"),
            after = image_of("w.after_row"),
        )
    }

    pub(super) fn merge_sql(&self, op_id: i64) -> String {
        let Lists {
            target,
            set,
            stored,
            incoming,
        } = self.lists("excluded");
        let cols = COLUMNS.join(", ");
        format!(
            "WITH target AS (
                 SELECT s.external_id, {target}, {tags} AS tag_ids, s.fingerprint
                 FROM ticketops_stage_tickets s
                 LEFT JOIN tickets e ON e.id = s.ticket_id AND e.external_id = s.external_id AND e.id = ANY($4)
                 WHERE s.rec = ANY($1)
             ), written AS (
                 INSERT INTO tickets AS t (external_id, {cols}, last_operation_id, import_fingerprint)
                 SELECT external_id, {cols}, {op_id}, fingerprint FROM target
                 ON CONFLICT (external_id) DO UPDATE SET {set}, last_operation_id = excluded.last_operation_id,
                     import_fingerprint = excluded.import_fingerprint
                 WHERE ({stored}) IS DISTINCT FROM ({incoming}) OR t.id = ANY($2)
                 RETURNING t.id, t.external_id, (t.xmax = 0) AS inserted,
                           CASE WHEN t.xmax = 0 THEN NULL ELSE {image_of_t} END AS after_image
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op_id}, 'tickets', w.id,
                        CASE WHEN w.inserted THEN '{insert}' ELSE '{update}' END,
                        CASE WHEN w.inserted THEN NULL ELSE
                            {image_of_b} || jsonb_build_object('tag_ids', to_jsonb(ARRAY(
                                SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = b.id ORDER BY tag_id)))
                        END,
                        CASE WHEN w.inserted THEN NULL ELSE
                            w.after_image || jsonb_build_object('tag_ids', to_jsonb(g.tag_ids))
                        END
                 FROM written w
                 LEFT JOIN tickets b ON b.id = w.id AND b.id = ANY($4)
                 LEFT JOIN target g ON g.external_id = w.external_id
                 WHERE NOT (w.id = ANY($3))
             )
             SELECT id, external_id, inserted, NULL::timestamptz AS moved_to FROM written",
            tags = self.tags_target(),
            insert = crate::audit::INSERT_ACTION,
            update = crate::audit::UPDATE_ACTION,
            image_of_t = image_of("t"),
            image_of_b = image_of("b"),
        )
    }
}

/// The audit image of ticket row `row`: its columns but the import fingerprint, which is the
/// import's own bookkeeping (undo leaves it to the trigger that forgets it).
fn image_of(row: &str) -> String {
    format!("(to_jsonb({row}) - 'import_fingerprint')")
}

/// See [`TicketImport::lists`].
struct Lists {
    target: String,
    set: String,
    stored: String,
    incoming: String,
}

/// The stored tag sets of the batch's tickets `e` (their ids in parameter `ids`), aggregated
/// per ticket where the tag links live (distributed layout).
fn stored_tags_join(ids: &str) -> String {
    format!(
        "LEFT JOIN (SELECT ticket_id, array_agg(tag_id ORDER BY tag_id) AS tag_ids
                    FROM ticket_tags WHERE ticket_id = ANY({ids}) GROUP BY ticket_id) st ON st.ticket_id = e.id"
    )
}

/// The stored tag set of ticket `e` from [`stored_tags_join`].
const STORED_TAGS_OF_ST: &str = "coalesce(st.tag_ids, '{}'::bigint[])";

/// The stored tag set of ticket `e`, sorted like the staged one.
/// (On partitions, in the ticket's month of links.)
fn stored_tags_of_e(layout: crate::layout::Layout) -> String {
    format!(
        "ARRAY(SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = e.id{} ORDER BY tag_id)",
        layout.links_month("x", "e.created_at")
    )
}
