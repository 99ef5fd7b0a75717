//! `ticketops fix set FIELD=VALUE… [filters]`: a one-off data fix with the safety model of
//! issue #5 — a dry run by default (the same code path as the real run, only the writing
//! step is skipped), `--apply` with a confirmation, short batches, and the before and after
//! values of every changed row in `audit_log` so that `ticketops undo` can revert it.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context as _;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{PgConnection, sql_query};
use serde_json::json;

use crate::batch::{self, BatchArgs, Step};
use crate::cli::Context;
use crate::db::{self, AdvisoryLock};
use crate::exit::{self, UsageError};
use crate::filters::{DeletedScope, ResolvedFilters, TicketFilters};
use crate::import::normalize;
use crate::operation;
use crate::schema::{organizations, tickets, users};
use crate::signals::StopFlags;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Set fields on the matching tickets: status, priority, channel, assignee (e-mail or none),
    /// organization (name or none), subject
    #[command(after_help = SET_HELP)]
    Set {
        /// Assignments, e.g. status=closed priority=low assignee=none
        #[arg(required = true, value_name = "FIELD=VALUE")]
        assignments: Vec<String>,
        #[command(flatten)]
        filters: TicketFilters,
        /// Allow a fix without any filter (every ticket)
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        apply: ApplyArgs,
        #[command(flatten)]
        batching: BatchArgs,
    },
    /// Move the tickets assigned to one agent to another (optionally only those matching filters)
    Reassign {
        /// The agent whose tickets move
        #[arg(long, value_name = "EMAIL")]
        from: String,
        /// The agent who gets them
        #[arg(long, value_name = "EMAIL")]
        to: String,
        #[command(flatten)]
        filters: TicketFilters,
        #[command(flatten)]
        apply: ApplyArgs,
        #[command(flatten)]
        batching: BatchArgs,
    },
}

const SET_HELP: &str = "\
Without --apply this is a dry run: it prints how many tickets would change and a sample of
them, before -> after, and writes nothing. Rows whose values would not change are never
written. Every changed row's before and after values go to audit_log; `ticketops undo ID`
reverts the fix.

Examples:
  ticketops fix set status=closed priority=low --status pending --updated-before 180d
  ticketops fix set status=closed --status pending --updated-before 180d --apply --yes";

/// `--apply` and `--yes`, shared by the commands that default to a dry run.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// Write the changes (without it, a dry run shows what would change)
    #[arg(long)]
    pub apply: bool,
    /// Do not ask for confirmation (required with --apply when there is no terminal)
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Asks the person at the terminal to confirm a write of `count` rows. Without a terminal and
/// without `--yes`, refuses (exit 2) rather than guess.
pub fn confirm(args: &ApplyArgs, what: &str, count: u64) -> anyhow::Result<bool> {
    if args.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(UsageError(format!(
            "refusing to {what} ({count} row(s)) without confirmation: there is no terminal to ask on; add --yes"
        ))
        .into());
    }
    eprint!("{what}: {count} row(s) will change. Type yes to continue: ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "yes" | "y"))
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
        let bad = |message: String| -> anyhow::Error { UsageError(format!("{field}={value}: {message}")).into() };
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

/// The SQL pieces of a fix: which columns, their new values ($2…), and the JSON of the values
/// that an undo needs (changed columns plus updated_at and last_operation_id).
struct FixSql {
    differs: String,
    set: String,
    image_of_t: String,
}

impl FixSql {
    fn new(assignments: &[Assignment]) -> FixSql {
        let stored: Vec<String> = assignments.iter().map(|a| format!("t.{}", a.column)).collect();
        let wanted: Vec<String> = assignments
            .iter()
            .enumerate()
            .map(|(i, a)| format!("${}::{}", i + 2, a.cast))
            .collect();
        let set: Vec<String> = assignments
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{} = ${}::{}", a.column, i + 2, a.cast))
            .collect();
        let mut image: Vec<String> = assignments.iter().map(|a| format!("'{0}', t.{0}", a.column)).collect();
        image.push("'updated_at', t.updated_at".into());
        image.push("'last_operation_id', t.last_operation_id".into());
        FixSql {
            // ROW() so that a single column compares as a row too.
            differs: format!("ROW({}) IS DISTINCT FROM ROW({})", stored.join(", "), wanted.join(", ")),
            set: set.join(", "),
            image_of_t: format!("jsonb_build_object({})", image.join(", ")),
        }
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

#[derive(QueryableByName)]
struct SampleRow {
    #[diesel(sql_type = Text)]
    external_id: String,
    #[diesel(sql_type = Text)]
    before: String,
}

#[derive(QueryableByName)]
struct Changed {
    #[diesel(sql_type = BigInt)]
    changed: i64,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    match args.action {
        Action::Set {
            assignments,
            filters,
            all,
            apply,
            batching,
        } => set(ctx, "fix set", assignments, filters, all, apply, batching),
        Action::Reassign {
            from,
            to,
            mut filters,
            apply,
            batching,
        } => {
            if filters.assignee.is_some() {
                return Err(UsageError("reassign selects by --from; drop --assignee".into()).into());
            }
            let (from, to) = (from.trim().to_lowercase(), to.trim().to_lowercase());
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
                apply,
                batching,
            )
        }
    }
}

/// One batch of a fix: the rows among `ids` whose values differ; written (with audit) only
/// when `op_id` is given. The dry run and the real run both go through here.
fn fix_batch(
    conn: &mut PgConnection,
    sql: &FixSql,
    assignments: &[Assignment],
    ids: &[i64],
    op_id: Option<i64>,
) -> anyhow::Result<u64> {
    let query = match op_id {
        None => format!(
            "SELECT count(*) AS changed FROM tickets t WHERE t.id = ANY($1) AND {}",
            sql.differs
        ),
        Some(op) => format!(
            "WITH target AS (
                 SELECT t.id, {image} AS before FROM tickets t WHERE t.id = ANY($1) AND {differs}
             ), changed AS (
                 UPDATE tickets t SET {set}, updated_at = now(), last_operation_id = {op}
                 FROM target WHERE t.id = target.id
                 RETURNING t.id, target.before, {image} AS after
             ), audited AS (
                 INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
                 SELECT {op}, 'tickets', id, '{FIX_ACTION}', before, after FROM changed
             )
             SELECT count(*) AS changed FROM changed",
            image = sql.image_of_t,
            differs = sql.differs,
            set = sql.set,
        ),
    };
    let q = bind_values(sql_query(query).into_boxed().bind::<Array<BigInt>, _>(ids), assignments);
    let changed: Changed = q.get_result(conn).context("cannot apply the fix")?;
    Ok(changed.changed as u64)
}

/// The audit action of a fixed row: `before`/`after` hold the changed columns, updated_at and
/// last_operation_id.
pub const FIX_ACTION: &str = "fix";

const SAMPLE_SIZE: i64 = 10;

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
    let resolved = filters.resolve()?;
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let assignments = parse_assignments(&mut conn, &raw)?;
    let sql = FixSql::new(&assignments);
    let scope = resolved.deleted_scope();

    // The dry run: the same batches and the same comparison, nothing written.
    let would_change = count_changes(
        &mut conn,
        &resolved,
        scope,
        &sql,
        &assignments,
        batching.batch_size as i64,
    )?;
    let sample = sample(&mut conn, &resolved, scope, &sql, &assignments)?;
    let shown: Vec<String> = assignments
        .iter()
        .map(|a| format!("{}={}", a.column.trim_end_matches("_id"), a.shown))
        .collect();
    if !apply.apply {
        if ctx.global.json {
            let rows: Vec<_> = sample.iter().map(|r| json!({"external_id": r.external_id, "before": serde_json::from_str::<serde_json::Value>(&r.before).unwrap_or_default()})).collect();
            ctx.print_json(
                &json!({"kind": kind, "dry_run": true, "would_change": would_change, "set": shown, "sample": rows}),
            )?;
        } else {
            println!(
                "dry run: {would_change} ticket(s) would change ({}); nothing was written",
                shown.join(" ")
            );
            for r in &sample {
                println!("  {:<14} {} -> {}", r.external_id, r.before, shown.join(" "));
            }
            println!("run again with --apply to write");
        }
        return Ok(exit::SUCCESS);
    }
    if would_change == 0 {
        ctx.info("nothing to change");
    } else if !confirm(&apply, kind, would_change)? {
        ctx.info("not confirmed; nothing was written");
        return Ok(exit::FAILURE);
    }
    let _lock = AdvisoryLock::try_acquire(&pool, kind)?;
    let stop = StopFlags::install()?;
    let op_id = operation::start_job(
        &mut conn,
        kind,
        json!({"set": raw, "filters": filters.to_json(), "all": all, "batching": batching.to_json()}),
    )?;
    let mut last_id = 0i64;
    let mut unchanged = 0u64;
    let stats = batch::run(&mut conn, &batching, &stop, ctx.global.verbose > 0, |conn, limit| {
        let (ids, last_candidate) = resolved.lock_batch(conn, scope, last_id, limit as i64)?;
        let Some(max) = last_candidate else {
            return Ok(Step { rows: 0, done: true });
        };
        let changed = if ids.is_empty() {
            0
        } else {
            fix_batch(conn, &sql, &assignments, &ids, Some(op_id))?
        };
        unchanged += ids.len() as u64 - changed;
        operation::save_checkpoint(conn, op_id, &json!({"last_id": max}), &json!({}))?;
        last_id = max;
        Ok(Step {
            rows: changed,
            done: false,
        })
    });
    let rows = stats.rows;
    batch::finish(
        ctx,
        &mut conn,
        op_id,
        kind,
        stats,
        json!({"changed": rows, "unchanged": unchanged}),
    )
}

fn count_changes(
    conn: &mut PgConnection,
    resolved: &ResolvedFilters,
    scope: DeletedScope,
    sql: &FixSql,
    assignments: &[Assignment],
    batch_size: i64,
) -> anyhow::Result<u64> {
    let mut last_id = 0i64;
    let mut total = 0u64;
    loop {
        let ids: Vec<i64> = resolved
            .query(scope)
            .select(tickets::id)
            .filter(tickets::id.gt(last_id))
            .order(tickets::id)
            .limit(batch_size)
            .load(conn)?;
        let Some(&max) = ids.last() else { break };
        total += fix_batch(conn, sql, assignments, &ids, None)?;
        last_id = max;
    }
    Ok(total)
}

fn sample(
    conn: &mut PgConnection,
    resolved: &ResolvedFilters,
    scope: DeletedScope,
    sql: &FixSql,
    assignments: &[Assignment],
) -> anyhow::Result<Vec<SampleRow>> {
    let ids: Vec<i64> = resolved
        .query(scope)
        .select(tickets::id)
        .order(tickets::id)
        .limit(1000)
        .load(conn)?;
    let query = format!(
        "SELECT t.external_id, ({image} - 'updated_at' - 'last_operation_id')::text AS before
         FROM tickets t WHERE t.id = ANY($1) AND {differs} ORDER BY t.id LIMIT {SAMPLE_SIZE}",
        image = sql.image_of_t,
        differs = sql.differs
    );
    let q = bind_values(sql_query(query).into_boxed().bind::<Array<BigInt>, _>(ids), assignments);
    Ok(q.load(conn)?)
}
