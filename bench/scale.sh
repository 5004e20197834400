#!/usr/bin/env bash
# Registry bytes and requests for N nodes starting one image lazily: origin only, through a cold
# pull-through mirror named in containerd's hosts.toml, and through a mirror warmed by the
# controller's indexing read. Prints a markdown table (docs/scale.md has a run).
#
#   bench/scale.sh [--nodes N] [--files F] [--file-mib M] [--read-files K] [--json FILE]
#
# Needs root (FUSE mounts), docker-registry, skopeo, python3. Counts bytes, not time: a debug
# build is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
for tool in docker-registry skopeo python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required: run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build -p hermes -p hermes-testkit --bins >&2
TARGET="${CARGO_TARGET_DIR:-target}"
exec python3 bench/scale.py --hermes "$TARGET/debug/hermes" --fault-proxy "$TARGET/debug/fault-proxy" "$@"
