//! `ticketops report summary|backlog|flow|agents`: what is in the database, without writing SQL.
//!
//! Every report takes the shared ticket filters, leaves soft-deleted tickets out unless
//! `--include-deleted`, and is one or two set-based queries (never a query per row or per
//! agent) run in one read-only REPEATABLE READ transaction, so its numbers agree with each
//! other even while the database is being written. Days and ages are counted in UTC.

use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use diesel::dsl::sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Bool, Date, Double, Integer, Nullable, Text, Timestamptz};
use serde_json::{Map, Value, json};

use crate::args::Format;
use crate::context::Context;
use crate::db;
use crate::exit;
use crate::filters::{DeletedScope, ResolvedFilters, TicketFilters};
use crate::models::{TicketChannel, TicketPriority, TicketStatus};
use crate::output::{Cell, Table, sparkline};
use crate::schema::{sql_types, tickets, users};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ticketops report summary
  ticketops report backlog --organization Acme
  ticketops report flow --days 14 --channel email,web
  ticketops report agents --days 7 --format csv > agents.csv

The tables of backlog and flow end with a total row; their CSV leaves it out (a spreadsheet
would count it as data), JSON has `total` keys.")]
pub struct Args {
    #[command(subcommand)]
    pub report: Report,
}

#[derive(Debug, clap::Subcommand)]
pub enum Report {
    /// Totals by status, priority and channel, the soft-deleted count, the oldest unsolved ticket
    Summary(CommonArgs),
    /// Unsolved tickets (new, open, pending, on_hold) by age since creation × priority
    Backlog(CommonArgs),
    /// Tickets created and solved per day (UTC) over the last N days, with a chart
    Flow {
        /// How many days, today included
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3660))]
        days: u32,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Per assignee: unsolved tickets, tickets solved in the last N days, median and 90th
    /// percentile resolution time (solved_at − created_at) of those
    Agents {
        /// The period for "solved" and the resolution times, in days back from now
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3660))]
        days: u32,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Output format (the global --json means --format json)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Also print each query's EXPLAIN (ANALYZE, BUFFERS) plan on stderr
    #[arg(long)]
    pub explain: bool,
    #[command(flatten)]
    pub filters: TicketFilters,
}

/// A report's result: the table (for `table` and `csv`), its JSON form, and an optional chart
/// printed under the table.
struct Output {
    table: Table,
    json: Value,
    chart: Option<String>,
}

/// The statuses a support team still has to work on.
const UNSOLVED: [TicketStatus; 4] = [
    TicketStatus::New,
    TicketStatus::Open,
    TicketStatus::Pending,
    TicketStatus::OnHold,
];
const UNSOLVED_SQL: &str = "status IN ('new', 'open', 'pending', 'on_hold')";
const SOLVED_SQL: &str = "status IN ('solved', 'closed')";

/// Backlog age buckets: label and the upper bound of the age in days (None: no bound).
const AGE_BUCKETS: [(&str, Option<i32>); 5] = [
    ("< 1 day", Some(1)),
    ("1-7 days", Some(7)),
    ("7-30 days", Some(30)),
    ("30-90 days", Some(90)),
    ("> 90 days", None),
];

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let (common, days) = match &args.report {
        Report::Summary(c) | Report::Backlog(c) => (c, 0),
        Report::Flow { days, common } | Report::Agents { days, common } => (common, *days),
    };
    let format = Format::chosen(common.format, ctx.global.json)?;
    let explain = common.explain;
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    let filters = common.filters.resolve(&mut conn)?;
    let output = conn
        .build_transaction()
        .read_only()
        .repeatable_read()
        .run(|conn| {
            let mut q = Queries { conn, explain };
            match &args.report {
                Report::Summary(_) => summary(&mut q, &filters),
                Report::Backlog(_) => backlog(&mut q, &filters),
                Report::Flow { .. } => flow(&mut q, &filters, days),
                Report::Agents { .. } => agents(&mut q, &filters, days),
            }
        })
        .context("the report query failed")?;
    print(ctx, format, &output)?;
    Ok(exit::SUCCESS)
}

fn print(ctx: &Context, format: Format, output: &Output) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => ctx.print_json(&output.json)?,
        Format::Csv => output.table.write_csv(&mut out)?,
        Format::Table => {
            output.table.write_aligned(&mut out)?;
            if let Some(chart) = &output.chart {
                writeln!(out)?;
                write!(out, "{chart}")?;
            }
        }
    }
    Ok(())
}

/// Runs the report's queries, printing each plan first when `--explain` was given.
struct Queries<'c> {
    conn: &'c mut PgConnection,
    explain: bool,
}

impl Queries<'_> {
    fn load<Q, U>(&mut self, label: &str, query: Q) -> anyhow::Result<Vec<U>>
    where
        Q: RunQueryDsl<PgConnection>
            + QueryFragment<Pg>
            + QueryId
            + diesel::query_dsl::LoadQuery<'static, PgConnection, U>,
    {
        if self.explain {
            let plan: Vec<String> = Explain(&query).load(self.conn)?;
            eprintln!("-- {label}\n{}\n", plan.join("\n"));
        }
        Ok(query.load(self.conn)?)
    }
}

/// `EXPLAIN (ANALYZE, BUFFERS)` in front of any query, so `--explain` shows the plans of
/// exactly the statements the report runs, with their bound values.
struct Explain<'q, Q>(&'q Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Explain<'_, Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("EXPLAIN (ANALYZE, BUFFERS) ");
        self.0.walk_ast(out.reborrow())
    }
}

impl<Q> QueryId for Explain<'_, Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> Query for Explain<'_, Q> {
    type SqlType = Text;
}

impl<Q> RunQueryDsl<PgConnection> for Explain<'_, Q> {}

/// Counts for every value of one enum, in the enum's order, zero where none.
struct Tally<T: 'static> {
    values: &'static [T],
    counts: Vec<i64>,
}

impl<T: Copy + PartialEq + std::fmt::Display> Tally<T> {
    fn new(values: &'static [T]) -> Self {
        Tally {
            values,
            counts: vec![0; values.len()],
        }
    }

    fn add(&mut self, value: T, n: i64) {
        if let Some(i) = self.values.iter().position(|&v| v == value) {
            self.counts[i] += n;
        }
    }

    fn to_json(&self) -> Value {
        let map: Map<String, Value> = self
            .values
            .iter()
            .zip(&self.counts)
            .map(|(v, n)| (v.to_string(), json!(n)))
            .collect();
        Value::Object(map)
    }

    fn push_rows(&self, group: &str, table: &mut Table) {
        for (v, n) in self.values.iter().zip(&self.counts) {
            table.push(vec![Cell::text(group), Cell::text(v.to_string()), Cell::Int(*n)]);
        }
    }
}

fn summary(q: &mut Queries, filters: &ResolvedFilters) -> anyhow::Result<Output> {
    let scope = filters.deleted_scope();
    // Deleted tickets are counted apart whatever the scope, so read them too (unless only
    // deleted ones were asked for) and split in the aggregate.
    let read_scope = if scope == DeletedScope::Only {
        DeletedScope::Only
    } else {
        DeletedScope::Include
    };
    let groups: Vec<(TicketStatus, TicketPriority, TicketChannel, i64, i64)> = q.load(
        "counts by status, priority, channel",
        tickets::table
            .filter(filters.condition(read_scope))
            .group_by((tickets::status, tickets::priority, tickets::channel))
            .select((
                tickets::status,
                tickets::priority,
                tickets::channel,
                sql::<BigInt>("count(*) FILTER (WHERE deleted_at IS NULL)"),
                sql::<BigInt>("count(*) FILTER (WHERE deleted_at IS NOT NULL)"),
            )),
    )?;
    let oldest: Vec<(String, TicketStatus, DateTime<Utc>)> = q.load(
        "oldest unsolved ticket",
        tickets::table
            .filter(filters.condition(scope))
            .filter(tickets::status.eq_any(UNSOLVED))
            .order((tickets::created_at, tickets::id))
            .limit(1)
            .select((tickets::external_id, tickets::status, tickets::created_at)),
    )?;

    let mut by_status = Tally::new(TicketStatus::ALL);
    let mut by_priority = Tally::new(TicketPriority::ALL);
    let mut by_channel = Tally::new(TicketChannel::ALL);
    let (mut total, mut deleted) = (0, 0);
    for (status, priority, channel, live, gone) in groups {
        let counted = match scope {
            DeletedScope::Exclude => live,
            DeletedScope::Include => live + gone,
            DeletedScope::Only => gone,
        };
        total += counted;
        deleted += gone;
        by_status.add(status, counted);
        by_priority.add(priority, counted);
        by_channel.add(channel, counted);
    }
    let now = Utc::now();
    let oldest_open = oldest.first().map(|(external_id, status, created_at)| {
        json!({
            "external_id": external_id,
            "status": status.as_str(),
            "created_at": created_at,
            "age_days": (now - *created_at).num_days(),
        })
    });

    let mut table = Table::new(["group", "value", "tickets"]);
    table.push(vec![Cell::text("total"), Cell::text(""), Cell::Int(total)]);
    table.push(vec![Cell::text("deleted"), Cell::text(""), Cell::Int(deleted)]);
    by_status.push_rows("status", &mut table);
    by_priority.push_rows("priority", &mut table);
    by_channel.push_rows("channel", &mut table);
    let chart = oldest.first().map(|(external_id, status, created_at)| {
        format!(
            "oldest unsolved: {external_id} ({status}, created {}, {} days ago)\n",
            created_at.format("%Y-%m-%d %H:%M UTC"),
            (now - *created_at).num_days()
        )
    });
    Ok(Output {
        table,
        json: json!({
            "total": total,
            "deleted": deleted,
            "by_status": by_status.to_json(),
            "by_priority": by_priority.to_json(),
            "by_channel": by_channel.to_json(),
            "oldest_open": oldest_open,
        }),
        chart,
    })
}

/// The age bucket (index into `AGE_BUCKETS`) of a ticket, computed in SQL.
fn age_bucket_sql() -> String {
    let mut case = String::from("CASE");
    for (i, (_, upper)) in AGE_BUCKETS.iter().enumerate() {
        match upper {
            Some(days) => case.push_str(&format!(" WHEN created_at > now() - interval '{days} days' THEN {i}")),
            None => case.push_str(&format!(" ELSE {i}")),
        }
    }
    case.push_str(" END");
    case
}

fn backlog(q: &mut Queries, filters: &ResolvedFilters) -> anyhow::Result<Output> {
    let bucket = age_bucket_sql();
    let groups: Vec<(TicketPriority, i32, i64)> = q.load(
        "unsolved tickets by age bucket and priority",
        tickets::table
            .filter(filters.condition(filters.deleted_scope()))
            .filter(tickets::status.eq_any(UNSOLVED))
            .group_by(sql::<Integer>("1, 2"))
            .select(sql::<(sql_types::TicketPriority, Integer, BigInt)>(&format!(
                "priority, {bucket}, count(*)"
            ))),
    )?;
    let priorities = TicketPriority::ALL;
    let mut counts = vec![vec![0i64; priorities.len()]; AGE_BUCKETS.len()];
    for (priority, b, n) in groups {
        let p = priorities.iter().position(|&x| x == priority).unwrap_or(0);
        counts[b as usize][p] += n;
    }
    let mut table = Table::new(
        std::iter::once("age".to_string())
            .chain(priorities.iter().map(|p| p.as_str().to_string()))
            .chain(["total".to_string()]),
    );
    let mut rows = Vec::new();
    let mut column_totals = vec![0i64; priorities.len()];
    for (b, (label, _)) in AGE_BUCKETS.iter().enumerate() {
        let row_total: i64 = counts[b].iter().sum();
        let mut cells = vec![Cell::text(*label)];
        let mut object = Map::new();
        object.insert("age".into(), json!(label));
        for (p, priority) in priorities.iter().enumerate() {
            cells.push(Cell::Int(counts[b][p]));
            object.insert(priority.as_str().into(), json!(counts[b][p]));
            column_totals[p] += counts[b][p];
        }
        cells.push(Cell::Int(row_total));
        object.insert("total".into(), json!(row_total));
        table.push(cells);
        rows.push(Value::Object(object));
    }
    let total: i64 = column_totals.iter().sum();
    let mut cells = vec![Cell::text("total")];
    let mut by_priority = Map::new();
    for (p, priority) in priorities.iter().enumerate() {
        cells.push(Cell::Int(column_totals[p]));
        by_priority.insert(priority.as_str().into(), json!(column_totals[p]));
    }
    cells.push(Cell::Int(total));
    table.push_total(cells);
    Ok(Output {
        table,
        json: json!({"total": total, "by_priority": by_priority, "buckets": rows}),
        chart: None,
    })
}

fn flow(q: &mut Queries, filters: &ResolvedFilters, days: u32) -> anyhow::Result<Output> {
    let today = Utc::now().date_naive();
    let first = today - Duration::days(i64::from(days) - 1);
    let from = first.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let until = (today + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let scope = filters.deleted_scope();
    let created: Vec<(NaiveDate, i64)> = q.load(
        "tickets created per day",
        tickets::table
            .filter(filters.condition(scope))
            .filter(tickets::created_at.ge(from).and(tickets::created_at.lt(until)))
            .group_by(sql::<Integer>("1"))
            .select(sql::<(Date, BigInt)>("(created_at AT TIME ZONE 'UTC')::date, count(*)")),
    )?;
    let solved: Vec<(NaiveDate, i64)> = q.load(
        "tickets solved per day",
        tickets::table
            .filter(filters.condition(scope))
            .filter(tickets::solved_at.ge(from).and(tickets::solved_at.lt(until)))
            .group_by(sql::<Integer>("1"))
            .select(sql::<(Date, BigInt)>("(solved_at AT TIME ZONE 'UTC')::date, count(*)")),
    )?;
    let index = |d: NaiveDate| (d - first).num_days() as usize;
    let mut per_day = vec![(0i64, 0i64); days as usize];
    for (day, n) in created {
        per_day[index(day)].0 += n;
    }
    for (day, n) in solved {
        per_day[index(day)].1 += n;
    }

    let mut table = Table::new(["date", "created", "solved"]);
    let mut rows = Vec::new();
    for (i, (c, s)) in per_day.iter().enumerate() {
        let date = first + Duration::days(i as i64);
        table.push(vec![Cell::text(date.to_string()), Cell::Int(*c), Cell::Int(*s)]);
        rows.push(json!({"date": date.to_string(), "created": c, "solved": s}));
    }
    let created_total: i64 = per_day.iter().map(|d| d.0).sum();
    let solved_total: i64 = per_day.iter().map(|d| d.1).sum();
    table.push_total(vec![
        Cell::text("total"),
        Cell::Int(created_total),
        Cell::Int(solved_total),
    ]);
    let max = per_day.iter().map(|&(c, s)| c.max(s)).max().unwrap_or(0);
    let created_series: Vec<i64> = per_day.iter().map(|d| d.0).collect();
    let solved_series: Vec<i64> = per_day.iter().map(|d| d.1).collect();
    let chart = format!(
        "created {}  {created_total}\nsolved  {}  {solved_total}\n        {first} … {today} (UTC), one character a day\n",
        sparkline(&created_series, max),
        sparkline(&solved_series, max),
    );
    Ok(Output {
        table,
        json: json!({
            "days": days,
            "from": first.to_string(),
            "to": today.to_string(),
            "created": created_total,
            "solved": solved_total,
            "per_day": rows,
        }),
        chart: Some(chart),
    })
}

/// assignee_id, unsolved, solved in the period, median and p90 resolution hours.
type AgentRow = (Option<i64>, i64, i64, Option<f64>, Option<f64>);

/// One line of `report agents`; no e-mail means the unassigned tickets.
struct AgentLine {
    email: Option<String>,
    name: Option<String>,
    open: i64,
    solved: i64,
    median_hours: Option<f64>,
    p90_hours: Option<f64>,
}

fn agents(q: &mut Queries, filters: &ResolvedFilters, days: u32) -> anyhow::Result<Output> {
    let since = Utc::now() - Duration::days(i64::from(days));
    // A ticket counts as solved in the period when it is solved or closed now and its
    // solved_at falls in the period; resolution time is solved_at − created_at, in hours.
    let percentile = |p: f64| {
        sql::<Nullable<Double>>(&format!(
            "percentile_cont({p}) WITHIN GROUP (ORDER BY extract(epoch FROM solved_at - created_at) / 3600) \
             FILTER (WHERE {SOLVED_SQL} AND solved_at >= "
        ))
        .bind::<Timestamptz, _>(since)
        .sql(")")
    };
    let groups: Vec<AgentRow> = q.load(
        "tickets per assignee",
        tickets::table
            .filter(filters.condition(filters.deleted_scope()))
            .filter(
                sql::<Bool>(&format!("({UNSOLVED_SQL} OR ({SOLVED_SQL} AND solved_at >= "))
                    .bind::<Timestamptz, _>(since)
                    .sql("))"),
            )
            .group_by(tickets::assignee_id)
            .select((
                tickets::assignee_id,
                sql::<BigInt>(&format!("count(*) FILTER (WHERE {UNSOLVED_SQL})")),
                sql::<BigInt>(&format!("count(*) FILTER (WHERE {SOLVED_SQL} AND solved_at >= "))
                    .bind::<Timestamptz, _>(since)
                    .sql(")"),
                percentile(0.5),
                percentile(0.9),
            )),
    )?;
    let ids: Vec<i64> = groups.iter().filter_map(|g| g.0).collect();
    let people: Vec<(i64, String, Option<String>)> = q.load(
        "assignee names",
        users::table
            .filter(users::id.eq_any(ids))
            .select((users::id, users::email, users::name)),
    )?;
    let people: std::collections::HashMap<i64, (String, Option<String>)> = people
        .into_iter()
        .map(|(id, email, name)| (id, (email, name)))
        .collect();
    let person = |id: Option<i64>| {
        id.and_then(|id| people.get(&id))
            .map(|(email, name)| (Some(email.clone()), name.clone()))
            .unwrap_or((None, None))
    };
    let mut rows: Vec<AgentLine> = groups
        .into_iter()
        .map(|(id, open, solved, median_hours, p90_hours)| {
            let (email, name) = person(id);
            AgentLine {
                email,
                name,
                open,
                solved,
                median_hours,
                p90_hours,
            }
        })
        .collect();
    // Busiest first; the unassigned row last.
    rows.sort_by(|a, b| {
        (a.email.is_none(), -a.open, -a.solved, &a.email).cmp(&(b.email.is_none(), -b.open, -b.solved, &b.email))
    });

    let mut table = Table::new(["assignee", "name", "open", "solved", "median_hours", "p90_hours"]);
    let mut json_rows = Vec::new();
    for line in &rows {
        table.push(vec![
            Cell::text(line.email.clone().unwrap_or_else(|| "(unassigned)".into())),
            Cell::text(line.name.clone().unwrap_or_default()),
            Cell::Int(line.open),
            Cell::Int(line.solved),
            Cell::Float(line.median_hours, 1),
            Cell::Float(line.p90_hours, 1),
        ]);
        json_rows.push(json!({
            "assignee": line.email,
            "name": line.name,
            "open": line.open,
            "solved": line.solved,
            "median_resolution_hours": line.median_hours,
            "p90_resolution_hours": line.p90_hours,
        }));
    }
    Ok(Output {
        table,
        json: json!({"days": days, "since": since, "agents": json_rows}),
        chart: None,
    })
}
