//! The rejects file (the input's header plus `_record`, `_line`, `_error`, the original
//! fields verbatim, so a person can fix it and import it again) and the per-reason tally
//! printed in the summary.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use csv::ByteRecord;
use serde::Serialize;

use super::source::RowError;

/// How many line numbers to keep per reason for the summary.
const SAMPLE_LINES: usize = 5;

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ReasonTally {
    pub count: u64,
    pub first_lines: Vec<u64>,
}

/// Errors grouped by reason.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RejectTally(pub BTreeMap<String, ReasonTally>);

impl RejectTally {
    pub fn add(&mut self, reason: &str, line: u64) {
        let entry = self.0.entry(reason.to_string()).or_default();
        entry.count += 1;
        if entry.first_lines.len() < SAMPLE_LINES {
            entry.first_lines.push(line);
        }
    }

    /// Adds the tally of one more batch. The sample lines stay the first ones in the file,
    /// whatever order batches commit in.
    pub fn merge(&mut self, batch: &RejectTally) {
        for (reason, tally) in &batch.0 {
            let entry = self.0.entry(reason.clone()).or_default();
            entry.count += tally.count;
            entry.first_lines.extend(&tally.first_lines);
            entry.first_lines.sort_unstable();
            entry.first_lines.dedup();
            entry.first_lines.truncate(SAMPLE_LINES);
        }
    }
}

/// Writes rejected records; the file is created on the first reject.
pub struct RejectsWriter {
    path: PathBuf,
    header: ByteRecord,
    writer: Option<csv::Writer<BufWriter<File>>>,
    delimiter: u8,
    /// Resuming: keep the file up to this length and append.
    resume_len: Option<u64>,
}

impl RejectsWriter {
    pub fn new(path: PathBuf, input_header: &ByteRecord, delimiter: u8, resume_len: Option<u64>) -> RejectsWriter {
        let mut header = input_header.clone();
        for extra in ["_record", "_line", "_error"] {
            header.push_field(extra.as_bytes());
        }
        RejectsWriter {
            path,
            header,
            writer: None,
            delimiter,
            resume_len,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &ByteRecord, record_no: u64, line: u64, error: &RowError) -> anyhow::Result<()> {
        if self.writer.is_none() {
            self.writer = Some(self.open()?);
        }
        let writer = self.writer.as_mut().expect("opened above");
        // Field by field: the record may be large (a field cut at --max-field-size), so it is
        // not copied to add the three columns.
        let written = (|| -> csv::Result<()> {
            for field in record.iter() {
                writer.write_field(field)?;
            }
            writer.write_field(record_no.to_string())?;
            writer.write_field(line.to_string())?;
            writer.write_field(error.describe())?;
            writer.write_record(None::<&[u8]>)
        })();
        written.with_context(|| format!("cannot write the rejects file {}", self.path.display()))
    }

    fn open(&mut self) -> anyhow::Result<csv::Writer<BufWriter<File>>> {
        let context = || format!("cannot write the rejects file {}", self.path.display());
        let mut builder = csv::WriterBuilder::new();
        builder.flexible(true).delimiter(self.delimiter);
        match self.resume_len.filter(|&len| len > 0) {
            Some(len) => {
                let file = OpenOptions::new().write(true).open(&self.path).with_context(context)?;
                file.set_len(len).with_context(context)?;
                let mut file = file;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::End(0)).with_context(context)?;
                Ok(builder.from_writer(BufWriter::new(file)))
            }
            None => {
                let file = crate::output::create_private(&self.path).with_context(context)?;
                let mut writer = builder.from_writer(BufWriter::new(file));
                writer.write_byte_record(&self.header).with_context(context)?;
                Ok(writer)
            }
        }
    }

    /// Flushes to disk and returns the file's length (recorded in the checkpoint, so that a
    /// resume can cut off rejects written after it).
    pub fn flush(&mut self) -> anyhow::Result<u64> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(self.resume_len.unwrap_or(0));
        };
        writer
            .flush()
            .with_context(|| format!("cannot write the rejects file {}", self.path.display()))?;
        let file = writer.get_ref().get_ref();
        file.sync_data().ok();
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    }

    /// Cuts the file back to `len` bytes, the length recorded with the last committed batch:
    /// what a rolled-back batch wrote is removed (0: the file goes, as nothing committed is
    /// in it).
    pub fn cut_back(&mut self, len: u64) -> anyhow::Result<()> {
        // Dropping the writer tries to flush what it buffered (it may fail on a full disk);
        // whatever lands past `len` is cut off below.
        drop(self.writer.take());
        let context = || {
            format!(
                "cannot cut the rejects file {} back to {len} bytes",
                self.path.display()
            )
        };
        if len == 0 {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(context),
                _ => {}
            }
        } else if self.path.exists() {
            let file = OpenOptions::new().write(true).open(&self.path).with_context(context)?;
            file.set_len(len).with_context(context)?;
            file.sync_data().with_context(context)?;
        }
        self.resume_len = Some(len);
        Ok(())
    }

    pub fn written(&self) -> bool {
        self.writer.is_some() || self.resume_len.is_some_and(|len| len > 0)
    }
}

impl Drop for RejectsWriter {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.as_mut() {
            let _ = writer.flush();
        }
    }
}

impl std::fmt::Debug for RejectsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectsWriter").field("path", &self.path).finish()
    }
}

/// Removes a rejects file left by an earlier run, so that a run with no rejects does not
/// leave an old one looking like its own. Only a file that is recognisably a rejects file
/// (its header ends with our three columns) is removed.
pub fn remove_stale(path: &Path, delimiter: u8) -> anyhow::Result<()> {
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(file);
    let mut header = ByteRecord::new();
    let ours = reader.read_byte_record(&mut header).unwrap_or(false)
        && header.len() >= 3
        && header.iter().rev().take(3).eq([&b"_error"[..], b"_line", b"_record"]);
    if !ours {
        anyhow::bail!(
            "the rejects path {} exists and is not a rejects file; choose another with --rejects",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("cannot remove the old rejects file {}", path.display()))
}
