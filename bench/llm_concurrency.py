"""Benchmark (not a test): the staged engine (``squint_llm_staged``, Squint's own continuous batching)
on tritonserver under 1, 4 and 16 concurrent streaming clients. (vLLM's engine is measured by
``squint bench``'s streams table.)

Starts tritonserver twice on a tiny pack with ``llm_worker.tritonserver.TritonServerProcess``:
once serial (``SQUINT_LLM_MAX_BATCH=1``, the baseline) and once batching (``--max-batch``,
default 16). Each client sends ``--requests`` requests one after another over KServe gRPC
streaming; the prompts mix 0, 1 and 2 images, some pooled inside the LLM, and each request
generates up to ``--max-new-tokens`` tokens, greedily (tokens/s counts what came back). Prints
requests/s and tokens/s per concurrency for both servers and the batching server's ratio to
the serial one, measured in the same run.

    .venv/bin/python bench/llm_concurrency.py [--shape default] [--requests 6] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from transformers import AutoConfig

from bench.environment import environ
from llm_worker import STAGED_MODEL_NAME
from llm_worker.text_tensors import finish_reason
from llm_worker.tritonserver import TritonServerProcess, TritonServerSettings
from squint.app.tiny_pack import write_tiny_pack


@dataclass(frozen=True)
class Result:
    concurrency: int
    requests: int
    tokens: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def make_inputs(
    index: int, image_token: int, n_image: int, hidden: int, n_layers: int, max_new_tokens: int
) -> list[grpcclient.InferInput]:
    """Request ``index`` of the mix: 0, 1 or 2 images, every fourth with an in-LLM directive."""
    rng = random.Random(index)
    ids = [1] + [rng.randrange(3, 200) for _ in range(rng.randrange(4, 24))]
    spans = []
    for _ in range(index % 3):
        if index % 4 == 1:
            spans.append([len(ids), n_image, rng.randrange(n_layers), 4, 1])
        ids += [image_token] * n_image + [rng.randrange(3, 200) for _ in range(3)]
    arrays = {
        "input_ids": (np.array(ids, np.int64), "INT64"),
        "max_new_tokens": (np.array([max_new_tokens], np.int32), "INT32"),
    }
    if index % 3:
        visual = np.random.RandomState(index).randn((index % 3) * n_image, hidden).astype(np.float32)
        arrays["visual_embeds"] = (visual, "FP32")
    if spans:
        arrays["image_spans"] = (np.array(spans, np.int64), "INT64")
    inputs = []
    for name, (array, datatype) in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def stream_one(
    client: grpcaio.InferenceServerClient, request_id: str, inputs: list[grpcclient.InferInput]
) -> int:
    async def requests():
        yield {"model_name": STAGED_MODEL_NAME, "inputs": inputs, "request_id": request_id}

    tokens = 0
    stream = client.stream_infer(inputs_iterator=requests())
    try:
        async for result, error in stream:
            if error is not None:
                raise RuntimeError(f"request {request_id} failed: {error}")
            tokens += len(result.as_numpy("token_ids"))
            if finish_reason(result.as_numpy("finish_reason")):
                return tokens
    finally:
        stream.cancel()
    raise RuntimeError(f"request {request_id} ended without a final response")


async def drive(url: str, concurrency: int, per_client: int, make) -> Result:
    client = grpcaio.InferenceServerClient(url)

    async def one_client(c: int) -> int:
        return sum([await stream_one(client, f"c{c}-r{r}", make(c * per_client + r)) for r in range(per_client)])

    try:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one_client(c) for c in range(concurrency))))
        seconds = time.perf_counter() - start
    finally:
        await client.close()
    return Result(concurrency, concurrency * per_client, tokens, seconds)


@contextlib.contextmanager
def server(pack_root: Path, max_batch: int, max_queue: int):
    with environ({"SQUINT_LLM_MAX_BATCH": str(max_batch), "SQUINT_LLM_MAX_QUEUE": str(max_queue)}):
        settings = TritonServerSettings(pack_dir=pack_root, models=(STAGED_MODEL_NAME,))
        with TritonServerProcess(settings) as process:
            yield process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="default", choices=["default", "alt"], help="tiny pack shape")
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's SQUINT_LLM_MAX_BATCH")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        pack = write_tiny_pack(Path(folder), seed=0, shape=args.shape)
        config = AutoConfig.from_pretrained(pack.llava_dir)
        text = config.text_config

        def make(index: int) -> list[grpcclient.InferInput]:
            return make_inputs(
                index,
                config.image_token_index,
                config.image_seq_length,
                text.hidden_size,
                text.num_hidden_layers,
                args.max_new_tokens,
            )

        print(
            f"tiny pack {args.shape}: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
            f"{config.image_seq_length} visual tokens per image; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f} at start; {args.requests} requests per client, "
            f"{args.max_new_tokens} new tokens each",
            flush=True,
        )
        results: dict[str, dict[int, Result]] = {}
        for label, max_batch in (
            ("serial (max_batch 1)", 1),
            (f"batched (max_batch {args.max_batch})", args.max_batch),
        ):
            with server(pack.root, max_batch, max_queue=max(64, max(args.concurrency))) as process:
                asyncio.run(drive(process.grpc_url, 2, 1, make))  # warm the client path
                results[label] = {}
                for concurrency in args.concurrency:
                    result = asyncio.run(drive(process.grpc_url, concurrency, args.requests, make))
                    results[label][concurrency] = result
                    print(
                        f"{label:24s} concurrency {concurrency:3d}: {result.requests:4d} requests, "
                        f"{result.requests_per_s:7.2f} req/s, "
                        f"{result.tokens_per_s:8.1f} tok/s ({result.seconds:.1f} s)",
                        flush=True,
                    )
        serial, batched = results.values()
        print("\nconcurrency | serial req/s | serial tok/s | batched req/s | batched tok/s | batched / serial")
        for concurrency in args.concurrency:
            s, b = serial[concurrency], batched[concurrency]
            print(
                f"{concurrency:11d} | {s.requests_per_s:12.2f} | {s.tokens_per_s:12.1f} | {b.requests_per_s:13.2f} | "
                f"{b.tokens_per_s:13.1f} | {b.tokens_per_s / s.tokens_per_s:15.2f}x"
            )
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    sys.exit(main())
