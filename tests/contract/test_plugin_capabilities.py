"""Third-party plugins get the capabilities built-ins get, through the same doors.

Each plugin here is a real distribution on disk (a dist-info with an entry point in the group
``squint.compressors``), put on the path of child processes only, as an installed plugin is:
``squint calibrate NAME`` drives its calibration, the vision worker (through ``squint
explain``) loads it back, and a plugin with half a capability stops start-up by name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compressor_plugins.testing import check_compressor

KEEP_PLUGIN = '''
"""squint-keep: keeps the first patches, as many as its calibration on your images says."""

from compressor_plugins import hookimpl
from compressor_plugins.protocol import (
    Calibration,
    CompressedImage,
    CompressorInput,
    LoadError,
    OutputSpace,
    ParamSpec,
)
from squint.errors import InvalidRequest


class KeepCalibrated:
    name = "keep_calibrated"
    summary = "the first patches, as many as the calibration says"
    params = ()
    needs = frozenset({CompressorInput.PATCH_FEATURES})
    output_space = OutputSpace.VISION
    calibration_params = (
        ParamSpec("share", float, 0.5, minimum=0.0, maximum=1.0, description="share of the patches to keep"),
    )

    def __init__(self):
        self.keep = None  # every patch until calibrated

    def calibrate(self, samples, params):
        counts = [features.patch_features.shape[0] for features in samples]
        if not counts:
            raise InvalidRequest("keep_calibrated needs at least one image")
        keep = max(1, round(params["share"] * sum(counts) / len(counts)))
        return Calibration(data={"keep": keep, "images": len(counts)}, summary=f"keep {keep} of {counts[0]} patches")

    def load_calibration(self, data):
        if not isinstance(data.get("keep"), int) or data["keep"] < 1:
            raise LoadError(f"keep_calibrated: 'keep' must be a whole number >= 1, got {data.get('keep')!r}")
        self.keep = data["keep"]

    def predict_tokens(self, grid, params):
        n = grid[0] * grid[1]
        return n if self.keep is None else min(self.keep, n)

    def compress(self, features, params):
        m = self.predict_tokens(features.grid, params)
        return CompressedImage(tokens=features.patch_features[:m], covers=tuple((i,) for i in range(m)))


@hookimpl
def squint_register_compressors(registry):
    registry.register(KeepCalibrated)
'''

# What the old docs described: a budget-fitting compressor with compress_within alone.
HALF_PLUGIN = """
from compressor_plugins import hookimpl
from compressor_plugins.protocol import CompressedImage, CompressorInput, OutputSpace


class HalfBudget:
    name = "half_budget"
    summary = "compress_within without token_levels"
    params = ()
    needs = frozenset({CompressorInput.PATCH_FEATURES})
    output_space = OutputSpace.VISION

    def predict_tokens(self, grid, params):
        return grid[0] * grid[1]

    def compress(self, features, params):
        n = features.patch_features.shape[0]
        return CompressedImage(tokens=features.patch_features, covers=tuple((i,) for i in range(n)))

    def compress_within(self, features, params, budget):
        return self.compress(features, params)


@hookimpl
def squint_register_compressors(registry):
    registry.register(HalfBudget)
"""


def write_distribution(folder: Path, distribution: str, version: str, entry_point: str, source: str) -> Path:
    """An installed distribution: its module and a dist-info naming it in squint.compressors."""
    module = distribution.replace("-", "_") + "_plugin"
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[squint.compressors]\n{entry_point} = {module}\n")
    return folder


def run_squint(*args: str, path: Path) -> subprocess.CompletedProcess:
    search = os.pathsep.join(p for p in (str(path), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": search}
    return subprocess.run([sys.executable, "-m", "squint", *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def keep_dist(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    return write_distribution(folder, "squint-keep", "0.2", "keep", KEEP_PLUGIN)


def test_squint_calibrate_drives_a_third_party_compressor_and_the_worker_loads_its_calibration(
    keep_dist, tiny_pack, tmp_path, png
):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack.root, pack)  # a pack written by write_tiny_pack
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        (images / f"{seed}.png").write_bytes(png(seed))

    result = run_squint(
        "calibrate", "keep_calibrated", "--pack", str(pack), "--images", str(images), "--share", "0.25", path=keep_dist
    )

    assert result.returncode == 0, result.stderr
    folder = pack.resolve() / "keep_calibrated"
    manifest = json.loads((pack / "squint-pack.json").read_text())
    assert manifest["compressors"] == {"stf": "stf", "keep_calibrated": "keep_calibrated"}
    assert manifest["id"] != tiny_pack.id
    assert result.stdout.splitlines() == [
        "calibrated keep_calibrated on 3 images: keep 144 of 576 patches",
        f"wrote {folder / 'calibration.json'}; pack id is now {manifest['id']}",
    ]
    assert json.loads((folder / "calibration.json").read_text()) == {"keep": 144, "images": 3}

    # The vision worker's encoder (what `squint explain` runs) hands the calibration back.
    explained = run_squint(
        "explain",
        "--pack",
        str(pack),
        "--image",
        str(images / "0.png"),
        "--compressor",
        "keep_calibrated",
        "--out",
        str(tmp_path / "explain.png"),
        path=keep_dist,
    )
    assert explained.returncode == 0, explained.stderr
    assert "keep_calibrated: 576 -> 144 visual tokens" in explained.stdout


def test_its_options_are_validated_like_parameters(keep_dist, tiny_pack, tmp_path, png):
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(png(0))
    # Refused before the pack is read for more than its manifest: nothing is written into it.
    args = ("calibrate", "keep_calibrated", "--pack", str(tiny_pack.root), "--images", str(images), "--share", "2")
    result = run_squint(*args, path=keep_dist)
    assert result.returncode == 1
    assert "calibration option share (compressor 'keep_calibrated') is 2.0; the maximum is 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert "keep_calibrated" not in json.loads(tiny_pack.manifest_path.read_text())["compressors"]


def test_the_calibrated_plugin_passes_the_kit(keep_dist):
    spec = importlib.util.spec_from_file_location("squint_keep_plugin", keep_dist / "squint_keep_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_compressor(module.KeepCalibrated(), ({},))


def test_a_plugin_with_half_a_capability_stops_start_up_naming_the_missing_method(tmp_path):
    site = write_distribution(tmp_path, "squint-half", "0.1", "half", HALF_PLUGIN)
    result = run_squint("plugins", "list", path=site)
    assert result.returncode == 1
    assert (
        "plugin 'half': compressor 'half_budget' has compress_within but not token_levels: "
        "a budget-fitting compressor needs both"
    ) in result.stderr
    assert "Traceback" not in result.stderr
