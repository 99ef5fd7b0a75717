//! Flag groups that several commands share (clap types, used by commands only): batching,
//! `--apply`/`--yes` with its confirmation, how a CSV file is read, and the value parsers for
//! durations and sizes.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::db::BatchTimeouts;
use crate::exit::UsageError;
use crate::import::MaxRejects;
use crate::import::mapping::Mapping;
use crate::import::source::{Encoding, parse_delimiter};
use crate::job::BatchSettings;

/// Batching flags shared by the cleanup commands.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Rows per batch transaction
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=100_000), help_heading = "Batching")]
    pub batch_size: u64,
    /// Resize the batches so that each transaction takes about this long (e.g. 250ms): the
    /// first has --batch-size rows, the next shrink when slower and grow again when faster, never
    /// past --batch-size (nor under 100 rows)
    #[arg(long, value_name = "DURATION", value_parser = parse_batch_time, help_heading = "Batching")]
    pub batch_time: Option<Duration>,
    /// Pause between batches (e.g. 200ms, 1s) to leave room for the live application
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s", help_heading = "Batching")]
    pub sleep: Duration,
    /// Stop cleanly after this long (e.g. 30m, 2h)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Batching")]
    pub max_runtime: Option<Duration>,
    /// Stop cleanly after this many rows
    #[arg(long, value_name = "N", help_heading = "Batching")]
    pub max_rows: Option<u64>,
    /// Give up waiting for a row lock after this long (the batch is retried)
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "2s", help_heading = "Batching")]
    pub lock_timeout: Duration,
    /// Cancel a statement that runs longer than this
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "60s", help_heading = "Batching")]
    pub statement_timeout: Duration,
    /// How often a batch (or a month of `cleanup retention`) that hit a lock timeout, deadlock or serialization failure, or found its rows changed meanwhile, is retried
    #[arg(long, default_value_t = 5, help_heading = "Batching")]
    pub retries: u32,
}

impl BatchArgs {
    pub fn settings(&self) -> BatchSettings {
        BatchSettings {
            batch_size: self.batch_size,
            batch_time: self.batch_time,
            sleep: self.sleep,
            max_runtime: self.max_runtime,
            max_rows: self.max_rows,
            timeouts: BatchTimeouts {
                lock_timeout: self.lock_timeout,
                statement_timeout: self.statement_timeout,
            },
            retries: self.retries,
        }
    }
}

/// `--apply` and `--yes`, shared by the commands that default to a dry run.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// Write the changes (without it, a dry run shows what would change)
    #[arg(long)]
    pub apply: bool,
    /// Do not ask for confirmation (required with --apply when there is no terminal)
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Asks the person at the terminal to confirm a write of `count` rows (`y` or `yes`; anything
/// else, an empty line included, is no). Without a terminal and without `--yes`, refuses
/// (exit 2) rather than guess.
pub fn confirm(args: &ApplyArgs, what: &str, count: u64) -> anyhow::Result<bool> {
    if args.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(UsageError(format!(
            "refusing to {what} ({count} row(s)) without confirmation: there is no terminal to ask on; add --yes"
        ))
        .into());
    }
    eprint!("{what}: {count} row(s) will change. Continue? [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "yes" | "y"))
}

/// How a CSV file is read and where its rejected rows go: every import, and `fix apply`.
#[derive(Debug, clap::Args)]
pub struct CsvArgs {
    /// Read a column under another header name: 'Source Header=field' (repeatable)
    #[arg(long = "map", value_name = "HEADER=FIELD")]
    pub maps: Vec<String>,
    /// Translate a value before it is checked: 'field:Source Value=value' (repeatable)
    #[arg(long = "value-map", value_name = "FIELD:FROM=TO")]
    pub value_maps: Vec<String>,
    /// A TOML file of column renames, value aliases and date formats for another system's
    /// export (see fixtures/maps/); --map, --value-map and --date-format take precedence
    #[arg(long, value_name = "FILE")]
    pub map_file: Option<PathBuf>,
    /// Read timestamps in this strftime format, e.g. '%d/%b/%y %I:%M %p' for 14/Jul/25 3:42 PM
    /// (repeatable: tried in order, then the built-in RFC 3339 / ISO / RFC 2822 shapes)
    #[arg(long, value_name = "FORMAT")]
    pub date_format: Vec<String>,
    /// Field delimiter: one ASCII character, or 'tab'
    #[arg(long, default_value = ",", value_parser = parse_delimiter)]
    pub delimiter: u8,
    /// Separator between tags in a list of tags
    #[arg(long, default_value_t = ';')]
    pub tag_separator: char,
    /// Input encoding: utf-8, windows-1252 (a Windows program's "ANSI" export: € “ ” – …) or latin1 (ISO-8859-1); transcoded to UTF-8
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
    /// `--map`, `--value-map`, `--date-format` and `--map-file`, checked.
    pub fn mapping(&self) -> anyhow::Result<Mapping> {
        Mapping::new(
            &self.maps,
            &self.value_maps,
            &self.date_format,
            self.map_file.as_deref(),
        )
    }

    /// What is recorded in `bulk_operations.args`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "map": self.maps,
            "value_map": self.value_maps,
            "map_file": self.map_file.as_ref().map(|p| p.display().to_string()),
            "date_format": self.date_format,
            "delimiter": (self.delimiter as char).to_string(),
            "tag_separator": self.tag_separator.to_string(),
            "encoding": format!("{:?}", self.encoding).to_lowercase(),
            "max_field_size": self.max_field_size,
        })
    }
}

/// How a command that prints rows prints them (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table for people
    Table,
    /// CSV with a header row (the table's columns)
    Csv,
    /// One JSON object
    Json,
}

impl Format {
    /// `--format`, reconciled with the global `--json` (which means `--format json`).
    pub fn chosen(format: Option<Format>, json: bool) -> anyhow::Result<Format> {
        match (json, format) {
            (true, Some(f)) if f != Format::Json => {
                let asked = format!("{f:?}").to_lowercase();
                Err(UsageError(format!(
                    "--json asks for JSON but --format {asked} for {asked}: give only one of them"
                ))
                .into())
            }
            (true, _) => Ok(Format::Json),
            (false, f) => Ok(f.unwrap_or(Format::Table)),
        }
    }
}

/// `500ms`, `2s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let (number, unit) = match v.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {value:?} (use e.g. 500ms, 2s, 5m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("not a duration: {value:?} (use e.g. 500ms, 2s, 5m, 1h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {value:?}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{value:?} is too long a duration"))
}

/// A lock or statement timeout: PostgreSQL takes whole milliseconds up to 2^31 - 1 (about
/// 24 days), and reads 0 as "wait forever", which is never what a bulk job on a live
/// database wants; so 0 and anything under a millisecond are refused.
pub fn parse_timeout(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration < Duration::from_millis(1) {
        return Err(format!(
            "{value:?} would mean \"wait forever\" to PostgreSQL; give at least 1ms (e.g. 1ms to barely wait)"
        ));
    }
    if duration.as_millis() > i32::MAX as u128 {
        return Err(format!("{value:?} is longer than PostgreSQL allows (24 days)"));
    }
    Ok(duration)
}

/// `--batch-time`: a positive duration (a batch cannot take no time).
pub fn parse_batch_time(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration < Duration::from_millis(1) {
        return Err(format!(
            "{value:?}: a batch takes some time; give at least 1ms (e.g. 250ms)"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0.5ms").is_err());
        assert!(parse_timeout("30d").is_err());
        assert_eq!(parse_timeout("1ms").unwrap(), Duration::from_millis(1));
    }
}
