//! The SQL that compares a batch of corrections with the stored tickets and applies them.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel::{PgConnection, RunQueryDsl, sql_query};

use super::super::{Changed, SAMPLE_SIZE, Sample};
use super::{Change, Corrections, Found, Work};
use crate::audit::FIX_ACTION;
use crate::layout::probe_tickets;
use crate::models::{TicketChannel, TicketPriority, TicketStatus};

/// The corrections of one batch as arrays ($1…$14, the batch's time $15, on partitions the
/// tickets' created_at $16), compared with the stored tickets as JSON objects of the
/// correctable values (tag sets as sorted tag ids); `target` holds the tickets whose values
/// differ, with both objects. The stored tag sets come as one aggregate per ticket, and `want`
/// is made on the coordinator (MATERIALIZED) from the rows read: on Citus a correlated
/// subquery next to a distributed table is refused. On partitions each ticket and its tag set
/// are read where they are, one probe each (`probe_tickets`); joined by id, a batch hashed
/// every partition.
fn target_sql(by_partition: bool) -> String {
    let (created, created_column, tickets_and_tags) = if by_partition {
        (
            ", $16::timestamptz[]",
            ", created_at",
            format!(
                "FROM i {}
                 LEFT JOIN LATERAL (SELECT array_agg(tag_id ORDER BY tag_id) AS tag_ids
                                    FROM ticket_tags WHERE ticket_id = t.id AND ticket_created_at = t.created_at) st
                           ON true",
                probe_tickets("i", "t")
            ),
        )
    } else {
        (
            "",
            "",
            "FROM i JOIN tickets t ON t.id = i.id
             LEFT JOIN (SELECT ticket_id, array_agg(tag_id ORDER BY tag_id) AS tag_ids
                        FROM ticket_tags WHERE ticket_id = ANY($1) GROUP BY ticket_id) st ON st.ticket_id = t.id"
                .to_string(),
        )
    };
    format!(
        "
WITH i AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bool[], $5::bigint[], $6::bool[],
                         $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bool[],
                         $13::text[], $14::text[]{created})
        AS i(id, status, priority, set_assignee, assignee_id, set_organization, organization_id, subject,
             tags_add, tags_remove, channel, set_tags, tags, description{created_column})
), cur AS (
    SELECT t.id, t.created_at AS partition_key, t.external_id, t.updated_at AS old_updated_at,
           t.last_operation_id AS old_operation_id,
           jsonb_build_object('status', t.status, 'priority', t.priority, 'channel', t.channel,
                              'assignee_id', t.assignee_id,
                              'organization_id', t.organization_id, 'subject', t.subject,
                              'description', t.description, 'solved_at', t.solved_at,
                              'tag_ids', to_jsonb(coalesce(st.tag_ids, '{{}}'))) AS old,
           i.status, i.priority, i.channel, i.set_assignee, i.assignee_id, i.set_organization, i.organization_id,
           i.subject, i.tags_add, i.tags_remove, i.set_tags, i.tags, i.description
    {tickets_and_tags}
), want AS MATERIALIZED (
    SELECT c.id, c.partition_key, c.external_id, c.old_updated_at, c.old_operation_id, c.old,
           jsonb_build_object(
               'status', coalesce(c.status, c.old ->> 'status'),
               -- the importer's rule: solved or closed without solved_at gets one, an open
               -- state has none; a status that does not change keeps what is stored
               'solved_at', CASE WHEN coalesce(c.status, c.old ->> 'status') = c.old ->> 'status' THEN c.old -> 'solved_at'
                                 WHEN c.status IN ('solved', 'closed')
                                     THEN coalesce(nullif(c.old -> 'solved_at', 'null'::jsonb), to_jsonb($15::timestamptz))
                                 ELSE 'null'::jsonb END,
               'priority', coalesce(c.priority, c.old ->> 'priority'),
               'channel', coalesce(c.channel, c.old ->> 'channel'),
               'assignee_id', CASE WHEN c.set_assignee THEN to_jsonb(c.assignee_id) ELSE c.old -> 'assignee_id' END,
               'organization_id', CASE WHEN c.set_organization THEN to_jsonb(c.organization_id)
                                       ELSE c.old -> 'organization_id' END,
               'subject', coalesce(c.subject, c.old ->> 'subject'),
               'description', coalesce(c.description, c.old ->> 'description'),
               'tag_ids', CASE WHEN c.set_tags
                   THEN to_jsonb(ARRAY(SELECT DISTINCT u FROM unnest(
                            coalesce(string_to_array(nullif(c.tags, ''), ',')::bigint[], '{{}}')) u ORDER BY u))
                   ELSE to_jsonb(ARRAY(
                   SELECT DISTINCT u FROM unnest(
                       ARRAY(SELECT jsonb_array_elements_text(c.old -> 'tag_ids')::bigint)
                       || coalesce(string_to_array(c.tags_add, ',')::bigint[], '{{}}')) u
                   WHERE u <> ALL(coalesce(string_to_array(c.tags_remove, ',')::bigint[], '{{}}'))
                   ORDER BY u)) END) AS new
    FROM cur c
), target AS MATERIALIZED (
    SELECT * FROM want WHERE old <> new
)"
    )
}

/// The keys of `a` whose value differs in `b`, as an object of `a`'s values.
fn changed_keys(a: &str, b: &str) -> String {
    format!(
        "(SELECT jsonb_object_agg(k, {a} -> k) FROM jsonb_object_keys({a}) k WHERE {a} -> k IS DISTINCT FROM {b} -> k)"
    )
}

/// Like `changed_keys`, with ids shown as people read them (e-mail, organization and tag names).
fn shown_keys(a: &str, b: &str) -> String {
    format!(
        "(SELECT jsonb_object_agg(
             CASE k WHEN 'assignee_id' THEN 'assignee' WHEN 'organization_id' THEN 'organization'
                    WHEN 'tag_ids' THEN 'tags' ELSE k END,
             CASE k WHEN 'assignee_id' THEN to_jsonb((SELECT email FROM users WHERE id = ({a} ->> k)::bigint))
                    WHEN 'organization_id' THEN to_jsonb((SELECT name FROM organizations WHERE id = ({a} ->> k)::bigint))
                    WHEN 'tag_ids' THEN to_jsonb(ARRAY(SELECT name FROM tags WHERE id IN (
                                            SELECT jsonb_array_elements_text({a} -> k)::bigint) ORDER BY name))
                    ELSE {a} -> k END)
         FROM jsonb_object_keys({a}) k WHERE {a} -> k IS DISTINCT FROM {b} -> k)"
    )
}

impl Corrections {
    /// Compares the work with the tickets (a dry run: counts and samples what would change)
    /// or applies it, with the before and after images in the audit trail; returns how many
    /// tickets change.
    pub(super) fn compare_or_apply(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        work: &[Work<'_>],
        removable: &[Found],
    ) -> anyhow::Result<u64> {
        let find = |found: &[Found], key: &str| found.iter().find(|f| f.key == key).map(|f| (f.id, f.deleted));
        let ids: Vec<i64> = work.iter().map(|w| w.0).collect();
        let statuses: Vec<Option<&str>> = work.iter().map(|w| w.3.status.map(TicketStatus::as_str)).collect();
        let priorities: Vec<Option<&str>> = work.iter().map(|w| w.3.priority.map(TicketPriority::as_str)).collect();
        let channels: Vec<Option<&str>> = work.iter().map(|w| w.3.channel.map(TicketChannel::as_str)).collect();
        let set_assignee: Vec<bool> = work.iter().map(|w| w.1 != Change::Keep).collect();
        let assignee_ids: Vec<Option<i64>> = work
            .iter()
            .map(|w| if let Change::Set(id) = w.1 { Some(id) } else { None })
            .collect();
        let set_organization: Vec<bool> = work.iter().map(|w| w.2 != Change::Keep).collect();
        let organization_ids: Vec<Option<i64>> = work
            .iter()
            .map(|w| if let Change::Set(id) = w.2 { Some(id) } else { None })
            .collect();
        let subjects: Vec<Option<&str>> = work.iter().map(|w| w.3.subject.as_deref()).collect();
        let descriptions: Vec<Option<&str>> = work.iter().map(|w| w.3.description.as_deref()).collect();
        let set_tags: Vec<bool> = work.iter().map(|w| w.3.tags.is_some()).collect();
        let whole_tags: Vec<Option<String>> = work
            .iter()
            .map(|w| {
                w.3.tags.as_ref().map(|names| {
                    let ids: Vec<String> = names
                        .iter()
                        .filter_map(|n| self.cache.tag_id(n))
                        .map(|id| id.to_string())
                        .collect();
                    ids.join(",")
                })
            })
            .collect();
        let id_list = |names: &[String], id_of: &dyn Fn(&str) -> Option<i64>| -> Option<String> {
            let ids: Vec<String> = names.iter().filter_map(|n| id_of(n)).map(|id| id.to_string()).collect();
            (!ids.is_empty()).then(|| ids.join(","))
        };
        let tags_add: Vec<Option<String>> = work
            .iter()
            .map(|w| id_list(&w.3.tags_add, &|n| self.cache.tag_id(n)))
            .collect();
        let tags_remove: Vec<Option<String>> = work
            .iter()
            .map(|w| id_list(&w.3.tags_remove, &|n| find(removable, n).map(|f| f.0)))
            .collect();

        // On partitions, each ticket's created_at (from its key), when every ticket has one.
        let created: Option<Vec<DateTime<Utc>>> = work.iter().map(|w| w.4).collect();
        let by_partition = created.is_some() && !work.is_empty();
        let target = target_sql(by_partition);
        let now = chrono::Utc::now();
        let bind = |sql: String| {
            let query = sql_query(sql)
                .into_boxed()
                .bind::<Array<BigInt>, _>(ids.clone())
                .bind::<Array<Nullable<Text>>, _>(statuses.clone())
                .bind::<Array<Nullable<Text>>, _>(priorities.clone())
                .bind::<Array<Bool>, _>(set_assignee.clone())
                .bind::<Array<Nullable<BigInt>>, _>(assignee_ids.clone())
                .bind::<Array<Bool>, _>(set_organization.clone())
                .bind::<Array<Nullable<BigInt>>, _>(organization_ids.clone())
                .bind::<Array<Nullable<Text>>, _>(subjects.clone())
                .bind::<Array<Nullable<Text>>, _>(tags_add.clone())
                .bind::<Array<Nullable<Text>>, _>(tags_remove.clone())
                .bind::<Array<Nullable<Text>>, _>(channels.clone())
                .bind::<Array<Bool>, _>(set_tags.clone())
                .bind::<Array<Nullable<Text>>, _>(whole_tags.clone())
                .bind::<Array<Nullable<Text>>, _>(descriptions.clone())
                .bind::<Timestamptz, _>(now);
            match created.clone().filter(|_| by_partition) {
                Some(created) => query.bind::<Array<Timestamptz>, _>(created),
                None => query,
            }
        };
        let changed: Changed = if self.dry_run {
            if self.sample.len() < SAMPLE_SIZE {
                let rows: Vec<Sample> = bind(format!(
                    "{target} SELECT external_id, {before} AS before, {after} AS after FROM target ORDER BY id LIMIT {}",
                    SAMPLE_SIZE - self.sample.len(),
                    before = shown_keys("old", "new"),
                    after = shown_keys("new", "old"),
                ))
                .load(conn)
                .context("cannot compare the corrections with the tickets")?;
                self.sample.extend(rows);
            }
            bind(format!("{target} SELECT count(*) AS changed FROM target"))
                .get_result(conn)
                .context("cannot compare the corrections with the tickets")?
        } else {
            // On partitions each ticket is updated in its one partition, by nested loops (a
            // probe a ticket); and the audit rows take the images the UPDATE returns, since a
            // nested loop joining the batch's rows to themselves would be quadratic.
            let (same_partition, returned, audited_from) = if by_partition {
                crate::layout::by_key_plans(conn)?;
                (
                    " AND t.created_at = d.partition_key",
                    "t.id, d.before, d.after",
                    "changed d",
                )
            } else {
                ("", "t.id", "changed c JOIN decoded d ON d.id = c.id")
            };
            bind(format!(
                "{target}, decoded AS MATERIALIZED (
                     -- typed here, so that the UPDATE assigns plain values (Citus refuses the
                     -- casts, STABLE functions, in an UPDATE of a distributed table)
                     SELECT g.id, g.partition_key, (g.new ->> 'status')::ticket_status AS status,
                            (g.new ->> 'priority')::ticket_priority AS priority,
                            (g.new ->> 'channel')::ticket_channel AS channel,
                            (g.new ->> 'assignee_id')::bigint AS assignee_id,
                            (g.new ->> 'organization_id')::bigint AS organization_id,
                            g.new ->> 'subject' AS subject, g.new ->> 'description' AS description,
                            (g.new ->> 'solved_at')::timestamptz AS solved_at,
                            ARRAY(SELECT jsonb_array_elements_text(g.new -> 'tag_ids')::bigint) AS tag_ids,
                            {before} || jsonb_build_object('updated_at', g.old_updated_at,
                                                           'last_operation_id', g.old_operation_id) AS before,
                            {after} || jsonb_build_object('updated_at', $15::timestamptz,
                                                          'last_operation_id', {op_id}::bigint) AS after
                     FROM target g
                 ), changed AS (
                     UPDATE tickets t
                     SET status = d.status, priority = d.priority, channel = d.channel, assignee_id = d.assignee_id,
                         organization_id = d.organization_id, subject = d.subject, description = d.description,
                         solved_at = d.solved_at, updated_at = $15, last_operation_id = {op_id}
                     FROM decoded d WHERE t.id = d.id{same_partition}
                     RETURNING {returned}
                 ), tags_removed AS (
                     DELETE FROM ticket_tags x USING decoded d
                     WHERE x.ticket_id = d.id{links_month} AND NOT x.tag_id = ANY(d.tag_ids)
                 ), tags_added AS (
                     INSERT INTO ticket_tags ({link_columns})
                     SELECT d.id, u{created_at} FROM decoded d CROSS JOIN LATERAL unnest(d.tag_ids) u
                     ON CONFLICT DO NOTHING
                 ), audited AS (
                     INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                     SELECT {op_id}, 'tickets', d.id, '{FIX_ACTION}', d.before, d.after
                     FROM {audited_from}
                 )
                 SELECT count(*) AS changed FROM changed",
                links_month = self.layout.links_month("x", "d.partition_key"),
                link_columns = self.layout.link_columns(),
                created_at = self.layout.link_created_at("d.partition_key"),
                before = changed_keys("g.old", "g.new"),
                after = changed_keys("g.new", "g.old"),
            ))
            .get_result(conn)
            .context("cannot apply the corrections")?
        };
        Ok(changed.changed as u64)
    }
}
