"""Patch-level stages for a model with no pre-trained parts: ``dense`` teaches the vision tower
what each patch shows; ``align`` points the projector at the LLM's own word embeddings.

A real LLaVA starts from a CLIP whose patches already say what they show and an LLM whose
embedding space already holds the words; a world trained here from random weights has neither,
and the LLM's loss alone does not find them (docs/training.md, "A words-trained LLM reads an object
written as the sum of its words"). These two stages are the stand-ins, as ``clip`` is for CLIP's
pre-training.

Both read a segments JSON file: a list of ``{"id", "image", "segments", "labels"}``, paths
relative to an image folder (by default the JSON's own folder). ``segments`` is a one-channel
PNG the size of the picture whose pixel ``i`` belongs to segment ``labels[i - 1]`` (0: the
ground); a label is the words naming the segment ("small red circle", "box 7"). A patch shows the
segment with the most pixels in it when that segment covers at least ``MIN_SHARE`` of the patch,
else the ground (no words). Pictures are square, as the world's are (the processor's resize and
crop then keep the map aligned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from training.data import TrainingDataError

MIN_SHARE = 0.1
MAX_POSITIVE_WEIGHT = 50.0


@dataclass(frozen=True)
class SegmentedPicture:
    """One entry of a segments file, its paths resolved."""

    id: str
    image: Path
    segments: Path
    labels: tuple[str, ...]


def read_segments(path: Path, image_folder: Path | None = None, limit: int | None = None) -> list[SegmentedPicture]:
    """The entries of a segments JSON file; errors name the file and the entry's index."""
    folder = image_folder or path.parent
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingDataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise TrainingDataError(f"{path}: a segments file is a non-empty list of pictures")
    pictures = []
    for index, entry in enumerate(entries[:limit] if limit else entries):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict) or not {"image", "segments", "labels"} <= set(entry):
            raise TrainingDataError(f"{where}: each entry needs 'image', 'segments' and 'labels'")
        labels = entry["labels"]
        if not isinstance(labels, list) or not all(isinstance(label, str) and label.split() for label in labels):
            raise TrainingDataError(f"{where}: 'labels' is a list of non-empty strings")
        image, segments = folder / entry["image"], folder / entry["segments"]
        for file in (image, segments):
            if not file.is_file():
                raise TrainingDataError(f"{where}: {file} does not exist")
        pictures.append(SegmentedPicture(str(entry.get("id", index)), image, segments, tuple(labels)))
    return pictures


def label_words(pictures: list[SegmentedPicture]) -> list[str]:
    """Every word of the labels, sorted: the columns of :func:`patch_words`."""
    return sorted({word for picture in pictures for label in picture.labels for word in label.split()})


def patch_words(picture: SegmentedPicture, grid: int, side: int, words: dict[str, int]) -> torch.Tensor:
    """``[grid * grid, len(words)]``: 1 where a word names what the patch shows (row-major patches,
    as the tower orders them); ``side``: the pictures' size in pixels as the tower sees them."""
    segments = Image.open(picture.segments)
    if segments.size != (side, side):
        segments = segments.resize((side, side), Image.NEAREST)
    cell = side // grid
    ids = torch.from_numpy(np.asarray(segments, dtype=np.int64)[: grid * cell, : grid * cell].copy())
    if int(ids.max()) > len(picture.labels):
        raise TrainingDataError(f"{picture.segments}: segment {int(ids.max())} has no label")
    per_patch = ids.reshape(grid, cell, grid, cell).permute(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    counts = torch.zeros(grid * grid, len(picture.labels) + 1, dtype=torch.long)
    counts.scatter_add_(1, per_patch, torch.ones_like(per_patch))
    counts[:, 0] = 0  # the ground never wins: a patch shows an object if one covers enough of it
    share, segment = counts.max(dim=1)
    out = torch.zeros(grid * grid, len(words))
    for patch in torch.nonzero(share >= MIN_SHARE * cell * cell).flatten().tolist():
        for word in picture.labels[int(segment[patch]) - 1].split():
            out[patch, words[word]] = 1.0
    return out


class PatchWordsDataset(torch.utils.data.Dataset):
    """Each picture's patch words, computed once; with the picture (``dense``) or its tower
    features (``align``)."""

    def __init__(self, pictures: list[SegmentedPicture], grid: int, side: int, features: torch.Tensor | None = None):
        self.pictures = pictures
        self.words = label_words(pictures)
        columns = {word: i for i, word in enumerate(self.words)}
        self.targets = [patch_words(p, grid, side, columns) for p in pictures]
        self.features = features

    def positive_weights(self, most: float = MAX_POSITIVE_WEIGHT) -> torch.Tensor:
        """A weight a word for its positive patches: how much rarer it is than the commonest word,
        up to ``most`` — so that a word as rare as one digit (in a tenth of the boxes, in half the
        pictures) moves the loss, not only the common colours, shapes and sizes."""
        share = torch.stack(self.targets).mean(dim=(0, 1)).clamp_min(1e-9)
        return (share.max() / share).clamp(1.0, most)

    def __len__(self) -> int:
        return len(self.pictures)

    def __getitem__(self, index: int) -> dict:
        item = {"patch_words": self.targets[index]}
        if self.features is not None:
            item["image_rows"] = self.features[index]
        else:
            item["image"] = Image.open(self.pictures[index].image).convert("RGB")
        return item


class PatchWordsCollator:
    """Stacks the patch words (and the tower features); pictures through the image processor."""

    def __init__(self, image_processor=None) -> None:
        self.image_processor = image_processor
        self.tokens = 0  # patches seen: the progress bar's "tokens/s"

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = {"patch_words": torch.stack([b["patch_words"] for b in batch])}
        self.tokens += out["patch_words"].shape[0] * out["patch_words"].shape[1]
        if "image_rows" in batch[0]:
            out["image_rows"] = torch.stack([b["image_rows"] for b in batch])
        else:
            out["pixel_values"] = self.image_processor(images=[b["image"] for b in batch], return_tensors="pt")[
                "pixel_values"
            ]
        return out


class DenseTower(nn.Module):
    """CLIP's vision tower with a linear head at each patch of the layer LLaVA reads: which words
    name what the patch shows (one binary decision a word; the ground: none)."""

    def __init__(self, vision_model, feature_layer: int, positive_weights: torch.Tensor) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.feature_layer = feature_layer
        self.head = nn.Linear(vision_model.config.hidden_size, positive_weights.shape[0])
        self.register_buffer("positive_weights", positive_weights, persistent=False)

    def forward(self, pixel_values, patch_words, **kwargs):
        states = self.vision_model(pixel_values, output_hidden_states=True).hidden_states
        logits = self.head(states[self.feature_layer][:, 1:])  # CLS has no patch
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, patch_words, pos_weight=self.positive_weights, reduction="none"
        )
        return {"loss": losses.sum(-1).mean()}


def word_embeddings(words: list[str], tokenizer, embeddings: nn.Embedding) -> torch.Tensor:
    """``[len(words), hidden]``: each word as the sum of the LLM's input embeddings of its tokens."""
    rows = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        rows.append(embeddings.weight[ids].sum(0))
    return torch.stack(rows).detach().float()


class ProjectorAlignment(nn.Module):
    """The projector, regressed at each patch onto the sum of the LLM's embeddings of the words
    naming what the patch shows (zero on the ground): mean squared error."""

    def __init__(self, projector: nn.Module, targets: torch.Tensor) -> None:
        super().__init__()
        self.projector = projector
        self.register_buffer("targets", targets, persistent=False)

    def forward(self, image_rows, patch_words, **kwargs):
        projected = self.projector(image_rows)
        return {"loss": nn.functional.mse_loss(projected, patch_words @ self.targets)}


@torch.no_grad()
def unexplained_variance(projector: nn.Module, dataset: PatchWordsDataset, targets: torch.Tensor) -> float:
    """The share of the targets' variance (around their mean token) the projector leaves: 0 is
    exact, 1 no better than the mean token. ``align``'s summary reports it."""
    wanted = torch.stack(dataset.targets) @ targets
    residual = ((projector(dataset.features) - wanted) ** 2).sum()
    return float(residual / ((wanted - wanted.mean(dim=(0, 1))) ** 2).sum().clamp_min(1e-12))
