#!/usr/bin/env bash
# Installs (or updates) the memory-module admission webhook: its TLS, the policies it reads, the
# webhook itself with the API server trusting it. Then `kubectl apply -f deploy/modules/` (or
# your own loader ConfigMap and policies) as usual; re-applying webhook.yaml keeps the caBundle.
#
#   install.sh [--kubeconfig FILE] --policy FILE [--policy FILE]... [--wait]
#
# 1. The Secret hermes-system/hermes-webhook-tls: a CA and a serving certificate for
#    hermes-modules-webhook.hermes-system.svc (openssl, 10 years), made once; a re-run keeps it.
#    Bring your own (e.g. cert-manager) by creating the Secret, with ca.crt, before running this.
# 2. The ConfigMap hermes-system/hermes-policies from the --policy files (HermesPolicy YAML, the
#    ones whose spec.memoryModules selects pods): the webhook reads it on every review, so re-run
#    with the new files after changing a policy.
# 3. `kubectl apply -f webhook.yaml`, then the CA into the MutatingWebhookConfiguration's caBundle.
# --wait waits until the webhook Deployment is available. Needs kubectl and openssl.
set -euo pipefail

log() { printf '[hermes-webhook install] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAMESPACE=hermes-system
SERVICE=hermes-modules-webhook
SECRET=hermes-webhook-tls
WEBHOOK_CONFIG=hermes-memory-modules

kubeconfig="" policies=() wait=0
while (($#)); do
  case $1 in
    --kubeconfig) kubeconfig=$2; shift 2 ;;
    --policy) policies+=("$2"); shift 2 ;;
    --wait) wait=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (--help)" ;;
  esac
done
((${#policies[@]})) || die "give the policies the webhook applies: --policy FILE (e.g. $HERE/policy-example.yaml)"
for p in "${policies[@]}"; do [ -f "$p" ] || die "no policy file $p"; done
command -v kubectl >/dev/null || die "kubectl missing"
command -v openssl >/dev/null || die "openssl missing"

k() { if [ -n "$kubeconfig" ]; then kubectl --kubeconfig "$kubeconfig" "$@"; else kubectl "$@"; fi; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

k get namespace "$NAMESPACE" >/dev/null 2>&1 || k create namespace "$NAMESPACE" >/dev/null

# 1. TLS: kept when present, so pods and the API server keep trusting it across re-runs.
if k -n "$NAMESPACE" get secret "$SECRET" >/dev/null 2>&1; then
  k -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.ca\.crt}' >"$work/ca.b64"
  [ -s "$work/ca.b64" ] || die "Secret $NAMESPACE/$SECRET has no ca.crt: add the CA that signed tls.crt, or delete the Secret"
  log "keeping the TLS Secret $NAMESPACE/$SECRET"
else
  host=$SERVICE.$NAMESPACE.svc
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=hermes-webhook-ca" \
    -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
    -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local,DNS:%s.%s\nextendedKeyUsage=serverAuth\n' \
    "$host" "$host" "$SERVICE" "$NAMESPACE" >"$work/ext"
  openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
    -days 3650 -extfile "$work/ext" -out "$work/tls.crt" 2>/dev/null
  k -n "$NAMESPACE" create secret generic "$SECRET" --from-file=tls.crt="$work/tls.crt" \
    --from-file=tls.key="$work/tls.key" --from-file=ca.crt="$work/ca.crt" >/dev/null
  base64 -w0 "$work/ca.crt" >"$work/ca.b64"
  log "created the TLS Secret $NAMESPACE/$SECRET for $host"
fi

# 2. The policies the webhook reads.
from_files=()
for p in "${policies[@]}"; do from_files+=("--from-file=$(basename "$p")=$p"); done
k -n "$NAMESPACE" create configmap hermes-policies "${from_files[@]}" --dry-run=client -o yaml |
  k apply -f - >/dev/null
log "ConfigMap $NAMESPACE/hermes-policies: ${policies[*]}"

# 3. The webhook, trusted by the API server.
k apply -f "$HERE/webhook.yaml" >/dev/null
k patch mutatingwebhookconfiguration "$WEBHOOK_CONFIG" --type json \
  -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$(cat "$work/ca.b64")\"}]" >/dev/null
log "webhook $WEBHOOK_CONFIG installed"
if ((wait)); then
  k -n "$NAMESPACE" rollout status deployment/"$SERVICE" --timeout=180s >&2
fi
