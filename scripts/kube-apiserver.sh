#!/usr/bin/env bash
# A real Kubernetes API server (v1.20.2, built from Debian bookworm's `kubernetes` source
# package) for the Kubernetes adapter's tests and for trying the manifests by hand.
#
#   kube-apiserver.sh deps           install the apt packages the build and the server need (root)
#   kube-apiserver.sh build          build the cluster binaries once (kube-apiserver, kubectl, kubelet,
#                                    kube-scheduler, kube-controller-manager); print the bin directory
#   kube-apiserver.sh run DIR [opts] run etcd + kube-apiserver on loopback with state in DIR, in the
#                                    foreground, until killed (or until --parent-pid exits);
#                                    writes DIR/kubeconfig, prints "ready" once /readyz answers
#   kube-apiserver.sh start DIR      the same in the background; `stop DIR` ends it
#
# run options: --port P (apiserver, default: a free port), --etcd-port P, --etcd-peer-port P,
# --parent-pid PID (exit when that process is gone: tests pass their own pid),
# --bind-address A (default 127.0.0.1), --san IP:X|DNS:X (more names on the serving cert),
# --with-nodes (for a cluster with a kubelet: service-account admission on, kubelet client
# certificate, kubelets reached by InternalIP). scripts/kube.sh sources this file for its functions.
#
# The build (one `make` call for all five binaries, so the shared packages compile once) takes
# about 15 minutes on 2 cores the first time; the binaries are cached in
# $HERMES_KUBE_CACHE (default /var/cache/hermes/kubernetes-1.20.2, or ~/.cache/... when
# /var/cache is not writable), so later runs start in seconds. The 2 GB build tree is removed.
set -euo pipefail

K8S_VERSION=1.20.2
# Everything scripts/kube.sh needs for a single-node cluster; built together by one make call.
K8S_BINARIES=(kube-apiserver kubectl kubelet kube-scheduler kube-controller-manager)
APT_PACKAGES=(golang-1.19-go etcd-server rsync make dpkg-dev openssl jq curl
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)

log() { printf '[kube-apiserver] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cache_dir() {
  if [ -n "${HERMES_KUBE_CACHE:-}" ]; then
    echo "$HERMES_KUBE_CACHE"
  elif mkdir -p /var/cache/hermes 2>/dev/null && [ -w /var/cache/hermes ]; then
    echo "/var/cache/hermes/kubernetes-$K8S_VERSION"
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/hermes/kubernetes-$K8S_VERSION"
  fi
}

cmd_deps() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || die "missing apt packages: ${missing[*]} (run 'scripts/kube-apiserver.sh deps' as root)"
  log "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# Fetch and unpack Debian's source package into $1 using a private apt configuration whose
# sources are the machine's own with deb-src added (the machine's /etc/apt is not touched).
fetch_source() {
  local work=$1 apt_dir=$1/apt
  mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial"
  local src
  for src in /etc/apt/sources.list.d/*.sources; do
    [ -e "$src" ] || continue
    sed -E 's/^Types:.*/Types: deb deb-src/' "$src" >"$apt_dir/sources.list.d/$(basename "$src")"
  done
  if [ -s /etc/apt/sources.list ]; then
    { grep -E '^deb ' /etc/apt/sources.list; grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /'; } \
      >"$apt_dir/sources.list.d/main.list" || true
  fi
  local opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Sandbox::User=root")
  log "fetching Debian's kubernetes source package"
  apt-get "${opts[@]}" update -qq >/dev/null
  (cd "$work" && apt-get "${opts[@]}" source --download-only -qq kubernetes >/dev/null)
  local dsc
  dsc=$(ls "$work"/kubernetes_*.dsc | head -n1)
  [ -n "$dsc" ] || die "apt-get source kubernetes gave no .dsc"
  (cd "$work" && dpkg-source -q -x "$dsc" src >/dev/null 2>&1)
  [ -f "$work/src/cmd/kube-apiserver/apiserver.go" ] || die "unpacked source has no cmd/kube-apiserver"
}

# The vendored reflect2 (and the json-iterator on top of it) crash under Go >= 1.18 the first
# time a custom resource is created; Debian's newer copies have the same API.
patch_vendor() {
  local tree=$1 pair dst srcdir
  for pair in "github.com/modern-go/reflect2" "github.com/json-iterator/go"; do
    dst=$tree/vendor/$pair
    srcdir=/usr/share/gocode/src/$pair
    [ -d "$srcdir" ] || die "$srcdir missing (apt package for $pair)"
    find "$dst" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
    find "$srcdir" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
      -exec cp {} "$dst/" \;
  done
}

cmd_build() {
  local cache
  cache=$(cache_dir)
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  local b have=1
  for b in "${K8S_BINARIES[@]}"; do [ -x "$cache/bin/$b" ] || have=0; done
  if ((have)); then
    echo "$cache/bin"
    return 0
  fi
  cmd_deps
  local work=$cache/build
  rm -rf "$work"
  mkdir -p "$work"
  fetch_source "$work"
  patch_vendor "$work/src"
  cat >"$work/version" <<EOF
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v$K8S_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  log "building ${K8S_BINARIES[*]} v$K8S_VERSION (about 15 minutes on 2 cores, once)"
  local start=$SECONDS
  (
    cd "$work/src"
    unset GOPATH GOFLAGS
    export PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off GOTOOLCHAIN=local GO111MODULE=on \
      GOCACHE=$work/gocache KUBE_GIT_VERSION_FILE=$work/version KUBE_VERBOSE=0
    make WHAT="${K8S_BINARIES[*]/#/cmd/}" >"$work/build.log" 2>&1
  ) || { tail -n 40 "$work/build.log" >&2; die "build failed (log above; tree kept in $work)"; }
  mkdir -p "$cache/bin.new"
  for b in "${K8S_BINARIES[@]}"; do cp "$work/src/_output/bin/$b" "$cache/bin.new/"; done
  rm -rf "$cache/bin"
  mv "$cache/bin.new" "$cache/bin"
  rm -rf "$work"
  log "built in $((SECONDS - start)) s: $cache/bin"
  echo "$cache/bin"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CA, apiserver serving cert (SAN 127.0.0.1 and any extra SANs given as "IP:x DNS:y"), admin
# client cert (system:masters), SA key pair.
make_certs() {
  local d=$1 extra_sans=${2:-} sans="IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc" san
  for san in $extra_sans; do sans+=",$san"; done
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3 -subj "/CN=hermes-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$sans" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3 -extfile server.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3 -extfile admin.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() {
  local d=$1 port=$2
  cat >"$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: hermes-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 "$d/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$d/admin.crt")
    client-key-data: $(base64 -w0 "$d/admin.key")
contexts:
- name: hermes-test
  context: {cluster: hermes-test, user: admin}
current-context: hermes-test
EOF
}

cmd_run() {
  local dir=${1:?usage: run DIR [--port P] [--etcd-port P] [--etcd-peer-port P] [--parent-pid PID] [--bind-address A] [--san S] [--with-nodes]}
  shift
  local port="" etcd_port="" peer_port="" parent="" bind=127.0.0.1 sans="" with_nodes=0
  while (($#)); do
    case $1 in
      --port) port=$2; shift 2 ;;
      --bind-address) bind=$2; shift 2 ;;
      --san) sans+=" $2"; shift 2 ;;
      --with-nodes) with_nodes=1; shift ;;
      --etcd-port) etcd_port=$2; shift 2 ;;
      --etcd-peer-port) peer_port=$2; shift 2 ;;
      --parent-pid) parent=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  cmd_deps
  local bin
  bin=$(cmd_build)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -n "$port" ] || port=$(free_port)
  [ -n "$etcd_port" ] || etcd_port=$(free_port)
  [ -n "$peer_port" ] || peer_port=$(free_port)
  make_certs "$dir" "$sans"
  # Without kubelets, pods never run: skip service-account tokens. With them, pods get tokens and
  # the API server reaches kubelets (logs, exec, port-forward) by InternalIP with the admin cert.
  local node_flags=(--disable-admission-plugins ServiceAccount)
  if ((with_nodes)); then
    node_flags=(--kubelet-preferred-address-types InternalIP
      --kubelet-client-certificate "$dir/admin.crt" --kubelet-client-key "$dir/admin.key")
  fi
  local etcd_pid api_pid
  cleanup() {
    trap - EXIT INT TERM
    [ -n "${api_pid:-}" ] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null
    [ -n "${etcd_pid:-}" ] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null
    true
  }
  trap cleanup EXIT
  trap 'exit 143' INT TERM
  etcd --name hermes-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "hermes-test=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync --log-level warn >"$dir/etcd.log" 2>&1 &
  etcd_pid=$!
  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind" --advertise-address 127.0.0.1 --secure-port "$port" --insecure-port 0 \
    --tls-cert-file "$dir/server.crt" --tls-private-key-file "$dir/server.key" \
    --client-ca-file "$dir/ca.crt" \
    --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 --endpoint-reconciler-type none \
    --authorization-mode Node,RBAC --enable-priority-and-fairness=false --allow-privileged=true \
    "${node_flags[@]}" \
    --logtostderr=true --v=0 >"$dir/apiserver.log" 2>&1 &
  api_pid=$!
  write_kubeconfig "$dir" "$port"
  local curl_auth=(--cacert "$dir/ca.crt" --cert "$dir/admin.crt" --key "$dir/admin.key")
  local deadline=$((SECONDS + 90))
  until curl -fsS "${curl_auth[@]}" "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$api_pid" 2>/dev/null || ! kill -0 "$etcd_pid" 2>/dev/null || ((SECONDS > deadline)); then
      tail -n 30 "$dir/etcd.log" "$dir/apiserver.log" >&2
      die "kube-apiserver did not become ready (logs above, in $dir)"
    fi
    sleep 0.2
  done
  echo "$port" >"$dir/port"
  echo ready
  while kill -0 "$api_pid" 2>/dev/null && kill -0 "$etcd_pid" 2>/dev/null; do
    if [ -n "$parent" ] && ! kill -0 "$parent" 2>/dev/null; then
      exit 0
    fi
    sleep 1
  done
  die "etcd or kube-apiserver exited (logs in $dir)"
}

cmd_start() {
  local dir=${1:?usage: start DIR}
  mkdir -p "$dir"
  setsid bash "$0" run "$@" >"$dir/run.log" 2>&1 </dev/null &
  echo $! >"$dir/run.pid"
  local deadline=$((SECONDS + 900))
  until grep -q '^ready$' "$dir/run.log" 2>/dev/null; do
    kill -0 "$(cat "$dir/run.pid")" 2>/dev/null || { cat "$dir/run.log" >&2; die "server exited"; }
    ((SECONDS < deadline)) || die "server not ready after 15 minutes"
    sleep 0.5
  done
  log "ready: export KUBECONFIG=$dir/kubeconfig"
}

cmd_stop() {
  local dir=${1:?usage: stop DIR}
  [ -f "$dir/run.pid" ] && kill -- "-$(cat "$dir/run.pid")" 2>/dev/null || true
  rm -f "$dir/run.pid"
}

# Sourced (by scripts/kube.sh) for its functions: no command.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case ${1:-} in
  deps) cmd_deps ;;
  build) cmd_build ;;
  run) shift; cmd_run "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
