//! The accounting of an import: where every input row went (`rows_read = inserted + updated +
//! unchanged + duplicate + skipped_deleted + rejected`, always), the checkpoint a batch commits
//! with, the limit on rejects, and the summary. A change to the accounting touches this file.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::models::OperationStatus;
use crate::output::{self};
use rejects::RejectTally;
use source::Position;

use super::*;

#[derive(Debug, Clone, Copy)]
pub enum MaxRejects {
    Count(u64),
    Percent(f64),
}

impl MaxRejects {
    pub fn parse(value: &str) -> Result<MaxRejects, String> {
        let v = value.trim();
        if let Some(p) = v.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| format!("not a percentage: {value:?}"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("a percentage must be between 0 and 100, not {value:?}"));
            }
            return Ok(MaxRejects::Percent(pct));
        }
        v.parse()
            .map(MaxRejects::Count)
            .map_err(|_| format!("expected a number or a percentage like 5%, not {value:?}"))
    }

    /// Whether `rejected` of `read` rows is over the limit. A percentage is judged only once
    /// enough rows were read for it to mean something (or at the end).
    pub(super) fn exceeded(self, rejected: u64, read: u64, at_end: bool) -> bool {
        match self {
            MaxRejects::Count(max) => rejected > max,
            MaxRejects::Percent(pct) => {
                (at_end || read >= 1000) && read > 0 && (rejected as f64) * 100.0 / (read as f64) > pct
            }
        }
    }
}

/// Where every input row went. `rows_read` always equals the sum of the others.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub rows_read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub duplicate: u64,
    pub skipped_deleted: u64,
    pub rejected: u64,
    /// Of the unchanged, those skipped by their fingerprint, unparsed (see `fingerprint`).
    #[serde(default)]
    pub unchanged_by_fingerprint: u64,
}

impl Counts {
    pub fn accounted(&self) -> u64 {
        self.inserted + self.updated + self.unchanged + self.duplicate + self.skipped_deleted + self.rejected
    }

    /// Adds the counts of one more batch.
    pub fn add(&mut self, batch: &Counts) {
        self.rows_read += batch.rows_read;
        self.inserted += batch.inserted;
        self.updated += batch.updated;
        self.unchanged += batch.unchanged;
        self.duplicate += batch.duplicate;
        self.skipped_deleted += batch.skipped_deleted;
        self.rejected += batch.rejected;
        self.unchanged_by_fingerprint += batch.unchanged_by_fingerprint;
    }
}

/// What is stored in `bulk_operations.checkpoint` after each committed batch. With several
/// writers (`--jobs`) batches commit out of order: `position` is the end of the committed
/// prefix of the file, and `done` holds the batches committed beyond it (each by the record
/// it starts after, with its end); a resume reads from `position` in batches of the same
/// `batch_size` and skips those.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    pub(super) position: Position,
    pub(super) rejects_bytes: u64,
    pub(super) counts: Counts,
    pub(super) tally: RejectTally,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) done: Vec<(u64, Position)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) batch_size: Option<usize>,
}

/// The result of one import, printed as the summary.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub operation_id: Option<i64>,
    pub kind: String,
    pub status: OperationStatus,
    pub file: String,
    pub counts: Counts,
    pub rejects_file: Option<String>,
    pub tally: RejectTally,
    pub elapsed: std::time::Duration,
    pub stop_reason: String,
    /// Why the import failed or stopped early, for the JSON summary.
    pub error: Option<String>,
    /// About the input as a whole (no line end at the end, the wrong encoding, …).
    pub warnings: Vec<String>,
    pub dry_run: bool,
    /// Whether the kind inserts rows, and what it calls updated ones (for the human line).
    pub inserts: bool,
    pub updated_label: &'static str,
}

impl ImportReport {
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.counts;
        let ms = self.elapsed.as_millis() as u64;
        json!({
            "operation_id": self.operation_id,
            "kind": self.kind,
            "status": self.status.as_str(),
            "file": self.file,
            "rows_read": c.rows_read,
            "inserted": c.inserted,
            "updated": c.updated,
            "unchanged": c.unchanged,
            "unchanged_by_fingerprint": c.unchanged_by_fingerprint,
            "duplicate": c.duplicate,
            "skipped_deleted": c.skipped_deleted,
            "rejected": c.rejected,
            "rejects_file": self.rejects_file,
            "duration_ms": ms,
            "rows_per_sec": (output::rate(c.rows_read, self.elapsed) * 10.0).round() / 10.0,
            "dry_run": self.dry_run,
            "stopped": self.stop_reason,
            "error": self.error,
            "errors": self.tally,
            "warnings": self.warnings,
        })
    }

    pub fn print_human(&self) {
        let c = &self.counts;
        let verb = if self.dry_run { "would be " } else { "" };
        eprintln!(
            "{}{} {}: {} ({} rows in {:.1} s, {:.0} rows/s)",
            if self.dry_run { "dry run: " } else { "" },
            self.kind,
            self.file,
            self.status.as_str(),
            c.rows_read,
            self.elapsed.as_secs_f64(),
            output::rate(c.rows_read, self.elapsed)
        );
        let inserted = if self.inserts {
            format!("{verb}inserted {} + ", c.inserted)
        } else {
            String::new()
        };
        eprintln!(
            "  read {}  = {inserted}{verb}{} {} + unchanged {} + duplicate {} + skipped (deleted) {} + rejected {}",
            c.rows_read, self.updated_label, c.updated, c.unchanged, c.duplicate, c.skipped_deleted, c.rejected
        );
        if c.unchanged_by_fingerprint > 0 {
            eprintln!(
                "  of the unchanged, {} were known by their fingerprint (not parsed or compared again)",
                c.unchanged_by_fingerprint
            );
        }
        for (reason, t) in &self.tally.0 {
            let lines: Vec<String> = t.first_lines.iter().map(|l| l.to_string()).collect();
            let more = if t.count as usize > t.first_lines.len() {
                ", …"
            } else {
                ""
            };
            let word = if t.count == 1 { "line" } else { "lines" };
            eprintln!(
                "  rejected {:>6}  {reason} ({word} {}{more})",
                t.count,
                lines.join(", ")
            );
        }
        if let Some(file) = &self.rejects_file {
            eprintln!("  rejected rows written to {file}");
        }
        for warning in &self.warnings {
            eprintln!("  warning: {warning}");
        }
        if let Some(id) = self.operation_id.filter(|_| !self.dry_run) {
            eprintln!("  operation {id}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounting_identity_counts_every_outcome_once() {
        let counts = Counts {
            rows_read: 21,
            inserted: 1,
            updated: 2,
            unchanged: 3,
            duplicate: 4,
            skipped_deleted: 5,
            rejected: 6,
            unchanged_by_fingerprint: 2,
        };
        assert_eq!(counts.accounted(), counts.rows_read);
        let mut off = counts;
        off.duplicate += 1;
        assert_ne!(off.accounted(), off.rows_read);
        assert_eq!(Counts::default().accounted(), 0);
    }

    #[test]
    fn max_rejects_as_a_count_or_a_share() {
        assert!(MaxRejects::parse("10").unwrap().exceeded(11, 100, false));
        assert!(!MaxRejects::parse("10").unwrap().exceeded(10, 100, false));
        let pct = MaxRejects::parse("5%").unwrap();
        assert!(!pct.exceeded(60, 999, false), "judged only once enough rows were read");
        assert!(pct.exceeded(60, 1000, false));
        assert!(pct.exceeded(6, 100, true));
        assert!(MaxRejects::parse("101%").is_err());
        assert!(MaxRejects::parse("lots").is_err());
    }
}
