#!/usr/bin/env python3
"""Pod start as the kubelet reports it: the normal path vs Hermes, same run, same cluster.

Starts the single-node cluster of scripts/kube.sh (kubelet v1.20, containerd 1.6, Hermes installed
from deploy/), puts a bandwidth-capped proxy (bench/throttle_proxy.py, which counts the bytes it
sends) in front of its registry, and pushes the image. A HermesPolicy selects it. Then:

  normal  a pod of the image on a node that has never seen it: no index exists yet, so it is
          pulled the normal way; meanwhile the controller sees the running pod through its pod
          watch and indexes the image
  hermes  once the HermesImage is Ready: the pod is deleted, the image removed from the node
          (containerd's API, what `crictl rmi` does), page cache dropped, and a second pod of the
          image starts, lazily

Each start is measured as Kubernetes reports it: pod created (the client's clock when the API
server accepted it, and `metadata.creationTimestamp`) -> container started
(`status.containerStatuses[].state.running.startedAt`, whole seconds) -> the first output line and
the "ready" line (`kubectl logs --timestamps`, nanoseconds), and the registry bytes up to then.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
import startup  # noqa: E402
from stack import log  # noqa: E402
from throttle_proxy import ThrottleProxy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBE_SH = os.path.join(ROOT, "scripts", "kube.sh")


def rfc3339(s: str) -> float:
    """Seconds since the epoch of an RFC 3339 time (Kubernetes' format; nanoseconds allowed)."""
    s = s.rstrip("Z")
    frac = 0.0
    if "." in s:
        s, f = s.split(".", 1)
        frac = float("0." + f)
    t = datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return t.timestamp() + frac


class Cluster:
    def __init__(self, dir: str):
        self.dir = dir
        self.env = dict(line.split("=", 1) for line in open(os.path.join(dir, "env")).read().split())

    def kubectl(self, args: list, input: str = None, check: bool = True) -> str:
        out = subprocess.run([self.env["KUBECTL"], "--kubeconfig", self.env["KUBECONFIG"]] + args,
                             input=input, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def json(self, args: list) -> dict:
        return json.loads(self.kubectl(args + ["-o", "json"]))

    def ctr(self, args: list) -> str:
        return subprocess.run(["ctr", "--address", self.env["CONTAINERD_ADDRESS"], "-n", "k8s.io"] + args,
                              check=True, capture_output=True, text=True).stdout

    def metric(self, name: str) -> float:
        text = stack.http_get(self.env["NODE_METRICS"]).decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))

    def committed_snapshots(self) -> set:
        lines = self.ctr(["snapshots", "--snapshotter", "hermes", "ls"]).splitlines()[1:]
        return {l.split()[0] for l in lines if len(l.split()) >= 3 and l.split()[2] == "Committed"}

    def remove_image(self, repo: str, config_digest: str, layer_snapshots: set) -> None:
        """Every name of the image (tag, digest, config ID), as `crictl rmi` removes them."""
        refs = [r for r in self.ctr(["images", "ls", "-q"]).split() if r.startswith(repo) or r == config_digest]
        self.ctr(["images", "rm", "--sync"] + refs)
        stack.wait_for("the image's snapshots removed", lambda: not (layer_snapshots & self.committed_snapshots()), 120)
        # containerd drops the snapshots from its metadata first and has Hermes delete their
        # trees after, holding snapshot operations meanwhile (a 500 MB tree takes seconds): the
        # next pod's sandbox would wait for that. Wait until no snapshot dir outlives its record.
        snapshots_dir = os.path.join(self.dir, "node", "root", "snapshots")
        listed = lambda: len(self.ctr(["snapshots", "--snapshotter", "hermes", "ls"]).splitlines()) - 1  # noqa: E731
        stack.wait_for("Hermes removed the image's snapshot trees", lambda: len(os.listdir(snapshots_dir)) <= listed(), 300)


def image_config(layout_dir: str) -> tuple:
    """The image's config digest, and its entrypoint and cmd followed by a sleep (the pod keeps
    running after its work, so the controller's pod watch sees it running)."""
    index = json.load(open(os.path.join(layout_dir, "index.json")))
    blob = lambda d: os.path.join(layout_dir, "blobs", *d.split(":"))  # noqa: E731
    manifest = json.load(open(blob(index["manifests"][0]["digest"])))
    config = json.load(open(blob(manifest["config"]["digest"])))["config"]
    argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    return manifest["config"]["digest"], ["/bin/sh", "-c", '"$@"; exec sleep 1000000', "sh"] + argv


def start_pod(cluster: Cluster, name: str, ref: str, command: list, proxy) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
           # Host network, as the CRI-level benchmark: the bridge CNI's sandbox setup takes ~4 s
           # here, the same for both modes, and is not what is compared.
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "hostNetwork": True,
                    "containers": [{"name": "app", "image": ref, "imagePullPolicy": "IfNotPresent",
                                    "command": command}]}}
    stack.drop_caches()
    down0 = proxy.down
    cluster.kubectl(["create", "-f", "-"], input=json.dumps(pod))
    created_client = time.time()
    first = ready = None
    bytes_first = None
    deadline = time.monotonic() + 1800
    while ready is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pod {name} did not print 'ready' within 30 min")
        out = cluster.kubectl(["-n", "default", "logs", "--timestamps", name], check=False)
        lines = [l.split(" ", 1) for l in out.splitlines() if " " in l]
        if lines and first is None:
            first = rfc3339(lines[0][0])
            bytes_first = proxy.down - down0
        for ts, text in lines:
            if text.strip() == "ready":
                ready = rfc3339(ts)
        time.sleep(0.1)
    status = cluster.json(["-n", "default", "get", "pod", name])
    created = rfc3339(status["metadata"]["creationTimestamp"])
    started = rfc3339(status["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
    return {"created_api": created, "created": created_client, "started_s": started - created_client,
            "first_line_s": first - created_client, "ready_s": ready - created_client,
            "bytes_first_line": bytes_first, "bytes_ready": proxy.down - down0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hermes", required=True)
    ap.add_argument("--image", default="quick", help="quick | ml | torch | an OCI layout dir (tag v1)")
    ap.add_argument("--rate-mbps", type=float, default=32.0, help="registry bandwidth cap, MB/s")
    ap.add_argument("--work", default="/var/tmp/hermes-startup-bench")
    ap.add_argument("--check", action="store_true", help="fail unless the Hermes start is faster")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running (kube.sh down DIR)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (the cluster, drop_caches)")
    if args.image in startup.PROFILES:
        layout_dir = os.path.join(args.work, "images", args.image)
        meta = startup.build_generated(args.image, layout_dir)
    elif args.image == "torch":
        import torch_image
        layout_dir = torch_image.build()
        meta = json.load(open(os.path.join(layout_dir, "meta.json")))
    else:
        layout_dir = os.path.abspath(args.image)
        meta = {"description": layout_dir}
    name = os.path.basename(layout_dir.rstrip("/")).lower()
    compressed = stack.Layout.compressed_size(layout_dir)
    dir = os.path.join(args.work, "kube")
    if os.path.exists(os.path.join(dir, "pids")):
        subprocess.run(["bash", KUBE_SH, "down", dir])
    shutil.rmtree(dir, ignore_errors=True)
    log(f"cluster in {dir} (scripts/kube.sh up)")
    subprocess.run(["bash", KUBE_SH, "up", dir, "--hermes", args.hermes], check=True)
    try:
        cluster = Cluster(dir)
        gateway, reg_port = cluster.env["REGISTRY"].rsplit(":", 1)
        proxy_port = stack.free_port()
        proxy = ThrottleProxy(proxy_port, (gateway, int(reg_port)), args.rate_mbps * 1e6,
                              listen_host=gateway).start_thread()
        proxy_host = f"{gateway}:{proxy_port}"
        hosts = os.path.join(dir, "containerd", "certs.d", proxy_host)
        os.makedirs(hosts)
        with open(os.path.join(hosts, "hosts.toml"), "w") as f:
            f.write(f'server = "http://{proxy_host}"\n[host."http://{proxy_host}"]\n  capabilities = ["pull", "resolve"]\n')
        log(f"pushing {layout_dir} ({compressed / 2**20:.0f} MiB compressed)")
        stack.push(layout_dir, "v1", f"{cluster.env['REGISTRY']}/bench/{name}:v1")
        repo = f"{proxy_host}/bench/{name}"
        ref = f"{repo}:v1"
        # Every layer indexed: containerd 1.6 fetches all layers after the first one that is not
        # mounted remotely (see deploy/README.md).
        cluster.kubectl(["apply", "-f", "-"], input=json.dumps({
            "apiVersion": "hermes.dev/v1alpha1", "kind": "HermesPolicy", "metadata": {"name": "bench"},
            "spec": {"images": [f"{repo}:*"], "mode": "Lazy", "index": {"minLayerSize": "0"}}}))
        config_digest, command = image_config(layout_dir)

        before = cluster.committed_snapshots()
        log("normal: first pod of the image (no index yet)")
        normal = start_pod(cluster, "normal", ref, command, proxy)
        layer_snapshots = cluster.committed_snapshots() - before
        log("waiting for the controller to index the image (pod watch -> HermesImage Ready)")
        t = time.monotonic()

        def ready():
            items = cluster.json(["get", "hermesimages"])["items"]
            return any(i["spec"]["image"].startswith(repo) and i.get("status", {}).get("phase") == "Ready"
                       for i in items)
        stack.wait_for("HermesImage Ready", ready, 1800)
        index_s = time.monotonic() - t
        cluster.kubectl(["-n", "default", "delete", "pod", "normal", "--grace-period=0", "--force"])
        cluster.remove_image(repo, config_digest, layer_snapshots)
        lazy0 = cluster.metric("hermes_node_lazy_mounts_total")
        log("hermes: second pod of the image, removed from the node first")
        hermes = start_pod(cluster, "hermes", ref, command, proxy)
        lazy = cluster.metric("hermes_node_lazy_mounts_total") - lazy0
        cluster.kubectl(["-n", "default", "delete", "pod", "hermes", "--grace-period=0", "--force"])

        ratio = normal["first_line_s"] / hermes["first_line_s"]
        ratio_ready = normal["ready_s"] / hermes["ready_s"]
        print(f"\nPod start through the kubelet, {meta['description']}, {compressed / 2**20:.0f} MiB compressed, "
              f"registry at {args.rate_mbps:g} MB/s (created -> container started -> first line -> ready):")
        for label, r in (("normal", normal), ("hermes", hermes)):
            print(f"  {label:7} started {r['started_s']:6.1f} s  first line {r['first_line_s']:6.2f} s  "
                  f"ready {r['ready_s']:6.2f} s  registry bytes to first line {r['bytes_first_line'] / 2**20:7.1f} MiB, "
                  f"to ready {r['bytes_ready'] / 2**20:7.1f} MiB")
        print(f"  lazy mounts {lazy:.0f}; index built {index_s:.0f} s after the first start")
        print(f"  to first line: ({ratio:.1f}x)  to ready: ({ratio_ready:.1f}x)")
        if args.check and ratio <= 1.0:
            print("FAIL: the Hermes start is not faster than the normal path", file=sys.stderr)
            return 1
        return 0
    finally:
        if args.keep:
            log(f"--keep: cluster left running; scripts/kube.sh down {dir}")
        else:
            subprocess.run(["bash", KUBE_SH, "down", dir])


if __name__ == "__main__":
    sys.exit(main())
