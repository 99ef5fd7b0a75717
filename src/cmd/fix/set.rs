//! `fix set FIELD=VALUE… [filters]` and `fix reassign --from --to [filters]`: set ticket
//! columns on the matching tickets.

use anyhow::Context as _;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Jsonb, Text};
use diesel::{PgConnection, sql_query};
use serde_json::{Value, json};

use super::{BatchTickets, Changed, FixRun, FixScope, Sample, TicketFix, run_ticket_fix};
use crate::args::{ApplyArgs, BatchArgs};
use crate::audit::FIX_ACTION;
use crate::context::Context;
use crate::db;
use crate::exit::UsageError;
use crate::filters::{RestateUnchanged, TicketFilters};
use crate::import::normalize;
use crate::schema::{organizations, users};

pub const HELP: &str = "\
Without --apply this is a dry run: it prints how many tickets would change and a sample of
them, before -> after, and writes nothing. Rows whose values would not change are never
written. Every changed row's before and after values go to audit_log; `ticketops undo ID`
reverts the fix.

Examples:
  ticketops fix set status=closed priority=low --status pending --updated-before 180d
  ticketops fix set status=closed --status pending --updated-before 180d --apply --yes";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Assignments, e.g. status=closed priority=low assignee=none
    #[arg(required = true, value_name = "FIELD=VALUE")]
    pub assignments: Vec<String>,
    #[command(flatten)]
    pub scope: FixScope,
}

#[derive(Debug, clap::Args)]
pub struct ReassignArgs {
    /// The agent whose tickets move
    #[arg(long, value_name = "EMAIL")]
    pub from: String,
    /// The agent who gets them
    #[arg(long, value_name = "EMAIL")]
    pub to: String,
    #[command(flatten)]
    pub filters: TicketFilters,
    #[command(flatten)]
    pub apply: ApplyArgs,
    #[command(flatten)]
    pub batching: BatchArgs,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    set(
        ctx,
        "fix set",
        args.assignments,
        args.scope.filters,
        args.scope.all,
        args.scope.apply,
        args.scope.batching,
    )
}

pub fn reassign(ctx: &Context, args: ReassignArgs) -> anyhow::Result<i32> {
    let mut filters = args.filters;
    if filters.assignee.is_some() {
        return Err(UsageError("reassign selects by --from; drop --assignee".into()).into());
    }
    let (from, to) = (args.from.trim().to_lowercase(), args.to.trim().to_lowercase());
    if from == to {
        return Err(UsageError(format!("--from and --to are the same user ({from})")).into());
    }
    // The --to user is checked by the assignment; the --from user must exist too.
    let pool = ctx.pool(1)?;
    let exists: bool = diesel::select(diesel::dsl::exists(users::table.filter(users::email.eq(&from))))
        .get_result(&mut db::get(&pool)?)?;
    if !exists {
        return Err(UsageError(format!("--from: there is no user {from}")).into());
    }
    filters.assignee = Some(from);
    set(
        ctx,
        "fix reassign",
        vec![format!("assignee={to}")],
        filters,
        true,
        args.apply,
        args.batching,
    )
}

fn set(
    ctx: &Context,
    kind: &str,
    raw: Vec<String>,
    filters: TicketFilters,
    all: bool,
    apply: ApplyArgs,
    batching: BatchArgs,
) -> anyhow::Result<i32> {
    filters.require_filter_or_all(all, kind)?;
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let resolved = filters.resolve(&mut conn)?;
    let assignments = parse_assignments(&mut conn, &raw)?;
    let restate = RestateUnchanged::check(&mut conn)?;
    drop(conn);
    let mut fix = FieldFix::new(assignments, restate);
    let shown = fix.shown();
    let run = FixRun {
        pool: &pool,
        kind,
        args: json!({"set": raw, "filters": filters.to_json(), "all": all, "batching": batching.settings().to_json()}),
        filters: &resolved,
        apply: &apply,
        batching: &batching,
        extra: json!({"set": shown}),
    };
    run_ticket_fix(ctx, run, &mut fix)
}

/// One field assignment, validated, with its value as text for a bound, cast parameter.
#[derive(Debug, Clone)]
struct Assignment {
    column: &'static str,
    cast: &'static str,
    value: Option<String>,
    shown: String,
}

fn parse_assignments(conn: &mut PgConnection, raw: &[String]) -> anyhow::Result<Vec<Assignment>> {
    let mut out: Vec<Assignment> = Vec::new();
    for item in raw {
        let Some((field, value)) = item.split_once('=') else {
            return Err(UsageError(format!("{item:?} is not FIELD=VALUE (e.g. status=closed)")).into());
        };
        let field = field.trim().to_ascii_lowercase();
        let value = value.trim();
        // The value lists come from the importer's parsers; fix set has no --value-map.
        let bad = |message: String| -> anyhow::Error {
            let message = message.replace("; use --value-map for others", "");
            UsageError(format!("{field}={value}: {message}")).into()
        };
        let assignment = match field.as_str() {
            "status" => {
                let v = normalize::ticket_status(value).map_err(bad)?;
                Assignment {
                    column: "status",
                    cast: "ticket_status",
                    value: Some(v.as_str().into()),
                    shown: v.to_string(),
                }
            }
            "priority" => {
                let v = normalize::ticket_priority(value).map_err(bad)?;
                Assignment {
                    column: "priority",
                    cast: "ticket_priority",
                    value: Some(v.as_str().into()),
                    shown: v.to_string(),
                }
            }
            "channel" => {
                let v = normalize::ticket_channel(value).map_err(bad)?;
                Assignment {
                    column: "channel",
                    cast: "ticket_channel",
                    value: Some(v.as_str().into()),
                    shown: v.to_string(),
                }
            }
            "subject" => {
                if value.is_empty() || value.chars().count() > crate::import::tickets::MAX_SUBJECT_CHARS {
                    return Err(bad("a subject has 1 to 500 characters".into()));
                }
                Assignment {
                    column: "subject",
                    cast: "varchar",
                    value: Some(value.into()),
                    shown: value.into(),
                }
            }
            "assignee" => {
                let id = if value.eq_ignore_ascii_case("none") {
                    None
                } else {
                    let email = normalize::email(value).map_err(bad)?.unwrap_or_default();
                    let id: Option<i64> = users::table
                        .select(users::id)
                        .filter(users::email.eq(&email))
                        .filter(users::deleted_at.is_null())
                        .first(conn)
                        .optional()?;
                    Some(id.ok_or_else(|| bad(format!("there is no user {email}")))?)
                };
                Assignment {
                    column: "assignee_id",
                    cast: "bigint",
                    value: id.map(|i| i.to_string()),
                    shown: value.into(),
                }
            }
            "organization" => {
                let id = if value.eq_ignore_ascii_case("none") {
                    None
                } else {
                    let id: Option<i64> = organizations::table
                        .select(organizations::id)
                        .filter(organizations::name.eq(value))
                        .first(conn)
                        .optional()?;
                    Some(id.ok_or_else(|| bad(format!("there is no organization {value:?}")))?)
                };
                Assignment {
                    column: "organization_id",
                    cast: "bigint",
                    value: id.map(|i| i.to_string()),
                    shown: value.into(),
                }
            }
            _ => {
                return Err(UsageError(format!(
                    "cannot set {field:?}: the fields are status, priority, channel, assignee, organization, subject"
                ))
                .into());
            }
        };
        if out.iter().any(|a| a.column == assignment.column) {
            return Err(UsageError(format!("{field} is assigned twice")).into());
        }
        out.push(assignment);
    }
    Ok(out)
}

/// The SQL of a column fix: which columns, their new values ($2…), and the images an undo
/// needs (the assigned columns plus updated_at and last_operation_id).
struct FieldFix {
    assignments: Vec<Assignment>,
    differs: String,
    set: String,
    /// `, requester_id = requester_id, …`: the indexed columns the fix leaves alone, named so
    /// that its batches' index inserts do not run bottom-up deletion passes (see
    /// [`crate::filters::UNCHANGED_INDEXED_COLUMNS`]); empty where naming them is not safe.
    restated: String,
    /// The columns of the images.
    image_columns: Vec<&'static str>,
    shown_before: String,
}

/// Where `set` wants the time of the batch: bound as a constant, since Citus takes no now()
/// inside a COALESCE of an UPDATE.
const BATCH_TIME: &str = "{batch_time}";

/// How a column is shown in a dry run's sample (e-mails and names rather than ids).
fn shown_column(column: &str) -> (&'static str, String) {
    match column {
        "assignee_id" => (
            "assignee",
            "(SELECT email FROM users u WHERE u.id = t.assignee_id)".into(),
        ),
        "organization_id" => (
            "organization",
            "(SELECT name FROM organizations o WHERE o.id = t.organization_id)".into(),
        ),
        "status" => ("status", "t.status".into()),
        "priority" => ("priority", "t.priority".into()),
        "channel" => ("channel", "t.channel".into()),
        _ => ("subject", "t.subject".into()),
    }
}

impl FieldFix {
    fn new(assignments: Vec<Assignment>, restate: RestateUnchanged) -> FieldFix {
        let stored: Vec<String> = assignments.iter().map(|a| format!("t.{}", a.column)).collect();
        let wanted: Vec<String> = assignments
            .iter()
            .enumerate()
            .map(|(i, a)| format!("${}::{}", i + 2, a.cast))
            .collect();
        let mut set: Vec<String> = assignments
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} = ${}::{}", a.column, i + 2, a.cast))
            .collect();
        let mut image: Vec<&'static str> = assignments.iter().map(|a| a.column).collect();
        // A ticket set to solved or closed gets a solved_at when it has none, and one set back
        // to an open state loses it, so that reports count it right; undo restores it.
        // (Decided here from the value rather than by a CASE in SQL, which Citus refuses.)
        let status = assignments.iter().find(|a| a.column == "status");
        if let Some(status) = status {
            if matches!(status.value.as_deref(), Some("solved" | "closed")) {
                set.push(format!("solved_at = coalesce(t.solved_at, {BATCH_TIME})"));
            } else {
                set.push("solved_at = NULL".into());
            }
            image.push("solved_at");
        }
        image.push("updated_at");
        image.push("last_operation_id");
        let shown: Vec<String> = assignments
            .iter()
            .map(|a| {
                let (name, expr) = shown_column(a.column);
                format!("'{name}', {expr}")
            })
            .collect();
        let mut assigned: Vec<&str> = assignments.iter().map(|a| a.column).collect();
        assigned.push("updated_at");
        if status.is_some() {
            assigned.push("solved_at");
        }
        let restated = restate.set_tail(&assigned);
        FieldFix {
            restated,
            // ROW() so that a single column compares as a row too.
            differs: format!("ROW({}) IS DISTINCT FROM ROW({})", stored.join(", "), wanted.join(", ")),
            set: set.join(", "),
            image_columns: image,
            shown_before: format!("jsonb_build_object({})", shown.join(", ")),
            assignments,
        }
    }

    /// The image of row `row` (`t`, or a whole-row value such as `(c.after_row)`).
    fn image_of(&self, row: &str) -> String {
        let pairs: Vec<String> = self.image_columns.iter().map(|c| format!("'{c}', {row}.{c}")).collect();
        format!("jsonb_build_object({})", pairs.join(", "))
    }

    /// The assignments as `field=value`, as given.
    fn shown(&self) -> Vec<String> {
        self.assignments
            .iter()
            .map(|a| format!("{}={}", shown_column(a.column).0, a.shown))
            .collect()
    }

    /// The new values as a sample shows them.
    fn shown_after(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .assignments
            .iter()
            .map(|a| {
                let value = if a.value.is_none() { Value::Null } else { json!(a.shown) };
                (shown_column(a.column).0.to_string(), value)
            })
            .collect();
        Value::Object(map)
    }
}

#[derive(QueryableByName)]
struct SampleRow {
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Jsonb)]
    before: Value,
}

impl TicketFix for FieldFix {
    fn describe(&self) -> String {
        self.shown().join(" ")
    }

    fn preview(
        &self,
        conn: &mut PgConnection,
        batch: &BatchTickets<'_>,
        sample: usize,
    ) -> anyhow::Result<(u64, Vec<Sample>)> {
        // $1 the ids, then one parameter an assignment, then the batch's created_at values.
        let in_batch = batch.condition("t", self.assignments.len() + 2);
        let count = format!(
            "SELECT count(*) AS changed FROM tickets t WHERE {in_batch} AND {}",
            self.differs
        );
        let q = batch.bind_created(bind_values(
            sql_query(count).into_boxed().bind::<Array<BigInt>, _>(batch.ids),
            &self.assignments,
        ));
        let changed: Changed = q.get_result(conn).context("cannot compare the tickets with the fix")?;
        if sample == 0 || changed.changed == 0 {
            return Ok((changed.changed as u64, Vec::new()));
        }
        let rows = format!(
            "SELECT t.external_id, {shown} AS before FROM tickets t WHERE {in_batch} AND {differs}
             ORDER BY t.id LIMIT {sample}",
            shown = self.shown_before,
            differs = self.differs
        );
        let q = batch.bind_created(bind_values(
            sql_query(rows).into_boxed().bind::<Array<BigInt>, _>(batch.ids),
            &self.assignments,
        ));
        let rows: Vec<SampleRow> = q.load(conn)?;
        let after = self.shown_after();
        let sample = rows
            .into_iter()
            .map(|r| Sample {
                external_id: r.external_id,
                before: r.before,
                after: after.clone(),
            })
            .collect();
        Ok((changed.changed as u64, sample))
    }

    fn apply(&self, conn: &mut PgConnection, batch: &BatchTickets<'_>, op: i64) -> anyhow::Result<u64> {
        // The after-image is made from the returned row, not in RETURNING, where Citus takes
        // no non-immutable function.
        let now = format!("'{}'::timestamptz", chrono::Utc::now().to_rfc3339());
        batch.row_by_row(conn)?;
        let in_batch = batch.each_row("t", self.assignments.len() + 2);
        // Each ticket updated where the target found it: on partitions by (id, created_at), one
        // partition a ticket; elsewhere each shard probes the batch's ids.
        let same_ticket = if batch.by_partition() {
            "t.id = target.id AND t.created_at = target.partition_key"
        } else {
            "t.id = target.id AND t.id = ANY($1)"
        };
        let query = format!(
            "WITH target AS (
                 SELECT t.id, t.created_at AS partition_key, {image_t} AS before FROM tickets t WHERE {in_batch} AND {differs}
             ), changed AS (
                 UPDATE tickets t SET {set}, updated_at = {now}, last_operation_id = {op}{restated}
                 FROM target WHERE {same_ticket}
                 RETURNING t.id, target.before, t AS after_row
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op}, 'tickets', c.id, '{FIX_ACTION}', c.before, {image_c} FROM changed c
             )
             SELECT count(*) AS changed FROM changed",
            image_t = self.image_of("t"),
            image_c = self.image_of("(c.after_row)"),
            differs = self.differs,
            set = self.set.replace(BATCH_TIME, &now),
            restated = self.restated,
        );
        let q = batch.bind_created(bind_values(
            sql_query(query).into_boxed().bind::<Array<BigInt>, _>(batch.ids),
            &self.assignments,
        ));
        let changed: Changed = q.get_result(conn).context("cannot apply the fix")?;
        Ok(changed.changed as u64)
    }
}

fn bind_values<'a>(
    mut query: diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery>,
    assignments: &'a [Assignment],
) -> diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery> {
    for a in assignments {
        query = query.bind::<diesel::sql_types::Nullable<Text>, _>(a.value.as_deref());
    }
    query
}
