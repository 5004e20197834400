#!/usr/bin/env bash
# Installs (or upgrades) the Hermes node daemon as a host service, before containerd uses it.
# Run as root on each node, with a kubeconfig that can read hermes-system's Secret and Service
# (or pass --token-file and --controller). Re-running it with a new --binary is the upgrade: the
# binary is replaced atomically and the service restarted; lazy layers are served by their own
# processes (KillMode=process), so running containers keep their files.
#
#   install.sh --binary PATH [--kubeconfig FILE] [--token-file FILE] [--controller URL]
#              [--bin-dir /usr/local/bin] [--config-dir /etc/hermes] [--root /var/lib/hermes/node]
#              [--socket /run/hermes/snapshotter.sock] [--metrics 127.0.0.1:9465] [--plain-http]
#              [--no-background-fetch] [--cri-proxy SOCKET [--containerd SOCKET]] [--no-start]
#              [--node-name NAME]
#
# --cri-proxy serves the CRI image service on SOCKET for the kubelet's --image-service-endpoint
# (pods' imagePullSecrets then reach lazy layers; deploy/README.md), forwarding to --containerd
# (default /run/containerd/containerd.sock).
#
# --controller defaults to http://CLUSTER-IP:8080 of the Service hermes-system/hermes-controller
# (the host resolves no cluster DNS names; kube-proxy routes the ClusterIP), --token-file to the
# Secret hermes-system/hermes-node-api. With systemd the unit deploy/containerd/hermes-node.service
# is written to /etc/systemd/system, enabled and (re)started; without systemd, or with --no-start,
# only the binary and config are written and the command to supervise is printed (its
# supervisor must stop only that process on restart, never its process group).
set -euo pipefail

log() { printf '[hermes-node install] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNIT_TEMPLATE=$HERE/../containerd/hermes-node.service

binary="" kubeconfig="" token_file="" controller="" bin_dir=/usr/local/bin config_dir=/etc/hermes
root=/var/lib/hermes/node socket=/run/hermes/snapshotter.sock metrics=127.0.0.1:9465 plain_http=false
background_fetch=true start=1 cri_proxy="" containerd=/run/containerd/containerd.sock node_name=""
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --kubeconfig) kubeconfig=$2; shift 2 ;;
    --token-file) token_file=$2; shift 2 ;;
    --controller) controller=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --socket) socket=$2; shift 2 ;;
    --metrics) metrics=$2; shift 2 ;;
    --plain-http) plain_http=true; shift ;;
    --no-background-fetch) background_fetch=false; shift ;;
    --cri-proxy) cri_proxy=$2; shift 2 ;;
    --containerd) containerd=$2; shift 2 ;;
    --node-name) node_name=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -n "$binary" ] || die "--binary PATH is required (the release build of hermes)"
[ -x "$binary" ] || die "$binary is not an executable"

kubectl_() {
  command -v kubectl >/dev/null || die "kubectl missing: install it or pass --token-file and --controller"
  kubectl ${kubeconfig:+--kubeconfig "$kubeconfig"} "$@"
}

if [ -z "$controller" ]; then
  ip=$(kubectl_ -n hermes-system get service hermes-controller -o 'jsonpath={.spec.clusterIP}') ||
    die "cannot read Service hermes-system/hermes-controller (kubectl apply -f deploy/kubernetes/ first)"
  port=$(kubectl_ -n hermes-system get service hermes-controller -o 'jsonpath={.spec.ports[0].port}')
  controller=http://$ip:$port
fi

umask 077
mkdir -p "$config_dir" "$bin_dir"
chmod 0755 "$bin_dir"
if [ -n "$token_file" ]; then
  install -m 0600 "$token_file" "$config_dir/token.new"
else
  kubectl_ -n hermes-system get secret hermes-node-api -o 'jsonpath={.data.token}' | base64 -d >"$config_dir/token.new" ||
    die "cannot read Secret hermes-system/hermes-node-api (create it as deploy/README.md says)"
fi
[ -s "$config_dir/token.new" ] || die "the node API token is empty"
mv "$config_dir/token.new" "$config_dir/token"

cat >"$config_dir/node.toml.new" <<TOML
# Written by deploy/node/install.sh; re-run it to change. Keys: deploy/containerd/node.toml.
root = "$root"
socket = "$socket"
plain_http = $plain_http
background_fetch = $background_fetch
metrics = "$metrics"
$(if [ -n "$cri_proxy" ]; then printf 'cri_proxy = "%s"\ncontainerd = "%s"' "$cri_proxy" "$containerd"; fi)
$(if [ -n "$node_name" ]; then printf 'node_name = "%s"' "$node_name"; fi)

[controller]
url = "$controller"
token_file = "$config_dir/token"
TOML
chmod 0644 "$config_dir/node.toml.new"
mv "$config_dir/node.toml.new" "$config_dir/node.toml"

# A new inode, renamed over the old one: running layer servers keep executing the old file.
install -m 0755 "$binary" "$bin_dir/hermes.new"
mv -f "$bin_dir/hermes.new" "$bin_dir/hermes"
command=("$bin_dir/hermes" node --config "$config_dir/node.toml")
log "installed $bin_dir/hermes ($("$bin_dir/hermes" --version)), $config_dir/node.toml, controller $controller"

if ((start)) && [ -d /run/systemd/system ]; then
  sed -e "s|^ExecStart=.*|ExecStart=${command[*]}|" "$UNIT_TEMPLATE" >/etc/systemd/system/hermes-node.service
  systemctl daemon-reload
  systemctl enable hermes-node.service >/dev/null
  # restart, not start: an upgrade must run the new binary. KillMode=process keeps lazy layers.
  systemctl restart hermes-node.service
  log "hermes-node.service (re)started; containerd needs deploy/containerd/config.toml (restart it once)"
else
  ((start)) && log "no systemd here: run the command below under your supervisor (stop only its own process on restart)"
  printf '%s\n' "${command[*]}"
fi
