//! The reports (the engine of `ticketops report`): what is in the database, counted.
//!
//! Every report takes the shared ticket filters, leaves soft-deleted tickets out unless the
//! filters include them, and is one or two set-based queries (never a query per row or per
//! agent) run in one read-only REPEATABLE READ transaction, so its numbers agree with each
//! other even while the database is being written. Days and ages are counted in UTC. The
//! command turns the counts into a table, CSV or JSON.

use anyhow::Context as _;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use diesel::dsl::sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Bool, Date, Double, Integer, Nullable, Text, Timestamptz};

use crate::filters::{DeletedScope, ResolvedFilters};
use crate::models::{TicketChannel, TicketPriority, TicketStatus};
use crate::schema::{sql_types, tickets, users};

/// Which report, with its period where it has one.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    Summary,
    Backlog,
    Flow { days: u32 },
    Agents { days: u32 },
}

/// A report's counts.
#[derive(Debug)]
pub enum Report {
    Summary(Summary),
    Backlog(Backlog),
    Flow(Flow),
    Agents(Agents),
}

/// One query's `EXPLAIN (ANALYZE, BUFFERS)`, asked for with `explain`.
#[derive(Debug)]
pub struct Plan {
    pub label: String,
    pub lines: Vec<String>,
}

/// Runs report `which` over the tickets `filters` select; with `explain`, also the plan of
/// each of its queries, in the order they ran.
pub fn run(
    conn: &mut PgConnection,
    which: Which,
    filters: &ResolvedFilters,
    explain: bool,
) -> anyhow::Result<(Report, Vec<Plan>)> {
    conn.build_transaction()
        .read_only()
        .repeatable_read()
        .run(|conn| {
            let mut q = Queries {
                conn,
                explain,
                plans: Vec::new(),
            };
            let report = match which {
                Which::Summary => Report::Summary(summary(&mut q, filters)?),
                Which::Backlog => Report::Backlog(backlog(&mut q, filters)?),
                Which::Flow { days } => Report::Flow(flow(&mut q, filters, days)?),
                Which::Agents { days } => Report::Agents(agents(&mut q, filters, days)?),
            };
            anyhow::Ok((report, q.plans))
        })
        .context("the report query failed")
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
pub const AGE_BUCKETS: [(&str, Option<i32>); 5] = [
    ("< 1 day", Some(1)),
    ("1-7 days", Some(7)),
    ("7-30 days", Some(30)),
    ("30-90 days", Some(90)),
    ("> 90 days", None),
];

/// Runs the report's queries, keeping each plan first when `explain` was asked for.
struct Queries<'c> {
    conn: &'c mut PgConnection,
    explain: bool,
    plans: Vec<Plan>,
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
            let lines: Vec<String> = Explain(&query).load(self.conn)?;
            self.plans.push(Plan {
                label: label.to_string(),
                lines,
            });
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
#[derive(Debug)]
pub struct Tally<T: 'static> {
    pub values: &'static [T],
    pub counts: Vec<i64>,
}

impl<T: Copy + PartialEq> Tally<T> {
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

    /// Each value with its count.
    pub fn iter(&self) -> impl Iterator<Item = (T, i64)> + '_ {
        self.values.iter().copied().zip(self.counts.iter().copied())
    }
}

/// `report summary`: totals by status, priority and channel, the soft-deleted count, the
/// oldest unsolved ticket.
#[derive(Debug)]
pub struct Summary {
    pub total: i64,
    pub deleted: i64,
    pub by_status: Tally<TicketStatus>,
    pub by_priority: Tally<TicketPriority>,
    pub by_channel: Tally<TicketChannel>,
    pub oldest_unsolved: Option<Oldest>,
}

/// The oldest unsolved ticket, and its age in whole days.
#[derive(Debug)]
pub struct Oldest {
    pub external_id: String,
    pub status: TicketStatus,
    pub created_at: DateTime<Utc>,
    pub age_days: i64,
}

fn summary(q: &mut Queries, filters: &ResolvedFilters) -> anyhow::Result<Summary> {
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

    let mut summary = Summary {
        total: 0,
        deleted: 0,
        by_status: Tally::new(TicketStatus::ALL),
        by_priority: Tally::new(TicketPriority::ALL),
        by_channel: Tally::new(TicketChannel::ALL),
        oldest_unsolved: None,
    };
    for (status, priority, channel, live, gone) in groups {
        let counted = match scope {
            DeletedScope::Exclude => live,
            DeletedScope::Include => live + gone,
            DeletedScope::Only => gone,
        };
        summary.total += counted;
        summary.deleted += gone;
        summary.by_status.add(status, counted);
        summary.by_priority.add(priority, counted);
        summary.by_channel.add(channel, counted);
    }
    let now = Utc::now();
    summary.oldest_unsolved = oldest
        .into_iter()
        .next()
        .map(|(external_id, status, created_at)| Oldest {
            external_id,
            status,
            created_at,
            age_days: (now - created_at).num_days(),
        });
    Ok(summary)
}

/// `report backlog`: unsolved tickets by age since creation (`AGE_BUCKETS`) × priority.
#[derive(Debug)]
pub struct Backlog {
    /// The columns, in order.
    pub priorities: &'static [TicketPriority],
    /// For each of `AGE_BUCKETS`, the count per priority.
    pub counts: Vec<Vec<i64>>,
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

fn backlog(q: &mut Queries, filters: &ResolvedFilters) -> anyhow::Result<Backlog> {
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
    Ok(Backlog { priorities, counts })
}

/// `report flow`: tickets created and solved per day (UTC) over the last `days` days.
#[derive(Debug)]
pub struct Flow {
    pub days: u32,
    pub first: NaiveDate,
    pub today: NaiveDate,
    /// From `first` to `today`: (created, solved).
    pub per_day: Vec<(i64, i64)>,
}

fn flow(q: &mut Queries, filters: &ResolvedFilters, days: u32) -> anyhow::Result<Flow> {
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
    Ok(Flow {
        days,
        first,
        today,
        per_day,
    })
}

/// `report agents`: per assignee, unsolved tickets, tickets solved in the period and the
/// median and 90th percentile resolution time of those; busiest first, unassigned last.
#[derive(Debug)]
pub struct Agents {
    pub days: u32,
    pub since: DateTime<Utc>,
    pub lines: Vec<AgentLine>,
}

/// One line of `report agents`; no e-mail means the unassigned tickets.
#[derive(Debug)]
pub struct AgentLine {
    pub email: Option<String>,
    pub name: Option<String>,
    pub open: i64,
    pub solved: i64,
    pub median_hours: Option<f64>,
    pub p90_hours: Option<f64>,
}

/// assignee_id, unsolved, solved in the period, median and p90 resolution hours.
type AgentRow = (Option<i64>, i64, i64, Option<f64>, Option<f64>);

fn agents(q: &mut Queries, filters: &ResolvedFilters, days: u32) -> anyhow::Result<Agents> {
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
    let mut lines: Vec<AgentLine> = groups
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
    lines.sort_by(|a, b| {
        (a.email.is_none(), -a.open, -a.solved, &a.email).cmp(&(b.email.is_none(), -b.open, -b.solved, &b.email))
    });
    Ok(Agents { days, since, lines })
}
