"""Patch words from segment maps, and the losses of the dense and align stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import TrainingDataError
from training.patches import (
    ProjectorAlignment,
    label_words,
    patch_words,
    read_segments,
    word_embeddings,
)


@pytest.fixture
def segmented(tmp_path):
    """An 8 x 8 picture cut into 2 x 2 patches of 16 pixels each."""
    segments = np.zeros((8, 8), dtype=np.uint8)
    segments[:4, :4] = 1  # top left: all segment 1
    segments[0, 7] = 2  # top right: one pixel (6%) of segment 2, under the 10% a patch needs
    segments[4:, :4] = 2  # bottom left: 10 pixels of segment 2 ...
    segments[4, :4] = 1  # ... and 6 of segment 1 (its first row, two pixels of its second)
    segments[5, :2] = 1
    Image.fromarray(segments).save(tmp_path / "seg.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "pic.png")
    entries = [{"id": "a", "image": "pic.png", "segments": "seg.png", "labels": ["small red circle", "box 7"]}]
    (tmp_path / "segments.json").write_text(json.dumps(entries))
    return read_segments(tmp_path / "segments.json")


def test_a_patch_shows_the_segment_covering_most_of_it_when_it_covers_a_tenth(segmented):
    words = label_words(segmented)
    assert words == ["7", "box", "circle", "red", "small"]
    columns = {w: i for i, w in enumerate(words)}
    shown = patch_words(segmented[0], grid=2, side=8, words=columns)
    named = [{words[i] for i in torch.nonzero(row).flatten().tolist()} for row in shown]
    assert named == [{"small", "red", "circle"}, set(), {"box", "7"}, set()]


def test_a_map_of_another_size_is_scaled_to_the_pictures_the_tower_sees(segmented):
    columns = {w: i for i, w in enumerate(label_words(segmented))}
    assert torch.equal(patch_words(segmented[0], 2, 16, columns), patch_words(segmented[0], 2, 8, columns))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image": "pic.png", "segments": "seg.png"}, r"\[1\]: each entry needs 'image', 'segments' and 'labels'"),
        ({"image": "pic.png", "segments": "none.png", "labels": ["a"]}, r"\[1\]: .*none.png does not exist"),
        ({"image": "pic.png", "segments": "seg.png", "labels": [" "]}, r"\[1\]: 'labels' is a list of non-empty"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_file_and_the_entry(segmented, tmp_path, entry, message):
    good = {"image": "pic.png", "segments": "seg.png", "labels": ["a"]}
    (tmp_path / "bad.json").write_text(json.dumps([good, entry]))
    with pytest.raises(TrainingDataError, match=message):
        read_segments(tmp_path / "bad.json")


def test_a_segment_without_a_label_is_refused(segmented, tmp_path):
    entries = [{"image": "pic.png", "segments": "seg.png", "labels": ["small red circle"]}]
    (tmp_path / "short.json").write_text(json.dumps(entries))
    (picture,) = read_segments(tmp_path / "short.json")
    with pytest.raises(TrainingDataError, match="segment 2 has no label"):
        patch_words(picture, 2, 8, {w: i for i, w in enumerate(label_words([picture]))})


class WordPieces:
    """A tokenizer that cuts a word into its letters (as a byte-fallback tokenizer does a digit)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - ord("a") for c in text]}


def test_align_regresses_onto_the_sum_of_each_words_token_embeddings():
    embeddings = torch.nn.Embedding(26, 4)
    targets = word_embeddings(["ab", "c"], WordPieces(), embeddings)
    assert torch.allclose(targets[0], embeddings.weight[0] + embeddings.weight[1])
    assert torch.allclose(targets[1], embeddings.weight[2])
    # A patch showing both words wants their sum; the ground (no words) wants zero.
    patch = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    exact = torch.stack([targets.sum(0), torch.zeros(4)])
    projector = torch.nn.Linear(3, 4)
    alignment = ProjectorAlignment(projector, targets)
    rows = torch.randn(1, 2, 3)
    loss = alignment(rows, patch)["loss"]
    assert torch.allclose(loss, torch.nn.functional.mse_loss(projector(rows), exact[None]))


def test_the_alignment_reports_the_share_of_the_targets_variance_it_leaves(segmented):
    from training.patches import PatchWordsDataset, unexplained_variance

    words = label_words(segmented)
    rows = patch_words(segmented[0], 2, 8, {w: i for i, w in enumerate(words)})
    dataset = PatchWordsDataset(segmented, 2, 8, features=rows[None])  # features that are the patch words
    targets = torch.randn(len(words), 4)
    exact = torch.nn.Linear(len(words), 4, bias=False)
    exact.weight.data = targets.T.clone()
    assert unexplained_variance(exact, dataset, targets) == pytest.approx(0.0, abs=1e-6)
    mean = (rows @ targets).mean(0)
    assert unexplained_variance(lambda f: mean.expand(*f.shape[:-1], 4), dataset, targets) == pytest.approx(1.0)
