//! `ticketops migrate run | revert | status`: the embedded migrations.

use anyhow::Context as _;
use diesel_migrations::MigrationHarness;
use serde_json::json;

use crate::context::Context;
use crate::db::{self, MIGRATIONS};
use crate::exit;
use crate::layout::Layout;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Apply every pending migration (and, on an empty database, choose its layout)
    #[command(after_help = "\
Layouts (chosen once, on an empty database; recorded in ticketops_layout, read by every command):
  plain        one tickets table (the default)
  partitioned  tickets range-partitioned by created_at, a partition a month, made ahead and
               maintained by pg_partman (package postgresql-15-partman), a default partition
               for stray rows, and ticket_keys keeping external_id unique across partitions;
               tag links and comments partitioned the same way, each month referencing its month
               of tickets, and comment_keys keeping comments' external_id unique.
               Run `SELECT partman.run_maintenance(), ticketops_month_keys()` from cron so that
               months are made ahead with their keys; imports make the months their rows need.

Examples:
  ticketops migrate run
  ticketops migrate run --layout partitioned")]
    Run {
        /// The layout of a new database [default: plain; an existing database keeps its own]
        #[arg(long, value_enum)]
        layout: Option<Layout>,
    },
    /// Revert the latest applied migration (or all of them with --all)
    Revert {
        /// Revert every applied migration, leaving an empty schema
        #[arg(long)]
        all: bool,
    },
    /// List the migrations and whether each is applied
    Status,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let url = ctx.database_url()?;
    let mut conn = db::establish(url)?;
    match args.action {
        Action::Run { layout } => {
            if let Some(layout) = layout {
                crate::layout::require_public_schema(&mut conn, layout)?;
            }
            let applied = conn
                .run_pending_migrations(MIGRATIONS)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("cannot apply migrations")?;
            let versions: Vec<String> = applied.iter().map(|v| v.to_string()).collect();
            if let Some(layout) = layout {
                crate::layout::choose(&mut conn, layout)?;
            }
            let layout = Layout::of(&mut conn)?;
            if ctx.global.json {
                ctx.print_json(&json!({ "applied": versions, "layout": layout }))?;
            } else {
                if versions.is_empty() {
                    ctx.info("migrations: nothing to apply, the schema is up to date");
                }
                for v in &versions {
                    ctx.info(format!("applied {v}"));
                }
                ctx.info(format!("layout: {}", layout.as_str()));
            }
        }
        Action::Revert { all } => {
            let reverted: Vec<String> = if all {
                conn.revert_all_migrations(MIGRATIONS)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("cannot revert migrations")?
                    .iter()
                    .map(|v| v.to_string())
                    .collect()
            } else {
                let has_applied = !conn
                    .applied_migrations()
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("cannot read applied migrations")?
                    .is_empty();
                if has_applied {
                    let v = conn
                        .revert_last_migration(MIGRATIONS)
                        .map_err(|e| anyhow::anyhow!("{e}"))
                        .context("cannot revert the latest migration")?;
                    vec![v.to_string()]
                } else {
                    Vec::new()
                }
            };
            if ctx.global.json {
                ctx.print_json(&json!({ "reverted": reverted }))?;
            } else if reverted.is_empty() {
                ctx.info("migrations: nothing to revert");
            } else {
                for v in &reverted {
                    ctx.info(format!("reverted {v}"));
                }
            }
        }
        Action::Status => {
            let statuses = db::migration_status(&mut conn)?;
            if ctx.global.json {
                let list: Vec<_> = statuses
                    .iter()
                    .map(|(v, applied)| json!({ "version": v, "applied": applied }))
                    .collect();
                ctx.print_json(&json!({ "migrations": list }))?;
            } else {
                for (v, applied) in &statuses {
                    crate::outln!("{} {v}", if *applied { "applied" } else { "pending" });
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}
