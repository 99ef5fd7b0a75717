//! `ticketops import tickets|users|comments FILE|-`: the command-line side of the import
//! pipeline in `crate::import`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use crate::args::{CsvArgs, parse_timeout};
use crate::context::Context;
use crate::db::BatchTimeouts;
use crate::exit::UsageError;
use crate::import::comments::CommentImport;
use crate::import::normalize::InputZone;
use crate::import::source::Input;
use crate::import::tickets::TicketImport;
use crate::import::users::UserImport;
use crate::import::{self, ImportOptions, Mode};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Import tickets (upsert by external_id), creating their users, organizations and tags
    #[command(after_help = TICKETS_HELP)]
    Tickets {
        #[command(flatten)]
        common: CommonArgs,
        /// Bring back tickets that are soft-deleted in the database (otherwise skipped)
        #[arg(long)]
        undelete: bool,
        /// Fast first load into EMPTY tickets/ticket_tags: drops their indexes, keys and foreign
        /// keys, loads the rows frozen (COPY FREEZE), recreates and validates them (without
        /// --statement-timeout: they take as long as the table needs), all in one
        /// transaction (users stay readable but no other session can write them until it ends;
        /// an empty users table is loaded bare the same way). On the partitioned layout each
        /// month's rows are held in temporary files in TMPDIR (up to 32 MiB each) for one COPY
        /// a month, the months of tickets staged in tables of their own (ticketops_staged_*)
        /// indexed on two more connections and swapped in at the end; tickets stays as it was
        /// until the load commits
        #[arg(long)]
        initial_load: bool,
    },
    /// Import users (upsert by e-mail): email, name, role, organization
    #[command(after_help = USERS_HELP)]
    Users {
        #[command(flatten)]
        common: CommonArgs,
        /// Bring back users that are soft-deleted in the database (otherwise skipped)
        #[arg(long)]
        undelete: bool,
    },
    /// Import comments: ticket_external_id, author_email, body, public, created_at, external_id
    #[command(after_help = COMMENTS_HELP)]
    Comments {
        #[command(flatten)]
        common: CommonArgs,
    },
}

const TICKETS_HELP: &str = "\
Columns (by header name, case- and space-insensitive): external_id, subject, description, status,
priority, channel, requester_email, requester_name, assignee_email, organization, tags, created_at,
updated_at, solved_at. Required: external_id, subject, requester_email, status.

Every row is accounted for: rows_read = inserted + updated + unchanged + duplicate + skipped_deleted
+ rejected. Rejected rows go to the rejects file with _record, _line and _error columns; fix them
there and import that file again.

A ticket keeps the fingerprint of the record that wrote it: importing the same record again (same
columns and options) counts it unchanged without parsing it (unchanged_by_fingerprint in --json).
Anything that changes the ticket, its tags or the users, organization and tags it names forgets
the fingerprint, and the record is compared in full. Not on the distributed layout.

Examples:
  ticketops import tickets dump.csv
  ticketops import tickets export.csv --map 'Ticket ID=external_id' --map 'Title=subject' \\
      --value-map 'status:Pending Customer Response=pending'
  zcat dump.csv.gz | ticketops import tickets - --rejects rejects.csv --json
  ticketops import tickets dump.csv --resume        # continue after a crash or Ctrl-C";

const USERS_HELP: &str = "\
Columns (by header name, case- and space-insensitive): email (required), name, role (customer,
agent, admin), organization. E-mails are matched lower-cased; a blank name, role or organization
never erases a stored one.

Every row is accounted for: rows_read = inserted + updated + unchanged + duplicate + skipped_deleted
+ rejected. Rejected rows go to the rejects file with _record, _line and _error columns.

Examples:
  ticketops import users people.csv
  ticketops import users agents.csv --value-map 'role:Support Agent=agent' --json";

const COMMENTS_HELP: &str = "\
Columns (by header name, case- and space-insensitive): ticket_external_id and author_email
(required), body, public (true/false, default true), created_at, external_id. With external_id a
comment is upserted by it (and moves to another ticket if the file says so); without, it is matched
on ticket, author, body and time (a blank time matches any) against the stored comments and the
rows before it in the file, so importing a file again adds nothing. A comment on a ticket that does
not exist is rejected (import the tickets first); unknown authors are created as customers.

Every row is accounted for: rows_read = inserted + updated + unchanged + duplicate + skipped_deleted
+ rejected. Rejected rows go to the rejects file with _record, _line and _error columns.

Examples:
  ticketops import comments comments.csv
  ticketops import comments export.csv --map 'Ticket ID=ticket_external_id' --map 'Author=author_email'";

/// Options every import shares.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The CSV file, or - for stdin
    pub file: String,
    #[command(flatten)]
    pub csv: CsvArgs,
    /// Time zone of timestamps written without an offset (IANA name, e.g. Europe/Berlin)
    #[arg(long, default_value = "UTC", value_parser = InputZone::parse)]
    pub timezone: InputZone,
    /// Rows per batch transaction [default: 2000; 5000 with --initial-load] (as fast as larger
    /// batches in measurements, and what keeps an import's memory near 30 MiB: each 1,000 more
    /// rows cost about 4 MiB, per writer with --jobs)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: Option<u64>,
    /// Write batches on N connections at once, each committing on its own, with the same result as
    /// one writer. 1 by default: a live database also serves its application, and one writer
    /// leaves it the other cores; on 2 cores --jobs 2 measured 1.4-1.7x the rows/s of one for new
    /// and for changed rows (docs/performance.md). Not with --atomic, --dry-run or --initial-load
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Continue the latest unfinished import of a file with the same content from its checkpoint
    #[arg(long, conflicts_with_all = ["atomic", "dry_run"])]
    pub resume: bool,
    /// Import the whole file in one transaction: on any failure nothing is committed
    #[arg(long)]
    pub atomic: bool,
    /// Do everything inside a transaction that is rolled back, and report what would happen
    #[arg(long)]
    pub dry_run: bool,
    /// Lock wait limit per statement (e.g. 500ms, 5s; a plain number is seconds), so a live
    /// application's locks are not waited on for long
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_timeout)]
    pub lock_timeout: Duration,
    /// Statement time limit (e.g. 5m; a plain number is seconds)
    #[arg(long, default_value = "300s", value_name = "DURATION", value_parser = parse_timeout)]
    pub statement_timeout: Duration,
    /// How often a batch that hit a lock timeout, deadlock or serialization failure is retried
    /// (with backoff) before the import stops; `--resume` then continues from that batch
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
}

impl CommonArgs {
    /// `--batch-size`, or the default for the kind of load.
    fn batch_size(&self, initial_load: bool) -> u64 {
        self.batch_size.unwrap_or(if initial_load { 5_000 } else { 2_000 })
    }

    fn options(&self, ctx: &Context, undelete: bool, initial_load: bool) -> anyhow::Result<ImportOptions> {
        let verbose = ctx.global.verbose > 0;
        let mapping = self.csv.mapping()?;
        let mode = match (self.atomic || initial_load, self.dry_run) {
            (_, true) => Mode::DryRun,
            (true, false) => Mode::Atomic,
            (false, false) => Mode::Batched,
        };
        if initial_load && self.resume {
            return Err(UsageError("--initial-load runs in one transaction and cannot be resumed".into()).into());
        }
        Ok(ImportOptions {
            input: Input::from_arg(&self.file),
            delimiter: self.csv.delimiter,
            encoding: self.csv.encoding,
            zone: self.timezone,
            tag_separator: self.csv.tag_separator,
            mapping,
            rejects: self.csv.rejects.clone(),
            max_rejects: self.csv.max_rejects,
            max_field_size: self.csv.max_field_size,
            batch_size: self.batch_size(initial_load) as usize,
            jobs: self.jobs as usize,
            mode,
            resume: self.resume,
            undelete,
            initial_load,
            timeouts: BatchTimeouts {
                lock_timeout: self.lock_timeout,
                statement_timeout: self.statement_timeout,
            },
            retries: self.retries,
            progress: ctx.progress(),
            verbose,
        })
    }

    /// What is recorded in `bulk_operations.args`.
    fn to_json(&self, initial_load: bool, extra: serde_json::Value) -> serde_json::Value {
        let mut args = self.csv.to_json();
        let own = json!({
            "file": self.file,
            "batch_size": self.batch_size(initial_load),
            "jobs": self.jobs,
            "atomic": self.atomic,
            "dry_run": self.dry_run,
            "resume": self.resume,
        });
        if let Some(obj) = args.as_object_mut() {
            for more in [own, extra] {
                if let Some(more) = more.as_object() {
                    obj.extend(more.clone());
                }
            }
        }
        args
    }
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    match args.what {
        What::Tickets {
            common,
            undelete,
            initial_load,
        } => {
            let options = common.options(ctx, undelete, initial_load)?;
            let mut kind = TicketImport::new(undelete, initial_load, ctx.global.verbose > 0);
            let args_json = common.to_json(
                initial_load,
                json!({ "undelete": undelete, "initial_load": initial_load }),
            );
            run_import(ctx, options, &mut kind, args_json)
        }
        What::Users { common, undelete } => {
            let options = common.options(ctx, undelete, false)?;
            let mut kind = UserImport::new(undelete);
            run_import(
                ctx,
                options,
                &mut kind,
                common.to_json(false, json!({ "undelete": undelete })),
            )
        }
        What::Comments { common } => {
            let options = common.options(ctx, false, false)?;
            let mut kind = CommentImport::default();
            run_import(ctx, options, &mut kind, common.to_json(false, json!({})))
        }
    }
}

/// Runs the import engine and prints what it returns.
fn run_import<K: import::ImportKind>(
    ctx: &Context,
    options: ImportOptions,
    kind: &mut K,
    args_json: serde_json::Value,
) -> anyhow::Result<i32> {
    let pool = ctx.pool(import::connections(options.jobs))?;
    let outcome = import::run(&pool, ctx.database_url()?, options, kind, args_json, ctx.log())?;
    ctx.finish_import(outcome)
}
