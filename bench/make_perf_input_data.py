"""Write ``llm_worker/perf/input_data.json``: perf_analyzer's input data for ``squint_llm`` on a tiny default pack.

Two requests, each a LLaVA-1.5 prompt with one image (576 visual tokens, hidden 64) and 16
new tokens: the first sends the image's tokens as they are, the second also asks the LLM
worker to pool the image inside the LLM (``image_spans``: layer 1, stride 4, 1d). Greedy.

    .venv/bin/python bench/make_perf_input_data.py [OUT]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from llm_worker.testing import llava_prompt
from squint.app.tiny_pack import write_tiny_pack

MAX_NEW_TOKENS = 16


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        pack = write_tiny_pack(Path(folder), seed=0, shape="default")
        config = AutoConfig.from_pretrained(pack.llava_dir)
        tokenizer = AutoTokenizer.from_pretrained(pack.llava_dir)
    image, hidden = config.image_token_index, config.text_config.hidden_size
    n_visual = config.image_seq_length
    ids = tokenizer(llava_prompt(1)).input_ids
    at = ids.index(image)
    ids = ids[:at] + [image] * n_visual + ids[at + 1 :]  # one placeholder per visual token
    # Seeded, rounded: the file stays small and the same on every run.
    visual = np.round(np.random.RandomState(0).randn(n_visual, hidden) * 0.5, 3)  # [576, 64]
    common = {
        "input_ids": {"content": ids, "shape": [len(ids)]},
        "visual_embeds": {"content": visual.reshape(-1).tolist(), "shape": [n_visual, hidden]},
        "max_new_tokens": {"content": [MAX_NEW_TOKENS], "shape": [1]},
        "temperature": {"content": [0.0], "shape": [1]},
    }
    pooled = dict(common, image_spans={"content": [at, n_visual, 1, 4, 1], "shape": [1, 5]})
    spans_off = dict(common, image_spans={"content": [], "shape": [0, 5]})
    out.write_text(json.dumps({"data": [spans_off, pooled]}, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[1] / "llm_worker/perf/input_data.json"
    )
