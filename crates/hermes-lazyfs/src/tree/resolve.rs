//! Paths resolved the way containerd's unpacker resolves them while it writes a layer.
//!
//! containerd writes each entry at `fs.RootPath(root, dir) + base` (continuity's `fs` package):
//! symlinks in the entry's directory that the layer itself created earlier are followed, with
//! the path kept inside the root (an absolute target or a `..` past the top starts again at the
//! root). So `d -> x` then `d/f` writes `x/f` and `d` stays a link. This module replays that
//! algorithm over the tree being built, on Go's path rules (`filepath.Split`, `Join`, `Clean`).
//!
//! Its one step outside the root it cannot replay: continuity checks each component with
//! `lstat` on the real path, where the kernel follows symlinks in the leading components
//! unbounded. When that walk would leave the layer (a link to an absolute path or above the
//! top, met while a later component is checked), the result depends on the host's files, and
//! the entry is refused instead.

use super::{Kind, ROOT, Tree};

/// continuity's bound on symlinks followed for one path.
const MAX_LINKS: u32 = 255;
/// The kernel's bound on symlinks followed in one path walk (`MAXSYMLINKS`).
const KERNEL_MAX_LINKS: u32 = 40;
/// Longer paths fail in containerd's system calls (`ENAMETOOLONG`); the bound also keeps the
/// recursion below shallow.
const PATH_MAX: usize = 4096;
/// Directory lookups that resolving one layer's paths may take. Replaying continuity costs a
/// walk from the root per component, so a hostile layer could otherwise make mounting slow;
/// real layers need a tiny fraction of this.
pub(super) const LOOKUP_BUDGET: u64 = 1 << 24;

type Resolved<T> = std::result::Result<T, &'static str>;

/// One `fs.RootPath` call's counters.
struct Walk<'a> {
    links: u32,
    lookups: &'a mut u64,
}

impl Tree {
    /// `fs.RootPath`: `path` with every symlink followed inside the root; a rooted, clean path
    /// whose components are directories or do not exist yet. `lookups` is the layer's budget.
    pub(super) fn root_path(&self, path: &[u8], lookups: &mut u64) -> Resolved<Vec<u8>> {
        if path.is_empty() {
            return Ok(b"/".to_vec());
        }
        let mut walk = Walk { links: 0, lookups };
        let mut path = path.to_vec();
        loop {
            let before = walk.links;
            path = self.walk_links(&path, &mut walk)?;
            if before == walk.links {
                let rooted = join(&[b"/", &path]);
                if rooted == path {
                    return Ok(path);
                }
                path = rooted;
            }
        }
    }

    /// continuity's `walkLinks`: resolve the directory part, then follow the last component
    /// once if it is a link.
    fn walk_links(&self, path: &[u8], walk: &mut Walk<'_>) -> Resolved<Vec<u8>> {
        if path.len() > PATH_MAX {
            return Err("a parent path is longer than PATH_MAX (containerd's unpack fails)");
        }
        let (dir, file) = split(path);
        if dir.is_empty() {
            return Ok(self.walk_link(file, walk)?.0);
        }
        if file.is_empty() {
            if dir == b"/" {
                return Ok(dir.to_vec());
            }
            return self.walk_links(&dir[..dir.len() - 1], walk);
        }
        let new_dir = self.walk_links(dir, walk)?;
        let (new_path, is_link) = self.walk_link(&join(&[&new_dir, file]), walk)?;
        if !is_link || new_path.first() == Some(&b'/') {
            return Ok(new_path);
        }
        Ok(join(&[&new_dir, &new_path]))
    }

    /// continuity's `walkLink`: the target of `path` if it is a symlink.
    fn walk_link(&self, path: &[u8], walk: &mut Walk<'_>) -> Resolved<(Vec<u8>, bool)> {
        if walk.links > MAX_LINKS {
            return Err("too many symlinks in a parent path (containerd's unpack fails)");
        }
        let path = join(&[b"/", path]);
        if path == b"/" {
            return Ok((path, false));
        }
        match self.lstat(&path, walk.lookups)? {
            Some(ino) if self.nodes[(ino - 1) as usize].kind == Kind::Symlink => {
                walk.links += 1;
                Ok((self.nodes[(ino - 1) as usize].link.clone(), true))
            }
            _ => Ok((path, false)),
        }
    }

    /// `lstat` of a rooted path: the inode, `None` if it does not exist (ENOENT, which
    /// continuity takes as "not a link"), or an error where the real call fails or leaves the
    /// layer.
    pub(super) fn lstat(&self, path: &[u8], lookups: &mut u64) -> Resolved<Option<u64>> {
        let parts: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        let mut links = KERNEL_MAX_LINKS;
        self.kernel_walk(ROOT, &parts, false, &mut links, lookups)
    }

    /// The kernel's path walk from `dir`: symlinks in leading components followed (and the last
    /// one too if `follow_last`).
    fn kernel_walk(
        &self,
        dir: u64,
        parts: &[&[u8]],
        follow_last: bool,
        links: &mut u32,
        lookups: &mut u64,
    ) -> Resolved<Option<u64>> {
        let leaves = "a parent path goes through a symlink out of the layer while containerd \
                      checks it: the result would depend on the host's files";
        let mut cur = dir;
        for (i, &part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            *lookups = lookups
                .checked_sub(1)
                .ok_or("resolving symlinked paths costs too much: refusing the layer")?;
            match part {
                b"." => continue,
                b".." if cur == ROOT => return Err(leaves),
                b".." => {
                    cur = self.nodes[(cur - 1) as usize].parent;
                    continue;
                }
                _ => {}
            }
            let Some(child) = self.lookup(cur, part) else {
                return Ok(None);
            };
            let node = &self.nodes[(child - 1) as usize];
            match node.kind {
                Kind::Dir => cur = child,
                Kind::Symlink if !last || follow_last => {
                    if *links == 0 {
                        return Err("symlink loop in a parent path (containerd's unpack fails)");
                    }
                    *links -= 1;
                    if node.link.first() == Some(&b'/') {
                        return Err(leaves);
                    }
                    let target: Vec<&[u8]> = node
                        .link
                        .split(|&b| b == b'/')
                        .filter(|p| !p.is_empty())
                        .collect();
                    match self.kernel_walk(cur, &target, true, links, lookups)? {
                        None => return Ok(None),
                        Some(t) if self.nodes[(t - 1) as usize].kind == Kind::Dir => cur = t,
                        Some(t) if last => return Ok(Some(t)),
                        Some(_) => return Err(NOT_A_DIRECTORY),
                    }
                }
                _ if last => return Ok(Some(child)),
                _ => return Err(NOT_A_DIRECTORY),
            }
        }
        Ok(Some(cur))
    }
}

/// Why an entry whose parent is a file (or a link to one) is refused.
pub(super) const NOT_A_DIRECTORY: &str = "a parent is not a directory (containerd's unpack fails)";

/// Go's `filepath.Split`: everything up to and including the last `/`, and the rest.
pub(super) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    let at = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    path.split_at(at)
}

/// Go's `filepath.Join`: the non-empty elements from the first one on, joined by `/`, cleaned.
pub(super) fn join(parts: &[&[u8]]) -> Vec<u8> {
    let Some(first) = parts.iter().position(|p| !p.is_empty()) else {
        return Vec::new();
    };
    clean(&parts[first..].join(&b'/'))
}

/// Go's `filepath.Clean` on Unix.
fn clean(path: &[u8]) -> Vec<u8> {
    let rooted = path.first() == Some(&b'/');
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => match parts.last() {
                Some(&last) if last != b".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(part),
            },
            _ => parts.push(part),
        }
    }
    let body = parts.join(&b'/');
    match (rooted, body.is_empty()) {
        (true, _) => [&b"/"[..], &body].concat(),
        (false, true) => b".".to_vec(),
        (false, false) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn path_helpers_follow_go() {
        assert_eq!(s(clean(b"a//b/./c/..")), "a/b");
        assert_eq!(s(clean(b"/../a")), "/a");
        assert_eq!(s(clean(b"../a/../..")), "../..");
        assert_eq!(s(clean(b"")), ".");
        assert_eq!(s(clean(b"/")), "/");
        assert_eq!(s(join(&[b"", b"a", b"../b"])), "b");
        assert_eq!(s(join(&[b"/x", b"../../y"])), "/y");
        assert_eq!(s(join(&[b"", b""])), "");
        assert_eq!(split(b"a/b/c"), (&b"a/b/"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(split(b"a/"), (&b"a/"[..], &b""[..]));
    }
}
