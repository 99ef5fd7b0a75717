//! `ticketops report summary|backlog|flow|agents`: what is in the database, without writing SQL
//! (the queries: `crate::report`), as a table, CSV or JSON.

use std::io::Write;

use chrono::Duration;
use serde_json::{Map, Value, json};

use crate::args::Format;
use crate::context::Context;
use crate::db;
use crate::exit;
use crate::filters::TicketFilters;
use crate::output::{Cell, Table, sparkline};
use crate::report::{AGE_BUCKETS, Agents, Backlog, Flow, Summary, Tally, Which};

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

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let (common, which) = match &args.report {
        Report::Summary(c) => (c, Which::Summary),
        Report::Backlog(c) => (c, Which::Backlog),
        Report::Flow { days, common } => (common, Which::Flow { days: *days }),
        Report::Agents { days, common } => (common, Which::Agents { days: *days }),
    };
    let format = Format::chosen(common.format, ctx.global.json)?;
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    let filters = common.filters.resolve(&mut conn)?;
    let (report, plans) = crate::report::run(&mut conn, which, &filters, common.explain)?;
    for plan in plans {
        eprintln!("-- {}\n{}\n", plan.label, plan.lines.join("\n"));
    }
    let output = match report {
        crate::report::Report::Summary(s) => summary(&s),
        crate::report::Report::Backlog(b) => backlog(&b),
        crate::report::Report::Flow(f) => flow(&f),
        crate::report::Report::Agents(a) => agents(&a),
    };
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

/// A tally as a JSON object: value → count.
fn tally_json<T: Copy + PartialEq + std::fmt::Display>(tally: &Tally<T>) -> Value {
    let map: Map<String, Value> = tally.iter().map(|(v, n)| (v.to_string(), json!(n))).collect();
    Value::Object(map)
}

/// A tally as table rows: group, value, count.
fn tally_rows<T: Copy + PartialEq + std::fmt::Display>(tally: &Tally<T>, group: &str, table: &mut Table) {
    for (v, n) in tally.iter() {
        table.push(vec![Cell::text(group), Cell::text(v.to_string()), Cell::Int(n)]);
    }
}

fn summary(s: &Summary) -> Output {
    let mut table = Table::new(["group", "value", "tickets"]);
    table.push(vec![Cell::text("total"), Cell::text(""), Cell::Int(s.total)]);
    table.push(vec![Cell::text("deleted"), Cell::text(""), Cell::Int(s.deleted)]);
    tally_rows(&s.by_status, "status", &mut table);
    tally_rows(&s.by_priority, "priority", &mut table);
    tally_rows(&s.by_channel, "channel", &mut table);
    let oldest = s.oldest_unsolved.as_ref();
    let oldest_open = oldest.map(|o| {
        json!({
            "external_id": o.external_id,
            "status": o.status.as_str(),
            "created_at": o.created_at,
            "age_days": o.age_days,
        })
    });
    let chart = oldest.map(|o| {
        format!(
            "oldest unsolved: {} ({}, created {}, {} days ago)\n",
            o.external_id,
            o.status,
            o.created_at.format("%Y-%m-%d %H:%M UTC"),
            o.age_days
        )
    });
    Output {
        table,
        json: json!({
            "total": s.total,
            "deleted": s.deleted,
            "by_status": tally_json(&s.by_status),
            "by_priority": tally_json(&s.by_priority),
            "by_channel": tally_json(&s.by_channel),
            "oldest_open": oldest_open,
        }),
        chart,
    }
}

fn backlog(b: &Backlog) -> Output {
    let priorities = b.priorities;
    let mut table = Table::new(
        std::iter::once("age".to_string())
            .chain(priorities.iter().map(|p| p.as_str().to_string()))
            .chain(["total".to_string()]),
    );
    let mut rows = Vec::new();
    let mut column_totals = vec![0i64; priorities.len()];
    for (counts, (label, _)) in b.counts.iter().zip(AGE_BUCKETS) {
        let row_total: i64 = counts.iter().sum();
        let mut cells = vec![Cell::text(label)];
        let mut object = Map::new();
        object.insert("age".into(), json!(label));
        for (p, priority) in priorities.iter().enumerate() {
            cells.push(Cell::Int(counts[p]));
            object.insert(priority.as_str().into(), json!(counts[p]));
            column_totals[p] += counts[p];
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
    Output {
        table,
        json: json!({"total": total, "by_priority": by_priority, "buckets": rows}),
        chart: None,
    }
}

fn flow(f: &Flow) -> Output {
    let (first, today, per_day) = (f.first, f.today, &f.per_day);
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
    Output {
        table,
        json: json!({
            "days": f.days,
            "from": first.to_string(),
            "to": today.to_string(),
            "created": created_total,
            "solved": solved_total,
            "per_day": rows,
        }),
        chart: Some(chart),
    }
}

fn agents(a: &Agents) -> Output {
    let mut table = Table::new(["assignee", "name", "open", "solved", "median_hours", "p90_hours"]);
    let mut json_rows = Vec::new();
    for line in &a.lines {
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
    Output {
        table,
        json: json!({"days": a.days, "since": a.since, "agents": json_rows}),
        chart: None,
    }
}
