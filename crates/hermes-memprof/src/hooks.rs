//! The exported allocator symbols and the lookup of the real ones.
#![allow(unsafe_code)]

use core::ffi::{c_int, c_void};
use core::ptr::null_mut;
use std::sync::atomic::{
    AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

use crate::stats;

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
type AlignedFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;

static REAL_MALLOC: AtomicUsize = AtomicUsize::new(0);
static REAL_FREE: AtomicUsize = AtomicUsize::new(0);
static REAL_CALLOC: AtomicUsize = AtomicUsize::new(0);
static REAL_REALLOC: AtomicUsize = AtomicUsize::new(0);
static REAL_POSIX_MEMALIGN: AtomicUsize = AtomicUsize::new(0);
static REAL_ALIGNED_ALLOC: AtomicUsize = AtomicUsize::new(0);
static REAL_MEMALIGN: AtomicUsize = AtomicUsize::new(0);

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const READY: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNINIT);

/// Bootstrap arena for allocations made by `dlsym` while the real functions are looked up.
const ARENA_SIZE: usize = 64 * 1024;
#[repr(align(16))]
struct Arena(#[allow(dead_code, reason = "only its address is used")] [u8; ARENA_SIZE]);
static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

fn arena_base() -> usize {
    core::ptr::addr_of!(ARENA) as usize
}

fn in_arena(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= arena_base() && a < arena_base() + ARENA_SIZE
}

fn arena_alloc(size: usize, zero: bool) -> *mut c_void {
    let size = match size.checked_add(15) {
        Some(s) => s & !15,
        None => return null_mut(),
    };
    let off = ARENA_USED.fetch_add(size, Relaxed);
    if off.checked_add(size).is_none_or(|e| e > ARENA_SIZE) {
        return null_mut();
    }
    let p = (arena_base() + off) as *mut u8;
    if zero {
        // SAFETY: [off, off+size) lies inside ARENA and was handed out to nobody else
        // (fetch_add reserves it exclusively); the arena is zero-initialized static memory, but
        // zero it anyway in case of future reuse.
        unsafe { core::ptr::write_bytes(p, 0, size) };
    }
    p.cast()
}

/// Looks up the real functions once. Returns false while a lookup is in progress (on this or
/// another thread), in which case the caller uses the bootstrap arena.
fn ensure_init() -> bool {
    match STATE.compare_exchange(UNINIT, INITIALIZING, Acquire, Acquire) {
        Ok(_) => {}
        Err(READY) => return true,
        Err(_) => return false,
    }
    let look = |name: &core::ffi::CStr, slot: &AtomicUsize| {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated symbol name; any allocation it
        // makes re-enters our hooks, which see INITIALIZING and use the arena.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        slot.store(p as usize, Release);
    };
    look(c"malloc", &REAL_MALLOC);
    look(c"free", &REAL_FREE);
    look(c"calloc", &REAL_CALLOC);
    look(c"realloc", &REAL_REALLOC);
    look(c"posix_memalign", &REAL_POSIX_MEMALIGN);
    look(c"aligned_alloc", &REAL_ALIGNED_ALLOC);
    look(c"memalign", &REAL_MEMALIGN);
    STATE.store(READY, Release);
    true
}

macro_rules! real {
    ($slot:ident, $ty:ty) => {{
        let p = $slot.load(Acquire);
        if p == 0 {
            None
        } else {
            // SAFETY: the slot holds the address dlsym returned for this very symbol, whose C
            // signature is `$ty`.
            Some(unsafe { core::mem::transmute::<usize, $ty>(p) })
        }
    }};
}

fn usable(p: *mut c_void) -> usize {
    // SAFETY: `p` is a live block returned by the real allocator (never an arena pointer).
    unsafe { libc::malloc_usable_size(p) }
}

/// Runs the library constructor: looks up the real functions, reads the environment and
/// makes sure a child forked while a thread was writing the file can still write its own.
extern "C" fn on_load() {
    ensure_init();
    stats::init_from_env();
    // SAFETY: registering a plain function without captured state; it only stores an atomic.
    unsafe { libc::pthread_atfork(None, None, Some(stats::after_fork_in_child)) };
}

/// Writes the final statistics when the process exits.
extern "C" fn on_unload() {
    stats::write_file(true);
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = on_load;

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = on_unload;

/// `malloc(3)`.
///
/// # Safety
/// As `malloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    if !ensure_init() {
        return arena_alloc(size, false);
    }
    let Some(f) = real!(REAL_MALLOC, MallocFn) else {
        return null_mut();
    };
    // SAFETY: forwarding to the real malloc with the caller's argument.
    let p = unsafe { f(size) };
    if !p.is_null() {
        stats::on_alloc(size, usable(p));
    }
    p
}

/// `calloc(3)`.
///
/// # Safety
/// As `calloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    if !ensure_init() {
        return n
            .checked_mul(size)
            .map_or(null_mut(), |s| arena_alloc(s, true));
    }
    let Some(f) = real!(REAL_CALLOC, CallocFn) else {
        return null_mut();
    };
    // SAFETY: forwarding to the real calloc with the caller's arguments.
    let p = unsafe { f(n, size) };
    if !p.is_null() {
        stats::on_alloc(n.saturating_mul(size), usable(p));
    }
    p
}

/// `free(3)`.
///
/// # Safety
/// As `free(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || in_arena(p) {
        return;
    }
    ensure_init();
    let Some(f) = real!(REAL_FREE, FreeFn) else {
        return;
    };
    stats::on_free(usable(p));
    // SAFETY: `p` came from the real allocator (not the arena, checked above).
    unsafe { f(p) }
}

/// `realloc(3)`.
///
/// # Safety
/// As `realloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: realloc(NULL, n) is malloc(n).
        return unsafe { malloc(size) };
    }
    if in_arena(p) || !ensure_init() {
        // Move an arena block (or allocate during bootstrap): the old size is unknown, copy at
        // most what fits in both.
        let q = if ensure_init() {
            // SAFETY: plain allocation through our own malloc.
            unsafe { malloc(size) }
        } else {
            arena_alloc(size, false)
        };
        if !q.is_null() && in_arena(p) {
            let avail = arena_base() + ARENA_SIZE - p as usize;
            // SAFETY: `p` points into the arena with at least `avail` bytes after it, `q` has
            // room for `size` bytes, and the regions do not overlap (q is a fresh block).
            unsafe {
                core::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), size.min(avail))
            };
        }
        return q;
    }
    let Some(f) = real!(REAL_REALLOC, ReallocFn) else {
        return null_mut();
    };
    let old = usable(p);
    // SAFETY: `p` came from the real allocator; forwarding the caller's arguments.
    let q = unsafe { f(p, size) };
    if size == 0 {
        // glibc frees the block and returns NULL (or a minimal block).
        stats::on_free(old);
        if !q.is_null() {
            stats::on_alloc(0, usable(q));
        }
    } else if !q.is_null() {
        stats::REALLOCS.fetch_add(1, Relaxed);
        stats::add_live(usable(q) as i64 - old as i64);
    }
    q
}

/// `posix_memalign(3)`.
///
/// # Safety
/// As `posix_memalign(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    ensure_init();
    let Some(f) = real!(REAL_POSIX_MEMALIGN, PosixMemalignFn) else {
        return libc::ENOMEM;
    };
    // SAFETY: forwarding the caller's arguments to the real function.
    let r = unsafe { f(out, align, size) };
    if r == 0 {
        // SAFETY: on success the real function stored a valid block in `*out`.
        stats::on_alloc(size, usable(unsafe { *out }));
    }
    r
}

/// Forwards an `(align, size)` allocation to the real function in `slot` and counts it.
fn aligned(slot: &AtomicUsize, align: usize, size: usize) -> *mut c_void {
    ensure_init();
    let p = slot.load(Acquire);
    if p == 0 {
        return null_mut();
    }
    // SAFETY: the slot holds the address dlsym returned for aligned_alloc or memalign, both
    // `void *(size_t, size_t)`.
    let f = unsafe { core::mem::transmute::<usize, AlignedFn>(p) };
    // SAFETY: forwarding the caller's arguments to the real function.
    let q = unsafe { f(align, size) };
    if !q.is_null() {
        stats::on_alloc(size, usable(q));
    }
    q
}

/// `aligned_alloc(3)`.
///
/// # Safety
/// As `aligned_alloc(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    aligned(&REAL_ALIGNED_ALLOC, align, size)
}

/// `memalign(3)`.
///
/// # Safety
/// As `memalign(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    aligned(&REAL_MEMALIGN, align, size)
}
