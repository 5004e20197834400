#!/usr/bin/env python3
"""Vendors containerd's v1.6 API protos into ../proto/containerd/ with the Go-only options removed.

Usage: vendor.py CONTAINERD_CHECKOUT_API_DIR
gogoproto and containerd's fieldpath plugin options only steer Go code generation; removing them
changes nothing on the wire. Imports are rewritten to this tree's layout (containerd/...).
"""
import pathlib
import re
import sys

FILES = [
    "services/containers/v1/containers.proto",
    "services/content/v1/content.proto",
    "services/diff/v1/diff.proto",
    "services/events/v1/events.proto",
    "services/images/v1/images.proto",
    "services/leases/v1/leases.proto",
    "services/namespaces/v1/namespace.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/tasks/v1/tasks.proto",
    "services/version/v1/version.proto",
    "types/descriptor.proto",
    "types/metrics.proto",
    "types/mount.proto",
    "types/task/task.proto",
]
NOTE = """
// Vendored from containerd v1.6's api/{path}. Hermes changes: the gogoproto and fieldpath imports
// and options are removed (they steer only Go code generation, not the wire format), and imports
// point into this directory tree.
"""


def strip(text: str, path: str) -> str:
    text = re.sub(r'^import weak "[^"]*";\n', "", text, flags=re.M)
    text = re.sub(r"^\s*option \((gogoproto|containerd\.plugin)\.[^;]*;\n", "", text, flags=re.M)
    text = re.sub(r"\s*\[\s*\(gogoproto\.[^\]]*\]", "", text)
    text = text.replace('import "github.com/containerd/containerd/api/', 'import "containerd/')
    assert "gogoproto" not in text and "containerd.plugin" not in text, path
    header_end = text.index("*/\n") + 3
    return text[:header_end] + NOTE.format(path=path) + text[header_end:]


def main() -> None:
    src = pathlib.Path(sys.argv[1])
    out = pathlib.Path(__file__).resolve().parent.parent / "proto" / "containerd"
    for rel in FILES:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(strip((src / rel).read_text(), rel))
        print("wrote", dest)


if __name__ == "__main__":
    main()
