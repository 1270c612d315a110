"""The input-data file shipped for Triton's ``perf_analyzer`` is current, matches the model's
contract, and drives the engine of the pack it was written for (docs/llm_worker.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llm_worker.engine import LLMEngine
from llm_worker.serving import parse_request
from squint.errors import InvalidRequest

REPO = Path(__file__).resolve().parents[3]
INPUT_DATA = REPO / "llm_worker/perf/input_data.json"
CONFIG = REPO / "llm_worker/model_repository/squint_llm_staged/config.pbtxt"
NUMPY_TYPES = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_BOOL": np.bool_}


def _config_inputs() -> dict[str, tuple[type, list[int]]]:
    """Every input of config.pbtxt: its numpy type and dims (-1 = any)."""
    inputs = {}
    for name, data_type, dims in re.findall(
        r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]', CONFIG.read_text().split("output [")[0]
    ):
        inputs[name] = (NUMPY_TYPES.get(data_type, object), [int(d) for d in dims.split(",")])
    return inputs


def _entries() -> list[dict[str, dict]]:
    return json.loads(INPUT_DATA.read_text())["data"]


def test_the_shipped_file_is_what_the_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "input_data.json"
    subprocess.run([sys.executable, str(REPO / "bench/make_perf_input_data.py"), str(out)], check=True, timeout=120)
    assert out.read_text() == INPUT_DATA.read_text(), "run bench/make_perf_input_data.py to refresh the shipped file"


def test_every_tensor_is_an_input_of_the_model_with_a_shape_it_accepts() -> None:
    inputs = _config_inputs()
    assert {"input_ids", "visual_embeds", "image_spans"} <= set(inputs)
    for entry in _entries():
        assert "input_ids" in entry
        for name, tensor in entry.items():
            assert name in inputs, f"{name} is not an input of {CONFIG.name}"
            _, dims = inputs[name]
            shape = tensor["shape"]
            assert len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape, strict=True)), name
            assert len(tensor["content"]) == int(np.prod(shape)), name


def test_the_requests_run_on_the_default_tiny_pack_one_pooled_inside_the_llm(
    engine_for: Callable[[str], LLMEngine],
) -> None:
    engine = engine_for("default")  # the pack bench/make_perf_input_data.py writes: tiny, default, seed 0
    types = _config_inputs()
    visual_after = []
    for entry in _entries():
        arrays = {
            name: np.asarray(tensor["content"], dtype=types[name][0]).reshape(tensor["shape"])
            for name, tensor in entry.items()
        }
        request = parse_request(arrays, default_max_new_tokens=64)
        visual_after.append(engine.prepare(request).visual_tokens)
        steps = list(engine.generate(request))
        assert len(steps) == request.sampling.max_new_tokens == 16
        assert steps[-1].finish_reason == "length"
    assert visual_after == [576, 144]  # the second asks the LLM worker to pool its image 4:1 at layer 1


def test_a_corrupted_entry_is_refused_by_name(engine_for: Callable[[str], LLMEngine]) -> None:
    entry = _entries()[1]
    types = _config_inputs()
    arrays = {
        name: np.asarray(tensor["content"], dtype=types[name][0]).reshape(tensor["shape"])
        for name, tensor in entry.items()
    }
    arrays["image_spans"] = arrays["image_spans"].copy()
    arrays["image_spans"][0, 1] += 1  # the span now reaches past the image's placeholders
    with pytest.raises(InvalidRequest, match="image_spans"):
        engine_for("default").prepare(parse_request(arrays, default_max_new_tokens=64))
