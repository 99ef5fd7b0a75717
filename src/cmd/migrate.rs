//! `ticketops migrate run | revert | status`: the embedded migrations.

use anyhow::Context as _;
use diesel_migrations::MigrationHarness;
use serde_json::json;

use crate::context::Context;
use crate::db::{self, MIGRATIONS};
use crate::exit;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Apply every pending migration
    Run,
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
        Action::Run => {
            let applied = conn
                .run_pending_migrations(MIGRATIONS)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("cannot apply migrations")?;
            let versions: Vec<String> = applied.iter().map(|v| v.to_string()).collect();
            if ctx.global.json {
                ctx.print_json(&json!({ "applied": versions }))?;
            } else if versions.is_empty() {
                ctx.info("migrations: nothing to apply, the schema is up to date");
            } else {
                for v in &versions {
                    ctx.info(format!("applied {v}"));
                }
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
                    println!("{} {v}", if *applied { "applied" } else { "pending" });
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}
