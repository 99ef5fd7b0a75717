//! `ticketops ops list | show ID`: the history of writing runs (`bulk_operations`).

use diesel::prelude::*;
use serde_json::json;

use crate::args::Format;
use crate::audit;
use crate::context::Context;
use crate::db;
use crate::exit::{self, UsageError};
use crate::models::{BulkOperation, OperationStatus};
use crate::schema::bulk_operations;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// The latest operations, newest first
    List {
        /// Only operations whose kind starts with this, e.g. "fix" (every fix), "cleanup soft-delete"
        /// or "import tickets"; a prefix that no kind has is an error
        #[arg(long)]
        kind: Option<String>,
        /// Only operations with this status: running, succeeded, failed, interrupted, rolled_back,
        /// abandoned
        #[arg(long, value_parser = parse_status)]
        status: Option<OperationStatus>,
        /// Only operations started since: a date/time or an age like 7d, 12h
        #[arg(long, value_name = "WHEN", value_parser = crate::filters::parse_when)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// How many
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One operation in full: arguments, counts, checkpoint, message
    Show {
        /// The operation id
        id: i64,
        /// List what it changed, value by value: one line per changed field of each row (by
        /// external_id or e-mail), before and after
        #[arg(long)]
        changes: bool,
        /// Output format of --changes (the global --json means --format json)
        #[arg(long, value_enum, requires = "changes")]
        format: Option<Format>,
    },
}

/// Every kind of operation ticketops records.
const KINDS: &[&str] = &[
    "import tickets",
    "import users",
    "import comments",
    "cleanup soft-delete",
    "cleanup purge",
    "cleanup purge-users",
    crate::retention::KIND,
    "restore",
    "fix set",
    "fix tag",
    "fix reassign",
    "fix merge-users",
    "fix apply",
    "undo",
];

fn parse_status(value: &str) -> Result<OperationStatus, String> {
    OperationStatus::from_label(value.trim()).ok_or_else(|| {
        let all: Vec<&str> = OperationStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {value:?}; one of: {}", all.join(", "))
    })
}

/// How long a finished operation took, or has been running.
fn duration(op: &BulkOperation) -> String {
    let end = op.finished_at.unwrap_or_else(chrono::Utc::now);
    let secs = (end - op.started_at).num_milliseconds().max(0) as f64 / 1000.0;
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", (secs / 60.0) as u64, secs as u64 % 60)
    } else {
        format!("{}h{:02}m", (secs / 3600.0) as u64, (secs as u64 / 60) % 60)
    }
}

/// The counts as people read them: `inserted=3 updated=1`, zeros and batch details left out.
fn readable_counts(counts: &serde_json::Value) -> String {
    let skip = ["batches", "retries", "longest_batch_ms", "rows"];
    match counts.as_object() {
        Some(map) => map
            .iter()
            .filter(|(k, v)| !skip.contains(&k.as_str()) && v.as_i64() != Some(0) && !v.is_null())
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => counts.to_string(),
    }
}

fn to_json(op: &BulkOperation) -> serde_json::Value {
    json!({
        "id": op.id,
        "kind": op.kind,
        "status": op.status.as_str(),
        "operator": op.operator,
        "source_file": op.source_file,
        "source_sha256": op.source_sha256,
        "started_at": op.started_at,
        "finished_at": op.finished_at,
        "args": op.args,
        "counts": op.counts,
        "checkpoint": op.checkpoint,
        "message": op.message,
    })
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    crate::operation::mark_abandoned(&mut conn)?;
    match args.action {
        Action::List {
            kind,
            status,
            since,
            limit,
        } => {
            let mut q = bulk_operations::table.into_boxed();
            if let Some(kind) = kind {
                let kind = kind.trim().to_string();
                if !KINDS.iter().any(|k| k.starts_with(&kind)) {
                    return Err(UsageError(format!(
                        "--kind {kind:?} matches no kind of operation; the kinds are: {}",
                        KINDS.join(", ")
                    ))
                    .into());
                }
                q = q.filter(bulk_operations::kind.like(format!("{}%", kind.replace('%', "\\%").replace('_', "\\_"))));
            }
            if let Some(status) = status {
                q = q.filter(bulk_operations::status.eq(status));
            }
            if let Some(since) = since {
                q = q.filter(bulk_operations::started_at.ge(since));
            }
            let ops: Vec<BulkOperation> = q
                .order(bulk_operations::id.desc())
                .limit(limit.max(0))
                .select(BulkOperation::as_select())
                .load(&mut conn)?;
            if ctx.global.json {
                ctx.print_json(&json!({"operations": ops.iter().map(to_json).collect::<Vec<_>>()}))?;
            } else {
                crate::outln!(
                    "{:>6}  {:<20} {:<12} {:<20} {:>9}  {:<10} counts",
                    "id",
                    "kind",
                    "status",
                    "started (UTC)",
                    "duration",
                    "operator"
                );
                for op in &ops {
                    crate::outln!(
                        "{:>6}  {:<20} {:<12} {:<20} {:>9}  {:<10} {}",
                        op.id,
                        op.kind,
                        op.status.as_str(),
                        op.started_at.format("%Y-%m-%d %H:%M:%S"),
                        duration(op),
                        op.operator,
                        readable_counts(&op.counts)
                    );
                }
            }
        }
        Action::Show {
            id,
            changes: true,
            format,
        } => return print_changes(ctx, &mut conn, id, format),
        Action::Show { id, .. } => {
            let op: BulkOperation = bulk_operations::table
                .find(id)
                .select(BulkOperation::as_select())
                .first(&mut conn)
                .optional()?
                .ok_or_else(|| UsageError(format!("there is no operation {id} (see `ticketops ops list`)")))?;
            if ctx.global.json {
                ctx.print_json(&to_json(&op))?;
            } else {
                let v = to_json(&op);
                // In reading order, not the map's alphabetical one.
                let keys = [
                    "id",
                    "kind",
                    "status",
                    "operator",
                    "started_at",
                    "finished_at",
                    "source_file",
                    "source_sha256",
                    "message",
                    "counts",
                    "args",
                    "checkpoint",
                ];
                for key in keys {
                    let text = match &v[key] {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    crate::outln!("{key:<14} {text}");
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// `ops show ID --changes`: the operation's audit trail, a page of audit rows at a time, so that
/// a large operation streams in every format (JSON too: the array is written value by value).
fn print_changes(
    ctx: &Context,
    conn: &mut diesel::PgConnection,
    id: i64,
    format: Option<Format>,
) -> anyhow::Result<i32> {
    use std::io::Write;
    let format = Format::chosen(format, ctx.global.json)?;
    crate::operation::find(conn, id)?
        .ok_or_else(|| UsageError(format!("there is no operation {id} (see `ticketops ops list`)")))?;
    let shown = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let any = match format {
        Format::Json => {
            // One object as before ({"changes": [...], "operation_id": N}); a failure midway
            // still closes it, with the error, so that what a script reads stays JSON.
            let mut out = std::io::stdout().lock();
            write!(out, "{{\"changes\":[")?;
            ctx.json_streamed();
            let mut first = true;
            let result = for_each_page(conn, id, |page| {
                for c in page {
                    if !first {
                        out.write_all(b",")?;
                    }
                    first = false;
                    serde_json::to_writer(&mut out, c)?;
                }
                Ok(())
            });
            match result {
                Ok(_) => writeln!(out, "],\"operation_id\":{id}}}")?,
                Err(err) => {
                    let error = serde_json::Value::String(format!("{err:#}"));
                    writeln!(out, "],\"error\":{error},\"operation_id\":{id},\"status\":\"failed\"}}")?;
                    return Err(err);
                }
            }
            true
        }
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(std::io::stdout());
            let mut printed_header = false;
            for_each_page(conn, id, |page| {
                if !printed_header {
                    writer.write_record(["table", "key", "field", "before", "after"])?;
                    printed_header = true;
                }
                for c in page {
                    writer.write_record([
                        c.table.clone(),
                        c.key.clone(),
                        c.field.clone(),
                        shown(&c.before),
                        shown(&c.after),
                    ])?;
                }
                writer.flush()?;
                Ok(())
            })?
        }
        Format::Table => {
            // Streamed line by line (an operation can change millions of values), so the
            // columns are fixed-width rather than fitted.
            let mut printed_header = false;
            for_each_page(conn, id, |page| {
                let mut out = std::io::stdout().lock();
                if !printed_header {
                    writeln!(out, "{:<9} {:<20} {:<16} before → after", "table", "key", "field")?;
                    printed_header = true;
                }
                for c in page {
                    writeln!(
                        out,
                        "{:<9} {:<20} {:<16} {} → {}",
                        c.table,
                        crate::output::escape_controls(&c.key),
                        c.field,
                        crate::output::escape_controls(&shown(&c.before)),
                        crate::output::escape_controls(&shown(&c.after))
                    )?;
                }
                Ok(())
            })?
        }
    };
    if !any && format == Format::Table {
        ctx.info(format!("operation {id} recorded no changed rows"));
    }
    Ok(exit::SUCCESS)
}

/// Calls `visit` with the operation's changed values a page at a time; returns whether there
/// were any.
fn for_each_page(
    conn: &mut diesel::PgConnection,
    id: i64,
    mut visit: impl FnMut(&[audit::ChangedValue]) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let layout = crate::layout::Layout::of(conn)?;
    let mut after = 0i64;
    let mut any = false;
    loop {
        // 20 audit rows a page: a batch's row can list thousands of ids.
        let page = audit::changes(conn, layout, id, after, 20).context("cannot read the operation's audit trail")?;
        let Some(last) = page.last() else {
            return Ok(any);
        };
        after = last.audit_id;
        any = true;
        visit(&page)?;
    }
}
