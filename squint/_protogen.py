"""Generate the Python stubs of ``proto/`` into the ``squint`` package.

The stubs are committed; ``tests/contract/test_proto_stubs.py`` regenerates them into a
temporary folder and fails when the committed ones are stale. Run ``python -m squint._protogen``
after editing a ``.proto`` file.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under ``proto_root``, sorted so output is reproducible."""
    return sorted(proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc with ``-I proto`` so imports in the generated code are absolute.

    Returns the generated files, relative to ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {files}")
    generated = sorted(
        Path(name).with_name(Path(name).stem + suffix)
        for name in files
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    # Every folder on the way down is a regular package so the stubs import as squint.<area>.v1.
    for rel in generated:
        for parent in rel.parents:
            if parent == Path(".") or parent == Path("squint"):
                continue
            (out_dir / parent / "__init__.py").touch()
    return generated


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
