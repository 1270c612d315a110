"""The frozen vision tower's features, computed once per picture, and the LLaVA forward that reads them.

LLaVA-1.5's stages 1 and 2 freeze CLIP, so a picture's features never change while they run:
computing them once (instead of once per question, per epoch) is most of the training time saved
on a machine without a GPU. The features are what the vision worker hands a compressor — the
hidden states of ``vision_feature_layer``, without CLS under the ``default`` strategy — and the
forward below projects them and splices them over the image placeholders as
``LlavaForConditionalGeneration`` does with ``pixel_values``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn


@torch.no_grad()
def vision_features(
    llava, image_processor, pictures: Sequence[Path], batch_size: int = 32, progress=None
) -> torch.Tensor:
    """``[pictures, tokens, width]`` float32: each picture's tower features, as the vision worker takes them."""
    config = llava.config
    tower = llava.model.vision_tower.eval()
    out = []
    for start in range(0, len(pictures), batch_size):
        images = [Image.open(p).convert("RGB") for p in pictures[start : start + batch_size]]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        out.append(hidden.float())
        if progress is not None:
            progress(min(start + batch_size, len(pictures)), len(pictures))
    return torch.cat(out)


class FeatureLlava(nn.Module):
    """``LlavaForConditionalGeneration`` fed precomputed tower features instead of pixels."""

    def __init__(self, llava) -> None:
        super().__init__()
        self.llava = llava

    @property
    def config(self):
        return self.llava.config

    def forward(self, input_ids, attention_mask, labels=None, image_rows=None, **kwargs):
        """``image_rows``: every picture's visual rows [tokens, width], concatenated in batch order."""
        embeddings = self.llava.get_input_embeddings()(input_ids)
        if image_rows is not None:
            projected = self.llava.model.multi_modal_projector(image_rows.to(embeddings.dtype))
            placeholders = (input_ids == self.llava.config.image_token_index).unsqueeze(-1)
            if int(placeholders.sum()) != projected.shape[0]:
                raise ValueError(f"{int(placeholders.sum())} image placeholders for {projected.shape[0]} visual tokens")
            embeddings = embeddings.masked_scatter(placeholders.expand_as(embeddings), projected)
        return self.llava(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels)
