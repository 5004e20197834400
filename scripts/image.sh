#!/usr/bin/env bash
# Container images without a Docker toolchain: one gzip layer from a root file system, written
# as an OCI image layout and optionally pushed with skopeo.
#
#   image.sh hermes [--binary PATH] [--layout DIR] [--push REF] [--insecure]
#       the Hermes image: the `hermes` binary (default: target/release/hermes, debug info
#       stripped) as /usr/local/bin/hermes, its shared libraries, CA certificates, /etc/passwd
#       with the non-root user 65532, /tmp, and busybox as /bin/sh (the memory-module installer
#       runs the loader ConfigMap's load-sidecars.sh with it); entrypoint `hermes`. Build the release binary for
#       real use (`cargo build --release -p hermes`); tests pass their debug build.
#   image.sh pause [--layout DIR] [--push REF] [--insecure]
#       a sandbox ("pause") image: busybox sleeping forever (for clusters without Internet).
#
# --push REF copies the image to a registry (`skopeo copy`); --insecure allows plain HTTP.
# Without --layout a temp dir is used and removed. Needs: tar, gzip, sha256sum, busybox, skopeo (push).
set -euo pipefail

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Copies a program and the shared libraries `ldd` lists into ROOTFS at the same paths.
copy_with_libs() {
  local rootfs=$1 program=$2 dest=$3 lib
  install -D -m 0755 "$program" "$rootfs$dest"
  for lib in $(ldd "$program" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    [ -e "$lib" ] || continue
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# write_layout ROOTFS LAYOUT TAG ENTRYPOINT_JSON USER: a one-layer OCI image layout.
write_layout() {
  local rootfs=$1 layout=$2 tag=$3 entrypoint=$4 user=$5
  mkdir -p "$layout/blobs/sha256"
  local tmp=$layout/layer.tar
  # Reproducible: sorted names, no owners from this machine, fixed times.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$tmp" .
  local diff_id
  diff_id=$(sha "$tmp")
  gzip -n -1 -f "$tmp"
  local layer_digest layer_size
  layer_digest=$(sha "$tmp.gz")
  layer_size=$(stat -c %s "$tmp.gz")
  mv "$tmp.gz" "$layout/blobs/sha256/$layer_digest"
  local config=$layout/config.json
  cat >"$config" <<EOF
{"architecture":"amd64","os":"linux","config":{"User":"$user","Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":$entrypoint},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
EOF
  local config_digest config_size
  config_digest=$(sha "$config")
  config_size=$(stat -c %s "$config")
  mv "$config" "$layout/blobs/sha256/$config_digest"
  local manifest=$layout/manifest.json
  cat >"$manifest" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config_digest","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer_digest","size":$layer_size}]}
EOF
  local manifest_digest manifest_size
  manifest_digest=$(sha "$manifest")
  manifest_size=$(stat -c %s "$manifest")
  mv "$manifest" "$layout/blobs/sha256/$manifest_digest"
  printf '{"imageLayoutVersion":"1.0.0"}\n' >"$layout/oci-layout"
  cat >"$layout/index.json" <<EOF
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest_digest","size":$manifest_size,"annotations":{"org.opencontainers.image.ref.name":"$tag"}}]}
EOF
  log "image $tag: layer $((layer_size / 1024)) KiB compressed, manifest sha256:$manifest_digest"
}

hermes_rootfs() {
  local rootfs=$1 binary=$2
  [ -x "$binary" ] || die "no hermes binary at $binary (cargo build --release -p hermes, or --binary PATH)"
  copy_with_libs "$rootfs" "$binary" /usr/local/bin/hermes
  # Debug info is most of a debug build; the image does not need it.
  strip --strip-debug "$rootfs/usr/local/bin/hermes"
  mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/var/lib/hermes-controller"
  chmod 1777 "$rootfs/tmp"
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  # The installer init container runs load-sidecars.sh with /bin/sh (no bash in the image).
  local busybox
  busybox=$(command -v busybox) || die "busybox missing (apt-get install busybox-static): the image's /bin/sh"
  install -D -m 0755 "$busybox" "$rootfs/bin/busybox"
  ln -s busybox "$rootfs/bin/sh"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
}

pause_rootfs() {
  local rootfs=$1 busybox
  busybox=$(command -v busybox) || die "busybox missing (apt-get install busybox-static)"
  install -D -m 0755 "$busybox" "$rootfs/bin/busybox"
}

main() {
  local kind=${1:-} binary=$ROOT_DIR/target/release/hermes layout="" push="" insecure=0
  shift || true
  while (($#)); do
    case $1 in
      --binary) binary=$2; shift 2 ;;
      --layout) layout=$2; shift 2 ;;
      --push) push=$2; shift 2 ;;
      --insecure) insecure=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  local work=$WORK
  [ -n "$layout" ] || layout=$work/layout
  rm -rf "$layout"
  local tag=latest
  [ -n "$push" ] && [[ ${push##*/} == *:* ]] && tag=${push##*:}
  case $kind in
    hermes)
      hermes_rootfs "$work/rootfs" "$binary"
      write_layout "$work/rootfs" "$layout" "$tag" '["/usr/local/bin/hermes"]' 65532
      ;;
    pause)
      pause_rootfs "$work/rootfs"
      write_layout "$work/rootfs" "$layout" "$tag" '["/bin/busybox","sleep","2147483647"]' 0
      ;;
    *) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
  if [ -n "$push" ]; then
    command -v skopeo >/dev/null || die "skopeo missing (apt-get install skopeo)"
    local tls=()
    ((insecure)) && tls=(--dest-tls-verify=false)
    skopeo copy -q "${tls[@]}" "oci:$layout:$tag" "docker://$push" >&2
    log "pushed $push"
  fi
}

main "$@"
