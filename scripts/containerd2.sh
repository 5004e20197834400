#!/usr/bin/env bash
# containerd 2.x next to the system's containerd 1.6, for the tests and benchmarks that run on both.
#
#   containerd2.sh fetch    download Debian's containerd 2.1.9 package once, unpack it into the cache
#                           and print the directory holding containerd, containerd-shim-runc-v2 and ctr
#   containerd2.sh bin      print that directory if it is there (exit 1 otherwise)
#
# The machine's apt configuration is not touched: a private apt directory lists the same mirror with
# Debian's newer suite (forky) and downloads only the one .deb, which is unpacked, never installed.
# runc stays the system's (bookworm's): forky's runc needs a newer glibc. Put the printed directory
# first on the PATH of the containerd 2.x process so that it starts its own shim.
#
# Cache: $HERMES_CONTAINERD2_CACHE, default /var/cache/hermes/containerd-2.1.9 (or ~/.cache/...).
set -euo pipefail

CONTAINERD2_VERSION=2.1.9
CONTAINERD2_DEB_VERSION=2.1.9+ds1-5
CONTAINERD2_SUITE=forky

log() { printf '[containerd2] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cache_dir() {
  if [ -n "${HERMES_CONTAINERD2_CACHE:-}" ]; then
    echo "$HERMES_CONTAINERD2_CACHE"
  elif mkdir -p /var/cache/hermes 2>/dev/null && [ -w /var/cache/hermes ]; then
    echo "/var/cache/hermes/containerd-$CONTAINERD2_VERSION"
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/hermes/containerd-$CONTAINERD2_VERSION"
  fi
}

have_bin() {
  local bin=$1/usr/bin
  [ -x "$bin/containerd" ] && [ -x "$bin/containerd-shim-runc-v2" ] && [ -x "$bin/ctr" ]
}

# The machine's Debian mirror and keyring, from its deb822 sources (the first entry naming a
# Debian archive, not the security one).
mirror_entry() {
  local f uri="" key=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' "$f")
    key=$(awk '/^Signed-By:/ { print $2; exit }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -s /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
  [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
  printf '%s %s\n' "$uri" "$key"
}

cmd_fetch() {
  local cache
  cache=$(cache_dir)
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  if have_bin "$cache/root"; then
    echo "$cache/root/usr/bin"
    return 0
  fi
  command -v dpkg-deb >/dev/null || die "dpkg-deb missing (apt-get install dpkg)"
  local work=$cache/work uri key
  rm -rf "$work" "$cache/root"
  mkdir -p "$work/apt/sources.list.d" "$work/apt/lists/partial"
  read -r uri key < <(mirror_entry)
  cat >"$work/apt/sources.list.d/$CONTAINERD2_SUITE.sources" <<EOF
Types: deb
URIs: $uri
Suites: $CONTAINERD2_SUITE
Components: main
Signed-By: $key
EOF
  local opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work/apt/sources.list.d"
    -o "Dir::State::Lists=$work/apt/lists" -o "APT::Sandbox::User=root")
  log "downloading containerd $CONTAINERD2_DEB_VERSION from $uri ($CONTAINERD2_SUITE), once"
  apt-get "${opts[@]}" update -qq >/dev/null || die "apt-get update of the private $CONTAINERD2_SUITE list failed"
  (cd "$work" && apt-get "${opts[@]}" download -qq "containerd=$CONTAINERD2_DEB_VERSION" >/dev/null) ||
    die "apt-get download containerd=$CONTAINERD2_DEB_VERSION failed (is it still in $CONTAINERD2_SUITE?)"
  local deb
  deb=$(ls "$work"/containerd_*.deb 2>/dev/null | head -n1)
  [ -n "$deb" ] || die "no containerd .deb downloaded"
  dpkg-deb -x "$deb" "$work/root"
  have_bin "$work/root" || die "$deb has no usr/bin/{containerd,containerd-shim-runc-v2,ctr}"
  "$work/root/usr/bin/containerd" --version | grep -q " v\?$CONTAINERD2_VERSION" ||
    die "unpacked containerd is not $CONTAINERD2_VERSION: $("$work/root/usr/bin/containerd" --version)"
  mv "$work/root" "$cache/root"
  rm -rf "$work"
  log "containerd $CONTAINERD2_VERSION in $cache/root/usr/bin"
  echo "$cache/root/usr/bin"
}

cmd_bin() {
  local cache
  cache=$(cache_dir)
  have_bin "$cache/root" || { log "containerd $CONTAINERD2_VERSION not fetched: run scripts/containerd2.sh fetch"; exit 1; }
  echo "$cache/root/usr/bin"
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  bin) cmd_bin ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
