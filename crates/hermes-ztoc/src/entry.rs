//! Tar entries as a zTOC records them, and the path rules Hermes applies to them.

use crate::sparse::SparseMap;
use crate::{Error, Result};

/// The seven entry types SOCI knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Regular file.
    Reg,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Hard link to an earlier entry.
    Hardlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

impl EntryKind {
    /// The string stored in the zTOC's `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reg => "reg",
            Self::Dir => "dir",
            Self::Symlink => "symlink",
            Self::Hardlink => "hardlink",
            Self::Char => "char",
            Self::Block => "block",
            Self::Fifo => "fifo",
        }
    }

    /// Parse the zTOC's `type` field.
    pub fn from_bytes(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"reg" => Self::Reg,
            b"dir" => Self::Dir,
            b"symlink" => Self::Symlink,
            b"hardlink" => Self::Hardlink,
            b"char" => Self::Char,
            b"block" => Self::Block,
            b"fifo" => Self::Fifo,
            _ => return None,
        })
    }

    /// The tar type flag for this kind.
    pub(crate) fn from_typeflag(flag: u8) -> Option<Self> {
        Some(match flag {
            b'0' => Self::Reg,
            b'1' => Self::Hardlink,
            b'2' => Self::Symlink,
            b'3' => Self::Char,
            b'4' => Self::Block,
            b'5' => Self::Dir,
            b'6' => Self::Fifo,
            _ => return None,
        })
    }

    /// The `ls -l` type character.
    pub fn type_char(self) -> char {
        match self {
            Self::Reg | Self::Hardlink => '-',
            Self::Dir => 'd',
            Self::Symlink => 'l',
            Self::Char => 'c',
            Self::Block => 'b',
            Self::Fifo => 'p',
        }
    }

    /// Whether the entry has data bytes in the tar stream.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Reg)
    }
}

/// Prefix of PAX records that carry extended attributes.
pub const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";

/// One tar entry. Byte strings are kept raw: tar names need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name as read (PAX `path`, GNU long name or ustar prefix applied), not cleaned.
    pub name: Vec<u8>,
    /// Entry type.
    pub kind: EntryKind,
    /// Offset of the entry's data in the uncompressed tar (just after its header blocks, and
    /// after the map a format 1.0 sparse file keeps there).
    pub offset: u64,
    /// The header's size field; for a sparse file, the length of its packed data (its full size
    /// is in [`Entry::sparse`]).
    pub size: u64,
    /// Link target of symlinks and hardlinks.
    pub linkname: Vec<u8>,
    /// The raw tar mode field.
    pub mode: i64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Owner name.
    pub uname: Vec<u8>,
    /// Group name.
    pub gname: Vec<u8>,
    /// Modification time as Go's `time.MarshalText` renders it (RFC 3339, UTC when Hermes builds).
    pub mod_time: Vec<u8>,
    /// Device major number.
    pub devmajor: i64,
    /// Device minor number.
    pub devminor: i64,
    /// Every PAX record of the entry, sorted by key (SOCI calls these `xattrs`).
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// The entry's real extended attributes: `SCHILY.xattr.*` PAX records, prefix removed.
    pub fn xattrs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pax.iter().filter_map(|(k, v)| {
            k.strip_prefix(XATTR_PAX_PREFIX)
                .map(|name| (name, v.as_slice()))
        })
    }

    /// The name cleaned to a path relative to the layer root (`None` for the root itself).
    pub fn path(&self) -> Result<Option<Vec<u8>>> {
        clean_path(&self.name).ok_or_else(|| Error::UnsafePath {
            name: String::from_utf8_lossy(&self.name).into_owned(),
            offset: self.offset,
        })
    }

    /// The name as lossy UTF-8, for messages and listings.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// A GNU sparse file's map (its `size` and `offset` then cover the packed fragments only);
    /// `None` for every other entry.
    pub fn sparse(&self) -> Option<Result<SparseMap>> {
        if self.kind != EntryKind::Reg {
            return None;
        }
        let map = crate::sparse::from_records(&self.pax, self.size)?;
        Some(map.map_err(|e| Error::SparseMap {
            name: self.display_name(),
            offset: self.offset,
            what: e.what(),
        }))
    }
}

/// Clean a tar name into a path relative to the layer root, the way containerd's unpacker reads
/// it (Go's `filepath.Clean`, then joined to the root): empty and `.` components are dropped,
/// `..` pops a component, and an absolute name is relative to the root (`/`, `./` and `.` are
/// the root itself; `..` cannot climb above `/`).
///
/// Returns `None` for relative names that climb above the root (refused: containerd would clamp
/// them, but no sane writer produces them), and `Some(None)` for the root itself.
pub fn clean_path(name: &[u8]) -> Option<Option<Vec<u8>>> {
    let rooted = name.first() == Some(&b'/');
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() && !rooted {
                    return None;
                }
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Some(None);
    }
    Some(Some(parts.join(&b'/')))
}

/// Render a Unix time as Go's `time.Time.MarshalText` does in UTC: RFC 3339 with trailing zeros of
/// the fraction removed. Go fails (and soci then stores an empty string) outside years 0–9999.
pub(crate) fn go_time_text(secs: i64, nanos: u32) -> Vec<u8> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return Vec::new();
    }
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let mut text = format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}");
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        text.push('.');
        text.push_str(frac.trim_end_matches('0'));
    }
    text.push('Z');
    text.into_bytes()
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_matches_go_marshal_text() {
        assert_eq!(
            go_time_text(1_700_000_000, 250_000_000),
            b"2023-11-14T22:13:20.25Z"
        );
        assert_eq!(go_time_text(1_700_000_001, 0), b"2023-11-14T22:13:21Z");
        assert_eq!(go_time_text(0, 1), b"1970-01-01T00:00:00.000000001Z");
        assert_eq!(go_time_text(-1, 500_000_000), b"1969-12-31T23:59:59.5Z");
        assert_eq!(go_time_text(951_782_400, 0), b"2000-02-29T00:00:00Z");
        assert_eq!(go_time_text(-62_135_596_800, 0), b"0001-01-01T00:00:00Z");
        assert_eq!(
            go_time_text(253_402_300_800, 0),
            b"",
            "year 10000 is out of Go's range"
        );
    }

    #[test]
    fn clean_path_follows_containerd() {
        let ok = |n: &[u8]| {
            clean_path(n)
                .unwrap()
                .map(|p| String::from_utf8(p).unwrap())
        };
        assert_eq!(ok(b"./usr/bin/"), Some("usr/bin".into()));
        assert_eq!(ok(b"a//b/./c"), Some("a/b/c".into()));
        assert_eq!(ok(b"a/../b"), Some("b".into()));
        assert_eq!(ok(b"./"), None);
        assert_eq!(ok(b"."), None);
        assert_eq!(ok(b"/"), None);
        assert_eq!(ok(b"/etc/passwd"), Some("etc/passwd".into()));
        assert_eq!(ok(b"/../etc/passwd"), Some("etc/passwd".into()));
        assert!(clean_path(b"../etc/passwd").is_none());
        assert!(clean_path(b"a/../../b").is_none());
    }
}
