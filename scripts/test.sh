#!/usr/bin/env bash
# The README's test command: install what is missing, build once, run every check and test.
# Fails loudly on the first problem. Used by CI (.ci/run) as is.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step names the time and the disk left (a CI run once died of a full disk mid-link).
step() { printf '\n== %s (%(%H:%M:%S)T, %s free)\n' "$*" -1 "$(df -h --output=avail . | tail -n 1 | tr -d ' ')" >&2; }

step "dependencies"
bash scripts/install-deps.sh
for p in "$HOME/.cargo/bin" /usr/local/cargo/bin; do [ -d "$p" ] && PATH="$p:$PATH"; done
export PATH

export CARGO_TERM_COLOR=never RUST_BACKTRACE=1
# A one-shot build gains nothing from incremental caches, which would double the target's size.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Property tests: a fixed, bounded number of cases in CI; more locally with PROPTEST_CASES=…
export PROPTEST_CASES="${PROPTEST_CASES:-}"
[ -z "$PROPTEST_CASES" ] && unset PROPTEST_CASES

step "Kubernetes v1.20 (API server, kubectl, kubelet, scheduler, controller-manager) for the Kubernetes tests (built once, cached)"
bash scripts/kube-apiserver.sh build

step "format"
cargo fmt --all --check

step "build (tests included)"
cargo build --workspace --all-targets --locked

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
TEST_LOG=$(mktemp)
trap 'rm -f "$TEST_LOG"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$TEST_LOG"
status=${PIPESTATUS[0]}
set -e
read -r PASSED FAILED < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } } END { print p + 0, f + 0 }' "$TEST_LOG")
if [ "$status" -ne 0 ]; then
  echo "tests: $PASSED passed, $FAILED failed"
  exit "$status"
fi

step "fuzz smoke run: every committed corpus input and fixed crash through the fuzz harnesses"
# (The workspace tests ran it too; this names it. Fuzzing itself: scripts/fuzz.sh, see bench/results/fuzz.md.)
cargo test -p hermes-fuzz --locked -q

step "benchmark smoke runs (small inputs: check the scripts work; ratios are not judged here)"
bash bench/ztoc-build.sh --size-mb 64 --release=false
bash bench/index-build.sh --release=false --layers 2 --layer-mb 16 --runs 1
# Container start through containerd, normal pull vs Hermes lazy vs no index, <= 1 GB generated image
# behind a 32 MB/s registry: fails unless the lazy start is faster than the normal path.
bash bench/startup.sh --quick --release=false
# The same on containerd 2.x (2.1.9, fetched by install-deps.sh): version 3 config, its transfer
# service pulling for `ctr`.
bash bench/startup.sh --quick --release=false --containerd 2
# Pod start through a real kubelet (scripts/kube.sh's single-node cluster, Hermes from deploy/):
# a first pod pulled normally, then, once the controller indexed it, a second one lazily.
bash bench/startup.sh --kubernetes --quick --release=false
# Chaos soak, short: 10 lazy starts through CRI under seeded random registry faults, node and
# controller SIGKILLed mid-way; fails on any failed start or any byte unlike the normal path's.
bash bench/chaos.sh --quick --release=false
# Whole-tree read of a fully local lazy layer vs plain disk, 24 MiB (release build of one example).
bash bench/fully-local.sh --small

# The closing line CI reads: every Rust test of the workspace, summed over all test binaries.
echo "tests: $PASSED passed, $FAILED failed"
