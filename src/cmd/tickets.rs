//! `ticketops tickets list [filters]` and `ticketops tickets show EXTERNAL_ID`: see tickets
//! without psql — a page of what the filters select, or one ticket with its tags, comments and
//! the operations that changed it.

use serde_json::json;

use crate::args::Format;
use crate::context::Context;
use crate::db;
use crate::exit::{self, UsageError};
use crate::filters::TicketFilters;
use crate::output::{Cell, Table, escape_controls};
use crate::tickets::{self, SortKey};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// A page of the tickets the filters select (keyset pagination: --after the printed cursor)
    #[command(after_help = "\
Examples:
  ticketops tickets list --status open --assignee none --sort created --desc
  ticketops tickets list --tag vip --limit 100 --format csv > vip.csv
  ticketops tickets list --status pending --count
  ticketops tickets list --status open --after 2024-05-01T10:00:00.000000Z/4711   # the next page")]
    List(Box<ListArgs>),
    /// One ticket in full: every field, tags, comments (newest first) and its history
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filters: TicketFilters,
    /// How many tickets a page holds
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub limit: i64,
    /// Start after this cursor (the `next` a previous page printed)
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// Order by: id, created (created_at) or updated (updated_at); ties by id
    #[arg(long, value_enum, default_value = "id")]
    pub sort: Sort,
    /// Newest (or highest) first
    #[arg(long)]
    pub desc: bool,
    /// Print only how many tickets the filters select
    #[arg(long)]
    pub count: bool,
    /// Output format (the global --json means --format json)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Sort {
    Id,
    Created,
    Updated,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The ticket's external id
    pub external_id: String,
    /// How many comments, newest first
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(0..=10_000))]
    pub comments: i64,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    match args.action {
        Action::List(a) => list(ctx, &mut conn, *a),
        Action::Show(a) => show(ctx, &mut conn, a),
    }
}

fn list(ctx: &Context, conn: &mut diesel::PgConnection, args: ListArgs) -> anyhow::Result<i32> {
    let format = Format::chosen(args.format, ctx.global.json)?;
    let filters = args.filters.resolve(conn)?;
    if args.count {
        let n = tickets::count(conn, &filters)?;
        match format {
            Format::Json => ctx.print_json(&json!({"count": n}))?,
            _ => crate::outln!("{n}"),
        }
        return Ok(exit::SUCCESS);
    }
    let sort = match args.sort {
        Sort::Id => SortKey::Id,
        Sort::Created => SortKey::Created,
        Sort::Updated => SortKey::Updated,
    };
    let page = tickets::page(conn, &filters, sort, args.desc, args.after.as_deref(), args.limit)?;
    if format == Format::Json {
        ctx.print_json(&serde_json::to_value(&page)?)?;
        return Ok(exit::SUCCESS);
    }
    let mut table = Table::new([
        "external_id",
        "status",
        "priority",
        "channel",
        "requester",
        "assignee",
        "organization",
        "created_at",
        "updated_at",
        "subject",
    ]);
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M").to_string();
    for t in &page.tickets {
        let deleted = if t.deleted_at.is_some() { " (deleted)" } else { "" };
        table.push(vec![
            Cell::text(escape_controls(&t.external_id)),
            Cell::text(format!("{}{deleted}", t.status)),
            Cell::text(&t.priority),
            Cell::text(&t.channel),
            Cell::text(&t.requester),
            Cell::text(t.assignee.clone().unwrap_or_default()),
            Cell::text(escape_controls(t.organization.as_deref().unwrap_or(""))),
            Cell::text(time(t.created_at)),
            Cell::text(time(t.updated_at)),
            Cell::text(escape_controls(&t.subject)),
        ]);
    }
    if format == Format::Csv {
        table.write_csv(std::io::stdout().lock())?;
    } else {
        table.write_aligned(&mut std::io::stdout().lock())?;
    }
    // The cursor goes to stderr, so that a CSV page on stdout stays pure data.
    match &page.next {
        Some(next) => ctx.info(format!("next page: --after {next}")),
        None => ctx.info(format!("{} ticket(s); no more pages", page.tickets.len())),
    }
    Ok(exit::SUCCESS)
}

fn show(ctx: &Context, conn: &mut diesel::PgConnection, args: ShowArgs) -> anyhow::Result<i32> {
    let Some(detail) = tickets::show(conn, &args.external_id, args.comments)? else {
        return Err(UsageError(format!("there is no ticket {:?}", args.external_id)).into());
    };
    if ctx.global.json {
        ctx.print_json(&serde_json::to_value(&detail)?)?;
        return Ok(exit::SUCCESS);
    }
    let t = &detail.ticket;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "-".into())
    };
    let fields = [
        ("external_id", t.external_id.clone()),
        ("subject", t.subject.clone()),
        ("status", t.status.clone()),
        ("priority", t.priority.clone()),
        ("channel", t.channel.clone()),
        ("requester", t.requester.clone()),
        ("assignee", t.assignee.clone().unwrap_or_else(|| "-".into())),
        ("organization", t.organization.clone().unwrap_or_else(|| "-".into())),
        (
            "tags",
            if detail.tags.is_empty() {
                "-".into()
            } else {
                detail.tags.join(", ")
            },
        ),
        ("created_at", time(Some(t.created_at))),
        ("updated_at", time(Some(t.updated_at))),
        ("solved_at", time(detail.solved_at)),
        ("deleted_at", time(t.deleted_at)),
    ];
    for (name, value) in fields {
        crate::outln!("{name:<14} {}", escape_controls(&value));
    }
    crate::outln!();
    crate::outln!(
        "{}",
        escape_controls(detail.description.as_deref().unwrap_or("(no description)"))
    );
    crate::outln!();
    crate::outln!(
        "comments: {} (newest {} shown)",
        detail.comment_count,
        detail.comments.len()
    );
    for c in &detail.comments {
        let visibility = if c.public { "" } else { " (internal)" };
        crate::outln!("  {} {}{visibility}:", time(Some(c.created_at)), c.author);
        for line in c.body.lines() {
            crate::outln!("    {}", escape_controls(line));
        }
    }
    crate::outln!();
    crate::outln!("history:");
    for op in &detail.operations {
        crate::outln!(
            "  operation {:>5}  {:<20} {:<12} {}  by {}  ({})",
            op.id,
            op.kind,
            op.status,
            op.started_at.format("%Y-%m-%d %H:%M:%S"),
            op.operator,
            op.actions.join(", ")
        );
    }
    Ok(exit::SUCCESS)
}
