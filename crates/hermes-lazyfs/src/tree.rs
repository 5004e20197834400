//! The inode table of a layer as a normal unpack onto overlayfs would leave it.
//!
//! Built once from the zTOC's entries the way containerd's unpacker (`archive.Apply` into an
//! empty snapshot) treats them: names cleaned, an entry naming the root itself ignored, parent
//! paths resolved through the layer's own symlinks ([`resolve`]) and missing parent directories
//! created, later entries of a path replacing earlier ones (a directory over a directory only
//! updates its metadata), hardlinks sharing their target's inode, sparse files at their full
//! size, and whiteouts converted for an overlayfs lower directory (`.wh.NAME` → a 0/0 character
//! device `NAME`, `.wh..wh..opq` → `trusted.overlay.opaque=y` on its directory). Where that
//! unpack would fail, building fails too, so the layer falls back to it rather than being
//! served differently. Pure: no FUSE here.

mod resolve;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hermes_ztoc::{Entry, EntryKind, Piece, SparseMap, clean_path};

use crate::{Error, LayerReader, Result};

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
    data_offset: u64,
    /// A sparse file's map (its data at `data_offset` is then the packed fragments).
    sparse: Option<Arc<SparseMap>>,
    /// A symlink's target.
    pub link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
    pub nlink: u32,
    pub parent: u64,
    pub children: BTreeMap<Vec<u8>, u64>,
}

impl Node {
    fn from_entry(e: &Entry, kind: Kind, parent: u64) -> Result<Self> {
        let sparse = match kind {
            Kind::File => e.sparse().transpose()?.map(Arc::new),
            _ => None,
        };
        let size = match kind {
            Kind::File => sparse.as_ref().map_or(e.size, |m| m.size()),
            Kind::Symlink => e.linkname.len() as u64,
            Kind::Dir => 4096,
            _ => 0,
        };
        Ok(Self {
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
            sparse,
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
        })
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
            sparse: None,
            link: Vec::new(),
            xattrs: Vec::new(),
            opaque: false,
            nlink: 2,
            parent,
            children: BTreeMap::new(),
        }
    }

    /// Bytes `offset..offset + len` of a regular file, which the caller keeps within its size,
    /// read through `reader`; a sparse file's holes read as zeros.
    pub fn read(&self, reader: &LayerReader, offset: u64, len: u64) -> Result<Vec<u8>> {
        let Some(map) = &self.sparse else {
            return reader.read(self.data_offset + offset, len);
        };
        let mut out = Vec::new();
        for piece in map.pieces(offset..offset + len) {
            match piece {
                // Bounded by `len`, which FUSE caps at its maximum read size.
                Piece::Zeros(n) => out.resize(out.len() + n as usize, 0),
                Piece::Data(r) => out
                    .extend_from_slice(&reader.read(self.data_offset + r.start, r.end - r.start)?),
            }
        }
        Ok(out)
    }

    /// Where a regular file's bytes are in the tar, if they are stored there as they read (not
    /// for a sparse file, whose fragments are packed) and there are any.
    pub fn data_range(&self) -> Option<std::ops::Range<u64>> {
        (self.kind == Kind::File && self.sparse.is_none() && self.size > 0)
            .then(|| self.data_offset..self.data_offset + self.size)
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
    /// What is left of [`resolve::LOOKUP_BUDGET`] while building.
    lookups: u64,
}

impl Tree {
    /// Build the tree of a layer from its zTOC's entries.
    pub fn build(entries: &[Entry]) -> Result<Self> {
        let mut root = Node::implicit_dir(ROOT);
        root.perm = 0o755;
        let mut tree = Self {
            nodes: vec![root],
            lookups: resolve::LOOKUP_BUDGET,
        };
        for e in entries {
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
    #[cfg(test)]
    pub fn resolve(&self, path: &[u8]) -> Option<u64> {
        path.split(|&b| b == b'/')
            .try_fold(ROOT, |ino, part| self.lookup(ino, part))
    }

    /// Every inode (including ones that later entries replaced), in inode order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
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
            // containerd skips an entry that resolves to the root ("file ignored: resolved to
            // root"): the root keeps the snapshot directory's own metadata.
            Some(None) => return Ok(()),
            Some(Some(path)) => path,
        };
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        let parent = self.make_parents(dir).map_err(bad)?;
        if name == OPAQUE_MARKER {
            self.node_mut(parent).opaque = true;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(bad("whiteout of no name (containerd refuses it)"));
            }
            if self.lookup(parent, hidden).is_some() {
                // containerd creates the whiteout with mknod, which fails on an existing path.
                return Err(bad(
                    "whiteout of a path this layer has (containerd's unpack fails)",
                ));
            }
            let mut node = Node::from_entry(e, Kind::Char, parent)?;
            node.perm = 0;
            node.rdev = 0;
            node.size = 0;
            node.xattrs.clear();
            let ino = self.push(node);
            self.link(parent, hidden, ino);
            return Ok(());
        }
        let existing = self.lookup(parent, name);
        if let Some(existing) = existing
            && e.kind == EntryKind::Dir
            && self.nodes[(existing - 1) as usize].kind == Kind::Dir
        {
            // Merged: new metadata, children and the opaque marker kept, xattrs added to.
            let node = self.node_mut(existing);
            let (children, opaque) = (std::mem::take(&mut node.children), node.opaque);
            let mut xattrs = std::mem::take(&mut node.xattrs);
            *node = Node::from_entry(e, Kind::Dir, parent)?;
            xattrs.retain(|(k, _)| !node.xattrs.iter().any(|(new, _)| new == k));
            node.xattrs.extend(xattrs);
            node.children = children;
            node.opaque = opaque;
            return Ok(());
        }
        if existing.is_some() {
            // Removed before the entry is created, as containerd does: a hardlink to the path
            // it replaces has nothing to link to.
            self.node_mut(parent).children.remove(name);
        }
        let kind = match e.kind {
            EntryKind::Hardlink => {
                let ino = self.hardlink_target(&e.linkname).map_err(bad)?;
                self.link(parent, name, ino);
                return Ok(());
            }
            EntryKind::Symlink if e.linkname.is_empty() => {
                return Err(bad("symlink to an empty path (containerd's unpack fails)"));
            }
            EntryKind::Dir => Kind::Dir,
            EntryKind::Reg => Kind::File,
            EntryKind::Symlink => Kind::Symlink,
            EntryKind::Char => Kind::Char,
            EntryKind::Block => Kind::Block,
            EntryKind::Fifo => Kind::Fifo,
        };
        let ino = self.push(Node::from_entry(e, kind, parent)?);
        self.link(parent, name, ino);
        Ok(())
    }

    /// containerd's `mkparent` after `fs.RootPath`: the directory at `path` with symlinks of the
    /// layer followed inside the root, missing directories created.
    fn make_parents(&mut self, path: &[u8]) -> std::result::Result<u64, &'static str> {
        // Most paths meet no symlink, and resolving them changes nothing.
        if let Some(ino) = self.make_dirs(path)? {
            return Ok(ino);
        }
        let mut lookups = self.lookups;
        let resolved = self.root_path(path, &mut lookups);
        self.lookups = lookups;
        self.make_dirs(&resolved?)?
            .ok_or("a parent path still meets a symlink once resolved")
    }

    /// The directory at `path` from the root, missing ones created; `None` (nothing created)
    /// when a component is a symlink.
    fn make_dirs(&mut self, path: &[u8]) -> std::result::Result<Option<u64>, &'static str> {
        let mut ino = ROOT;
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            ino = match self.lookup(ino, part) {
                Some(child) => match self.nodes[(child - 1) as usize].kind {
                    Kind::Dir => child,
                    Kind::Symlink => return Ok(None),
                    _ => return Err(resolve::NOT_A_DIRECTORY),
                },
                // Everything below a created directory is created too: no symlink can follow.
                None => {
                    let child = self.push(Node::implicit_dir(ino));
                    self.link(ino, part, child);
                    child
                }
            };
        }
        Ok(Some(ino))
    }

    /// containerd's `hardlinkRootPath`: the target's directory resolved inside the root, the
    /// target itself not followed; it must exist and not be a directory.
    fn hardlink_target(&mut self, linkname: &[u8]) -> std::result::Result<u64, &'static str> {
        let (dir, base) = resolve::split(linkname);
        let mut lookups = self.lookups;
        let target = self
            .root_path(dir, &mut lookups)
            .and_then(|dir| self.lstat(&resolve::join(&[&dir, base]), &mut lookups));
        self.lookups = lookups;
        let ino = target?.ok_or("hardlink target is not in the layer")?;
        if self.nodes[(ino - 1) as usize].kind == Kind::Dir {
            return Err("hardlink to a directory");
        }
        Ok(ino)
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

    /// A raw header: (name, type flag, mode, link name).
    type Raw = (&'static str, u8, u32, &'static str);

    /// A plain tar of raw headers.
    fn tree_of(entries: &[Raw]) -> Result<Tree> {
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
        Tree::build(ztoc.entries())
    }

    /// The kind of what is at `path` (no symlink followed), if anything.
    fn kind_at(tree: &Tree, path: &str) -> Option<Kind> {
        tree.resolve(path.as_bytes())
            .map(|ino| tree.get(ino).unwrap().kind)
    }

    fn refusal(entries: &[Raw]) -> String {
        match tree_of(entries) {
            Err(Error::BadEntry { what, .. }) => what.to_owned(),
            other => panic!("expected a refused entry, got {other:?}"),
        }
    }

    #[test]
    fn root_entries_are_ignored_as_containerd_ignores_them() {
        // umoci and others write the root as `./` or `/`; containerd skips entries that resolve
        // to the root, so the snapshot directory keeps its own mode.
        let tree = tree_of(&[
            ("./", b'5', 0o700, ""),
            ("/", b'5', 0o700, ""),
            (".", b'5', 0o700, ""),
            ("./a", b'0', 0o644, ""),
            ("/abs/b", b'0', 0o644, ""),
        ])
        .unwrap();
        let root = tree.get(ROOT).unwrap();
        assert_eq!(root.perm, 0o755);
        assert_eq!(root.nlink, 3);
        assert_eq!(kind_at(&tree, "a"), Some(Kind::File));
        assert_eq!(kind_at(&tree, "abs/b"), Some(Kind::File));
    }

    #[test]
    fn a_file_under_a_symlinked_directory_lands_in_the_link_target() {
        let tree = tree_of(&[
            ("x/", b'5', 0o755, ""),
            ("d", b'2', 0o777, "x"),
            ("d/f", b'0', 0o644, ""),
            // A target that does not exist yet is created as a directory.
            ("m", b'2', 0o777, "missing"),
            ("m/g", b'0', 0o644, ""),
        ])
        .unwrap();
        assert_eq!(kind_at(&tree, "d"), Some(Kind::Symlink));
        assert_eq!(kind_at(&tree, "x/f"), Some(Kind::File));
        assert_eq!(kind_at(&tree, "missing/g"), Some(Kind::File));
        assert_eq!(kind_at(&tree, "m"), Some(Kind::Symlink));
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_root() {
        let tree = tree_of(&[
            ("abs", b'2', 0o777, "/y"),
            ("abs/f", b'0', 0o644, ""),
            ("up", b'2', 0o777, "../../z"),
            ("up/f", b'0', 0o644, ""),
            ("sub/", b'5', 0o755, ""),
            ("sub/rel", b'2', 0o777, "../w"),
            ("sub/rel/f", b'0', 0o644, ""),
            ("c1", b'2', 0o777, "c2"),
            ("c2", b'2', 0o777, "v/"),
            ("c1/deep/f", b'0', 0o644, ""),
            ("self", b'2', 0o777, "."),
            ("self/top", b'0', 0o644, ""),
        ])
        .unwrap();
        for path in ["y/f", "z/f", "w/f", "v/deep/f", "top"] {
            assert_eq!(kind_at(&tree, path), Some(Kind::File), "{path}");
        }
        for link in ["abs", "up", "sub/rel", "c1", "c2", "self"] {
            assert_eq!(kind_at(&tree, link), Some(Kind::Symlink), "{link}");
        }
    }

    #[test]
    fn hardlinks_and_whiteouts_resolve_symlinked_parents_too() {
        let tree = tree_of(&[
            ("x/f", b'0', 0o644, ""),
            ("d", b'2', 0o777, "x"),
            ("hl", b'1', 0o644, "d/f"),
            ("d/.wh.g", b'0', 0o644, ""),
            ("d/.wh..wh..opq", b'0', 0o644, ""),
        ])
        .unwrap();
        assert_eq!(tree.resolve(b"hl"), tree.resolve(b"x/f"));
        let g = tree.get(tree.resolve(b"x/g").unwrap()).unwrap();
        assert_eq!(
            (g.kind, g.rdev),
            (Kind::Char, 0),
            "a lower x/g is whited out"
        );
        let x = tree.get(tree.resolve(b"x").unwrap()).unwrap();
        assert_eq!(x.xattrs().collect::<Vec<_>>(), [(OPAQUE_XATTR, &b"y"[..])]);
    }

    #[test]
    fn layers_containerd_cannot_unpack_are_refused() {
        let cases: &[(&str, &[Raw], &str)] = &[
            (
                "file as a parent",
                &[("f", b'0', 0o644, ""), ("f/g", b'0', 0o644, "")],
                "not a directory",
            ),
            (
                "link to a file as a parent",
                &[
                    ("f", b'0', 0o644, ""),
                    ("l", b'2', 0o777, "f"),
                    ("l/g", b'0', 0o644, ""),
                ],
                "not a directory",
            ),
            (
                "symlink loop",
                &[
                    ("a", b'2', 0o777, "b"),
                    ("b", b'2', 0o777, "a"),
                    ("a/f", b'0', 0o644, ""),
                ],
                "symlinks",
            ),
            (
                "whiteout of a path it has",
                &[("a", b'0', 0o644, ""), (".wh.a", b'0', 0o644, "")],
                "whiteout",
            ),
            ("empty symlink", &[("l", b'2', 0o777, "")], "empty"),
            // containerd would check `y/z/w` with the kernel following `y` to the host's /abs.
            (
                "host-dependent",
                &[
                    ("y", b'2', 0o777, "/abs"),
                    ("d", b'2', 0o777, "y/z"),
                    ("d/w/f", b'0', 0o644, ""),
                ],
                "host",
            ),
        ];
        for (what, entries, says) in cases {
            let why = refusal(entries);
            assert!(why.contains(says), "{what}: {why}");
        }
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
