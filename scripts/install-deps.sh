#!/usr/bin/env bash
# Install everything Hermes needs to build and test on a fresh Debian machine (run as root).
# Idempotent: packages already present are not touched, and apt is only updated when needed.
set -euo pipefail

# Tools the tests and benchmarks run for real.
APT_PACKAGES=(
  ca-certificates
  tar gzip zstd pigz   # real layer encoders for the zTOC tests and benchmark
  python3              # benchmark layer generator
  dpkg                 # package trees for the real-layer tests
  gcc libc6-dev        # C toolchain for crates that build C (zstd-sys)
  docker-registry      # the real registry the registry-client tests push to and read from
  skopeo               # pushes test images and inspects what Hermes pushed
  apache2-utils        # htpasswd, for the password-protected registry variant
  containerd runc      # the snapshotter's tests run a real containerd with Hermes as a proxy plugin
  busybox-static       # the static binary inside the testkit's tiny runnable images (sandbox, test images)
  openssl curl         # TLS certificate and real HTTPS client for the admission webhook test
  # kube-apiserver v1.20 built from Debian's source package for the Kubernetes adapter's tests
  # (scripts/kube-apiserver.sh): Go toolchain, build tools, the patched vendor packages, etcd
  golang-1.19-go rsync make dpkg-dev jq etcd-server
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: ${missing[*]}; run this script as root (or sudo) to install them"
    exit 1
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

# Rust: the machine's toolchain (rustup) with rustfmt and clippy.
if ! command -v cargo >/dev/null 2>&1; then
  for p in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$p/cargo" ] && export PATH="$p:$PATH"
  done
fi
command -v cargo >/dev/null 2>&1 || { log "cargo not found: install Rust (rustup) first"; exit 1; }
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "adding Rust component $comp"
    rustup component add "$comp"
  fi
done
log "rust: $(rustc --version)"

# containerd 2.1.9 beside the system's 1.6 (unpacked from Debian's newer suite into a cache, never
# installed): the containerd-based tests and the quick benchmark run on both.
bash "$(dirname "$0")/containerd2.sh" fetch >/dev/null
log "containerd 2.x: $("$(bash "$(dirname "$0")/containerd2.sh" bin)/containerd" --version)"
