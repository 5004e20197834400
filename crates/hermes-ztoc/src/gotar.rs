//! A streaming tar reader that reads headers exactly as Go's `archive/tar` does.
//!
//! Byte-identical zTOCs need soci's view of a tar, which is Go's: which PAX records override
//! which fields, GNU long names winning over PAX paths, the ustar prefix, base-256 numbers,
//! `TypeRegA` normalisation, where the end-of-archive position lands. No Rust tar crate
//! reproduces those rules, so this module does, and nothing more: it never reads file data, it
//! skips it (`BufRead::consume`, no copying), and it never holds more than one header.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use crate::sparse::{self, SparseMap};
use crate::{Error, Result};

const BLOCK: usize = 512;
/// Go's `maxSpecialFileSize`: PAX and GNU long-name payloads above this are refused.
const MAX_SPECIAL_FILE: u64 = 1 << 20;

/// A tar entry's header fields, after Go's merging of PAX and GNU extension headers.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub name: Vec<u8>,
    pub linkname: Vec<u8>,
    pub typeflag: u8,
    pub size: i64,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub devmajor: i64,
    pub devminor: i64,
    pub pax: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Offset of the entry's data in the stream (after a sparse map stored there).
    pub data_offset: u64,
    /// A sparse file's packed data length (`size` is then its full size).
    pub sparse_data_len: Option<u64>,
}

/// Reads headers from a tar stream.
#[derive(Debug)]
pub(crate) struct TarReader<R> {
    r: R,
    pos: u64,
    /// Data bytes of the current entry not yet skipped.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    done: bool,
}

fn header_err(offset: u64, what: &'static str) -> Error {
    Error::TarHeader { offset, what }
}

impl<R: BufRead> TarReader<R> {
    pub(crate) fn new(r: R) -> Self {
        Self {
            r,
            pos: 0,
            remaining: 0,
            pad: 0,
            done: false,
        }
    }

    /// Bytes consumed so far; after the end this is soci's `uncompressed_archive_size`.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    /// Skip up to `n` bytes; returns how many were skipped (fewer only at end of stream).
    fn skip(&mut self, mut n: u64) -> io::Result<u64> {
        let start = n;
        while n > 0 {
            let avail = self.r.fill_buf()?.len() as u64;
            if avail == 0 {
                break;
            }
            let take = avail.min(n);
            self.r.consume(take as usize);
            self.pos += take;
            n -= take;
        }
        Ok(start - n)
    }

    /// Read up to `buf.len()` bytes; returns how many were read (fewer only at end of stream).
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            let take = avail.len().min(buf.len() - got);
            buf[got..got + take].copy_from_slice(&avail[..take]);
            self.r.consume(take);
            self.pos += take as u64;
            got += take;
        }
        Ok(got)
    }

    /// Read one block: `None` at a clean end of stream (zero bytes), error on a partial block.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>> {
        let mut blk = [0u8; BLOCK];
        match self.read_full(&mut blk)? {
            0 => Ok(None),
            BLOCK => Ok(Some(blk)),
            _ => Err(Error::TarTruncated { offset: self.pos }),
        }
    }

    /// Read an extension header's payload (PAX records, GNU long name).
    fn read_special(&mut self, size: i64, offset: u64) -> Result<Vec<u8>> {
        let size = size as u64;
        if size > MAX_SPECIAL_FILE {
            return Err(header_err(offset, "extension header payload over 1 MiB"));
        }
        let mut buf = vec![0u8; size as usize];
        if self.read_full(&mut buf)? != buf.len() {
            return Err(Error::TarTruncated { offset: self.pos });
        }
        self.remaining = 0;
        Ok(buf)
    }

    /// The next entry, or `None` at the end of the archive.
    pub(crate) fn next_header(&mut self) -> Result<Option<Header>> {
        if self.done {
            return Ok(None);
        }
        let mut pax: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            // Discard the rest of the previous entry, then its padding. Running out of input in
            // the padding is a clean end, as in Go.
            let want = self.remaining;
            if self.skip(want)? != want {
                return Err(Error::TarTruncated { offset: self.pos });
            }
            self.remaining = 0;
            let pad = std::mem::take(&mut self.pad);
            if self.skip(pad)? != pad {
                self.done = true;
                return Ok(None);
            }

            let header_offset = self.pos;
            let Some(mut hdr) = self.read_header()? else {
                self.done = true;
                return Ok(None);
            };
            self.set_data(&hdr, header_offset)?;
            match hdr.typeflag {
                b'x' | b'g' => {
                    let records =
                        parse_pax(&self.read_special(hdr.size, header_offset)?, header_offset)?;
                    if hdr.typeflag == b'g' {
                        // Go merges a global header's records into the header it returns; only
                        // the name matters to an unpack.
                        if let Some(path) = records.get(&b"path"[..]).filter(|p| !p.is_empty()) {
                            hdr.name = path.clone();
                        }
                        hdr.pax = records;
                        hdr.data_offset = self.pos;
                        return Ok(Some(hdr));
                    }
                    pax = Some(records);
                }
                b'L' | b'K' => {
                    let payload = self.read_special(hdr.size, header_offset)?;
                    let value = cstr(&payload).to_vec();
                    if hdr.typeflag == b'L' {
                        long_name = Some(value);
                    } else {
                        long_link = Some(value);
                    }
                }
                _ => {
                    if let Some(records) = pax {
                        merge_pax(&mut hdr, records, header_offset)?;
                    }
                    if let Some(name) = long_name.filter(|n| !n.is_empty()) {
                        hdr.name = name;
                    }
                    if let Some(link) = long_link.filter(|l| !l.is_empty()) {
                        hdr.linkname = link;
                    }
                    if hdr.typeflag == 0 {
                        hdr.typeflag = if hdr.name.ends_with(b"/") { b'5' } else { b'0' };
                    }
                    // PAX may have changed the size.
                    self.set_data(&hdr, header_offset)?;
                    hdr.data_offset = self.pos;
                    if let Some(version) = sparse::version(|k| hdr.pax.get(k).map(Vec::as_slice)) {
                        self.read_sparse(&mut hdr, version, header_offset)?;
                    }
                    return Ok(Some(hdr));
                }
            }
        }
    }

    /// Go's `readGNUSparsePAXHeaders`: the real name and size, and the map (format 1.0 reads it
    /// from the data, whose remaining bytes are then the packed fragments).
    fn read_sparse(
        &mut self,
        hdr: &mut Header,
        version: sparse::Version,
        offset: u64,
    ) -> Result<()> {
        let bad = |what| header_err(offset, what);
        if is_header_only(hdr.typeflag) {
            return Err(bad("sparse map on an entry without data"));
        }
        let record = |k: &[u8]| hdr.pax.get(k).map(Vec::as_slice);
        let name = record(sparse::NAME)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec);
        let size = sparse::real_size(record)
            .map_err(|()| bad("malformed sparse file size"))?
            .ok_or_else(|| bad("sparse file without its size record"))?;
        let pairs = match version {
            sparse::Version::InRecords => {
                sparse::pairs_from_records(record).ok_or_else(|| bad("malformed sparse map"))?
            }
            sparse::Version::InData => {
                let pairs = self.read_map_in_data(offset)?;
                // Kept in the zTOC, where readers find it without fetching the data.
                hdr.pax
                    .insert(sparse::MAP.to_vec(), sparse::map_record(&pairs));
                pairs
            }
        };
        SparseMap::new(size, &pairs, self.remaining).map_err(|e| bad(e.what()))?;
        if let Some(name) = name {
            hdr.name = name;
        }
        hdr.size = size;
        hdr.data_offset = self.pos;
        hdr.sparse_data_len = Some(self.remaining);
        Ok(())
    }

    /// Go's `readGNUSparseMap1x0`: newline-terminated decimal numbers in whole blocks at the
    /// start of the data, the count of fragments first, then offset and length of each.
    fn read_map_in_data(&mut self, offset: u64) -> Result<Vec<(i64, i64)>> {
        let bad = || header_err(offset, "malformed sparse map");
        let mut text = Vec::new();
        self.read_lines(&mut text, 1, offset)?;
        let mut lines = text.split(|&b| b == b'\n');
        let count = lines
            .next()
            .and_then(parse_int)
            .filter(|&n| n >= 0 && n.checked_mul(2).is_some())
            .ok_or_else(bad)?;
        self.read_lines(&mut text, 1 + 2 * count as u64, offset)?;
        let mut numbers = text.split(|&b| b == b'\n').skip(1).map(parse_int);
        let mut pairs = Vec::new();
        for _ in 0..count {
            let (Some(Some(start)), Some(Some(len))) = (numbers.next(), numbers.next()) else {
                return Err(bad());
            };
            pairs.push((start, len));
        }
        Ok(pairs)
    }

    /// Read whole blocks of the entry's data into `text` until it holds `lines` newlines.
    fn read_lines(&mut self, text: &mut Vec<u8>, lines: u64, offset: u64) -> Result<()> {
        let mut have = text.iter().filter(|&&b| b == b'\n').count() as u64;
        while have < lines {
            if self.remaining < BLOCK as u64 {
                return Err(header_err(offset, "sparse map runs past the entry's data"));
            }
            if text.len() + BLOCK > MAX_SPECIAL_FILE as usize {
                return Err(header_err(offset, "sparse map over 1 MiB"));
            }
            let Some(blk) = self.read_block()? else {
                return Err(Error::TarTruncated { offset: self.pos });
            };
            self.remaining -= BLOCK as u64;
            have += blk.iter().filter(|&&b| b == b'\n').count() as u64;
            text.extend_from_slice(&blk);
        }
        Ok(())
    }

    fn set_data(&mut self, hdr: &Header, offset: u64) -> Result<()> {
        let size = if is_header_only(hdr.typeflag) {
            0
        } else {
            hdr.size
        };
        if size < 0 {
            return Err(header_err(offset, "negative size"));
        }
        self.remaining = size as u64;
        self.pad = (BLOCK as u64 - size as u64 % BLOCK as u64) % BLOCK as u64;
        Ok(())
    }

    /// Go's `readHeader`: one header block, or the end-of-archive marker.
    fn read_header(&mut self) -> Result<Option<Header>> {
        let offset = self.pos;
        let Some(blk) = self.read_block()? else {
            return Ok(None);
        };
        if blk.iter().all(|&b| b == 0) {
            // Exactly one zero block then EOF, or two zero blocks: the end.
            let Some(second) = self.read_block()? else {
                return Ok(None);
            };
            if second.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            return Err(header_err(
                offset,
                "zero block followed by a non-zero block",
            ));
        }
        let format = Format::of(&blk).ok_or_else(|| header_err(offset, "checksum mismatch"))?;
        let mut p = Parser::default();
        let mut hdr = Header {
            typeflag: blk[156],
            name: cstr(&blk[0..100]).to_vec(),
            linkname: cstr(&blk[157..257]).to_vec(),
            size: p.numeric(&blk[124..136]),
            mode: p.numeric(&blk[100..108]),
            uid: p.numeric(&blk[108..116]),
            gid: p.numeric(&blk[116..124]),
            mtime_secs: p.numeric(&blk[136..148]),
            mtime_nanos: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            devmajor: 0,
            devminor: 0,
            pax: BTreeMap::new(),
            data_offset: 0,
            sparse_data_len: None,
        };
        if format != Format::V7 {
            hdr.uname = cstr(&blk[265..297]).to_vec();
            hdr.gname = cstr(&blk[297..329]).to_vec();
            hdr.devmajor = p.numeric(&blk[329..337]);
            hdr.devminor = p.numeric(&blk[337..345]);
            let prefix: &[u8] = match format {
                Format::Ustar => cstr(&blk[345..500]),
                Format::Star => {
                    p.numeric(&blk[476..488]);
                    p.numeric(&blk[488..500]);
                    cstr(&blk[345..476])
                }
                Format::Gnu => {
                    // Go's fallback for pre-1.8 Go writers: unparsable GNU atime/ctime fields
                    // that look like text are really a ustar prefix.
                    let mut p2 = Parser::default();
                    if blk[345] != 0 {
                        p2.numeric(&blk[345..357]);
                    }
                    if blk[357] != 0 {
                        p2.numeric(&blk[357..369]);
                    }
                    let prefix = cstr(&blk[345..500]);
                    if p2.failed && prefix.is_ascii() {
                        prefix
                    } else {
                        &[]
                    }
                }
                Format::V7 => &[],
            };
            if !prefix.is_empty() {
                let mut name = prefix.to_vec();
                name.push(b'/');
                name.extend_from_slice(&hdr.name);
                hdr.name = name;
            }
        }
        if p.failed {
            return Err(header_err(offset, "malformed numeric field"));
        }
        Ok(Some(hdr))
    }
}

fn is_header_only(typeflag: u8) -> bool {
    matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

/// Bytes up to the first NUL (Go's `parseString`).
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

impl Format {
    /// Go's `getFormat`: `None` when the checksum does not match.
    fn of(blk: &[u8; BLOCK]) -> Option<Self> {
        let mut p = Parser::default();
        let stored = p.octal(&blk[148..156]);
        let (mut unsigned, mut signed) = (0i64, 0i64);
        for (i, &b) in blk.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += i64::from(b);
            signed += i64::from(b as i8);
        }
        if p.failed || (stored != unsigned && stored != signed) {
            return None;
        }
        let magic = &blk[257..263];
        let version = &blk[263..265];
        Some(if magic == b"ustar\0" && &blk[508..512] == b"tar\0" {
            Self::Star
        } else if magic == b"ustar\0" {
            Self::Ustar
        } else if magic == b"ustar " && version == b" \0" {
            Self::Gnu
        } else {
            Self::V7
        })
    }
}

/// Go's numeric field parser: remembers the first failure like Go's `parser.err`.
#[derive(Debug, Default)]
struct Parser {
    failed: bool,
}

impl Parser {
    fn numeric(&mut self, b: &[u8]) -> i64 {
        if b.first().is_some_and(|&c| c & 0x80 != 0) {
            // Base-256 (GNU): two's complement, big endian, top bit is the marker.
            let inv: u8 = if b[0] & 0x40 != 0 { 0xff } else { 0 };
            let mut x: u64 = 0;
            for (i, &c) in b.iter().enumerate() {
                let mut c = c ^ inv;
                if i == 0 {
                    c &= 0x7f;
                }
                if x >> 56 > 0 {
                    self.failed = true;
                    return 0;
                }
                x = x << 8 | u64::from(c);
            }
            if x >> 63 > 0 {
                self.failed = true;
                return 0;
            }
            return if inv == 0xff { !(x as i64) } else { x as i64 };
        }
        self.octal(b)
    }

    fn octal(&mut self, b: &[u8]) -> i64 {
        let trimmed = trim(b, b" \0");
        if trimmed.is_empty() {
            return 0;
        }
        match parse_uint(cstr(trimmed), 8) {
            Some(x) => x as i64,
            None => {
                self.failed = true;
                0
            }
        }
    }
}

fn trim<'a>(mut b: &'a [u8], set: &[u8]) -> &'a [u8] {
    while let [first, rest @ ..] = b {
        if !set.contains(first) {
            break;
        }
        b = rest;
    }
    while let [rest @ .., last] = b {
        if !set.contains(last) {
            break;
        }
        b = rest;
    }
    b
}

/// `strconv.ParseUint(s, radix, 64)` without sign or underscores.
fn parse_uint(s: &[u8], radix: u32) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut x: u64 = 0;
    for &c in s {
        let d = (c as char).to_digit(radix)?;
        x = x.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(x)
}

/// `strconv.ParseInt(s, 10, 64)`: optional sign, decimal digits.
pub(crate) fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, s),
    };
    let x = parse_uint(digits, 10)?;
    if neg {
        if x > i64::MAX as u64 + 1 {
            None
        } else {
            Some((x as i64).wrapping_neg())
        }
    } else {
        i64::try_from(x).ok()
    }
}

/// Go's `parsePAX`: records `"%d %s=%s\n"`; GNU sparse 0.0 offset/numbytes pairs are folded into
/// `GNU.sparse.map`.
fn parse_pax(mut s: &[u8], offset: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let bad = || header_err(offset, "malformed PAX record");
    let mut records = BTreeMap::new();
    let mut sparse: Vec<&[u8]> = Vec::new();
    while !s.is_empty() {
        let sp = s.iter().position(|&c| c == b' ').ok_or_else(bad)?;
        let n = parse_int(&s[..sp]).ok_or_else(bad)?;
        if n < 5 || n as u64 > s.len() as u64 {
            return Err(bad());
        }
        let n = n as usize;
        if n <= sp + 1 {
            return Err(bad());
        }
        let rec = &s[sp + 1..n - 1];
        if s[n - 1] != b'\n' {
            return Err(bad());
        }
        let eq = rec.iter().position(|&c| c == b'=').ok_or_else(bad)?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let valid = !key.is_empty()
            && match key {
                b"path" | b"linkpath" | b"uname" | b"gname" => !value.contains(&0),
                _ => !key.contains(&0),
            };
        if !valid {
            return Err(bad());
        }
        match key {
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let expect_offset = sparse.len().is_multiple_of(2);
                if (expect_offset != (key == b"GNU.sparse.offset")) || value.contains(&b',') {
                    return Err(bad());
                }
                sparse.push(value);
            }
            _ => {
                records.insert(key.to_vec(), value.to_vec());
            }
        }
        s = &s[n..];
    }
    if !sparse.is_empty() {
        records.insert(b"GNU.sparse.map".to_vec(), sparse.join(&b','));
    }
    Ok(records)
}

/// Go's `parsePAXTime`.
fn parse_pax_time(s: &[u8]) -> Option<(i64, u32)> {
    let (secs, frac) = match s.iter().position(|&c| c == b'.') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[][..]),
    };
    let whole = parse_int(secs)?;
    if frac.is_empty() {
        return Some((whole, 0));
    }
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos: i64 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.get(i).map_or(0, |&d| i64::from(d - b'0'));
    }
    let nanos = if secs.first() == Some(&b'-') {
        -nanos
    } else {
        nanos
    };
    // time.Unix normalises the nanoseconds into [0, 1e9).
    let total_secs = whole.checked_add(nanos.div_euclid(1_000_000_000))?;
    Some((total_secs, nanos.rem_euclid(1_000_000_000) as u32))
}

/// Go's `mergePAX`: empty values keep the header's value; all records are kept.
fn merge_pax(hdr: &mut Header, records: BTreeMap<Vec<u8>, Vec<u8>>, offset: u64) -> Result<()> {
    let bad = || header_err(offset, "malformed PAX value");
    for (key, value) in &records {
        if value.is_empty() {
            continue;
        }
        match key.as_slice() {
            b"path" => hdr.name = value.clone(),
            b"linkpath" => hdr.linkname = value.clone(),
            b"uname" => hdr.uname = value.clone(),
            b"gname" => hdr.gname = value.clone(),
            b"uid" => hdr.uid = parse_int(value).ok_or_else(bad)?,
            b"gid" => hdr.gid = parse_int(value).ok_or_else(bad)?,
            b"size" => hdr.size = parse_int(value).ok_or_else(bad)?,
            b"mtime" => {
                (hdr.mtime_secs, hdr.mtime_nanos) = parse_pax_time(value).ok_or_else(bad)?;
            }
            b"atime" | b"ctime" => {
                parse_pax_time(value).ok_or_else(bad)?;
            }
            _ => {}
        }
    }
    hdr.pax = records;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_time_normalises_like_go() {
        assert_eq!(
            parse_pax_time(b"1700000000.25"),
            Some((1_700_000_000, 250_000_000))
        );
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"5.1234567891"), Some((5, 123_456_789)));
        assert_eq!(parse_pax_time(b"5.x"), None);
    }

    #[test]
    fn numeric_fields_parse_octal_and_base256() {
        let mut p = Parser::default();
        assert_eq!(p.numeric(b"0000644\0"), 0o644);
        assert_eq!(p.numeric(b"  17 \0"), 0o17);
        assert_eq!(p.numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0]), 256);
        assert_eq!(p.numeric(&[0xff; 8]), -1);
        assert!(!p.failed);
        p.numeric(b"9\0");
        assert!(p.failed);
    }

    #[test]
    fn pax_records_reject_bad_lengths() {
        assert!(parse_pax(b"11 path=ab\n", 0).is_ok());
        assert!(parse_pax(b"12 path=ab\n", 0).is_err());
        assert!(parse_pax(b"3 a=\n", 0).is_err());
        assert_eq!(
            parse_pax(b"7 a=\x00b\n", 0).unwrap()[&b"a".to_vec()],
            b"\0b"
        );
    }
}
