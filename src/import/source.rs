//! Reading a CSV dump: which column holds which field, decoding, and each record's position
//! (record number, line, byte offset) so that errors and checkpoints can point at it.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use csv::ByteRecord;

use super::bounded::{BoundedReader, Oversized};
pub use super::columns::{ColumnMap, ValueMap, header_key};

/// One field an import kind understands.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    pub name: &'static str,
    pub required: bool,
    /// Stored in or looked up through a B-tree index, whose entries hold at most ~2,700
    /// bytes: longer values are rejected (`MAX_INDEXED_BYTES`) rather than fail the batch.
    pub indexed: bool,
    /// A list (tags): several columns may feed it (Jira writes one `Labels` column per
    /// label), their values joined with the list separator.
    pub list: bool,
}

impl FieldSpec {
    /// A field a row may leave empty or the file may lack.
    pub const fn optional(name: &'static str) -> FieldSpec {
        FieldSpec {
            name,
            required: false,
            indexed: false,
            list: false,
        }
    }

    /// A field every row must have.
    pub const fn required(name: &'static str) -> FieldSpec {
        FieldSpec {
            required: true,
            ..FieldSpec::optional(name)
        }
    }

    /// Kept in or looked up through an index (see `MAX_INDEXED_BYTES`).
    pub const fn indexed(self) -> FieldSpec {
        FieldSpec { indexed: true, ..self }
    }

    /// A list that several columns may feed (see `list`).
    pub const fn list(self) -> FieldSpec {
        FieldSpec { list: true, ..self }
    }
}

/// The longest value accepted for an indexed field, in bytes.
pub const MAX_INDEXED_BYTES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    Latin1,
    /// Windows' Western code page: Latin-1 but for 0x80-0x9F, where Latin-1 has control
    /// characters and Windows has € ‚ „ … “ ” ‘ ’ – — ™ and the like — what a Windows
    /// program's "ANSI" CSV export holds.
    Windows1252,
}

/// What Windows-1252 has at 0x80-0x9F (its five unassigned bytes stay the Latin-1 control
/// characters, as WHATWG's decoder keeps them).
const WINDOWS_1252_HIGH: [char; 32] = [
    '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{2C6}', '\u{2030}',
    '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}', '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}',
    '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}',
    '\u{17E}', '\u{178}',
];

impl Encoding {
    pub fn parse(name: &str) -> Result<Encoding, String> {
        match name.to_ascii_lowercase().replace(['-', '_', ' '], "").as_str() {
            "utf8" => Ok(Encoding::Utf8),
            "latin1" | "iso88591" | "l1" => Ok(Encoding::Latin1),
            "windows1252" | "cp1252" | "win1252" => Ok(Encoding::Windows1252),
            _ => Err(format!(
                "unsupported encoding {name:?} (use utf-8, latin1 or windows-1252)"
            )),
        }
    }

    /// Whether each byte is one character (every encoding but UTF-8).
    pub fn single_byte(self) -> bool {
        self != Encoding::Utf8
    }

    /// The text of `bytes`, invalid UTF-8 replaced (for headers and keys; fields are checked).
    pub fn decode_lossy(self, bytes: &[u8]) -> Cow<'_, str> {
        match self {
            Encoding::Utf8 => String::from_utf8_lossy(bytes),
            single_byte => Cow::Owned(single_byte.decode_single_byte(bytes)),
        }
    }

    /// The text of `bytes` in a single-byte encoding (UTF-8 is checked by the caller).
    pub fn decode_single_byte(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Windows1252 => bytes
                .iter()
                .map(|&b| match b {
                    0x80..=0x9F => WINDOWS_1252_HIGH[usize::from(b - 0x80)],
                    _ => char::from(b),
                })
                .collect(),
            Encoding::Utf8 | Encoding::Latin1 => bytes.iter().map(|&b| char::from(b)).collect(),
        }
    }
}

/// Where the input comes from.
#[derive(Debug, Clone)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    pub fn from_arg(arg: &str) -> Input {
        if arg == "-" {
            Input::Stdin
        } else {
            Input::File(PathBuf::from(arg))
        }
    }

    pub fn display(&self) -> String {
        match self {
            Input::Stdin => "-".into(),
            Input::File(path) => path.display().to_string(),
        }
    }

    pub fn size(&self) -> Option<u64> {
        match self {
            Input::Stdin => None,
            Input::File(path) => std::fs::metadata(path).ok().map(|m| m.len()),
        }
    }
}

/// A problem with one input record: what and where, grouped in the summary by `reason`.
#[derive(Debug, Clone)]
pub struct RowError {
    pub column: Option<String>,
    /// A short, stable reason used to group errors ("invalid status").
    pub reason: String,
    /// The full message for the rejects file.
    pub message: String,
}

impl RowError {
    pub fn new(column: Option<&str>, reason: &str, message: impl Into<String>) -> RowError {
        RowError {
            column: column.map(str::to_string),
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    pub fn describe(&self) -> String {
        match &self.column {
            Some(column) => format!("column {column}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// The fields of one record, decoded on demand.
pub struct RecordFields<'a> {
    pub record: &'a ByteRecord,
    pub columns: &'a ColumnMap,
    pub fields: &'a [FieldSpec],
    pub encoding: Encoding,
    pub value_map: &'a ValueMap,
}

impl<'a> RecordFields<'a> {
    /// The trimmed text of field `index`, or `None` when the file has no such column.
    pub fn get(&self, index: usize) -> Result<Option<Cow<'a, str>>, RowError> {
        let Some(column) = self.columns.positions[index] else {
            return Ok(None);
        };
        if self.fields[index].list && self.columns.more.iter().any(|(f, _)| *f == index) {
            return self.joined(index, column).map(Some);
        }
        self.column_text(index, column).map(Some)
    }

    /// A list field fed by several columns: their non-empty values joined.
    fn joined(&self, index: usize, first: usize) -> Result<Cow<'a, str>, RowError> {
        let mut values = Vec::new();
        let columns =
            std::iter::once(first).chain(self.columns.more.iter().filter(|(f, _)| *f == index).map(|(_, c)| *c));
        for column in columns {
            let value = self.column_text(index, column)?;
            if !value.is_empty() {
                values.push(value);
            }
        }
        Ok(Cow::Owned(values.join(&self.columns.list_separator.to_string())))
    }

    /// The trimmed, checked text of one column, read as field `index`.
    fn column_text(&self, index: usize, column: usize) -> Result<Cow<'a, str>, RowError> {
        let name = self.fields[index].name;
        let bytes = self.record.get(column).unwrap_or(b"");
        if let Some(at) = bytes.iter().position(|&b| b == 0) {
            // Valid UTF-8, but PostgreSQL's text cannot hold it: the whole COPY would fail.
            return Err(RowError::new(
                Some(name),
                "NUL byte",
                format!(
                    "a NUL byte (0x00) at byte {} of the field, which PostgreSQL text cannot store",
                    at + 1
                ),
            ));
        }
        let text = match self.encoding {
            Encoding::Utf8 => match std::str::from_utf8(bytes) {
                Ok(s) => Cow::Borrowed(s.trim()),
                Err(e) => {
                    return Err(RowError::new(
                        Some(name),
                        "invalid UTF-8",
                        format!(
                            "invalid UTF-8 at byte {} of the field (use --encoding windows-1252 or latin1 for such files)",
                            e.valid_up_to() + 1
                        ),
                    ));
                }
            },
            single_byte => Cow::Owned(single_byte.decode_single_byte(bytes).trim().to_string()),
        };
        let text = self.value_map.apply(name, text);
        if self.fields[index].indexed && text.len() > MAX_INDEXED_BYTES {
            return Err(RowError::new(
                Some(name),
                "value too long",
                format!(
                    "{name} is {} bytes long; at most {MAX_INDEXED_BYTES} are allowed for a value kept in an index",
                    text.len()
                ),
            ));
        }
        Ok(text)
    }

    /// Like `get`, but an empty or absent value is `None`.
    pub fn non_empty(&self, index: usize) -> Result<Option<Cow<'a, str>>, RowError> {
        Ok(self.get(index)?.filter(|v| !v.is_empty()))
    }

    /// A required non-empty value.
    pub fn required(&self, index: usize) -> Result<Cow<'a, str>, RowError> {
        let name = self.fields[index].name;
        self.non_empty(index)?
            .ok_or_else(|| RowError::new(Some(name), "missing required value", format!("{name} is empty")))
    }

    /// Applies a parser and attaches the column name to its error.
    pub fn parse<T>(
        &self,
        index: usize,
        reason: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, RowError> {
        let value = self.get(index)?.unwrap_or(Cow::Borrowed(""));
        parse(&value).map_err(|message| RowError::new(Some(self.fields[index].name), reason, message))
    }
}

/// Where a record stands in the input. `byte_end` is where the next record starts: the
/// point to resume from once this record's batch is committed.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Position {
    pub record: u64,
    pub line: u64,
    pub byte: u64,
}

/// A record as read: where it starts, where the next one starts, and what is wrong with its
/// shape (cut fields, no line end).
#[derive(Debug, Clone, Copy)]
pub struct ReadRecord {
    pub line: u64,
    pub after: Position,
    pub oversized: Option<Oversized>,
    pub unterminated: bool,
}

/// A CSV reader over a file or stdin that reports absolute positions, also after a resume,
/// and holds no field beyond `max_field_size` bytes.
pub struct CsvSource {
    reader: BoundedReader<Box<dyn Read + Send>>,
    /// The file's own bytes read so far, and whether they are compressed (then the progress
    /// bar, over the file's size, follows them rather than the CSV's position).
    consumed: Arc<AtomicU64>,
    compressed: bool,
    /// Added to the reader's own positions (BOM, or where a resume started).
    base: Position,
    pub header: Vec<String>,
    pub raw_header: ByteRecord,
    records_read: u64,
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

impl CsvSource {
    /// Opens the input and reads its header. With `resume_at`, continues after that
    /// position (the header is still read from the start of the file).
    pub fn open(
        input: &Input,
        delimiter: u8,
        encoding: Encoding,
        max_field_size: usize,
        resume_at: Option<Position>,
    ) -> anyhow::Result<CsvSource> {
        let consumed = Arc::new(AtomicU64::new(0));
        let counter = |consumed: &Arc<AtomicU64>| -> OnRead {
            let consumed = consumed.clone();
            Box::new(move |n| {
                consumed.fetch_add(n, Ordering::Relaxed);
            })
        };
        let (mut raw, compression) = match input {
            Input::Stdin => {
                decode(Box::new(io::stdin()), counter(&consumed)).context("cannot read the standard input")?
            }
            Input::File(path) => open_decoded(path, counter(&consumed))?,
        };
        let mut start = 0u64;
        // Skip a UTF-8 byte order mark at the byte level: the csv parser would otherwise see it
        // as part of the first field, and a quoted first header would not parse as quoted.
        let mut first = [0u8; 3];
        let got = read_up_to(&mut raw, &mut first)?;
        let rest: Box<dyn Read + Send> = if got == 3 && first == UTF8_BOM {
            start = 3;
            raw
        } else {
            Box::new(io::Cursor::new(first[..got].to_vec()).chain(raw))
        };
        let mut reader = BoundedReader::new(rest, delimiter, max_field_size);
        let mut raw_header = ByteRecord::new();
        match reader
            .read_record(&mut raw_header)
            .with_context(|| format!("cannot read {}", input.display()))?
        {
            None => raw_header.clear(),
            Some(end) if end.oversized.is_some() => bail!(
                "{}: the header is longer than --max-field-size ({max_field_size} bytes): is this a CSV file?",
                input.display()
            ),
            Some(_) => {}
        }
        let header: Vec<String> = raw_header
            .iter()
            .map(|h| encoding.decode_lossy(h).trim().to_string())
            .collect();
        let mut base = Position {
            record: 0,
            line: 0,
            byte: start,
        };
        if let Some(at) = resume_at {
            let Input::File(path) = input else {
                bail!("--resume needs a file, not stdin")
            };
            consumed.store(0, Ordering::Relaxed);
            let (mut resumed, how) = open_decoded(path, counter(&consumed))?;
            if how == Compression::None {
                // A plain file is sought; a compressed one is decompressed up to the position.
                let mut file = open_file(path)?;
                file.seek(SeekFrom::Start(at.byte))
                    .with_context(|| format!("cannot seek in {}", path.display()))?;
                resumed = Box::new(io::BufReader::with_capacity(super::bounded::INPUT_BUFFER, file));
            } else {
                let skipped = io::copy(&mut resumed.by_ref().take(at.byte), &mut io::sink())
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if skipped < at.byte {
                    bail!(
                        "{} is shorter than where the import stopped: not the same file",
                        path.display()
                    );
                }
            }
            reader = BoundedReader::new(resumed, delimiter, max_field_size);
            base = at;
        }
        let records_read = base.record;
        Ok(CsvSource {
            consumed,
            compressed: compression != Compression::None,
            reader,
            base,
            header,
            raw_header,
            records_read,
        })
    }

    /// Where a progress bar over the input file's size stands after `after`.
    pub fn progress_position(&self, after: Position) -> u64 {
        if self.compressed {
            self.consumed.load(Ordering::Relaxed)
        } else {
            after.byte
        }
    }

    /// Reads the next record into `record`, or `None` at the end of the input.
    pub fn next(&mut self, record: &mut ByteRecord) -> anyhow::Result<Option<ReadRecord>> {
        let Some(end) = self.reader.read_record(record).context("cannot read the input")? else {
            return Ok(None);
        };
        self.records_read += 1;
        // The reader counts lines from 1 at its own start; a resumed reader starts at `base`.
        let absolute = |line: u64| {
            if self.base.line == 0 {
                line
            } else {
                self.base.line + line - 1
            }
        };
        Ok(Some(ReadRecord {
            line: absolute(end.start_line),
            after: Position {
                record: self.records_read,
                line: absolute(end.end_line),
                byte: self.base.byte + end.end_byte,
            },
            oversized: end.oversized,
            unterminated: end.unterminated,
        }))
    }
}

/// Called with the number of the file's own bytes each read consumed.
pub type OnRead = Box<dyn FnMut(u64) + Send>;

/// Counts the file's own bytes as they are read (under a decompressor: the compressed bytes).
struct CountingReader<R> {
    inner: R,
    on_read: OnRead,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// How an input file is compressed, from its first bytes (not its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Opens an input file for reading its CSV: decompressed when it is gzip or zstd (told by
/// its content, so `dump.csv.gz` and a gzip named `dump.csv` both work). `on_read` is told the
/// file's own bytes consumed, for a progress bar over the file's size.
pub fn open_decoded(path: &Path, on_read: OnRead) -> anyhow::Result<(Box<dyn Read + Send>, Compression)> {
    let mut file = open_file(path)?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic).with_context(|| format!("cannot read {}", path.display()))?;
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("cannot seek in {}", path.display()))?;
    let counted = CountingReader {
        inner: io::BufReader::with_capacity(super::bounded::INPUT_BUFFER, file),
        on_read,
    };
    decoder(Box::new(counted), &magic[..n]).with_context(|| format!("cannot read {}", path.display()))
}

/// Like `open_decoded`, for a stream that cannot seek (stdin): the bytes read to tell the
/// compression are put back in front of the rest.
fn decode(mut stream: Box<dyn Read + Send>, on_read: OnRead) -> anyhow::Result<(Box<dyn Read + Send>, Compression)> {
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut stream, &mut magic)?;
    let whole = io::Cursor::new(magic[..n].to_vec()).chain(stream);
    let counted = CountingReader {
        inner: io::BufReader::with_capacity(super::bounded::INPUT_BUFFER, whole),
        on_read,
    };
    decoder(Box::new(counted), &magic[..n])
}

/// The decompressing reader the first bytes (`magic`) call for.
fn decoder(counted: Box<dyn Read + Send>, magic: &[u8]) -> anyhow::Result<(Box<dyn Read + Send>, Compression)> {
    Ok(match magic {
        [0x1f, 0x8b, ..] => (Box::new(flate2::read::MultiGzDecoder::new(counted)), Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd] => (Box::new(zstd::stream::read::Decoder::new(counted)?), Compression::Zstd),
        _ => (counted, Compression::None),
    })
}

fn open_file(path: &Path) -> anyhow::Result<File> {
    File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A one-byte delimiter from the command line (`,`, `;`, `\t` or `tab`).
pub fn parse_delimiter(value: &str) -> Result<u8, String> {
    match value {
        "\\t" | "tab" | "\t" => Ok(b'\t'),
        v if v.len() == 1 && v.is_ascii() => Ok(v.as_bytes()[0]),
        _ => Err(format!("the delimiter must be one ASCII character, not {value:?}")),
    }
}
