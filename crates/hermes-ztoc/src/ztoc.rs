//! The zTOC: SOCI's flatbuffer (spec §1), its validation, and its span geometry.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::entry::{Entry, EntryKind};
use crate::fbread::Table;
use crate::stream::{Blob, RevWriter, ReverseEntries};
use crate::zinfo::{Compression, Zinfo};
use crate::{Error, Result};

/// The only zTOC version soci writes and reads.
pub const ZTOC_VERSION: &str = "0.9";
/// soci's default build tool identifier; use it to get byte-identical zTOCs.
pub const SOCI_BUILD_TOOL_IDENTIFIER: &str = "AWS SOCI CLI v0.2";
/// Default span size (4 MiB), as soci.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;

/// Index of a span: `0..=max_span_id`.
pub type SpanId = u32;

/// A contiguous piece of the layer that can be decoded on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Which span.
    pub id: SpanId,
    /// Its bytes in the layer blob.
    pub compressed: Range<u64>,
    /// The tar bytes it decodes to.
    pub uncompressed: Range<u64>,
}

/// A table of contents of one layer plus what is needed to decode any span of it.
#[derive(Debug, Clone)]
pub struct Ztoc {
    version: String,
    build_tool_identifier: String,
    compressed_archive_size: u64,
    uncompressed_archive_size: u64,
    entries: Vec<Entry>,
    compression: Compression,
    span_digests: Vec<String>,
    /// The checkpoint blob; empty for a zTOC [`Ztoc::open`]ed with its windows left in the file.
    checkpoints: Vec<u8>,
    zinfo: Zinfo,
    /// Where the gzip windows are read from when they are not in `checkpoints`.
    windows: Option<Arc<WindowFile>>,
}

/// The zTOC file a zTOC was opened from: its checkpoint blob starts at byte `at`.
#[derive(Debug)]
struct WindowFile {
    file: File,
    at: u64,
}

/// The parts a builder hands over; [`Ztoc::from_parts`] validates them.
#[derive(Debug)]
pub(crate) struct Parts {
    pub build_tool_identifier: String,
    pub compressed_archive_size: u64,
    pub uncompressed_archive_size: u64,
    pub entries: Vec<Entry>,
    pub compression: Compression,
    pub span_digests: Vec<String>,
    pub checkpoints: Vec<u8>,
}

// Flatbuffer vtable slots: 4 + 2 * field id.
mod slot {
    pub const ZTOC_VERSION: u16 = 4;
    pub const ZTOC_BTI: u16 = 6;
    pub const ZTOC_CSIZE: u16 = 8;
    pub const ZTOC_USIZE: u16 = 10;
    pub const ZTOC_TOC: u16 = 12;
    pub const ZTOC_CINFO: u16 = 14;
    pub const TOC_METADATA: u16 = 4;
    pub const CI_ALGORITHM: u16 = 4;
    pub const CI_MAX_SPAN: u16 = 6;
    pub const CI_DIGESTS: u16 = 8;
    pub const CI_CHECKPOINTS: u16 = 10;
    pub const XATTR_KEY: u16 = 4;
    pub const XATTR_VALUE: u16 = 6;
}

impl Ztoc {
    pub(crate) fn from_parts(parts: Parts) -> Result<Self> {
        let zinfo = Zinfo::parse(parts.compression, &parts.checkpoints)?;
        let ztoc = Self {
            version: ZTOC_VERSION.to_owned(),
            build_tool_identifier: parts.build_tool_identifier,
            compressed_archive_size: parts.compressed_archive_size,
            uncompressed_archive_size: parts.uncompressed_archive_size,
            entries: parts.entries,
            compression: parts.compression,
            span_digests: parts.span_digests,
            checkpoints: parts.checkpoints,
            zinfo,
            windows: None,
        };
        ztoc.validate()?;
        Ok(ztoc)
    }

    /// The zTOC format version (`"0.9"`).
    pub fn version(&self) -> &str {
        &self.version
    }
    /// Who built it.
    pub fn build_tool_identifier(&self) -> &str {
        &self.build_tool_identifier
    }
    /// Size of the layer blob.
    pub fn compressed_archive_size(&self) -> u64 {
        self.compressed_archive_size
    }
    /// Size of the tar stream up to and including its end-of-archive marker.
    pub fn uncompressed_archive_size(&self) -> u64 {
        self.uncompressed_archive_size
    }
    /// Tar entries in archive order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// How the layer is compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }
    /// Whether soci-snapshotter can serve this zTOC: not for zstd, and not with sparse files
    /// (Hermes keeps their entries on the packed data, which soci would serve as the file).
    pub fn is_soci_compatible(&self) -> bool {
        self.compression.is_soci_compatible() && !self.entries.iter().any(|e| e.sparse().is_some())
    }
    /// Span size the zTOC was built with.
    pub fn span_size(&self) -> u64 {
        self.zinfo.span_size()
    }
    /// Number of spans (`max_span_id + 1`).
    pub fn span_count(&self) -> u32 {
        self.zinfo.span_count() as u32
    }
    /// `sha256:<hex>` of each span's compressed bytes.
    pub fn span_digests(&self) -> &[String] {
        &self.span_digests
    }
    /// The raw checkpoint blob (empty for a zTOC [`Ztoc::open`]ed with its windows left in the
    /// file).
    pub fn checkpoints(&self) -> &[u8] {
        &self.checkpoints
    }

    /// Span `id`'s compressed and uncompressed ranges.
    pub fn span(&self, id: SpanId) -> Option<Span> {
        let i = u64::from(id);
        (i < self.zinfo.span_count()).then(|| Span {
            id,
            compressed: self.zinfo.compressed_range(i, self.compressed_archive_size),
            uncompressed: self.zinfo.uncompressed_range(
                i,
                self.uncompressed_archive_size,
                self.compressed_archive_size,
            ),
        })
    }

    /// All spans in order.
    pub fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        (0..self.span_count()).filter_map(|id| self.span(id))
    }

    /// The span that holds uncompressed offset `off`.
    pub fn span_of(&self, off: u64) -> SpanId {
        self.zinfo.span_of(off) as SpanId
    }

    pub(crate) fn zinfo(&self) -> &Zinfo {
        &self.zinfo
    }

    /// The gzip history window checkpoint `id` resumes with (`None`: all zeros), from memory or
    /// from the file the zTOC was opened from.
    pub(crate) fn window(&self, id: SpanId) -> Result<Option<Cow<'_, [u8]>>> {
        let Some(at) = self.zinfo.point(u64::from(id)).window else {
            return Ok(None);
        };
        let Some(windows) = &self.windows else {
            return Ok(self
                .checkpoints
                .get(at..at + crate::zinfo::WINDOW_SIZE)
                .map(Cow::Borrowed));
        };
        let mut window = vec![0; crate::zinfo::WINDOW_SIZE];
        windows
            .file
            .read_exact_at(&mut window, windows.at + at as u64)
            .map_err(Error::Io)?;
        Ok(Some(Cow::Owned(window)))
    }

    /// Move the entries out, leaving none: for a server that has built its inode table from
    /// them and keeps the zTOC only to read spans (the entries are most of a parsed zTOC's
    /// memory). [`Ztoc::entries`] is empty afterwards.
    pub fn take_entries(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.entries)
    }

    /// Map of cleaned path → entry index; later entries win, as when unpacking.
    pub fn path_index(&self) -> Result<HashMap<Vec<u8>, usize>> {
        let mut index = HashMap::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            if let Some(path) = e.path()? {
                index.insert(path, i);
            }
        }
        Ok(index)
    }

    /// Check everything a reader relies on (spec §1.2, §5.3 and bounds).
    fn validate(&self) -> Result<()> {
        if self.version != ZTOC_VERSION {
            return Err(Error::Invalid {
                what: "unsupported zTOC version",
                index: 0,
            });
        }
        check_geometry(&Geometry {
            zinfo: &self.zinfo,
            compression: self.compression,
            compressed_archive_size: self.compressed_archive_size,
            uncompressed_archive_size: self.uncompressed_archive_size,
            span_digests: &self.span_digests,
        })?;
        // Readers derive each header offset from the previous entry's end (spec §1.2).
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&i| self.entries[i].offset);
        let mut check = EntryOrder::default();
        for i in order {
            check.admit(i as u64, &self.entries[i])?;
        }
        check.finish(self.uncompressed_archive_size)
    }

    /// Serialize exactly as soci's Go marshaler does (spec §1.3).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.serialize(self.span_count() as i32 - 1)
    }

    fn serialize(&self, max_span_id: i32) -> Vec<u8> {
        let mut b = FlatBufferBuilder::with_capacity(
            self.checkpoints.len() + 256 * self.entries.len() + 1024,
        );
        let version = b.create_byte_string(self.version.as_bytes());
        let bti = b.create_byte_string(self.build_tool_identifier.as_bytes());

        let mut metadata = vec![WIPOffset::new(0); self.entries.len()];
        for (i, e) in self.entries.iter().enumerate().rev() {
            metadata[i] = write_entry(&mut b, e);
        }
        let metadata = b.create_vector(&metadata);
        let toc_start = b.start_table();
        b.push_slot_always(slot::TOC_METADATA, metadata);
        let toc = b.end_table(toc_start);

        let checkpoints = b.create_vector(&self.checkpoints);
        let digests: Vec<_> = self
            .span_digests
            .iter()
            .map(|d| b.create_byte_string(d.as_bytes()))
            .collect();
        let digests = b.create_vector(&digests);
        let ci_start = b.start_table();
        b.push_slot::<i32>(slot::CI_MAX_SPAN, max_span_id, 0);
        b.push_slot_always(slot::CI_DIGESTS, digests);
        b.push_slot_always(slot::CI_CHECKPOINTS, checkpoints);
        b.push_slot::<i8>(
            slot::CI_ALGORITHM,
            self.compression.to_fb(),
            Compression::Gzip.to_fb(),
        );
        let ci = b.end_table(ci_start);

        let root_start = b.start_table();
        b.push_slot_always(slot::ZTOC_VERSION, version);
        b.push_slot_always(slot::ZTOC_BTI, bti);
        b.push_slot_always(slot::ZTOC_TOC, toc);
        b.push_slot::<i64>(slot::ZTOC_CSIZE, self.compressed_archive_size as i64, 0);
        b.push_slot::<i64>(slot::ZTOC_USIZE, self.uncompressed_archive_size as i64, 0);
        b.push_slot_always(slot::ZTOC_CINFO, ci);
        let root = b.end_table(root_start);
        b.finish_minimal(root);
        b.finished_data().to_vec()
    }

    /// Parse and validate a zTOC. Hostile input yields an error, never a panic; memory use is
    /// bounded by a small multiple of the input size: a zTOC whose entries would take more than
    /// four times its size (they share tables or strings) is [`Error::DecodeTooLarge`].
    pub fn from_bytes(buf: &[u8]) -> Result<Self> {
        Self::parse(buf, None)
    }

    /// The uncompressed archive size a zTOC declares, read from its root table alone: for a
    /// caller that only needs the size of a zTOC it validated before (or that a server will
    /// validate when it opens it). Nothing else is checked; hostile input gives an error.
    pub fn peek_uncompressed_size(buf: &[u8]) -> Result<u64> {
        uncompressed_size(&Table::root(buf)?)
    }

    /// Open a zTOC file for reading spans: parsed and validated as [`Ztoc::from_bytes`], but its
    /// gzip windows (32 KiB per span, most of a zTOC of small spans) stay in the file and are
    /// read from it when a span is decoded, so a mounted layer's memory does not grow with its
    /// span count. The file is read through the handle that is kept, so the windows read later
    /// are the ones validated, as long as nobody rewrites the file in place (stores replace
    /// files by renaming). [`Ztoc::checkpoints`] is empty, and [`Ztoc::to_bytes`] must not be
    /// used on it.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(Error::Io)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(Error::Io)?;
        Self::parse(&buf, Some(file))
    }

    /// Parse `buf`; with `file` (the file `buf` was read from), a gzip zTOC's windows are left
    /// in it instead of copied.
    fn parse(buf: &[u8], file: Option<File>) -> Result<Self> {
        let mut budget = Budget::new(buf.len());
        let root = Table::root(buf)?;
        let version = utf8(budget.copy(root.bytes(0, "version")?)?, "version")?;
        if version != ZTOC_VERSION {
            return Err(Error::Invalid {
                what: "unsupported zTOC version",
                index: 0,
            });
        }
        let build_tool_identifier = utf8(
            budget.copy(root.bytes(1, "build tool identifier")?)?,
            "build tool identifier",
        )?;
        let compressed_archive_size = non_negative(
            root.i64(2, 0, "compressed archive size")?,
            "compressed archive size",
        )?;
        let uncompressed_archive_size = uncompressed_size(&root)?;
        let entries = match root.table(4, "toc")? {
            None => Vec::new(),
            Some(toc) => {
                let list = toc.vector(0, "toc metadata")?;
                budget.reserve::<Entry>(list.len())?;
                let mut entries = Vec::with_capacity(list.len());
                for i in 0..list.len() {
                    entries.push(read_entry(&list.table(i)?, i, &mut budget)?);
                }
                entries
            }
        };
        let ci = root.table(5, "compression info")?.ok_or(Error::Invalid {
            what: "no compression info",
            index: 0,
        })?;
        let compression =
            Compression::from_fb(ci.i8(0, Compression::Gzip.to_fb(), "compression algorithm")?)?;
        let max_span_id = ci.i32(1, 0, "max span id")?;
        let list = ci.vector(2, "span digests")?;
        budget.reserve::<String>(list.len())?;
        let mut span_digests = Vec::with_capacity(list.len());
        for i in 0..list.len() {
            span_digests.push(utf8(budget.copy(list.bytes(i)?)?, "span digest")?);
        }
        let blob = ci.bytes(3, "checkpoints")?;
        let zinfo = Zinfo::parse(compression, blob)?;
        // A gzip blob's windows are only read through `window`; other blobs are small and read
        // whole (a plain tar's or zstd's geometry is the blob itself).
        let (checkpoints, windows) = match file {
            Some(file) if compression == Compression::Gzip => {
                let at = (blob.as_ptr() as usize - buf.as_ptr() as usize) as u64;
                (Vec::new(), Some(Arc::new(WindowFile { file, at })))
            }
            _ => (budget.copy(blob)?, None),
        };
        budget.reserve::<crate::zinfo::Point>(zinfo.stored_points())?;
        if i64::from(max_span_id) + 1 != zinfo.span_count() as i64 {
            return Err(Error::Invalid {
                what: "max_span_id differs from the checkpoint count",
                index: max_span_id as u64,
            });
        }
        let ztoc = Self {
            version,
            build_tool_identifier,
            compressed_archive_size,
            uncompressed_archive_size,
            entries,
            compression,
            span_digests,
            checkpoints,
            zinfo,
            windows,
        };
        ztoc.validate()?;
        Ok(ztoc)
    }
}

/// The span geometry and sizes of a zTOC, checked before anything reads through it.
pub(crate) struct Geometry<'a> {
    pub zinfo: &'a Zinfo,
    pub compression: Compression,
    pub compressed_archive_size: u64,
    pub uncompressed_archive_size: u64,
    pub span_digests: &'a [String],
}

/// Spec §5.3 checks on the checkpoints and digests, plus bounds readers rely on.
pub(crate) fn check_geometry(g: &Geometry<'_>) -> Result<()> {
    g.zinfo.validate(g.compressed_archive_size)?;
    if g.span_digests.len() as u64 != g.zinfo.span_count() {
        return Err(Error::Invalid {
            what: "span digest count differs from the span count",
            index: g.span_digests.len() as u64,
        });
    }
    for (i, d) in g.span_digests.iter().enumerate() {
        if !is_sha256_digest(d) {
            return Err(Error::Invalid {
                what: "span digest is not sha256:<64 hex>",
                index: i as u64,
            });
        }
    }
    // After the digest count check, which bounds the span count by the buffer size.
    // Readers size buffers from a span's uncompressed length, which nothing verifies (the
    // digests cover compressed bytes): a claim its compressed bytes cannot hold is corrupt.
    for i in 0..g.zinfo.span_count() {
        let compressed = g.zinfo.compressed_range(i, g.compressed_archive_size);
        let uncompressed =
            g.zinfo
                .uncompressed_range(i, g.uncompressed_archive_size, g.compressed_archive_size);
        if uncompressed.end - uncompressed.start
            > (compressed.end - compressed.start).saturating_mul(g.compression.max_expansion())
        {
            return Err(Error::Invalid {
                what: "span decodes to more bytes than its compressed bytes can hold",
                index: i,
            });
        }
    }
    if g.uncompressed_archive_size > 0
        && g.compression == Compression::Uncompressed
        && g.uncompressed_archive_size > g.compressed_archive_size
    {
        return Err(Error::Invalid {
            what: "tar larger than its blob",
            index: 0,
        });
    }
    Ok(())
}

/// Entries fed in offset order must not overlap, and data must end inside the tar.
#[derive(Debug, Default)]
pub(crate) struct EntryOrder {
    next_header: u64,
    /// (end of the data that ends last, its entry).
    data_end: Option<(u64, u64)>,
}

impl EntryOrder {
    pub(crate) fn admit(&mut self, index: u64, e: &Entry) -> Result<()> {
        let end = e.offset.checked_add(e.size).ok_or(Error::Invalid {
            what: "entry size overflows",
            index,
        })?;
        if self.next_header > e.offset {
            return Err(Error::Invalid {
                what: "entry overlaps the previous entry",
                index,
            });
        }
        if e.kind.has_data() && self.data_end.is_none_or(|(last, _)| end > last) {
            self.data_end = Some((end, index));
        }
        self.next_header = end.div_ceil(512) * 512;
        Ok(())
    }

    pub(crate) fn finish(&self, uncompressed_archive_size: u64) -> Result<()> {
        match self.data_end {
            Some((end, index)) if end > uncompressed_archive_size => Err(Error::Invalid {
                what: "entry data beyond the end of the tar",
                index,
            }),
            _ => Ok(()),
        }
    }
}

/// A built zTOC whose entries and checkpoints wait in spill files, written without ever
/// holding the flatbuffer ([`Ztoc::to_bytes`]'s bytes, front to back).
pub(crate) struct Streamed<'a> {
    pub build_tool_identifier: &'a str,
    pub compressed_archive_size: u64,
    pub uncompressed_archive_size: u64,
    pub compression: Compression,
    pub max_span_id: i32,
    pub span_digests: &'a [String],
    pub checkpoints: &'a Blob,
    pub entries: ReverseEntries,
    pub entry_count: u64,
}

impl Streamed<'_> {
    /// The same builder calls, in the same order, as [`Ztoc::serialize`].
    pub(crate) fn write<W: Write>(mut self, spill_dir: &Path, out: &mut W) -> Result<u64> {
        let mut b = RevWriter::new(spill_dir);
        let version = b.create_byte_string(ZTOC_VERSION.as_bytes())?;
        let bti = b.create_byte_string(self.build_tool_identifier.as_bytes())?;
        let mut metadata = Vec::new();
        while let Some(e) = self.entries.next_back()? {
            metadata.push(write_entry_streamed(&mut b, &e)?);
            b.maybe_spill()?;
        }
        if metadata.len() as u64 != self.entry_count {
            return Err(Error::Invalid {
                what: "entry spill holds a different number of entries",
                index: metadata.len() as u64,
            });
        }
        metadata.reverse();
        let metadata = b.create_offset_vector(&metadata)?;
        let toc_start = b.start_table()?;
        b.slot_offset(slot::TOC_METADATA, metadata)?;
        let toc = b.end_table(toc_start)?;

        let checkpoints = b.create_byte_vector(self.checkpoints)?;
        let mut digests = Vec::with_capacity(self.span_digests.len());
        for d in self.span_digests {
            digests.push(b.create_byte_string(d.as_bytes())?);
        }
        let digests = b.create_offset_vector(&digests)?;
        let ci_start = b.start_table()?;
        b.slot_i32(slot::CI_MAX_SPAN, self.max_span_id, 0)?;
        b.slot_offset(slot::CI_DIGESTS, digests)?;
        b.slot_offset(slot::CI_CHECKPOINTS, checkpoints)?;
        b.slot_i8(
            slot::CI_ALGORITHM,
            self.compression.to_fb(),
            Compression::Gzip.to_fb(),
        )?;
        let ci = b.end_table(ci_start)?;

        let root_start = b.start_table()?;
        b.slot_offset(slot::ZTOC_VERSION, version)?;
        b.slot_offset(slot::ZTOC_BTI, bti)?;
        b.slot_offset(slot::ZTOC_TOC, toc)?;
        b.slot_i64(slot::ZTOC_CSIZE, self.compressed_archive_size as i64, 0)?;
        b.slot_i64(slot::ZTOC_USIZE, self.uncompressed_archive_size as i64, 0)?;
        b.slot_offset(slot::ZTOC_CINFO, ci)?;
        let root = b.end_table(root_start)?;
        b.finish(root, out)
    }
}

/// [`write_entry`] on a [`RevWriter`].
fn write_entry_streamed(b: &mut RevWriter<'_>, e: &Entry) -> Result<u32> {
    let name = b.create_byte_string(&e.name)?;
    let kind = b.create_byte_string(e.kind.as_str().as_bytes())?;
    let linkname = b.create_byte_string(&e.linkname)?;
    let uname = b.create_byte_string(&e.uname)?;
    let gname = b.create_byte_string(&e.gname)?;
    let mod_time = b.create_byte_string(&e.mod_time)?;
    let mut xattrs = Vec::with_capacity(e.pax.len());
    for (k, v) in &e.pax {
        let key = b.create_byte_string(k)?;
        let value = b.create_byte_string(v)?;
        let start = b.start_table()?;
        b.slot_offset(slot::XATTR_KEY, key)?;
        b.slot_offset(slot::XATTR_VALUE, value)?;
        xattrs.push(b.end_table(start)?);
    }
    let xattrs = b.create_offset_vector(&xattrs)?;
    let start = b.start_table()?;
    b.slot_offset(4, name)?;
    b.slot_offset(6, kind)?;
    b.slot_i64(8, e.offset as i64, 0)?;
    b.slot_i64(10, e.size as i64, 0)?;
    b.slot_offset(12, linkname)?;
    b.slot_i64(14, e.mode, 0)?;
    b.slot_u32(16, e.uid, 0)?;
    b.slot_u32(18, e.gid, 0)?;
    b.slot_offset(20, uname)?;
    b.slot_offset(22, gname)?;
    b.slot_offset(24, mod_time)?;
    b.slot_i64(26, e.devmajor, 0)?;
    b.slot_i64(28, e.devminor, 0)?;
    b.slot_offset(30, xattrs)?;
    b.end_table(start)
}

fn write_entry<'b>(
    b: &mut FlatBufferBuilder<'b>,
    e: &Entry,
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let name = b.create_byte_string(&e.name);
    let kind = b.create_byte_string(e.kind.as_str().as_bytes());
    let linkname = b.create_byte_string(&e.linkname);
    let uname = b.create_byte_string(&e.uname);
    let gname = b.create_byte_string(&e.gname);
    let mod_time = b.create_byte_string(&e.mod_time);
    let mut xattrs = Vec::with_capacity(e.pax.len());
    for (k, v) in &e.pax {
        let key = b.create_byte_string(k);
        let value = b.create_byte_string(v);
        let start = b.start_table();
        b.push_slot_always(slot::XATTR_KEY, key);
        b.push_slot_always(slot::XATTR_VALUE, value);
        xattrs.push(b.end_table(start));
    }
    let xattrs = b.create_vector(&xattrs);
    let start = b.start_table();
    b.push_slot_always(4, name);
    b.push_slot_always(6, kind);
    b.push_slot::<i64>(8, e.offset as i64, 0);
    b.push_slot::<i64>(10, e.size as i64, 0);
    b.push_slot_always(12, linkname);
    b.push_slot::<i64>(14, e.mode, 0);
    b.push_slot::<u32>(16, e.uid, 0);
    b.push_slot::<u32>(18, e.gid, 0);
    b.push_slot_always(20, uname);
    b.push_slot_always(22, gname);
    b.push_slot_always(24, mod_time);
    b.push_slot::<i64>(26, e.devmajor, 0);
    b.push_slot::<i64>(28, e.devminor, 0);
    b.push_slot_always(30, xattrs);
    b.end_table(start)
}

fn read_entry(t: &Table<'_>, index: usize, budget: &mut Budget) -> Result<Entry> {
    let kind = EntryKind::from_bytes(t.bytes(1, "entry type")?).ok_or(Error::Invalid {
        what: "unknown entry type",
        index: index as u64,
    })?;
    let list = t.vector(13, "xattrs")?;
    budget.reserve::<(Vec<u8>, Vec<u8>)>(list.len())?;
    let mut pax = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let x = list.table(i)?;
        pax.push((
            budget.copy(x.bytes(0, "xattr key")?)?,
            budget.copy(x.bytes(1, "xattr value")?)?,
        ));
    }
    let offset = t.i64(2, 0, "entry offset")?;
    let size = t.i64(3, 0, "entry size")?;
    let (Ok(offset), Ok(size)) = (u64::try_from(offset), u64::try_from(size)) else {
        return Err(Error::Invalid {
            what: "negative entry offset or size",
            index: index as u64,
        });
    };
    Ok(Entry {
        name: budget.copy(t.bytes(0, "entry name")?)?,
        kind,
        offset,
        size,
        linkname: budget.copy(t.bytes(4, "entry linkname")?)?,
        mode: t.i64(5, 0, "entry mode")?,
        uid: t.u32(6, 0, "entry uid")?,
        gid: t.u32(7, 0, "entry gid")?,
        uname: budget.copy(t.bytes(8, "entry uname")?)?,
        gname: budget.copy(t.bytes(9, "entry gname")?)?,
        mod_time: budget.copy(t.bytes(10, "entry mod time")?)?,
        devmajor: t.i64(11, 0, "entry devmajor")?,
        devminor: t.i64(12, 0, "entry devminor")?,
        pax,
    })
}

fn utf8(b: Vec<u8>, what: &'static str) -> Result<String> {
    String::from_utf8(b).map_err(|_| Error::Malformed { at: 0, what })
}

/// The root table's uncompressed archive size (field 3).
fn uncompressed_size(root: &Table<'_>) -> Result<u64> {
    non_negative(
        root.i64(3, 0, "uncompressed archive size")?,
        "uncompressed archive size",
    )
}

fn non_negative(v: i64, what: &'static str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Malformed { at: 0, what })
}

/// How many bytes of memory a parsed zTOC may take per byte of its buffer. Without sharing,
/// every entry is a table of about a hundred bytes or more and every string is stored once, so
/// decoding takes at most about twice the buffer. More means that entries share tables or
/// strings, which no builder writes: offsets to one large name made a 1.06 MB zTOC decode to
/// 2 GB.
const DECODE_FACTOR: usize = 4;

/// Small allocations cost the allocator at least this much beyond their bytes.
const ALLOCATION_OVERHEAD: usize = 16;

/// The memory a parse may take, charged before anything is allocated.
#[derive(Debug)]
struct Budget {
    size: usize,
    limit: usize,
    used: usize,
}

impl Budget {
    fn new(size: usize) -> Self {
        Self {
            size,
            // The floor lets tiny zTOCs (an empty layer) parse.
            limit: size.saturating_mul(DECODE_FACTOR).max(4096),
            used: 0,
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<()> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(Error::DecodeTooLarge {
                size: self.size as u64,
                limit: self.limit as u64,
            });
        }
        Ok(())
    }

    /// Charge for `count` values of `T` about to be allocated.
    fn reserve<T>(&mut self, count: usize) -> Result<()> {
        self.charge(count.saturating_mul(std::mem::size_of::<T>()))
    }

    /// Copy a string out of the buffer, charging for it.
    fn copy(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        if !bytes.is_empty() {
            self.charge(bytes.len().saturating_add(ALLOCATION_OVERHEAD))?;
        }
        Ok(bytes.to_vec())
    }
}

/// `sha256:` followed by 64 lower-case hex digits.
pub(crate) fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// Format a SHA-256 as `sha256:<hex>`.
pub(crate) fn digest_string(hash: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zinfo::{GZIP_HEADER_LEN, GZIP_RECORD_LEN};

    fn golden(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/soci")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn pax_gz() -> (Ztoc, Vec<u8>) {
        (
            Ztoc::from_bytes(&golden("pax.tar.gz.65536.ztoc")).expect("golden"),
            golden("pax.tar.gz"),
        )
    }

    fn reg_files(z: &Ztoc) -> Vec<(String, u64)> {
        z.entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Reg)
            .map(|e| (String::from_utf8_lossy(&e.name).into_owned(), e.offset))
            .collect()
    }

    #[test]
    fn legacy_v1_checkpoints_read_and_round_trip() {
        // v1 implies checkpoint 0 at compressed offset 10: a gzip header without a file name.
        let z = Ztoc::from_bytes(&golden("multi.tar.gz.65536.ztoc")).expect("golden");
        let layer = golden("multi.tar.gz");
        assert_eq!(z.span(0).expect("span 0").compressed.start, 10);
        let count = z.span_count() as usize;
        // v1 drops checkpoint 0 but keeps the count.
        let mut v1 = z.checkpoints()[..GZIP_HEADER_LEN].to_vec();
        v1.extend_from_slice(&z.checkpoints()[GZIP_HEADER_LEN + GZIP_RECORD_LEN..]);
        assert_eq!(v1.len(), GZIP_HEADER_LEN + GZIP_RECORD_LEN * (count - 1));
        let mut legacy = z.clone();
        legacy.checkpoints = v1;
        let bytes = legacy.to_bytes();
        let parsed = Ztoc::from_bytes(&bytes).expect("v1 zTOC parses");
        assert!(
            parsed.to_bytes() == bytes,
            "re-serializing a v1 zTOC keeps v1 bytes"
        );
        assert_eq!(parsed.span(0), z.span(0), "implied checkpoint 0");
        for (name, _) in reg_files(&parsed) {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            parsed
                .extract(layer.as_slice(), &name, &mut a)
                .expect("v1 extract");
            z.extract(layer.as_slice(), &name, &mut b)
                .expect("v2 extract");
            assert!(a == b, "{name} differs between v1 and v2");
        }
    }

    #[test]
    fn wrong_max_span_id_is_rejected() {
        let (z, _) = pax_gz();
        for wrong in [
            z.span_count() as i32,
            z.span_count() as i32 - 2,
            -1,
            i32::MAX,
        ] {
            let err = Ztoc::from_bytes(&z.serialize(wrong)).expect_err("must reject");
            assert!(
                matches!(err, Error::Invalid { what, .. } if what.contains("max_span_id")),
                "{wrong}: {err}"
            );
        }
    }

    #[test]
    fn short_digest_list_is_rejected() {
        let (mut z, _) = pax_gz();
        z.span_digests.pop();
        let err = Ztoc::from_bytes(&z.to_bytes()).expect_err("must reject");
        assert!(err.to_string().contains("span digest count"), "{err}");
    }

    #[test]
    fn non_monotonic_checkpoints_are_rejected() {
        let (mut z, _) = pax_gz();
        let (a, b) = (
            GZIP_HEADER_LEN + GZIP_RECORD_LEN,
            GZIP_HEADER_LEN + 2 * GZIP_RECORD_LEN,
        );
        let first: Vec<u8> = z.checkpoints[a..b].to_vec();
        let second: Vec<u8> = z.checkpoints[b..b + GZIP_RECORD_LEN].to_vec();
        z.checkpoints[a..b].copy_from_slice(&second);
        z.checkpoints[b..b + GZIP_RECORD_LEN].copy_from_slice(&first);
        let err = Ztoc::from_bytes(&z.to_bytes()).expect_err("must reject");
        assert!(err.to_string().contains("strictly increase"), "{err}");
    }

    #[test]
    fn overlapping_entries_are_rejected() {
        let (mut z, _) = pax_gz();
        let i = z
            .entries
            .iter()
            .position(|e| e.kind == EntryKind::Reg && e.size > 1024)
            .expect("a file");
        z.entries[i].size += 4096;
        let err = Ztoc::from_bytes(&z.to_bytes()).expect_err("must reject");
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    #[test]
    fn a_flipped_span_byte_is_never_served() {
        let (z, mut layer) = pax_gz();
        let (name, offset) = reg_files(&z)
            .into_iter()
            .find(|(_, off)| *off > 200_000)
            .expect("a file");
        let span = z.span(z.span_of(offset)).expect("span");
        layer[(span.compressed.start + span.compressed.end) as usize / 2] ^= 0x40;
        let mut out = Vec::new();
        let err = z
            .extract(layer.as_slice(), &name, &mut out)
            .expect_err("corrupt span must fail");
        assert!(
            matches!(err, Error::SpanDigestMismatch { span: s, .. } if s == span.id),
            "{err}"
        );
        assert!(out.is_empty(), "no bytes of a failed span are written");
    }

    #[test]
    fn a_made_up_span_is_an_error_not_a_panic() {
        let (z, _) = pax_gz();
        let bogus = Span {
            id: z.span_count() + 5,
            compressed: 0..1,
            uncompressed: 0..1,
        };
        assert!(matches!(
            z.verify_span(&bogus, b"x"),
            Err(Error::Invalid { .. })
        ));
        assert!(z.decode_span(z.span_count(), b"x").is_err());
    }

    #[test]
    fn uncompressed_golden_decodes_per_span() {
        let z = Ztoc::from_bytes(&golden("pax.tar.1048576.ztoc")).expect("golden");
        let layer = golden("pax.tar");
        for span in z.spans() {
            let bytes = &layer[span.compressed.start as usize..span.compressed.end as usize];
            let decoded = z.decode_span(span.id, bytes).expect("decode");
            assert!(decoded == bytes, "plain span {} decodes to itself", span.id);
        }
    }
}
