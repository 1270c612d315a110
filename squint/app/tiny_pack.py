"""Write tiny, seeded model packs in the real Hugging Face formats.

No machine here reaches a model hub, so tests and the demo run on packs this module writes:
random weights, tokenizers built locally, the same folder layouts and classes as
``openai/clip-vit-large-patch14-336`` and ``llava-hf/llava-1.5-7b-hf``. The same loaders
read either. Weights are drawn wide (std 0.2) so that greedy output depends on the image and
the prompt; a parity test on a model that ignores its input would prove nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llm_worker.language_model import export_language_model
from squint.packs import ModelPack, write_manifest

# OpenAI CLIP's normalisation constants, as in every LLaVA-1.5 preprocessor config.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), rendering chunks in
# the order given so interleaved images land where the user put them.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Characters the tiny Llama tokenizer knows as whole tokens; anything else falls back to bytes.
LLAMA_CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


@dataclass(frozen=True)
class TinyPackShape:
    """The sizes of a tiny pack. The default mirrors LLaVA-1.5's structure at toy width:
    a 24-block CLIP at 336 px with 14 px patches (a 24 x 24 grid, 576 visual tokens)."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 24
    vision_heads: int = 2
    projection_dim: int = 16
    text_hidden: int = 32
    text_layers: int = 2
    llm_hidden: int = 64
    llm_layers: int = 2
    # head_dim 32: vLLM's CPU attention refuses head sizes under 32.
    llm_heads: int = 2
    llm_kv_heads: int = 2
    weight_std: float = 0.2
    # CLIP's text positions (77 in OpenAI's); the world pack's character-level captions need more.
    text_positions: int = 77

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


SHAPES: dict[str, TinyPackShape] = {
    "default": TinyPackShape(),
    # A second shape for parity tests: 16 x 16 grid, wider LLM, grouped-query attention.
    "alt": TinyPackShape(
        image_size=224,
        vision_hidden=48,
        vision_layers=12,
        vision_heads=4,
        llm_hidden=96,
        llm_layers=3,
        llm_heads=3,
        llm_kv_heads=1,
    ),
    # Large enough that compute dominates overhead on a CPU (benchmarks): a 12-block CLIP-B-sized
    # tower at 336 px (576 tokens) and a 12-layer, 768-wide LLM. Narrower weights keep it stable.
    "medium": TinyPackShape(
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        projection_dim=512,
        text_hidden=512,
        text_layers=4,
        llm_hidden=768,
        llm_layers=12,
        llm_heads=12,
        llm_kv_heads=12,
        weight_std=0.03,
    ),
}


def make_clip_tokenizer(max_length: int = 77, words: Iterable[str] = ()) -> CLIPTokenizer:
    """CLIP's byte-level BPE: every character a token, word ends marked ("a</w>").

    Each of ``words`` (CLIP lowercases) becomes one token too, reached by merges that grow it
    from its end: every merge's right side ends in "</w>", so only a word's last piece can merge
    and a known word always ends as one token."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        piece = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            if ch + piece not in vocab:
                vocab[ch + piece] = len(vocab)
                merges.append((ch, piece))
            piece = ch + piece
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def make_llama_tokenizer(words: Iterable[str] = ()) -> LlamaTokenizer:
    """Llama's layout: <unk>, <s>, </s>, 256 byte-fallback tokens, then pieces; "<image>" and
    "<pad>" are added special tokens as in llava-hf's checkpoints.

    Every character of ``LLAMA_CHARS`` is a piece; each of ``words`` (letters only) becomes one
    piece "▁word" too, reached by BPE merges that grow it from its first letter, so a sentence of
    known words costs a token a word."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in LLAMA_CHARS:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        piece = "▁"
        for ch in word:
            if piece + ch not in vocab:
                vocab[piece + ch] = len(vocab)
                merges.append((piece, ch))
            piece += ch
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def _is_plain(tokenizer: LlamaTokenizer, token_id: int) -> bool:
    token = tokenizer.convert_ids_to_tokens(token_id)
    return len(token) == 1 and token in LLAMA_CHARS


def _widen(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Redraw every weight with ``std`` and every bias small; norms stay at identity."""
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif param.ndim >= 2 or (param.ndim == 1 and "norm" not in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def stf_blocks(vision_layers: int) -> tuple[int, ...]:
    """The CLIP hidden states the tiny STF weights fuse, deepest first (docs/methods.md §3.3).

    24 blocks: the released list. Other depths scale it by depth / 24 (rounded down), with the
    deepest pinned to hidden_states[-2] as LLaVA's feature layer: 12 blocks -> 11, 10, 9, 7, 6, 4, 3, 1.
    """
    released = (23, 21, 18, 15, 12, 9, 6, 3)
    return (vision_layers - 1, *(max(1, block * vision_layers // 24) for block in released[1:]))


def _write_stf(folder: Path, shape: TinyPackShape, generator: torch.Generator) -> None:
    """Seeded MBTF + projector weights for the ``stf`` compressor, under the released names.

    He-scaled (std sqrt(2 / fan_in)) rather than ``weight_std``: four stacked linears at std 0.2
    would blow the tokens up to hundreds; this keeps them near the LLaVA projector's scale.
    """
    c, h = shape.vision_hidden, shape.llm_hidden
    blocks = stf_blocks(shape.vision_layers)
    shapes = {  # Linear(8C -> 4C), Linear(4C -> C); projector Linear(4C -> 16C), Linear(16C -> H)
        "model.mm_projector_crosslayer.0": (4 * c, len(blocks) * c),
        "model.mm_projector_crosslayer.2": (c, 4 * c),
        "model.mm_projector.0": (16 * c, 4 * c),
        "model.mm_projector.2": (h, 16 * c),
    }
    tensors = {}
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features, generator=generator) * math.sqrt(2.0 / in_features)
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.bias"] = torch.randn(out_features, generator=generator) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"blocks": list(blocks)}, indent=2) + "\n")


def write_tiny_pack(
    root: Path,
    seed: int = 0,
    shape: TinyPackShape | str = "default",
    llm_tokenizer: LlamaTokenizer | None = None,
    clip_words: Iterable[str] = (),
    name: str = "",
    created_by: str = "",
) -> ModelPack:
    """Write a deterministic tiny pack into ``root`` (replacing its checkpoint folders).

    ``llm_tokenizer`` replaces the character-level Llama tokenizer and ``clip_words`` become
    whole tokens of CLIP's (the world pack's tokenizers know its words).
    """
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root).resolve()
    clip_dir, llava_dir, stf_dir = root / "clip", root / "llava", root / "stf"
    language_model_dir = root / "language_model"
    for folder in (clip_dir, llava_dir, stf_dir, language_model_dir):
        if folder.exists():
            shutil.rmtree(folder)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # for anything a constructor draws that _widen does not redraw

    clip_tokenizer = make_clip_tokenizer(shape.text_positions, clip_words)
    vision_config = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 2,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.projection_dim,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_hidden * 2,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=2,
        max_position_embeddings=shape.text_positions,
        projection_dim=shape.projection_dim,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    clip = CLIPModel(
        CLIPConfig(
            text_config=text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            projection_dim=shape.projection_dim,
        )
    )
    _widen(clip, shape.weight_std, generator)
    clip.save_pretrained(clip_dir)
    clip_tokenizer.save_pretrained(clip_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(clip_dir)

    llama_tokenizer = llm_tokenizer or make_llama_tokenizer()
    llm_config = LlamaConfig(
        vocab_size=len(llama_tokenizer),
        hidden_size=shape.llm_hidden,
        intermediate_size=shape.llm_hidden * 2,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads,
        num_key_value_heads=shape.llm_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id,
        pad_token_id=llama_tokenizer.pad_token_id,
    )
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision_config,
            text_config=llm_config,
            image_token_index=llama_tokenizer.convert_tokens_to_ids("<image>"),
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=shape.grid * shape.grid,
        )
    )
    _widen(llava, shape.weight_std, generator)
    # Keep the random answers printable and of useful length: byte-fallback and special
    # tokens get small output rows, so the model mostly emits plain characters.
    rare = [i for i in range(len(llama_tokenizer)) if not _is_plain(llama_tokenizer, i)]
    with torch.no_grad():
        llava.lm_head.weight[rare] *= 0.1
    # LLaVA-1.5 freezes CLIP: the LLaVA checkpoint's vision tower is CLIP's, weight for weight.
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.generation_config.do_sample = False
    llava.save_pretrained(llava_dir)
    image_processor = LlavaImageProcessorPil(
        do_pad=True,  # LLaVA-1.5 pads to a square with the mean colour before resizing
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=llama_tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(llava_dir)
    # Drawn last from the generator, so the CLIP and LLaVA weights above keep their bytes.
    _write_stf(stf_dir, shape, generator)
    export_language_model(llava_dir, language_model_dir)

    shape_name = next((name for name, s in SHAPES.items() if s == shape), "custom")
    return write_manifest(
        root,
        clip="clip",
        llava="llava",
        compressors={"stf": "stf"},
        language_model="language_model",
        name=name or f"tiny-{shape_name}",
        created_by=created_by or f"squint pack tiny --seed {seed} --shape {shape_name}",
    )


def shape_from_name(name: str) -> TinyPackShape:
    if name not in SHAPES:
        raise ValueError(f"unknown tiny pack shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


__all__ = [
    "SHAPES",
    "TinyPackShape",
    "make_clip_tokenizer",
    "make_llama_tokenizer",
    "shape_from_name",
    "stf_blocks",
    "write_tiny_pack",
]
