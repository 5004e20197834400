//! Keeping the node's state private. The node runs as root beside other users' workloads, and its
//! root holds the decompressed bytes of private images, their zTOCs, the snapshot trees, the
//! metadata store and the lazy mounts. None of it may be reachable by another user, whatever umask
//! the daemon was started with: the root is made `0700` (like containerd's own root) and the
//! daemon and its layer servers create files with umask `077`.
//!
//! This does not decide what containers see: a container reads its layers through overlayfs,
//! whose mount (not the lower layers' modes or mount flags) governs setuid and device files.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The mode of every directory the node keeps state in.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Sets this process's umask to `077`, so that every file and directory it (and every child it
/// starts) creates is readable by its owner only. Call it first thing in a daemon.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `dir` (and missing parents) readable by its owner only, and makes an existing `dir`
/// so: a root left `0755` by an older version, or made under a loose umask, is tightened.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != PRIVATE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_creates_owner_only_dirs_and_tightens_an_existing_loose_one() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        private_dir(&fresh).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);

        let loose = tmp.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
    }
}
