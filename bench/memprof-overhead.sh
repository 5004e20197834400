#!/usr/bin/env bash
# Slowdown of the mem-profiler's LD_PRELOAD malloc interposer on an allocation-heavy program:
# the same binary without and with the interposer, alternately, medians and their ratio.
#   bench/memprof-overhead.sh [ROUNDS] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash crates/hermes-memprof/bench/overhead.sh "$@"
