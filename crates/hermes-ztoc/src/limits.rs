//! Caps on what a zTOC build collects from one layer.
//!
//! A tar header costs 512 bytes and compresses to a few, but the zTOC stores every entry's
//! name, link target and PAX records in full. Without caps a 206 KiB layer made a 382 MiB zTOC
//! (1 MiB PAX paths, each stored twice: as the name and as a record), and 10,000 nested
//! directories in 335 KiB made 193 MiB (each name repeats all its parents). The defaults are far
//! above what real layers hold, so they never change a real layer's zTOC; a layer that passes
//! one is [`Error::NotIndexable`] and is pulled normally.
//!
//! This module only counts; it neither reads tar nor decides what an entry is.

use crate::entry::Entry;
use crate::{Error, Result};

/// Default [`Limits::max_entries`]. A whole Debian root with compilers, Python and Rust
/// toolchains (430,000 paths) fits more than twice.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Default [`Limits::max_name_bytes`]. The same 430,000 paths take 40 MB of names.
pub const DEFAULT_MAX_NAME_BYTES: u64 = 128 << 20;
/// Default [`Limits::max_depth`]. Real trees stay below a hundred levels (20 on that root);
/// `PATH_MAX` (4096 bytes) allows at most 2048, so deeper layers cannot be unpacked anyway.
pub const DEFAULT_MAX_DEPTH: u64 = 1024;

/// The caps of one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tar entries.
    pub max_entries: u64,
    /// Most bytes of the strings entries carry (names, link targets, owner and group names, PAX
    /// records), summed over the layer.
    pub max_name_bytes: u64,
    /// Most components in an entry's name.
    pub max_depth: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_name_bytes: DEFAULT_MAX_NAME_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Which of the [`Limits`] a layer passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`Limits::max_entries`].
    Entries,
    /// [`Limits::max_name_bytes`].
    NameBytes,
    /// [`Limits::max_depth`].
    Depth,
}

impl Limit {
    /// The reason shown after "not indexable: ".
    pub(crate) fn describe(self, max: u64, offset: u64) -> String {
        match self {
            Self::Entries => format!(
                "the layer has more than {max} tar entries (the next one at uncompressed offset {offset})"
            ),
            Self::NameBytes => format!(
                "the names, link targets and PAX records of its entries take more than {max} bytes \
                 (passed at uncompressed offset {offset})"
            ),
            Self::Depth => format!(
                "the entry at uncompressed offset {offset} is more than {max} directories deep"
            ),
        }
    }
}

/// Running totals of a build, checked entry by entry so a hostile layer is refused before its
/// entries take the memory.
#[derive(Debug)]
pub(crate) struct Tally {
    limits: Limits,
    entries: u64,
    name_bytes: u64,
}

impl Tally {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            entries: 0,
            name_bytes: 0,
        }
    }

    /// Count one more entry; an error when it passes a limit.
    pub(crate) fn admit(&mut self, e: &Entry) -> Result<()> {
        let over = |limit, max| Error::NotIndexable {
            limit,
            max,
            offset: e.offset,
        };
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(over(Limit::Entries, self.limits.max_entries));
        }
        let strings = [&e.name, &e.linkname, &e.uname, &e.gname]
            .iter()
            .map(|s| s.len())
            .chain(e.pax.iter().map(|(k, v)| k.len() + v.len()))
            .sum::<usize>();
        self.name_bytes = self.name_bytes.saturating_add(strings as u64);
        if self.name_bytes > self.limits.max_name_bytes {
            return Err(over(Limit::NameBytes, self.limits.max_name_bytes));
        }
        let depth = e
            .name
            .split(|&b| b == b'/')
            .filter(|part| !part.is_empty() && *part != b".")
            .count();
        if depth as u64 > self.limits.max_depth {
            return Err(over(Limit::Depth, self.limits.max_depth));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryKind;

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::Dir,
            offset: 512,
            size: 0,
            linkname: Vec::new(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            mod_time: Vec::new(),
            devmajor: 0,
            devminor: 0,
            pax: Vec::new(),
        }
    }

    fn limits(max_entries: u64, max_name_bytes: u64, max_depth: u64) -> Limits {
        Limits {
            max_entries,
            max_name_bytes,
            max_depth,
        }
    }

    #[test]
    fn each_limit_is_inclusive() {
        let mut t = Tally::new(limits(2, 100, 3));
        t.admit(&entry("a/b/c/")).expect("depth 3 is allowed");
        t.admit(&entry("./a/./b//c"))
            .expect("only real components count");
        let err = t.admit(&entry("x")).expect_err("third entry");
        assert!(
            matches!(
                err,
                Error::NotIndexable {
                    limit: Limit::Entries,
                    max: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = Tally::new(limits(9, 100, 3))
            .admit(&entry("a/b/c/d"))
            .expect_err("depth 4");
        assert!(
            matches!(
                err,
                Error::NotIndexable {
                    limit: Limit::Depth,
                    max: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn name_bytes_count_links_owners_and_pax_records() {
        let mut e = entry("n");
        e.linkname = b"target".to_vec();
        e.uname = b"root".to_vec();
        e.gname = b"wheel".to_vec();
        e.pax = vec![(b"path".to_vec(), b"n".to_vec())];
        let total = 1 + 6 + 4 + 5 + 4 + 1;
        Tally::new(limits(9, total, 9))
            .admit(&e)
            .expect("exactly at the limit");
        let err = Tally::new(limits(9, total - 1, 9))
            .admit(&e)
            .expect_err("one byte over");
        assert_eq!(
            err.to_string(),
            "not indexable: the names, link targets and PAX records of its entries take more than \
             20 bytes (passed at uncompressed offset 512)"
        );
    }
}
