//! `ticketops ops list | show ID`: the history of writing runs (`bulk_operations`).

use diesel::prelude::*;
use serde_json::json;

use crate::context::Context;
use crate::db;
use crate::exit::{self, UsageError};
use crate::models::BulkOperation;
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
        /// Only operations of this kind, e.g. "cleanup soft-delete" or "import tickets"
        #[arg(long)]
        kind: Option<String>,
        /// How many
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One operation in full: arguments, counts, checkpoint, message
    Show {
        /// The operation id
        id: i64,
    },
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
        Action::List { kind, limit } => {
            let mut q = bulk_operations::table.into_boxed();
            if let Some(kind) = kind {
                q = q.filter(bulk_operations::kind.eq(kind));
            }
            let ops: Vec<BulkOperation> = q
                .order(bulk_operations::id.desc())
                .limit(limit.max(0))
                .select(BulkOperation::as_select())
                .load(&mut conn)?;
            if ctx.global.json {
                ctx.print_json(&json!({"operations": ops.iter().map(to_json).collect::<Vec<_>>()}))?;
            } else {
                println!(
                    "{:>6}  {:<20} {:<12} {:<20} {:<10} counts",
                    "id", "kind", "status", "started (UTC)", "operator"
                );
                for op in &ops {
                    println!(
                        "{:>6}  {:<20} {:<12} {:<20} {:<10} {}",
                        op.id,
                        op.kind,
                        op.status.as_str(),
                        op.started_at.format("%Y-%m-%d %H:%M:%S"),
                        op.operator,
                        op.counts
                    );
                }
            }
        }
        Action::Show { id } => {
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
                    println!("{key:<14} {text}");
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}
