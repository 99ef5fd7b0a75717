//! `fix tag [filters] --add T… --remove T…`: makes each matching ticket's tag set
//! (current ∪ add) ∖ remove. The audit images hold the sorted tag ids (`tag_ids`), the same
//! form an import records, so `undo` puts back exactly the old set.

use anyhow::Context as _;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel::{PgConnection, sql_query};
use serde_json::json;

use super::{BatchTickets, Changed, FixRun, FixScope, Sample, TicketFix, run_ticket_fix};
use crate::audit::FIX_ACTION;
use crate::context::Context;
use crate::db;
use crate::exit::UsageError;
use crate::import::entities::EntityCache;
use crate::import::normalize;
use crate::schema::tags;

pub const HELP: &str = "\
Tags are lower-cased like an import's; a tag to add that does not exist yet is created when
the fix is applied. Only tickets whose tag set really changes are written.

Examples:
  ticketops fix tag --tag billing --add finance --remove billing
  ticketops fix tag --organization Acme --add vip,priority-support --apply --yes";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tags to add (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "TAG")]
    pub add: Vec<String>,
    /// Tags to remove (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_name = "TAG")]
    pub remove: Vec<String>,
    #[command(flatten)]
    pub scope: FixScope,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let add = normalize::tags(&args.add.join(","), ',').map_err(UsageError)?;
    let remove = normalize::tags(&args.remove.join(","), ',').map_err(UsageError)?;
    if add.is_empty() && remove.is_empty() {
        return Err(UsageError("give tags to --add, to --remove, or both".into()).into());
    }
    if let Some(both) = add.iter().find(|t| remove.contains(t)) {
        return Err(UsageError(format!("{both:?} is both added and removed")).into());
    }
    let FixScope {
        filters,
        all,
        apply,
        batching,
    } = &args.scope;
    filters.require_filter_or_all(*all, "fix tag")?;
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let resolved = filters.resolve(&mut conn)?;
    let mut fix = TagFix::new(&mut conn, add.clone(), remove.clone())?;
    drop(conn);
    let run = FixRun {
        pool: &pool,
        kind: "fix tag",
        args: json!({"add": add, "remove": remove, "filters": filters.to_json(), "all": all,
                     "batching": batching.settings().to_json()}),
        filters: &resolved,
        apply,
        batching,
        extra: json!({"add": add, "remove": remove}),
    };
    run_ticket_fix(ctx, run, &mut fix)
}

struct TagFix {
    add: Vec<String>,
    remove: Vec<String>,
    /// Ids of the tags to add; until `prepare` creates them, a tag that does not exist yet has
    /// a negative stand-in id, which no ticket has, so the dry run counts it as a change.
    add_ids: Vec<i64>,
    /// Ids of the existing tags to remove (a tag that does not exist is on no ticket).
    remove_ids: Vec<i64>,
}

/// The stored tag set of each ticket `t` of `$1`, as `st.tag_ids`: one aggregate per ticket
/// joined on the ticket id (on Citus it runs on the ticket's shard; a correlated subquery per
/// ticket is refused there).
const STORED_TAGS: &str = "LEFT JOIN (SELECT ticket_id, array_agg(tag_id ORDER BY tag_id) AS tag_ids
                                      FROM ticket_tags WHERE ticket_id = ANY($1) GROUP BY ticket_id) st
                               ON st.ticket_id = t.id";

/// A ticket changes when it lacks a tag to add (`$2`) or has a tag to remove (`$3`).
const DIFFERS: &str = "(NOT coalesce(st.tag_ids, '{}') @> $2::bigint[] OR coalesce(st.tag_ids, '{}') && $3::bigint[])";

#[derive(QueryableByName)]
struct SampleRow {
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
}

impl TagFix {
    fn new(conn: &mut PgConnection, add: Vec<String>, remove: Vec<String>) -> anyhow::Result<TagFix> {
        let known: Vec<(i64, String)> = tags::table
            .select((tags::id, tags::name))
            .filter(tags::name.eq_any(add.iter().chain(&remove)))
            .load(conn)?;
        let id_of = |name: &String| known.iter().find(|(_, n)| n == name).map(|(id, _)| *id);
        let add_ids = add
            .iter()
            .enumerate()
            .map(|(i, name)| id_of(name).unwrap_or(-(i as i64) - 1))
            .collect();
        let remove_ids = remove.iter().filter_map(id_of).collect();
        Ok(TagFix {
            add,
            remove,
            add_ids,
            remove_ids,
        })
    }

    fn new_tags(&self, current: &[String]) -> Vec<String> {
        let mut tags: Vec<String> = current
            .iter()
            .chain(&self.add)
            .filter(|t| !self.remove.contains(t))
            .cloned()
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }
}

impl TicketFix for TagFix {
    fn describe(&self) -> String {
        let add = self.add.iter().map(|t| format!("+{t}"));
        let remove = self.remove.iter().map(|t| format!("-{t}"));
        add.chain(remove).collect::<Vec<_>>().join(" ")
    }

    fn preview(
        &self,
        conn: &mut PgConnection,
        batch: &BatchTickets<'_>,
        sample: usize,
    ) -> anyhow::Result<(u64, Vec<Sample>)> {
        let in_batch = batch.condition("t", 4);
        let changed: Changed = batch
            .bind_created(
                sql_query(format!(
                    "SELECT count(*) AS changed FROM tickets t {STORED_TAGS} WHERE {in_batch} AND {DIFFERS}"
                ))
                .into_boxed()
                .bind::<Array<BigInt>, _>(batch.ids)
                .bind::<Array<BigInt>, _>(&self.add_ids)
                .bind::<Array<BigInt>, _>(&self.remove_ids),
            )
            .get_result(conn)
            .context("cannot compare the tickets' tags")?;
        if sample == 0 || changed.changed == 0 {
            return Ok((changed.changed as u64, Vec::new()));
        }
        let rows: Vec<SampleRow> = batch
            .bind_created(
                sql_query(format!(
                    "SELECT t.external_id, coalesce(sn.names, '{{}}') AS tags
                     FROM tickets t {STORED_TAGS}
                     LEFT JOIN (SELECT x.ticket_id, array_agg(g.name::text ORDER BY g.name) AS names
                                FROM ticket_tags x JOIN tags g ON g.id = x.tag_id
                                WHERE x.ticket_id = ANY($1) GROUP BY x.ticket_id) sn ON sn.ticket_id = t.id
                     WHERE {in_batch} AND {DIFFERS} ORDER BY t.id LIMIT {sample}"
                ))
                .into_boxed()
                .bind::<Array<BigInt>, _>(batch.ids)
                .bind::<Array<BigInt>, _>(&self.add_ids)
                .bind::<Array<BigInt>, _>(&self.remove_ids),
            )
            .load(conn)?;
        let sample = rows
            .into_iter()
            .map(|r| Sample {
                after: json!({"tags": self.new_tags(&r.tags)}),
                before: json!({"tags": r.tags}),
                external_id: r.external_id,
            })
            .collect();
        Ok((changed.changed as u64, sample))
    }

    fn prepare(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        let mut cache = EntityCache::default();
        cache
            .ensure_tags(conn, self.add.iter().map(String::as_str))
            .context("cannot create the tags to add")?;
        self.add_ids = self
            .add
            .iter()
            .map(|t| cache.tag_id(t).expect("just ensured"))
            .collect();
        Ok(())
    }

    fn apply(&self, conn: &mut PgConnection, batch: &BatchTickets<'_>, op: i64) -> anyhow::Result<u64> {
        let in_batch = batch.condition("t", 5);
        let links_month = batch.layout.links_month("x", "g.created_at");
        let link_columns = batch.layout.link_columns();
        let created_at = batch.layout.link_created_at("g.created_at");
        let query = sql_query(format!(
            "WITH target AS (
                 SELECT t.id, t.created_at, t.updated_at, t.last_operation_id, coalesce(st.tag_ids, '{{}}') AS tag_ids,
                        ARRAY(SELECT DISTINCT u FROM unnest(coalesce(st.tag_ids, '{{}}') || $2::bigint[]) u
                              WHERE u <> ALL($3::bigint[]) ORDER BY u) AS new_tag_ids
                 FROM tickets t {STORED_TAGS} WHERE {in_batch} AND {DIFFERS}
             ), removed AS (
                 DELETE FROM ticket_tags x USING target g
                 WHERE x.ticket_id = g.id{links_month} AND x.tag_id = ANY($3::bigint[])
             ), added AS (
                 INSERT INTO ticket_tags ({link_columns})
                 SELECT g.id, a.tag_id{created_at} FROM target g CROSS JOIN unnest($2::bigint[]) a(tag_id)
                 ON CONFLICT DO NOTHING
             ), changed AS (
                 UPDATE tickets t SET updated_at = $4, last_operation_id = {op}
                 FROM target g WHERE t.id = g.id AND {in_batch}
                 RETURNING t.id
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op}, 'tickets', g.id, '{FIX_ACTION}',
                        jsonb_build_object('tag_ids', to_jsonb(g.tag_ids), 'updated_at', g.updated_at,
                                           'last_operation_id', g.last_operation_id),
                        jsonb_build_object('tag_ids', to_jsonb(g.new_tag_ids), 'updated_at', $4::timestamptz,
                                           'last_operation_id', {op})
                 FROM changed c JOIN target g ON g.id = c.id
             )
             SELECT count(*) AS changed FROM changed"
        ))
        .into_boxed()
        .bind::<Array<BigInt>, _>(batch.ids)
        .bind::<Array<BigInt>, _>(&self.add_ids)
        .bind::<Array<BigInt>, _>(&self.remove_ids)
        .bind::<Timestamptz, _>(chrono::Utc::now());
        let changed: Changed = batch
            .bind_created(query)
            .get_result(conn)
            .context("cannot apply the tag fix")?;
        Ok(changed.changed as u64)
    }
}
