//! ticketops: bulk operations on a PostgreSQL customer-support database.
//!
//! `cli` holds the command-line types, `cmd` one module per subcommand, `db` the pool,
//! timeouts and advisory locks, `import` the CSV import pipeline, `models` one file per table.

pub mod args;
pub mod audit;
pub mod cli;
pub mod cmd;
pub mod conninfo;
pub mod context;
pub mod db;
pub mod exit;
pub mod export;
pub mod filters;
pub mod import;
pub mod job;
pub mod models;
pub mod operation;
pub mod output;
pub mod restore;
pub mod schema;
pub mod signals;

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: cli::Cli) -> anyhow::Result<i32> {
    let ctx = context::Context::new(cli.global.into_opts());
    let result = cli::dispatch(&ctx, cli.command);
    // With --json every run leaves one JSON object on stdout, also one that failed before
    // its command could print its own: a cron log then has a line for every run.
    if let Err(err) = &result
        && ctx.global.json
        && !ctx.json_printed()
    {
        let code = exit::code_of(err);
        if code != exit::SUCCESS {
            let status = if code == exit::LOCKED { "locked" } else { "failed" };
            let _ = ctx.print_json(&serde_json::json!({
                "status": status,
                "error": format!("{err:#}"),
                "exit_code": code,
            }));
        }
    }
    result
}
