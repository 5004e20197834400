#!/usr/bin/env bash
# Whole-tree read of a fully local lazy layer against the same tree on plain disk (issue 16).
#
#   bench/fully-local.sh [--size-mb N | --tree "DIR..."] [--runs N] [--small] [--no-results]
#
# Generates a layer (bench/gen_layer.py, N MiB of tar, default 1024; or with --tree, a tar of
# real files: the given absolute directories, e.g. --tree "/usr/share /usr/include"), gzips it, unpacks it onto
# the local disk, and mounts it twice, each from its own fully local span cache: as the node
# mounts layers (the default options: every read served by the daemon from the span cache)
# and with FUSE passthrough to per-file copies (MountOptions::passthrough). Each repeat reads
# the three trees with `tar -cf - . | cat` (GNU tar skips reading files when writing to
# /dev/null), dropping the page, dentry and inode caches before every read; the three are
# interleaved so background load hits them alike. Prints `ratio lazy/disk: X` (the default
# mount, medians) and writes
# bench/results/fully-local.md (fully-local-tree.md with --tree) unless --small or --no-results. Needs root and /dev/fuse.
# --small (24 MiB, 1 run, about 15 s) is a smoke test of the whole path, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"

SIZE_MB=1024 RUNS=5 RESULTS=true TREE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mb) SIZE_MB="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --tree) TREE="$2"; shift 2 ;;
    --small) SIZE_MB=24 RUNS=1 RESULTS=false; shift ;;
    --no-results) RESULTS=false; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

for tool in python3 gzip tar; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, drop_caches)" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "/dev/fuse is missing (modprobe fuse)" >&2; exit 1; }

cargo build -q --release --locked -p hermes-lazyfs --example fully_local >&2
BIN="${CARGO_TARGET_DIR:-target}/release/examples/fully_local"

WORK="${BENCH_WORK:-$(mktemp -d /var/tmp/hermes-fully-local.XXXXXX)}"
PID=""
cleanup() {
  exec 3>&- 2>/dev/null || true
  [ -n "$PID" ] && wait "$PID" 2>/dev/null || true
  for m in "$WORK/passthrough" "$WORK/daemon"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m"
  done
  if [ -n "${BENCH_WORK:-}" ]; then rm -rf "$WORK/cache"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# BENCH_WORK=DIR keeps the layer and the unpacked tree there for the next run.
if [ -s "$WORK/layer.tar.gz" ] && [ -d "$WORK/disk" ]; then
  echo "reusing the layer in $WORK" >&2
  SOURCE="$(cat "$WORK/source")"
elif [ -n "$TREE" ]; then
  echo "packing $TREE into a layer ..." >&2
  # shellcheck disable=SC2086 # a list of directories
  tar -C / -cf - $(for d in $TREE; do echo "${d#/}"; done) 2>/dev/null | gzip -1 -n > "$WORK/layer.tar.gz"
  SOURCE="a tar of $TREE"
else
  echo "generating a ${SIZE_MB} MiB layer ..." >&2
  python3 bench/gen_layer.py "$SIZE_MB" | gzip -1 -n > "$WORK/layer.tar.gz"
  SOURCE="\`bench/gen_layer.py $SIZE_MB\`"
fi
if [ ! -d "$WORK/disk" ]; then
  mkdir "$WORK/disk.tmp"
  gzip -dc "$WORK/layer.tar.gz" | tar -xf - -C "$WORK/disk.tmp"
  mv "$WORK/disk.tmp" "$WORK/disk"
  echo "$SOURCE" > "$WORK/source"
fi
mkdir -p "$WORK/passthrough" "$WORK/daemon"
rm -rf "$WORK/cache" "$WORK/ctl"
FILES=$(find "$WORK/disk" -type f | wc -l)
TAR_BYTES=$(gzip -dc "$WORK/layer.tar.gz" | wc -c)

mkfifo "$WORK/ctl"
: > "$WORK/out.log"
"$BIN" "$WORK/layer.tar.gz" "$WORK/cache" "$WORK/passthrough" "$WORK/daemon" \
  < "$WORK/ctl" > "$WORK/out.log" 2> "$WORK/err.log" &
PID=$!
exec 3> "$WORK/ctl"
until grep -q '^ready' "$WORK/out.log"; do
  kill -0 "$PID" 2>/dev/null || { cat "$WORK/err.log" >&2; echo "the layer server exited" >&2; exit 1; }
  sleep 0.2
done
READY=$(grep '^ready' "$WORK/out.log")
echo "$READY" >&2

# Microseconds to read the tree at $1 whole, from cold caches.
read_tree() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  local t0 t1
  t0=$(date +%s%N)
  (cd "$1" && tar -cf - . | cat > /dev/null)
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000 ))
}

DISK=() PT=() DAEMON=()
for i in $(seq "$RUNS"); do
  # Rotate the order so no tree always follows the same one.
  case $(( i % 3 )) in
    1) order="disk passthrough daemon" ;;
    2) order="passthrough daemon disk" ;;
    0) order="daemon disk passthrough" ;;
  esac
  for what in $order; do
    us=$(read_tree "$WORK/$what")
    case "$what" in
      disk) DISK+=("$us") ;; passthrough) PT+=("$us") ;; daemon) DAEMON+=("$us") ;;
    esac
    echo "run $i $what $(python3 -c "print(f'{$us / 1e6:.2f} s')")" >&2
  done
done
exec 3>&-
wait "$PID"
PID=""
STATS=$(grep '^passthrough ' "$WORK/out.log" || true)

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
D=$(median "${DISK[@]}") P=$(median "${PT[@]}") Q=$(median "${DAEMON[@]}")
RATIO=$(python3 -c "print(f'{$Q / $D:.2f}')")
RATIO_PT=$(python3 -c "print(f'{$P / $D:.2f}')")
secs() { python3 -c "print(f'{$1 / 1e6:.2f}')"; }

echo "layer: $(( TAR_BYTES >> 20 )) MiB tar, $FILES files; $RUNS runs, medians"
echo "disk:        $(secs "$D") s"
echo "lazy:        $(secs "$Q") s (default mount: reads served by the daemon)"
echo "passthrough: $(secs "$P") s (ratio $RATIO_PT)"
echo "ratio lazy/disk: $RATIO"

if [ "$RESULTS" = true ]; then
  list() { local out=""; for us in "$@"; do out+="$(secs "$us") "; done; echo "${out% }"; }
  OUT=bench/results/fully-local.md
  [ -n "$TREE" ] && OUT=bench/results/fully-local-tree.md
  cat > "$OUT" <<EOF
# Fully local layer: whole-tree read against plain disk

\`bench/fully-local.sh $ARGS\` on $(date -u +%Y-%m-%d), $(uname -r),
$(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2 / 1048576}' /proc/meminfo) RAM, cache and
trees on $(findmnt -no FSTYPE -T /var/tmp) ($(findmnt -no SOURCE -T /var/tmp)). Layer: $SOURCE,
$(( TAR_BYTES >> 20 )) MiB of tar, $FILES files. Each read is \`tar -cf - . | cat\` after
\`echo 3 > /proc/sys/vm/drop_caches\`; the three trees interleaved, medians of $RUNS.

| tree | median | runs (s) | ratio to disk |
|---|---|---|---|
| plain disk | $(secs "$D") s | $(list "${DISK[@]}") | 1.00 |
| lazy layer (default: reads served by the daemon) | $(secs "$Q") s | $(list "${DAEMON[@]}") | **$RATIO** |
| lazy layer with passthrough | $(secs "$P") s | $(list "${PT[@]}") | $RATIO_PT |

ratio lazy/disk: **$RATIO** (target ≤ 1.25).

Passthrough mount: \`$READY\`
(copy_seconds: copying every regular file out of the span cache once the layer is fully local).
At the end: \`$STATS\`.
EOF
  echo "wrote $OUT" >&2
fi
