"""``squint calibrate NAME``: fit a compressor to a deployment's own images and store the result
in the pack. Any compressor with the Calibrates capability is driven the same way, built-in or
third-party: its ``calibration_params`` become the command's options, its ``needs`` decide what
CLIP computes for each image, and the vision worker hands the stored calibration back to it at
start-up (:func:`compressor_plugins.protocol.create_compressor`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor_plugins.protocol import Calibration, ParamSpec, create_compressor, write_calibration
from compressor_plugins.registry import RegisteredCompressor
from squint.packs import ModelPack, update_manifest
from vision_worker.images import ImageLimits, decode_image
from vision_worker.models import FeatureRequest, VisionModels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_PACK = ".squint/packs/tiny"


@dataclass(frozen=True)
class CalibrationRun:
    """What one ``squint calibrate`` wrote."""

    calibration: Calibration
    images: int  # how many images it was fitted on
    path: Path  # the calibration.json written
    pack: ModelPack  # the pack with its new id


def options_parser(entry: RegisteredCompressor) -> argparse.ArgumentParser:
    """``--images``, ``--pack``, and one option per calibration parameter (``--feature-norm``)."""
    cls = entry.cls
    parser = argparse.ArgumentParser(
        prog=f"squint calibrate {cls.name}",
        description=f"Calibrate {cls.name} ({entry.distribution} {entry.version}) on a folder of images; "
        "the result is stored in the pack and used by every vision worker serving it.",
    )
    parser.add_argument("--images", required=True, help="a folder of representative images")
    parser.add_argument("--pack", default=DEFAULT_PACK, help="the pack the calibration is written into")
    for spec in cls.calibration_params:
        parser.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, **_argument(spec))
    return parser


def _argument(spec: ParamSpec) -> dict[str, Any]:
    shown = f" (default: {spec.default})" if spec.default not in (None, "") else ""
    argument: dict[str, Any] = {"default": spec.default, "help": spec.description + shown}
    if spec.type is bool:
        argument["action"] = argparse.BooleanOptionalAction
    else:
        argument["type"] = spec.type
        if spec.choices:
            argument["choices"] = spec.choices
    return argument


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def calibrate_pack(
    pack: ModelPack, entry: RegisteredCompressor, images: Sequence[Path], options: Mapping[str, Any]
) -> CalibrationRun:
    """Calibrate on ``images`` with validated ``options``; write the calibration into the folder
    the pack names for the compressor (``<pack>/<name>`` when none, added to the manifest) and
    rewrite the manifest, whose id changes with the folder's content."""
    name = entry.cls.name
    models = VisionModels(pack)
    folder = pack.compressor_dirs.get(name)
    # Its weights, if it has any, but not the calibration being replaced.
    compressor = create_compressor(entry.cls, folder, models.device, models.dtype, calibrated=False)
    request = FeatureRequest.for_needs(entry.cls.needs)
    samples = (models.features(decode_image(path.read_bytes(), ImageLimits(), str(path)), request) for path in images)
    calibration = compressor.calibrate(samples, options)
    path = write_calibration(folder or pack.root / name, calibration)
    named = json.loads(pack.manifest_path.read_text()).get("compressors", {})
    updated = update_manifest(pack.root, compressors={**named, name: named.get(name, name)})
    return CalibrationRun(calibration, len(images), path, updated)
