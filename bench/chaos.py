#!/usr/bin/env python3
"""Chaos soak: container starts through containerd's CRI with Hermes lazy layers while the
registry path fails at random, the node daemon is killed and the controller restarted.

One machine, real parts: a docker-registry; the testkit's fault proxy in front of it
(`fault-proxy`, seeded random drops, resets, stalls, 5xx, 429, truncations and corrupted bytes on
the node's registry requests); `hermes controller --standalone` with a policy that indexes the
test image; `hermes node` as containerd's `hermes` snapshotter, asking the controller for zTOCs;
a containerd with the CRI plugin. containerd itself reaches the registry directly (its
`hosts.toml` maps the proxy's address to the registry), so every injected fault hits Hermes only:
any failed start is Hermes's.

The test image's entrypoint prints the SHA-256 of a set of whole files, of byte ranges of others
(read with `dd`, so spans are entered in the middle) and the size, mode, type and mtime of every
file. Its output through containerd's normal path (overlayfs, `ctr run`) is the reference.

Then: one priming start (no faults; the node has no zTOC yet, falls back and reports the miss, the
controller builds the index), then N starts, each a kubelet's (`PullImage`, `RunPodSandbox`,
`CreateContainer`, `StartContainer`, wait for the exit), each followed by `RemoveImage` and a wait
until containerd has removed the image's snapshots, so that every start pulls afresh and mounts
its layers lazily again. In the middle third (starts chosen from the seed) the node daemon is
killed with SIGKILL and restarted at once, as its supervisor would, once during a pull (while
containerd prepares snapshots) and once while a container reads its lazy layers; the controller
is, during a third start's pull (while the node asks it for zTOCs).

For each start: lazy or fallback (lazy layers the node serves once the container has exited),
whether it started and exited 0, whether its output equals the reference, the faults injected,
and its times from `PullImage` (process running, process exited). A start that fails, or whose
output differs from the reference, fails the run. The start during which the node is killed may
be retried after a kubelet's back-off (10 s, then 20 s), as a kubelet would retry it
(containerd's snapshotter is briefly gone); the report says whether it was.
"""
import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
from stack import http_get, log  # noqa: E402

CRI_NAMESPACE = "k8s.io"
# A kubelet's back-off between attempts to start a container whose image pull failed (seconds).
KUBELET_BACKOFF = (10, 20)
REF_NAMESPACE = "chaos-ref"
BUSYBOX_TOOLS = ("sh", "cat", "echo", "find", "sort", "xargs", "sha256sum", "dd", "stat", "sleep", "printf")

CHECK_SCRIPT = b"""#!/bin/sh
# What the container reads: whole files, byte ranges of others, metadata of all.
echo started
cd /data
while read -r f; do sha256sum "$f"; done < /data/whole.list
while read -r f skip count; do
  printf '%s %s+%s ' "$f" "$skip" "$count"
  dd if="$f" bs=4096 skip="$skip" count="$count" 2>/dev/null | sha256sum
done < /data/ranges.list
find /data -type f -o -type l | sort | xargs stat -c '%n %s %a %F %Y'
echo done
"""


# --------------------------------------------------------------------------------------------
# The test image


def busybox_entries():
    bb = "/bin/busybox"
    if not os.path.exists(bb):
        sys.exit("busybox-static is required: run scripts/install-deps.sh")
    entries = [("bin", "dir", None, 0o755), ("bin/busybox", "file", open(bb, "rb").read(), 0o755),
               ("tmp", "dir", None, 0o1777), ("etc", "dir", None, 0o755),
               ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)]
    entries += [(f"bin/{tool}", "symlink", "busybox", 0o777) for tool in BUSYBOX_TOOLS]
    return entries


def data_entries(rng: random.Random, layer: int, mib: int):
    """Files under data/lN: half text-like (compressible), half random; sizes from 1 byte to
    6 MiB, a few exactly on power-of-two boundaries; plus a symlink. Returns (entries, paths)."""
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    base = f"data/l{layer}"
    entries = [("data", "dir", None, 0o755), (base, "dir", None, 0o755)]
    paths, total, n = [], 0, 0
    while total < mib << 20:
        n += 1
        if n % 7 == 0:
            size = 1 << rng.randint(12, 22)
        else:
            size = min(int(rng.lognormvariate(11, 2.2)), 6 << 20) + 1
        if rng.random() < 0.5:
            out = bytearray()
            while len(out) < size:
                out += b" ".join(rng.choice(words) for _ in range(64)) + b"\n"
            data = bytes(out[:size])
        else:
            data = rng.randbytes(size)
        sub = f"{base}/d{n % 5}"
        entries.append((sub, "dir", None, 0o755))
        path = f"{sub}/f{n:04d}.{'txt' if data[:1].isalpha() else 'bin'}"
        entries.append((path, "file", data, rng.choice([0o644, 0o755, 0o600])))
        paths.append((path, size))
        total += size
    entries.append((f"{base}/link", "symlink", f"d1/f{1:04d}", 0o777))
    return dedup(entries), paths


def dedup(entries):
    seen, out = set(), []
    for e in entries:
        if e[1] == "dir":
            if e[0] in seen:
                continue
            seen.add(e[0])
        out.append(e)
    return out


def build_image(layout_dir: str, seed: int) -> dict:
    """busybox + three data layers (~24, ~40 and ~16 MiB) + the check script and its lists."""
    meta_path = os.path.join(layout_dir, "meta.json")
    if stack.Layout.done(layout_dir) and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("seed") == seed:
            return meta
    shutil.rmtree(layout_dir, ignore_errors=True)
    rng = random.Random(seed)
    layout = stack.Layout(layout_dir)
    layout.add_layer(stack.image_tar_writer(busybox_entries()))
    paths = []
    for layer, mib in ((1, 24), (2, 40), (3, 16)):
        entries, p = data_entries(rng, layer, mib)
        layout.add_layer(stack.image_tar_writer(entries))
        paths += p
    rng.shuffle(paths)
    whole = sorted(p for p, _ in paths[: len(paths) // 3])
    ranges = []
    for path, size in paths[len(paths) // 3:]:
        blocks = max(size // 4096, 1)
        if blocks < 4:
            continue
        for _ in range(2):
            skip = rng.randrange(blocks)
            ranges.append(f"{path[len('data/'):]} {skip} {rng.randint(1, min(64, blocks - skip))}")
    lists = [("data", "dir", None, 0o755),
             ("data/whole.list", "file", "".join(p[len("data/"):] + "\n" for p in whole).encode(), 0o644),
             ("data/ranges.list", "file", "".join(r + "\n" for r in ranges).encode(), 0o644),
             ("check.sh", "file", CHECK_SCRIPT, 0o755)]
    layout.add_layer(stack.image_tar_writer(lists))
    layout.finish("v1", ["/bin/sh", "/check.sh"], ["PATH=/bin"])
    meta = {"seed": seed, "layers": len(layout.layers), "files": len(paths), "whole_files": len(whole),
            "ranges": len(ranges), "uncompressed_mib": round(sum(s for _, s in paths) / 2**20)}
    json.dump(meta, open(meta_path, "w"))
    return meta


def pause_image(layout_dir: str) -> None:
    """The pod sandbox image: busybox sleeping. Its layer differs from the test image's first one:
    a shared layer would be unpacked once, with the sandbox, and never mounted lazily."""
    marker = os.path.join(layout_dir, "hostname-layer")
    if stack.Layout.done(layout_dir) and os.path.exists(marker):
        return
    shutil.rmtree(layout_dir, ignore_errors=True)
    layout = stack.Layout(layout_dir)
    layout.add_layer(stack.image_tar_writer(busybox_entries() + [("etc/hostname", "file", b"pause\n", 0o644)]))
    open(marker, "w").close()
    layout.finish("v1", ["/bin/sleep", "100000"], ["PATH=/bin"])


def manifest_digest(layout_dir: str) -> str:
    with open(os.path.join(layout_dir, "index.json")) as f:
        return json.load(f)["manifests"][0]["digest"]


# --------------------------------------------------------------------------------------------
# The parts


def containerd_cri_config(dir: str, node_socket: str, sandbox: str, hosts: str) -> str:
    return f"""version = 2
root = "{dir}/root"
state = "{dir}/state"
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "hermes"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{dir}/cni/bin"
  conf_dir = "{dir}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{hosts}"
[proxy_plugins.hermes]
  type = "snapshot"
  address = "{node_socket}"
"""


def write_hosts(hosts: str, name: str, server: str) -> None:
    """containerd's hosts.toml: pull NAME's images from SERVER (plain HTTP)."""
    os.makedirs(os.path.join(hosts, name), exist_ok=True)
    with open(os.path.join(hosts, name, "hosts.toml"), "w") as f:
        f.write(f'server = "http://{server}"\n\n[host."http://{server}"]\n  capabilities = ["pull", "resolve"]\n')


class CriContainerd(stack.Containerd):
    """containerd with the CRI plugin and Hermes as its snapshotter."""

    def __init__(self, procs, dir, node_socket, sandbox, hosts):
        super().__init__(procs, dir, node_socket)
        self.sandbox, self.hosts = sandbox, hosts

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(containerd_cri_config(self.dir, self.node_socket, self.sandbox, self.hosts))
        p = self.procs.start("containerd", ["containerd", "--config", config])
        logfile = self.procs.logfile("containerd")
        stack.wait_for("containerd's CRI plugin", lambda: "Start streaming server" in open(logfile).read()
                       and self.ctr(["version"], check=False).returncode == 0, 60, p, logfile)

    def hermes_snapshots(self) -> list:
        out = self.ctr(["snapshots", "--snapshotter", "hermes", "ls"], check=False, namespace=CRI_NAMESPACE)
        return out.stdout.decode().splitlines()[1:]

    def stop(self) -> None:
        stack.kill_shims(self.address)
        self.procs.stop("containerd")
        stack.unmount_under(self.dir)


class FaultProxy:
    """The testkit's `fault-proxy` process, driven on its stdin."""

    def __init__(self, binary: str, upstream: str, rate: float, max_stall_ms: int, logfile: str):
        self.p = subprocess.Popen([binary, "--upstream", upstream, "--rate", str(rate),
                                   "--max-stall-ms", str(max_stall_ms)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logfile, "ab"),
                                  text=True, bufsize=1)
        first = self.p.stdout.readline()
        if not first:
            raise RuntimeError(f"fault-proxy did not start; see {logfile}")
        self.host = json.loads(first)["listening"]
        self.lock = threading.Lock()

    def cmd(self, line: str) -> dict:
        with self.lock:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
            answer = json.loads(self.p.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"fault-proxy: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Controller:
    """`hermes controller --standalone` on a fixed port (so that a restart keeps its URL)."""

    def __init__(self, procs, hermes, dir, port, containerd_address, pattern):
        self.procs, self.hermes, self.dir, self.port = procs, hermes, dir, port
        self.containerd_address = containerd_address
        self.url = f"http://127.0.0.1:{port}"
        os.makedirs(os.path.join(dir, "policies"), exist_ok=True)
        with open(os.path.join(dir, "policies", "chaos.yaml"), "w") as f:
            f.write(f"""apiVersion: hermes.dev/v1alpha1
kind: HermesPolicy
metadata:
  name: chaos
spec:
  images: ["{pattern}"]
  mode: Lazy
  index:
    minLayerSize: 0
    spanSize: 1Mi
""")

    def start(self) -> None:
        p = self.procs.start("controller", [
            self.hermes, "controller", "--standalone", "--policies", os.path.join(self.dir, "policies"),
            "--data", os.path.join(self.dir, "data"), "--listen", f"127.0.0.1:{self.port}",
            "--containerd", self.containerd_address, "--namespace", CRI_NAMESPACE, "--plain-http",
            "--retry-backoff", "1s"], env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        stack.wait_for("hermes controller", lambda: http_get(self.url + "/healthz") is not None, 60, p,
                       self.procs.logfile("controller"))

    def images(self) -> list:
        body = http_get(self.url + "/v1/images")
        return json.loads(body) if body else []


def kill9_and_restart(procs: stack.Procs, name: str, restart) -> float:
    """SIGKILL process NAME, reap it, start it again at once (its supervisor's job); returns the
    seconds it was down."""
    p = procs.children.pop(name)
    t = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    restart()
    return round(time.monotonic() - t, 2)


# --------------------------------------------------------------------------------------------
# The soak


class Soak:
    def __init__(self, args, hermes, cri_bin, procs, state, node, containerd, controller, proxy, ref,
                 app_layers, reference):
        self.args, self.hermes, self.cri_bin, self.procs, self.state = args, hermes, cri_bin, procs, state
        self.node, self.containerd, self.controller, self.proxy = node, containerd, controller, proxy
        self.ref, self.app_layers, self.reference = ref, app_layers, reference
        self.log_dir = os.path.join(state, "pod-logs")
        self.baseline_snapshots = None
        self.events = []

    def cri(self, args: list, timeout: float) -> dict:
        try:
            r = subprocess.run([self.cri_bin, "--address", self.containerd.address] + args,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "failed_step": "timeout", "error": f"cri {args[0]} hung for {timeout:.0f}s"}
        try:
            return json.loads(r.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"ok": False, "failed_step": "cri", "error": r.stderr.decode(errors="replace")[-2000:]}

    def node_metrics(self) -> dict:
        try:
            return self.node.metrics()
        except OSError:
            return {}

    def lazy_layers_served(self) -> int:
        m = self.node_metrics()
        return int(sum(m.get(f'hermes_node_layers{{state="{s}"}}', 0) for s in ("lazy", "fully_local", "broken")))

    def start_once(self, name: str) -> dict:
        shutil.rmtree(os.path.join(self.log_dir, name), ignore_errors=True)
        return self.cri(["start", "--image", self.ref, "--pod", name, "--log-dir",
                         os.path.join(self.log_dir, name), "--timeout-secs", str(self.args.start_timeout)],
                        self.args.start_timeout + 60)

    def layer_logs(self, name: str) -> dict:
        """Copies the lazy layers' server logs (they go with the layers) to logs/layers/NAME/ and
        counts what they report: spans that failed verification, layers marked broken, retried
        registry requests."""
        layers = os.path.join(self.node.root, "layers")
        dest = os.path.join(self.procs.log_dir, "layers", name)
        counts = {"verify_failures": 0, "broken": 0, "retries": 0}
        for d in sorted(os.listdir(layers)) if os.path.isdir(layers) else []:
            try:
                text = open(os.path.join(layers, d, "serve.log"), errors="replace").read()
            except OSError:
                continue
            os.makedirs(dest, exist_ok=True)
            with open(os.path.join(dest, d[:16] + ".log"), "w") as f:
                f.write(text)
            counts["verify_failures"] += text.count("span failed verification")
            counts["broken"] += text.count("layer marked broken")
            counts["retries"] += text.count("retrying")
        return counts

    def wait_snapshotter_reachable(self) -> float:
        """Seconds until containerd answers a snapshot listing of the hermes snapshotter (at
        most 120)."""
        t = time.monotonic()
        while time.monotonic() - t < 120:
            r = self.containerd.ctr(["snapshots", "--snapshotter", "hermes", "ls"], check=False, namespace=CRI_NAMESPACE)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        return round(time.monotonic() - t, 2)

    def remove_image(self) -> dict:
        """RemoveImage, then wait until containerd has removed the image's snapshots (back to the
        sandbox image's) and the node serves no lazy layer. If the node still serves some after
        10 s, containerd's garbage collection ran while the node was down (it does not retry:
        the layers wait for its next run over the hermes snapshotter, which the removal of any
        of its snapshots triggers): trigger one, and say so."""
        t = time.monotonic()
        r = self.cri(["remove-image", self.ref], 120)
        if not r.get("ok"):
            return {"ok": False, "error": f"RemoveImage: {r.get('error')}"}
        forced = False
        while True:
            snaps = len(self.containerd.hermes_snapshots())
            served = self.lazy_layers_served()
            waited = time.monotonic() - t
            if (self.baseline_snapshots is None or snaps <= self.baseline_snapshots) and served == 0:
                return {"ok": True, "s": round(waited, 2), "forced_gc": forced}
            if waited > 60:
                return {"ok": False, "forced_gc": forced,
                        "error": f"60 s after RemoveImage: {snaps} hermes snapshots "
                                 f"(baseline {self.baseline_snapshots}), {served} lazy layers served"}
            if waited > 10 and not forced:
                self.force_gc()
                forced = True
            time.sleep(0.1)

    def force_gc(self) -> None:
        """Make containerd collect the hermes snapshotter's garbage: it walks a snapshotter's
        snapshots only after one of its snapshots was removed, so prepare and remove one."""
        key = f"chaos-gc-{time.monotonic_ns()}"
        self.containerd.ctr(["snapshots", "--snapshotter", "hermes", "prepare", key], namespace=CRI_NAMESPACE)
        self.containerd.ctr(["snapshots", "--snapshotter", "hermes", "rm", key], namespace=CRI_NAMESPACE)

    def prime(self) -> dict:
        """A start without faults: no zTOC yet, so the node falls back and reports the miss; the
        controller builds the index. Waits until the controller has it."""
        self.proxy.cmd("off")
        t = time.monotonic()
        r = self.start_once("prime")
        if not r.get("ok") or r.get("exit_code") != 0:
            raise RuntimeError(f"priming start failed: {r}")
        digest = self.args.manifest_digest
        stack.wait_for("the controller's index of the image",
                       lambda: any(i.get("digest") == digest and i.get("phase") == "Ready"
                                   for i in self.controller.images()),
                       300, self.procs.children.get("controller"), self.procs.logfile("controller"))
        built = round(time.monotonic() - t, 1)
        cleanup = self.remove_image()
        if not cleanup["ok"]:
            raise RuntimeError(f"after the priming start: {cleanup['error']}")
        self.baseline_snapshots = len(self.containerd.hermes_snapshots())
        return {"output_matches": r.get("lines") == self.reference, "indexed_after_s": built}

    def chaos_event(self, what: str, delay: float, start: int) -> threading.Thread:
        """In DELAY seconds, kill -9 and restart WHAT (node | controller) in the background."""
        def run():
            time.sleep(delay)
            if what == "node":
                down = kill9_and_restart(self.procs, "node", self.node.start)
            else:
                down = kill9_and_restart(self.procs, "controller", self.controller.start)
            self.events.append({"what": what, "start": start, "after_s": round(delay, 2), "down_s": down})
            log(f"  {what} killed with SIGKILL {delay:.2f}s into the start, back after {down}s")
        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th

    def one(self, i: int, rng: random.Random, kill) -> dict:
        """Start I with fresh faults; KILL is None or (what, (earliest, latest) seconds into the
        start)."""
        seed = rng.randrange(1 << 62)
        self.proxy.cmd(f"on {seed}")
        before = self.node_metrics()
        event = None
        kill_node = kill is not None and kill[0] == "node"
        if kill:
            event = self.chaos_event(kill[0], rng.uniform(*kill[1]), i)
        r = self.start_once(f"start-{i}")
        attempts = [r]
        if event:
            event.join()
        for backoff in KUBELET_BACKOFF if kill_node else ():
            if r.get("ok") and r.get("exit_code") == 0:
                break
            # The snapshotter was gone for a moment: a kubelet retries the start after its
            # back-off. Sooner, containerd may not even reach the node again (its connection backs
            # off), and its garbage collection of the failed pull's lease races the retry's pull
            # (seen: "parent snapshot ... does not exist" from containerd's metadata).
            failed_at = time.monotonic()
            waited = self.wait_snapshotter_reachable()
            time.sleep(max(0.0, backoff - (time.monotonic() - failed_at)))
            log(f"  start {i} failed while the node was down ({r.get('failed_step')}); containerd "
                f"reached the node again {waited}s later; retrying after {backoff}s, as a kubelet would")
            r = self.start_once(f"start-{i}-retry{len(attempts)}")
            attempts.append(r)
        served = self.lazy_layers_served()
        after = self.node_metrics()
        faults = self.proxy.cmd("stats")
        layer_logs = self.layer_logs(f"start-{i}")
        rec = {"start": i, "fault_seed": seed, "attempts": len(attempts),
               "ok": bool(r.get("ok")) and r.get("exit_code") == 0,
               "exit_code": r.get("exit_code"), "failed_step": r.get("failed_step"), "error": r.get("error"),
               "earlier_attempt_errors": [a.get("error") for a in attempts[:-1]],
               "output_matches": r.get("lines") == self.reference if r.get("ok") else None,
               "lazy_layers": served, "pulled_s": r.get("pulled_s"), "running_s": r.get("running_s"),
               "exited_s": r.get("exited_s"), "requests": faults["requests"], "faults": faults["faults"],
               "range_requests": faults["range_requests"], "faults_on_ranges": faults["faults_on_ranges"],
               **layer_logs,
               "node_restarted": kill_node, "controller_restarted": kill is not None and not kill_node}
        rec["mode"] = "lazy" if served == self.app_layers else "fallback" if served == 0 else "partial"
        if not kill_node and before and after:
            rec["fallbacks"] = {k.split('"')[1]: after[k] - before.get(k, 0) for k in after
                                if k.startswith("hermes_node_fallbacks_total") and after[k] > before.get(k, 0)}
        if rec["ok"] and not rec["output_matches"]:
            got = r.get("lines") or []
            rec["diff"] = diff(self.reference, got)
            rec["wrong_byte_lines"] = wrong_bytes(self.reference, got)
            rec["output"] = got
        cleanup = self.remove_image()
        rec["cleanup_s"] = cleanup.get("s")
        rec["forced_gc"] = cleanup.get("forced_gc", False)
        if not cleanup["ok"]:
            rec["cleanup_error"] = cleanup["error"]
        return rec


def diff(expected: list, got: list) -> list:
    """The first few lines that differ, as (line number, expected, got)."""
    out = []
    for n in range(max(len(expected), len(got))):
        e = expected[n] if n < len(expected) else None
        g = got[n] if n < len(got) else None
        if e != g:
            out.append([n, e, g])
            if len(out) == 5:
                break
    return out


def wrong_bytes(expected: list, got: list) -> list:
    """Output lines that are in no line of the reference and report no read error: a hash, size
    or mode that came out different, i.e. bytes that were read but are not the image's."""
    reference = set(expected)
    errors = ("error", "can't", "No such file")
    return [g for g in got if g not in reference and not any(e in g for e in errors)]


def percentile(values: list, p: float):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return round(v[lo] + (v[hi] - v[lo]) * (k - lo), 2)


def summarize(starts: list) -> dict:
    ok = [s for s in starts if s["ok"]]
    faults = {}
    for s in starts:
        for k, v in s["faults"].items():
            faults[k] = faults.get(k, 0) + v
    return {
        "starts": len(starts),
        "started": len(ok),
        "lazy": sum(s["mode"] == "lazy" for s in starts),
        "fallback": sum(s["mode"] == "fallback" for s in starts),
        "partial": sum(s["mode"] == "partial" for s in starts),
        "wrong_outputs": sum(s["output_matches"] is False for s in starts),
        "wrong_bytes": sum(bool(s.get("wrong_byte_lines")) for s in starts),
        "failed_starts": len(starts) - len(ok),
        "retried_starts": sum(s["attempts"] > 1 for s in starts),
        "cleanup_errors": sum("cleanup_error" in s for s in starts),
        "forced_gcs": sum(s["forced_gc"] for s in starts),
        "registry_requests": sum(s["requests"] for s in starts),
        "faults": dict(sorted(faults.items())),
        "corrupt_on_ranges": sum(s["faults_on_ranges"].get("corrupt", 0) for s in starts),
        "verify_failures": sum(s["verify_failures"] for s in starts),
        "broken_layers": sum(s["broken"] for s in starts),
        "retried_requests": sum(s["retries"] for s in starts),
        "running_s": {"p50": percentile([s["running_s"] for s in ok], 50),
                      "p99": percentile([s["running_s"] for s in ok], 99),
                      "max": max((s["running_s"] for s in ok), default=None)},
        "exited_s": {"p50": percentile([s["exited_s"] for s in ok], 50),
                     "p99": percentile([s["exited_s"] for s in ok], 99),
                     "max": max((s["exited_s"] for s in ok), default=None)},
    }


def markdown(rep: dict) -> str:
    s = rep["summary"]
    f = ", ".join(f"{v} {k}" for k, v in s["faults"].items()) or "none"
    ev = "; ".join(f"{e['what']} SIGKILLed {e['after_s']} s into start {e['start']}, back after {e['down_s']} s"
                   for e in rep["events"])
    lines = [
        f"Chaos soak: {s['starts']} container starts through containerd's CRI with Hermes lazy layers; "
        f"seed {rep['seed']}, fault rate {rep['fault_rate']:g} on the node's registry requests "
        f"(stalls up to {rep['max_stall_ms']} ms); {ev}.", "",
        "| | |", "|---|---:|",
        f"| starts | {s['starts']} |",
        f"| started and exited 0 | {s['started']} |",
        f"| lazy / fallback / partly lazy | {s['lazy']} / {s['fallback']} / {s['partial']} |",
        f"| **starts that read wrong bytes (a hash, size or mode unlike the normal path's)** | "
        f"**{s['wrong_bytes']}** |",
        f"| **starts whose output differs from the normal path's (wrong bytes or read errors)** | "
        f"**{s['wrong_outputs']}** |",
        f"| **failed starts (all Hermes's: containerd's own registry path had no faults)** | **{s['failed_starts']}** |",
        f"| starts retried after the node's SIGKILL, after a kubelet's back-off (their times are the last "
        f"attempt's) | {s['retried_starts']} |",
        f"| running (process started), from PullImage: p50 / p99 / max s | "
        f"{fmt(s['running_s']['p50'])} / {fmt(s['running_s']['p99'])} / {fmt(s['running_s']['max'])} |",
        f"| exited (all checks read), from PullImage: p50 / p99 / max s | "
        f"{fmt(s['exited_s']['p50'])} / {fmt(s['exited_s']['p99'])} / {fmt(s['exited_s']['max'])} |",
        f"| node registry requests / faults injected | {s['registry_requests']} / {sum(s['faults'].values())} |",
        f"| faults by kind | {f} |",
        f"| corrupted range reads / spans that failed verification (node's count) | "
        f"{s['corrupt_on_ranges']} / {s['verify_failures']} |",
        f"| lazy layers marked broken | {s['broken_layers']} |",
        f"| registry requests the layer servers retried | {s['retried_requests']} |",
        f"| cleanups that needed a forced containerd GC (its GC had run while the node was down) | "
        f"{s['forced_gcs']} |",
        f"| cleanups that did not finish (image's snapshots or lazy layers left after 60 s) | "
        f"{s['cleanup_errors']} |",
        "",
        f"Image: busybox + 3 data layers + the check script ({rep['image']['files']} files, "
        f"{rep['image']['uncompressed_mib']} MiB); the container hashes {rep['image']['whole_files']} whole files "
        f"and {rep['image']['ranges']} ranges and stats every file; its output is compared line by line with "
        f"the normal path's (`ctr run`, overlayfs). Index: built by the controller after a priming start "
        f"(span size 1 MiB). Each start pulls afresh (RemoveImage and containerd's GC in between). "
        f"The node's zTOC lookups go to the controller; background fetch and record-and-replay are on.",
        f"Node-side counts (verification failures, broken layers, retries) come from the layer servers' logs "
        f"when each container has exited; the background fetch goes on a little after that.",
        f"Produced by `{rep.get('command', 'bash bench/chaos.sh')}` in {rep['soak_s']:.0f} s of starts; "
        f"Hermes: {rep['hermes_build']} build. Machine: {rep['machine']}; {rep['date']}.",
    ]
    bad = [x for x in rep["starts"] if not x["ok"] or x["output_matches"] is False or "cleanup_error" in x]
    if bad:
        lines += ["", "Starts with problems:", ""]
        for x in bad:
            lines.append(f"- start {x['start']}: " + json.dumps({k: x.get(k) for k in (
                "failed_step", "error", "earlier_attempt_errors", "diff", "wrong_byte_lines", "cleanup_error", "mode",
                "broken", "faults", "fault_seed")}))
    return "\n".join(lines) + "\n"


def fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hermes", required=True)
    ap.add_argument("--fault-proxy", required=True, help="the testkit's fault-proxy binary")
    ap.add_argument("--cri", required=True, help="hermes-containerd's cri example binary")
    ap.add_argument("--hermes-build", default="", help="how the binaries were built, for the report")
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--fault-rate", type=float, default=0.1,
                    help="probability that one of the node's registry requests gets a fault")
    ap.add_argument("--max-stall-ms", type=int, default=2000)
    ap.add_argument("--start-timeout", type=int, default=180, help="seconds before a start counts as hung")
    ap.add_argument("--work", default="/var/tmp/hermes-chaos")
    ap.add_argument("--write-results", default="", help="write bench/results/NAME.{md,json}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (containerd, FUSE, overlayfs)")
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc", "pigz"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required: run scripts/install-deps.sh")
    if args.starts < 6:
        sys.exit("--starts must be at least 6 (the node and the controller are killed in the middle third)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    log(f"seed {seed} (rerun with --seed {seed})")
    rng = random.Random(seed)
    hermes = os.path.abspath(args.hermes)

    state = os.path.join(args.work, "run")
    stack.unmount_all(hermes, os.path.join(state, "node"))
    stack.unmount_under(state)
    shutil.rmtree(state, ignore_errors=True)
    procs = stack.Procs(state, os.path.join(state, "logs"))
    log(f"work dir {args.work}; logs in {state}/logs")
    node = containerd = proxy = None
    try:
        app_dir = os.path.join(args.work, "images", "app")
        pause_dir = os.path.join(args.work, "images", "pause")
        meta = build_image(app_dir, 1)
        pause_image(pause_dir)
        args.manifest_digest = manifest_digest(app_dir)

        reg_port = stack.free_port()
        registry = f"127.0.0.1:{reg_port}"
        stack.start_registry(procs, os.path.join(state, "registry"), reg_port)
        stack.push(app_dir, "v1", f"{registry}/chaos/app:v1")
        stack.push(pause_dir, "v1", f"{registry}/chaos/pause:v1")
        proxy = FaultProxy(os.path.abspath(args.fault_proxy), registry, args.fault_rate, args.max_stall_ms,
                           procs.logfile("fault-proxy"))
        ref = f"{proxy.host}/chaos/app:v1"
        log(f"registry {registry}, fault proxy {proxy.host}; image {ref} ({meta['layers']} layers)")

        hosts = os.path.join(state, "hosts")
        write_hosts(hosts, registry, registry)
        write_hosts(hosts, proxy.host, registry)  # containerd bypasses the faults
        node = stack.Node(procs, hermes, os.path.join(state, "node"), os.path.join(state, "hermes.sock"))
        containerd = CriContainerd(procs, os.path.join(state, "containerd"), node.socket,
                                   f"{registry}/chaos/pause:v1", hosts)
        controller = Controller(procs, hermes, os.path.join(state, "controller"), stack.free_port(),
                                containerd.address, "*/chaos/app")
        node.extra = ["--controller", controller.url]
        controller.start()
        node.start()
        containerd.start()

        # The reference: containerd's normal path, in its own namespace.
        direct = f"{registry}/chaos/app:v1"
        containerd.ctr(["images", "pull", "--plain-http", direct], namespace=REF_NAMESPACE)
        out = containerd.ctr(["run", "--rm", "--snapshotter", "overlayfs", direct, "reference"], namespace=REF_NAMESPACE)
        reference = out.stdout.decode().splitlines()
        if not reference or reference[-1] != "done":
            raise RuntimeError(f"the reference run did not finish: {reference[-5:]}")
        log(f"reference output through the normal path: {len(reference)} lines")

        soak = Soak(args, hermes, os.path.abspath(args.cri), procs, state, node, containerd, controller, proxy,
                    ref, meta["layers"], reference)
        primed = soak.prime()
        log(f"priming start done, index Ready {primed['indexed_after_s']}s after it began")

        third = max(args.starts // 3, 1)
        # In the middle third: the node killed during a pull (containerd's Prepare calls and
        # the node's zTOC lookups take the first ~0.5 s) and again while a container reads its
        # lazy layers, the controller killed during a pull (when the node asks it for zTOCs).
        middle = rng.sample(range(third, 2 * third + 1), 3)
        kills = {middle[0]: ("node", (0.05, 0.4)), middle[1]: ("node", (1.0, 2.0)),
                 middle[2]: ("controller", (0.05, 0.4))}
        log(f"{args.starts} starts; SIGKILL of " + ", ".join(
            f"the {what} {lo:g}-{hi:g}s into start {i}" for i, (what, (lo, hi)) in sorted(kills.items())))
        starts = []
        t_soak = time.monotonic()
        for i in range(args.starts):
            rec = soak.one(i, rng, kills.get(i))
            starts.append(rec)
            flag = "" if rec["ok"] and rec["output_matches"] else "  <-- PROBLEM"
            log(f"start {i}: {'ok' if rec['ok'] else 'FAILED ' + str(rec['failed_step'])}, "
                f"{rec['mode']} ({rec['lazy_layers']}/{meta['layers']} layers), "
                f"output {'matches' if rec['output_matches'] else 'DIFFERS' if rec['output_matches'] is False else '-'}, "
                f"running {fmt(rec['running_s'])}s exited {fmt(rec['exited_s'])}s, "
                f"{sum(rec['faults'].values())} faults in {rec['requests']} requests{flag}")
        soak_s = round(time.monotonic() - t_soak, 1)

        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.machine())
        # The command a user runs: bench/chaos.sh passes the binaries itself.
        hidden = ("--hermes", "--fault-proxy", "--cri", "--hermes-build")
        shown = [a for i, a in enumerate(sys.argv[1:]) if a not in hidden and sys.argv[i] not in hidden]
        report = {"command": " ".join(["bash bench/chaos.sh"] + shown),
                  "seed": seed, "fault_rate": args.fault_rate, "max_stall_ms": args.max_stall_ms,
                  "image": meta, "prime": primed, "events": soak.events, "soak_s": soak_s,
                  "hermes_build": args.hermes_build or os.path.basename(os.path.dirname(hermes)),
                  "machine": f"{cpu}, {os.cpu_count()} cores, kernel {platform.release()}",
                  "date": time.strftime("%Y-%m-%d"), "summary": summarize(starts), "starts": starts}
        text = markdown(report)
        print(text)
        if args.write_results:
            os.makedirs("bench/results", exist_ok=True)
            base = f"bench/results/{args.write_results}"
            with open(base + ".md", "w") as f:
                f.write(text)
            with open(base + ".json", "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
            log(f"wrote {base}.md and {base}.json")
        s = report["summary"]
        if s["failed_starts"] or s["wrong_outputs"] or not primed["output_matches"]:
            print(f"FAIL: {s['failed_starts']} failed starts, {s['wrong_outputs']} wrong outputs "
                  f"({s['wrong_bytes']} with wrong bytes) "
                  f"(priming start's output {'matches' if primed['output_matches'] else 'DIFFERS'}); "
                  f"logs in {state}/logs")
            return 1
        print(f"OK: {s['starts']} starts, {s['lazy']} lazy, {s['fallback']} fallback, 0 wrong outputs, "
              f"0 failed starts; seed {seed}")
        return 0
    finally:
        if containerd:
            for namespace in (CRI_NAMESPACE, REF_NAMESPACE):
                containerd.remove_all(namespace)
            containerd.stop()
        if node:
            node.stop()
        if proxy:
            proxy.close()
        for name in list(procs.children):
            procs.stop(name)
        stack.unmount_under(state)
        if not stack.mounts_under(state):  # keep the logs, free the disk
            for sub in ("registry", "node", "containerd", "controller"):
                shutil.rmtree(os.path.join(state, sub), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
