//! Building a zTOC from a layer stream in one pass.
//!
//! The layer is read once, front to back, through a decoder that also records checkpoints and
//! hashes compressed spans; the tar headers are read from the decoder's output and file data is
//! skipped without copying. [`build`] keeps the zTOC in memory and writes nothing to disk;
//! [`build_to`] keeps only the decoder buffers and spills entries and checkpoints to unnamed
//! files until it writes the zTOC out.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::entry::{Entry, EntryKind, clean_path, go_time_text};
use crate::gotar::{Header, TarReader};
use crate::inflate::{self, Flush, Inflater};
use crate::limits::{Limits, Tally};
use crate::stream::{Blob, BlobSink, EntrySpill, spill_file};
use crate::zinfo::{Compression, GzipBlobWriter, WINDOW_SIZE, Zinfo, tar_blob, zstd_blob};
use crate::ztoc::{
    DEFAULT_SPAN_SIZE, EntryOrder, Geometry, Parts, SOCI_BUILD_TOOL_IDENTIFIER, Streamed, Ztoc,
    check_geometry, digest_string,
};
use crate::{Error, Result};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Target uncompressed distance between checkpoints.
    pub span_size: u64,
    /// Stored in the zTOC; soci's default gives byte-identical output to soci.
    pub build_tool_identifier: String,
    /// `None` detects gzip and zstd by their magic bytes, else plain tar.
    pub compression: Option<Compression>,
    /// Caps on the table of contents; a layer that passes one is [`Error::NotIndexable`].
    pub limits: Limits,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            span_size: DEFAULT_SPAN_SIZE,
            build_tool_identifier: SOCI_BUILD_TOOL_IDENTIFIER.to_owned(),
            compression: None,
            limits: Limits::default(),
        }
    }
}

const INPUT_CHUNK: usize = 128 * 1024;
const OUTPUT_CHUNK: usize = 256 * 1024;

/// Build a zTOC from a layer blob read front to back, in memory.
pub fn build<R: Read>(layer: R, options: &BuildOptions) -> Result<Ztoc> {
    let mut entries = Vec::new();
    let scan = scan(layer, options, None, &mut |e| {
        entries.push(e);
        Ok(())
    })?;
    Ztoc::from_parts(Parts {
        build_tool_identifier: options.build_tool_identifier.clone(),
        compressed_archive_size: scan.encoded.compressed_size,
        uncompressed_archive_size: scan.uncompressed_size,
        entries,
        compression: scan.compression,
        span_digests: scan.encoded.span_digests,
        checkpoints: scan.encoded.checkpoints.into_vec()?,
    })
}

/// What [`build_to`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// How the layer is compressed.
    pub compression: Compression,
    /// Size of the layer blob.
    pub compressed_archive_size: u64,
    /// Size of the tar stream.
    pub uncompressed_archive_size: u64,
    /// Tar entries in the zTOC.
    pub entries: u64,
    /// Spans (checkpoints).
    pub span_count: u32,
    /// Whether soci-snapshotter can serve the zTOC ([`Ztoc::is_soci_compatible`]).
    pub soci_compatible: bool,
    /// Bytes written: the zTOC's size.
    pub ztoc_size: u64,
}

/// Build a zTOC from a layer blob read front to back and write it to `out`, byte for byte what
/// [`build`] then [`Ztoc::to_bytes`] give, without holding the table of contents or the
/// checkpoints in memory: they wait in unnamed spill files in `spill_dir` (mode 0600, gone when
/// the build ends, fails or dies). Memory stays at the decoder's buffers plus a few bytes per
/// entry and span, whatever the layer's size; disk use is about the zTOC's size, twice.
///
/// Nothing is written to `out` before the whole layer has been read and checked; on an error,
/// `out` may hold a partial zTOC and must be discarded.
pub fn build_to<R: Read, W: Write>(
    layer: R,
    options: &BuildOptions,
    spill_dir: &Path,
    mut out: W,
) -> Result<Built> {
    let mut spill = EntrySpill::new(spill_dir)?;
    let mut order = EntryOrder::default();
    let mut soci_compatible = true;
    let scan = scan(layer, options, Some(spill_dir), &mut |e| {
        order.admit(spill.count(), &e)?;
        soci_compatible &= e.sparse().is_none();
        spill.push(&e)
    })?;
    let compressed_archive_size = scan.encoded.compressed_size;
    order.finish(scan.uncompressed_size)?;
    let zinfo = &scan.encoded.zinfo;
    check_geometry(&Geometry {
        zinfo,
        compression: scan.compression,
        compressed_archive_size,
        uncompressed_archive_size: scan.uncompressed_size,
        span_digests: &scan.encoded.span_digests,
    })?;
    let span_count = u32::try_from(zinfo.span_count()).map_err(|_| Error::TooLarge {
        what: "span list",
        size: zinfo.span_count(),
    })?;
    let entries = spill.count();
    let ztoc_size = Streamed {
        build_tool_identifier: &options.build_tool_identifier,
        compressed_archive_size,
        uncompressed_archive_size: scan.uncompressed_size,
        compression: scan.compression,
        max_span_id: span_count as i32 - 1,
        span_digests: &scan.encoded.span_digests,
        checkpoints: &scan.encoded.checkpoints,
        entries: spill.into_reverse()?,
        entry_count: entries,
    }
    .write(spill_dir, &mut out)?;
    out.flush().map_err(Error::Output)?;
    Ok(Built {
        compression: scan.compression,
        compressed_archive_size,
        uncompressed_archive_size: scan.uncompressed_size,
        entries,
        span_count,
        soci_compatible: scan.compression.is_soci_compatible() && soci_compatible,
        ztoc_size,
    })
}

/// One pass over a layer: entries go to `sink` in archive order.
struct Scan {
    compression: Compression,
    uncompressed_size: u64,
    encoded: Encoded,
}

/// Read the layer; gzip checkpoints go to a spill file in `spill_dir` if there is one.
fn scan<R: Read>(
    layer: R,
    options: &BuildOptions,
    spill_dir: Option<&Path>,
    sink: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<Scan> {
    if options.span_size == 0 || options.span_size > i64::MAX as u64 {
        return Err(Error::InvalidSpanSize(options.span_size));
    }
    let mut layer = BufReader::with_capacity(INPUT_CHUNK, layer);
    let compression = match options.compression {
        Some(c) => c,
        None => detect(layer.fill_buf()?),
    };
    let tally = Tally::new(options.limits);
    let (uncompressed_size, encoded) = match compression {
        Compression::Gzip => {
            let blob = match spill_dir {
                Some(dir) => BlobSink::File(
                    BufWriter::with_capacity(2 * WINDOW_SIZE, spill_file(dir)?),
                    dir.to_path_buf(),
                ),
                None => BlobSink::Memory(Vec::new()),
            };
            let indexer = GzipIndexer::new(layer, options.span_size, blob)?;
            read_toc(Decoding(indexer), tally, sink)?
        }
        Compression::Zstd => read_toc(
            Decoding(ZstdIndexer::new(layer, options.span_size)?),
            tally,
            sink,
        )?,
        Compression::Uncompressed => {
            read_toc(PlainIndexer::new(layer, options.span_size), tally, sink)?
        }
    };
    if encoded.compressed_size == 0 {
        return Err(Error::EmptyLayer);
    }
    Ok(Scan {
        compression,
        uncompressed_size,
        encoded,
    })
}

/// Guess the encoding from the first bytes of a layer.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (head.len() >= 4
            && u32::from_le_bytes([head[0], head[1], head[2], head[3]]) & 0xffff_fff0
                == 0x184d_2a50)
    {
        Compression::Zstd
    } else {
        Compression::Uncompressed
    }
}

/// What a decoder knows once the whole blob has been read.
struct Encoded {
    compressed_size: u64,
    span_digests: Vec<String>,
    checkpoints: Blob,
    /// The checkpoints' geometry (gzip windows left out).
    zinfo: Zinfo,
}

/// A decoder that indexes as it goes.
trait Indexer: BufRead {
    /// Read the rest of the blob and return the checkpoints and span digests.
    fn finish(self) -> Result<Encoded>;
}

fn read_toc<I: Indexer>(
    decoder: I,
    mut tally: Tally,
    sink: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<(u64, Encoded)> {
    let mut tar = TarReader::new(decoder);
    let mut first = true;
    while let Some(hdr) = tar.next_header()? {
        if hdr.typeflag == b'g' {
            check_global_header(&hdr, first)?;
            continue;
        }
        let entry = entry_from_header(hdr)?;
        tally.admit(&entry)?;
        sink(entry)?;
        first = false;
    }
    let size = tar.position();
    let mut decoder = tar.into_inner();
    // The checkpoints cover the whole stream, including padding after the end-of-archive marker.
    loop {
        let n = decoder.fill_buf()?.len();
        if n == 0 {
            break;
        }
        decoder.consume(n);
    }
    Ok((size, decoder.finish()?))
}

/// A PAX global header describes no file and is left out of the zTOC, as containerd's unpack
/// skips it. But that unpack still treats its name as a path: it removes what is there, creates
/// missing parents and converts a whiteout name. Before any other entry, a header named by one
/// plain component (or the root) touches nothing — what `git archive` and Go's tar writer
/// produce; any other is refused rather than served differently.
fn check_global_header(hdr: &Header, first: bool) -> Result<()> {
    let reason = match clean_path(&hdr.name) {
        Some(None) => return Ok(()),
        Some(Some(path)) if path.contains(&b'/') || path.starts_with(b".wh.") => {
            "PAX global header ('g') named like a path: containerd's unpack would create or change it"
        }
        Some(Some(_)) if first => return Ok(()),
        Some(Some(_)) => {
            "PAX global header ('g') after other entries: containerd's unpack removes the path it names"
        }
        None => {
            return Err(Error::UnsafePath {
                name: String::from_utf8_lossy(&hdr.name).into_owned(),
                offset: hdr.data_offset,
            });
        }
    };
    Err(Error::UnsupportedEntry {
        name: String::from_utf8_lossy(&hdr.name).into_owned(),
        kind: reason.into(),
        offset: hdr.data_offset,
    })
}

fn entry_from_header(hdr: Header) -> Result<Entry> {
    let name_str = || String::from_utf8_lossy(&hdr.name).into_owned();
    let unsupported = |kind: String| Error::UnsupportedEntry {
        name: name_str(),
        kind,
        offset: hdr.data_offset,
    };
    let kind = EntryKind::from_typeflag(hdr.typeflag).ok_or_else(|| {
        unsupported(match hdr.typeflag {
            b'S' => "old GNU sparse file ('S'), which containerd cannot unpack either".into(),
            c if c.is_ascii_graphic() => format!("'{}'", c as char),
            c => format!("0x{c:02x}"),
        })
    })?;
    let unsafe_path = |name: &[u8]| Error::UnsafePath {
        name: String::from_utf8_lossy(name).into_owned(),
        offset: hdr.data_offset,
    };
    if clean_path(&hdr.name).is_none() {
        return Err(unsafe_path(&hdr.name));
    }
    if kind == EntryKind::Hardlink && !matches!(clean_path(&hdr.linkname), Some(Some(_))) {
        return Err(unsafe_path(&hdr.linkname));
    }
    Ok(Entry {
        kind,
        offset: hdr.data_offset,
        // A sparse file's entry covers its packed data; its map has the full size.
        size: hdr.sparse_data_len.unwrap_or(hdr.size as u64),
        mode: hdr.mode,
        // Go converts int to uint32, wrapping.
        uid: hdr.uid as u32,
        gid: hdr.gid as u32,
        mod_time: go_time_text(hdr.mtime_secs, hdr.mtime_nanos),
        devmajor: hdr.devmajor,
        devminor: hdr.devminor,
        pax: hdr.pax.into_iter().collect(),
        name: hdr.name,
        linkname: hdr.linkname,
        uname: hdr.uname,
        gname: hdr.gname,
    })
}

/// Hashes compressed spans as their bytes go by.
#[derive(Default)]
struct SpanHasher {
    current: Option<Sha256>,
    digests: Vec<String>,
}

impl SpanHasher {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.current {
            h.update(bytes);
        }
    }

    /// Close the current span and open the next, which starts with `carry` (a shared byte).
    fn next_span(&mut self, carry: &[u8]) {
        self.close();
        let mut h = Sha256::new();
        h.update(carry);
        self.current = Some(h);
    }

    fn close(&mut self) {
        if let Some(h) = self.current.take() {
            self.digests.push(digest_string(&h.finalize()));
        }
    }
}

/// Output buffer that keeps the last 32 KiB of history in front of fresh output.
struct OutBuf {
    buf: Vec<u8>,
    /// Consumer position.
    pos: usize,
    /// End of decoded data.
    end: usize,
}

impl OutBuf {
    fn new() -> Self {
        // Starts with a zero window, as zlib's zran does before any output.
        Self {
            buf: vec![0; WINDOW_SIZE + OUTPUT_CHUNK],
            pos: WINDOW_SIZE,
            end: WINDOW_SIZE,
        }
    }

    /// Make room for more output once everything has been consumed.
    fn recycle(&mut self) {
        debug_assert_eq!(self.pos, self.end);
        self.buf.copy_within(self.end - WINDOW_SIZE..self.end, 0);
        self.pos = WINDOW_SIZE;
        self.end = WINDOW_SIZE;
    }

    fn window(&self) -> &[u8] {
        &self.buf[self.end - WINDOW_SIZE..self.end]
    }
}

/// A compressed-stream indexer that decodes into its [`OutBuf`] on demand.
trait Decompressor {
    fn out(&mut self) -> &mut OutBuf;
    fn done(&self) -> bool;
    /// Decode until the output buffer is full or the stream ends.
    fn decode_more(&mut self) -> Result<()>;
    fn finish(self) -> Result<Encoded>;
}

/// Presents a [`Decompressor`]'s output as a `BufRead` for the tar reader.
struct Decoding<D>(D);

impl<D: Decompressor> Read for Decoding<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, buf)
    }
}

impl<D: Decompressor> BufRead for Decoding<D> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let d = &mut self.0;
        if d.out().pos == d.out().end && !d.done() {
            d.out().recycle();
            d.decode_more().map_err(io::Error::other)?;
        }
        let out = d.out();
        Ok(&out.buf[out.pos..out.end])
    }

    fn consume(&mut self, amt: usize) {
        let out = self.0.out();
        out.pos = (out.pos + amt).min(out.end);
    }
}

impl<D: Decompressor> Indexer for Decoding<D> {
    fn finish(self) -> Result<Encoded> {
        self.0.finish()
    }
}

/// `Read` in terms of `BufRead`.
fn read_buffered<B: BufRead>(b: &mut B, buf: &mut [u8]) -> io::Result<usize> {
    let avail = b.fill_buf()?;
    let n = avail.len().min(buf.len());
    buf[..n].copy_from_slice(&avail[..n]);
    b.consume(n);
    Ok(n)
}

/// Input side shared by the compressed indexers: a buffered source and running totals.
struct Input<R> {
    src: R,
    /// Total compressed bytes consumed by the decoder.
    total: u64,
    last_byte: u8,
}

impl<R: BufRead> Input<R> {
    /// The unconsumed input, refilled when empty (empty only at end of stream).
    fn available(&mut self) -> Result<&[u8]> {
        Ok(self.src.fill_buf()?)
    }

    fn consume(&mut self, n: usize, hasher: &mut SpanHasher) -> Result<()> {
        if n > 0 {
            let buf = self.src.fill_buf()?;
            hasher.update(&buf[..n]);
            self.last_byte = buf[n - 1];
            self.src.consume(n);
            self.total += n as u64;
        }
        Ok(())
    }
}

/// gzip: inflate with `Z_BLOCK` stops and place checkpoints exactly as soci's zinfo builder.
struct GzipIndexer<R> {
    input: Input<R>,
    out: OutBuf,
    inflater: Inflater,
    total_out: u64,
    last_checkpoint_out: u64,
    span_size: u64,
    blob: GzipBlobWriter,
    hasher: SpanHasher,
    done: bool,
}

impl<R: BufRead> GzipIndexer<R> {
    fn new(src: R, span_size: u64, blob: BlobSink) -> Result<Self> {
        Ok(Self {
            input: Input {
                src,
                total: 0,
                last_byte: 0,
            },
            out: OutBuf::new(),
            inflater: Inflater::new(inflate::GZIP_OR_ZLIB).map_err(|e| Error::Gzip {
                offset: 0,
                message: e.to_string(),
            })?,
            total_out: 0,
            last_checkpoint_out: 0,
            span_size,
            blob: GzipBlobWriter::new(span_size, blob)?,
            hasher: SpanHasher::default(),
            done: false,
        })
    }

    fn gzip_error(&self, e: inflate::ZError) -> Error {
        Error::Gzip {
            offset: self.input.total,
            message: e.to_string(),
        }
    }
}

impl<R: BufRead> Decompressor for GzipIndexer<R> {
    fn out(&mut self) -> &mut OutBuf {
        &mut self.out
    }

    fn done(&self) -> bool {
        self.done
    }

    fn decode_more(&mut self) -> Result<()> {
        while !self.done && self.out.end < self.out.buf.len() {
            let input = self.input.available()?;
            if input.is_empty() {
                return Err(Error::Truncated {
                    offset: self.input.total,
                });
            }
            let step = self
                .inflater
                .inflate(input, &mut self.out.buf[self.out.end..], Flush::Block)
                .map_err(|e| Error::Gzip {
                    offset: self.input.total,
                    message: e.to_string(),
                })?;
            self.input.consume(step.consumed, &mut self.hasher)?;
            self.out.end += step.produced;
            self.total_out += step.produced as u64;
            if step.stream_end {
                // Another member follows if there is more input (pigz, mgzip, concatenation).
                if self.input.available()?.is_empty() {
                    self.done = true;
                } else {
                    self.inflater
                        .reset(inflate::GZIP_OR_ZLIB)
                        .map_err(|e| self.gzip_error(e))?;
                }
                continue;
            }
            if step.consumed == 0 && step.produced == 0 && step.data_type & 128 == 0 {
                return Err(Error::Gzip {
                    offset: self.input.total,
                    message: "no progress".into(),
                });
            }
            let at_boundary = step.data_type & 128 != 0 && step.data_type & 64 == 0;
            if at_boundary
                && (self.total_out == 0
                    || self.total_out - self.last_checkpoint_out > self.span_size)
            {
                let bits = (step.data_type & 7) as u8;
                self.blob
                    .push(self.input.total, self.total_out, bits, self.out.window())?;
                let carry = [self.input.last_byte];
                self.hasher.next_span(if bits != 0 { &carry } else { &[] });
                self.last_checkpoint_out = self.total_out;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Encoded> {
        self.hasher.close();
        let (checkpoints, zinfo) = self.blob.finish()?;
        Ok(Encoded {
            compressed_size: self.input.total,
            span_digests: self.hasher.digests,
            checkpoints,
            zinfo,
        })
    }
}

/// zstd: checkpoints at frame boundaries at least a span apart.
struct ZstdIndexer<R> {
    input: Input<R>,
    out: OutBuf,
    decoder: zstd::stream::raw::Decoder<'static>,
    total_out: u64,
    last_checkpoint_out: u64,
    span_size: u64,
    points: Vec<(u64, u64)>,
    frames: u64,
    hasher: SpanHasher,
    done: bool,
}

impl<R: BufRead> ZstdIndexer<R> {
    fn new(src: R, span_size: u64) -> Result<Self> {
        let mut hasher = SpanHasher::default();
        hasher.next_span(&[]);
        Ok(Self {
            input: Input {
                src,
                total: 0,
                last_byte: 0,
            },
            out: OutBuf::new(),
            decoder: zstd::stream::raw::Decoder::new()
                .map_err(|source| Error::Zstd { offset: 0, source })?,
            total_out: 0,
            last_checkpoint_out: 0,
            span_size,
            points: vec![(0, 0)],
            frames: 0,
            hasher,
            done: false,
        })
    }
}

impl<R: BufRead> Decompressor for ZstdIndexer<R> {
    fn out(&mut self) -> &mut OutBuf {
        &mut self.out
    }

    fn done(&self) -> bool {
        self.done
    }

    fn decode_more(&mut self) -> Result<()> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        while !self.done && self.out.end < self.out.buf.len() {
            let offset = self.input.total;
            let input = self.input.available()?;
            if input.is_empty() {
                return Err(Error::Truncated { offset });
            }
            let mut src = InBuffer::around(input);
            let mut dst = OutBuffer::around(&mut self.out.buf[self.out.end..]);
            let hint = self
                .decoder
                .run(&mut src, &mut dst)
                .map_err(|source| Error::Zstd { offset, source })?;
            let (consumed, produced) = (src.pos(), dst.pos());
            self.input.consume(consumed, &mut self.hasher)?;
            self.out.end += produced;
            self.total_out += produced as u64;
            if hint == 0 {
                // A frame ended here; the next one (if any) can be decoded from this point.
                self.frames += 1;
                if self.input.available()?.is_empty() {
                    self.done = true;
                } else if self.total_out - self.last_checkpoint_out > self.span_size {
                    self.points.push((self.input.total, self.total_out));
                    self.hasher.next_span(&[]);
                    self.last_checkpoint_out = self.total_out;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Encoded> {
        if self.frames <= 1 {
            return Err(Error::ZstdNotSeekable);
        }
        self.hasher.close();
        let blob = zstd_blob(self.span_size, &self.points);
        Ok(Encoded {
            compressed_size: self.input.total,
            span_digests: self.hasher.digests,
            zinfo: Zinfo::parse(Compression::Zstd, &blob)?,
            checkpoints: Blob::Memory(blob),
        })
    }
}

/// Plain tar: fixed spans over the raw bytes.
struct PlainIndexer<R> {
    src: R,
    span_size: u64,
    total: u64,
    hasher: SpanHasher,
}

impl<R: BufRead> PlainIndexer<R> {
    fn new(src: R, span_size: u64) -> Self {
        Self {
            src,
            span_size,
            total: 0,
            hasher: SpanHasher::default(),
        }
    }
}

impl<R: BufRead> Read for PlainIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, buf)
    }
}

impl<R: BufRead> BufRead for PlainIndexer<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.src.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        // Hash what is consumed, cutting spans at multiples of the span size.
        let Ok(buf) = self.src.fill_buf() else { return };
        let mut rest = &buf[..amt.min(buf.len())];
        let consumed = rest.len();
        while !rest.is_empty() {
            if self.total.is_multiple_of(self.span_size) {
                self.hasher.next_span(&[]);
            }
            let room = self.span_size - self.total % self.span_size;
            let take = rest.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.hasher.update(&rest[..take]);
            self.total += take as u64;
            rest = &rest[take..];
        }
        self.src.consume(consumed);
    }
}

impl<R: BufRead> Indexer for PlainIndexer<R> {
    fn finish(mut self) -> Result<Encoded> {
        self.hasher.close();
        let blob = tar_blob(self.span_size, self.total);
        Ok(Encoded {
            compressed_size: self.total,
            span_digests: self.hasher.digests,
            zinfo: Zinfo::parse(Compression::Uncompressed, &blob)?,
            checkpoints: Blob::Memory(blob),
        })
    }
}
