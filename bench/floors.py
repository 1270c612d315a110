"""What no compressor removes from a cold request, measured in the same run as the rows.

- **CLIP alone**, in the bench's own process (:class:`vision_worker.models.VisionModels`, the
  vision worker's own code, on the same device): one fresh image decoded, preprocessed and run
  through CLIP to the pack's feature layer, as a cold Analyze does, without gRPC, the cache,
  the compressor or the projector. Every cold request pays at least this before a compressor
  can act.
- **Prefill alone**: a prompt of the row's length and visual-token count sent to the engine's
  Triton model directly (``input_ids`` with the image placeholders, ``visual_embeds`` given,
  one new token), timed by the client to the first token. This is the LLM's part of a cold
  TTFT with nothing in front of it: no vision worker, no orchestrator.

A cold row's floor is CLIP alone plus its engine's prefill of its prompt; the stack's cold TTFT
can only approach it, so ``TTFT / floor`` is what the serving path adds (1.0 would be nothing).
Rows whose spans are pooled inside the LLM get none: their prefill is not a plain one.
"""

from __future__ import annotations

import asyncio
import io
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.media import Images
from bench.progress import Progress
from bench.results import Floors, PrefillFloor, Row
from bench.settings import ENGINE_MODELS


def floor_steps(repeats: int) -> int:
    """The progress bar's steps of :func:`measure_floors`: loading, then CLIP and the prefills per round."""
    return 1 + 2 * repeats


def prefill_prompts(rows: Sequence[Row], pooled_names: set[str]) -> list[tuple[str, int, int]]:
    """The (engine, prompt tokens, visual tokens) of every cold row with a plain prefill, once each."""
    seen: list[tuple[str, int, int]] = []
    for row in rows:
        key = (row.engine, row.prompt_tokens, row.visual_tokens)
        if row.cache == "cold" and row.engine and row.name not in pooled_names and key not in seen:
            seen.append(key)
    return seen


def prompt_ids(prompt_tokens: int, visual_tokens: int, image_token: int, seed: int = 0) -> np.ndarray:
    """``prompt_tokens`` ids: BOS, the image placeholder ``visual_tokens`` times, then text ids."""
    rng = random.Random(seed)
    text = prompt_tokens - 1 - visual_tokens
    if text < 0:
        raise ValueError(f"a prompt of {prompt_tokens} tokens cannot hold {visual_tokens} visual tokens and BOS")
    return np.array([1] + [image_token] * visual_tokens + [rng.randrange(3, 200) for _ in range(text)], np.int64)


class ClipAlone:
    """CLIP in this process, to the pack's feature layer (the vision worker's code)."""

    def __init__(self, pack_root: Path, device: str) -> None:
        from squint.packs import load_pack
        from vision_worker.models import VisionModels

        self.models = VisionModels(load_pack(pack_root), device=device)
        self.device = device
        self.how = f"in the bench's process on {device}: decode, preprocess, CLIP to its feature layer"

    def run(self, image: bytes) -> float:
        import torch
        from PIL import Image

        from vision_worker.models import FeatureRequest

        started = time.perf_counter()
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        self.models.features(picture, FeatureRequest())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def close(self) -> None:
        del self.models


async def _first_token_s(url: str, model: str, inputs: dict[str, tuple[np.ndarray, str]]) -> float:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcaio

    from llm_worker.text_tensors import finish_reason

    tensors = []
    for name, (array, datatype) in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = grpcaio.InferenceServerClient(url)

    async def requests():
        yield {"model_name": model, "inputs": tensors, "request_id": f"bench-floor-{time.monotonic_ns()}"}

    try:
        started = time.perf_counter()
        first: float | None = None
        stream = client.stream_infer(inputs_iterator=requests())
        try:
            async for result, error in stream:
                if error is not None:
                    raise RuntimeError(f"the prefill floor's request to {model} failed: {error}")
                if first is None and len(result.as_numpy("token_ids")):
                    first = time.perf_counter()
                if finish_reason(result.as_numpy("finish_reason")):
                    break
        finally:
            stream.cancel()
        return (first or time.perf_counter()) - started
    finally:
        await client.close()


def prefill_s(
    triton_url: str, engine: str, prompt_tokens: int, visual_tokens: int, image_token: int, hidden: int, device: str
) -> float:
    """Time to the first token of a prompt sent straight to ``engine``'s Triton model."""
    dtype, datatype = (np.float16, "FP16") if device.startswith("cuda") else (np.float32, "FP32")
    inputs = {
        "input_ids": (prompt_ids(prompt_tokens, visual_tokens, image_token), "INT64"),
        "max_new_tokens": (np.array([1], np.int32), "INT32"),
    }
    if visual_tokens:
        visual = np.random.default_rng(visual_tokens).standard_normal((visual_tokens, hidden)).astype(dtype)
        inputs["visual_embeds"] = (visual, datatype)
    return asyncio.run(_first_token_s(triton_url, ENGINE_MODELS[engine], inputs))


def measure_floors(
    pack_root: Path,
    llava_dir: Path,
    triton_url: str,
    prompts: Sequence[tuple[str, int, int]],
    repeats: int,
    device: str,
    images: Images,
    progress: Progress,
) -> Floors:
    """CLIP alone and each prompt's prefill alone, ``repeats`` times each, round-robin."""
    import json

    config = json.loads((llava_dir / "config.json").read_text())
    image_token, hidden = int(config["image_token_index"]), int(config["text_config"]["hidden_size"])
    progress.show("floors: loading CLIP in the bench's process")
    clip = ClipAlone(pack_root, device)
    try:
        clip.run(images.fresh())  # first-call costs, untimed
        for engine, prompt_tokens, visual_tokens in prompts:
            prefill_s(triton_url, engine, prompt_tokens, visual_tokens, image_token, hidden, device)
        progress.step("floors: CLIP loaded")
        clip_times: list[float] = []
        prefill_times: dict[tuple[str, int, int], list[float]] = {key: [] for key in prompts}
        for number in range(1, repeats + 1):
            progress.show(f"floors {number}/{repeats}: CLIP alone")
            clip_times.append(clip.run(images.fresh()))
            progress.step(f"floors {number}/{repeats}: CLIP alone")
            for key in prompts:
                progress.show(f"floors {number}/{repeats}: prefill of {key[1]} tokens on {key[0]}")
                prefill_times[key].append(prefill_s(triton_url, *key, image_token, hidden, device))
            progress.step(f"floors {number}/{repeats}: prefill alone")
    finally:
        clip.close()
    return Floors(
        clip_s=statistics.median(clip_times),
        clip_repeats=len(clip_times),
        clip_how=clip.how,
        prefill=tuple(
            PrefillFloor(engine, prompt_tokens, visual_tokens, statistics.median(times), len(times))
            for (engine, prompt_tokens, visual_tokens), times in prefill_times.items()
        ),
    )
