"""Pictures of what a compressor did: the image as CLIP sees it, each output token's patches
tinted in its own colour, token borders drawn, dropped patches darkened."""

from __future__ import annotations

import asyncio
import colorsys
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from compressor_plugins.registry import PluginSettings, load_compressors
from squint.packs import ModelPack
from vision_worker.cache import NullCache
from vision_worker.encoder import EncodeItem, VisionEncoder
from vision_worker.images import ImageLimits, decode_image
from vision_worker.models import VisionModels

SCALE = 2  # drawn at twice CLIP's resolution so single patches stay visible


@dataclass(frozen=True)
class Explanation:
    png: bytes
    compressor: str
    tokens_before: int
    tokens_after: int


def _colour(index: int) -> tuple[int, int, int]:
    # Golden-ratio hues: neighbouring token indices get clearly different colours.
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def model_view(models: VisionModels, image: Image.Image) -> Image.Image:
    """The image after the pack's preprocessing (padding, resize, crop), de-normalised."""
    pixels = models.pixel_values(image)[0].float().cpu().numpy()  # [3, H, W]
    mean = np.asarray(models.image_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(models.image_processor.image_std, dtype=np.float32)[:, None, None]
    rgb = np.clip((pixels * std + mean) * 255.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(rgb)


def render_coverage(
    view: Image.Image, grid: tuple[int, int], covers: Sequence[Sequence[int]], title: str
) -> Image.Image:
    """Tint every patch with the colour of the token covering it (the first, if several)."""
    rows, cols = grid
    width, height = view.size[0] * SCALE, view.size[1] * SCALE
    patch_w, patch_h = width / cols, height / rows
    base = view.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
    owner = np.full(rows * cols, -1)
    for token, patches in enumerate(covers):
        for patch in patches:
            if owner[patch] < 0:
                owner[patch] = token
    overlay = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(overlay)
    for patch, token in enumerate(owner):
        r, c = divmod(patch, cols)
        box = (c * patch_w, r * patch_h, (c + 1) * patch_w, (r + 1) * patch_h)
        draw.rectangle(box, fill=(0, 0, 0, 170) if token < 0 else (*_colour(int(token)), 110))
    for patch, token in enumerate(owner):  # borders where the owning token changes
        r, c = divmod(patch, cols)
        x0, y0, x1, y1 = c * patch_w, r * patch_h, (c + 1) * patch_w, (r + 1) * patch_h
        if c + 1 < cols and owner[patch + 1] != token:
            draw.line((x1, y0, x1, y1), fill=(255, 255, 255, 230), width=1)
        if r + 1 < rows and owner[patch + cols] != token:
            draw.line((x0, y1, x1, y1), fill=(255, 255, 255, 230), width=1)
    picture = Image.alpha_composite(base.convert("RGBA"), overlay)
    framed = Image.new("RGB", (width, height + 24), (20, 20, 20))
    framed.paste(picture.convert("RGB"), (0, 24))
    ImageDraw.Draw(framed).text((6, 6), title, fill=(240, 240, 240))
    return framed


def explain(
    pack: ModelPack,
    image_bytes: bytes,
    compressor: str,
    params: Mapping[str, Any] | None = None,
    question: str = "",
    plugins: PluginSettings = PluginSettings(),
    device: str = "cpu",
) -> Explanation:
    """Compress one image in process and draw what each output token covers."""
    models = VisionModels(pack, device=device)
    encoder = VisionEncoder(models, load_compressors(plugins), NullCache(), ImageLimits())
    [item] = asyncio.run(
        encoder.encode([EncodeItem(image_bytes, compressor, dict(params or {}), question, label="image")])
    )
    view = model_view(models, decode_image(image_bytes, ImageLimits(), "image"))
    title = f"{item.compressor}: {item.tokens_before} -> {item.tokens_after} visual tokens"
    if item.complexity is not None:
        title += f" (complexity {item.complexity:.3f})"
    picture = render_coverage(view, item.grid, item.covers, title)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return Explanation(buffer.getvalue(), item.compressor, item.tokens_before, item.tokens_after)
