"""The golden data the compressor tests match: present, and the vendored copy current."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "tests" / "golden"
SHARED = REPO.parent / "shared" / "oracles"

# Each method's tests glob these; an empty folder would silently parametrize to nothing.
EXPECTED = {"recoverable_compression": "*.npz", "stf_mbtf": "*.npz", "llavolta": "pool_*.npz"}


@pytest.mark.parametrize(("folder", "pattern"), EXPECTED.items())
def test_every_method_has_golden_cases(folder, pattern):
    used = Path(os.environ["SQUINT_ORACLES"]) / folder
    assert sorted(used.glob(pattern)), f"no {pattern} golden cases in {used}"
    assert sorted((VENDORED / folder).glob(pattern)), f"the vendored copy {VENDORED / folder} lost its cases"


def test_the_vendored_copy_equals_the_shared_oracles():
    # Only where ../shared/oracles is beside the checkout (the development machines) is there
    # anything to compare; elsewhere the vendored copy is all there is.
    stale = [
        str(path.relative_to(VENDORED))
        for path in sorted(VENDORED.rglob("*"))
        if path.is_file()
        and path.name != "SOURCE.md"
        and SHARED.is_dir()
        and (SHARED / path.relative_to(VENDORED)).is_file()
        and (SHARED / path.relative_to(VENDORED)).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"tests/golden differs from {SHARED}: {stale}; copy them again"
