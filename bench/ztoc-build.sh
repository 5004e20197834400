#!/usr/bin/env bash
# zTOC build throughput against `gzip -dc > /dev/null` on the same gzip layer, same run.
#
#   bench/ztoc-build.sh [--size-mb N] [--span-size BYTES] [--runs N] [--release=true|false]
#
# Prints a table and writes bench/results/ztoc-build.{md,json}. The ratio is
# gzip_seconds / hermes_seconds: >= 1 means indexing is faster than merely decompressing.
# Target (issue 3): >= 0.9.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=1024 SPAN=4194304 RUNS=3 RELEASE=true
for arg in "$@"; do
  case "$arg" in
    --size-mb) shift_next=size ;;
    --span-size) shift_next=span ;;
    --runs) shift_next=runs ;;
    --release=*) RELEASE="${arg#*=}"; continue ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *)
      case "${shift_next:-}" in
        size) SIZE_MB="$arg" ;; span) SPAN="$arg" ;; runs) RUNS="$arg" ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
      esac
      shift_next=; continue ;;
  esac
done

for tool in gzip python3; do command -v "$tool" >/dev/null || { echo "$tool is required (scripts/install-deps.sh)" >&2; exit 1; }; done

if [ "$RELEASE" = true ]; then
  cargo build --release -p hermes >&2
  HERMES=target/release/hermes PROFILE=release
else
  cargo build --workspace --bins >&2  # same feature set as the test build: no rebuild
  HERMES=target/debug/hermes PROFILE=debug
fi

WORK="${BENCH_WORK:-$(mktemp -d /var/tmp/hermes-bench.XXXXXX)}"
trap 'rm -rf "$WORK"' EXIT
LAYER="$WORK/layer.tar.gz"
echo "generating a ${SIZE_MB} MiB tar layer and compressing it with gzip -6 ..." >&2
python3 bench/gen_layer.py "$SIZE_MB" | gzip -6 -n > "$LAYER"
BYTES=$(stat -c %s "$LAYER")

# Best of N wall times, the two commands interleaved so background load hits both alike
# (the layer is in the page cache for both after the first read).
seconds() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>&1; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 )); }
cat "$LAYER" > /dev/null
GZIP_US="" HERMES_US=""
for _ in $(seq "$RUNS"); do
  g=$(seconds sh -c "gzip -dc '$LAYER' > /dev/null")
  h=$(seconds "$HERMES" ztoc build "$LAYER" -o "$WORK/layer.ztoc" --span-size "$SPAN")
  { [ -z "$GZIP_US" ] || [ "$g" -lt "$GZIP_US" ]; } && GZIP_US=$g
  { [ -z "$HERMES_US" ] || [ "$h" -lt "$HERMES_US" ]; } && HERMES_US=$h
done
GZIP_S=$(python3 -c "print($GZIP_US / 1e6)")
HERMES_S=$(python3 -c "print($HERMES_US / 1e6)")
"$HERMES" ztoc info "$WORK/layer.ztoc" --json > "$WORK/info.json"

mkdir -p bench/results
python3 - "$BYTES" "$GZIP_S" "$HERMES_S" "$SIZE_MB" "$SPAN" "$PROFILE" "$WORK/info.json" <<'PY'
import json, os, platform, sys
size, gz, hm = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
size_mb, span, profile, info = sys.argv[4], int(sys.argv[5]), sys.argv[6], json.load(open(sys.argv[7]))
mib = size / 2**20
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
res = {
    "layer_uncompressed_mib": int(size_mb), "layer_gzip_bytes": size, "span_size": span, "profile": profile,
    "gzip_dc_seconds": round(gz, 3), "hermes_build_seconds": round(hm, 3),
    "gzip_dc_mib_per_s": round(mib / gz, 1), "hermes_build_mib_per_s": round(mib / hm, 1),
    "ratio_gzip_over_hermes": round(gz / hm, 2), "spans": info["spanCount"], "entries": info["entryCount"],
    "machine": f"{cpu}, {os.cpu_count()} cores",
}
table = f"""| zTOC build on a {size_mb} MiB tar layer ({mib:.0f} MiB gzip -6), span {span} B | seconds | compressed MiB/s |
|---|---:|---:|
| `gzip -dc > /dev/null` (baseline) | {gz:.2f} | {mib/gz:.0f} |
| `hermes ztoc build` ({profile}) | {hm:.2f} | {mib/hm:.0f} |
| **ratio (gzip time / hermes time; target ≥ 0.9)** | **{gz/hm:.2f}×** | |

{info['spanCount']} spans, {info['entryCount']} entries. Machine: {res['machine']}.
"""
print(table)
if profile == "release":
    open("bench/results/ztoc-build.md", "w").write(table)
    open("bench/results/ztoc-build.json", "w").write(json.dumps(res, indent=2) + "\n")
PY
