"""Every registered compressor through the whole stack, and the tools around them."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from compressor_plugins.registry import PluginSettings, load_compressors
from squint.app.client import build_request
from squint.vision.v1 import vision_worker_pb2 as vpb
from squint.vision.v1 import vision_worker_pb2_grpc as vpb_grpc
from squint.wire import compressor_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMES = load_compressors(PluginSettings()).names()


def squint(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m squint ARGS``, as a user runs it; fails the test on a non-zero exit."""
    command = [sys.executable, "-m", "squint", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", NAMES)
def test_squint_ask_works_with_every_compressor_and_the_usage_shows_its_count(name, default_stack, tmp_path, png):
    image = png(41)
    path = tmp_path / "image.png"
    path.write_bytes(image)
    ask = f"ask --address {default_stack.orchestrator_address} --image {path} --compressor {name}"
    reply = json.loads(
        squint(*ask.split(), *"--max-new-tokens 4 --json --coverage".split(), "What is in the image?").stdout
    )
    [media] = reply["usage"]["media"]
    assert media["compressor"] == name and media["tokens_before"] == 576 and len(reply["token_ids"]) == 4
    assert reply["usage"]["visual_tokens"] == media["tokens_after"] >= 1
    assert len(media["coverage"]) == media["tokens_after"]  # asked for: which patches each token covers
    with grpc.insecure_channel(default_stack.vision_address) as channel:
        [analysis] = (
            vpb_grpc.VisionWorkerStub(channel)
            .Analyze(
                vpb.AnalyzeRequest(
                    images=[vpb.ImageInput(data=image)],
                    compressor=compressor_spec(name),
                    question="What is in the image?",
                )
            )
            .images
        )
    # Analyze runs CLIP and the compressor: its count is exact, image-dependent ones included.
    assert media["tokens_after"] == analysis.predicted_tokens == analysis.levels[0]


def test_squint_ask_with_a_compressor_parameter(default_stack, tmp_path, png):
    path = tmp_path / "image.png"
    path.write_bytes(png(42))
    ask = f"ask --address {default_stack.orchestrator_address} --image {path} --compressor staged_pool"
    out = squint(*ask.split(), *"--param stride=8 --max-new-tokens 3 What?".split()).stdout
    assert "visual tokens 576 -> 72 (staged_pool)" in out


def test_in_llm_pooling_runs_in_the_llm_worker(default_client, png):
    """staged_pool at layer K splices every token and the LLM worker pools them at layer K:
    the answer differs from no pooling, and from pooling before the LLM."""
    image = png(43)

    def answer(params):
        reply = default_client.Generate(
            build_request("What?", [image], compressor="staged_pool", params=params, max_new_tokens=8), timeout=120
        )
        return reply.usage.media[0].tokens_after, list(reply.token_ids)

    # Layer 0 of the tiny 2-layer LLM: pooled at its last layer, this image's greedy answer would not move.
    spliced, in_llm = answer({"layer": 0, "stride": 8})
    _, in_llm_reference = answer({"layer": 0, "stride": 8, "reference_mode": True})
    before_count, before = answer({"layer": -1, "stride": 8})
    plain = list(
        default_client.Generate(
            build_request("What?", [image], compressor="none", max_new_tokens=8), timeout=120
        ).token_ids
    )
    assert spliced == 576 and before_count == 72
    assert in_llm != plain and in_llm != before
    assert in_llm == in_llm_reference  # positions below 2048: float16 means are exact


def test_squint_explain_writes_a_png_that_differs_between_compressors(tiny_pack, tmp_path, png):
    image = tmp_path / "image.png"
    image.write_bytes(png(44))
    pictures = {}
    for name in ("none", "avgpool", "tome"):
        out = tmp_path / f"{name}.png"
        result = squint(
            "explain", "--pack", str(tiny_pack.root), "--image", str(image), "--compressor", name, "--out", str(out)
        )
        assert f"wrote {out}" in result.stdout
        with Image.open(out) as picture:
            assert picture.format == "PNG" and picture.size[0] >= 336
            pictures[name] = np.asarray(picture.convert("RGB"))
    assert not np.array_equal(pictures["none"], pictures["avgpool"])
    assert not np.array_equal(pictures["avgpool"], pictures["tome"])


def test_squint_calibrate_dfmr_writes_thresholds_the_pack_uses(tiny_pack, tmp_path, png):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack.root, pack)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(6):
        noisy = Image.open(io.BytesIO(png(seed)))
        (images / f"{seed}.png").write_bytes(png(seed) if seed % 2 else _blurred(noisy))
    result = squint(
        "calibrate", "dfmr", "--pack", str(pack), "--images", str(images), "--share", "0.5,0.25,0.25", timeout=180
    )
    assert "factor shares: 1: 3/6" in result.stdout
    calibration = json.loads((pack / "dfmr" / "calibration.json").read_text())
    assert set(calibration["thresholds"]) == {"2", "3"} and calibration["images"] == 6
    manifest = json.loads((pack / "squint-pack.json").read_text())
    assert manifest["compressors"]["dfmr"] == "dfmr" and manifest["id"] != tiny_pack.id
    # Everything else the manifest said stays: the vLLM engine still finds its language model.
    before = json.loads(tiny_pack.manifest_path.read_text())
    assert {k: v for k, v in manifest.items() if k not in ("id", "compressors")} == {
        k: v for k, v in before.items() if k not in ("id", "compressors")
    }
    assert manifest["language_model"] == "language_model"


def _blurred(image: Image.Image) -> bytes:
    from PIL import ImageFilter

    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(12)).save(buffer, format="PNG")
    return buffer.getvalue()
