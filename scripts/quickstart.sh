#!/usr/bin/env bash
# Hermes on this machine in one command (Debian, as root): installs what it needs, builds Hermes
# (release), starts a local registry, a containerd with Hermes configured, `hermes controller
# --standalone` and `hermes node`, builds a Debian + Python + PyPI sample image, runs it once
# through containerd's normal path and once through Hermes, and prints the comparison.
#
#   scripts/quickstart.sh [--rate-mbps 32]   bring it up and run the comparison (re-runnable)
#   scripts/quickstart.sh --down [--purge]   stop and remove everything it started (--purge: and
#                                            the sample image's build cache)
#
# State and logs: /var/lib/hermes-quickstart (logs/), image cache: /var/cache/hermes-quickstart.
# Its containerd is separate from any system containerd (own config, root, state and socket).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (containerd, FUSE, overlayfs)" >&2; exit 1; }
T0=$SECONDS
step() { printf '\n[%(%H:%M:%S)T] ==> %s\n' -1 "$*" >&2; }
for p in "$HOME/.cargo/bin" /usr/local/cargo/bin; do [ -d "$p" ] && PATH="$p:$PATH"; done
export PATH
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
HERMES="$TARGET/release/hermes"

if [ "${1:-}" = --down ]; then
  shift
  exec python3 bench/quickstart.py down --hermes "$HERMES" "$@"
fi

step "dependencies (scripts/install-deps.sh, debootstrap, pip)"
bash scripts/install-deps.sh
extra=()
for pkg in debootstrap python3-pip; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || extra+=("$pkg")
done
if ((${#extra[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${extra[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse

step "build hermes (release; the first build takes several minutes)"
S=$SECONDS
cargo build --release --locked -p hermes
echo "built $HERMES in $((SECONDS - S))s" >&2

step "start the stack and compare (logs: /var/lib/hermes-quickstart/logs)"
/usr/bin/python3 bench/quickstart.py up --hermes "$HERMES" "$@"
echo "quickstart took $((SECONDS - T0))s in all" >&2
