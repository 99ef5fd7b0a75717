//! `ticketops export tickets|users|comments [filters] [-o FILE]`: CSV in exactly the import
//! format, streamed from PostgreSQL with `COPY (SELECT …) TO STDOUT` through Diesel's
//! `copy_to`, so memory stays constant whatever the table size.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context as _;

use crate::context::Context;
use crate::db;
use crate::exit;
use crate::exit::UsageError;
use crate::export::{self, Dataset};
use crate::filters::TicketFilters;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Timestamps are written in UTC as RFC 3339 with microseconds, tags joined with ';', so that
`export` then `import` into an empty database reproduces the data, and into the same database
reports every row unchanged.

The ticket filters are those of `tickets list`, `cleanup` and `fix`: `export comments` with
filters writes the comments of the tickets they select. Export, edit in a spreadsheet, and
`fix apply` the file: it reads the export's own columns (a `tags` column sets the tag set).

Examples:
  ticketops export tickets -o tickets.csv
  ticketops export tickets --status open --assignee none -o unassigned.csv
  ticketops export comments --tag vip --created-after 30d -o vip-comments.csv
  ticketops export users --include-deleted | gzip > users.csv.gz")]
pub struct Args {
    /// What to export
    #[arg(value_enum)]
    pub what: What,
    /// Write to this file instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Which tickets (for `tickets` and `comments`); `--include-deleted` also applies to users
    #[command(flatten)]
    pub filters: TicketFilters,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Tickets,
    Users,
    Comments,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let dataset = match args.what {
        What::Tickets => Dataset::Tickets,
        What::Users => Dataset::Users,
        What::Comments => Dataset::Comments,
    };
    let filtered = !args.filters.is_empty() || args.filters.only_deleted;
    if filtered && dataset == Dataset::Users {
        return Err(UsageError(
            "export users takes no ticket filters (only --include-deleted); filter tickets or comments instead".into(),
        )
        .into());
    }
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    let filters = args.filters.resolve(&mut conn)?;
    let (mut out, target_name): (Box<dyn Write>, String) = match &args.output {
        Some(path) => (
            Box::new(BufWriter::with_capacity(
                1 << 20,
                crate::output::create_private(path).with_context(|| format!("cannot create {}", path.display()))?,
            )),
            path.display().to_string(),
        ),
        None => (
            Box::new(BufWriter::with_capacity(1 << 16, io::stdout().lock())),
            "stdout".into(),
        ),
    };
    let started = std::time::Instant::now();
    if filtered && let Some(warning) = filters.unmatched_ids_warning() {
        ctx.info(warning);
    }
    let progress = crate::output::byte_progress(ctx.progress(), None);
    progress.set_prefix("exporting");
    let mut counted = crate::output::ProgressWriter {
        inner: &mut out,
        progress: progress.clone(),
    };
    let result = if filtered {
        export::export_selected(&mut conn, dataset, &filters, &mut counted)
    } else {
        export::export_all(&mut conn, dataset, args.filters.include_deleted, &mut counted)
    };
    progress.finish_and_clear();
    let result = result.and_then(|b| {
        out.flush().with_context(|| format!("cannot write {target_name}"))?;
        Ok(b)
    });
    drop(out);
    let bytes = match (result, &args.output) {
        (Ok(bytes), _) => bytes,
        // A partial export looks like a whole one to whoever reads it next: remove it.
        (Err(err), Some(path)) => {
            let removed = match std::fs::remove_file(path) {
                Ok(()) => "the partial file was removed".to_string(),
                Err(e) => format!("the partial file could not be removed ({e}): it is incomplete"),
            };
            return Err(err.context(format!("export to {} failed; {removed}", path.display())));
        }
        (Err(err), None) => return Err(err),
    };
    let what = format!("{:?}", args.what).to_lowercase();
    if ctx.global.json && args.output.is_some() {
        ctx.print_json(&serde_json::json!({
            "kind": format!("export {what}"),
            "file": target_name,
            "bytes": bytes,
            "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    }
    ctx.info(format!(
        "exported {what} to {target_name} ({bytes} bytes in {:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(exit::SUCCESS)
}
