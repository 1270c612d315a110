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
        self.question = question
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(llava_dir)
        # The stack's dtypes: float32 on the CPU, float16 on a GPU (Triton's gpu model config).
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=self.dtype).to(device).eval()

    def prompt(self, pictures: int, question: str) -> str:
        """The chat template's prompt: the pictures first, then the question (as the stack's client sends them)."""
        content = [{"type": "image"} for _ in range(pictures)] + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def run(self, image: bytes) -> Sample:
        return self.answer([Image.open(io.BytesIO(image))], self.question)[1]

    def answer(self, pictures: list[Image.Image], question: str) -> tuple[list[int], Sample]:
        """Greedy generation on ``pictures`` and ``question``: the generated token ids and the sample."""
        from llm_worker.staged import cache_bytes

        torch = self._torch
        clock = _TokenClock()
        started = time.perf_counter()
        inputs = self.processor(images=pictures, text=self.prompt(len(pictures), question), return_tensors="pt")
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
        generated = output.sequences[0, prompt_tokens:].tolist()
        visual = int(self.model.config.image_seq_length) * len(pictures)
        return generated, Sample(
            ttft_s=(clock.first_token_at or finished) - started,
            e2e_s=finished - started,
            completion_tokens=len(generated),
            prompt_tokens=prompt_tokens,
            visual_tokens=visual,
            tokens_before=visual,
            kv_bytes=cache_bytes(output.past_key_values),
        )

    def text(self, token_ids: list[int]) -> str:
        """Generated ids as text, special tokens left out (as the stack's detokenizer does)."""
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        del self.model
        gc.collect()
