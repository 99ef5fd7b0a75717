//! Fingerprints of input records: what lets a re-import skip the records that did not change
//! without parsing them or reading their tickets back.
//!
//! A ticket written by an import stores the fingerprint of the record that wrote it
//! (`tickets.import_fingerprint`). It stands for "this record, read with this column mapping
//! and these options, made this ticket as it is": the record's fields and everything that
//! decides what they become (the header's column mapping, value maps, date formats, time zone,
//! encoding, tag separator, the kind's own options such as `--undelete`), and a version bumped
//! whenever parsing or normalising changes. The database forgets a fingerprint as soon as
//! anything it vouches for changes (triggers, see the migration `import_fingerprint`), so a
//! record whose fingerprint is the stored one would find its ticket unchanged: it is counted
//! as such and goes no further.
//!
//! The hash is XXH3-128, not a cryptographic one: the reader hashes every record, and at
//! 128 bits two different records of real data colliding is not a concern (a crafted record
//! could only make itself be skipped, which its author can do by leaving it out).

use csv::ByteRecord;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Bumped whenever the same record with the same options could be imported differently.
const VERSION: &str = "ticketops import fingerprint 1";

pub type Fingerprint = [u8; 16];

/// Computes the fingerprints of one import's records.
#[derive(Clone)]
pub struct Fingerprinter {
    seed: u64,
}

impl Fingerprinter {
    /// For records read with `settings`: a description of everything besides a record's own
    /// fields that decides what it becomes (see the module's comment).
    pub fn new(settings: &str) -> Fingerprinter {
        Fingerprinter {
            seed: xxh3_64(format!("{VERSION}\n{settings}").as_bytes()),
        }
    }

    /// The fingerprint of one record: its fields' bytes and where each ends.
    pub fn of(&self, record: &ByteRecord) -> Fingerprint {
        let mut hasher = Xxh3::with_seed(self.seed);
        hasher.update(record.as_slice());
        for field in record.iter() {
            hasher.update(&(field.len() as u32).to_le_bytes());
        }
        hasher.digest128().to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_settings_and_field_bounds_all_count() {
        let a = Fingerprinter::new("columns A");
        let record = ByteRecord::from(vec!["T-1", "Printer", "open"]);
        assert_eq!(a.of(&record), a.of(&record.clone()));
        assert_ne!(a.of(&record), Fingerprinter::new("columns B").of(&record));
        assert_ne!(a.of(&record), a.of(&ByteRecord::from(vec!["T-1", "Printer", "opem"])));
        // The same bytes split into other fields.
        assert_ne!(a.of(&record), a.of(&ByteRecord::from(vec!["T-1P", "rinter", "open"])));
    }
}
