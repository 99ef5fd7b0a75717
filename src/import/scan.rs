//! The one pass over an input file before importing it: its SHA-256 (the file's identity for
//! `--resume`), and which keys occur more than once, with the record of their last occurrence.
//!
//! "The last occurrence wins" must hold across batches: an earlier occurrence in another
//! batch would otherwise be written and then overwritten, so that a second import of the same
//! file rewrites rows instead of changing nothing. The keys seen are kept only as bits of a
//! Bloom filter while scanning (a fixed size, however many keys: a set of their hashes took
//! 18 MB at a million keys). A key the filter has seen before goes into the map of repeated
//! keys, with the key itself: every key that repeats is there (a filter never misses a key it
//! saw), and so are the few that only looked seen; for those the "last occurrence" is their
//! only one, which makes no row a duplicate, and neither can a hash collision, since the map
//! holds the keys.

use std::collections::HashMap;
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::io::{self, Read};
use std::path::Path;

use anyhow::Context as _;
use csv::ByteRecord;
use sha2::{Digest, Sha256};

use super::Latin1Check;
use super::bounded::BoundedReader;
use super::entities::PreHashed;
use super::source::ColumnMap;
use super::{ImportKind, ImportOptions};
use crate::exit::UsageError;

/// Beyond this many keys in the map of repeated ones the scan stops tracking them (memory), and
/// duplicates in different batches are then found only when the later one is written.
pub const MAX_TRACKED_KEYS: usize = 1_500_000;

/// A guess at the bytes per record, to size the filter.
const BYTES_PER_RECORD_GUESS: u64 = 200;

/// The Bloom filter of the keys seen: 16 bits a key expected (under 0.1 % false positives with
/// 7 probes), from 1 MiB to 16 MiB (10,000,000 keys: 13 bits a key, about 0.3 %).
struct SeenKeys {
    bits: Vec<u64>,
    mask: u64,
}

impl SeenKeys {
    const PROBES: u64 = 7;

    fn for_keys(expected: u64) -> SeenKeys {
        let bits = (expected.saturating_mul(16))
            .next_power_of_two()
            .clamp(1 << 23, 1 << 27);
        SeenKeys {
            bits: vec![0; (bits / 64) as usize],
            mask: bits - 1,
        }
    }

    /// Adds a key by its 64-bit hash; false when it was (probably) there already.
    fn insert(&mut self, hash: u64) -> bool {
        // Double hashing: the probes step by the hash's high half (odd, so they never repeat).
        let (mut at, step) = (hash, (hash >> 32) | 1);
        let mut new = false;
        for _ in 0..Self::PROBES {
            let bit = at & self.mask;
            let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            new |= self.bits[word] & mask == 0;
            self.bits[word] |= mask;
            at = at.wrapping_add(step);
        }
        new
    }
}

/// The last occurrence of a key that occurs more than once.
#[derive(Debug, Clone)]
pub struct LastOccurrence {
    pub record: u64,
    pub key: String,
}

/// The keys that occur more than once, by their `key_hash` (a hash already: not hashed again).
pub(crate) type Repeated = HashMap<u64, LastOccurrence, BuildHasherDefault<PreHashed>>;

pub fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

pub struct Scan {
    pub sha256: String,
    /// For each key that occurs more than once: where it occurs last. `None` when the keys
    /// could not be tracked (no key column, or too many keys).
    pub(crate) last_of_repeated: Option<Repeated>,
    pub untracked_reason: Option<String>,
}

/// The SHA-256 of the file at `path`, as lower-case hex.
fn sha256_of(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; super::bounded::INPUT_BUFFER];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Scans `path` as an input of import kind `K` read with `options`. The hash is computed on
/// a second thread: both halves take about as long, and the import waits for the scan.
pub fn scan_file<K: ImportKind>(
    path: &Path,
    options: &ImportOptions,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Scan> {
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| sha256_of(path));
        let keys = scan_keys::<K>(path, options, progress);
        let sha256 = hashing
            .join()
            .expect("the hashing thread does not panic")
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (last_of_repeated, untracked_reason) = keys?;
        Ok(Scan {
            sha256,
            last_of_repeated,
            untracked_reason,
        })
    })
}

type ScannedKeys = (Option<Repeated>, Option<String>);

fn scan_keys<K: ImportKind>(
    path: &Path,
    options: &ImportOptions,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<ScannedKeys> {
    let (delimiter, encoding, fields) = (options.delimiter, options.encoding, K::FIELDS);
    let key_field = K::KEY_FIELD;
    let on_read = progress.clone();
    let (decoded, _) = super::source::open_decoded(path, Box::new(move |n| on_read.inc(n)))?;
    let mut reader = BoundedReader::new(decoded, delimiter, options.max_field_size);
    let mut record = ByteRecord::new();
    let read_error = || format!("cannot read {}", path.display());

    // The key's column, from the header (a bad header is reported by the import itself).
    let mut key_column = None;
    if reader.read_record(&mut record).with_context(read_error)?.is_some() {
        let header: Vec<String> = record
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let h = if i == 0 {
                    h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h)
                } else {
                    h
                };
                encoding.decode_lossy(h).trim().trim_matches('"').to_string()
            })
            .collect();
        if let (Some(field), Ok(columns)) = (
            key_field,
            ColumnMap::resolve(&header, fields, &options.mapping, options.tag_separator),
        ) {
            key_column = columns.positions[field].map(|c| (c, columns.header_len));
        }
    }
    let mut untracked_reason = key_column.is_none().then(|| "the file has no key column".to_string());
    let expected_records = std::fs::metadata(path)
        .map(|m| m.len() / BYTES_PER_RECORD_GUESS)
        .unwrap_or(0);
    let mut seen = SeenKeys::for_keys(expected_records);
    let mut repeated = Repeated::default();
    let mut record_no = 0u64;
    let mut latin1 = encoding.single_byte().then(Latin1Check::default);
    while let Some(end) = reader.read_record(&mut record).with_context(read_error)? {
        record_no += 1;
        if let Some(check) = latin1.as_mut() {
            check.look_at(&record);
        }
        let Some((column, header_len)) = key_column else {
            if latin1.is_some() {
                continue;
            }
            break; // nothing to track (the hash is read apart)
        };
        if record.len() != header_len || end.oversized.is_some() {
            continue; // rejected on import; it has no reliable key
        }
        // Borrowed all the way for the common case: the scan is on the import's critical path.
        let decoded = encoding.decode_lossy(record.get(column).unwrap_or(b""));
        let key = K::normalize_key(&decoded);
        if key.is_empty() {
            continue;
        }
        let hash = key_hash(&key);
        if !seen.insert(hash) {
            let key = key.into_owned();
            repeated.insert(hash, LastOccurrence { record: record_no, key });
        }
        if repeated.len() > MAX_TRACKED_KEYS {
            key_column = None;
            untracked_reason = Some(format!("more than {MAX_TRACKED_KEYS} repeated keys"));
            seen = SeenKeys::for_keys(0);
            repeated = Repeated::default();
        }
    }
    progress.set_position(0);
    // Read as Latin-1, a UTF-8 file would be stored garbled: refused before anything is written.
    if let Some(warning) = latin1.and_then(|check| check.warning()) {
        return Err(UsageError(format!("{}: {warning}; nothing was imported", path.display())).into());
    }
    let tracked = untracked_reason.is_none();
    Ok((tracked.then_some(repeated), untracked_reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_knows_every_key_it_saw_and_few_it_did_not() {
        let mut seen = SeenKeys::for_keys(100_000);
        let keys: Vec<u64> = (0..100_000).map(|i| key_hash(&format!("T-{i:07}"))).collect();
        assert!(
            keys.iter().all(|&k| seen.insert(k)),
            "each key is new the first time (no collisions here)"
        );
        assert!(keys.iter().all(|&k| !seen.insert(k)), "and seen the second time");
        let strangers = (0..100_000)
            .filter(|i| !seen.insert(key_hash(&format!("X-{i:07}"))))
            .count();
        assert!(strangers < 200, "{strangers} of 100,000 unseen keys looked seen");
    }
}
