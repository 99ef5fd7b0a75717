//! PostgreSQL's binary `COPY` format, written row by row into Diesel's raw-data `COPY`
//! callback. The typed path (`from_insertable`) needs every row built in a `Vec` before the
//! first byte goes out; writing each row as it is made lets the per-row work (cache
//! lookups, freeing the parsed row) overlap with the server ingesting the rows before it.
//!
//! Format: <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>; each
//! field's bytes are what the type's binary send function produces.

use std::io::{self, BufWriter, Write};

use chrono::{DateTime, Utc};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A binary COPY stream: the header on creation, then rows of fields, then `finish`.
pub struct BinaryCopy<W: Write> {
    out: BufWriter<W>,
}

impl<W: Write> BinaryCopy<W> {
    pub fn start(out: W) -> io::Result<Self> {
        // libpq sends each write at once: buffer them.
        let mut out = BufWriter::with_capacity(64 * 1024, out);
        out.write_all(b"PGCOPY\n\xff\r\n\0")?;
        out.write_all(&0i32.to_be_bytes())?; // flags: no OIDs
        out.write_all(&0i32.to_be_bytes())?; // header extension length
        Ok(BinaryCopy { out })
    }

    /// A stream of rows alone, without the header (rows gathered to be sent later with
    /// [`BinaryCopy::raw_rows`]); `flush_rows` instead of `finish` at its end.
    pub fn rows_only(out: W) -> Self {
        BinaryCopy {
            out: BufWriter::with_capacity(64 * 1024, out),
        }
    }

    /// Rows encoded earlier by a [`BinaryCopy::rows_only`] stream.
    pub fn raw_rows(&mut self, rows: &[u8]) -> io::Result<()> {
        self.out.write_all(rows)
    }

    /// Flushes the rows of a [`BinaryCopy::rows_only`] stream (no trailer).
    pub fn flush_rows(mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Starts a row of `fields` fields; exactly that many field calls must follow.
    pub fn row(&mut self, fields: i16) -> io::Result<()> {
        self.out.write_all(&fields.to_be_bytes())
    }

    pub fn null(&mut self) -> io::Result<()> {
        self.out.write_all(&(-1i32).to_be_bytes())
    }

    /// `bigint`.
    pub fn int8(&mut self, value: i64) -> io::Result<()> {
        self.out.write_all(&8i32.to_be_bytes())?;
        self.out.write_all(&value.to_be_bytes())
    }

    pub fn opt_int8(&mut self, value: Option<i64>) -> io::Result<()> {
        match value {
            Some(v) => self.int8(v),
            None => self.null(),
        }
    }

    /// `text`, `varchar` and enum labels (their binary form is the UTF-8 text).
    pub fn text(&mut self, value: &str) -> io::Result<()> {
        let len = i32::try_from(value.len()).map_err(|_| io::Error::other("a text field over 2 GiB"))?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(value.as_bytes())
    }

    pub fn opt_text(&mut self, value: Option<&str>) -> io::Result<()> {
        match value {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// `bytea`: the bytes as they are.
    pub fn opt_bytea(&mut self, value: Option<&[u8]>) -> io::Result<()> {
        match value {
            Some(v) => {
                let len = i32::try_from(v.len()).map_err(|_| io::Error::other("a bytea field over 2 GiB"))?;
                self.out.write_all(&len.to_be_bytes())?;
                self.out.write_all(v)
            }
            None => self.null(),
        }
    }

    /// `timestamptz`: microseconds since PostgreSQL's epoch.
    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> io::Result<()> {
        self.int8(value.timestamp_micros() - PG_EPOCH_MICROS)
    }

    pub fn opt_timestamptz(&mut self, value: Option<DateTime<Utc>>) -> io::Result<()> {
        match value {
            Some(v) => self.timestamptz(v),
            None => self.null(),
        }
    }

    /// Writes the trailer and flushes what is buffered.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.write_all(&(-1i16).to_be_bytes())?;
        self.out.flush()
    }
}

/// The error type of a raw-data COPY callback (Diesel needs `From<diesel::result::Error>`).
pub fn write_error(err: io::Error) -> diesel::result::Error {
    diesel::result::Error::SerializationError(Box::new(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_in_the_binary_format() {
        let mut bytes = Vec::new();
        let mut copy = BinaryCopy::start(&mut bytes).unwrap();
        copy.row(4).unwrap();
        copy.int8(7).unwrap();
        copy.text("é").unwrap();
        copy.opt_text(None).unwrap();
        copy.timestamptz("2000-01-01T00:00:01.5Z".parse().unwrap()).unwrap();
        copy.finish().unwrap();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend([0, 4]); // fields
        expected.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend([0, 0, 0, 2, 0xc3, 0xa9]);
        expected.extend([0xff, 0xff, 0xff, 0xff]); // NULL
        expected.extend([0, 0, 0, 8]);
        expected.extend(1_500_000i64.to_be_bytes()); // µs after 2000-01-01 UTC
        expected.extend([0xff, 0xff]); // trailer
        assert_eq!(bytes, expected);
    }
}
