#!/usr/bin/env bash
# zTOC build time and peak memory against `gzip -dc > /dev/null` on the same gzip layer, same run.
#
#   bench/ztoc-build.sh [--size-mb N | --layer FILE.tar.gz] [--span-size BYTES] [--runs N] [--release=true|false]
#
# --layer takes a real layer (e.g. `tar -cf - usr/bin usr/share | gzip -6 -n > real.tar.gz`);
# without it a tar of --size-mb MiB is generated. Prints a table and writes
# bench/results/ztoc-build.{md,json}: the time ratio hermes/gzip (< 1 means indexing is faster
# than merely decompressing; target, issue 16: <= 0.6) next to the build's peak RSS measured
# by /usr/bin/time -v (target, issue 16: <= 64 MiB on a >= 500 MB real layer).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=1024 SPAN=4194304 RUNS=3 RELEASE=true INPUT=""
for arg in "$@"; do
  case "$arg" in
    --size-mb) shift_next=size ;;
    --layer) shift_next=layer ;;
    --span-size) shift_next=span ;;
    --runs) shift_next=runs ;;
    --release=*) RELEASE="${arg#*=}"; continue ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *)
      case "${shift_next:-}" in
        size) SIZE_MB="$arg" ;; span) SPAN="$arg" ;; runs) RUNS="$arg" ;; layer) INPUT="$arg" ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
      esac
      shift_next=; continue ;;
  esac
done

for tool in gzip python3 /usr/bin/time; do command -v "$tool" >/dev/null || { echo "$tool is required (scripts/install-deps.sh)" >&2; exit 1; }; done

TARGET="${CARGO_TARGET_DIR:-target}"
if [ "$RELEASE" = true ]; then
  cargo build --release -p hermes >&2
  HERMES="$TARGET/release/hermes" PROFILE=release
else
  cargo build --workspace --bins >&2  # same feature set as the test build: no rebuild
  HERMES="$TARGET/debug/hermes" PROFILE=debug
fi

WORK="${BENCH_WORK:-$(mktemp -d /var/tmp/hermes-bench.XXXXXX)}"
trap 'rm -rf "$WORK"' EXIT
if [ -n "$INPUT" ]; then
  LAYER="$INPUT" SOURCE="real layer $(basename "$INPUT")"
else
  LAYER="$WORK/layer.tar.gz" SOURCE="generated ${SIZE_MB} MiB tar"
  echo "generating a ${SIZE_MB} MiB tar layer and compressing it with gzip -6 ..." >&2
  python3 bench/gen_layer.py "$SIZE_MB" | gzip -6 -n > "$LAYER"
fi
BYTES=$(stat -c %s "$LAYER")

# Best of N wall times, the two commands interleaved so background load hits both alike
# (the layer is in the page cache for both after the first read).
seconds() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>&1; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 )); }
cat "$LAYER" > /dev/null
GZIP_US="" HERMES_US="" PEAK_KIB=0
for _ in $(seq "$RUNS"); do
  g=$(seconds sh -c "gzip -dc '$LAYER' > /dev/null")
  h=$(seconds /usr/bin/time -v -o "$WORK/time.txt" "$HERMES" ztoc build "$LAYER" -o "$WORK/layer.ztoc" --span-size "$SPAN")
  k=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/time.txt")
  { [ -z "$GZIP_US" ] || [ "$g" -lt "$GZIP_US" ]; } && GZIP_US=$g
  { [ -z "$HERMES_US" ] || [ "$h" -lt "$HERMES_US" ]; } && HERMES_US=$h
  [ "$k" -gt "$PEAK_KIB" ] && PEAK_KIB=$k
done
GZIP_S=$(python3 -c "print($GZIP_US / 1e6)")
HERMES_S=$(python3 -c "print($HERMES_US / 1e6)")
"$HERMES" ztoc info "$WORK/layer.ztoc" --json > "$WORK/info.json"

mkdir -p bench/results
python3 - "$BYTES" "$GZIP_S" "$HERMES_S" "$SOURCE" "$SPAN" "$PROFILE" "$WORK/info.json" "$PEAK_KIB" "$*" <<'PY'
import datetime, json, os, platform, sys
size, gz, hm = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
source, span, profile, info = sys.argv[4], int(sys.argv[5]), sys.argv[6], json.load(open(sys.argv[7]))
peak_mib, args = int(sys.argv[8]) / 1024, sys.argv[9]
mib = size / 2**20
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
res = {
    "layer": source, "layer_gzip_bytes": size, "uncompressed_bytes": info["uncompressedArchiveSize"],
    "span_size": span, "profile": profile,
    "gzip_dc_seconds": round(gz, 3), "hermes_build_seconds": round(hm, 3),
    "gzip_dc_mib_per_s": round(mib / gz, 1), "hermes_build_mib_per_s": round(mib / hm, 1),
    "ratio_hermes_over_gzip": round(hm / gz, 2), "peak_rss_mib": round(peak_mib, 1),
    "spans": info["spanCount"], "entries": info["entryCount"],
    "machine": f"{cpu}, {os.cpu_count()} cores",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": f"bash bench/ztoc-build.sh {args}".strip(),
}
table = f"""| zTOC build of a {source} ({mib:.0f} MiB gzip, {info['uncompressedArchiveSize'] / 2**20:.0f} MiB tar), span {span} B | seconds | compressed MiB/s | peak RSS |
|---|---:|---:|---:|
| `gzip -dc > /dev/null` (baseline) | {gz:.2f} | {mib/gz:.0f} | |
| `hermes ztoc build` ({profile}) | {hm:.2f} | {mib/hm:.0f} | **{peak_mib:.0f} MiB** |
| **time ratio hermes/gzip (target ≤ 0.6)** | **{hm/gz:.2f}** | | |

ratio hermes/gzip: {hm/gz:.2f}, peak RSS: {peak_mib:.1f} MiB (target ≤ 64 MiB). {info['spanCount']} spans, {info['entryCount']} entries.
Machine: {res['machine']}. Date: {res['date']}. Command: `{res['command']}` (best of the runs, interleaved).
"""
print(table)
if profile == "release":
    open("bench/results/ztoc-build.md", "w").write(table)
    open("bench/results/ztoc-build.json", "w").write(json.dumps(res, indent=2) + "\n")
PY
