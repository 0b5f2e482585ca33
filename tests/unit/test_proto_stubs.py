"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
STUB_DIR = ROOT / "clusteracme" / "v1"


def test_stubs_match_proto_sources(tmp_path: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "clusteracme" / "v1").glob("*.proto"))
    assert sources, "no .proto sources found"
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", *sources])
    assert rc == 0
    generated = {p.name: p.read_bytes() for p in (tmp_path / "clusteracme" / "v1").iterdir()
                 if p.name != "common_pb2_grpc.py"}  # common.proto has no service
    committed = {p.name: p.read_bytes() for p in STUB_DIR.iterdir() if p.name.endswith((".py", ".pyi"))
                 and p.name != "__init__.py"}
    stale = sorted(name for name in generated if committed.get(name) != generated[name])
    extra = sorted(set(committed) - set(generated))
    assert not stale and not extra, f"stale stubs {stale}, stubs without source {extra}: run `make proto`"
