"""The Hugging Face reference the LLM worker must match, for tests (ours and the orchestrator's).

:func:`hf_reference` runs the whole LLaVA checkpoint the way a Hugging Face user would
(processor, then ``generate``) and also returns what the split stack sends the LLM worker
for the same input: the processor's ``input_ids`` and the projected visual tokens of
``get_image_features``. A split stack is right when its tokens equal ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


@dataclass(frozen=True)
class HFReference:
    """Inputs and greedy output of one prompt.

    ``input_ids``: ``[n_prompt]`` int64, placeholders expanded; ``visual_embeds``:
    ``[n_visual, llm_hidden]`` float32, the images' tokens in prompt order (``None`` without
    images); ``tokens``: the ids ``generate`` produced after the prompt.
    """

    input_ids: torch.Tensor
    visual_embeds: torch.Tensor | None
    tokens: tuple[int, ...]


def random_images(n: int, seed: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """``n`` seeded random RGB images (width x height ``size``)."""
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray(rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB") for _ in range(n)
    ]


def llava_prompt(n_images: int, question: str = "What is in the picture?") -> str:
    """LLaVA-1.5's conversation format with ``n_images`` image placeholders before the question."""
    return "USER: " + "<image>\n" * n_images + question + " ASSISTANT:"


def hf_reference(
    llava_dir: Path | str,
    images: list[Image.Image],
    prompt: str,
    max_new_tokens: int,
    model: LlavaForConditionalGeneration | None = None,
) -> HFReference:
    """Greedy ``generate`` on the full checkpoint, with the inputs the LLM worker gets instead."""
    processor = AutoProcessor.from_pretrained(llava_dir)
    if model is None:
        model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        visual_embeds = None
        if images:
            config = model.config
            features = model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
            # pooler_output is a list of per-image [n_tokens, llm_hidden] tensors.
            visual_embeds = torch.cat(list(features.pooler_output), dim=0)  # [n_visual, llm_hidden]
    input_ids = inputs["input_ids"][0]  # [n_prompt]
    tokens = tuple(int(t) for t in out[0, input_ids.numel() :])
    return HFReference(input_ids=input_ids, visual_embeds=visual_embeds, tokens=tokens)


__all__ = ["HFReference", "hf_reference", "llava_prompt", "random_images"]
