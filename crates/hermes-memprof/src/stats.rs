//! Counters and their JSON file. Everything here is allocation-free.
#![allow(unsafe_code)]

use core::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Histogram buckets: `k` counts sizes in (2^(k-1), 2^k]; the last is open-ended.
pub(crate) const BUCKETS: usize = 32;

pub(crate) static ALLOCS: AtomicU64 = AtomicU64::new(0);
pub(crate) static FREES: AtomicU64 = AtomicU64::new(0);
pub(crate) static REALLOCS: AtomicU64 = AtomicU64::new(0);
pub(crate) static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
pub(crate) static LIVE: AtomicI64 = AtomicI64::new(0);
pub(crate) static PEAK: AtomicU64 = AtomicU64::new(0);
static HIST: [AtomicU64; BUCKETS] = [const { AtomicU64::new(0) }; BUCKETS];
pub(crate) static SAMPLE_EVERY: AtomicU64 = AtomicU64::new(1);
pub(crate) static INTERVAL_NS: AtomicU64 = AtomicU64::new(1_000_000_000);
static LAST_WRITE_NS: AtomicU64 = AtomicU64::new(0);
static WRITING: AtomicBool = AtomicBool::new(false);

const PATH_MAX: usize = 1024;
/// The output template (`%p` not yet replaced), NUL-free; length in `OUT_LEN` (0 = off).
static mut OUT_TEMPLATE: [u8; PATH_MAX] = [0; PATH_MAX];
static OUT_LEN: AtomicUsize = AtomicUsize::new(0);

fn bucket(size: usize) -> usize {
    if size <= 1 {
        0
    } else {
        ((usize::BITS - (size - 1).leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

pub(crate) fn add_live(delta: i64) {
    let now = LIVE.fetch_add(delta, Relaxed) + delta;
    if now > 0 {
        PEAK.fetch_max(now as u64, Relaxed);
    }
}

/// Counts an allocation of `size` requested bytes occupying `usable` bytes.
pub(crate) fn on_alloc(size: usize, usable: usize) {
    let n = ALLOCS.fetch_add(1, Relaxed);
    ALLOC_BYTES.fetch_add(size as u64, Relaxed);
    add_live(usable as i64);
    let every = SAMPLE_EVERY.load(Relaxed).max(1);
    if n.is_multiple_of(every) {
        HIST[bucket(size)].fetch_add(1, Relaxed);
    }
    if n.is_multiple_of(1024) {
        maybe_write();
    }
}

/// Counts a free of a block occupying `usable` bytes.
pub(crate) fn on_free(usable: usize) {
    let n = FREES.fetch_add(1, Relaxed);
    add_live(-(usable as i64));
    if n.is_multiple_of(1024) {
        maybe_write();
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime does not allocate.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

fn maybe_write() {
    let interval = INTERVAL_NS.load(Relaxed);
    if interval == 0 || OUT_LEN.load(Relaxed) == 0 {
        return;
    }
    let now = monotonic_ns();
    if now.saturating_sub(LAST_WRITE_NS.load(Relaxed)) >= interval {
        LAST_WRITE_NS.store(now, Relaxed);
        write_file(false);
    }
}

/// A fixed buffer implementing `fmt::Write`; overflowing output is an error, never a
/// reallocation.
struct Buf<const N: usize> {
    b: [u8; N],
    n: usize,
}

impl<const N: usize> Buf<N> {
    const fn new() -> Self {
        Self { b: [0; N], n: 0 }
    }
    fn push(&mut self, s: &[u8]) -> core::fmt::Result {
        let end = self
            .n
            .checked_add(s.len())
            .filter(|e| *e <= N)
            .ok_or(core::fmt::Error)?;
        self.b[self.n..end].copy_from_slice(s);
        self.n = end;
        Ok(())
    }
}

impl<const N: usize> core::fmt::Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes())
    }
}

/// Reads the environment. Called once from the library constructor, before threads exist.
pub(crate) fn init_from_env() {
    let var = |name: &core::ffi::CStr| -> Option<&'static [u8]> {
        // SAFETY: getenv with a NUL-terminated name; the result is NULL or a NUL-terminated
        // string that lives as long as the environment is not modified (we copy it at once).
        let p = unsafe { libc::getenv(name.as_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` is a valid NUL-terminated C string (see above).
        Some(unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes())
    };
    let num = |b: &[u8]| -> Option<u64> { core::str::from_utf8(b).ok()?.trim().parse().ok() };
    if let Some(v) = var(c"HERMES_MEMPROF_SAMPLE_EVERY").and_then(num) {
        SAMPLE_EVERY.store(v.max(1), Relaxed);
    }
    if let Some(v) = var(c"HERMES_MEMPROF_INTERVAL_MS").and_then(num) {
        INTERVAL_NS.store(v.saturating_mul(1_000_000), Relaxed);
    }
    if let Some(out) = var(c"HERMES_MEMPROF_OUT").filter(|o| !o.is_empty() && o.len() < PATH_MAX) {
        // SAFETY: only the constructor writes OUT_TEMPLATE, before any other thread runs and
        // before OUT_LEN publishes it.
        unsafe {
            let t = &mut *core::ptr::addr_of_mut!(OUT_TEMPLATE);
            t[..out.len()].copy_from_slice(out);
        }
        OUT_LEN.store(out.len(), Relaxed);
    }
}

/// In a forked child, no other thread exists any more: release the writer flag a parent's
/// thread may have held. The child keeps the parent's counters (its heap is a copy) and writes
/// to its own file when the name contains `%p`.
pub(crate) extern "C" fn after_fork_in_child() {
    WRITING.store(false, Relaxed);
}

/// Writes the statistics file (if configured). Concurrent callers skip instead of waiting.
pub(crate) fn write_file(is_final: bool) {
    let len = OUT_LEN.load(Relaxed);
    if len == 0 || WRITING.swap(true, Relaxed) {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: OUT_TEMPLATE is written only by the constructor before OUT_LEN is set; later it
    // is only read.
    let template = unsafe { &(&*core::ptr::addr_of!(OUT_TEMPLATE))[..len] };
    let mut path: Buf<{ PATH_MAX + 32 }> = Buf::new();
    let mut ok = true;
    let mut i = 0;
    while i < template.len() {
        if template[i] == b'%' && template.get(i + 1) == Some(&b'p') {
            ok &= write!(path, "{pid}").is_ok();
            i += 2;
        } else {
            ok &= path.push(&template[i..=i]).is_ok();
            i += 1;
        }
    }
    let mut tmp: Buf<{ PATH_MAX + 48 }> = Buf::new();
    ok &= tmp.push(&path.b[..path.n]).is_ok() && write!(tmp, ".{pid}.tmp\0").is_ok();
    ok &= path.push(b"\0").is_ok();

    let mut json: Buf<2048> = Buf::new();
    ok &= write!(
        json,
        "{{\"pid\":{pid},\"allocs\":{},\"frees\":{},\"reallocs\":{},\"alloc_bytes\":{},\"live_bytes\":{},\"peak_live_bytes\":{},\"sample_every\":{},\"final\":{is_final},\"hist\":[",
        ALLOCS.load(Relaxed),
        FREES.load(Relaxed),
        REALLOCS.load(Relaxed),
        ALLOC_BYTES.load(Relaxed),
        LIVE.load(Relaxed).max(0),
        PEAK.load(Relaxed),
        SAMPLE_EVERY.load(Relaxed),
    )
    .is_ok();
    for (k, h) in HIST.iter().enumerate() {
        let sep = if k == 0 { "" } else { "," };
        ok &= write!(json, "{sep}{}", h.load(Relaxed)).is_ok();
    }
    ok &= json.push(b"]}\n").is_ok();

    if ok {
        // SAFETY: `tmp` and `path` are NUL-terminated byte strings in live stack buffers;
        // `json.b[..json.n]` is initialized. open/write/close/rename do not allocate.
        unsafe {
            let fd = libc::open(
                tmp.b.as_ptr().cast(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                let mut off = 0;
                while off < json.n {
                    let w = libc::write(fd, json.b[off..].as_ptr().cast(), json.n - off);
                    if w <= 0 {
                        break;
                    }
                    off += w as usize;
                }
                libc::close(fd);
                if off == json.n {
                    libc::rename(tmp.b.as_ptr().cast(), path.b.as_ptr().cast());
                } else {
                    libc::unlink(tmp.b.as_ptr().cast());
                }
            }
        }
    }
    WRITING.store(false, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_power_of_two_ceilings() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(5), 3);
        assert_eq!(bucket(128), 7);
        assert_eq!(bucket(129), 8);
        assert_eq!(bucket(usize::MAX), BUCKETS - 1);
    }

    #[test]
    fn buf_refuses_to_overflow() {
        let mut b: Buf<4> = Buf::new();
        assert!(b.push(b"abc").is_ok());
        assert!(b.push(b"de").is_err());
        assert_eq!(&b.b[..b.n], b"abc");
    }
}
