//! The one place this crate calls zlib's C-style API (zlib-rs through `libz-rs-sys`).
//!
//! Building gzip checkpoints needs `Z_BLOCK` stops and the `data_type` bits, and resuming from a
//! checkpoint needs `inflatePrime` and `inflateSetDictionary`; no safe Rust inflate API exposes
//! those. Everything unsafe stays in this module behind a small safe type.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::c_int;

use libz_rs_sys as z;

/// Raw deflate (no header), used when resuming from a checkpoint.
pub(crate) const RAW: c_int = -15;
/// Automatic gzip or zlib header detection with a 32 KiB window.
pub(crate) const GZIP_OR_ZLIB: c_int = 47;

/// How `inflate` should return.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flush {
    /// Decode as much as fits.
    None,
    /// Also stop at every deflate block boundary and right after a gzip header.
    Block,
}

/// Outcome of one `inflate` call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The deflate stream (one gzip member) ended.
    pub stream_end: bool,
    /// zlib's `data_type`: unused bits in the last input byte, +64 in the last block, +128 at a
    /// block boundary or right after a header.
    pub data_type: c_int,
}

/// A zlib failure: the return code and zlib's message, if any.
#[derive(Debug, Clone)]
pub(crate) struct ZError {
    pub code: c_int,
    pub message: String,
}

impl std::fmt::Display for ZError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "zlib error {}", self.code)
        } else {
            write!(f, "{} (zlib error {})", self.message, self.code)
        }
    }
}

/// An inflate stream. Boxed because zlib keeps a pointer back to the stream in its state.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Inflater {
    pub(crate) fn new(window_bits: c_int) -> Result<Self, ZError> {
        let mut strm = Box::new(z::z_stream::default());
        let size = c_int::try_from(std::mem::size_of::<z::z_stream>()).unwrap_or(c_int::MAX);
        // SAFETY: `strm` is a valid, default-initialised z_stream (allocator fields set by
        // `Default`), boxed so it never moves; the version string is zlib-rs's own.
        let ret = unsafe { z::inflateInit2_(&mut *strm, window_bits, z::zlibVersion(), size) };
        let mut this = Self { strm };
        if ret != z::Z_OK {
            let err = this.error(ret);
            // The stream was never initialised: nothing to end.
            this.strm.state = std::ptr::null_mut();
            return Err(err);
        }
        Ok(this)
    }

    fn error(&self, code: c_int) -> ZError {
        let message = if self.strm.msg.is_null() {
            String::new()
        } else {
            // SAFETY: zlib sets `msg` to null or to a static NUL-terminated string.
            unsafe { CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        };
        ZError { code, message }
    }

    /// Inflate from `input` into `output`. Buffers longer than 4 GiB are used only in part.
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: Flush,
    ) -> Result<Step, ZError> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        let flush = match flush {
            Flush::None => z::Z_NO_FLUSH,
            Flush::Block => z::Z_BLOCK,
        };
        // SAFETY: next_in/avail_in and next_out/avail_out describe live, correctly sized
        // buffers borrowed for the duration of this call; the stream was initialised in `new`.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        // Do not keep pointers into buffers we no longer borrow.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        match ret {
            z::Z_OK | z::Z_BUF_ERROR => Ok(Step {
                consumed,
                produced,
                stream_end: false,
                data_type: self.strm.data_type,
            }),
            z::Z_STREAM_END => Ok(Step {
                consumed,
                produced,
                stream_end: true,
                data_type: self.strm.data_type,
            }),
            z::Z_NEED_DICT => Err(ZError {
                code: z::Z_DATA_ERROR,
                message: "stream needs a preset dictionary".into(),
            }),
            code => Err(self.error(code)),
        }
    }

    /// Insert `bits` bits of `value` into the bit buffer (resuming mid-byte).
    pub(crate) fn prime(&mut self, bits: u8, value: u8) -> Result<(), ZError> {
        // SAFETY: the stream was initialised in `new`; no buffers are referenced.
        let ret =
            unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(ret))
        }
    }

    /// Set the 32 KiB history a raw stream resumes with.
    pub(crate) fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ZError> {
        let len = u32::try_from(window.len()).unwrap_or(u32::MAX);
        // SAFETY: `window` is a live slice of at least `len` bytes; zlib copies it.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), len) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(ret))
        }
    }

    /// Start over (e.g. for the next gzip member), keeping the allocation.
    pub(crate) fn reset(&mut self, window_bits: c_int) -> Result<(), ZError> {
        // SAFETY: the stream was initialised in `new`.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(ret))
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        if !self.strm.state.is_null() {
            // SAFETY: the stream was initialised in `new` and is ended exactly once.
            unsafe {
                z::inflateEnd(&mut *self.strm);
            }
        }
    }
}
