//! A small, fully bounds-checked FlatBuffers reader.
//!
//! zTOCs come from registries and other builders, so every offset is untrusted. The generated
//! Rust readers either panic on bad offsets or (with the verifier) reject the non-UTF-8 names
//! real layers contain and cap table counts too low for big layers. This reader checks every
//! access against the buffer and returns [`Error::Malformed`] instead; it allocates nothing.

use crate::Error;

fn malformed(at: usize, what: &'static str) -> Error {
    Error::Malformed { at, what }
}

fn read_array<const N: usize>(buf: &[u8], at: usize, what: &'static str) -> Result<[u8; N], Error> {
    buf.get(at..at.checked_add(N).ok_or_else(|| malformed(at, what))?)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| malformed(at, what))
}

fn read_u32(buf: &[u8], at: usize, what: &'static str) -> Result<u32, Error> {
    read_array::<4>(buf, at, what).map(u32::from_le_bytes)
}

fn read_u16(buf: &[u8], at: usize, what: &'static str) -> Result<u16, Error> {
    read_array::<2>(buf, at, what).map(u16::from_le_bytes)
}

/// Follow the unsigned offset stored at `at` (relative to `at`).
fn follow(buf: &[u8], at: usize, what: &'static str) -> Result<usize, Error> {
    let off = read_u32(buf, at, what)? as usize;
    let target = at.checked_add(off).ok_or_else(|| malformed(at, what))?;
    if target >= buf.len() {
        return Err(malformed(at, what));
    }
    Ok(target)
}

/// A table: its position and its vtable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

impl<'a> Table<'a> {
    /// The root table of a buffer without file identifier or size prefix.
    pub(crate) fn root(buf: &'a [u8]) -> Result<Self, Error> {
        let pos = follow(buf, 0, "root offset")?;
        Self::at(buf, pos)
    }

    fn at(buf: &'a [u8], pos: usize) -> Result<Self, Error> {
        let soffset = i32::from_le_bytes(read_array::<4>(buf, pos, "table vtable offset")?);
        let vtable = (pos as i64) - i64::from(soffset);
        let vtable = usize::try_from(vtable).map_err(|_| malformed(pos, "table vtable offset"))?;
        let vtable_len = usize::from(read_u16(buf, vtable, "vtable length")?);
        if vtable_len < 4 || vtable_len % 2 != 0 || vtable + vtable_len > buf.len() {
            return Err(malformed(vtable, "vtable length"));
        }
        Ok(Self {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Position of field `id`, or `None` when absent.
    fn field(&self, id: usize) -> Result<Option<usize>, Error> {
        let slot = 4 + 2 * id;
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = usize::from(read_u16(self.buf, self.vtable + slot, "vtable entry")?);
        if off == 0 {
            return Ok(None);
        }
        Ok(Some(self.pos + off))
    }

    fn scalar<const N: usize>(
        &self,
        id: usize,
        what: &'static str,
    ) -> Result<Option<[u8; N]>, Error> {
        match self.field(id)? {
            None => Ok(None),
            Some(at) => read_array::<N>(self.buf, at, what).map(Some),
        }
    }

    pub(crate) fn i64(&self, id: usize, default: i64, what: &'static str) -> Result<i64, Error> {
        Ok(self
            .scalar::<8>(id, what)?
            .map_or(default, i64::from_le_bytes))
    }

    pub(crate) fn i32(&self, id: usize, default: i32, what: &'static str) -> Result<i32, Error> {
        Ok(self
            .scalar::<4>(id, what)?
            .map_or(default, i32::from_le_bytes))
    }

    pub(crate) fn u32(&self, id: usize, default: u32, what: &'static str) -> Result<u32, Error> {
        Ok(self
            .scalar::<4>(id, what)?
            .map_or(default, u32::from_le_bytes))
    }

    pub(crate) fn i8(&self, id: usize, default: i8, what: &'static str) -> Result<i8, Error> {
        Ok(self
            .scalar::<1>(id, what)?
            .map_or(default, i8::from_le_bytes))
    }

    /// A string or `[ubyte]` field as raw bytes (empty when absent).
    pub(crate) fn bytes(&self, id: usize, what: &'static str) -> Result<&'a [u8], Error> {
        match self.field(id)? {
            None => Ok(&[]),
            Some(at) => Vector::at(self.buf, follow(self.buf, at, what)?, 1, what)?.raw(),
        }
    }

    pub(crate) fn table(&self, id: usize, what: &'static str) -> Result<Option<Table<'a>>, Error> {
        match self.field(id)? {
            None => Ok(None),
            Some(at) => Table::at(self.buf, follow(self.buf, at, what)?).map(Some),
        }
    }

    /// A vector of tables or strings (4-byte offsets); empty when absent.
    pub(crate) fn vector(&self, id: usize, what: &'static str) -> Result<Vector<'a>, Error> {
        match self.field(id)? {
            None => Ok(Vector {
                buf: self.buf,
                start: 0,
                len: 0,
                what,
            }),
            Some(at) => Vector::at(self.buf, follow(self.buf, at, what)?, 4, what),
        }
    }
}

/// A vector: `len` elements starting at `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
    what: &'static str,
}

impl<'a> Vector<'a> {
    fn at(buf: &'a [u8], pos: usize, elem_size: usize, what: &'static str) -> Result<Self, Error> {
        let len = read_u32(buf, pos, what)? as usize;
        let start = pos + 4;
        let bytes = len
            .checked_mul(elem_size)
            .ok_or_else(|| malformed(pos, what))?;
        if start.checked_add(bytes).is_none_or(|end| end > buf.len()) {
            return Err(malformed(pos, what));
        }
        Ok(Self {
            buf,
            start,
            len,
            what,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn raw(&self) -> Result<&'a [u8], Error> {
        self.buf
            .get(self.start..self.start + self.len)
            .ok_or_else(|| malformed(self.start, self.what))
    }

    fn element(&self, i: usize) -> Result<usize, Error> {
        if i >= self.len {
            return Err(malformed(self.start, self.what));
        }
        follow(self.buf, self.start + 4 * i, self.what)
    }

    pub(crate) fn table(&self, i: usize) -> Result<Table<'a>, Error> {
        Table::at(self.buf, self.element(i)?)
    }

    pub(crate) fn bytes(&self, i: usize) -> Result<&'a [u8], Error> {
        Vector::at(self.buf, self.element(i)?, 1, self.what)?.raw()
    }
}
