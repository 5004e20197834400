#!/usr/bin/env bash
# Open-time prefetch on an import-like chain: a generated layer of many small files read over a
# real FUSE mount as dependent whole-file reads, behind a simulated registry link (32 MB/s
# shared, 20 ms per request). Prints prefetch off / opened file only / file + neighbours, with
# ratios to off, in one run. Needs root and /dev/fuse.
#
#   bench/import-chain.sh [--release=false] [-- example args: --packages N --files N
#                          --read-fraction F --rate-mbps R --latency-ms MS --span-size BYTES]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
if [[ "${1:-}" == "--release=false" ]]; then
    profile=()
    shift
fi
[[ "${1:-}" == "--" ]] && shift
cargo run -q --locked "${profile[@]}" -p hermes-lazyfs --example import_chain -- "$@"
