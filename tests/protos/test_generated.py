"""The committed stubs are exactly what the pinned generators produce from the .proto files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _protogen():
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "scripts" / "protogen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["protogen"] = module
    spec.loader.exec_module(module)
    return module


def test_regenerating_reproduces_committed_stubs(tmp_path: Path) -> None:
    protogen = _protogen()
    protogen.generate(tmp_path)
    protos = protogen.proto_files()
    assert protos, "no .proto files found"
    for proto in protos:
        rel = proto.relative_to(protogen.PROTO_ROOT)
        for suffix in GENERATED:
            name = rel.with_name(rel.stem + suffix)
            fresh = (tmp_path / name).read_bytes()
            committed = (protogen.PROTO_ROOT / name).read_bytes()
            assert fresh == committed, f"{name} is stale: run `make protos`"


def test_every_rpc_and_message_is_documented() -> None:
    """Each rpc and message in the .proto has a comment line right above it."""
    for proto in _protogen().proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("rpc "):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} {stripped}"
