//! The inode table of a layer as a normal unpack onto overlayfs would leave it.
//!
//! Built once from the zTOC's entries: names cleaned like containerd does, missing parent
//! directories created, later entries of a path replacing earlier ones (a directory over a
//! directory only updates its metadata), hardlinks sharing their target's inode, and whiteouts
//! converted for an overlayfs lower directory (`.wh.NAME` → a 0/0 character device `NAME`,
//! `.wh..wh..opq` → `trusted.overlay.opaque=y` on its directory). Pure: no FUSE here.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hermes_ztoc::{Entry, EntryKind, Ztoc, clean_path};

use crate::{Error, Result};

/// The root directory's inode number.
pub(crate) const ROOT: u64 = 1;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
pub(crate) const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// File types a layer can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// One inode.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Device number, kernel encoding.
    pub rdev: u32,
    pub size: u64,
    /// Offset of a regular file's bytes in the tar.
    pub data_offset: u64,
    /// A symlink's target.
    pub link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
    pub nlink: u32,
    pub parent: u64,
    pub children: BTreeMap<Vec<u8>, u64>,
}

impl Node {
    fn from_entry(e: &Entry, kind: Kind, parent: u64) -> Self {
        let size = match kind {
            Kind::File => e.size,
            Kind::Symlink => e.linkname.len() as u64,
            Kind::Dir => 4096,
            _ => 0,
        };
        Self {
            kind,
            perm: (e.mode & 0o7777) as u16,
            uid: e.uid,
            gid: e.gid,
            mtime: parse_time(&e.mod_time).unwrap_or(UNIX_EPOCH),
            rdev: match kind {
                Kind::Char | Kind::Block => encode_dev(e.devmajor as u32, e.devminor as u32),
                _ => 0,
            },
            size,
            data_offset: e.offset,
            link: if kind == Kind::Symlink {
                e.linkname.clone()
            } else {
                Vec::new()
            },
            xattrs: e.xattrs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
            opaque: false,
            nlink: 1,
            parent,
            children: BTreeMap::new(),
        }
    }

    fn implicit_dir(parent: u64) -> Self {
        Self {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            rdev: 0,
            size: 4096,
            data_offset: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            opaque: false,
            nlink: 2,
            parent,
            children: BTreeMap::new(),
        }
    }

    /// Extended attributes, the overlayfs opaque marker included.
    pub fn xattrs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let opaque = self.opaque.then_some((OPAQUE_XATTR, &b"y"[..]));
        self.xattrs
            .iter()
            .filter(move |(k, _)| !(self.opaque && k == OPAQUE_XATTR))
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .chain(opaque)
    }
}

/// Every inode of a layer; inode number = index + 1.
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Build the tree of `ztoc`'s layer.
    pub fn build(ztoc: &Ztoc) -> Result<Self> {
        let mut root = Node::implicit_dir(ROOT);
        root.perm = 0o755;
        let mut tree = Self { nodes: vec![root] };
        for e in ztoc.entries() {
            tree.add(e)?;
        }
        tree.count_links();
        Ok(tree)
    }

    /// Inode `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1)
            .and_then(|i| self.nodes.get(usize::try_from(i).ok()?))
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.get(parent)?.children.get(name).copied()
    }

    /// The inode at a cleaned path (no symlinks followed).
    pub fn resolve(&self, path: &[u8]) -> Option<u64> {
        path.split(|&b| b == b'/')
            .try_fold(ROOT, |ino, part| self.lookup(ino, part))
    }

    /// Number of inodes (including ones that later entries replaced).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    fn push(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    fn add(&mut self, e: &Entry) -> Result<()> {
        let bad = |what| Error::BadEntry {
            name: e.display_name(),
            what,
        };
        let path = match clean_path(&e.name) {
            None => return Err(bad("name escapes the layer root")),
            Some(None) => {
                if e.kind == EntryKind::Dir {
                    let root = self.node_mut(ROOT);
                    let children = std::mem::take(&mut root.children);
                    *root = Node::from_entry(e, Kind::Dir, ROOT);
                    root.children = children;
                }
                return Ok(());
            }
            Some(Some(path)) => path,
        };
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        let parent = self.make_dirs(dir);
        if name == OPAQUE_MARKER {
            self.node_mut(parent).opaque = true;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let mut node = Node::from_entry(e, Kind::Char, parent);
            node.perm = 0;
            node.rdev = 0;
            node.size = 0;
            node.xattrs.clear();
            let ino = self.push(node);
            self.link(parent, hidden, ino);
            return Ok(());
        }
        let kind = match e.kind {
            EntryKind::Hardlink => {
                let target = clean_path(&e.linkname)
                    .flatten()
                    .ok_or_else(|| bad("hardlink target escapes the layer root"))?;
                let ino = self
                    .resolve(&target)
                    .ok_or_else(|| bad("hardlink target is not in the layer"))?;
                if self.nodes[(ino - 1) as usize].kind == Kind::Dir {
                    return Err(bad("hardlink to a directory"));
                }
                self.link(parent, name, ino);
                return Ok(());
            }
            EntryKind::Dir => {
                if let Some(existing) = self.lookup(parent, name)
                    && self.nodes[(existing - 1) as usize].kind == Kind::Dir
                {
                    let node = self.node_mut(existing);
                    let (children, opaque) = (std::mem::take(&mut node.children), node.opaque);
                    *node = Node::from_entry(e, Kind::Dir, parent);
                    node.children = children;
                    node.opaque = opaque;
                    return Ok(());
                }
                Kind::Dir
            }
            EntryKind::Reg => Kind::File,
            EntryKind::Symlink => Kind::Symlink,
            EntryKind::Char => Kind::Char,
            EntryKind::Block => Kind::Block,
            EntryKind::Fifo => Kind::Fifo,
        };
        let ino = self.push(Node::from_entry(e, kind, parent));
        self.link(parent, name, ino);
        Ok(())
    }

    /// The directory at `path`, creating missing (or replacing non-directory) components.
    fn make_dirs(&mut self, path: &[u8]) -> u64 {
        let mut ino = ROOT;
        if path.is_empty() {
            return ino;
        }
        for part in path.split(|&b| b == b'/') {
            ino = match self.lookup(ino, part) {
                Some(child) if self.nodes[(child - 1) as usize].kind == Kind::Dir => child,
                _ => {
                    let child = self.push(Node::implicit_dir(ino));
                    self.link(ino, part, child);
                    child
                }
            };
        }
        ino
    }

    fn link(&mut self, parent: u64, name: &[u8], ino: u64) {
        self.node_mut(parent).children.insert(name.to_vec(), ino);
    }

    /// Link counts of everything reachable from the root.
    fn count_links(&mut self) {
        for node in &mut self.nodes {
            node.nlink = 0;
        }
        let mut stack = vec![ROOT];
        while let Some(dir) = stack.pop() {
            let children: Vec<u64> = self.nodes[(dir - 1) as usize]
                .children
                .values()
                .copied()
                .collect();
            let mut subdirs = 0;
            for child in children {
                let node = self.node_mut(child);
                if node.kind == Kind::Dir {
                    node.parent = dir;
                    subdirs += 1;
                    stack.push(child);
                } else {
                    node.nlink += 1;
                }
            }
            self.node_mut(dir).nlink = 2 + subdirs;
        }
    }
}

/// Linux's `new_encode_dev` (the 32-bit `dev_t` FUSE carries).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Parse the RFC 3339 time Go's `MarshalText` writes (`2023-11-14T22:13:20.25Z`, or with a
/// `±HH:MM` offset).
pub(crate) fn parse_time(text: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(text).ok()?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if s.len() < 20 || s.as_bytes()[4] != b'-' || s.as_bytes()[10] != b'T' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = frac[..digits].parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset;
    Some(if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain tar of raw headers: (name, type flag, mode, link name).
    fn tree_of(entries: &[(&str, u8, u32, &str)]) -> Result<Tree> {
        let mut tar = Vec::new();
        for &(name, flag, mode, link) in entries {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
            h[108..115].copy_from_slice(b"0000000");
            h[116..123].copy_from_slice(b"0000000");
            h[124..135].copy_from_slice(b"00000000000");
            h[136..147].copy_from_slice(b"14525601020");
            h[156] = flag;
            h[157..157 + link.len()].copy_from_slice(link.as_bytes());
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            tar.extend_from_slice(&h);
        }
        tar.extend_from_slice(&[0; 1024]);
        let ztoc = hermes_ztoc::build(&tar[..], &hermes_ztoc::BuildOptions::default()).unwrap();
        Tree::build(&ztoc)
    }

    #[test]
    fn root_entry_sets_the_root_metadata() {
        let tree = tree_of(&[("./", b'5', 0o700, ""), ("./a", b'0', 0o644, "")]).unwrap();
        let root = tree.get(ROOT).unwrap();
        assert_eq!(root.perm, 0o700);
        assert_eq!(root.nlink, 2);
        assert!(tree.resolve(b"a").is_some());
    }

    #[test]
    fn a_directory_entry_over_a_directory_keeps_its_children() {
        let tree = tree_of(&[
            ("d/", b'5', 0o755, ""),
            ("d/.wh..wh..opq", b'0', 0o644, ""),
            ("d/f", b'0', 0o644, ""),
            ("d/", b'5', 0o711, ""),
        ])
        .unwrap();
        let d = tree.get(tree.resolve(b"d").unwrap()).unwrap();
        assert_eq!(d.perm, 0o711);
        assert!(tree.resolve(b"d/f").is_some());
        assert_eq!(d.xattrs().collect::<Vec<_>>(), [(OPAQUE_XATTR, &b"y"[..])]);
    }

    #[test]
    fn a_file_over_a_directory_drops_the_subtree() {
        let tree = tree_of(&[("d/f", b'0', 0o644, ""), ("d", b'0', 0o600, "")]).unwrap();
        let d = tree.get(tree.resolve(b"d").unwrap()).unwrap();
        assert_eq!((d.kind, d.perm), (Kind::File, 0o600));
        assert_eq!(tree.resolve(b"d/f"), None);
        assert_eq!(tree.get(ROOT).unwrap().nlink, 2);
    }

    #[test]
    fn a_hardlink_keeps_the_inode_its_target_had() {
        let tree = tree_of(&[
            ("a", b'0', 0o644, ""),
            ("b", b'1', 0o644, "a"),
            ("a", b'0', 0o600, ""),
        ])
        .unwrap();
        let (a, b) = (tree.resolve(b"a").unwrap(), tree.resolve(b"b").unwrap());
        assert_ne!(a, b);
        assert_eq!(tree.get(b).unwrap().perm, 0o644);
        assert_eq!(
            (tree.get(a).unwrap().nlink, tree.get(b).unwrap().nlink),
            (1, 1)
        );
    }

    #[test]
    fn hardlinks_to_nothing_or_to_directories_are_refused() {
        let err = tree_of(&[("b", b'1', 0o644, "missing")]).unwrap_err();
        assert!(
            matches!(err, Error::BadEntry { ref name, .. } if name == "b"),
            "{err}"
        );
        let err = tree_of(&[("d/", b'5', 0o755, ""), ("b", b'1', 0o644, "d")]).unwrap_err();
        assert!(matches!(err, Error::BadEntry { .. }), "{err}");
    }

    #[test]
    fn parse_time_reads_go_marshal_text() {
        let t = |s: &str| parse_time(s.as_bytes()).map(|t| t.duration_since(UNIX_EPOCH).unwrap());
        assert_eq!(
            t("2023-11-14T22:13:20.25Z"),
            Some(Duration::new(1_700_000_000, 250_000_000))
        );
        assert_eq!(
            t("2023-11-14T22:13:21Z"),
            Some(Duration::new(1_700_000_001, 0))
        );
        assert_eq!(
            t("2023-11-15T00:13:21+02:00"),
            Some(Duration::new(1_700_000_001, 0))
        );
        assert_eq!(
            t("2000-02-29T00:00:00Z"),
            Some(Duration::new(951_782_400, 0))
        );
        assert_eq!(
            t("1970-01-01T00:00:00.000000001Z"),
            Some(Duration::new(0, 1))
        );
        assert_eq!(
            parse_time(b"1969-12-31T23:59:59.5Z"),
            Some(UNIX_EPOCH - Duration::from_millis(500))
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T22:13:21Z",
            "2023-11-14T22:13:21",
            "x023-11-14T22:13:21Z",
        ] {
            assert_eq!(parse_time(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn encode_dev_matches_the_kernel() {
        // makedev(1, 3) = /dev/null, makedev(8, 257) as stat shows it.
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 257), 0x0010_0801);
    }
}
