"""The vision worker's models, loaded from a pack: CLIP and the LLaVA projector.

CLIP (vision and text towers) loads from the pack's CLIP checkpoint with ``CLIPModel``; the
projector is read from the LLaVA checkpoint's safetensors by name, so the 7B language model
next to it is never loaded here. LLaVA-1.5 freezes CLIP, so its vision tower is CLIP's.

The vision tower runs only as deep as a forward's requests need: up to the pack's feature layer
(LLaVA-1.5's penultimate) for the patch features, to the last layer only for what comes from it
(every hidden state, the last block's q/k, the projected last-layer tokens).
"""

from __future__ import annotations

import dataclasses
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

    @property
    def needs_last_layer(self) -> bool:
        """Whether the vision tower must run to its last layer (else it stops at the feature layer)."""
        return self.hidden_states or self.last_block_qk or self.projected_patches

    def image_part(self) -> FeatureRequest:
        """What the vision tower computes for this request, as the vision worker keeps it per
        image: without the question (its embedding is kept on its own) and the projected patch
        features (the projector derives them when a compressor runs), and always with the feature
        layer's CLS row (one row, and a later compressor asking for it needs no second forward)."""
        return dataclasses.replace(self, cls_token=True, llm_tokens=False, question=None)

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
        layers = llava_config.vision_config.num_hidden_layers
        if not -(layers + 1) <= self.feature_layer <= layers:
            raise PackError(
                f"{pack.llava_dir}: vision_feature_layer {self.feature_layer} is outside the vision tower's "
                f"{layers + 1} hidden states (-{layers + 1}..{layers})"
            )
        # The feature layer as an index of the hidden states (0 = the embeddings): the layers to run.
        self.feature_index = self.feature_layer % (layers + 1)
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
        request asks for. A batch of one is exactly the single-image forward. The vision tower
        stops at the feature layer unless a request needs its last layer."""
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
            last_layer = any(r.needs_last_layer for r in requests)
            hidden_states = self.vision_tower(pixels, last_layer, every=any(r.hidden_states for r in requests))
        finally:
            for hook in hooks:
                hook.remove()
        selected = hidden_states[self.feature_index]  # [B, 1 + n, d]
        need_projected = any(r.projected_patches for r in requests)
        # CLIP's visual projection of every last-layer token, without the post-LayerNorm.
        projected = self.clip.visual_projection(hidden_states[-1]) if need_projected else None  # [B, 1 + n, p]
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
                    projected_patches=projected[b] if request.projected_patches else None,
                    question_embedding=pooled_eot,
                    question_embedding_last_position=last_position,
                    llm_tokens=self.project(patches) if request.llm_tokens else None,
                )
            )
        return results

    def vision_tower(self, pixels: torch.Tensor, last_layer: bool, every: bool = False) -> list[torch.Tensor | None]:
        """CLIP's vision tower over ``pixels`` [B, 3, H, W], run to the feature layer, or to the last
        layer when ``last_layer``: the hidden states, index 0 the embeddings, each [B, 1 + n, d].

        The modules ``CLIPVisionModel.forward`` runs, in its order and with its arguments
        (embeddings, pre-LayerNorm, then each encoder layer without an attention mask), so every
        hidden state is the one Hugging Face computes, bit for bit; the layers after the last one
        needed never run (the post-LayerNorm only ever touches the pooled CLS row, unused here).
        Kept: the feature layer and the last one run, or every one when ``every``; the others are
        ``None``.
        """
        vision = self.clip.vision_model
        layers = vision.encoder.layers
        depth = len(layers) if last_layer else self.feature_index
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))  # [B, 1 + n, d]
        states: list[torch.Tensor | None] = [hidden]
        for layer in layers[:depth]:
            if not every and len(states) - 1 != self.feature_index:
                states[-1] = None  # an intermediate state nobody asked for
            hidden = layer(hidden, attention_mask=None)
            states.append(hidden)
        return states

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
