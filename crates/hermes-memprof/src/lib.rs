//! `libhermes_memprof.so`: an `LD_PRELOAD` interposer of `malloc`, `free`, `calloc`, `realloc`,
//! `posix_memalign`, `aligned_alloc` and `memalign` that counts allocations, frees, requested
//! bytes, live bytes (by `malloc_usable_size`, so frees need no header) and a power-of-two size
//! histogram, and writes them as JSON for the `mem-profiler` module.
//!
//! Environment (read once at load):
//! - `HERMES_MEMPROF_OUT`: output file; `%p` is replaced by the pid (default: no output);
//! - `HERMES_MEMPROF_INTERVAL_MS`: rewrite the file at most this often while allocating
//!   (default 1000; 0 writes only at exit);
//! - `HERMES_MEMPROF_SAMPLE_EVERY`: record 1 in N allocations in the histogram (default 1).
//!
//! The file is written to `PATH.tmp` and renamed, so readers see whole files. The hooks never
//! allocate: counters are atomics, output is formatted into stack buffers and written with raw
//! `open`/`write`/`rename`. While the real functions are being looked up with
//! `dlsym(RTLD_NEXT)` (which may itself call `calloc`), allocations come from a small static
//! bootstrap arena that is never freed.
//!
//! It does not record call stacks or per-site statistics, and does not interpose `valloc` or
//! `pvalloc` (obsolete; such blocks are counted only when freed).

mod hooks;
mod stats;
