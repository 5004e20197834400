#!/usr/bin/env bash
# `hermes index build` of a multi-layer >= 1 GB image from a local registry vs `skopeo copy` of
# the same image to a local dir, same run; plus the build's peak RSS.
#
#   bench/index-build.sh [--layers N] [--layer-mb MiB] [--runs N] [--release=true|false]
#
# Writes bench/results/index-build.{md,json} for release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=true ARGS=()
for arg in "$@"; do
  case "$arg" in
    --release=*) RELEASE="${arg#*=}" ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
for tool in docker-registry skopeo python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required: run scripts/install-deps.sh" >&2; exit 1; }
done
if [ "$RELEASE" = true ]; then
  cargo build --release -p hermes >&2
  exec python3 bench/index_build.py --hermes target/release/hermes --write-results "${ARGS[@]}"
else
  cargo build --workspace --bins >&2  # same feature set as the test build: no rebuild
  exec python3 bench/index_build.py --hermes target/debug/hermes "${ARGS[@]}"
fi
