#!/usr/bin/env bash
# Chaos soak: container starts through containerd's CRI with Hermes lazy layers while the node's
# registry requests fail at random (drops, resets, stalls, 5xx, 429, truncations, corrupted
# bytes), with the node daemon (twice: during a pull, during a run) and the controller killed
# with SIGKILL and restarted in the middle; every container's output is compared with
# containerd's normal path (run as root). bench/chaos.py says how.
#
#   bench/chaos.sh [--quick] [--starts 100] [--seed N] [--fault-rate 0.1] [--max-stall-ms 2000]
#                  [--release=true|false] [--write-results NAME]
#
# --quick: 10 starts (CI). Fails on any failed start or any output that differs from the normal
# path's. The seed is printed; --seed replays the same draws. Results: bench/results/NAME.{md,json}
# with --write-results NAME. The default build is the debug one the tests use (overflow checks on).
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=false ARGS=()
for arg in "$@"; do
  case "$arg" in
    --release=*) RELEASE="${arg#*=}" ;;
    --quick) ARGS+=(--starts 10) ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
for tool in docker-registry skopeo containerd ctr runc pigz python3 busybox; do
  command -v "$tool" >/dev/null || { echo "$tool is required: run scripts/install-deps.sh" >&2; exit 1; }
done
TARGET="${CARGO_TARGET_DIR:-target}"
if [ "$RELEASE" = true ]; then
  cargo build --locked --release -p hermes -p hermes-testkit -p hermes-containerd --bins --examples >&2
  BIN="$TARGET/release"
else
  cargo build --locked --workspace --bins --examples >&2  # what the test build has built already
  BIN="$TARGET/debug"
fi
exec python3 bench/chaos.py --hermes "$BIN/hermes" --fault-proxy "$BIN/fault-proxy" --cri "$BIN/examples/cri" \
  --hermes-build "$(basename "$BIN")" "${ARGS[@]}"
