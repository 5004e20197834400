//! Random access: plan which compressed bytes a read needs, fetch them through a
//! [`RangeReader`], verify them against the span digests and decode from the checkpoints.

use std::io::{self, Read as _, Write};
use std::ops::{Range, RangeInclusive};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::entry::EntryKind;
use crate::inflate::{self, Flush, Inflater};
use crate::sparse::Piece;
use crate::zinfo::{Compression, WINDOW_SIZE};
use crate::ztoc::{Span, SpanId, Ztoc, digest_string};
use crate::{Error, Result};

/// Random access to a layer blob: a local file in tests and tools, the registry in production.
pub trait RangeReader {
    /// Read exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
}

impl RangeReader for std::fs::File {
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        // The length comes from a zTOC: check it against the file before allocating for it.
        let size = self.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{len} beyond the end of the {size}-byte file"),
            ));
        }
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut buf = vec![0; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

impl RangeReader for [u8] {
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(usize::try_from(len).map_err(io::Error::other)?);
        end.and_then(|end| self.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "range beyond the end of the blob",
                )
            })
    }
}

/// Counts the bytes and requests that go through another reader.
pub struct CountingReader<'a, R: ?Sized> {
    inner: &'a R,
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl<R: ?Sized> std::fmt::Debug for CountingReader<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingReader")
            .field("bytes", &self.bytes())
            .field("requests", &self.requests())
            .finish()
    }
}

impl<'a, R: ?Sized> CountingReader<'a, R> {
    /// Wrap `inner`.
    pub fn new(inner: &'a R) -> Self {
        Self {
            inner,
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }
    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Range requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl<R: RangeReader + ?Sized> RangeReader for CountingReader<'_, R> {
    fn read_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let data = self.inner.read_at(offset, len)?;
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }
}

/// The compressed bytes needed for an uncompressed range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// Spans that overlap the range.
    pub spans: RangeInclusive<SpanId>,
    /// The compressed bytes of those spans (one contiguous range).
    pub compressed: Range<u64>,
    /// The uncompressed range asked for.
    pub uncompressed: Range<u64>,
}

impl Ztoc {
    /// Plan the read of an uncompressed tar range: the spans that overlap it and their
    /// compressed bytes. `None` for an empty range.
    pub fn plan(&self, range: Range<u64>) -> Result<Option<ReadPlan>> {
        let size = self.uncompressed_archive_size();
        if range.start > range.end
            || range.end
                > size.max(
                    self.span(self.span_count().saturating_sub(1))
                        .map_or(0, |s| s.uncompressed.end),
                )
        {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                size,
                what: "layer",
            });
        }
        if range.is_empty() {
            return Ok(None);
        }
        let first = self.span_of(range.start);
        let last = self.span_of(range.end - 1);
        let (Some(a), Some(b)) = (self.span(first), self.span(last)) else {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                size,
                what: "layer",
            });
        };
        Ok(Some(ReadPlan {
            spans: first..=last,
            compressed: a.compressed.start..b.compressed.end,
            uncompressed: range,
        }))
    }

    /// Plan the read of bytes `range` of entry `index`'s data.
    pub fn plan_entry(&self, index: usize, range: Range<u64>) -> Result<Option<ReadPlan>> {
        let entry = self
            .entries()
            .get(index)
            .ok_or_else(|| Error::NotFound(format!("entry #{index}")))?;
        if range.start > range.end || range.end > entry.size {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                size: entry.size,
                what: "file",
            });
        }
        self.plan(entry.offset + range.start..entry.offset + range.end)
    }

    /// Check a span's compressed bytes against its digest and decode the whole span.
    pub fn decode_span(&self, id: SpanId, compressed: &[u8]) -> Result<Vec<u8>> {
        let span = self.span(id).ok_or(Error::Invalid {
            what: "no such span",
            index: u64::from(id),
        })?;
        self.verify_span(&span, compressed)?;
        let len =
            usize::try_from(span.uncompressed.end - span.uncompressed.start).map_err(|_| {
                Error::Invalid {
                    what: "span too large",
                    index: u64::from(id),
                }
            })?;
        match self.compression() {
            Compression::Uncompressed => Ok(compressed[..len.min(compressed.len())].to_vec()),
            Compression::Gzip => self.inflate_span(&span, compressed, len),
            Compression::Zstd => decode_zstd_span(&span, compressed, len),
        }
    }

    /// Verify a span's compressed bytes against the zTOC.
    pub fn verify_span(&self, span: &Span, compressed: &[u8]) -> Result<()> {
        let expected = self
            .span_digests()
            .get(span.id as usize)
            .ok_or(Error::Invalid {
                what: "no such span",
                index: u64::from(span.id),
            })?;
        let want_len = span.compressed.end - span.compressed.start;
        let actual = digest_string(&Sha256::digest(compressed));
        if compressed.len() as u64 != want_len || &actual != expected {
            return Err(Error::SpanDigestMismatch {
                span: span.id,
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn inflate_span(&self, span: &Span, compressed: &[u8], len: usize) -> Result<Vec<u8>> {
        let corrupt = |message: String| Error::SpanDecode {
            span: span.id,
            message,
        };
        let point = self.zinfo().point(u64::from(span.id));
        let mut z = Inflater::new(inflate::RAW).map_err(|e| corrupt(e.to_string()))?;
        let mut input = compressed;
        if point.bits != 0 {
            let (&first, rest) = input
                .split_first()
                .ok_or_else(|| corrupt("empty span".into()))?;
            z.prime(point.bits, first >> (8 - point.bits))
                .map_err(|e| corrupt(e.to_string()))?;
            input = rest;
        }
        let zeros = [0u8; WINDOW_SIZE];
        let window = self.window(span.id)?;
        z.set_dictionary(window.as_deref().unwrap_or(&zeros))
            .map_err(|e| corrupt(e.to_string()))?;
        let mut out = Vec::new();
        let mut produced = 0;
        let mut raw = true;
        while produced < len {
            if produced == out.len() {
                grow(&mut out, len, compressed.len());
            }
            let step = z
                .inflate(input, &mut out[produced..], Flush::None)
                .map_err(|e| corrupt(e.to_string()))?;
            input = &input[step.consumed..];
            produced += step.produced;
            if step.stream_end && produced < len {
                // A member ended inside the span: skip the trailer once (raw mode does not read
                // it), then let zlib parse the following headers and trailers itself.
                if raw {
                    input = input
                        .get(8..)
                        .ok_or_else(|| corrupt("gzip trailer cut off".into()))?;
                    raw = false;
                }
                z.reset(inflate::GZIP_OR_ZLIB)
                    .map_err(|e| corrupt(e.to_string()))?;
            } else if step.consumed == 0 && step.produced == 0 {
                return Err(corrupt(format!(
                    "compressed data ends after {produced} of {len} bytes"
                )));
            }
        }
        Ok(out)
    }

    /// Copy uncompressed bytes `plan.uncompressed` to `out`, reading only the planned
    /// compressed range (one request) and verifying every span. Returns compressed bytes read.
    pub fn read_planned<R: RangeReader + ?Sized>(
        &self,
        reader: &R,
        plan: &ReadPlan,
        out: &mut dyn Write,
    ) -> Result<u64> {
        let len = plan.compressed.end - plan.compressed.start;
        let data = reader
            .read_at(plan.compressed.start, len)
            .map_err(|source| Error::RangeRead {
                offset: plan.compressed.start,
                len,
                source,
            })?;
        if data.len() as u64 != len {
            return Err(Error::RangeRead {
                offset: plan.compressed.start,
                len,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
            });
        }
        for id in plan.spans.clone() {
            let span = self.span(id).ok_or(Error::Invalid {
                what: "no such span",
                index: u64::from(id),
            })?;
            let at = (span.compressed.start - plan.compressed.start) as usize;
            let bytes = &data[at..at + (span.compressed.end - span.compressed.start) as usize];
            let decoded = self.decode_span(id, bytes)?;
            let start = plan.uncompressed.start.max(span.uncompressed.start);
            let end = plan.uncompressed.end.min(span.uncompressed.end);
            if start < end {
                let a = (start - span.uncompressed.start) as usize;
                let b = (end - span.uncompressed.start) as usize;
                let piece = decoded.get(a..b).ok_or_else(|| Error::SpanDecode {
                    span: id,
                    message: "span decoded short".into(),
                })?;
                out.write_all(piece)?;
            }
        }
        Ok(len)
    }

    /// Read a whole file by its path in the layer (hardlinks followed; a sparse file's holes
    /// written as zeros) into `out`.
    /// Returns the number of compressed bytes read.
    pub fn extract<R: RangeReader + ?Sized>(
        &self,
        reader: &R,
        path: &str,
        out: &mut dyn Write,
    ) -> Result<u64> {
        let index = self.path_index()?;
        let wanted = crate::entry::clean_path(path.as_bytes())
            .flatten()
            .ok_or_else(|| Error::NotFound(path.to_owned()))?;
        let mut i = *index
            .get(&wanted)
            .ok_or_else(|| Error::NotFound(path.to_owned()))?;
        // Follow hardlinks (bounded: a link may only point at an earlier entry).
        for _ in 0..self.entries().len() {
            let e = &self.entries()[i];
            if e.kind != EntryKind::Hardlink {
                break;
            }
            let target = crate::entry::clean_path(&e.linkname)
                .flatten()
                .unwrap_or_default();
            i = *index.get(&target).ok_or_else(|| {
                Error::NotFound(String::from_utf8_lossy(&e.linkname).into_owned())
            })?;
        }
        let e = &self.entries()[i];
        if e.kind != EntryKind::Reg {
            return Err(Error::NotAFile {
                path: path.to_owned(),
                kind: e.kind.as_str(),
            });
        }
        let Some(map) = e.sparse().transpose()? else {
            return match self.plan_entry(i, 0..e.size)? {
                None => Ok(0),
                Some(plan) => self.read_planned(reader, &plan, out),
            };
        };
        let mut read = 0;
        for piece in map.pieces(0..map.size()) {
            match piece {
                Piece::Zeros(n) => io::copy(&mut io::repeat(0).take(n), out).map(drop)?,
                Piece::Data(range) => {
                    if let Some(plan) = self.plan_entry(i, range)? {
                        read += self.read_planned(reader, &plan, out)?;
                    }
                }
            }
        }
        Ok(read)
    }
}

fn decode_zstd_span(span: &Span, compressed: &[u8], len: usize) -> Result<Vec<u8>> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let corrupt = |message: String| Error::SpanDecode {
        span: span.id,
        message,
    };
    let mut d = Decoder::new().map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::new();
    let mut src = InBuffer::around(compressed);
    let mut produced = 0;
    while produced < len {
        if produced == out.len() {
            grow(&mut out, len, compressed.len());
        }
        let mut dst = OutBuffer::around(&mut out[produced..]);
        let before = src.pos();
        d.run(&mut src, &mut dst)
            .map_err(|e| corrupt(e.to_string()))?;
        let n = dst.pos();
        produced += n;
        if n == 0 && src.pos() == before {
            return Err(corrupt(format!(
                "compressed data ends after {produced} of {len} bytes"
            )));
        }
    }
    Ok(out)
}

/// Make room for more of a span's `len` decoded bytes: first a few times its compressed size,
/// then doubling, never beyond `len`. Never sized from `len` at once: only the verified
/// compressed bytes decide how much exists, and a corrupt or hostile zTOC may claim anything
/// (one flipped bit asked for 1.1 PB and aborted the process). A false claim then costs at most
/// four times the compressed size or twice what the span really decodes to, and an error when
/// its bytes run out.
fn grow(out: &mut Vec<u8>, len: usize, compressed: usize) {
    const FIRST: usize = 64 << 10;
    let first = compressed.saturating_mul(4).max(FIRST);
    let target = out.len().saturating_mul(2).max(first).min(len);
    out.resize(target, 0);
}
