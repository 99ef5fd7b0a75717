//! Archives of what is deleted for good (`cleanup purge`, `cleanup retention`): CSV in the
//! import format, appended batch by batch and synced to disk before the delete that follows
//! commits, cut back when that batch fails. `ticketops import tickets ARCHIVE` brings the rows
//! back.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::Context as _;
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use crate::layout::BatchTickets;

/// An archive CSV that batches are appended to, flushed and synced before their delete
/// commits, and cut back if the batch fails.
pub struct Archive {
    path: PathBuf,
    header: &'static [&'static str],
    file: Option<File>,
}

impl Archive {
    /// The archive at `path`, created at the first batch or appended to. Checked now, before
    /// anything is removed: an existing file must be an archive of the same kind that ends with
    /// a whole line — appended to anything else, the file would not import back (a header of
    /// another kind, or the first record glued to a line a crash cut short) — and a new one's
    /// directory must exist.
    pub fn open(path: PathBuf, header: &'static [&'static str]) -> anyhow::Result<Archive> {
        check_appendable(&path, header)?;
        Ok(Archive {
            path,
            header,
            file: None,
        })
    }

    /// Appends rows; returns the length before them, to cut back to on failure.
    pub fn append(&mut self, rows: &[Vec<Option<String>>]) -> anyhow::Result<u64> {
        let header = self.header;
        self.append_with(|out, needs_header| {
            let mut writer = csv::Writer::from_writer(out);
            if needs_header {
                writer.write_record(header)?;
            }
            for row in rows {
                writer.write_record(row.iter().map(|f| f.as_deref().unwrap_or("")))?;
            }
            writer.flush()?;
            Ok(0)
        })
    }

    /// Appends what `write` streams (given whether the file needs its header), flushed and
    /// synced; returns the length before, to cut back to if what follows fails. A failed
    /// write is cut back here.
    pub fn append_with(
        &mut self,
        write: impl FnOnce(&mut dyn std::io::Write, bool) -> anyhow::Result<u64>,
    ) -> anyhow::Result<u64> {
        let path = self.path.display().to_string();
        let context = || format!("cannot write the archive {path}");
        if self.file.is_none() {
            let file = crate::output::append_private(&self.path).with_context(context)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        let before = file.seek(SeekFrom::End(0)).with_context(context)?;
        let written = (|| -> anyhow::Result<()> {
            let mut out = BufWriter::with_capacity(1 << 20, &*file);
            write(&mut out, before == 0)?;
            std::io::Write::flush(&mut out)?;
            drop(out);
            file.sync_data()?;
            Ok(())
        })();
        if let Err(err) = written {
            self.cut_back(before);
            return Err(err.context(context()));
        }
        Ok(before)
    }

    /// Removes what the failed batch appended.
    pub fn cut_back(&mut self, len: u64) {
        if let Some(file) = &self.file {
            let _ = file.set_len(len);
            let _ = file.sync_data();
        }
    }
}

/// `--archive` and `--archive-comments` name two files: the same file would take tickets and
/// comments under one header, and import back neither.
pub fn check_distinct(tickets: &std::path::Path, comments: Option<&std::path::Path>) -> anyhow::Result<()> {
    // Where a path leads: itself resolved when it exists, else its resolved directory and name.
    fn resolved(path: &std::path::Path) -> PathBuf {
        path.canonicalize().unwrap_or_else(|_| {
            let dir = directory_named(path).unwrap_or(".".as_ref());
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            dir.join(path.file_name().unwrap_or_default())
        })
    }
    match comments {
        Some(comments) if resolved(tickets) == resolved(comments) => Err(crate::exit::UsageError(format!(
            "--archive and --archive-comments name the same file ({}): tickets and comments need an archive each",
            comments.display()
        ))
        .into()),
        _ => Ok(()),
    }
}

/// The directory a path names, if it names one (`a.csv` names none: the working directory).
fn directory_named(path: &std::path::Path) -> Option<&std::path::Path> {
    path.parent().filter(|d| !d.as_os_str().is_empty())
}

fn check_appendable(path: &std::path::Path, header: &[&str]) -> anyhow::Result<()> {
    use std::io::Read as _;
    let shown = path.display();
    let cannot_read = || format!("cannot read the archive {shown}");
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = directory_named(path).filter(|d| !d.is_dir()) {
                anyhow::bail!(
                    "cannot write the archive {shown}: the directory {} does not exist",
                    dir.display()
                );
            }
            return Ok(());
        }
        Err(err) => return Err(err).with_context(cannot_read),
    };
    let len = file.metadata().with_context(cannot_read)?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1))
        .and_then(|_| file.read_exact(&mut last))
        .with_context(cannot_read)?;
    if last[0] != b'\n' {
        anyhow::bail!(
            "the archive {shown} exists and does not end with a line end (a write cut short?): what is appended \
             would join its last line; check that line, or name another file"
        );
    }
    file.seek(SeekFrom::Start(0)).with_context(cannot_read)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(std::io::BufReader::new(file).take(1 << 20));
    let first = reader.records().next().and_then(Result::ok);
    if !first
        .as_ref()
        .is_some_and(|record| record.iter().eq(header.iter().copied()))
    {
        anyhow::bail!(
            "the archive {shown} exists but does not begin with this archive's header ({}): what is appended \
             could not be imported back from it; name another file",
            header.join(",")
        );
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Fields {
    #[diesel(sql_type = Array<Nullable<Text>>)]
    fields: Vec<Option<String>>,
}

/// The rows of `select` (an export query that names the tickets `t`) for the batch's
/// tickets, each as text fields. On partitions each ticket is read in its one partition: by
/// id, every partition was read for each ticket (a purge of 20,000 scattered tickets at 1M:
/// 250-330 ms a 5,000-row batch for this read alone).
fn archive_rows(
    conn: &mut PgConnection,
    select: &str,
    columns: &[&str],
    batch: &BatchTickets<'_>,
) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let fields: Vec<String> = columns.iter().map(|c| format!("q.{c}::text")).collect();
    batch.row_by_row(conn)?;
    let query = sql_query(format!(
        "SELECT ARRAY[{}] AS fields FROM ({select} WHERE {}) q",
        fields.join(", "),
        batch.each_row("t", 2)
    ))
    .into_boxed()
    .bind::<Array<BigInt>, _>(batch.ids);
    let rows: Vec<Fields> = batch.bind_created(query).load(conn)?;
    if batch.by_partition() {
        crate::layout::any_plans(conn)?;
    }
    Ok(rows.into_iter().map(|r| r.fields).collect())
}

pub const TICKET_COLUMNS: &[&str] = &[
    "external_id",
    "subject",
    "description",
    "status",
    "priority",
    "channel",
    "requester_email",
    "requester_name",
    "assignee_email",
    "organization",
    "tags",
    "created_at",
    "updated_at",
    "solved_at",
];
pub const COMMENT_COLUMNS: &[&str] = &[
    "external_id",
    "ticket_external_id",
    "author_email",
    "body",
    "public",
    "created_at",
];

/// Where a batch's archives stood before it: what to cut back to if the batch fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct Marks {
    tickets: Option<u64>,
    comments: Option<u64>,
}

/// Appends the tickets of `batch` to `tickets` and their comments to `comments` (each when
/// given), synced; records in `marks` where each archive stood before.
pub fn archive_batch(
    conn: &mut PgConnection,
    batch: &BatchTickets<'_>,
    tickets: Option<&mut Archive>,
    comments: Option<&mut Archive>,
    marks: &mut Marks,
) -> anyhow::Result<()> {
    if let Some(a) = tickets {
        let select = crate::export::tickets_select(batch.layout);
        let rows = archive_rows(conn, &select, TICKET_COLUMNS, batch)?;
        marks.tickets = Some(a.append(&rows)?);
    }
    if let Some(a) = comments {
        let rows = archive_rows(conn, crate::export::COMMENTS_SELECT, COMMENT_COLUMNS, batch)?;
        marks.comments = Some(a.append(&rows)?);
    }
    Ok(())
}

/// Appends the tickets and comments staged by [`crate::export::stage_partition`] to the
/// archives, by `COPY … TO` (checked against the rows staged), synced; records in `marks` where
/// each archive stood before. Returns how many tickets it archived.
pub fn archive_staged(
    conn: &mut PgConnection,
    tickets: &mut Archive,
    comments: Option<&mut Archive>,
    marks: &mut Marks,
) -> anyhow::Result<u64> {
    use crate::export::{Dataset, copy_staged};
    let mut archived = 0;
    marks.tickets = Some(tickets.append_with(|out, header| {
        archived = copy_staged(conn, Dataset::Tickets, header, out)?;
        Ok(archived)
    })?);
    if let Some(a) = comments {
        marks.comments = Some(a.append_with(|out, header| copy_staged(conn, Dataset::Comments, header, out))?);
    }
    Ok(archived)
}

/// Cuts the archives back to `marks` after the batch that appended to them failed.
pub fn cut_back(tickets: Option<&mut Archive>, comments: Option<&mut Archive>, marks: Marks) {
    if let (Some(a), Some(len)) = (tickets, marks.tickets) {
        a.cut_back(len);
    }
    if let (Some(a), Some(len)) = (comments, marks.comments) {
        a.cut_back(len);
    }
}

/// The directory a run's relative archive paths are relative to, recorded with the operation
/// so that `undo` can name the archives wherever it runs (None when it has no UTF-8 name).
pub fn working_directory() -> Option<String> {
    std::env::current_dir()
        .ok()
        .and_then(|dir| dir.to_str().map(str::to_owned))
}
