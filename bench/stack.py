"""The moving parts of a Hermes node on one machine, for bench/startup.py and the quickstart.

A docker-registry, a containerd with its own config/root/state/socket and Hermes declared as the
`hermes` proxy snapshotter, the `hermes node` daemon, optionally `hermes controller --standalone`;
OCI image layouts built from generated trees or directories and pushed with skopeo; one timed
container start (pull + `ctr run` until the first output line and until a "ready" line).

Every process started is recorded in DIR/pids/NAME.pid so another invocation can stop it
(`stop_recorded`), and its output goes to LOGS/NAME.log.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

NAMESPACE = "hermes-bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(what: str, ok, timeout: float = 60.0, proc=None, logfile: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except Exception:
            pass
        if proc is not None and proc.poll() is not None:
            tail = open(logfile).read()[-3000:] if logfile and os.path.exists(logfile) else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = open(logfile).read()[-3000:] if logfile and os.path.exists(logfile) else ""
            raise RuntimeError(f"{what}: not ready within {timeout:.0f}s\n{tail}")
        time.sleep(0.05)


def http_get(url: str):
    """The body of a 200 answer, or None (404, refused, ...)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read()
    except OSError:
        return None


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounts_under(prefix: str) -> list:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            p = line.split()[4].replace("\\040", " ")
            if p == prefix or p.startswith(prefix.rstrip("/") + "/"):
                points.append(p)
    return sorted(set(points), key=len, reverse=True)


def unmount_under(prefix: str) -> None:
    for p in mounts_under(prefix):
        if subprocess.run(["umount", p], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", p], stderr=subprocess.DEVNULL)


class Procs:
    """Processes started by this run, with pid files and one log file each."""

    def __init__(self, state_dir: str, log_dir: str):
        self.pid_dir = os.path.join(state_dir, "pids")
        self.log_dir = log_dir
        os.makedirs(self.pid_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        self.children = {}

    def start(self, name: str, cmd: list, env=None) -> subprocess.Popen:
        logfile = self.logfile(name)
        out = open(logfile, "ab")
        out.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
        out.flush()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             start_new_session=True)
        self.children[name] = p
        with open(os.path.join(self.pid_dir, name + ".pid"), "w") as f:
            f.write(str(p.pid))
        return p

    def logfile(self, name: str) -> str:
        return os.path.join(self.log_dir, name + ".log")

    def stop(self, name: str, timeout: float = 10.0) -> None:
        p = self.children.pop(name, None)
        pidfile = os.path.join(self.pid_dir, name + ".pid")
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        else:
            stop_pidfile(pidfile, timeout)
        if os.path.exists(pidfile):
            os.remove(pidfile)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_pidfile(pidfile: str, timeout: float = 10.0) -> None:
    """SIGTERM the process recorded in PIDFILE (and SIGKILL it after TIMEOUT)."""
    try:
        pid = int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Registry


def start_registry(procs: Procs, data_dir: str, port: int, proxy_remote: str | None = None,
                   name: str = "registry") -> None:
    """Debian's docker-registry on 127.0.0.1:`port`; with `proxy_remote` (host:port) a
    pull-through cache of that registry (the mirror of containerd's hosts.toml)."""
    os.makedirs(data_dir, exist_ok=True)
    config = os.path.join(data_dir, "config.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data_dir}/data\n"
                + ("" if proxy_remote else "  delete:\n    enabled: true\n")
                + f"http:\n  addr: 127.0.0.1:{port}\n"
                + (f"proxy:\n  remoteurl: http://{proxy_remote}\n" if proxy_remote else ""))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    p = procs.start(name, ["docker-registry", "serve", config], env=env)
    wait_for(name, lambda: port_open(port), 30, p, procs.logfile(name))


# --------------------------------------------------------------------------------------------
# containerd


def containerd_config(dir: str, node_socket: str, version: int = 2) -> str:
    """A containerd without CRI, with the node as the `hermes` proxy snapshotter: config version 2
    for containerd 1.6, version 3 for 2.x (whose transfer service, used by its `ctr pull`, gives a
    proxy snapshotter the image labels only when the proxy exports
    `enable_remote_snapshot_annotations`)."""
    if version == 3:
        disabled = '"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"'
        exports = '[proxy_plugins.hermes.exports]\n  enable_remote_snapshot_annotations = "true"\n'
    else:
        disabled, exports = '"io.containerd.grpc.v1.cri"', ""
    return f"""version = {version}
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[proxy_plugins.hermes]
  type = "snapshot"
  address = "{node_socket}"
{exports}"""


def containerd2_bin() -> str:
    """The directory with containerd 2.x's containerd, shim and ctr (scripts/containerd2.sh fetch
    caches it; HERMES_CONTAINERD2_BIN overrides)."""
    if os.environ.get("HERMES_CONTAINERD2_BIN"):
        return os.environ["HERMES_CONTAINERD2_BIN"]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "containerd2.sh")
    r = subprocess.run(["bash", script, "bin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0 or not r.stdout.strip():
        sys.exit(f"containerd 2.x is not fetched ({r.stderr.decode(errors='replace').strip()}): "
                 "run bash scripts/containerd2.sh fetch")
    return r.stdout.decode().strip()


class Containerd:
    """A containerd in DIR: the system's 1.6 (FLAVOUR "1.6") or the cached 2.x ("2", its directory
    first on its PATH so that it starts its own shim; runc stays the system's)."""

    def __init__(self, procs: Procs, dir: str, node_socket: str, flavour: str = "1.6"):
        self.procs, self.dir, self.node_socket = procs, dir, node_socket
        self.address = os.path.join(dir, "containerd.sock")
        if flavour not in ("1.6", "2"):
            raise ValueError(f"containerd flavour {flavour!r}: 1.6 or 2")
        self.bin_dir = containerd2_bin() if flavour == "2" else None
        self.containerd_bin = os.path.join(self.bin_dir, "containerd") if self.bin_dir else "containerd"
        self.ctr_bin = os.path.join(self.bin_dir, "ctr") if self.bin_dir else "ctr"
        self.config_version = 3 if self.bin_dir else 2

    def version(self) -> str:
        """What `containerd --version` says, e.g. 1.6.20 or 2.1.9."""
        out = subprocess.run([self.containerd_bin, "--version"], stdout=subprocess.PIPE).stdout.decode().split()
        word = out[2].lstrip("v") if len(out) > 2 else "?"
        return re.split(r"[~+-]", word)[0]

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(containerd_config(self.dir, self.node_socket, self.config_version))
        env = None
        if self.bin_dir:
            env = dict(os.environ, PATH=self.bin_dir + os.pathsep + os.environ.get("PATH", ""))
        p = self.procs.start("containerd", [self.containerd_bin, "--config", config], env=env)
        wait_for("containerd", lambda: self.ctr(["version"], check=False).returncode == 0, 60, p,
                 self.procs.logfile("containerd"))

    def ctr(self, args: list, check: bool = True, namespace: str = NAMESPACE, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        r = subprocess.run([self.ctr_bin, "--address", self.address, "-n", namespace] + args,
                           stdin=subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr -n {namespace} {' '.join(args)}: {r.stderr.decode(errors='replace')[-2000:]}")
        return r

    def remove_all(self, namespace: str = NAMESPACE) -> None:
        """Tasks and containers of NAMESPACE."""
        if not os.path.exists(self.address):
            return
        for task in self.ctr(["tasks", "ls", "-q"], check=False, namespace=namespace).stdout.decode().split():
            self.ctr(["tasks", "kill", "-s", "SIGKILL", task], check=False, namespace=namespace)
            self.ctr(["tasks", "rm", "-f", task], check=False, namespace=namespace)
        for c in self.ctr(["containers", "ls", "-q"], check=False, namespace=namespace).stdout.decode().split():
            self.ctr(["containers", "rm", c], check=False, namespace=namespace)

    def stop(self) -> None:
        self.remove_all()
        kill_shims(self.address)
        self.procs.stop("containerd")
        unmount_under(self.dir)

    def wipe(self) -> None:
        """Stop, delete root and state (content, snapshots, metadata)."""
        self.stop()
        for sub in ("root", "state", "opt"):
            shutil.rmtree(os.path.join(self.dir, sub), ignore_errors=True)


def kill_shims(address: str) -> None:
    """SIGKILL the shims of the containerd at ADDRESS and their children (container inits)."""
    shims, parent = [], {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        if "containerd-shim" in cmd and address in cmd:
            shims.append(int(pid))
    victims = [p for p, pp in parent.items() if pp in shims] + shims
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------
# hermes node


class Node:
    def __init__(self, procs: Procs, hermes: str, root: str, socket_path: str, extra=()):
        self.procs, self.hermes, self.root, self.socket = procs, hermes, root, socket_path
        self.extra = list(extra)
        self.metrics_port = free_port()

    @property
    def store(self) -> str:
        return os.path.join(self.root, "ztocs")

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        if os.path.exists(self.socket):
            os.remove(self.socket)
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        p = self.procs.start("node", [self.hermes, "node", "--root", self.root, "--socket", self.socket,
                                      "--metrics", f"127.0.0.1:{self.metrics_port}", "--plain-http"]
                             + self.extra, env=env)

        def listening():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.socket)
                return True
            finally:
                s.close()
        wait_for("hermes node", listening, 60, p, self.procs.logfile("node"))

    def metrics(self) -> dict:
        """Prometheus text → {"name{labels}": value}."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        self.procs.stop("node")
        unmount_all(self.hermes, self.root)

    def wipe(self, keep_store: bool) -> None:
        self.stop()
        if not os.path.isdir(self.root):
            return
        for entry in os.listdir(self.root):
            if keep_store and entry == "ztocs":
                continue
            path = os.path.join(self.root, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def unmount_all(hermes: str, root: str) -> None:
    """`hermes node --root ROOT --unmount-all`, then anything left mounted under ROOT."""
    if os.path.isdir(root) and os.path.exists(hermes):
        subprocess.run([hermes, "node", "--root", root, "--unmount-all"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    unmount_under(root)


# --------------------------------------------------------------------------------------------
# Images: OCI layouts of gzip layers, pushed with skopeo


class Layout:
    """An OCI image layout being built: add layers as tar streams, then finish and push."""

    def __init__(self, dir: str):
        self.dir = dir
        os.makedirs(os.path.join(dir, "blobs", "sha256"), exist_ok=True)
        self.layers, self.diff_ids = [], []

    def _put_bytes(self, data: bytes) -> tuple:
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.dir, "blobs", "sha256", d), "wb") as f:
            f.write(data)
        return "sha256:" + d, len(data)

    def add_layer(self, write_tar, level: int = 6) -> None:
        """WRITE_TAR(fileobj) writes an uncompressed tar; it is gzipped (pigz) into a blob."""
        tmp = os.path.join(self.dir, "layer.tmp")
        gz = "pigz" if shutil.which("pigz") else "gzip"
        with open(tmp, "wb") as out:
            z = subprocess.Popen([gz, f"-{level}", "-n"], stdin=subprocess.PIPE, stdout=out)
            diff = hashlib.sha256()

            class Tee:
                def write(self, b):
                    diff.update(b)
                    z.stdin.write(b)
                    return len(b)

                def flush(self):
                    pass
            write_tar(Tee())
            z.stdin.close()
            if z.wait() != 0:
                raise RuntimeError(f"{gz} failed")
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        size = os.path.getsize(tmp)
        os.rename(tmp, os.path.join(self.dir, "blobs", "sha256", d))
        self.layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": "sha256:" + d, "size": size})
        self.diff_ids.append("sha256:" + diff.hexdigest())

    def finish(self, tag: str, entrypoint: list, env: list, workdir: str = "/") -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Entrypoint": entrypoint, "Env": env, "WorkingDir": workdir},
                             "rootfs": {"type": "layers", "diff_ids": self.diff_ids}}).encode()
        cd, cs = self._put_bytes(config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                               "layers": self.layers}).encode()
        md, ms = self._put_bytes(manifest)
        with open(os.path.join(self.dir, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
        with open(os.path.join(self.dir, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        with open(os.path.join(self.dir, "DONE"), "w") as f:
            f.write(tag)

    @staticmethod
    def done(dir: str) -> bool:
        return os.path.exists(os.path.join(dir, "DONE"))

    @staticmethod
    def compressed_size(dir: str) -> int:
        with open(os.path.join(dir, "index.json")) as f:
            md = json.load(f)["manifests"][0]["digest"].split(":")[1]
        with open(os.path.join(dir, "blobs", "sha256", md)) as f:
            return sum(layer["size"] for layer in json.load(f)["layers"])


def push(layout_dir: str, tag: str, ref: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
                    "--dest-tls-verify=false", f"oci:{layout_dir}:{tag}", f"docker://{ref}"],
                   check=True, stdout=subprocess.DEVNULL)


def tar_dir(src: str):
    """A WRITE_TAR for Layout.add_layer: the tree under SRC (GNU tar, numeric owners, sorted)."""
    def write(out):
        p = subprocess.Popen(["tar", "-C", src, "--numeric-owner", "--sort=name", "-cf", "-", "."],
                             stdout=subprocess.PIPE)
        for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
            out.write(chunk)
        if p.wait() != 0:
            raise RuntimeError(f"tar of {src} failed")
    return write


# --------------------------------------------------------------------------------------------
# One timed start


class Sampler:
    """Samples a byte counter every 100 ms into a timeline [(seconds, bytes)]."""

    def __init__(self, counter):
        self.counter, self.t0, self.base = counter, time.monotonic(), counter()
        self.timeline = [(0.0, 0)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> tuple:
        return round(time.monotonic() - self.t0, 3), self.counter() - self.base

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.timeline.append(self.now())

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        self.timeline.append(self.now())
        return self.timeline


def timed_start(containerd: Containerd, pull_cmd: list, snapshotter: str, ref: str, name: str,
                counter, ready_line: str = "ready", timeout: float = 1800, args=()) -> dict:
    """Pull with PULL_CMD, then `ctr run` the image: seconds and registry bytes at each step."""
    s = Sampler(counter)
    r = subprocess.run(pull_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    if r.returncode != 0:
        s.stop()
        raise RuntimeError(f"{' '.join(pull_cmd)} failed: {r.stderr.decode(errors='replace')[-3000:]}")
    pulled = s.now()
    p = subprocess.Popen([containerd.ctr_bin, "--address", containerd.address, "-n", NAMESPACE, "run", "--rm",
                          "--snapshotter", snapshotter, ref, name] + list(args),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = ready = None
    output = []
    for raw in p.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        output.append(line)
        if first is None:
            first = s.now()
        if ready is None and line.strip() == ready_line:
            ready = s.now()
    err = p.stderr.read().decode(errors="replace")
    rc = p.wait(timeout)
    exited = s.now()
    timeline = s.stop()
    if rc != 0 or first is None:
        raise RuntimeError(f"ctr run exited {rc}; output {output[-5:]}; stderr {err[-2000:]}")
    return {"pulled_s": pulled[0], "running_s": first[0], "ready_s": ready[0] if ready else None,
            "exited_s": exited[0], "bytes_at_running": first[1], "bytes_at_ready": ready[1] if ready else None,
            "bytes_at_exit": exited[1], "output": output[:20], "timeline": timeline, "t0": s.t0,
            "sampler": s}


def image_tar_writer(entries):
    """A WRITE_TAR from ENTRIES: iterable of (path, kind, payload, mode); kind is 'dir', 'file'
    (payload bytes), 'symlink' (payload target) or 'hardlink'."""
    def write(out):
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, kind, payload, mode in entries:
                info = tarfile.TarInfo(path)
                info.mtime = 1700000000
                info.mode = mode
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = payload
                    tar.addfile(info)
                else:
                    import io
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return write
