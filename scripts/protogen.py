"""Generate the Python gRPC stubs from ``protos/`` (``make protos``).

Writes ``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py`` and ``*_pb2_grpc.pyi`` next to each
``.proto``. The generators are pinned exactly in pyproject's ``dev`` extra so that the committed
stubs are reproducible byte for byte (a test regenerates them and compares).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate(out: Path, root: Path = PROTO_ROOT) -> None:
    """Run protoc (grpcio-tools) with the grpc and mypy-protobuf plugins into ``out``."""
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    plugins = {
        name: shutil.which(name, path=str(bindir)) or shutil.which(name)
        for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc")
    }
    missing = [n for n, p in plugins.items() if p is None]
    if missing:
        raise SystemExit(f"protogen: {', '.join(missing)} not found; install the dev extra")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={plugins['protoc-gen-mypy']}",
        f"--plugin=protoc-gen-mypy_grpc={plugins['protoc-gen-mypy_grpc']}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(root)) for p in proto_files(root)),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protogen: protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
