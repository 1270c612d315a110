"""The vision worker's models, loaded from a pack: CLIP and the LLaVA projector.

CLIP (vision and text towers) loads from the pack's CLIP checkpoint with ``CLIPModel``; the
projector is read from the LLaVA checkpoint's safetensors by name, so the 7B language model
next to it is never loaded here. LLaVA-1.5 freezes CLIP, so its vision tower is CLIP's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from compressor_plugins.protocol import CompressorInput, ImageFeatures
from squint.packs import ModelPack, PackError

# Longest image side fed to the processor; above it an image is shrunk first (see pixel_values).
PRESHRINK_SIDE = 4096

logger = logging.getLogger(__name__)

# Where llava-hf checkpoints keep the projector: the older layout at the top level, the
# newer one under "model.".
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PackError(f"{folder} has no .safetensors weights")
    return files


def load_prefixed_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of ``prefixes``, the prefix stripped."""
    found: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                for prefix in prefixes:
                    if name.startswith(prefix):
                        found[name[len(prefix) :]] = handle.get_tensor(name)
    return found


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` is the checkpoint's dtype on a GPU and float32 on a CPU."""
    if name == "auto":
        if device.type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        # Triton's python backend has no numpy bfloat16: ship float16 instead.
        return torch.float16 if checkpoint_dtype == torch.bfloat16 else checkpoint_dtype
    return {"float32": torch.float32, "float16": torch.float16}[name]


@dataclass(frozen=True)
class FeatureRequest:
    """Which optional inputs a compressor needs beyond the patch features."""

    hidden_states: bool = False
    cls_token: bool = False
    last_block_qk: bool = False
    projected_patches: bool = False
    llm_tokens: bool = False
    question: str | None = None  # embed this text with CLIP's text tower

    @classmethod
    def for_needs(cls, needs: frozenset[CompressorInput], question: str = "") -> FeatureRequest:
        return cls(
            hidden_states=CompressorInput.HIDDEN_STATES in needs,
            cls_token=CompressorInput.CLS_TOKEN in needs,
            last_block_qk=CompressorInput.LAST_BLOCK_QK in needs,
            projected_patches=CompressorInput.PROJECTED_PATCHES in needs,
            llm_tokens=CompressorInput.LLM_TOKENS in needs,
            question=question if CompressorInput.QUESTION_EMBEDDING in needs else None,
        )


class VisionModels:
    """CLIP, the image processor and the projector of one pack, on one device."""

    def __init__(self, pack: ModelPack, device: str = "cpu", dtype: str = "auto") -> None:
        self.pack = pack
        self.device = torch.device(device)
        llava_config = LlavaConfig.from_pretrained(pack.llava_dir)
        if llava_config.vision_feature_select_strategy != "default":
            raise PackError(
                f"{pack.llava_dir}: vision_feature_select_strategy "
                f"{llava_config.vision_feature_select_strategy!r} is not supported; Squint compresses "
                "the patch grid and needs 'default' (CLS dropped), as LLaVA-1.5"
            )
        if not isinstance(llava_config.vision_feature_layer, int):
            raise PackError(
                f"{pack.llava_dir}: a list vision_feature_layer {llava_config.vision_feature_layer} is not supported"
            )
        self.feature_layer: int = llava_config.vision_feature_layer
        self.dtype = resolve_dtype(dtype, self.device, getattr(llava_config, "dtype", None))
        self.image_processor = AutoImageProcessor.from_pretrained(pack.llava_dir)
        clip = CLIPModel.from_pretrained(pack.clip_dir, dtype=self.dtype)
        vision = clip.config.vision_config
        if (vision.hidden_size, vision.image_size, vision.patch_size) != (
            llava_config.vision_config.hidden_size,
            llava_config.vision_config.image_size,
            llava_config.vision_config.patch_size,
        ):
            raise PackError(
                f"pack {pack.root}: the CLIP checkpoint ({vision.hidden_size} wide, {vision.image_size}px, "
                f"patch {vision.patch_size}) is not the LLaVA checkpoint's vision tower "
                f"({llava_config.vision_config.hidden_size} wide, {llava_config.vision_config.image_size}px, "
                f"patch {llava_config.vision_config.patch_size})"
            )
        self.clip = clip.to(self.device).eval()
        self.text_tokenizer = AutoTokenizer.from_pretrained(pack.clip_dir)
        self.grid = (vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
        self.vision_width = vision.hidden_size
        self.llm_width = llava_config.text_config.hidden_size
        self.projector = self._load_projector(llava_config)

    def _load_projector(self, config: LlavaConfig) -> LlavaMultiModalProjector:
        state = load_prefixed_tensors(self.pack.llava_dir, _PROJECTOR_PREFIXES)
        projector = LlavaMultiModalProjector(config)
        missing, unexpected = projector.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PackError(
                f"{self.pack.llava_dir}: the multimodal projector weights do not fit "
                f"(missing {missing}, unexpected {unexpected})"
            )
        return projector.to(self.device, self.dtype).eval()

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The pack's preprocessing (LLaVA-1.5: pad to square with the mean colour, resize, normalise).

        Padding to square makes ``longest side ** 2`` pixels: a 962 x 33845 image (32 MP, within
        the pixel limit) would become a 1.1-gigapixel canvas and hold the worker for minutes. An
        image whose longest side exceeds :data:`PRESHRINK_SIDE` is first shrunk, keeping its
        aspect ratio, to that side; the processor then brings it to 336 px anyway.
        """
        if max(image.size) > PRESHRINK_SIDE:
            scale = PRESHRINK_SIDE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        batch = self.image_processor(images=image, return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype)  # [1, 3, H, W]

    @torch.inference_mode()
    def features(self, image: Image.Image, request: FeatureRequest) -> ImageFeatures:
        """One CLIP forward of one image, keeping what ``request`` asks for."""
        return self.features_many([image], [request])[0]

    @torch.inference_mode()
    def features_many(self, images: list[Image.Image], requests: list[FeatureRequest]) -> list[ImageFeatures]:
        """One batched CLIP forward over several images (micro-batching), each keeping what its
        request asks for. A batch of one is exactly the single-image forward."""
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        if any(r.last_block_qk for r in requests):
            # Text-guided recovery scores with the last block's full-width q and k projections.
            attention = self.clip.vision_model.encoder.layers[-1].self_attn
            for name, module in (("q", attention.q_proj), ("k", attention.k_proj)):
                hooks.append(
                    module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
                )
        pixels = torch.cat([self.pixel_values(image) for image in images])  # [B, 3, H, W]
        try:
            outputs = self.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
        hidden_states = outputs.hidden_states  # n_layers + 1 tensors of [B, 1 + n, d]
        selected = hidden_states[self.feature_layer]  # [B, 1 + n, d]
        need_projected = any(r.projected_patches for r in requests)
        projected = self.clip.visual_projection(outputs.last_hidden_state) if need_projected else None  # [B, 1 + n, p]
        results = []
        for b, request in enumerate(requests):
            patches = selected[b, 1:]  # [n, d]
            pooled_eot, last_position = (
                self.embed_question(request.question) if request.question is not None else (None, None)
            )
            results.append(
                ImageFeatures(
                    patch_features=patches,
                    grid=self.grid,
                    cls_token=selected[b, 0] if request.cls_token else None,
                    hidden_states=tuple(h[b] for h in hidden_states) if request.hidden_states else None,
                    last_block_qk=(captured["q"][b], captured["k"][b]) if request.last_block_qk else None,
                    # CLIP's visual projection of every last-layer token, without the post-LayerNorm.
                    projected_patches=projected[b] if request.projected_patches else None,
                    question_embedding=pooled_eot,
                    question_embedding_last_position=last_position,
                    llm_tokens=self.project(patches) if request.llm_tokens else None,
                )
            )
        return results

    @torch.inference_mode()
    def embed_question(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The question through CLIP's text tower, 77 positions padded: the projected pooled
        end-of-text embedding, and the projection of the last (padding) position."""
        tokens = self.text_tokenizer(
            question, max_length=77, truncation=True, padding="max_length", return_tensors="pt"
        ).to(self.device)
        outputs = self.clip.text_model(**tokens)
        projection = self.clip.text_projection
        return projection(outputs.pooler_output)[0], projection(outputs.last_hidden_state[0, -1])

    @torch.inference_mode()
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vision-space tokens [m, d] to LLM space [m, llm_hidden] with the LLaVA projector."""
        return self.projector(tokens.to(self.device, self.dtype))
