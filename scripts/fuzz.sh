#!/usr/bin/env bash
# Coverage-guided fuzzing of Hermes' untrusted-input parsers with AFL++ on stable Rust.
#
#   scripts/fuzz.sh [--time SECS | --execs N] [--targets ztoc,tar,...] [--out DIR] [--mem MB]
#                   [--fresh] [--no-build] [--skip-known]
#
# Installs Debian's afl++ if missing, builds fuzz/ (the hermes-fuzz harnesses in AFL++'s
# persistent loop) with SanitizerCoverage and AFL++'s runtime, then runs each target in turn under
# `nice -n 19`, seeded from fuzz/corpus/TARGET/, for SECS seconds (default 60) or about N
# executions. Runs resume from --out (default /tmp/hermes-fuzz) unless --fresh, so executions add
# up over sessions. Prints executions, crashes and hangs per target; exits 1 if any target has a
# crash or hang (the inputs are under OUT/TARGET/default/{crashes,hangs}/; replay one with
# `BIN TARGET < FILE`). --skip-known sets HERMES_FUZZ_SKIP_KNOWN, so the ztoc target stops
# decoding spans that claim more than 64 MiB (an allocation bug being fixed separately).
#
# The instrumented build has its own target dir (FUZZ_TARGET_DIR, default fuzz/target): sharing
# the workspace's would rebuild everything whenever RUSTFLAGS change.
set -euo pipefail
cd "$(dirname "$0")/.."

TIME=60 EXECS="" TARGETS="ztoc,tar,oci,node_config,directive,admission"
OUT=/tmp/hermes-fuzz MEM=2048 FRESH=0 BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --time) TIME=$2; shift 2 ;;
    --execs) EXECS=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --skip-known) export HERMES_FUZZ_SKIP_KNOWN=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

RT=/usr/lib/afl/afl-compiler-rt.o
if ! command -v afl-fuzz >/dev/null || [ ! -f "$RT" ]; then
  echo "== installing afl++ (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq afl++ >/dev/null
fi
for p in "$HOME/.cargo/bin" /usr/local/cargo/bin; do [ -d "$p" ] && PATH="$p:$PATH"; done

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
BIN="$CARGO_TARGET_DIR/$TRIPLE/release/hermes-fuzz-afl"
if [ "$BUILD" = 1 ]; then
  echo "== building the instrumented harness (first build: several minutes)" >&2
  # cargo-afl's flags, with Debian's AFL++ runtime linked in. An explicit --target keeps them
  # off build scripts and proc macros. Edge coverage with comparison tracing.
  RUSTFLAGS="-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3 \
-C llvm-args=-sanitizer-coverage-trace-pc-guard -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
-C llvm-args=-sanitizer-coverage-trace-compares -C link-arg=$RT" \
    nice -n 19 cargo build --release --manifest-path fuzz/Cargo.toml --target "$TRIPLE"
fi
[ -x "$BIN" ] || { echo "fuzz.sh: $BIN not built" >&2; exit 1; }

# No UI, no CPU binding (other work shares the cores), no core_pattern or frequency demands.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_AUTORESUME=1

# A field of a fuzzer_stats file; empty when the file does not exist yet.
field() { if [ -f "$1" ]; then sed -n "s/^$2 *: *//p" "$1" | head -1; fi; }
mkdir -p "$OUT"
status=0
printf '%-12s %14s %9s %10s %8s %6s\n' target executions seconds execs/s crashes hangs
for t in ${TARGETS//,/ }; do
  [ -d "fuzz/corpus/$t" ] || { echo "fuzz.sh: no corpus fuzz/corpus/$t" >&2; exit 2; }
  [ "$FRESH" = 1 ] && rm -rf "${OUT:?}/$t"
  limit=(-V "$TIME")
  if [ -n "$EXECS" ]; then
    done_before=$(field "$OUT/$t/default/fuzzer_stats" execs_done)
    limit=(-E "$((EXECS + ${done_before:-0}))")
  fi
  nice -n 19 afl-fuzz -i "fuzz/corpus/$t" -o "$OUT/$t" -m "$MEM" -t 3000 "${limit[@]}" \
    -- "$BIN" "$t" >"$OUT/$t.log" 2>&1 || {
    echo "fuzz.sh: afl-fuzz failed for $t; the end of $OUT/$t.log:" >&2
    tail -20 "$OUT/$t.log" >&2
    exit 1
  }
  s="$OUT/$t/default/fuzzer_stats"
  execs=$(field "$s" execs_done) secs=$(field "$s" run_time)
  crashes=$(find "$OUT/$t/default/crashes" -name 'id:*' 2>/dev/null | wc -l)
  hangs=$(find "$OUT/$t/default/hangs" -name 'id:*' 2>/dev/null | wc -l)
  printf '%-12s %14s %9s %10s %8s %6s\n' "$t" "$execs" "$secs" \
    "$((execs / (secs > 0 ? secs : 1)))" "$crashes" "$hangs"
  [ "$crashes" -eq 0 ] && [ "$hangs" -eq 0 ] || status=1
done
exit "$status"
