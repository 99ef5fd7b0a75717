//! `ticketops import tickets|users|comments FILE|-`: the command-line side of the import
//! pipeline in `crate::import`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use crate::batch::parse_timeout;
use crate::cli::Context;
use crate::db::BatchTimeouts;
use crate::exit::UsageError;
use crate::import::comments::CommentImport;
use crate::import::normalize::InputZone;
use crate::import::source::{Encoding, Input, parse_delimiter};
use crate::import::tickets::TicketImport;
use crate::import::users::UserImport;
use crate::import::{self, ImportOptions, MaxRejects, Mode};

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
        /// keys, loads the rows frozen (COPY FREEZE), recreates and validates them, all in one
        /// transaction (users stay
        /// readable but no other session can write them until it ends; an empty users table
        /// is loaded bare the same way)
        #[arg(long)]
        initial_load: bool,
    },
    /// Import users (upsert by e-mail): email, name, role, organization
    Users {
        #[command(flatten)]
        common: CommonArgs,
        /// Bring back users that are soft-deleted in the database (otherwise skipped)
        #[arg(long)]
        undelete: bool,
    },
    /// Import comments: ticket_external_id, author_email, body, public, created_at, external_id
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

Examples:
  ticketops import tickets dump.csv
  ticketops import tickets export.csv --map 'Ticket ID=external_id' --map 'Title=subject' \\
      --value-map 'status:Pending Customer Response=pending'
  zcat dump.csv.gz | ticketops import tickets - --rejects rejects.csv --json
  ticketops import tickets dump.csv --resume        # continue after a crash or Ctrl-C";

/// How a CSV file is read and where its rejected rows go: every import, and `fix apply`.
#[derive(Debug, clap::Args)]
pub struct CsvArgs {
    /// Read a column under another header name: 'Source Header=field' (repeatable)
    #[arg(long = "map", value_name = "HEADER=FIELD")]
    pub maps: Vec<String>,
    /// Translate a value before it is checked: 'field:Source Value=value' (repeatable)
    #[arg(long = "value-map", value_name = "FIELD:FROM=TO")]
    pub value_maps: Vec<String>,
    /// Field delimiter: one ASCII character, or 'tab'
    #[arg(long, default_value = ",", value_parser = parse_delimiter)]
    pub delimiter: u8,
    /// Separator between tags in a list of tags
    #[arg(long, default_value_t = ';')]
    pub tag_separator: char,
    /// Input encoding: utf-8 or latin1 (transcoded to UTF-8)
    #[arg(long, default_value = "utf-8", value_parser = Encoding::parse)]
    pub encoding: Encoding,
    /// Where rejected rows go [default: FILE's name with .rejects.csv; required for stdin]
    #[arg(long, value_name = "PATH")]
    pub rejects: Option<PathBuf>,
    /// Stop (failing) when more rows than this are rejected: a count or a percentage like 5%
    #[arg(long, value_name = "N|N%", value_parser = MaxRejects::parse)]
    pub max_rejects: Option<MaxRejects>,
    /// The largest field accepted (e.g. 16MiB, 500KiB, 2MB; plain bytes): a record with a larger
    /// field is rejected without being held in memory, and its rejects-file copy is cut there
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_field_size: usize,
}

/// `16MiB`, `500KiB`, `2MB`, `300kB`, or a plain number of bytes.
pub fn parse_size(value: &str) -> Result<usize, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("not a size: {value:?} (use e.g. 16MiB, 500KiB or a number of bytes)"))?;
    let factor: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "not a size: {value:?} (use e.g. 16MiB, 500KiB or a number of bytes)"
            ));
        }
    };
    let size = number
        .checked_mul(factor)
        .ok_or_else(|| format!("{value:?} is too large"))?;
    if !(1..=1 << 30).contains(&size) {
        return Err(format!("{value:?}: the size must be between 1 byte and 1GiB"));
    }
    Ok(size)
}

impl CsvArgs {
    /// The `--map` pairs, checked.
    pub fn renames(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.maps
            .iter()
            .map(|m| {
                m.rsplit_once('=')
                    .map(|(from, to)| (from.trim().to_string(), to.trim().to_string()))
                    .filter(|(from, to)| !from.is_empty() && !to.is_empty())
                    .ok_or_else(|| UsageError(format!("--map {m:?} is not of the form 'Source Header=field'")).into())
            })
            .collect()
    }

    /// What is recorded in `bulk_operations.args`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "map": self.maps,
            "value_map": self.value_maps,
            "delimiter": (self.delimiter as char).to_string(),
            "tag_separator": self.tag_separator.to_string(),
            "encoding": format!("{:?}", self.encoding).to_lowercase(),
            "max_field_size": self.max_field_size,
        })
    }
}

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
    /// Rows per batch transaction [default: 5000; 10000 with --initial-load] (5,000 measured
    /// best for a normal import: larger batches gain under 4%; an initial load gains ~5% from
    /// 10,000; each 1,000 more rows cost 2-4 MB of memory)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: Option<u64>,
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
        self.batch_size.unwrap_or(if initial_load { 10_000 } else { 5_000 })
    }

    fn options(&self, undelete: bool, initial_load: bool, verbose: bool) -> anyhow::Result<ImportOptions> {
        let renames = self.csv.renames()?;
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
            renames,
            value_maps: self.csv.value_maps.clone(),
            rejects: self.csv.rejects.clone(),
            max_rejects: self.csv.max_rejects,
            max_field_size: self.csv.max_field_size,
            batch_size: self.batch_size(initial_load) as usize,
            mode,
            resume: self.resume,
            undelete,
            initial_load,
            timeouts: BatchTimeouts {
                lock_timeout: self.lock_timeout,
                statement_timeout: self.statement_timeout,
            },
            retries: self.retries,
            verbose,
        })
    }

    /// What is recorded in `bulk_operations.args`.
    fn to_json(&self, initial_load: bool, extra: serde_json::Value) -> serde_json::Value {
        let mut args = self.csv.to_json();
        let own = json!({
            "file": self.file,
            "batch_size": self.batch_size(initial_load),
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
            let options = common.options(undelete, initial_load, ctx.global.verbose > 0)?;
            let mut kind = TicketImport::new(undelete, initial_load, ctx.global.verbose > 0);
            let args_json = common.to_json(
                initial_load,
                json!({ "undelete": undelete, "initial_load": initial_load }),
            );
            import::run(ctx, options, &mut kind, args_json)
        }
        What::Users { common, undelete } => {
            let options = common.options(undelete, false, ctx.global.verbose > 0)?;
            let mut kind = UserImport::new(undelete);
            import::run(
                ctx,
                options,
                &mut kind,
                common.to_json(false, json!({ "undelete": undelete })),
            )
        }
        What::Comments { common } => {
            let options = common.options(false, false, ctx.global.verbose > 0)?;
            let mut kind = CommentImport::default();
            import::run(ctx, options, &mut kind, common.to_json(false, json!({})))
        }
    }
}
