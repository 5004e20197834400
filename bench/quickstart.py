#!/usr/bin/env python3
"""The quickstart's moving parts (called by scripts/quickstart.sh; run as root).

    quickstart.py up --hermes BIN [--rate-mbps 32]   start everything, build + push the sample
                                                     image, run it normally and through Hermes
    quickstart.py down [--purge]                     stop everything, unmount, remove state

State under /var/lib/hermes-quickstart (logs in its logs/), the sample image's build cache under
/var/cache/hermes-quickstart (kept by `down`, removed by `down --purge`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
from stack import log  # noqa: E402

BASE = "/var/lib/hermes-quickstart"
CACHE = "/var/cache/hermes-quickstart"
LOGS = os.path.join(BASE, "logs")
REGISTRY_PORT, PROXY_PORT, STATS_PORT, CONTROLLER_PORT = 5741, 5742, 5743, 5744
CONTROLLER = f"http://127.0.0.1:{CONTROLLER_PORT}"
IMAGE_REPO = "quickstart/python-data"
PYPI = ["numpy", "pandas", "scipy", "scikit-learn", "pyarrow"]
ENTRYPOINT = ["/usr/bin/python3", "-u", "-c",
              "print('started', flush=True)\n"
              "import numpy, pandas\n"
              "df = pandas.DataFrame({'x': numpy.arange(6)})\n"
              "print('sum of x:', int(df.x.sum()))\n"
              "print('ready')\n"]

STEP_T0 = [time.monotonic()]


def step(msg: str) -> None:
    now = time.monotonic()
    log(f"==> {msg}   (+{now - STEP_T0[0]:.1f}s since the last step)")
    STEP_T0[0] = now


def ref(port: int) -> str:
    return f"127.0.0.1:{port}/{IMAGE_REPO}:v1"


# --------------------------------------------------------------------------------------------


def build_image() -> str:
    """Debian bookworm (debootstrap minbase + python3) and real PyPI wheels, as an OCI layout
    of two layers. Cached: rebuilt only when missing."""
    layout = os.path.join(CACHE, "layout")
    if stack.Layout.done(layout):
        log(f"sample image: cached in {layout}")
        return layout
    rootfs, pkgs = os.path.join(CACHE, "rootfs"), os.path.join(CACHE, "pkgs")
    if not os.path.exists(os.path.join(rootfs, "DONE")):
        shutil.rmtree(rootfs, ignore_errors=True)
        log("sample image: debootstrap bookworm (minbase + python3); 1-3 minutes")
        with open(os.path.join(LOGS, "debootstrap.log"), "ab") as out:
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", rootfs],
                           check=True, stdout=out, stderr=out)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in os.listdir(os.path.join(rootfs, junk)):
                p = os.path.join(rootfs, junk, f)
                if os.path.isfile(p):
                    os.remove(p)
        open(os.path.join(rootfs, "DONE"), "w").close()
    if not os.path.exists(os.path.join(CACHE, "pkgs.done")):
        shutil.rmtree(pkgs, ignore_errors=True)
        log(f"sample image: pip wheels for Python 3.11 ({', '.join(PYPI)})")
        with open(os.path.join(LOGS, "pip.log"), "ab") as out:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                            "--target", os.path.join(pkgs, "usr/local/lib/python3.11/dist-packages"),
                            "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
                            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                            "--platform", "manylinux_2_28_x86_64"] + PYPI, check=True, stdout=out, stderr=out)
        open(os.path.join(CACHE, "pkgs.done"), "w").close()
    log("sample image: OCI layout (2 gzip layers)")
    shutil.rmtree(layout, ignore_errors=True)
    lay = stack.Layout(layout)
    os.remove(os.path.join(rootfs, "DONE"))
    try:
        lay.add_layer(stack.tar_dir(rootfs))
    finally:
        open(os.path.join(rootfs, "DONE"), "w").close()
    lay.add_layer(stack.tar_dir(pkgs))
    lay.finish("v1", ENTRYPOINT, ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    return layout


def policy_yaml() -> str:
    return f"""apiVersion: hermes.dev/v1alpha1
kind: HermesPolicy
metadata:
  name: quickstart
spec:
  images: ["127.0.0.1:{PROXY_PORT}/quickstart/*"]
  mode: Lazy
  index:
    minLayerSize: 1Mi
"""


def controller_image(image: str) -> dict:
    """The controller's report for IMAGE (GET /v1/images), or {}."""
    try:
        with urllib.request.urlopen(f"{CONTROLLER}/v1/images", timeout=5) as r:
            images = json.load(r)
    except (OSError, ValueError):
        return {}
    return next((i for i in images if i.get("reference") == image), {})


def up(args) -> int:
    hermes = os.path.abspath(args.hermes)
    if any(os.path.exists(os.path.join(BASE, "pids", f)) for f in ("containerd.pid", "node.pid")):
        step("a previous quickstart is up: taking it down first")
        down(argparse.Namespace(purge=False, hermes=hermes))
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(CACHE, exist_ok=True)
    log(f"logs: {LOGS}")
    procs = stack.Procs(BASE, LOGS)
    for port in (REGISTRY_PORT, PROXY_PORT, STATS_PORT, CONTROLLER_PORT):
        if stack.port_open(port):
            sys.exit(f"port {port} is in use: stop what listens there (or `quickstart.sh --down`)")

    step("local registry (docker-registry) and a bandwidth-capped proxy in front of it")
    stack.start_registry(procs, os.path.join(BASE, "registry"), REGISTRY_PORT)
    p = procs.start("registry-proxy", [sys.executable, os.path.join(os.path.dirname(__file__), "throttle_proxy.py"),
                                       "--listen", f"127.0.0.1:{PROXY_PORT}", "--upstream", f"127.0.0.1:{REGISTRY_PORT}",
                                       "--rate-mbps", str(args.rate_mbps), "--stats", f"127.0.0.1:{STATS_PORT}"])
    stack.wait_for("registry proxy", lambda: stack.port_open(STATS_PORT), 30, p, procs.logfile("registry-proxy"))
    log(f"registry 127.0.0.1:{REGISTRY_PORT}; nodes pull through 127.0.0.1:{PROXY_PORT} "
        + (f"capped at {args.rate_mbps:g} MB/s, like a registry across a network" if args.rate_mbps else "uncapped"))

    step("sample image: Debian + Python + PyPI packages")
    layout = build_image()
    stack.push(layout, "v1", ref(REGISTRY_PORT))
    image = ref(PROXY_PORT)
    size = stack.Layout.compressed_size(layout)
    log(f"pushed {image}: {size / 2**20:.0f} MiB compressed")

    step("hermes node, containerd (own config, root, state, socket) and hermes controller --standalone")
    node = stack.Node(procs, hermes, os.path.join(BASE, "node"), os.path.join(BASE, "hermes.sock"),
                      extra=["--controller", CONTROLLER])
    node.metrics_port = 9466
    node.start()
    containerd = stack.Containerd(procs, os.path.join(BASE, "containerd"), node.socket)
    containerd.start()
    policies = os.path.join(BASE, "policies")
    os.makedirs(policies, exist_ok=True)
    with open(os.path.join(policies, "quickstart.yaml"), "w") as f:
        f.write(policy_yaml())
    p = procs.start("controller", [hermes, "controller", "--standalone", "--policies", policies,
                                   "--data", os.path.join(BASE, "controller"), "--listen", f"127.0.0.1:{CONTROLLER_PORT}",
                                   "--containerd", containerd.address, "--plain-http", "--poll-interval", "1s"],
                    env=dict(os.environ, RUST_LOG="info"))
    stack.wait_for("hermes controller", lambda: stack.port_open(CONTROLLER_PORT), 60, p, procs.logfile("controller"))
    log(f"containerd: {containerd.address}; node metrics: http://127.0.0.1:{node.metrics_port}/metrics; "
        f"controller: {CONTROLLER}")

    counter = lambda: read_proxy_bytes()  # noqa: E731
    step("run 1: containerd's normal path (ctr image pull + ctr run, overlayfs), page cache dropped")
    stack.drop_caches()
    normal = stack.timed_start(containerd, ["ctr", "--address", containerd.address, "-n", stack.NAMESPACE,
                                            "images", "pull", "--plain-http", "--snapshotter", "overlayfs", image],
                               "overlayfs", image, "quickstart-normal", counter)
    normal.pop("sampler")
    log(f"normal: running after {normal['running_s']:.1f}s, output: {' | '.join(normal['output'][:3])}")

    step("the image runs: the controller indexes it by policy in the background")
    containerd.ctr(["run", "-d", "--snapshotter", "overlayfs", image, "quickstart-warm", "sleep", "600"])
    t = time.monotonic()
    phase = ""
    while time.monotonic() - t < 600:
        st = controller_image(image)
        phase = st.get("phase", "")
        if phase == "Ready":
            break
        if phase == "Failed":
            sys.exit(f"the controller failed to index {image}: {json.dumps(st)[:2000]}; see {LOGS}/controller.log")
        time.sleep(0.5)
    else:
        sys.exit(f"the controller did not index {image} within 10 min (phase {phase!r}); see {LOGS}/controller.log")
    log(f"indexed by the controller in {time.monotonic() - t:.1f}s (phase {phase})")
    containerd.ctr(["tasks", "rm", "-f", "quickstart-warm"], check=False)
    containerd.ctr(["containers", "rm", "quickstart-warm"], check=False)
    containerd.ctr(["images", "rm", "--sync", image], check=False)
    left = containerd.ctr(["content", "ls", "-q"]).stdout.decode().split()
    if left:
        log(f"warning: {len(left)} blobs still in containerd's content store")

    step("run 2: through Hermes (hermes pull + ctr run --snapshotter hermes), page cache dropped")
    stack.drop_caches()
    lazy = stack.timed_start(containerd, [hermes, "pull", image, "--address", containerd.address, "--namespace",
                                          stack.NAMESPACE, "--snapshotter", "hermes", "--plain-http"],
                             "hermes", image, "quickstart-hermes", counter)
    lazy.pop("sampler")
    m = node.metrics()
    lazy_layers = m.get('hermes_node_layers{state="lazy"}', 0) + m.get('hermes_node_layers{state="fully_local"}', 0)
    log(f"hermes: running after {lazy['running_s']:.1f}s ({lazy_layers:.0f} lazy layers), "
        f"output: {' | '.join(lazy['output'][:3])}")

    step("done")
    rows = [("containerd normal pull", normal), ("Hermes (lazy)", lazy)]
    print()
    print(f"{'path':<24} {'running':>9} {'ready':>9} {'fetched by ready':>17} {'speedup running':>16} "
          f"{'speedup ready':>14}")
    for name, r in rows:
        print(f"{name:<24} {r['running_s']:>8.1f}s {r['ready_s'] or 0:>8.1f}s "
              f"{r['bytes_at_ready'] / 2**20:>13.0f} MiB {normal['running_s'] / r['running_s']:>15.1f}x "
              f"{normal['ready_s'] / r['ready_s']:>13.1f}x")
    print(f"\nImage {image}, {size / 2**20:.0f} MiB compressed, registry capped at {args.rate_mbps:g} MB/s; "
          f"'running' = first output line, 'ready' = 'ready' printed (numpy + pandas imported).")
    print(f"Logs: {LOGS}. Everything is still up: try `{hermes} status --controller {CONTROLLER}`, "
          f"`curl -s http://127.0.0.1:{node.metrics_port}/metrics`. Stop it all: scripts/quickstart.sh --down")
    json.dump({"normal": strip(normal), "hermes": strip(lazy), "image": image, "compressed_bytes": size,
               "rate_mbps": args.rate_mbps}, open(os.path.join(BASE, "result.json"), "w"), indent=1)
    if not lazy_layers:
        print("\nWARNING: no layer was mounted lazily (see node.log): Hermes fell back to a normal pull.")
        return 1
    return 0


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("timeline", "t0")}


def read_proxy_bytes() -> int:
    from throttle_proxy import read_stats
    return read_stats(STATS_PORT)["down"]


def down(args) -> int:
    hermes = os.path.abspath(args.hermes) if args.hermes else ""
    pid_dir = os.path.join(BASE, "pids")
    address = os.path.join(BASE, "containerd", "containerd.sock")
    if os.path.exists(address) and os.path.exists(os.path.join(pid_dir, "containerd.pid")):
        c = stack.Containerd(stack.Procs(BASE, LOGS), os.path.join(BASE, "containerd"), "")
        c.remove_all()
    stack.kill_shims(address)
    for name in ("controller", "containerd", "node", "registry-proxy", "registry"):
        stack.stop_pidfile(os.path.join(pid_dir, name + ".pid"))
    stack.unmount_all(hermes, os.path.join(BASE, "node"))
    stack.unmount_under(BASE)
    left = stack.mounts_under(BASE)
    if left:
        log(f"still mounted: {left}")
        return 1
    shutil.rmtree(BASE, ignore_errors=True)
    if args.purge:
        shutil.rmtree(CACHE, ignore_errors=True)
    log(f"stopped and removed {BASE}" + (f" and {CACHE}" if args.purge else f" (image cache kept in {CACHE})"))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--hermes", required=True)
    u.add_argument("--rate-mbps", type=float, default=32.0)
    d = sub.add_parser("down")
    d.add_argument("--hermes", default="")
    d.add_argument("--purge", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    sys.exit(up(a) if a.cmd == "up" else down(a))
