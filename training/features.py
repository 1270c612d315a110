"""The frozen vision tower's features, computed once per picture, and the LLaVA forward that reads them.

LLaVA-1.5's stages 1 and 2 freeze CLIP, so a picture's features never change while they run:
computing them once (instead of once per question, per epoch) is most of the training time saved
on a machine without a GPU. The features are what the vision worker hands a compressor — the
hidden states of ``vision_feature_layer``, without CLS under the ``default`` strategy — and the
forward below projects them and splices them over the image placeholders as
``LlavaForConditionalGeneration`` does with ``pixel_values``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class VideoFrames:
    """A video as serving sees it: the frames sampled, their times, and which the vision worker
    analyses (the others repeat the frame before them by their pixels and get no tokens)."""

    seconds: tuple[float, ...]  # every sampled frame's time
    analysed: tuple[bool, ...]  # per sampled frame: False for a repeat serving skips before CLIP
    images: tuple[Image.Image, ...]  # the analysed frames, decoded as the vision worker decodes them


def video_frames(path: Path, frames: int, pixel_dedup_threshold: float) -> VideoFrames:
    """Sample ``path`` with the orchestrator's own code (its default limits, ``frames`` evenly) and
    skip its pixel repeats as the orchestrator does before CLIP; the second pass (CLIP features)
    is not applied here."""
    from orchestrator.media import expand_media, repeated_frames
    from orchestrator.types import VideoChunk
    from orchestrator.video import FrameSampling, VideoLimits

    sampling = FrameSampling(frames=frames)
    media = expand_media([VideoChunk(path.read_bytes())], VideoLimits(), sampling, frames, [str(path)])
    analysed = tuple(repeat is None for repeat in repeated_frames(media, pixel_dedup_threshold))
    return VideoFrames(
        tuple(m.timestamp or 0.0 for m in media),
        analysed,
        tuple(Image.open(io.BytesIO(m.data)).convert("RGB") for m, kept in zip(media, analysed, strict=True) if kept),
    )


@torch.no_grad()
def vision_features(
    llava, image_processor, pictures: Sequence[Path | Image.Image], batch_size: int = 32, progress=None, select=None
) -> torch.Tensor:
    """``[pictures, tokens, width]`` float32: each picture's (a file's, or an image's) tower features,
    as the vision worker takes them; with ``select``, what it returns from one picture's hidden
    states (each ``[1 + n, C]``) instead."""
    config = llava.config
    tower = llava.model.vision_tower.eval()
    if not pictures:  # text-only data (LLaVA's instruction mix has such conversations)
        return torch.empty(0, 0, 0)
    out = []
    for start in range(0, len(pictures), batch_size):
        batch = pictures[start : start + batch_size]
        images = [p if isinstance(p, Image.Image) else Image.open(p).convert("RGB") for p in batch]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        states = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states
        if select is not None:
            out.append(torch.stack([select([h[i] for h in states]) for i in range(len(images))]).float())
            continue
        hidden = states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        out.append(hidden.float())
        if progress is not None:
            progress(min(start + batch_size, len(pictures)), len(pictures))
    return torch.cat(out)


class FeatureLlava(nn.Module):
    """``LlavaForConditionalGeneration`` fed precomputed tower features instead of pixels.

    With ``llavolta`` (a :class:`training.compression.LlavoltaTraining`) and ``clock`` (whose
    ``step`` is the optimizer step running), a compressed stage runs the batch through the LLM
    engine's :class:`~llm_worker.staged.StagedDecoder` instead: the ``staged_pool`` compressor
    pools the picture before the LLM or directs the decoder to pool it at layer K, as serving does.
    """

    def __init__(self, llava, llavolta=None, clock=None, stf=None, grid_side: int = 0) -> None:
        super().__init__()
        self.llava = llava
        self.llavolta = llavolta
        self.clock = clock
        # LLaVA-STF: its fusion module (a submodule, so the trainer optimises it) replaces the projector.
        self.stf = stf
        vision = llava.config.vision_config
        self.grid_side = grid_side or vision.image_size // vision.patch_size  # a picture's tokens: its square
        self._decoder = None

    @property
    def config(self):
        return self.llava.config

    def forward(self, input_ids, attention_mask, labels=None, image_rows=None, **kwargs):
        """``image_rows``: every picture's visual rows [tokens, width], concatenated in batch order."""
        embeddings = self.llava.get_input_embeddings()(input_ids)
        if image_rows is not None:
            projected = self._project(image_rows.to(embeddings.dtype))
            stage = self.llavolta.stage_at(self.clock.step) if self.llavolta is not None else None
            if stage is not None and stage.layer is not None:
                return self._staged_forward(embeddings, input_ids, attention_mask, labels, image_rows, projected, stage)
            placeholders = (input_ids == self.llava.config.image_token_index).unsqueeze(-1)
            if int(placeholders.sum()) != projected.shape[0]:
                raise ValueError(f"{int(placeholders.sum())} image placeholders for {projected.shape[0]} visual tokens")
            embeddings = embeddings.masked_scatter(placeholders.expand_as(embeddings), projected)
        return self.llava(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels)

    def _project(self, image_rows: torch.Tensor) -> torch.Tensor:
        """The visual tokens: LLaVA's projector, or STF's fusion picture by picture."""
        if self.stf is None:
            return self.llava.model.multi_modal_projector(image_rows)
        pictures = image_rows.split(self.grid_side * self.grid_side)
        return torch.cat([self.stf(rows, self.grid_side) for rows in pictures])

    def _staged_forward(self, embeddings, input_ids, attention_mask, labels, image_rows, projected, stage):
        """Each sample's prompt with each picture's rows from the compressor (its own pooled
        length), then the batch right-padded through the staged decoder at once; LLaVA's loss over
        the kept tokens."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from llm_worker.spans import ImageSpan
        from llm_worker.staged import StagedDecoder
        from training.data import IGNORE

        if self._decoder is None:
            self._decoder = StagedDecoder(self.llava.model.language_model, self.llava.lm_head)
        image = self.llava.config.image_token_index
        side = self.grid_side
        prompts, targets, spans, row = [], [], [], 0
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            ids, sample_labels = input_ids[b, :n], labels[b, :n]
            pieces, piece_labels, sample_spans, cursor, length = [], [], [], 0, 0
            # A run of placeholders is a picture, or a video's frames side by side (without frame
            # times between them): one grid each.
            for start, end in (p for run in _runs(ids == image) for p in _pictures(run, side * side)):
                pieces.append(embeddings[b, cursor:start])
                piece_labels.append(sample_labels[cursor:start])
                length += start - cursor
                tokens, directive = self.llavolta.compress(
                    image_rows[row : row + end - start], projected[row : row + end - start], (side, side), stage
                )
                row += end - start
                if directive is not None:
                    sample_spans.append(ImageSpan.placed(directive, length, tokens.shape[0]))
                pieces.append(tokens.to(embeddings.dtype))
                piece_labels.append(sample_labels.new_full((tokens.shape[0],), IGNORE))
                length += tokens.shape[0]
                cursor = end
            pieces.append(embeddings[b, cursor:n])
            piece_labels.append(sample_labels[cursor:n])
            kept = torch.cat(piece_labels)
            for span in reversed(sample_spans):  # pooled inside the LLM: the span's tokens become its windows
                pooled = kept.new_full((span.pooled_length,), IGNORE)
                kept = torch.cat([kept[: span.start], pooled, kept[span.end :]])
            prompts.append(torch.cat(pieces))
            targets.append(kept)
            spans.append(sample_spans)
        padded = nn.utils.rnn.pad_sequence(prompts, batch_first=True)
        hidden, _ = self._decoder.prefill_padded(padded, [len(p) for p in prompts], spans)
        logits = self._decoder.head(hidden)
        kept = nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE)  # [B, L'] as logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), kept[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return CausalLMOutputWithPast(loss=loss / max(int((kept[:, 1:] != IGNORE).sum()), 1))


def _pictures(run: tuple[int, int], grid: int) -> list[tuple[int, int]]:
    """A run of placeholders cut into pictures of ``grid`` tokens each."""
    start, end = run
    if (end - start) % grid:
        raise ValueError(f"{end - start} image placeholders in a row are not whole pictures of {grid} tokens")
    return [(s, s + grid) for s in range(start, end, grid)]


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of true values in a 1-D mask."""
    runs, start = [], None
    for index, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index))
            start = None
    return runs
