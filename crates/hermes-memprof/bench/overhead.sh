#!/bin/bash
# Overhead of the LD_PRELOAD interposer on an allocation-heavy C program: the same binary run
# alternately without and with libhermes_memprof.so, ROUNDS times each; prints the medians and
# their ratio (same run, same machine). Usage: overhead.sh [ROUNDS] [PAIRS]
set -euo pipefail
ROUNDS=${1:-7}
PAIRS=${2:-20000000}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v cc >/dev/null || { echo "cc is required: apt-get install gcc" >&2; exit 1; }
cargo build --quiet --release -p hermes-memprof --manifest-path "$here/Cargo.toml" --target-dir "$work/target"
so="$work/target/release/libhermes_memprof.so"
cat > "$work/heavy.c" <<'C'
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    void *ring[64] = {0};
    for (long i = 0; i < n; i++) {           /* malloc/free pairs, 64 live, sizes 16..4111 */
        int k = i & 63;
        free(ring[k]);
        ring[k] = malloc(16 + (i * 7919) % 4096);
        ((char *)ring[k])[0] = (char)i;
    }
    for (int k = 0; k < 64; k++) free(ring[k]);
    return 0;
}
C
cc -O2 -fno-builtin -o "$work/heavy" "$work/heavy.c"
t() { local s e; s=$(date +%s%N); "$@"; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
base=(); pre=()
for _ in $(seq "$ROUNDS"); do
    base+=("$(t "$work/heavy" "$PAIRS")")
    pre+=("$(t env LD_PRELOAD="$so" HERMES_MEMPROF_OUT="$work/stats.json" "$work/heavy" "$PAIRS")")
done
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
mb=$(median "${base[@]}"); mp=$(median "${pre[@]}")
echo "pairs=$PAIRS rounds=$ROUNDS baseline_median_us=$mb interposed_median_us=$mp ratio=$(awk "BEGIN{printf \"%.2f\", $mp/$mb}")"
echo "interposer counted: $(cat "$work/stats.json")" | cut -c1-160
