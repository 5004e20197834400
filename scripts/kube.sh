#!/usr/bin/env bash
# A single-node Kubernetes cluster (v1.20.2 from Debian's source, see kube-apiserver.sh) on this
# machine, with Hermes installed from deploy/ the way a user would: for the end-to-end tests and
# for trying Hermes by hand.
#
#   kube.sh up DIR [--hermes BIN] [--no-background-fetch] [--cri-proxy]
#                                   start it all with state in DIR; writes DIR/kubeconfig and
#                                   DIR/env (REGISTRY=host:port, NODE_METRICS=..., ...); the
#                                   option goes to the node's config (tests measure what a start
#                                   fetches); --cri-proxy installs the node with its CRI
#                                   image-service proxy and points the kubelet's
#                                   --image-service-endpoint at it (pods' pull secrets reach lazy
#                                   layers; the proxy's HTTP/2 front accepts this v1.20
#                                   kubelet's socket-path `:authority`, deploy/README.md)
#   kube.sh down DIR                stop everything `up` started and remove what it left: processes,
#                                   mounts, the bridge, iptables rules, pod logs, DIR
#   kube.sh node-restart DIR        restart the Hermes node service (SIGTERM to the daemon only, as
#                                   systemd's KillMode=process does; the supervisor starts it again)
#   kube.sh node-upgrade DIR BIN    install BIN with deploy/node/install.sh, then node-restart
#
# What runs: etcd and kube-apiserver (kube-apiserver.sh), kube-controller-manager, kube-scheduler,
# a docker-registry, the Hermes node daemon as a host service (deploy/node/install.sh, under a
# small supervisor: this machine has no systemd), containerd 1.6 (its own root, state and socket,
# CRI with `snapshotter = "hermes"`), a kubelet (node IP: the bridge address; v1.20 refuses a
# loopback node IP, and the API server reaches it there for logs and exec), a bridge pod network (Debian's CNI
# plugins) and, in place of kube-proxy (not built here), a loop that keeps iptables DNAT rules from
# each Service's ClusterIP to its ready endpoints. Then: `kubectl apply` of deploy/crds and
# deploy/kubernetes, the node API token Secret, the Hermes image (scripts/image.sh, BIN or
# target/release/hermes) in the local registry, which containerd mirrors for docker.io, so the
# manifests' `image: hermes:0.1.0` pulls it unchanged.
#
# One cluster per machine (a fixed bridge and subnet). Needs root, the cluster binaries
# (kube-apiserver.sh build), containerd, runc, docker-registry, containernetworking-plugins,
# skopeo, iptables, jq (scripts/install-deps.sh installs them).
set -euo pipefail

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT_DIR=$(dirname "$SCRIPTS")
# shellcheck source=kube-apiserver.sh
source "$SCRIPTS/kube-apiserver.sh"

log() { printf '[kube] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

BRIDGE=hermeskube0
GATEWAY=10.213.0.1
POD_SUBNET=10.213.0.0/24
SERVICE_RANGE=10.0.0.0/24
API_SERVICE_IP=10.0.0.1
NODE_NAME=hermes-kube
PROXY_CHAIN=HERMES-KUBE-SERVICES
OWNER_FILE=/run/hermes-kube.owner

# start_daemon DIR NAME COMMAND...: in its own session (so `down` can end its whole process
# group), logging to DIR/logs/NAME.log, pid in DIR/pids/NAME.
start_daemon() {
  local dir=$1 name=$2
  shift 2
  mkdir -p "$dir/logs" "$dir/pids"
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/pids/$name"
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what=$1 secs=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what: not within ${secs}s (logs in $DIR/logs)"
    sleep 0.2
  done
}

kubectl_() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

need() {
  local program=$1 package=$2
  command -v "$program" >/dev/null || die "$program missing: apt-get install $package (or scripts/install-deps.sh)"
}

check_prerequisites() {
  [ "$(id -u)" = 0 ] || die "needs root (containerd, kubelet, mounts, iptables)"
  need containerd containerd
  need runc runc
  need docker-registry docker-registry
  need etcd etcd-server
  need skopeo skopeo
  need iptables iptables
  need jq jq
  need busybox busybox
  [ -x /usr/lib/cni/bridge ] || die "/usr/lib/cni/bridge missing: apt-get install containernetworking-plugins"
  [ -e /dev/fuse ] || die "/dev/fuse missing (Hermes mounts lazy layers with FUSE)"
}

claim_machine() {
  if [ -f "$OWNER_FILE" ]; then
    local owner
    owner=$(cat "$OWNER_FILE")
    if [ -d "$owner/pids" ]; then
      die "a cluster from $owner runs here (one per machine): scripts/kube.sh down $owner"
    fi
  fi
  echo "$DIR" >"$OWNER_FILE"
}

setup_bridge() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Service IPs go to the bridge, so the host's own connections to them leave from $GATEWAY.
  ip route replace "$SERVICE_RANGE" dev "$BRIDGE" src "$GATEWAY"
  iptables -t nat -N "$PROXY_CHAIN" 2>/dev/null || iptables -t nat -F "$PROXY_CHAIN"
  iptables -t nat -C PREROUTING -j "$PROXY_CHAIN" 2>/dev/null || iptables -t nat -I PREROUTING -j "$PROXY_CHAIN"
  iptables -t nat -C OUTPUT -j "$PROXY_CHAIN" 2>/dev/null || iptables -t nat -I OUTPUT -j "$PROXY_CHAIN"
}

start_registry() {
  local port
  port=$(free_port)
  mkdir -p "$DIR/registry"
  cat >"$DIR/registry/config.yml" <<EOF
version: 0.1
# info: one line per request with the bytes written (tests count what the node fetched).
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: $DIR/registry/data}
  delete: {enabled: true}
http: {addr: "$GATEWAY:$port", secret: hermes-kube}
EOF
  start_daemon "$DIR" registry env -u REGISTRY_HTTP_ADDR docker-registry serve "$DIR/registry/config.yml"
  REGISTRY=$GATEWAY:$port
  wait_for "registry on $REGISTRY" 30 curl -fsS "http://$REGISTRY/v2/"
}

start_control_plane() {
  bash "$SCRIPTS/kube-apiserver.sh" start "$DIR/api" --bind-address 0.0.0.0 \
    --san "IP:$GATEWAY" --san "IP:$API_SERVICE_IP" --with-nodes
  cp "$DIR/api/kubeconfig" "$DIR/kubeconfig"
  API_PORT=$(cat "$DIR/api/port")
  # With --endpoint-reconciler-type=none the `kubernetes` Service has no endpoints: pods reach
  # the API server on the bridge.
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Endpoints
metadata: {name: kubernetes, namespace: default}
subsets:
  - addresses: [{ip: "$GATEWAY"}]
    ports: [{name: https, port: $API_PORT, protocol: TCP}]
EOF
  start_daemon "$DIR" kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kubeconfig" --leader-elect=false --port=0 --secure-port=0 \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander' \
    --root-ca-file "$DIR/api/ca.crt" --service-account-private-key-file "$DIR/api/sa.key" \
    --use-service-account-credentials=false --cluster-signing-cert-file "$DIR/api/ca.crt" \
    --cluster-signing-key-file "$DIR/api/ca.key" --logtostderr=true --v=0
  start_daemon "$DIR" kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$DIR/kubeconfig" --leader-elect=false --port=0 --secure-port=0 --logtostderr=true --v=0
  start_daemon "$DIR" service-proxy bash "$SCRIPTS/kube.sh" service-proxy "$DIR"
}

# The stand-in for kube-proxy: every second, DNAT each ClusterIP:port to the Service's ready
# endpoints (random choice among several), rewritten in one iptables-restore.
service_proxy() {
  local last=""
  while :; do
    local rules
    rules=$(
      {
        kubectl_ get services -A -o json 2>/dev/null || echo '{"items":[]}'
        kubectl_ get endpoints -A -o json 2>/dev/null || echo '{"items":[]}'
      } | jq -rs --arg chain "$PROXY_CHAIN" '
        (.[1].items | map({key: (.metadata.namespace + "/" + .metadata.name), value: (.subsets // [])}) | from_entries) as $eps
        | .[0].items[]
        | select(.spec.clusterIP != null and .spec.clusterIP != "None")
        | . as $svc
        | .spec.ports[]
        | . as $port
        | [ $eps[$svc.metadata.namespace + "/" + $svc.metadata.name][]?
            | . as $subset
            | ($subset.ports // [])[]
            | select((.name // "") == ($port.name // ""))
            | .port as $p
            | ($subset.addresses // [])[] | "\(.ip):\($p)" ] as $targets
        | ($targets | length) as $n
        | range(0; $n) as $i
        | "-A \($chain) -d \($svc.spec.clusterIP)/32 -p \($port.protocol // "TCP" | ascii_downcase) --dport \($port.port)"
          + (if $i < $n - 1 then " -m statistic --mode random --probability \(1 / ($n - $i))" else "" end)
          + " -j DNAT --to-destination \($targets[$i])"'
    )
    if [ "$rules" != "$last" ]; then
      printf '*nat\n:%s - [0:0]\n-F %s\n%s\nCOMMIT\n' "$PROXY_CHAIN" "$PROXY_CHAIN" "$rules" |
        iptables-restore --noflush && last=$rules
    fi
    sleep 1
  done
}

install_hermes_manifests() {
  kubectl_ apply -f "$ROOT_DIR/deploy/crds/" >/dev/null
  wait_for "CRDs established" 60 kubectl_ wait --for condition=established --timeout=1s \
    crd/hermespolicies.hermes.dev crd/hermesimages.hermes.dev
  kubectl_ apply -f "$ROOT_DIR/deploy/kubernetes/" >/dev/null
  # deploy/README.md: the node API token is yours to create.
  kubectl_ -n hermes-system create secret generic hermes-node-api \
    --from-literal=token="$(openssl rand -hex 32)" >/dev/null
  # This cluster's registry speaks plain HTTP; the replicas share the artifact store through it.
  kubectl_ -n hermes-system patch configmap hermes-controller --type merge \
    -p "{\"data\":{\"storeRepository\":\"$REGISTRY/hermes/store\",\"plainHttp\":\"true\"}}" >/dev/null
}

push_images() {
  local hermes_bin=$1
  bash "$SCRIPTS/image.sh" pause --push "$REGISTRY/pause:v1" --insecure
  # docker.io is mirrored to the local registry (hosts.toml below): `hermes:0.1.0` in the
  # manifests is docker.io/library/hermes:0.1.0.
  bash "$SCRIPTS/image.sh" hermes --binary "$hermes_bin" --push "$REGISTRY/library/hermes:0.1.0" --insecure
}

install_node_service() {
  local hermes_bin=$1
  mkdir -p "$DIR/node"
  bash "$ROOT_DIR/deploy/node/install.sh" --binary "$hermes_bin" --kubeconfig "$DIR/kubeconfig" \
    --bin-dir "$DIR/node/bin" --config-dir "$DIR/node/etc" --root "$DIR/node/root" \
    --socket "$DIR/node/run/snapshotter.sock" --metrics "127.0.0.1:$NODE_METRICS_PORT" \
    --plain-http --node-name "$NODE_NAME" ${NODE_INSTALL_FLAGS:-} ${CRI_PROXY:+--cri-proxy "$CRI_PROXY" --containerd "$DIR/containerd/containerd.sock"} \
    --no-start >"$DIR/node/command"
}

# The service manager this machine lacks: restart the daemon when it exits (systemd's
# Restart=always). Lazy layer servers run in their own process groups and survive it.
supervise_node() {
  local command
  read -r -a command <"$DIR/node/command"
  while :; do
    "${command[@]}" &
    echo $! >"$DIR/pids/hermes-node.main"
    wait $! || true
    [ -f "$DIR/node/stopping" ] && exit 0
    sleep 1
  done
}

start_node_service() {
  mkdir -p "$DIR/node/run"
  rm -f "$DIR/node/stopping"
  start_daemon "$DIR" hermes-node bash "$SCRIPTS/kube.sh" supervise-node "$DIR"
  wait_for "Hermes node socket" 60 test -S "$DIR/node/run/snapshotter.sock"
  wait_for "Hermes node metrics" 60 curl -fsS "http://127.0.0.1:$NODE_METRICS_PORT/metrics"
}

start_containerd() {
  local c=$DIR/containerd
  mkdir -p "$c/certs.d/$REGISTRY" "$c/certs.d/docker.io" "$DIR/cni/net.d"
  cat >"$c/certs.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  cat >"$c/certs.d/docker.io/hosts.toml" <<EOF
server = "https://registry-1.docker.io"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  cat >"$DIR/cni/net.d/10-hermes-kube.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "hermes-kube", "plugins": [{
  "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "dataDir": "$DIR/cni/ipam",
           "ranges": [[{"subnet": "$POD_SUBNET", "rangeStart": "${GATEWAY%.1}.10", "gateway": "$GATEWAY"}]],
           "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  # The snippets of deploy/containerd/config.toml, with this cluster's paths.
  cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$REGISTRY/pause:v1"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "hermes"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$DIR/cni/net.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$c/certs.d"
[proxy_plugins.hermes]
  type = "snapshot"
  address = "$DIR/node/run/snapshotter.sock"
EOF
  start_daemon "$DIR" containerd containerd --config "$c/config.toml"
  wait_for "containerd's CRI" 60 grep -q "Start streaming server" "$DIR/logs/containerd.log"
}

start_kubelet() {
  local port healthz
  port=$(free_port)
  healthz=$(free_port)
  mkdir -p "$DIR/kubelet"
  start_daemon "$DIR" kubelet "$BIN/kubelet" \
    --kubeconfig "$DIR/kubeconfig" --container-runtime=remote \
    --container-runtime-endpoint "unix://$DIR/containerd/containerd.sock" \
    ${CRI_PROXY:+--image-service-endpoint "unix://$CRI_PROXY"} \
    --runtime-request-timeout 10m \
    --root-dir "$DIR/kubelet" --cert-dir "$DIR/kubelet/pki" --volume-plugin-dir "$DIR/kubelet/volume-plugins" \
    --hostname-override "$NODE_NAME" --node-ip "$GATEWAY" \
    --fail-swap-on=false --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --pod-infra-container-image "$REGISTRY/pause:v1" \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 --eviction-hard= \
    --anonymous-auth=false --client-ca-file "$DIR/api/ca.crt" --authorization-mode=AlwaysAllow \
    --authentication-token-webhook=false --make-iptables-util-chains=false \
    --port "$port" --read-only-port=0 --healthz-port "$healthz" --address "$GATEWAY" \
    --logtostderr=true --v=0
  wait_for "node $NODE_NAME Ready" 90 kubectl_ wait --for condition=Ready --timeout=1s "node/$NODE_NAME"
}

wait_hermes_ready() {
  wait_for "hermes-controller available (kubectl -n hermes-system get pods)" 180 \
    kubectl_ -n hermes-system wait --for condition=Available --timeout=1s deployment/hermes-controller
}

write_env() {
  cat >"$DIR/env" <<EOF
KUBECONFIG=$DIR/kubeconfig
KUBECTL=$BIN/kubectl
REGISTRY=$REGISTRY
NODE_NAME=$NODE_NAME
NODE_METRICS=http://127.0.0.1:$NODE_METRICS_PORT/metrics
NODE_INSTALL_FLAGS=${NODE_INSTALL_FLAGS:-}
CONTAINERD_ADDRESS=$DIR/containerd/containerd.sock
EOF
}

cmd_up() {
  DIR=${1:?usage: up DIR [--hermes BIN]}
  shift
  local hermes_bin=$ROOT_DIR/target/release/hermes
  while (($#)); do
    case $1 in
      --hermes) hermes_bin=$2; shift 2 ;;
      --no-background-fetch) NODE_INSTALL_FLAGS=--no-background-fetch; shift ;;
      --cri-proxy) CRI_PROXY=yes; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  [ -x "$hermes_bin" ] || die "no hermes binary at $hermes_bin (cargo build --release -p hermes, or --hermes BIN)"
  hermes_bin=$(readlink -f "$hermes_bin")
  check_prerequisites
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ -z "${CRI_PROXY:-}" ] || CRI_PROXY=$DIR/node/run/cri-image.sock
  BIN=$(cmd_build)
  local b
  for b in "${K8S_BINARIES[@]}"; do [ -x "$BIN/$b" ] || die "$BIN/$b missing (scripts/kube-apiserver.sh build)"; done
  claim_machine
  mkdir -p "$DIR/pids" "$DIR/logs"
  # Pod logs the kubelet writes outside DIR: `down` removes those that were not there before.
  ls -1 /var/log/pods 2>/dev/null >"$DIR/prior-pod-logs" || true
  ls -1 /run/netns 2>/dev/null >"$DIR/prior-netns" || true
  NODE_METRICS_PORT=$(free_port)
  setup_bridge
  start_registry
  log "registry $REGISTRY"
  start_control_plane
  log "API server on port $API_PORT"
  install_hermes_manifests
  push_images "$hermes_bin"
  install_node_service "$hermes_bin"
  start_node_service
  log "Hermes node service up (metrics :$NODE_METRICS_PORT)"
  start_containerd
  start_kubelet
  log "node $NODE_NAME Ready"
  write_env
  wait_hermes_ready
  log "ready: export KUBECONFIG=$DIR/kubeconfig (kubectl: $BIN/kubectl)"
}

# Ends a daemon started by start_daemon: its process group, then waits for it.
stop_daemon() {
  local name=$1 sig=${2:-TERM} pid
  [ -f "$DIR/pids/$name" ] || return 0
  pid=$(cat "$DIR/pids/$name")
  kill -"$sig" -- "-$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/pids/$name"
}

# Kills the containerd shims of this cluster and the processes they run.
kill_shims() {
  local sock=$DIR/containerd/containerd.sock pid shims=()
  for pid in $(pgrep -f containerd-shim || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$sock" && shims+=("$pid")
  done
  ((${#shims[@]})) || return 0
  for pid in "${shims[@]}"; do pkill -KILL -P "$pid" 2>/dev/null || true; done
  kill -KILL "${shims[@]}" 2>/dev/null || true
}

unmount_under() {
  local prefix=$1 point
  { awk '{print $5}' /proc/self/mountinfo | grep -E "^$prefix(/|$)" || true; } | sort -r | uniq | while read -r point; do
    umount "$point" 2>/dev/null || umount -l "$point" 2>/dev/null || true
  done
}

cmd_down() {
  DIR=${1:?usage: down DIR}
  [ -d "$DIR" ] || { log "nothing at $DIR"; return 0; }
  DIR=$(cd "$DIR" && pwd)
  BIN=$(cache_dir)/bin
  # No new pods: stop the controllers first, then let the kubelet stop every pod (CNI teardown,
  # netns removal) before it goes.
  stop_daemon kube-controller-manager
  stop_daemon kube-scheduler
  if [ -f "$DIR/pids/kubelet" ] && [ -f "$DIR/kubeconfig" ]; then
    kubectl_ delete pods --all -A --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)) &&
      [ -n "$(ctr --address "$DIR/containerd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null)" ]; do
      sleep 0.5
    done
  fi
  stop_daemon kubelet
  if [ -f "$DIR/pids/containerd" ]; then
    local task
    for task in $(ctr --address "$DIR/containerd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$DIR/containerd/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
  fi
  kill_shims
  stop_daemon containerd
  # The node service, then its lazy layer servers (they outlive the daemon by design).
  touch "$DIR/node/stopping" 2>/dev/null || true
  stop_daemon hermes-node
  if [ -x "$DIR/node/bin/hermes" ]; then
    "$DIR/node/bin/hermes" node --config "$DIR/node/etc/node.toml" --unmount-all >/dev/null 2>&1 || true
  fi
  stop_daemon service-proxy
  [ -f "$DIR/api/run.pid" ] && bash "$SCRIPTS/kube-apiserver.sh" stop "$DIR/api"
  stop_daemon registry
  unmount_under "$DIR"
  # Network namespaces and pod logs this cluster made.
  local entry
  for entry in $(ls -1 /run/netns 2>/dev/null); do
    grep -qxF "$entry" "$DIR/prior-netns" 2>/dev/null && continue
    umount "/run/netns/$entry" 2>/dev/null || umount -l "/run/netns/$entry" 2>/dev/null || true
    rm -f "/run/netns/$entry"
  done
  for entry in $(ls -1 /var/log/pods 2>/dev/null); do
    grep -qxF "$entry" "$DIR/prior-pod-logs" 2>/dev/null && continue
    rm -rf "/var/log/pods/$entry"
  done
  find /var/log/containers -maxdepth 1 -xtype l -delete 2>/dev/null || true
  rmdir /var/log/pods /var/log/containers /run/netns 2>/dev/null || true
  iptables -t nat -D PREROUTING -j "$PROXY_CHAIN" 2>/dev/null || true
  iptables -t nat -D OUTPUT -j "$PROXY_CHAIN" 2>/dev/null || true
  iptables -t nat -F "$PROXY_CHAIN" 2>/dev/null || true
  iptables -t nat -X "$PROXY_CHAIN" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  [ "$(cat "$OWNER_FILE" 2>/dev/null)" = "$DIR" ] && rm -f "$OWNER_FILE"
  rm -rf "$DIR"
  log "down: $DIR removed"
}

cmd_node_restart() {
  DIR=$(cd "${1:?usage: node-restart DIR}" && pwd)
  local old
  old=$(cat "$DIR/pids/hermes-node.main")
  kill -TERM "$old"
  while kill -0 "$old" 2>/dev/null; do sleep 0.1; done
  local deadline=$((SECONDS + 60))
  until [ "$(cat "$DIR/pids/hermes-node.main")" != "$old" ] && [ -S "$DIR/node/run/snapshotter.sock" ]; do
    ((SECONDS < deadline)) || die "the node service did not come back (log: $DIR/logs/hermes-node.log)"
    sleep 0.1
  done
  log "node service restarted (pid $(cat "$DIR/pids/hermes-node.main"))"
}

cmd_node_upgrade() {
  DIR=$(cd "${1:?usage: node-upgrade DIR BIN}" && pwd)
  local bin=${2:?usage: node-upgrade DIR BIN}
  BIN=$(cache_dir)/bin
  source "$DIR/env"
  local metrics_port=${NODE_METRICS##*:}
  NODE_METRICS_PORT=${metrics_port%%/*}
  install_node_service "$bin"
  cmd_node_restart "$DIR"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  node-restart) shift; cmd_node_restart "$@" ;;
  node-upgrade) shift; cmd_node_upgrade "$@" ;;
  # Internal: the long-running parts `up` starts.
  service-proxy) DIR=$2; BIN=$(cache_dir)/bin; service_proxy ;;
  supervise-node) DIR=$2; supervise_node ;;
  *) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
