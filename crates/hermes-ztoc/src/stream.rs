//! Writing a zTOC without holding it: spill files, and a flatbuffer built back to front whose
//! finished bytes go to a spill file as they pile up.
//!
//! soci's marshaler (and [`crate::Ztoc::to_bytes`]) builds the flatbuffer with Google's builder,
//! which grows a buffer from its end towards its front and keeps all of it. [`RevWriter`] makes
//! the same calls with the same alignment, padding and vtable sharing, so its bytes are the
//! same, but it moves finished bytes out of memory: a flatbuffer only ever points forward (to
//! bytes written earlier), except a table's pointer to its vtable, and vtables are remembered
//! here by content. Memory is then one chunk, the vtables, and one `u32` per entry.
//!
//! Spill files are unnamed (`O_TMPFILE`) and readable by the owner only: nothing is left behind
//! when the build fails or the process dies.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::entry::{Entry, EntryKind};
use crate::{Error, Result};

/// Bytes kept in memory before they go to a spill file (also the read size when copying back).
pub(crate) const CHUNK: usize = 64 * 1024;

/// An unnamed file in `dir`, mode 0600, gone once closed.
pub(crate) fn spill_file(dir: &Path) -> Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let file = tempfile::tempfile_in(dir).map_err(spill_error(dir))?;
    // An unnamed file is created with the umask's mode; it holds a layer's file names.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(spill_error(dir))?;
    Ok(file)
}

/// How a spill file's I/O error reads.
pub(crate) fn spill_error(dir: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Spill {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Flatbuffers cannot address more than 2 GiB.
const MAX_BUFFER: u64 = (1 << 31) - 1;

/// A flatbuffer built back to front, byte-identical to `flatbuffers::FlatBufferBuilder` for the
/// same calls. Positions are "revpos": bytes from the position to the end of the buffer.
pub(crate) struct RevWriter<'d> {
    /// `buf[head..]` are the front-most bytes written, not yet spilled.
    buf: Vec<u8>,
    head: usize,
    /// Bytes moved to `spill`: the last `spilled` bytes of the buffer.
    spilled: u64,
    /// Spilled chunks in the order they were spilled (the buffer's last chunk first).
    chunks: Vec<u64>,
    spill: Option<File>,
    spill_dir: &'d Path,
    min_align: usize,
    /// Every distinct vtable written, by its bytes.
    vtables: HashMap<Vec<u8>, u32>,
    /// (vtable slot, revpos) of the fields of the table being built.
    fields: Vec<(u16, u32)>,
}

impl<'d> RevWriter<'d> {
    pub(crate) fn new(spill_dir: &'d Path) -> Self {
        Self {
            buf: vec![0; CHUNK],
            head: CHUNK,
            spilled: 0,
            chunks: Vec::new(),
            spill: None,
            spill_dir,
            min_align: 1,
            vtables: HashMap::new(),
            fields: Vec::new(),
        }
    }

    fn used(&self) -> u64 {
        self.spilled + (self.buf.len() - self.head) as u64
    }

    /// `used()` as a flatbuffer offset.
    fn revpos(&self) -> Result<u32> {
        u32::try_from(self.used())
            .ok()
            .filter(|&u| u64::from(u) <= MAX_BUFFER)
            .ok_or(Error::TooLarge {
                what: "zTOC flatbuffer",
                size: self.used(),
            })
    }

    /// `n` zeroed bytes in front of what is written; returns their index in `buf`.
    fn make_space(&mut self, n: usize) -> usize {
        if self.head < n {
            let live = self.buf.len() - self.head;
            let cap = (self.buf.len() * 2).max(live + n);
            let mut grown = vec![0; cap];
            grown[cap - live..].copy_from_slice(&self.buf[self.head..]);
            self.head = cap - live;
            self.buf = grown;
        }
        self.head -= n;
        self.buf[self.head..self.head + n].fill(0);
        self.head
    }

    fn align(&mut self, len: usize, alignment: usize) {
        self.min_align = self.min_align.max(alignment);
        let pad = (self.used() as usize).wrapping_add(len).wrapping_neg() & (alignment - 1);
        self.make_space(pad);
    }

    /// A little-endian scalar, aligned to its size.
    fn push<const N: usize>(&mut self, le: [u8; N]) -> Result<u32> {
        self.align(N, N);
        let at = self.make_space(N);
        self.buf[at..at + N].copy_from_slice(&le);
        self.revpos()
    }

    /// An offset to what was written at `target`.
    fn push_offset(&mut self, target: u32) -> Result<u32> {
        self.align(4, 4);
        let at = self.make_space(4);
        let here = self.revpos()?;
        self.buf[at..at + 4].copy_from_slice(&(here - target).to_le_bytes());
        Ok(here)
    }

    fn push_raw(&mut self, bytes: &[u8]) {
        let at = self.make_space(bytes.len());
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Move everything written so far out of memory once a chunk has piled up. Only between
    /// top-level objects: a table being built still needs its own bytes.
    pub(crate) fn maybe_spill(&mut self) -> Result<()> {
        let live = self.buf.len() - self.head;
        if live < CHUNK {
            return Ok(());
        }
        let file = match &mut self.spill {
            Some(f) => f,
            None => self.spill.insert(spill_file(self.spill_dir)?),
        };
        file.write_all(&self.buf[self.head..])
            .map_err(spill_error(self.spill_dir))?;
        self.chunks.push(live as u64);
        self.spilled += live as u64;
        self.head = self.buf.len();
        if self.buf.len() > 2 * CHUNK {
            // One huge object (a long name) grew the buffer: give the memory back.
            self.buf = vec![0; CHUNK];
            self.head = CHUNK;
        }
        Ok(())
    }

    pub(crate) fn create_byte_string(&mut self, data: &[u8]) -> Result<u32> {
        self.align(data.len() + 1, 4);
        self.push([0u8])?;
        self.push_raw(data);
        self.push((data.len() as u32).to_le_bytes())
    }

    /// A vector of offsets, first element first in the buffer.
    pub(crate) fn create_offset_vector(&mut self, targets: &[u32]) -> Result<u32> {
        self.align(targets.len() * 4, 4);
        for &t in targets.iter().rev() {
            self.push_offset(t)?;
        }
        self.push((targets.len() as u32).to_le_bytes())
    }

    /// A byte vector whose bytes come from `blob`, copied a chunk at a time from its end.
    pub(crate) fn create_byte_vector(&mut self, blob: &Blob) -> Result<u32> {
        let len = blob.len();
        let len32 = u32::try_from(len).map_err(|_| Error::TooLarge {
            what: "checkpoint blob",
            size: len,
        })?;
        self.align(len as usize, 4);
        let mut end = len;
        let mut chunk = vec![0; CHUNK];
        while end > 0 {
            let start = end.saturating_sub(CHUNK as u64);
            let piece = &mut chunk[..(end - start) as usize];
            blob.read_at(start, piece)?;
            self.push_raw(piece);
            self.maybe_spill()?;
            end = start;
        }
        self.push(len32.to_le_bytes())
    }

    pub(crate) fn start_table(&mut self) -> Result<u32> {
        self.fields.clear();
        self.revpos()
    }

    fn track(&mut self, slot: u16, at: u32) {
        self.fields.push((slot, at));
    }

    pub(crate) fn slot_offset(&mut self, slot: u16, target: u32) -> Result<()> {
        let at = self.push_offset(target)?;
        self.track(slot, at);
        Ok(())
    }

    pub(crate) fn slot_i64(&mut self, slot: u16, v: i64, default: i64) -> Result<()> {
        if v != default {
            let at = self.push(v.to_le_bytes())?;
            self.track(slot, at);
        }
        Ok(())
    }

    pub(crate) fn slot_i32(&mut self, slot: u16, v: i32, default: i32) -> Result<()> {
        if v != default {
            let at = self.push(v.to_le_bytes())?;
            self.track(slot, at);
        }
        Ok(())
    }

    pub(crate) fn slot_u32(&mut self, slot: u16, v: u32, default: u32) -> Result<()> {
        if v != default {
            let at = self.push(v.to_le_bytes())?;
            self.track(slot, at);
        }
        Ok(())
    }

    pub(crate) fn slot_i8(&mut self, slot: u16, v: i8, default: i8) -> Result<()> {
        if v != default {
            let at = self.push(v.to_le_bytes())?;
            self.track(slot, at);
        }
        Ok(())
    }

    /// Finish a table: its vtable is shared with an identical one written before, as
    /// flatbuffers' builder does, or written in front of it.
    pub(crate) fn end_table(&mut self, start: u32) -> Result<u32> {
        let object = self.push(0xF0F0_F0F0u32.to_le_bytes())?;
        let vt_len = self
            .fields
            .iter()
            .map(|&(slot, _)| usize::from(slot) + 2)
            .max()
            .unwrap_or(4);
        let mut vtable = vec![0u8; vt_len];
        vtable[..2].copy_from_slice(&(vt_len as u16).to_le_bytes());
        vtable[2..4].copy_from_slice(&((object - start) as u16).to_le_bytes());
        for &(slot, at) in &self.fields {
            let s = usize::from(slot);
            vtable[s..s + 2].copy_from_slice(&((object - at) as u16).to_le_bytes());
        }
        let vt_revpos = match self.vtables.get(&vtable) {
            Some(&revpos) => revpos,
            None => {
                self.push_raw(&vtable);
                let revpos = self.revpos()?;
                self.vtables.insert(vtable, revpos);
                revpos
            }
        };
        // The table's first word points at its vtable; the table is still in memory.
        let at = self.buf.len() - (u64::from(object) - self.spilled) as usize;
        let soffset = i64::from(vt_revpos) - i64::from(object);
        self.buf[at..at + 4].copy_from_slice(&(soffset as i32).to_le_bytes());
        self.fields.clear();
        Ok(object)
    }

    /// Write the root offset and copy the whole buffer, front first, to `out`.
    pub(crate) fn finish<W: Write>(mut self, root: u32, out: &mut W) -> Result<u64> {
        let min_align = self.min_align;
        self.align(4, min_align);
        self.push_offset(root)?;
        let total = self.used();
        out.write_all(&self.buf[self.head..])
            .map_err(Error::Output)?;
        if let Some(file) = &self.spill {
            let mut end = self.spilled;
            let mut piece = vec![0; CHUNK];
            for &len in self.chunks.iter().rev() {
                let start = end - len;
                let mut at = start;
                while at < end {
                    let n = (end - at).min(CHUNK as u64) as usize;
                    file.read_exact_at(&mut piece[..n], at)
                        .map_err(spill_error(self.spill_dir))?;
                    out.write_all(&piece[..n]).map_err(Error::Output)?;
                    at += n as u64;
                }
                end = start;
            }
        }
        Ok(total)
    }
}

/// A checkpoint blob: in memory, or in a spill file.
#[derive(Debug)]
pub(crate) enum Blob {
    /// Small blobs (tar, zstd) and blobs of in-memory builds.
    Memory(Vec<u8>),
    /// A gzip blob written to a spill file as checkpoints arrived.
    File {
        /// The spill directory.
        dir: PathBuf,
        /// The spill file.
        file: File,
        /// Its length.
        len: u64,
    },
}

impl Blob {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::Memory(v) => v.len() as u64,
            Self::File { len, .. } => *len,
        }
    }

    /// The blob's bytes in memory.
    pub(crate) fn into_vec(self) -> Result<Vec<u8>> {
        match self {
            Self::Memory(v) => Ok(v),
            Self::File { dir, file, len } => {
                // The length of a file this build wrote, not one an input claims.
                let mut v = vec![0; len as usize];
                file.read_exact_at(&mut v, 0).map_err(spill_error(&dir))?;
                Ok(v)
            }
        }
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Self::Memory(v) => buf.copy_from_slice(&v[at as usize..at as usize + buf.len()]),
            Self::File { file, dir, .. } => {
                file.read_exact_at(buf, at).map_err(spill_error(dir))?
            }
        }
        Ok(())
    }
}

/// Where a checkpoint blob is written as it grows.
#[derive(Debug)]
pub(crate) enum BlobSink {
    /// Kept in memory.
    Memory(Vec<u8>),
    /// Written to a spill file in a directory.
    File(BufWriter<File>, PathBuf),
}

impl BlobSink {
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Self::Memory(v) => v.extend_from_slice(bytes),
            Self::File(f, dir) => f.write_all(bytes).map_err(spill_error(dir))?,
        }
        Ok(())
    }

    /// Overwrite the first bytes (a count known only at the end) and hand the blob over.
    pub(crate) fn finish(self, head: &[u8]) -> Result<Blob> {
        match self {
            Self::Memory(mut v) => {
                v[..head.len()].copy_from_slice(head);
                Ok(Blob::Memory(v))
            }
            Self::File(f, dir) => {
                let failed = spill_error(&dir);
                let file = f.into_inner().map_err(|e| failed(e.into_error()))?;
                let len = file
                    .write_all_at(head, 0)
                    .and_then(|()| file.metadata())
                    .map_err(spill_error(&dir))?
                    .len();
                Ok(Blob::File { dir, file, len })
            }
        }
    }
}

/// Entries written to a spill file in archive order, read back last first.
#[derive(Debug)]
pub(crate) struct EntrySpill {
    dir: PathBuf,
    out: BufWriter<File>,
    record: Vec<u8>,
    count: u64,
}

impl EntrySpill {
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            out: BufWriter::with_capacity(CHUNK, spill_file(dir)?),
            record: Vec::new(),
            count: 0,
        })
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Record layout: fixed fields, length-prefixed byte strings, then the record's length, so
    /// that records can be read from the end.
    pub(crate) fn push(&mut self, e: &Entry) -> Result<()> {
        let r = &mut self.record;
        r.clear();
        r.push(e.kind as u8);
        for v in [e.offset, e.size] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        for v in [e.mode, e.devmajor, e.devminor] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        for v in [e.uid, e.gid, e.pax.len() as u32] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        let strings = [&e.name, &e.linkname, &e.uname, &e.gname, &e.mod_time];
        for s in strings
            .into_iter()
            .chain(e.pax.iter().flat_map(|(k, v)| [k, v]))
        {
            r.extend_from_slice(&(s.len() as u32).to_le_bytes());
            r.extend_from_slice(s);
        }
        let len = u32::try_from(r.len()).map_err(|_| Error::TooLarge {
            what: "tar entry",
            size: r.len() as u64,
        })?;
        r.extend_from_slice(&len.to_le_bytes());
        self.out.write_all(r).map_err(spill_error(&self.dir))?;
        self.count += 1;
        Ok(())
    }

    /// The entries, last first.
    pub(crate) fn into_reverse(self) -> Result<ReverseEntries> {
        let failed = spill_error(&self.dir);
        let mut file = self.out.into_inner().map_err(|e| failed(e.into_error()))?;
        let end = file
            .seek(SeekFrom::End(0))
            .map_err(spill_error(&self.dir))?;
        Ok(ReverseEntries {
            dir: self.dir,
            file,
            window_start: end,
            window: Vec::new(),
            left: self.count,
        })
    }
}

/// Reads an [`EntrySpill`] back from its end through a window of about one chunk.
#[derive(Debug)]
pub(crate) struct ReverseEntries {
    dir: PathBuf,
    file: File,
    /// File offset of `window[0]`; `window` ends where the unread part ends.
    window_start: u64,
    window: Vec<u8>,
    left: u64,
}

impl ReverseEntries {
    fn corrupt(&self) -> Error {
        Error::Spill {
            dir: self.dir.clone(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "entry spill file changed under the build",
            ),
        }
    }
}

impl ReverseEntries {
    /// The last `n` unread bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        if self.window.len() < n {
            let unread_end = self.window_start + self.window.len() as u64;
            let want = (n.max(CHUNK) as u64).min(unread_end);
            if want < n as u64 {
                return Err(self.corrupt());
            }
            let start = unread_end - want;
            let mut fresh = vec![0; want as usize];
            self.file
                .read_exact_at(&mut fresh, start)
                .map_err(spill_error(&self.dir))?;
            self.window = fresh;
            self.window_start = start;
        }
        Ok(self.window.split_off(self.window.len() - n))
    }

    /// The previous entry, or `None` before the first.
    pub(crate) fn next_back(&mut self) -> Result<Option<Entry>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let len = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| self.corrupt())?);
        let record = self.take(len as usize)?;
        decode(&record).map(Some).ok_or_else(|| self.corrupt())
    }
}

/// Read exactly `N` bytes from a record.
fn fixed<const N: usize>(r: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = r.split_first_chunk::<N>()?;
    *r = rest;
    Some(*head)
}

fn string(r: &mut &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_le_bytes(fixed(r)?) as usize;
    let (s, rest) = r.split_at_checked(len)?;
    *r = rest;
    Some(s.to_vec())
}

fn decode(mut r: &[u8]) -> Option<Entry> {
    let r = &mut r;
    let kind = match fixed::<1>(r)?[0] {
        k if k == EntryKind::Reg as u8 => EntryKind::Reg,
        k if k == EntryKind::Dir as u8 => EntryKind::Dir,
        k if k == EntryKind::Symlink as u8 => EntryKind::Symlink,
        k if k == EntryKind::Hardlink as u8 => EntryKind::Hardlink,
        k if k == EntryKind::Char as u8 => EntryKind::Char,
        k if k == EntryKind::Block as u8 => EntryKind::Block,
        k if k == EntryKind::Fifo as u8 => EntryKind::Fifo,
        _ => return None,
    };
    let offset = u64::from_le_bytes(fixed(r)?);
    let size = u64::from_le_bytes(fixed(r)?);
    let mode = i64::from_le_bytes(fixed(r)?);
    let devmajor = i64::from_le_bytes(fixed(r)?);
    let devminor = i64::from_le_bytes(fixed(r)?);
    let uid = u32::from_le_bytes(fixed(r)?);
    let gid = u32::from_le_bytes(fixed(r)?);
    let pax_count = u32::from_le_bytes(fixed(r)?);
    let (name, linkname, uname, gname, mod_time) =
        (string(r)?, string(r)?, string(r)?, string(r)?, string(r)?);
    // Each record holds at least its two lengths: a count the record cannot hold is corrupt.
    if u64::from(pax_count) * 8 > r.len() as u64 {
        return None;
    }
    let mut pax = Vec::with_capacity(pax_count as usize);
    for _ in 0..pax_count {
        pax.push((string(r)?, string(r)?));
    }
    r.is_empty().then_some(Entry {
        name,
        kind,
        offset,
        size,
        linkname,
        mode,
        uid,
        gid,
        uname,
        gname,
        mod_time,
        devmajor,
        devminor,
        pax,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn spill_files_are_private_and_have_no_name() {
        let dir = tempfile::tempdir().expect("dir");
        let mut file = spill_file(dir.path()).expect("spill file");
        file.write_all(b"entries").expect("write");
        let mode = file.metadata().expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "a spill file has no name in its directory"
        );
    }

    #[test]
    fn entries_come_back_last_first_across_windows() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spill = EntrySpill::new(dir.path()).expect("spill");
        let entry = |i: usize| Entry {
            name: format!("dir/{i}").repeat(1 + i % 7).into_bytes(),
            kind: [EntryKind::Reg, EntryKind::Dir, EntryKind::Fifo][i % 3],
            offset: i as u64 * 512,
            size: i as u64,
            linkname: vec![b'l'; i % 3],
            mode: 0o644,
            uid: i as u32,
            gid: 7,
            uname: b"root".to_vec(),
            gname: Vec::new(),
            mod_time: b"2023-11-14T22:13:20Z".to_vec(),
            devmajor: -1,
            devminor: i as i64,
            pax: (0..i % 4)
                .map(|k| (format!("k{k}").into_bytes(), vec![k as u8; i % 300]))
                .collect(),
        };
        // Far more than one window of records, and one record larger than a window.
        let mut big = entry(3);
        big.name = vec![b'n'; 3 * CHUNK];
        let mut all: Vec<Entry> = (0..5000).map(entry).collect();
        all.insert(2500, big);
        for e in &all {
            spill.push(e).expect("push");
        }
        let mut back = spill.into_reverse().expect("reverse");
        for e in all.iter().rev() {
            assert_eq!(back.next_back().expect("read").as_ref(), Some(e));
        }
        assert_eq!(back.next_back().expect("end"), None);
    }
}
