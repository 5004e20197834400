#!/usr/bin/env python3
"""Index build of a multi-layer image from a local registry vs `skopeo copy` of the same image.

Starts Debian's docker-registry on loopback, generates a multi-layer image (bench/gen_layer.py
layers, gzip), pushes it with skopeo, then in the same run measures, interleaved, best of N:
  baseline: skopeo copy docker://IMAGE dir:TMP   (a plain transfer of every blob to disk)
  hermes:   hermes index build IMAGE             (stream every layer once, build zTOCs)
and the peak RSS of the hermes build. Writes bench/results/index-build.{md,json}.
"""
import argparse, hashlib, json, os, platform, shutil, socket, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--hermes", required=True)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--layer-mb", type=int, default=450, help="uncompressed MiB per layer")
ap.add_argument("--runs", type=int, default=2)
ap.add_argument("--write-results", action="store_true")
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="hermes-index-bench-", dir="/var/tmp")
procs = []
def cleanup():
    for p in procs:
        p.kill(); p.wait()
    shutil.rmtree(work, ignore_errors=True)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def timed(cmd):
    """Wall seconds and peak RSS (KiB) of one child."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = p.communicate()
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {err.decode()[-2000:]}")
    return wall

def peak_rss_kib(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"{cmd[0]} failed with status {status}")
    return usage.ru_maxrss

try:
    port = free_port()
    host = f"127.0.0.1:{port}"
    os.makedirs(f"{work}/registry")
    with open(f"{work}/registry/config.yml", "w") as f:
        f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry/data\nhttp:\n  addr: {host}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    procs.append(subprocess.Popen(["docker-registry", "serve", f"{work}/registry/config.yml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); break
        except OSError:
            time.sleep(0.1)

    # Build an OCI layout with several generated gzip layers.
    layout = f"{work}/layout"; os.makedirs(f"{layout}/blobs/sha256")
    def put(path_or_bytes):
        h = hashlib.sha256()
        if isinstance(path_or_bytes, bytes):
            h.update(path_or_bytes); data = path_or_bytes
            d = h.hexdigest(); open(f"{layout}/blobs/sha256/{d}", "wb").write(data); return "sha256:" + d, len(data)
        with open(path_or_bytes, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""): h.update(chunk)
        d = h.hexdigest(); os.rename(path_or_bytes, f"{layout}/blobs/sha256/{d}")
        return "sha256:" + d, os.path.getsize(f"{layout}/blobs/sha256/{d}")
    layers, diffs = [], []
    gz = "pigz" if shutil.which("pigz") else "gzip"
    gen = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen_layer.py")
    for i in range(args.layers):
        print(f"generating layer {i + 1}/{args.layers} ({args.layer_mb} MiB tar, {gz} -6)", file=sys.stderr)
        tmp = f"{work}/layer{i}.tar.gz"
        diff = hashlib.sha256()
        g = subprocess.Popen([sys.executable, gen, str(args.layer_mb), str(i)], stdout=subprocess.PIPE)
        z = subprocess.Popen([gz, "-6", "-n"], stdin=subprocess.PIPE, stdout=open(tmp, "wb"))
        for chunk in iter(lambda: g.stdout.read(1 << 20), b""):
            diff.update(chunk); z.stdin.write(chunk)
        z.stdin.close(); z.wait(); g.wait()
        d, size = put(tmp)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size})
        diffs.append("sha256:" + diff.hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diffs}, "config": {}}).encode()
    cd, cs = put(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs}, "layers": layers}).encode()
    md, ms = put(manifest)
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
               "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}, open(f"{layout}/index.json", "w"))
    open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
    image = f"{host}/bench/ml:v1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{image}"], check=True, stdout=subprocess.DEVNULL)
    total = sum(l["size"] for l in layers)
    print(f"pushed {image}: {len(layers)} layers, {total / 2**20:.0f} MiB compressed", file=sys.stderr)

    best_skopeo = best_hermes = None
    rss = 0
    for run in range(args.runs):
        dest = f"{work}/copy{run}"
        t = timed(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", f"docker://{image}", f"dir:{dest}"])
        shutil.rmtree(dest, ignore_errors=True)
        best_skopeo = t if best_skopeo is None else min(best_skopeo, t)
        store = f"{work}/store{run}"
        cmd = [args.hermes, "index", "build", image, "--plain-http", "--store", store, "--min-layer-size", "0"]
        t0 = time.monotonic(); rss = max(rss, peak_rss_kib(cmd)); t = time.monotonic() - t0
        shutil.rmtree(store, ignore_errors=True)
        best_hermes = t if best_hermes is None else min(best_hermes, t)
        print(f"run {run + 1}: skopeo copy {best_skopeo:.2f}s, hermes index build {t:.2f}s", file=sys.stderr)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    res = {"layers": len(layers), "compressed_mib": round(total / 2**20), "uncompressed_mib": args.layers * args.layer_mb,
           "skopeo_copy_seconds": round(best_skopeo, 2), "hermes_index_build_seconds": round(best_hermes, 2),
           "ratio_hermes_over_skopeo": round(best_hermes / best_skopeo, 2), "hermes_peak_rss_mib": round(rss / 1024, 1),
           "machine": f"{cpu}, {os.cpu_count()} cores"}
    table = f"""| index build of a {len(layers)}-layer image, {total / 2**20:.0f} MiB compressed, local registry | seconds |
|---|---:|
| `skopeo copy docker://… dir:` (baseline: plain transfer) | {best_skopeo:.2f} |
| `hermes index build` (every layer, 4 MiB spans, 2 layers in parallel) | {best_hermes:.2f} |
| **ratio hermes / skopeo (target ≤ 1.2)** | **{best_hermes / best_skopeo:.2f}×** |
| **hermes peak RSS (target ≤ 100 MB)** | **{rss / 1024:.0f} MiB** |

Best of {args.runs}, interleaved. Machine: {res['machine']}.
"""
    print(table)
    if args.write_results:
        os.makedirs("bench/results", exist_ok=True)
        open("bench/results/index-build.md", "w").write(table + "\nProduced by `bash bench/index-build.sh`.\n")
        open("bench/results/index-build.json", "w").write(json.dumps(res, indent=2) + "\n")
finally:
    cleanup()
