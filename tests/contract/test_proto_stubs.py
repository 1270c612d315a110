"""The committed stubs are what protoc makes of the committed .proto files."""

from squint import _protogen


def test_committed_stubs_are_fresh(tmp_path):
    generated = _protogen.generate(tmp_path)
    assert generated, "no .proto files found"
    stale = [str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (_protogen.REPO_ROOT / rel).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `python -m squint._protogen`"


def test_every_field_and_rpc_is_commented():
    missing = []
    for path in _protogen.proto_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax"))
            if (is_field or stripped.startswith("rpc ")) and not lines[number - 1].strip().startswith("//"):
                missing.append(f"{path.name}:{number + 1}: {stripped}")
    assert not missing, "proto fields and rpcs without a comment above them:\n" + "\n".join(missing)
