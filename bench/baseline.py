"""The reference ``squint bench`` compares the stack to: ``LlavaForConditionalGeneration`` in
this process, with all its visual tokens."""

from __future__ import annotations

import gc
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench.results import Sample


class _TokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:  # the first put is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class Baseline:
    """``LlavaForConditionalGeneration`` in this process: the reference the stack is compared to."""

    def __init__(self, llava_dir: Path, device: str, question: str, max_new_tokens: int) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the bench's own bar is on stderr
        self._torch = torch
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(llava_dir)
        # The stack's dtypes: float32 on the CPU, float16 on a GPU (Triton's gpu model config).
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=self.dtype).to(device).eval()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        self.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def run(self, image: bytes) -> Sample:
        from llm_worker.staged import cache_bytes

        torch = self._torch
        clock = _TokenClock()
        started = time.perf_counter()
        inputs = self.processor(images=Image.open(io.BytesIO(image)), text=self.prompt, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # floating tensors (pixels) take the dtype too
        prompt_tokens = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                streamer=clock,
                return_dict_in_generate=True,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        finished = time.perf_counter()
        completion = int(output.sequences.shape[1]) - prompt_tokens
        visual = int(self.model.config.image_seq_length)
        return Sample(
            ttft_s=(clock.first_token_at or finished) - started,
            e2e_s=finished - started,
            completion_tokens=completion,
            prompt_tokens=prompt_tokens,
            visual_tokens=visual,
            tokens_before=visual,
            kv_bytes=cache_bytes(output.past_key_values),
        )

    def close(self) -> None:
        del self.model
        gc.collect()
