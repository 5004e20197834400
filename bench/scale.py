#!/usr/bin/env python3
"""Registry bytes and requests when N nodes start one image lazily, with and without a mirror.

One machine plays the cluster: an origin `docker-registry` behind the testkit's counting
`fault-proxy` (no faults: it counts blob requests and bytes, i.e. what the origin serves), and N
"nodes", each a `hermes layer mount` of the image's layer with its own store and span cache, all
started at once, each reading the startup set (the first --read-files files of the layer). Setups:

  origin     every node reads the origin (no hosts.toml)
  mirror     a cold pull-through mirror (Debian's docker-registry in `proxy` mode) named in a
             containerd hosts.toml (--registry-config-path), counted by a second fault-proxy
  warmed     the same, with the mirror warmed by the controller's indexing read (the controller
             builds the zTOC through the same hosts.toml, so its one read of the layer fills it)

The controller's store holds zTOCs, not layers: a node gets its zTOC from the controller (the size
is printed) and every layer byte from a registry host. Prints a markdown table, and with
--json FILE the numbers.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
from chaos import FaultProxy  # noqa: E402


def generated_layer(files: int, file_mib: int, seed: int):
    """A WRITE_TAR: FILES incompressible files of FILE_MIB MiB (a model directory)."""
    def write(out):
        rng = random.Random(seed)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for i in range(files):
                data = rng.randbytes(file_mib << 20)
                info = tarfile.TarInfo(f"models/part-{i:03}.bin")
                info.size, info.mtime, info.mode = len(data), 0, 0o644

                class Reader:
                    def __init__(self, b):
                        self.b, self.at = b, 0

                    def read(self, n=-1):
                        n = len(self.b) - self.at if n < 0 else n
                        chunk = self.b[self.at:self.at + n]
                        self.at += len(chunk)
                        return chunk
                tar.addfile(info, Reader(data))
    return write


class Nodes:
    """N `hermes layer mount` processes started together, each reading the startup set."""

    def __init__(self, hermes, work, image, store, count, read_files, hosts):
        self.hermes, self.work, self.image = hermes, work, image
        self.store, self.count, self.read_files, self.hosts = store, count, read_files, hosts

    def run(self, name: str) -> list:
        procs, mounts = [], []
        for i in range(self.count):
            node = os.path.join(self.work, name, f"node{i}")
            store, cache, mnt = (os.path.join(node, d) for d in ("store", "cache", "mnt"))
            os.makedirs(mnt, exist_ok=True)
            shutil.copytree(self.store, store)
            log = open(os.path.join(node, "mount.log"), "wb")
            procs.append(subprocess.Popen(
                [self.hermes, "layer", "mount", self.image, mnt, "--store", store, "--cache", cache,
                 "--plain-http", "--registry-config-path", self.hosts],
                stdout=log, stderr=log))
            mounts.append(mnt)
        for p, mnt in zip(procs, mounts):
            stack.wait_for(f"lazy mount {mnt}", lambda m=mnt: os.path.ismount(m), 60, p)
        t = time.monotonic()
        readers = [subprocess.Popen(
            ["sh", "-c", f"cat $(ls {mnt}/models/* | head -n {self.read_files}) > /dev/null"])
            for mnt in mounts]
        failed = sum(r.wait() != 0 for r in readers)
        elapsed = time.monotonic() - t
        fetched = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p, mnt in zip(procs, mounts):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if os.path.ismount(mnt):
                subprocess.run(["umount", "-l", mnt], check=False)
            text = open(os.path.join(os.path.dirname(mnt), "mount.log"), errors="replace").read()
            fetched.append(text.strip().splitlines()[-1] if text.strip() else "")
        if failed:
            raise RuntimeError(f"{failed} node(s) failed to read the startup set ({name})")
        return [elapsed, fetched]


def hosts_toml(dir: str, origin: str, mirror: str) -> str:
    host_dir = os.path.join(dir, origin.replace(":", "_") + "_")
    os.makedirs(host_dir, exist_ok=True)
    with open(os.path.join(host_dir, "hosts.toml"), "w") as f:
        f.write(f'server = "http://{origin}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n')
    return dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hermes", required=True)
    ap.add_argument("--fault-proxy", required=True)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--files", type=int, default=32, help="files in the layer")
    ap.add_argument("--file-mib", type=int, default=4)
    ap.add_argument("--read-files", type=int, default=8, help="files a start reads")
    ap.add_argument("--span-size", default="1MiB")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="hermes-scale-")
    procs = stack.Procs(work, os.path.join(work, "logs"))
    proxies = []
    try:
        origin_port = stack.free_port()
        stack.start_registry(procs, os.path.join(work, "origin"), origin_port)
        counter = FaultProxy(args.fault_proxy, f"127.0.0.1:{origin_port}", 0.0, 0,
                             os.path.join(work, "logs", "origin-counter.log"))
        proxies.append(counter)
        layout = os.path.join(work, "layout")
        image = stack.Layout(layout)
        image.add_layer(generated_layer(args.files, args.file_mib, 7), level=1)
        image.finish("v1", ["/bin/true"], [])
        layer_bytes = stack.Layout.compressed_size(layout)
        stack.push(layout, "v1", f"127.0.0.1:{origin_port}/scale/app:v1")
        ref = f"{counter.host}/scale/app:v1"

        def origin_delta(before):
            s = counter.cmd("stats")
            return s["blob_bytes_total"] - before, s["blob_requests"], s["blob_bytes_total"]

        _, _, mark = origin_delta(0)
        store = os.path.join(work, "store")
        index = [args.hermes, "index", "build", ref, "--plain-http", "--store", store,
                 "--span-size", args.span_size, "--min-layer-size", "1MiB"]
        subprocess.run(index + ["--registry-config-path", ""], check=True, stdout=subprocess.DEVNULL)
        index_bytes, index_reqs, mark = origin_delta(mark)
        blobs = os.path.join(store, "blobs", "sha256")
        ztoc_bytes = max(os.path.getsize(os.path.join(blobs, f)) for f in os.listdir(blobs))
        rows = []

        def row(name, nodes_out, origin_bytes, origin_reqs, mirror_bytes, indexing):
            rows.append({"setup": name, "origin_blob_bytes": origin_bytes, "origin_blob_requests": origin_reqs,
                         "mirror_to_nodes_bytes": mirror_bytes, "indexing_origin_bytes": indexing,
                         "startup_read_s": round(nodes_out[0], 2), "nodes": nodes_out[1]})

        # origin only
        nodes = Nodes(args.hermes, work, ref, store, args.nodes, args.read_files, "")
        out = nodes.run("origin")
        b, r, mark = origin_delta(mark)
        row("origin only", out, b, r, 0, index_bytes)

        # cold mirror, then a mirror warmed by the controller's indexing
        for name in ("mirror", "warmed"):
            mport = stack.free_port()
            stack.start_registry(procs, os.path.join(work, f"mirror-{name}"), mport,
                                 proxy_remote=counter.host, name=f"mirror-{mport}")
            mcount = FaultProxy(args.fault_proxy, f"127.0.0.1:{mport}", 0.0, 0,
                                os.path.join(work, "logs", f"{name}-counter.log"))
            proxies.append(mcount)
            hosts = hosts_toml(os.path.join(work, f"certs.d-{name}"), counter.host, mcount.host)
            warm = 0
            if name == "warmed":
                warm_store = os.path.join(work, "warm-store")
                subprocess.run(index[:6] + [warm_store] + index[7:] + ["--registry-config-path", hosts],
                               check=True, stdout=subprocess.DEVNULL)
                warm, _, mark = origin_delta(mark)
                mcount.cmd("stats")
            m0 = mcount.cmd("stats")["blob_bytes_total"]
            out = Nodes(args.hermes, work, ref, store, args.nodes, args.read_files, hosts).run(name)
            b, r, mark = origin_delta(mark)
            row("pull-through mirror, cold" if name == "mirror" else
                "pull-through mirror, warmed by the controller's indexing", out, b, r,
                mcount.cmd("stats")["blob_bytes_total"] - m0, warm if name == "warmed" else index_bytes)

        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nodes": args.nodes,
                  "layer_bytes": layer_bytes, "read_files": args.read_files, "files": args.files,
                  "file_mib": args.file_mib, "span_size": args.span_size, "ztoc_bytes": ztoc_bytes,
                  "index_origin_bytes": index_bytes, "index_origin_requests": index_reqs, "rows": rows}
        print(markdown(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0
    finally:
        for p in proxies:
            p.close()
        stack.unmount_under(work)
        for name in list(procs.children):
            procs.stop(name)
        shutil.rmtree(work, ignore_errors=True)


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def markdown(rep: dict) -> str:
    n, k = rep["nodes"], 1000
    lines = [
        f"{n} nodes start one image at once: a {mib(rep['layer_bytes'])} MiB layer ({rep['files']} files of "
        f"{rep['file_mib']} MiB, incompressible), each start reads {rep['read_files']} files; spans "
        f"{rep['span_size']}; zTOC {rep['ztoc_bytes'] / 1024:.0f} KiB per node (from the controller, not "
        f"the registry).",
        "",
        f"| setup | origin MiB for indexing | origin blob MiB ({n} nodes) | origin blob requests | "
        f"mirror → nodes MiB | origin MiB for {k} nodes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rep["rows"]:
        if r["setup"] == "origin only":
            extra = f"{mib(r['origin_blob_bytes'] / n * k)} (= {k} × per node)"
        elif "cold" in r["setup"]:
            extra = "grows with the misses during the fill (see text)"
        else:
            extra = f"{mib(r['origin_blob_bytes'])} (independent of N)"
        lines.append(f"| {r['setup']} | {mib(r['indexing_origin_bytes'])} | {mib(r['origin_blob_bytes'])} | "
                     f"{r['origin_blob_requests']} | {mib(r['mirror_to_nodes_bytes'])} | {extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
