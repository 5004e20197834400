//! GNU sparse files in PAX form (formats 0.0, 0.1 and 1.0), read as Go's `archive/tar` reads
//! them.
//!
//! A sparse file's tar data holds only its data fragments, packed one after another; a map says
//! where each fragment lies in the file, and everything between reads as zeros. containerd unpacks
//! such a file (through Go's reader) to its full size, so a lazy layer shows it the same way.
//!
//! In a zTOC, Hermes keeps a sparse entry's offset and size on the packed fragments, so entries
//! still tile the tar, and its map in the entry's `GNU.sparse.map` PAX record. Format 1.0 stores
//! its map at the start of the data instead: the builder reads it there and copies it into that
//! record. soci stores the full size instead (its readers would serve the packed bytes as if they
//! were the file), so zTOCs with sparse files are Hermes-only ([`crate::Ztoc::is_soci_compatible`]).
//!
//! The old GNU sparse type (`'S'`) is not handled here: containerd's unpacker has no case for it
//! and fails, so layers with one are refused as a whole.

use std::collections::BTreeMap;
use std::ops::Range;

/// PAX records that describe a sparse file.
pub(crate) const MAJOR: &[u8] = b"GNU.sparse.major";
pub(crate) const MINOR: &[u8] = b"GNU.sparse.minor";
pub(crate) const NAME: &[u8] = b"GNU.sparse.name";
pub(crate) const MAP: &[u8] = b"GNU.sparse.map";
const NUM_BLOCKS: &[u8] = b"GNU.sparse.numblocks";
const SIZE: &[u8] = b"GNU.sparse.size";
const REAL_SIZE: &[u8] = b"GNU.sparse.realsize";

/// Where a sparse format keeps its map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// Formats 0.0 and 0.1: in the PAX records.
    InRecords,
    /// Format 1.0: at the start of the entry's data.
    InData,
}

/// Go's `readGNUSparsePAXHeaders` test: which sparse format the records describe, if any. An
/// unknown version is not sparse (the entry is an ordinary file with odd records), as in Go.
pub(crate) fn version<'a>(record: impl Fn(&[u8]) -> Option<&'a [u8]>) -> Option<Version> {
    let get = |key| record(key).unwrap_or_default();
    match (get(MAJOR), get(MINOR)) {
        (b"0", b"0" | b"1") => Some(Version::InRecords),
        (b"1", b"0") => Some(Version::InData),
        (b"", b"") if !get(MAP).is_empty() => Some(Version::InRecords),
        _ => None,
    }
}

/// The file's full size from the records (`GNU.sparse.size`, else `GNU.sparse.realsize`), or
/// `None` when neither is set; `Err` when the value is not a number.
pub(crate) fn real_size<'a>(record: impl Fn(&[u8]) -> Option<&'a [u8]>) -> Result<Option<i64>, ()> {
    let size = record(SIZE)
        .filter(|v| !v.is_empty())
        .or_else(|| record(REAL_SIZE).filter(|v| !v.is_empty()));
    size.map(|v| crate::gotar::parse_int(v).ok_or(()))
        .transpose()
}

/// A format 0.x map: `GNU.sparse.map` holds `numblocks` pairs, comma-separated.
pub(crate) fn pairs_from_records<'a>(
    record: impl Fn(&[u8]) -> Option<&'a [u8]>,
) -> Option<Vec<(i64, i64)>> {
    let count = crate::gotar::parse_int(record(NUM_BLOCKS).unwrap_or_default())?;
    let map = record(MAP).unwrap_or_default();
    let fields: Vec<&[u8]> = if map.is_empty() {
        Vec::new()
    } else {
        map.split(|&b| b == b',').collect()
    };
    if count < 0 || fields.len() as u64 != 2 * count as u64 {
        return None;
    }
    pairs(&fields)
}

/// Numbers taken two by two as (offset, length).
pub(crate) fn pairs(fields: &[&[u8]]) -> Option<Vec<(i64, i64)>> {
    fields
        .chunks_exact(2)
        .map(|p| {
            Some((
                crate::gotar::parse_int(p[0])?,
                crate::gotar::parse_int(p[1])?,
            ))
        })
        .collect()
}

/// The records a built zTOC entry carries for a map read from format 1.0 data.
pub(crate) fn map_record(pairs: &[(i64, i64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (offset, len)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{offset},{len}").as_bytes());
    }
    out
}

/// Where a sparse file's bytes are: its full size and its data fragments in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    size: u64,
    fragments: Vec<Fragment>,
}

/// One run of data in a sparse file; the rest of the file reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset of the run in the file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Offset of its bytes in the entry's packed data.
    pub data_offset: u64,
}

/// Part of a read from a sparse file, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// This many zero bytes (a hole).
    Zeros(u64),
    /// These bytes of the entry's packed data.
    Data(Range<u64>),
}

/// Why a sparse map cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapError {
    /// The map or size records do not parse.
    Malformed,
    /// Go's `validateSparseEntries` fails: negative, overlapping, unordered or past the end.
    Invalid,
    /// The fragments do not add up to the packed data (Go's reader fails reading the file).
    DataMismatch,
    /// A format 1.0 entry whose map was not copied into its records (a zTOC built by soci).
    Missing,
}

impl MapError {
    pub(crate) fn what(self) -> &'static str {
        match self {
            Self::Malformed => "sparse map does not parse",
            Self::Invalid => "sparse map has negative, overlapping or out-of-range fragments",
            Self::DataMismatch => "sparse map does not add up to the entry's data",
            Self::Missing => "sparse map (format 1.0) is not in the zTOC",
        }
    }
}

impl SparseMap {
    /// Check `pairs` (offset, length) as Go does and place each fragment in `data_len` bytes of
    /// packed data.
    pub(crate) fn new(size: i64, pairs: &[(i64, i64)], data_len: u64) -> Result<Self, MapError> {
        let size = u64::try_from(size).map_err(|_| MapError::Invalid)?;
        let mut fragments = Vec::with_capacity(pairs.len());
        let (mut end, mut packed) = (0u64, 0u64);
        for &(offset, len) in pairs {
            let (Ok(offset), Ok(len)) = (u64::try_from(offset), u64::try_from(len)) else {
                return Err(MapError::Invalid);
            };
            let stop = offset
                .checked_add(len)
                .filter(|&s| s <= size && s <= i64::MAX as u64)
                .ok_or(MapError::Invalid)?;
            if offset < end {
                return Err(MapError::Invalid);
            }
            end = stop;
            if len > 0 {
                fragments.push(Fragment {
                    offset,
                    len,
                    data_offset: packed,
                });
            }
            packed = packed.checked_add(len).ok_or(MapError::Invalid)?;
        }
        if packed != data_len {
            return Err(MapError::DataMismatch);
        }
        Ok(Self { size, fragments })
    }

    /// The file's full size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data fragments in file order (empty ones left out).
    pub fn fragments(&self) -> &[Fragment] {
        &self.fragments
    }

    /// How to assemble bytes `range` of the file (clamped to its size).
    pub fn pieces(&self, range: Range<u64>) -> Vec<Piece> {
        let (mut at, end) = (range.start.min(self.size), range.end.min(self.size));
        let mut out = Vec::new();
        // The first fragment that ends after `at`.
        let first = self.fragments.partition_point(|f| f.offset + f.len <= at);
        for f in &self.fragments[first..] {
            if at >= end {
                break;
            }
            if f.offset >= end {
                break;
            }
            if f.offset > at {
                out.push(Piece::Zeros(f.offset - at));
                at = f.offset;
            }
            let stop = (f.offset + f.len).min(end);
            let skip = at - f.offset;
            out.push(Piece::Data(
                f.data_offset + skip..f.data_offset + skip + (stop - at),
            ));
            at = stop;
        }
        if at < end {
            out.push(Piece::Zeros(end - at));
        }
        out
    }
}

/// The map of an entry's records, for an entry with `data_len` bytes of packed data; `None` when
/// the entry is not sparse.
pub(crate) fn from_records(
    pax: &[(Vec<u8>, Vec<u8>)],
    data_len: u64,
) -> Option<Result<SparseMap, MapError>> {
    // Every regular file is asked: most have no sparse records at all.
    if !pax.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
        return None;
    }
    let records: BTreeMap<&[u8], &[u8]> = pax
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let record = |key: &[u8]| records.get(key).copied();
    let version = version(record)?;
    Some((|| {
        let size = real_size(record)
            .map_err(|()| MapError::Malformed)?
            .ok_or(MapError::Malformed)?;
        let pairs = match version {
            Version::InRecords => pairs_from_records(record).ok_or(MapError::Malformed)?,
            Version::InData => {
                let map = record(MAP).ok_or(MapError::Missing)?;
                let fields: Vec<&[u8]> = if map.is_empty() {
                    Vec::new()
                } else {
                    map.split(|&b| b == b',').collect()
                };
                if !fields.len().is_multiple_of(2) {
                    return Err(MapError::Malformed);
                }
                pairs(&fields).ok_or(MapError::Malformed)?
            }
        };
        SparseMap::new(size, &pairs, data_len)
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(size: i64, pairs: &[(i64, i64)]) -> SparseMap {
        let packed = pairs.iter().map(|p| p.1 as u64).sum();
        SparseMap::new(size, pairs, packed).unwrap()
    }

    #[test]
    fn pieces_fill_holes_with_zeros() {
        // Go's own example: "abcde" at 2, "fgh" at 18, size 25.
        let m = map(25, &[(2, 5), (18, 3)]);
        assert_eq!(
            m.pieces(0..25),
            [
                Piece::Zeros(2),
                Piece::Data(0..5),
                Piece::Zeros(11),
                Piece::Data(5..8),
                Piece::Zeros(4)
            ]
        );
        assert_eq!(
            m.pieces(4..19),
            [Piece::Data(2..5), Piece::Zeros(11), Piece::Data(5..6)]
        );
        assert_eq!(m.pieces(8..10), [Piece::Zeros(2)]);
        assert_eq!(m.pieces(24..40), [Piece::Zeros(1)]);
        assert_eq!(m.pieces(30..40), []);
    }

    #[test]
    fn maps_go_rejects_are_rejected() {
        let bad = |size, pairs: &[(i64, i64)], packed| SparseMap::new(size, pairs, packed);
        assert_eq!(
            bad(10, &[(5, 6)], 6),
            Err(MapError::Invalid),
            "past the end"
        );
        assert_eq!(
            bad(10, &[(4, 2), (5, 1)], 3),
            Err(MapError::Invalid),
            "overlap"
        );
        assert_eq!(
            bad(10, &[(6, 1), (2, 1)], 2),
            Err(MapError::Invalid),
            "unordered"
        );
        assert_eq!(bad(10, &[(-1, 1)], 1), Err(MapError::Invalid), "negative");
        assert_eq!(bad(-1, &[], 0), Err(MapError::Invalid), "negative size");
        assert_eq!(
            bad(10, &[(0, 2)], 3),
            Err(MapError::DataMismatch),
            "unreferenced data"
        );
        assert_eq!(
            bad(10, &[(0, 2)], 1),
            Err(MapError::DataMismatch),
            "missing data"
        );
        // GNU tar ends a file that ends in a hole with an empty fragment at its size.
        assert_eq!(map(10, &[(0, 2), (10, 0)]).fragments().len(), 1);
    }

    #[test]
    fn versions_follow_go() {
        let of = |records: &[(&[u8], &[u8])]| {
            version(|k| records.iter().find(|(key, _)| *key == k).map(|(_, v)| *v))
        };
        assert_eq!(of(&[(MAJOR, b"1"), (MINOR, b"0")]), Some(Version::InData));
        assert_eq!(
            of(&[(MAJOR, b"0"), (MINOR, b"1")]),
            Some(Version::InRecords)
        );
        assert_eq!(of(&[(MAP, b"0,1")]), Some(Version::InRecords));
        assert_eq!(of(&[(MAJOR, b"2"), (MINOR, b"0"), (MAP, b"0,1")]), None);
        assert_eq!(of(&[(NAME, b"x")]), None);
    }
}
