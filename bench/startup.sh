#!/usr/bin/env bash
# Container start time: containerd's normal pull vs Hermes lazy vs Hermes record-and-replay vs Hermes
# without an index, from a local registry behind a bandwidth cap, caches dropped and state wiped
# between modes (run as root).
#
#   bench/startup.sh [--quick] [--image quick|ml|torch|LAYOUT_DIR] [--rate-mbps 32] [--release=true|false]
#                    [--modes normal,lazy,replay,fallback,eager,unpack] [--per-connection-mbps N]
#                    [--workload entrypoint|light|read-all]
#                    [--write-results NAME] [--containerd 1.6|2] [--first-start]
#   bench/startup.sh --kubernetes [--quick] [--image quick|ml|torch|LAYOUT_DIR] [--rate-mbps 32] [--keep]
#
# --quick: the <= 1 GB generated image, and fail unless lazy start beats the normal path (CI smoke);
# it prints the containerd version and the lazy-vs-normal ratio: `OK (containerd V): ... (N.Nx)`.
# --first-start: modes normal,lazy,replay plus a warm local run; prints the first lazy start (no
# recorded profile) against its physical limit: compressed bytes the container read (from the
# recorded trace) / bandwidth + its CPU time in the warm run (bench/startup.py explains how).
# --modes ...,eager: the policy mode Eager (the whole image fetched with parallel range requests and
# decoded in parallel before the start) next to the others; with --per-connection-mbps 8 the proxy
# caps each connection too; `unpack` times `gzip -dc | tar -x` of the same layers (no network).
# --containerd 2: containerd 2.x (scripts/containerd2.sh fetch caches it) instead of the system's 1.6.
# --kubernetes: pod start as the kubelet reports it (bench/kube_startup.py): a single-node cluster
# from scripts/kube.sh with Hermes installed from deploy/, a first pod pulled normally, then, once
# the controller has indexed the image, a second pod started lazily; prints the ratio as (N.Nx).
# --image torch: Debian + Python + torch with its CUDA wheels (bench/torch_image.py builds it once:
# debootstrap needed, ~3 GB download, ~12 GB disk under /var/cache/hermes-bench).
# Results: bench/results/startup-NAME.{md,json,png} with --write-results NAME (installs matplotlib
# with pip for the chart if python3 lacks it).
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=true ARGS=() SCRIPT=bench/startup.py
for arg in "$@"; do
  case "$arg" in
    --release=*) RELEASE="${arg#*=}" ;;
    --quick) ARGS+=(--image quick --check) ;;
    --kubernetes) SCRIPT=bench/kube_startup.py ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
for tool in docker-registry skopeo containerd ctr runc pigz python3 busybox; do
  command -v "$tool" >/dev/null || { echo "$tool is required: run scripts/install-deps.sh" >&2; exit 1; }
done
case " ${ARGS[*]-} " in
  *" --write-results"*)  # the PNG chart; python3 may be a pyenv or venv Python without apt's packages
    python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore matplotlib ;;
esac
TARGET="${CARGO_TARGET_DIR:-target}"
if [ "$RELEASE" = true ]; then
  cargo build --release -p hermes >&2
  HERMES="$TARGET/release/hermes"
else
  cargo build --workspace --bins >&2  # same feature set as the test build: no rebuild
  HERMES="$TARGET/debug/hermes"
fi
exec python3 "$SCRIPT" --hermes "$HERMES" "${ARGS[@]}"
