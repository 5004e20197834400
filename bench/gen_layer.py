#!/usr/bin/env python3
"""Write a deterministic, realistic-looking uncompressed tar layer of about SIZE_MB to stdout.

Files mimic an ML/Python image: source-like text, shared-library-like binaries (structured,
partly random), and sparse data files; sizes are log-normal, like a real image's. It compresses
with gzip -6 to roughly 35-45 % of its size, as real layers do.
"""
import io
import random
import sys
import tarfile

def main() -> None:
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    target = size_mb << 20
    rng = random.Random(20261123 + seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10))) for _ in range(5000)]
    text = b" ".join(rng.choice(words) + (b"\n" if rng.random() < 0.1 else b"") for _ in range(400_000))
    noise = rng.randbytes(8 << 20)

    def body(n: int) -> bytes:
        kind = rng.random()
        if kind < 0.45:  # source / text
            start = rng.randrange(0, max(1, len(text) - n))
            chunk = text[start:start + n]
            return (chunk * (n // max(1, len(chunk)) + 1))[:n]
        if kind < 0.85:  # binary: random code interleaved with tables of small integers
            out = bytearray()
            while len(out) < n:
                start = rng.randrange(0, len(noise) - 4096)
                out += noise[start:start + rng.randint(256, 4096)]
                out += bytes(rng.randrange(0, 16) for _ in range(rng.randint(256, 2048)))
            return bytes(out[:n])
        return bytes(n)  # zero-filled data

    written = 0
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        i = 0
        while written < target:
            n = min(int(rng.lognormvariate(9.5, 2.0)), 64 << 20, target - written)
            info = tarfile.TarInfo(f"usr/lib/python3/site-packages/pkg{seed}_{i % 97}/mod_{i:06d}.bin")
            info.size = n
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(body(n)))
            written += n + 512
            i += 1

if __name__ == "__main__":
    main()
