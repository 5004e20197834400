//! Checkpoint blobs ("zinfo") and the span geometry they define.
//!
//! - gzip: SOCI's packed blob (spec §2.1), version 2 and the legacy version 1 without checkpoint 0.
//! - uncompressed tar: SOCI's `TarZinfo` flatbuffer (spec §2.5); spans are fixed-size slices.
//! - zstd: a Hermes-only blob (SOCI has no zstd): `"HZST"`, u32 version 1, i64 span size, i32
//!   count, then count × (i64 compressed offset, i64 uncompressed offset) of frame boundaries.

use std::ops::Range;

use crate::fbread::Table;
use crate::stream::{Blob, BlobSink};
use crate::{Error, Result};

/// Bytes of gzip history stored with each checkpoint.
pub const WINDOW_SIZE: usize = 32 * 1024;
pub(crate) const GZIP_HEADER_LEN: usize = 12;
pub(crate) const GZIP_RECORD_LEN: usize = 8 + 8 + 1 + WINDOW_SIZE;
pub(crate) const ZSTD_MAGIC: &[u8; 4] = b"HZST";
const ZSTD_HEADER_LEN: usize = 4 + 4 + 8 + 4;
const TAR_ZINFO_VERSION: i32 = 2;

/// How a layer's tar stream is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (one or more members); SOCI's `Gzip`.
    Gzip,
    /// A plain tar; SOCI's `Uncompressed`.
    Uncompressed,
    /// zstd with several frames; a Hermes extension that is never put into a SOCI index.
    Zstd,
}

impl Compression {
    /// Lower-case name, as soci prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Uncompressed => "uncompressed",
            Self::Zstd => "zstd",
        }
    }

    /// The `CompressionAlgorithm` enum value in the flatbuffer.
    pub(crate) fn to_fb(self) -> i8 {
        match self {
            Self::Gzip => 1,
            Self::Uncompressed => 2,
            Self::Zstd => 3,
        }
    }

    pub(crate) fn from_fb(value: i8) -> Result<Self> {
        match value {
            1 => Ok(Self::Gzip),
            2 => Ok(Self::Uncompressed),
            3 => Ok(Self::Zstd),
            other => Err(Error::UnknownCompression(other)),
        }
    }

    /// The most bytes one compressed byte can decode to: deflate's longest match (258 bytes)
    /// costs at least two bits; a zstd RLE block turns 4 bytes into up to 128 KiB.
    pub(crate) fn max_expansion(self) -> u64 {
        match self {
            Self::Gzip => 1032,
            Self::Uncompressed => 1,
            Self::Zstd => 32 << 10,
        }
    }

    /// Whether soci-snapshotter can read zTOCs of this kind.
    pub fn is_soci_compatible(self) -> bool {
        !matches!(self, Self::Zstd)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One resumption point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Point {
    /// Compressed offset of the first whole byte after the boundary.
    pub input: u64,
    /// Uncompressed offset of the boundary.
    pub output: u64,
    /// Unused bits of byte `input - 1` that belong to the next block (gzip only).
    pub bits: u8,
    /// Where the 32 KiB window sits in the blob (gzip only; `None` = all zeros).
    pub window: Option<usize>,
}

/// The parsed checkpoint blob.
#[derive(Debug, Clone)]
pub(crate) enum Zinfo {
    /// Points parsed from a gzip blob.
    Gzip { span_size: u64, points: Vec<Point> },
    /// Fixed spans over a plain tar.
    Tar {
        span_size: u64,
        size: u64,
        count: u64,
    },
    /// Frame-boundary points of a zstd layer.
    Zstd { span_size: u64, points: Vec<Point> },
}

fn i64_at(blob: &[u8], at: usize, what: &'static str) -> Result<i64> {
    blob.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_le_bytes)
        .ok_or(Error::Malformed { at, what })
}

fn i32_at(blob: &[u8], at: usize, what: &'static str) -> Result<i32> {
    blob.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
        .ok_or(Error::Malformed { at, what })
}

fn offset(value: i64, at: usize, what: &'static str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Malformed { at, what })
}

/// A checkpoint's (compressed, uncompressed) offsets stored as two little-endian i64s at `at`.
fn offsets_at(blob: &[u8], at: usize) -> Result<(u64, u64)> {
    let what = "checkpoint offset";
    Ok((
        offset(i64_at(blob, at, what)?, at, what)?,
        offset(i64_at(blob, at + 8, what)?, at + 8, what)?,
    ))
}

impl Zinfo {
    /// Parse a blob of the given algorithm.
    pub(crate) fn parse(compression: Compression, blob: &[u8]) -> Result<Self> {
        match compression {
            Compression::Gzip => parse_gzip(blob),
            Compression::Uncompressed => parse_tar(blob),
            Compression::Zstd => parse_zstd(blob),
        }
    }

    pub(crate) fn span_size(&self) -> u64 {
        match self {
            Self::Gzip { span_size, .. }
            | Self::Tar { span_size, .. }
            | Self::Zstd { span_size, .. } => *span_size,
        }
    }

    pub(crate) fn span_count(&self) -> u64 {
        match self {
            Self::Gzip { points, .. } | Self::Zstd { points, .. } => points.len() as u64,
            Self::Tar { count, .. } => *count,
        }
    }

    /// Points held in memory (a plain tar's are computed, not stored).
    pub(crate) fn stored_points(&self) -> usize {
        match self {
            Self::Gzip { points, .. } | Self::Zstd { points, .. } => points.len(),
            Self::Tar { .. } => 0,
        }
    }

    /// The point span `i` starts from (tar spans synthesise one).
    pub(crate) fn point(&self, i: u64) -> Point {
        match self {
            Self::Gzip { points, .. } | Self::Zstd { points, .. } => points[i as usize],
            Self::Tar { span_size, .. } => Point {
                input: i * span_size,
                output: i * span_size,
                bits: 0,
                window: None,
            },
        }
    }

    /// Compressed byte range of span `i` (`i < span_count`).
    pub(crate) fn compressed_range(&self, i: u64, compressed_size: u64) -> Range<u64> {
        let p = self.point(i);
        let start = p.input - u64::from(p.bits != 0);
        let end = if i + 1 == self.span_count() {
            compressed_size
        } else {
            self.point(i + 1).input
        };
        start..end
    }

    /// Uncompressed byte range of span `i` (`i < span_count`).
    pub(crate) fn uncompressed_range(
        &self,
        i: u64,
        uncompressed_size: u64,
        compressed_size: u64,
    ) -> Range<u64> {
        let p = self.point(i);
        let end = if i + 1 == self.span_count() {
            match self {
                // A plain tar's last span ends with the file, like its compressed range.
                Self::Tar { .. } => compressed_size,
                _ => uncompressed_size.max(p.output),
            }
        } else {
            self.point(i + 1).output
        };
        p.output..end
    }

    /// The span holding uncompressed offset `off` (the last span whose start is `<= off`).
    pub(crate) fn span_of(&self, off: u64) -> u64 {
        match self {
            Self::Tar {
                span_size, count, ..
            } => (off / span_size).min(count.saturating_sub(1)),
            Self::Gzip { points, .. } | Self::Zstd { points, .. } => {
                (points.partition_point(|p| p.output <= off) as u64).saturating_sub(1)
            }
        }
    }

    /// Check the points against the archive sizes (spec §5.3 checks, plus bounds).
    pub(crate) fn validate(&self, compressed_size: u64) -> Result<()> {
        let points = match self {
            Self::Tar {
                span_size, size, ..
            } => {
                if *span_size == 0 {
                    return Err(Error::Invalid {
                        what: "span size is zero",
                        index: 0,
                    });
                }
                if *size != compressed_size {
                    return Err(Error::Invalid {
                        what: "tar zinfo size differs from the archive size",
                        index: 0,
                    });
                }
                return Ok(());
            }
            Self::Gzip { points, .. } | Self::Zstd { points, .. } => points,
        };
        let Some(first) = points.first() else {
            return Err(Error::Invalid {
                what: "no checkpoints",
                index: 0,
            });
        };
        if first.output != 0 {
            return Err(Error::Invalid {
                what: "first checkpoint does not start at uncompressed offset 0",
                index: 0,
            });
        }
        for (i, pair) in points.windows(2).enumerate() {
            if pair[1].input <= pair[0].input || pair[1].output <= pair[0].output {
                return Err(Error::Invalid {
                    what: "checkpoint offsets do not strictly increase",
                    index: i as u64 + 1,
                });
            }
        }
        for (i, p) in points.iter().enumerate() {
            if p.bits > 7 || (p.bits != 0 && p.input == 0) {
                return Err(Error::Invalid {
                    what: "checkpoint bit count",
                    index: i as u64,
                });
            }
            if p.input > compressed_size {
                return Err(Error::Invalid {
                    what: "checkpoint beyond the end of the layer",
                    index: i as u64,
                });
            }
        }
        if matches!(self, Self::Gzip { .. }) && first.input < 10 {
            // Checkpoint 0 follows the gzip header, which is at least 10 bytes.
            return Err(Error::Invalid {
                what: "checkpoint 0 lies inside the gzip header",
                index: 0,
            });
        }
        Ok(())
    }
}

fn parse_gzip(blob: &[u8]) -> Result<Zinfo> {
    let count = i32_at(blob, 0, "gzip checkpoint count")?;
    let span_size = offset(i64_at(blob, 4, "gzip span size")?, 4, "gzip span size")?;
    let count = usize::try_from(count).map_err(|_| Error::Malformed {
        at: 0,
        what: "gzip checkpoint count",
    })?;
    if count == 0 {
        return Err(Error::Malformed {
            at: 0,
            what: "gzip checkpoint count",
        });
    }
    let body = blob.len() - GZIP_HEADER_LEN.min(blob.len());
    let stored = if body == GZIP_RECORD_LEN * count {
        count
    } else if body == GZIP_RECORD_LEN * (count - 1) {
        count - 1 // legacy v1: checkpoint 0 (in 10, out 0, no bits, zero window) implied
    } else {
        return Err(Error::Malformed {
            at: 0,
            what: "gzip checkpoint blob length",
        });
    };
    let mut points = Vec::with_capacity(count);
    if stored < count {
        points.push(Point {
            input: 10,
            output: 0,
            bits: 0,
            window: None,
        });
    }
    for k in 0..stored {
        let at = GZIP_HEADER_LEN + GZIP_RECORD_LEN * k;
        let (input, output) = offsets_at(blob, at)?;
        let bits = blob[at + 16];
        points.push(Point {
            input,
            output,
            bits,
            window: Some(at + 17),
        });
    }
    Ok(Zinfo::Gzip { span_size, points })
}

fn parse_tar(blob: &[u8]) -> Result<Zinfo> {
    let table = Table::root(blob)?;
    let version = table.i32(0, 0, "tar zinfo version")?;
    if version != TAR_ZINFO_VERSION {
        return Err(Error::Invalid {
            what: "unsupported tar zinfo version",
            index: version as u64,
        });
    }
    let span_size = offset(
        table.i64(1, 0, "tar zinfo span size")?,
        0,
        "tar zinfo span size",
    )?;
    let size = offset(table.i64(2, 0, "tar zinfo size")?, 0, "tar zinfo size")?;
    if span_size == 0 {
        return Err(Error::Invalid {
            what: "span size is zero",
            index: 0,
        });
    }
    Ok(Zinfo::Tar {
        span_size,
        size,
        count: size.div_ceil(span_size),
    })
}

fn parse_zstd(blob: &[u8]) -> Result<Zinfo> {
    if blob.get(..4) != Some(ZSTD_MAGIC.as_slice()) {
        return Err(Error::Malformed {
            at: 0,
            what: "zstd checkpoint magic",
        });
    }
    if i32_at(blob, 4, "zstd checkpoint version")? != 1 {
        return Err(Error::Malformed {
            at: 4,
            what: "zstd checkpoint version",
        });
    }
    let span_size = offset(i64_at(blob, 8, "zstd span size")?, 8, "zstd span size")?;
    let count = usize::try_from(i32_at(blob, 16, "zstd checkpoint count")?).map_err(|_| {
        Error::Malformed {
            at: 16,
            what: "zstd checkpoint count",
        }
    })?;
    if blob.len() != ZSTD_HEADER_LEN + 16 * count {
        return Err(Error::Malformed {
            at: 16,
            what: "zstd checkpoint blob length",
        });
    }
    let mut points = Vec::with_capacity(count);
    for k in 0..count {
        let at = ZSTD_HEADER_LEN + 16 * k;
        let (input, output) = offsets_at(blob, at)?;
        points.push(Point {
            input,
            output,
            bits: 0,
            window: None,
        });
    }
    Ok(Zinfo::Zstd { span_size, points })
}

/// Writes a gzip blob (version 2) as checkpoints arrive, to memory or a spill file, and keeps
/// the points (without their windows) for the span geometry.
#[derive(Debug)]
pub(crate) struct GzipBlobWriter {
    sink: BlobSink,
    span_size: u64,
    points: Vec<Point>,
}

impl GzipBlobWriter {
    pub(crate) fn new(span_size: u64, mut sink: BlobSink) -> Result<Self> {
        // The count is written last, once known.
        sink.write(&0i32.to_le_bytes())?;
        sink.write(&(span_size as i64).to_le_bytes())?;
        Ok(Self {
            sink,
            span_size,
            points: Vec::new(),
        })
    }

    pub(crate) fn push(&mut self, input: u64, output: u64, bits: u8, window: &[u8]) -> Result<()> {
        debug_assert_eq!(window.len(), WINDOW_SIZE);
        self.sink.write(&(input as i64).to_le_bytes())?;
        self.sink.write(&(output as i64).to_le_bytes())?;
        self.sink.write(&[bits])?;
        self.sink.write(window)?;
        self.points.push(Point {
            input,
            output,
            bits,
            window: None,
        });
        Ok(())
    }

    /// The blob, and its geometry (points without windows: for checks, not for decoding).
    pub(crate) fn finish(self) -> Result<(Blob, Zinfo)> {
        let count = i32::try_from(self.points.len()).map_err(|_| Error::TooLarge {
            what: "checkpoint list",
            size: self.points.len() as u64,
        })?;
        let blob = self.sink.finish(&count.to_le_bytes())?;
        Ok((
            blob,
            Zinfo::Gzip {
                span_size: self.span_size,
                points: self.points,
            },
        ))
    }
}

/// The `TarZinfo` flatbuffer, built exactly as soci's Go builder does.
pub(crate) fn tar_blob(span_size: u64, size: u64) -> Vec<u8> {
    let mut b = flatbuffers::FlatBufferBuilder::new();
    let start = b.start_table();
    b.push_slot::<i32>(4, TAR_ZINFO_VERSION, 0);
    b.push_slot::<i64>(6, span_size as i64, 0);
    b.push_slot::<i64>(8, size as i64, 0);
    let root = b.end_table(start);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

/// The Hermes zstd blob.
pub(crate) fn zstd_blob(span_size: u64, points: &[(u64, u64)]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(ZSTD_HEADER_LEN + 16 * points.len());
    blob.extend_from_slice(ZSTD_MAGIC);
    blob.extend_from_slice(&1i32.to_le_bytes());
    blob.extend_from_slice(&(span_size as i64).to_le_bytes());
    blob.extend_from_slice(&(points.len() as i32).to_le_bytes());
    for (input, output) in points {
        blob.extend_from_slice(&(*input as i64).to_le_bytes());
        blob.extend_from_slice(&(*output as i64).to_le_bytes());
    }
    blob
}
