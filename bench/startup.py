#!/usr/bin/env python3
"""Container start: containerd's normal pull vs Hermes, same run, same machine, same registry.

Starts a docker-registry on loopback behind a bandwidth-capped proxy (bench/throttle_proxy.py,
which also counts the bytes sent to the node), a containerd with its own root/state/socket and
Hermes as its `hermes` proxy snapshotter, and `hermes node`. Builds and pushes an image, then
for each mode wipes containerd's content and snapshots and the node's state, drops the page
cache, and measures from pull start: the container's first output line ("running"), its
"ready" line, its exit, and (lazy modes) the moment every layer is fully local, with the
registry bytes at each point.

Modes:
  normal    `ctr image pull --snapshotter overlayfs` + `ctr run` (containerd's normal path)
  lazy      `hermes pull` + `ctr run --snapshotter hermes`, zTOCs in the node's store
  replay    record-and-replay prefetch: a first start on a wiped node connected to
            `hermes controller --standalone` records which spans are read during --trace-window
            and the node posts the traces to the controller; then containerd and the node are
            wiped again (not the controller), caches dropped, and the second start, which
            prefetches the controller's merged profile from mount on, is measured
  fallback  the same as lazy with no index anywhere: Hermes must fall back to a normal unpack
  eager     the policy mode `Eager`: the node connected to `hermes controller --standalone`
            whose policy gives the image `mode: Eager` (and builds nothing: minLayerSize 1000Gi);
            each layer is fetched whole with parallel range requests and its spans decoded in
            parallel from their checkpoints before the container starts (pull before start)
  deadline  the policy's `fullyLocalWithin` (--fully-local-within, default 60s) on a Lazy start:
            the start (compare with lazy), when the layers are fully local, and then the registry
            is stopped and a container reading every file of the image runs: it must succeed
  unpack    no container: the same layers' blobs, caches dropped, through `gzip -dc | tar -x`
            one after the other (what unpacking costs with no network); compare with eager's
            pull time at --rate-mbps 0

--per-connection-mbps N: the proxy also caps each connection at N MB/s under the shared cap (as
object storage behind real registries does): a single stream per layer cannot use the link.

--first-start: the issue-16 view of (b), the first lazy start with no recorded profile: modes
normal, lazy and replay, plus a warm local run (the image already unpacked by (a), page cache
warm, run twice, the second measured) that gives the workload's own CPU time (from the
container's cgroup). The physical limit of a first start is

    limit = (compressed bytes the container read) / bandwidth + that CPU time

where the compressed bytes come from the trace of replay's recording start: every tar byte
range its reads asked for (through FUSE, so with the kernel's readahead), merged, and for each
span the compressed bytes of the span in proportion to the share of its uncompressed bytes that
were read (compression taken as uniform within a span). It prints the limit, (b)'s ready time,
their ratio and the normal-vs-lazy ratio.

Images: `--image quick` (generated, <= 1 GB, for CI), `--image ml` (generated ML-style, ~4 GB),
`--image gb` (generated, 1.3 GB compressed: a 300 MiB tree and 1 GiB of model files),
`--image torch` (Debian + Python + torch with its CUDA wheels, bench/torch_image.py, built once),
`--image DIR` (an OCI layout built elsewhere; tag "v1").
"""
import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
from stack import http_get, log  # noqa: E402
from throttle_proxy import ThrottleProxy  # noqa: E402

MODES = ("normal", "lazy", "replay", "fallback")
ALL_MODES = MODES + ("eager", "deadline", "unpack")


# --------------------------------------------------------------------------------------------
# Generated images


def busybox_layer():
    bb = "/bin/busybox"
    if not os.path.exists(bb):
        sys.exit("busybox-static is required: run scripts/install-deps.sh")
    data = open(bb, "rb").read()
    entries = [("bin", "dir", None, 0o755), ("bin/busybox", "file", data, 0o755),
               ("etc", "dir", None, 0o755), ("tmp", "dir", None, 0o1777),
               ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)]
    for tool in ("sh", "cat", "echo", "find", "xargs", "ls", "wc", "head", "true", "sleep"):
        entries.append((f"bin/{tool}", "symlink", "busybox", 0o777))
    return stack.image_tar_writer(entries)


def python_tree_layer(seed: int, mib: int, core_mib: int):
    """A Python-like library tree: source text (compressible) and extension-module-like
    binaries; the first CORE_MIB go under usr/lib/python3/core (what the entrypoint reads)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10))) for _ in range(4000)]
    text = b" ".join(rng.choice(words) + (b"\n" if rng.random() < 0.12 else b"") for _ in range(300_000))
    noise = rng.randbytes(4 << 20)
    read_bytes = [0]

    def entries():
        yield ("usr", "dir", None, 0o755)
        yield ("usr/lib", "dir", None, 0o755)
        yield ("usr/lib/python3", "dir", None, 0o755)
        total, pkg, n = 0, 0, 0
        while total < mib << 20:
            core = total < core_mib << 20
            base = f"usr/lib/python3/{'core' if core else 'site-packages'}"
            if n % 40 == 0:
                pkg += 1
            yield (base, "dir", None, 0o755)
            yield (f"{base}/pkg{pkg:04d}", "dir", None, 0o755)
            n += 1
            if rng.random() < 0.7:
                size = min(int(rng.lognormvariate(9.5, 1.2)), 2 << 20)
                start = rng.randrange(0, len(text) - size - 1)
                data, name = text[start:start + size], f"mod{n:05d}.py"
            else:
                size = min(int(rng.lognormvariate(11.5, 1.3)), 16 << 20)
                out = bytearray()
                while len(out) < size:
                    k = rng.randint(256, 4096)
                    off = rng.randrange(0, len(noise) - k)
                    out += noise[off:off + k] + bytes(k)  # code-like: half random, half zeros
                data, name = bytes(out[:size]), f"_ext{n:05d}.so"
            if core:
                read_bytes[0] += len(data)
            total += len(data)
            yield (f"{base}/pkg{pkg:04d}/{name}", "file", data, 0o644)

    return stack.image_tar_writer(dedup_dirs(entries())), read_bytes


def dedup_dirs(entries):
    seen = set()
    for e in entries:
        if e[1] == "dir":
            if e[0] in seen:
                continue
            seen.add(e[0])
        yield e


def models_layer(seed: int, files: int, mib_each: int):
    """Incompressible "model weights" the entrypoint never reads."""
    rng = random.Random(seed)

    def write(out):
        import tarfile
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            d = tarfile.TarInfo("models")
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(d)
            for i in range(files):
                info = tarfile.TarInfo(f"models/shard-{i:02d}.bin")
                info.size, info.mode, info.mtime = mib_each << 20, 0o644, 1700000000

                class Noise:
                    left = mib_each << 20

                    def read(self, n=-1):
                        n = self.left if n < 0 else min(n, self.left)
                        self.left -= n
                        return rng.randbytes(n)
                tar.addfile(info, Noise())
    return write


WORKLOADS = {
    "entrypoint": [],  # the image's own
    "light": ["/bin/sh", "-c", "echo started; echo ready"],
    # Every regular file of the image read once: the case where lazy loading has nothing to save.
    "read-all": ["/bin/sh", "-c", "echo started; find / -xdev -type f -print0 | xargs -0 cat > /dev/null; echo ready"],
}
ENTRYPOINT = ["/bin/sh", "-c", "echo started; find /usr/lib/python3/core -type f | xargs cat > /dev/null; echo ready"]
PROFILES = {
    # name: (python tree MiB, of which read MiB, model files, MiB each)
    "quick": (240, 24, 4, 100),
    "ml": (1200, 120, 12, 256),
    # >= 1 GB compressed, for the Eager mode's benchmark
    "gb": (300, 30, 4, 256),
}


def build_generated(kind: str, layout_dir: str) -> dict:
    tree_mib, core_mib, files, each = PROFILES[kind]
    meta_path = os.path.join(layout_dir, "meta.json")
    if stack.Layout.done(layout_dir) and os.path.exists(meta_path):
        return json.load(open(meta_path))
    shutil.rmtree(layout_dir, ignore_errors=True)
    layout = stack.Layout(layout_dir)
    t = time.monotonic()
    layout.add_layer(busybox_layer())
    write, read_bytes = python_tree_layer(7, tree_mib, core_mib)
    layout.add_layer(write)
    layout.add_layer(models_layer(8, files, each), level=1)
    layout.finish("v1", ENTRYPOINT, ["PATH=/bin"])
    meta = {"description": f"generated: busybox, a {tree_mib} MiB Python-like tree (the entrypoint reads "
                           f"{read_bytes[0] / 2**20:.0f} MiB of it), {files} x {each} MiB incompressible model files",
            "uncompressed_mib": tree_mib + files * each + 2, "read_bytes": read_bytes[0]}
    json.dump(meta, open(meta_path, "w"))
    log(f"generated image in {time.monotonic() - t:.1f}s")
    return meta


# --------------------------------------------------------------------------------------------
# One measured start per mode


class Bench:
    """The running stack (registry proxy, node, containerd, optionally a controller) and one
    measured container start per call, each on a wiped node with the page cache dropped."""

    def __init__(self, args, hermes, procs, state, node, containerd, proxy, ref, built):
        self.args, self.hermes, self.procs, self.state = args, hermes, procs, state
        self.node, self.containerd, self.proxy, self.ref, self.built = node, containerd, proxy, ref, built
        self.controller_url = None

    def start(self, mode: str, wait_fully_local: bool = True) -> dict:
        """Wipe containerd and the node, drop caches, pull and run; MODE normal | lazy | fallback
        (replay's and eager's starts are lazy ones on a node connected to the controller)."""
        log(f"--- mode {mode}: wiping containerd and node state, dropping caches")
        containerd, node = self.containerd, self.node
        containerd.wipe()
        node.wipe(keep_store=False)
        if mode in ("lazy", "replay", "eager", "deadline"):
            shutil.copytree(self.built, node.store)
        node.start()
        containerd.start()
        stack.drop_caches()
        if mode == "normal":
            pull = [containerd.ctr_bin, "--address", containerd.address, "-n", stack.NAMESPACE, "images", "pull",
                    "--plain-http", "--snapshotter", "overlayfs", self.ref]
            snapshotter = "overlayfs"
        else:
            pull = [self.hermes, "pull", self.ref, "--address", containerd.address, "--namespace", stack.NAMESPACE,
                    "--snapshotter", "hermes", "--plain-http"]
            snapshotter = "hermes"
        r = stack.timed_start(containerd, pull, snapshotter, self.ref, f"bench-{mode}", lambda: self.proxy.down,
                              args=WORKLOADS[self.args.workload])
        sampler = r.pop("sampler")
        del r["t0"]
        if mode == "normal":
            r["fully_local_s"], r["bytes_total"] = r["pulled_s"], r["bytes_at_exit"]
            return r
        m = node.metrics()
        r["lazy_layers"] = m.get('hermes_node_layers{state="lazy"}', 0) + m.get(
            'hermes_node_layers{state="fully_local"}', 0)
        if not r["lazy_layers"]:
            r["fully_local_s"], r["bytes_total"] = r["pulled_s"], r["bytes_at_exit"]
        elif wait_fully_local:
            deadline = time.monotonic() + self.args.fully_local_timeout
            while time.monotonic() < deadline:
                m = node.metrics()
                if m.get('hermes_node_layers{state="lazy"}', 0) == 0:
                    break
                time.sleep(0.1)
            done = sampler.now()
            r["fully_local_s"] = done[0] if m.get('hermes_node_layers{state="lazy"}', 0) == 0 else None
            r["bytes_total"] = done[1]
            r["timeline"].append(done)
        r["read_latency_sum_s"] = m.get("hermes_node_read_latency_seconds_sum", 0)
        r["read_latency_count"] = m.get("hermes_node_read_latency_seconds_count", 0)
        r["node_fetched_on_demand"] = m.get('hermes_node_fetched_bytes_total{mode="on_demand"}', 0)
        r["node_fetched_background"] = m.get('hermes_node_fetched_bytes_total{mode="background"}', 0)
        return r

    def warm(self) -> dict:
        """The workload on the image (a) left pulled and unpacked, page cache warm: run twice, the
        second is measured; its wall time to ready and the container's CPU time (cgroup)."""
        runs = []
        for i in range(2):
            name = f"bench-warm-{i}"
            cpu = CgroupCpu(stack.NAMESPACE, name)
            r = stack.timed_start(self.containerd, ["true"], "overlayfs", self.ref, name, lambda: self.proxy.down,
                                  args=WORKLOADS[self.args.workload])
            r.pop("sampler")
            runs.append({"ready_s": r["ready_s"], "exited_s": r["exited_s"], "cpu_s": cpu.stop()})
        log(f"warm local run: ready {fmt_s(runs[-1]['ready_s'])}s, container CPU {fmt_s(runs[-1]['cpu_s'])}s")
        return runs[-1]

    def replay(self, lazy) -> dict:
        """(c) record-and-replay: a first (recording) start on a wiped node connected to the
        controller, whose startup traces the node posts to it (POST /v1/traces); then containerd
        and the node are wiped again (the controller keeps its profiles, in memory) and the second
        start, which prefetches the merged profile from mount, is the one measured."""
        window = self.args.trace_window or (
            # Cover the whole first start: the window opens at each layer's mount (during the
            # pull) and the container exits at LAZY's exited_s from pull start.
            int(lazy["exited_s"] * 1.2) + 10 if lazy else 120)
        url = self.start_controller()
        base = list(self.node.extra)
        self.node.extra = base + ["--controller", url, "--trace-window", str(window)]
        log(f"replay: recording start, trace window {window}s, controller {url}")
        record = self.start("replay", wait_fully_local=False)
        profiles = self.wait_traces(url, timeout=window + 120)
        log(f"replay: the controller has profiles for {len(profiles)} layer(s): "
            + ", ".join(f"{n} spans" for n in profiles.values()))
        r = self.start("replay")
        self.node.extra = base
        r["record"] = {"trace_window_s": window, "profile_spans": profiles, "touched_bytes": self.touched,
                       "read_bytes": self.read["uncompressed"], "read_compressed_bytes": self.read["compressed"],
                       **{k: record[k] for k in ("running_s", "ready_s", "exited_s", "bytes_at_ready")}}
        return r

    def eager(self) -> dict:
        """The policy mode Eager: the node asks the controller, whose policy says Eager for the
        image, and serves the zTOCs it keeps with that mode; the pull returns once every layer
        is fully local."""
        url = self.start_controller()
        base = list(self.node.extra)
        self.node.extra = base + ["--controller", url, "--trace-window", "0"]
        r = self.start("eager")
        self.node.extra = base
        stats = [json.load(open(os.path.join(self.node.root, "layers", d, "stats.json")))
                 for d in os.listdir(os.path.join(self.node.root, "layers"))] if os.path.isdir(
            os.path.join(self.node.root, "layers")) else []
        r["eager_layers"] = sum(1 for st in stats if st.get("mode") == "Eager")
        return r

    def deadline(self, restart_registry) -> dict:
        """The policy's fullyLocalWithin on a Lazy start: measured like lazy, waits until fully
        local, then stops the registry and runs a container reading every file of the image."""
        url = self.start_controller()
        base = list(self.node.extra)
        self.node.extra = base + ["--controller", url, "--trace-window", "0"]
        r = self.start("deadline")
        self.node.extra = base
        log("deadline: fully local; stopping the registry and reading every file of the image")
        self.procs.stop("registry")
        try:
            rr = stack.timed_start(self.containerd, ["true"], "hermes", self.ref, "bench-deadline-readall",
                                   lambda: self.proxy.down, args=WORKLOADS["read-all"])
            rr.pop("sampler")
            r["read_all_without_registry"] = {"ok": True, "exited_s": rr["exited_s"]}
        except RuntimeError as e:
            r["read_all_without_registry"] = {"ok": False, "error": str(e)[-500:]}
        finally:
            restart_registry()
        log(f"deadline: read every file with the registry down: {r['read_all_without_registry']}")
        return r

    def unpack(self, layout_dir: str) -> dict:
        """`gzip -dc BLOB | tar -x` of every layer, in order, caches dropped: the local cost of
        an unpack with no network."""
        idx = json.load(open(os.path.join(layout_dir, "index.json")))
        blob = lambda d: os.path.join(layout_dir, "blobs", *d.split(":"))  # noqa: E731
        manifest = json.load(open(blob(idx["manifests"][0]["digest"])))
        out = os.path.join(self.state, "unpack")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        stack.drop_caches()
        t = time.monotonic()
        for layer in manifest["layers"]:
            subprocess.run(f"gzip -dc {blob(layer['digest'])} | tar -x -C {out}", shell=True, check=True)
        subprocess.run(["sync"], check=True)
        took = time.monotonic() - t
        shutil.rmtree(out, ignore_errors=True)
        log(f"unpack: gzip -dc | tar -x of {len(manifest['layers'])} layer(s) in {took:.2f}s")
        return {"unpack_s": round(took, 2), "layers": len(manifest["layers"])}

    def start_controller(self) -> str:
        """`hermes controller --standalone` watching our containerd, started once per run. It
        collects traces and serves profiles (replay); its only policy gives the image the mode
        Eager and builds nothing (minLayerSize 1000Gi), for mode eager."""
        if self.controller_url:
            return self.controller_url
        port = stack.free_port()
        policies = os.path.join(self.state, "controller", "policies")
        os.makedirs(policies, exist_ok=True)
        repo = self.ref.rsplit(":", 1)[0]
        if "eager" in self.args.modes.split(","):
            with open(os.path.join(policies, "eager.yaml"), "w") as f:
                f.write("apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {name: bench-eager}\n"
                        f"spec:\n  images: [\"{repo}\"]\n  mode: Eager\n  index: {{minLayerSize: 1000Gi}}\n")
        if "deadline" in self.args.modes.split(","):
            with open(os.path.join(policies, "deadline.yaml"), "w") as f:
                f.write("apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {name: bench-deadline}\n"
                        f"spec:\n  images: [\"{repo}\"]\n  fullyLocalWithin: {self.args.fully_local_within}\n"
                        "  index: {minLayerSize: 1000Gi}\n")
        p = self.procs.start("controller", [
            self.hermes, "controller", "--standalone", "--policies", policies,
            "--data", os.path.join(self.state, "controller", "data"), "--listen", f"127.0.0.1:{port}",
            "--containerd", self.containerd.address, "--namespace", stack.NAMESPACE, "--plain-http"],
            env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        url = f"http://127.0.0.1:{port}"
        stack.wait_for("hermes controller", lambda: http_get(url + "/healthz") is not None, 60, p,
                       self.procs.logfile("controller"))
        self.controller_url = url
        return url

    def wait_traces(self, url: str, timeout: float) -> dict:
        """Wait until the node has sent every lazy layer's startup trace (its layer dir gets
        `trace.sent` once the window closed and the controller accepted it), then ask the
        controller for each layer's merged profile: {layer digest: spans}. Fails if none."""
        layers_dir = os.path.join(self.node.root, "layers")
        dirs = [os.path.join(layers_dir, d) for d in os.listdir(layers_dir)]
        if not dirs:
            raise RuntimeError("replay: the recording start served no lazy layer")
        stack.wait_for("startup traces sent to the controller",
                       lambda: all(os.path.exists(os.path.join(d, "trace.sent")) for d in dirs),
                       timeout, self.procs.children.get("node"), self.procs.logfile("node"))
        profiles, self.touched, self.read = {}, 0, {"uncompressed": 0, "compressed": 0}
        for d in dirs:
            stats = json.load(open(os.path.join(d, "stats.json")))
            # Kept after the run (the node's state is removed): what the recording start read.
            os.makedirs(os.path.join(self.args.work, "traces"), exist_ok=True)
            shutil.copy(os.path.join(d, "stats.json"), os.path.join(self.args.work, "traces", stats["layer"][7:19] + ".json"))
            self.read["uncompressed"] += stats.get("trace_read_bytes", 0)
            self.read["compressed"] += stats.get("trace_read_compressed_bytes", 0)
            # What the container read, to span granularity: the spans its reads touched.
            self.touched += len(stats["trace"]) * stats["uncompressed_size"] // max(stats["spans"], 1)
            body = http_get(f"{url}/v1/layers/{stats['layer']}/prefetch")
            if body is not None:
                profiles[stats["layer"]] = len(json.loads(body)["spans"])
        if not profiles:
            raise RuntimeError(f"replay: traces were sent but the controller has no prefetch profile; "
                               f"see {self.procs.logfile('node')} and {self.procs.logfile('controller')}")
        return profiles


class CgroupCpu:
    """Polls a `ctr run` container's CPU time from its cgroup (`/NAMESPACE/NAME`, v1 cpuacct or
    v2) until stopped; the last value read, in seconds (None if the cgroup never showed)."""

    def __init__(self, namespace: str, name: str):
        import threading
        self.paths = [(f"/sys/fs/cgroup/cpuacct/{namespace}/{name}/cpuacct.usage", None),
                      (f"/sys/fs/cgroup/{namespace}/{name}/cpu.stat", "usage_usec")]
        self.value, self.done = None, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def read(self):
        for path, key in self.paths:
            try:
                text = open(path).read()
            except OSError:
                continue
            if key is None:
                return int(text) / 1e9
            for line in text.splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v) / 1e6
        return None

    def poll(self):
        while not self.done.is_set():
            v = self.read()
            if v is not None:
                self.value = max(v, self.value or 0.0)
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.value


def first_start(results: dict, warm: dict, rate_mbps: float) -> dict:
    """The physical limit of the first lazy start and how far (b) is from it."""
    rec = results.get("replay", {}).get("record", {})
    lazy, normal = results.get("lazy"), results.get("normal")
    if not rec.get("read_compressed_bytes") or not lazy or not warm or warm.get("cpu_s") is None:
        return {}
    transfer = rec["read_compressed_bytes"] / (rate_mbps * 1e6)
    limit = transfer + warm["cpu_s"]
    out = {"read_bytes": rec["read_bytes"], "read_compressed_bytes": rec["read_compressed_bytes"],
           "transfer_s": round(transfer, 3), "cpu_s": round(warm["cpu_s"], 3), "warm_ready_s": warm["ready_s"],
           "limit_s": round(limit, 3), "ready_s": lazy.get("ready_s")}
    if lazy.get("ready_s"):
        out["ratio_to_limit"] = round(lazy["ready_s"] / limit, 2)
        if normal and normal.get("ready_s"):
            out["normal_over_lazy"] = round(normal["ready_s"] / lazy["ready_s"], 2)
    replay = results.get("replay")
    if replay and replay.get("ready_s"):
        out["replay_ready_s"] = replay["ready_s"]
    return out


def first_start_text(f: dict, rate_mbps: float) -> str:
    return (f"First lazy start, no profile: ready {fmt_s(f['ready_s'])} s; physical limit {f['limit_s']:.2f} s = "
            f"{f['read_compressed_bytes'] / 1e6:.1f} MB compressed read ({f['read_bytes'] / 1e6:.1f} MB "
            f"uncompressed) / {rate_mbps:g} MB/s ({f['transfer_s']:.2f} s) + {f['cpu_s']:.2f} s container CPU "
            f"(warm local run: ready {fmt_s(f['warm_ready_s'])} s); ratio to the limit "
            f"{f.get('ratio_to_limit', '–')}×; normal/lazy {f.get('normal_over_lazy', '–')}×"
            + (f"; replayed start ready {fmt_s(f['replay_ready_s'])} s" if f.get("replay_ready_s") else "") + ".")


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hermes", required=True)
    ap.add_argument("--image", default="quick",
                    help="quick | ml | torch (bench/torch_image.py, built once) | an OCI layout dir (tag v1)")
    ap.add_argument("--hermes-build", default="",
                    help="how --hermes was built, for the results (default: from its path, e.g. target/release)")
    ap.add_argument("--rate-mbps", type=float, default=32.0, help="registry bandwidth cap, MB/s")
    ap.add_argument("--fully-local-within", default="60s", help="the policy's fullyLocalWithin in mode deadline")
    ap.add_argument("--per-connection-mbps", type=float, default=0,
                    help="also cap each connection at this many MB/s (0: no per-connection cap)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--work", default="/var/tmp/hermes-startup-bench")
    ap.add_argument("--workload", default="entrypoint", choices=sorted(WORKLOADS),
                    help="what the container runs: the image's entrypoint, only a first line, or a read of every file")
    ap.add_argument("--span-size", default="", help="zTOC span size for the index (default: hermes')")
    ap.add_argument("--fully-local-timeout", type=float, default=900)
    ap.add_argument("--trace-window", type=int, default=0,
                    help="replay: the recording start's trace window, seconds (default: the lazy start's "
                         "exit time + 20%% + 10 s, or 120 s without the lazy mode)")
    ap.add_argument("--write-results", default="", help="write bench/results/startup-NAME.{md,json}")
    ap.add_argument("--check", action="store_true", help="fail unless lazy starts faster than normal")
    ap.add_argument("--node-arg", action="append", default=[],
                    help="an extra argument for `hermes node` (repeat), e.g. --node-arg=--no-background-fetch")
    ap.add_argument("--first-start", action="store_true",
                    help="modes normal,lazy,replay (unless --modes is given) plus a warm local run; report the "
                         "first lazy start against its physical limit")
    ap.add_argument("--containerd", default="1.6", choices=("1.6", "2"),
                    help="the system's containerd 1.6, or 2.x from scripts/containerd2.sh")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (containerd, FUSE, overlayfs, drop_caches)")
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc", "pigz"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required: run scripts/install-deps.sh")
    hermes = os.path.abspath(args.hermes)
    if args.first_start and "--modes" not in " ".join(sys.argv):
        args.modes = "normal,lazy,replay"
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(ALL_MODES)}")
    if len({"eager", "replay", "deadline"} & set(modes)) > 1:
        sys.exit("modes eager, replay and deadline need different controllers: run them separately")

    work = args.work
    state = os.path.join(work, "run")
    stack.unmount_all(hermes, os.path.join(state, "node"))
    stack.unmount_under(state)
    shutil.rmtree(state, ignore_errors=True)
    procs = stack.Procs(state, os.path.join(state, "logs"))
    log(f"work dir {work}; logs in {state}/logs")
    node = containerd = None
    try:
        # Image (cached under WORK/images).
        if args.image in PROFILES:
            layout_dir = os.path.join(work, "images", args.image)
            log(f"image '{args.image}': building (cached) in {layout_dir}")
            meta = build_generated(args.image, layout_dir)
            name = args.image
        elif args.image == "torch":
            import torch_image
            layout_dir = torch_image.build()
            meta = json.load(open(os.path.join(layout_dir, "meta.json")))
            name = "torch"
        else:
            layout_dir = os.path.abspath(args.image)
            meta = json.load(open(os.path.join(layout_dir, "meta.json"))) if os.path.exists(
                os.path.join(layout_dir, "meta.json")) else {"description": layout_dir}
            name = os.path.basename(layout_dir.rstrip("/"))
        compressed = stack.Layout.compressed_size(layout_dir)

        reg_port, proxy_port = stack.free_port(), stack.free_port()
        stack.start_registry(procs, os.path.join(state, "registry"), reg_port)
        proxy = ThrottleProxy(proxy_port, ("127.0.0.1", reg_port), args.rate_mbps * 1e6,
                              per_connection_bytes=args.per_connection_mbps * 1e6).start_thread()
        direct = f"127.0.0.1:{reg_port}/bench/{name}:v1"
        ref = f"127.0.0.1:{proxy_port}/bench/{name}:v1"
        if args.rate_mbps == 0 and args.per_connection_mbps == 0 and "unpack" in args.modes:
            # An unlimited network for the unpack comparison: no Python proxy in the data path
            # (it would cost CPU the unpack does not pay); registry bytes are then not counted.
            ref = direct
            log("no cap and an unpack baseline: pulling from the registry directly (bytes not counted)")
        t = time.monotonic()
        stack.push(layout_dir, "v1", direct)
        log(f"pushed {direct} ({compressed / 2**20:.0f} MiB compressed) in {time.monotonic() - t:.1f}s")

        node = stack.Node(procs, hermes, os.path.join(state, "node"), os.path.join(state, "hermes.sock"),
                          extra=args.node_arg)
        containerd = stack.Containerd(procs, os.path.join(state, "containerd"), node.socket, args.containerd)
        log(f"containerd {containerd.version()} ({containerd.containerd_bin})")

        index_s = None
        built = os.path.join(state, "ztocs")  # copied into the node's store for the lazy mode
        if {"lazy", "replay", "eager"} & set(modes):
            cmd = [hermes, "index", "build", direct, "--plain-http", "--store", built, "--min-layer-size", "0"]
            if args.span_size:
                cmd += ["--span-size", args.span_size]
            t = time.monotonic()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(procs.logfile("index"), "ab"))
            index_s = round(time.monotonic() - t, 2)
            log(f"indexed with hermes index build in {index_s}s (unthrottled, before the runs)")

        bench = Bench(args, hermes, procs, state, node, containerd, proxy, ref, built)
        results, warm, unpack = {}, None, None
        for mode in modes:
            if mode == "replay":
                results[mode] = bench.replay(results.get("lazy"))
            elif mode == "eager":
                results[mode] = bench.eager()
            elif mode == "deadline":
                results[mode] = bench.deadline(
                    lambda: stack.start_registry(procs, os.path.join(state, "registry"), reg_port))
            elif mode == "unpack":
                unpack = bench.unpack(layout_dir)
                continue
            else:
                results[mode] = bench.start(mode)
                if mode == "normal" and args.first_start:
                    warm = bench.warm()
            r = results[mode]
            log(f"{mode}: running {r['running_s']:.2f}s, ready {fmt_s(r.get('ready_s'))}s, "
                f"{r['bytes_at_ready'] / 2**20:.0f} MiB fetched by ready"
                + (f", fully local {r['fully_local_s']:.1f}s" if r.get("fully_local_s") else "")
                + (f"; reads waited {r['read_latency_sum_s']:.2f}s in all over {r['read_latency_count']:.0f} reads, "
                   f"{r['node_fetched_on_demand'] / 2**20:.0f} MiB on demand, "
                   f"pulled at {r['pulled_s']:.2f}s" if r.get("read_latency_count") else ""))
        containerd.wipe()
        node.wipe(keep_store=False)

        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.machine())
        mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) >> 20
        report = {"image": meta, "workload": args.workload, "per_connection_mbps": args.per_connection_mbps,
                  "direct": ref == direct, "fully_local_within": args.fully_local_within,
                  "unpack": unpack, "command": WORKLOADS[args.workload] or "entrypoint", "image_compressed_mib": round(compressed / 2**20), "rate_mbps": args.rate_mbps,
                  "index_build_s": index_s, "machine": f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, "
                  f"kernel {platform.release()}, containerd {containerd.version()}",
                  "date": time.strftime("%Y-%m-%d"), "modes": results}
        if args.first_start:
            report["warm"] = warm
            report["first_start"] = first_start(results, warm, args.rate_mbps)
        table = markdown(report)
        print(table)
        if args.write_results:
            os.makedirs("bench/results", exist_ok=True)
            base = f"bench/results/startup-{args.write_results}"
            # The command a user runs: bench/startup.sh passes --hermes itself.
            hidden = ("--hermes", "--hermes-build")
            shown = [a for i, a in enumerate(sys.argv[1:]) if a not in hidden and sys.argv[i] not in hidden
                     and not a.startswith(tuple(h + "=" for h in hidden))]
            cmd = " ".join(["bash bench/startup.sh"] + shown)
            build = args.hermes_build or os.path.basename(os.path.dirname(hermes))
            with open(base + ".md", "w") as f:
                f.write(table + f"\nProduced by `{cmd}` (hermes: {build} build).\n")
            with open(base + ".json", "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
            if chart(report, base + ".png"):
                log(f"wrote {base}.png")
            log(f"wrote {base}.md and {base}.json")
        if args.check:
            if "normal" not in results or "lazy" not in results:
                sys.exit("--check needs the normal and lazy modes")
            n, lz = results["normal"]["running_s"], results["lazy"]["running_s"]
            version = containerd.version()
            if not lz < n:
                print(f"FAIL (containerd {version}): lazy start ({lz:.2f}s) is not faster than the normal path "
                      f"({n:.2f}s)")
                return 1
            print(f"OK (containerd {version}): lazy start {lz:.2f}s < normal {n:.2f}s ({n / lz:.1f}x)")
        return 0
    finally:
        if containerd:
            containerd.stop()
        if node:
            node.stop()
        for name in list(procs.children):
            procs.stop(name)
        stack.unmount_under(state)
        if not stack.mounts_under(state):  # keep the logs, free the disk
            for sub in ("registry", "node", "containerd", "ztocs", "controller"):
                shutil.rmtree(os.path.join(state, sub), ignore_errors=True)


def fmt_s(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def bytes_read(rep: dict) -> tuple:
    """(bytes of the image the container read, how that is known) or (None, "")."""
    if rep["workload"] == "entrypoint" and rep["image"].get("read_bytes"):
        return rep["image"]["read_bytes"], "the files the entrypoint reads"
    if rep["workload"] == "read-all" and rep["image"].get("uncompressed_mib"):
        return rep["image"]["uncompressed_mib"] << 20, "the whole image, by du"
    touched = rep["modes"].get("replay", {}).get("record", {}).get("touched_bytes")
    if touched:
        return touched, ("the spans its reads touched in the recorded trace of (c): an upper bound, so the "
                         "amplification is a lower bound")
    return None, ""


def markdown(rep: dict) -> str:
    modes = rep["modes"]
    base = modes.get("normal")
    label = {"normal": "(a) containerd normal pull (overlayfs)", "lazy": "(b) Hermes lazy",
             "replay": "(c) Hermes record-and-replay (second start)", "fallback": "(d) Hermes, no index (fallback)",
             "eager": "(e) Hermes, policy mode Eager (pull before start)",
             "deadline": "(f) Hermes, Lazy with fullyLocalWithin"}
    # Read straight from the registry (no counting proxy): no byte counts to compare.
    read, read_note = bytes_read(rep) if not rep.get("direct") else (None, "")
    workload = "the image's entrypoint" if rep["workload"] == "entrypoint" else f"`{' '.join(rep['command'][2:])}`"
    lines = [f"Image: {rep['image']['description']}; {rep['image_compressed_mib']} MiB compressed. "
             f"Container runs {workload}. "
             + ("Registry on loopback, read directly (no cap, no proxy)" if rep.get("direct") else
                f"Registry on loopback behind a {rep['rate_mbps']:g} MB/s cap")
             + (f" and {rep['per_connection_mbps']:g} MB/s per connection" if rep.get("per_connection_mbps") else "")
             + "; page cache dropped and "
             f"containerd/node state wiped before each mode. Times from pull start.", "",
             "| mode | running (first line) s | ready s | fully local s | MiB fetched by ready | "
             "MiB fetched total | speedup to running vs (a) | speedup to ready vs (a) |"
             + (" fetch amplification by ready |" if read else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if read else "")]
    for mode, r in modes.items():
        sp_run = f"{base['running_s'] / r['running_s']:.2f}×" if base else "–"
        sp_ready = f"{base['ready_s'] / r['ready_s']:.2f}×" if base and r.get("ready_s") else "–"
        amp = f" {r['bytes_at_ready'] / read:.2f}× |" if read else ""
        lines.append(f"| {label.get(mode, mode)} | {fmt_s(r['running_s'])} | {fmt_s(r.get('ready_s'))} | "
                     f"{fmt_s(r.get('fully_local_s'))} | {r['bytes_at_ready'] / 2**20:.0f} | "
                     f"{r['bytes_total'] / 2**20:.0f} | {sp_run} | {sp_ready} |{amp}")
    lines.append("")
    rec = modes.get("replay", {}).get("record")
    if rec:
        spans = rec["profile_spans"]
        lines.append(f"(c): the first start on a wiped node connected to `hermes controller --standalone` recorded "
                     f"the spans read during a {rec['trace_window_s']} s window (running {fmt_s(rec['running_s'])} s, "
                     f"ready {fmt_s(rec.get('ready_s'))} s); the controller merged them into profiles of "
                     f"{sum(spans.values())} spans over {len(spans)} layer(s); containerd and the node were then "
                     "wiped and caches dropped; the second start, which prefetches the profile from mount, is the "
                     "row.")
    if read:
        lines.append(f"Bytes the container read: {read / 2**20:.0f} MiB uncompressed ({read_note}); fetch "
                     "amplification = registry bytes by ready ÷ that.")
    if rep.get("first_start"):
        lines.append(first_start_text(rep["first_start"], rep["rate_mbps"]))
    eager = modes.get("eager")
    if eager and base and eager.get("ready_s") and base.get("ready_s"):
        lines.append(f"Eager: ready {eager['ready_s']:.2f} s vs containerd's {base['ready_s']:.2f} s: "
                     f"ratio containerd/eager: {base['ready_s'] / eager['ready_s']:.2f} "
                     f"({eager.get('eager_layers', 0)} layer(s) served Eager; pulled, i.e. fully local, at "
                     f"{eager['pulled_s']:.2f} s).")
    dl = modes.get("deadline")
    if dl:
        lazy = modes.get("lazy")
        line = (f"fullyLocalWithin {rep.get('fully_local_within')}: fully local at "
                f"{fmt_s(dl.get('fully_local_s'))} s from pull start")
        if lazy and lazy.get("ready_s") and dl.get("ready_s"):
            line += f"; ready {dl['ready_s']:.2f} s vs {lazy['ready_s']:.2f} s without it (ratio {dl['ready_s'] / lazy['ready_s']:.2f})"
        rd = dl.get("read_all_without_registry", {})
        line += ("; then, with the registry stopped, a container read every file of the image: "
                 + ("OK" if rd.get("ok") else f"FAILED ({rd.get('error')})"))
        lines.append(line + ".")
    if rep.get("unpack"):
        u = rep["unpack"]
        line = f"Unpack baseline: `gzip -dc | tar -x` of the {u['layers']} layer blob(s), caches dropped: {u['unpack_s']:.2f} s"
        if eager:
            line += (f"; Eager's pull (fetch, verify and decode every span until fully local) took "
                     f"{eager['pulled_s']:.2f} s: ratio eager/unpack: {eager['pulled_s'] / u['unpack_s']:.2f}")
        lines.append(line + ".")
    if rep.get("index_build_s") is not None:
        lines.append(f"Index built beforehand with `hermes index build` in {rep['index_build_s']} s (not throttled, "
                     "not counted).")
    lines.append(f"Machine: {rep['machine']}; {rep['date']}.")
    return "\n".join(lines) + "\n"


def chart(rep: dict, path: str) -> bool:
    """PNG: registry bytes over time, one line per mode, with each mode's running and ready
    moments marked on its line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (bench/startup.sh installs it): no PNG chart")
        return False
    short = {"normal": "(a) normal pull", "lazy": "(b) Hermes lazy", "replay": "(c) Hermes replay",
             "fallback": "(d) Hermes fallback", "eager": "(e) Hermes Eager"}
    fig, ax = plt.subplots(figsize=(9, 5))
    for mode, r in rep["modes"].items():
        xs = [t for t, _ in r["timeline"]]
        ys = [b / 2**20 for _, b in r["timeline"]]
        label = f"{short.get(mode, mode)}: running {fmt_s(r['running_s'])} s, ready {fmt_s(r.get('ready_s'))} s"
        line, = ax.plot(xs, ys, label=label, linewidth=1.6)
        for key, bytes_key, marker in (("running_s", "bytes_at_running", "o"), ("ready_s", "bytes_at_ready", "*")):
            if r.get(key) is not None:
                ax.plot([r[key]], [r[bytes_key] / 2**20], marker=marker, markersize=9 if marker == "*" else 6,
                        color=line.get_color(), markeredgecolor="black", linestyle="none")
    # Marker legend entries (drawn once, grey).
    ax.plot([], [], "o", color="grey", markeredgecolor="black", label="running (first output line)")
    ax.plot([], [], "*", color="grey", markeredgecolor="black", markersize=9, label="ready")
    ax.set_xlabel("seconds from pull start")
    ax.set_ylabel("MiB fetched from the registry")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    workload = "entrypoint" if rep["workload"] == "entrypoint" else rep["workload"]
    ax.set_title(f"{rep['image_compressed_mib']} MiB image (compressed), {rep['rate_mbps']:g} MB/s registry, "
                 f"workload: {workload}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
