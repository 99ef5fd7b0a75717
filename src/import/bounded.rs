//! A CSV record reader whose memory does not follow the input: no field is held beyond
//! `--max-field-size` bytes, whatever the file holds.
//!
//! The csv crate's reader grows its record buffer to fit the largest field, so one 300 MB
//! description cost 300 MB and more. This reader drives `csv_core` (the parser underneath the
//! csv crate, with the same defaults: `"` quotes, doubled quotes, CR, LF or CRLF line ends)
//! through a fixed scratch buffer and copies each field into the record only up to the
//! limit; the rest of an oversized field is parsed and dropped. Such a record comes back cut,
//! marked `oversized`, for the caller to reject.

use std::io::{self, Read};

use csv::ByteRecord;

/// Input is read in chunks of this size, also by the buffered readers below this one (the
/// file, a decompressor's input): 256 KiB reads are as fast as 1 MiB reads and hold less.
pub(super) const INPUT_BUFFER: usize = 256 << 10;
/// csv_core writes field bytes here before they are copied into the record.
const SCRATCH: usize = 64 << 10;

/// A field (or record) over the limit: which field, and how long it really was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    /// 0-based index of the first field over the limit (or where the record went over it).
    pub field: usize,
    /// That field's full length in bytes.
    pub len: u64,
    /// The whole record is over the limit, though no one field is.
    pub whole_record: bool,
}

/// What is known of a record besides its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordEnd {
    /// The line the record starts on (as the csv crate counts: after the previous record).
    pub start_line: u64,
    /// The line after the record, and the byte offset (from where this reader started)
    /// where the next record begins.
    pub end_line: u64,
    pub end_byte: u64,
    /// Fields were cut: the record is not to be imported.
    pub oversized: Option<Oversized>,
    /// The input ended inside this record, with no line end after it.
    pub unterminated: bool,
}

pub struct BoundedReader<R> {
    core: csv_core::Reader,
    input: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    eof: bool,
    scratch: Box<[u8]>,
    ends: Box<[usize]>,
    field: Vec<u8>,
    max_field: usize,
    consumed: u64,
}

impl<R: Read> BoundedReader<R> {
    pub fn new(input: R, delimiter: u8, max_field: usize) -> BoundedReader<R> {
        BoundedReader {
            core: csv_core::ReaderBuilder::new().delimiter(delimiter).build(),
            input,
            buf: vec![0; INPUT_BUFFER].into_boxed_slice(),
            pos: 0,
            len: 0,
            eof: false,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            ends: vec![0; 256].into_boxed_slice(),
            field: Vec::new(),
            max_field: max_field.max(1),
            consumed: 0,
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos < self.len || self.eof {
            return Ok(());
        }
        self.pos = 0;
        self.len = loop {
            match self.input.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if self.len == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// Reads the next record into `record`; `None` at the end of the input.
    pub fn read_record(&mut self, record: &mut ByteRecord) -> io::Result<Option<RecordEnd>> {
        use csv_core::ReadRecordResult::*;
        record.clear();
        self.field.clear();
        self.skip_line_ends()?;
        let start_line = self.core.line();
        let mut field_len: u64 = 0;
        let mut record_kept: usize = 0;
        let mut oversized: Option<Oversized> = None;
        // csv_core counts a record's output bytes from its start across calls; `ends` are
        // offsets in that count.
        let mut output_before: usize = 0;
        loop {
            self.fill()?;
            let input = &self.buf[self.pos..self.len];
            let at_eof = input.is_empty();
            let (result, nin, nout, nend) = self.core.read_record(input, &mut self.scratch, &mut self.ends);
            self.pos += nin;
            self.consumed += nin as u64;
            let mut from = 0;
            for i in 0..nend {
                let to = self.ends[i] - output_before;
                if self.field.is_empty() && field_len == 0 && to - from <= self.room(record_kept) {
                    // The usual case: the whole field came in this call and fits, so it goes
                    // from the scratch buffer into the record in one copy.
                    record.push_field(&self.scratch[from..to]);
                    record_kept += to - from;
                } else {
                    self.keep(from, to, &mut field_len, &mut record_kept, &mut oversized, record.len());
                    record.push_field(&self.field);
                    if self.field.capacity() > SCRATCH {
                        self.field = Vec::new(); // do not keep a large field's buffer
                    }
                    self.field.clear();
                    field_len = 0;
                }
                from = to;
            }
            self.keep(
                from,
                nout,
                &mut field_len,
                &mut record_kept,
                &mut oversized,
                record.len(),
            );
            output_before += nout;
            match result {
                InputEmpty | OutputFull | OutputEndsFull => continue,
                Record => {
                    return Ok(Some(RecordEnd {
                        start_line,
                        end_line: self.core.line(),
                        end_byte: self.consumed,
                        oversized,
                        unterminated: at_eof,
                    }));
                }
                End => return Ok(None),
            }
        }
    }

    /// Feeds the parser the line ends before the next record: the `\n` of the last record's
    /// CRLF (the parser ends a record at its `\r`) and empty lines, so that the record's line
    /// is the one it starts on — counted before them, every record of a Windows file was
    /// reported a line early, and one after an empty line on the empty line.
    fn skip_line_ends(&mut self) -> io::Result<()> {
        loop {
            self.fill()?;
            if self.pos >= self.len || !matches!(self.buf[self.pos], b'\n' | b'\r') {
                return Ok(());
            }
            let (_, nin, _, _) =
                self.core
                    .read_record(&self.buf[self.pos..self.pos + 1], &mut self.scratch, &mut self.ends);
            if nin == 0 {
                return Ok(());
            }
            self.pos += nin;
            self.consumed += nin as u64;
        }
    }

    /// How many bytes one more field may keep, given what the record kept so far.
    fn room(&self, record_kept: usize) -> usize {
        self.max_field.min((2 * self.max_field).saturating_sub(record_kept))
    }

    /// Copies `scratch[from..to]` into the current field, as far as the limits allow.
    fn keep(
        &mut self,
        from: usize,
        to: usize,
        field_len: &mut u64,
        record_kept: &mut usize,
        oversized: &mut Option<Oversized>,
        field_index: usize,
    ) {
        let bytes = &self.scratch[from..to];
        *field_len += bytes.len() as u64;
        // One field at most max_field bytes, and all of a record's fields together too
        // (twice that), so that many large fields cannot add up either.
        let field_room = self.max_field.saturating_sub(self.field.len());
        let record_room = (2 * self.max_field).saturating_sub(*record_kept);
        let take = bytes.len().min(field_room).min(record_room);
        self.field.extend_from_slice(&bytes[..take]);
        *record_kept += take;
        if take < bytes.len() && oversized.is_none() {
            *oversized = Some(Oversized {
                field: field_index,
                len: 0,
                whole_record: field_room > take,
            });
        }
        if let Some(o) = oversized.as_mut()
            && o.field == field_index
        {
            o.len = *field_len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], max: usize) -> Vec<(Vec<Vec<u8>>, RecordEnd)> {
        let mut reader = BoundedReader::new(input, b',', max);
        let mut record = ByteRecord::new();
        let mut out = Vec::new();
        while let Some(end) = reader.read_record(&mut record).unwrap() {
            out.push((record.iter().map(|f| f.to_vec()).collect(), end));
        }
        out
    }

    /// The same records, end lines and offsets as the csv crate's reader, and each record's
    /// own first line (the csv crate counts a record after CRLF or an empty line from the line
    /// before).
    #[test]
    fn reads_like_the_csv_crate() {
        let input = b"a,b,c\r\n\"x\"\"y\",\"multi\nline\",3\n\n1,2\r\nlast,\"q\"";
        let mut csv_reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(&input[..]);
        let mut expected = Vec::new();
        let mut record = ByteRecord::new();
        while csv_reader.read_byte_record(&mut record).unwrap() {
            let fields: Vec<Vec<u8>> = record.iter().map(|f| f.to_vec()).collect();
            let after = csv_reader.position().clone();
            expected.push((fields, after.line(), after.byte()));
        }
        let first_lines = [1, 2, 5, 6];
        let expected: Vec<_> = expected
            .into_iter()
            .zip(first_lines)
            .map(|((fields, end_line, end_byte), start_line)| (fields, start_line, end_line, end_byte))
            .collect();
        let got: Vec<_> = read_all(input, 100)
            .into_iter()
            .map(|(f, e)| (f, e.start_line, e.end_line, e.end_byte))
            .collect();
        assert_eq!(got, expected);
        let ends: Vec<bool> = read_all(input, 100).iter().map(|(_, e)| e.unterminated).collect();
        assert_eq!(ends, vec![false, false, false, true]);
    }

    #[test]
    fn a_field_over_the_limit_is_cut_and_marked_with_its_length() {
        let big = "x".repeat(200_000);
        let input = format!("id,body\n1,{big}\n2,ok\n");
        let records = read_all(input.as_bytes(), 1000);
        assert_eq!(records.len(), 3);
        let (fields, end) = &records[1];
        assert_eq!(fields[0], b"1");
        assert_eq!(fields[1].len(), 1000);
        assert_eq!(
            end.oversized,
            Some(Oversized {
                field: 1,
                len: 200_000,
                whole_record: false
            })
        );
        assert_eq!(records[2].0, vec![b"2".to_vec(), b"ok".to_vec()]);
        assert_eq!(records[2].1.oversized, None);
    }

    #[test]
    fn many_fields_under_the_limit_cannot_add_up() {
        let field = "y".repeat(900);
        let input = [field.as_str(); 10].join(",");
        let records = read_all(input.as_bytes(), 1000);
        let kept: usize = records[0].0.iter().map(Vec::len).sum();
        assert!(kept <= 2000, "{kept}");
        assert!(records[0].1.oversized.is_some_and(|o| o.whole_record));
    }
}
