#!/usr/bin/env python3
"""A TCP proxy in front of a registry with one bandwidth cap shared by all connections.

Counts the bytes it sends from the upstream to clients (what a node "fetched from the registry").
Used in-process by bench/startup.py (ThrottleProxy) or standalone by the quickstart:

    throttle_proxy.py --listen 127.0.0.1:5001 --upstream 127.0.0.1:5000 --rate-mbps 32 \
        --stats 127.0.0.1:5002

A connection to the stats address gets one JSON line {"down": BYTES, "up": BYTES} and is closed.
Rate 0 means no cap. `--per-connection-mbps` also caps each connection on its own (as object
storage behind real registries does), under the shared cap.
"""
import argparse
import asyncio
import json
import threading
import time

CHUNK = 64 << 10


class Bucket:
    """Token bucket in bytes per second, shared by every connection (one loop, no locks)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.burst = max(rate / 20, CHUNK)  # 50 ms of traffic
        self.tokens = self.burst
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class ThrottleProxy:
    """The proxy on its own asyncio loop in a daemon thread (for in-process use)."""

    def __init__(self, listen_port: int, upstream: tuple, rate_bytes: float, stats_port: int = 0,
                 listen_host: str = "127.0.0.1", per_connection_bytes: float = 0):
        self.listen_port, self.upstream, self.stats_port = listen_port, upstream, stats_port
        self.listen_host = listen_host
        self.bucket = Bucket(rate_bytes)
        self.per_connection = per_connection_bytes
        self.connections = 0
        self.down = 0
        self.up = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    def set_rate(self, rate_bytes: float) -> None:
        self.loop.call_soon_threadsafe(lambda: setattr(self.bucket, "rate", rate_bytes))

    async def _pipe(self, reader, writer, downstream: bool, own: "Bucket | None" = None) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if downstream:
                    if own:
                        await own.take(len(data))
                    await self.bucket.take(len(data))
                    self.down += len(data)
                else:
                    self.up += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _client(self, creader, cwriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.close()
            return
        self.connections += 1
        own = Bucket(self.per_connection) if self.per_connection > 0 else None
        await asyncio.gather(self._pipe(creader, uwriter, False), self._pipe(ureader, cwriter, True, own))

    async def _stats(self, reader, writer) -> None:
        writer.write((json.dumps({"down": self.down, "up": self.up}) + "\n").encode())
        await writer.drain()
        writer.close()

    async def _main(self) -> None:
        await asyncio.start_server(self._client, self.listen_host, self.listen_port)
        if self.stats_port:
            await asyncio.start_server(self._stats, "127.0.0.1", self.stats_port)
        self.ready.set()
        await asyncio.Event().wait()

    def run_forever(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    def start_thread(self) -> "ThrottleProxy":
        threading.Thread(target=self.run_forever, daemon=True).start()
        if not self.ready.wait(10):
            raise RuntimeError("throttle proxy did not start")
        return self


def read_stats(port: int) -> dict:
    """The counters of a standalone proxy's stats port."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return json.loads(s.makefile().readline())


def hostport(s: str) -> tuple:
    host, port = s.rsplit(":", 1)
    return host, int(port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate-mbps", type=float, default=32, help="MB/s (10^6 bytes); 0 = no cap")
    ap.add_argument("--per-connection-mbps", type=float, default=0, help="MB/s per connection; 0 = no cap")
    ap.add_argument("--stats", default="")
    a = ap.parse_args()
    proxy = ThrottleProxy(hostport(a.listen)[1], hostport(a.upstream), a.rate_mbps * 1e6,
                          hostport(a.stats)[1] if a.stats else 0, per_connection_bytes=a.per_connection_mbps * 1e6)
    proxy.run_forever()
