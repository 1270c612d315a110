"""Prompt templating and tokenization with the pack's own chat template and tokenizer.

The user's chunks become one user turn; the checkpoint's chat template renders it with one
image placeholder per image, the tokenizer turns it into ids, and each placeholder id is then
repeated once per visual token of its image — what ``LlavaProcessor`` does for 576 tokens, for
however many tokens the compressor left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import AutoConfig, AutoProcessor

from orchestrator.types import Chunk, ImageChunk, Message, TextChunk, VideoChunk
from squint.errors import BudgetExceeded, InvalidRequest
from squint.packs import ModelPack


def frame_time_text(seconds: float) -> str:
    """What precedes a video frame in the prompt when frame times are on."""
    return f"frame at {seconds:.1f} s:"


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt before the visual tokens are known."""

    text: str  # the rendered template, one placeholder per image
    token_ids: tuple[int, ...]  # the tokenized text, one placeholder id per image


class PromptBuilder:
    """The pack's chat template, tokenizer and image placeholder."""

    def __init__(self, pack: ModelPack) -> None:
        self.processor = AutoProcessor.from_pretrained(pack.llava_dir)
        self.tokenizer = self.processor.tokenizer
        config = AutoConfig.from_pretrained(pack.llava_dir)
        self.image_token_id: int = config.image_token_index
        self.image_token: str = getattr(self.processor, "image_token", "<image>")
        self.context_length: int = config.text_config.max_position_embeddings
        self.vocab_size: int = len(self.tokenizer)
        if self.processor.chat_template is None:
            raise ValueError(f"{pack.llava_dir} has no chat template; Squint renders prompts with it")

    def check_text(self, text: str, field: str) -> None:
        """Refuse user text holding the image placeholder: images come as image chunks."""
        if self.image_token in text:
            raise InvalidRequest(
                f"{field} contains {self.image_token!r}, which this "
                "model reserves for images; send images as image chunks"
            )

    def render(
        self,
        turns: Sequence[Chunk] | Sequence[Message],
        system_prompt: str = "",
        frames: Mapping[int, Sequence[float]] | None = None,
        frame_times: bool = False,
    ) -> Prompt:
        """Render a conversation (or the chunks of one user turn) and tokenize, the generation
        prompt after it. Images become one placeholder each; a video chunk becomes one per frame
        kept, ``frames[i]`` holding their times in seconds, with ``i`` the chunk's position among
        all the conversation's chunks. With ``frame_times`` each frame's placeholder follows its
        time as text (:func:`frame_time_text`), so the model can tell how far apart frames are."""
        frames = frames or {}
        messages = list(turns) if turns and isinstance(turns[0], Message) else [Message("user", tuple(turns))]
        conversation = []
        if system_prompt:
            conversation.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        index = 0
        images = 0
        for message in messages:
            content = []
            for chunk in message.chunks:
                if isinstance(chunk, TextChunk):
                    content.append({"type": "text", "text": chunk.text})
                elif isinstance(chunk, ImageChunk):
                    content.append({"type": "image"})
                    images += 1
                elif isinstance(chunk, VideoChunk):
                    for seconds in frames.get(index, ()):
                        if frame_times:
                            content.append({"type": "text", "text": frame_time_text(seconds)})
                        content.append({"type": "image"})
                        images += 1
                index += 1
            conversation.append({"role": message.role, "content": content})
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        token_ids = tuple(self.tokenizer(text)["input_ids"])
        placed = token_ids.count(self.image_token_id)
        if placed != images:
            raise ValueError(
                f"the chat template placed {placed} image placeholders for {images} images; Squint needs one per image"
            )
        return Prompt(text=text, token_ids=token_ids)

    def expand(self, prompt: Prompt, visual_rows: Sequence[int], max_new_tokens: int) -> tuple[np.ndarray, list[int]]:
        """Repeat each image's placeholder once per visual token; check the context fits.

        Returns the ids and where each image's run of placeholders starts.
        """
        ids: list[int] = []
        starts: list[int] = []
        rows = iter(visual_rows)
        for token_id in prompt.token_ids:
            if token_id == self.image_token_id:
                starts.append(len(ids))
                ids.extend([token_id] * next(rows))
            else:
                ids.append(token_id)
        total = len(ids) + max_new_tokens
        if total > self.context_length:
            raise BudgetExceeded(
                f"the prompt is {len(ids)} tokens ({sum(visual_rows)} visual) and sampling.max_new_tokens is "
                f"{max_new_tokens}: {total} tokens exceed the model's context of {self.context_length}; "
                "lower visual_token_budget, use a stronger compressor, or ask for fewer new tokens"
            )
        return np.asarray(ids, dtype=np.int64), starts
