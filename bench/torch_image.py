#!/usr/bin/env python3
"""Build the full benchmark's ML image as an OCI layout: Debian bookworm (debootstrap minbase +
python3) and PyTorch with its CUDA libraries from PyPI wheels, three gzip layers:
  1. Debian + Python   2. nvidia/* CUDA libraries   3. torch and the other packages

    bench/torch_image.py [--cache /var/cache/hermes-bench] [--torch 2.5.1]

Prints the layout dir (CACHE/torch-layout); `bench/startup.sh --image torch` builds it the same way.
Needs debootstrap (`apt-get install debootstrap`), pip for the python3 running this, PyPI access,
about 3 GB of downloads and 12 GB of disk under CACHE; cached, so a second run is instant.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack  # noqa: E402
from stack import log  # noqa: E402

ENTRYPOINT = ["/usr/bin/python3", "-u", "-c",
              "print('started', flush=True)\n"
              "import torch\n"
              "x = torch.arange(6.0).reshape(2, 3)\n"
              "print('torch', torch.__version__, 'sum', float((x @ x.T).sum()))\n"
              "print('ready')\n"]


CACHE = "/var/cache/hermes-bench"
TORCH = "2.5.1"


def build(cache: str = CACHE, torch: str = TORCH) -> str:
    """Build (once) and return the OCI layout dir."""
    layout = os.path.join(cache, "torch-layout")
    if stack.Layout.done(layout):
        return layout
    if not shutil.which("debootstrap"):
        sys.exit("debootstrap is required for the torch image: apt-get install debootstrap")
    os.makedirs(cache, exist_ok=True)
    rootfs = os.path.join(cache, "rootfs")
    if not os.path.exists(rootfs + ".done"):
        shutil.rmtree(rootfs, ignore_errors=True)
        log("debootstrap bookworm (minbase + python3)")
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", rootfs], check=True,
                       stdout=subprocess.DEVNULL)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in os.listdir(os.path.join(rootfs, junk)):
                if os.path.isfile(os.path.join(rootfs, junk, f)):
                    os.remove(os.path.join(rootfs, junk, f))
        open(rootfs + ".done", "w").close()
    pkgs = os.path.join(cache, "torch-pkgs")
    site = os.path.join(pkgs, "usr/local/lib/python3.11/dist-packages")
    if not os.path.exists(pkgs + ".done"):
        shutil.rmtree(pkgs, ignore_errors=True)
        log(f"pip: torch=={torch} and its CUDA wheels for Python 3.11 (several GB)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                        "--target", site, "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
                        "--platform", "manylinux1_x86_64", "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_27_x86_64",
                        "--platform", "manylinux_2_28_x86_64", f"torch=={torch}", "numpy<2.3"], check=True)
        open(pkgs + ".done", "w").close()
    # Split the site-packages tree: CUDA libraries in their own layer, like many real images.
    nvidia = os.path.join(cache, "torch-nvidia")
    if os.path.isdir(os.path.join(site, "nvidia")):
        shutil.rmtree(nvidia, ignore_errors=True)
        dest = os.path.join(nvidia, "usr/local/lib/python3.11/dist-packages")
        os.makedirs(dest)
        os.rename(os.path.join(site, "nvidia"), os.path.join(dest, "nvidia"))
    shutil.rmtree(layout, ignore_errors=True)
    lay = stack.Layout(layout)
    for name, tree in (("debian", rootfs), ("nvidia", nvidia), ("torch", pkgs)):
        log(f"layer {name}: tar + pigz of {tree}")
        lay.add_layer(stack.tar_dir(tree))
    lay.finish("v1", ENTRYPOINT, ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    du = sum(int(subprocess.run(["du", "-sm", t], stdout=subprocess.PIPE).stdout.split()[0])
             for t in (rootfs, nvidia, pkgs))
    json.dump({"description": f"Debian bookworm + Python 3.11 + torch {torch} with its CUDA wheels from PyPI "
                              f"({du} MiB uncompressed, 3 layers); entrypoint: import torch, a small tensor op",
               "uncompressed_mib": du}, open(os.path.join(layout, "meta.json"), "w"))
    return layout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--torch", default=TORCH)
    a = ap.parse_args()
    print(build(a.cache, a.torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
