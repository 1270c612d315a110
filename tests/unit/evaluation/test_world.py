"""The shapes world: deterministic by seed, and every answer recomputed from the scene alone."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from evaluation.world import COLOURS, WorldSettings, caption, write_world
from squint.app.cli import main

SMALL = WorldSettings(seed=3, train=12, val=4, test=30, train_videos=2, val_videos=1, test_videos=4)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, SMALL)
    return root


def _scenes(root: Path) -> dict[str, dict]:
    scenes = {}
    for line in (root / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        scenes[scene["image" if scene["kind"] == "image" else "video"]] = scene
    return scenes


def _questions(root: Path) -> list[dict]:
    lines = []
    for split in ("val", "test"):
        lines += [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
    for entry in json.loads((root / "train.json").read_text()):
        turns = entry["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n").removeprefix("<video>\n")
            lines.append(
                {"image": entry.get("image"), "video": entry.get("video"), "question": question, "answer": gpt["value"]}
            )
    return lines


def test_the_same_seed_writes_the_same_files_and_another_seed_others(tmp_path, world):
    write_world(tmp_path / "again", SMALL)
    assert _digests(tmp_path / "again") == _digests(world)
    write_world(tmp_path / "other", WorldSettings(**{**SMALL.__dict__, "seed": 4}))
    other = _digests(tmp_path / "other")
    assert other["images/test/test-00000.png"] != _digests(world)["images/test/test-00000.png"]


def test_a_split_count_leaves_the_other_items_unchanged(tmp_path, world):
    write_world(tmp_path / "more", WorldSettings(**{**SMALL.__dict__, "train": 13}))
    more, base = _digests(tmp_path / "more"), _digests(world)
    assert more["images/test/test-00007.png"] == base["images/test/test-00007.png"]
    assert more["images/train/train-00011.png"] == base["images/train/train-00011.png"]


# An answerer written apart from the generator: it reads the question's words and the scene.
def _answer(scene: dict, text: str) -> str:
    text = text.split("\n")[0]
    things = scene.get("things", [])
    if m := re.fullmatch(r"What colour is the (small|large) (\w+)\?", text):
        (thing,) = [t for t in things if t["size"] == m[1] and t["shape"] == m[2]]
        return thing["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        (thing,) = [t for t in things if t["colour"] == m[1]]
        return thing["shape"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", text):
        return "yes" if any(t["colour"] == m[1] and t["shape"] == m[2] for t in things) else "no"
    if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", text):
        return str(sum(t["shape"] == m[1] for t in things))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return str(sum(t["colour"] == m[1] for t in things))
    if m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", text):
        (a,) = [t for t in things if (t["colour"], t["shape"]) == (m[1], m[2])]
        (b,) = [t for t in things if (t["colour"], t["shape"]) == (m[3], m[4])]
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        assert max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy)), "only clear relations are asked"
        relation = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        return "ABCD"[["left", "right", "above", "below"].index(relation)]
    if text == "Which digit is in the box?":
        return scene["glyph"]["digit"]
    if m := re.fullmatch(r"Which way does the (\w+) (\w+) move\?", text):
        mover = scene["mover"]
        assert (mover["colour"], mover["shape"]) == (m[1], m[2])
        dx, dy = scene["to"][0] - mover["x"], scene["to"][1] - mover["y"]
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if m := re.fullmatch(r"How many times does the (\w+) square appear\?", text):
        beats = scene["beats"]
        return str(sum(1 for i, b in enumerate(beats) if i == 0 or b != beats[i - 1] + 1))
    if text == "Describe the image briefly.":
        return _caption(scene)
    raise AssertionError(f"a question no template covers: {text!r}")


def _caption(scene: dict) -> str:
    def where(x: int, y: int) -> str:
        third = scene["size"] / 3
        row, col = ("top", "", "bottom")[min(int(y // third), 2)], ("left", "", "right")[min(int(x // third), 2)]
        return " ".join(w for w in (row, col) if w) or "center"

    parts = [
        (t["x"], f"a {t['size']} {t['colour']} {t['shape']} at the {where(t['x'], t['y'])}") for t in scene["things"]
    ]
    if scene["glyph"]:
        g = scene["glyph"]
        parts.append((g["x"], f"a box with the digit {g['digit']} at the {where(g['x'], g['y'])}"))
    words = [text for _, text in sorted(parts, key=lambda part: part[0])]
    body = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return body[0].upper() + body[1:] + "."


def test_every_answer_follows_from_the_scene_description(world):
    scenes = _scenes(world)
    questions = _questions(world)
    assert len(questions) > 300
    for q in questions:
        scene = scenes[q.get("image") or q["video"]]
        assert _answer(scene, q["question"]) == q["answer"], q


def test_the_pictures_show_what_the_scenes_say(world):
    for path, scene in _scenes(world).items():
        if scene["kind"] != "image":
            continue
        pixels = np.asarray(Image.open(world / path).convert("RGB"))
        for thing in scene["things"]:
            # The centre of a circle or square, or a point low inside a triangle, has its colour.
            y = thing["y"] + (thing["extent"] // 2 if thing["shape"] == "triangle" else 0)
            assert tuple(pixels[y, thing["x"]]) == COLOURS[thing["colour"]], (path, thing)
        if scene["glyph"]:
            x, y, e = scene["glyph"]["x"], scene["glyph"]["y"], scene["glyph"]["extent"]
            box = pixels[y - e : y + e + 1, x - e : x + e + 1]
            assert (box == 0).all(axis=-1).any() and (box == 255).all(axis=-1).any()  # a black digit on white


def test_videos_move_and_blink_as_their_scenes_say(world):
    for path, scene in _scenes(world).items():
        if scene["kind"] != "video":
            continue
        with av.open(str(world / path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == scene["frames"]
        per_beat = scene["frames"] // 8
        colour = np.array(COLOURS[scene["blinker"]["colour"]])
        b = scene["blinker"]
        for i, frame in enumerate(frames):
            shown = np.abs(frame[b["y"], b["x"]].astype(int) - colour).max() < 40  # lossy codec
            assert shown == (i // per_beat in scene["beats"]), (path, i)


def test_splits_never_share_a_picture_and_the_test_split_is_balanced(world):
    by_split: dict[str, set[str]] = {}
    for path, scene in _scenes(world).items():
        if scene["kind"] == "image":
            digest = hashlib.sha256((world / path).read_bytes()).hexdigest()
            by_split.setdefault(scene["split"], set()).add(digest)
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"])
    assert not by_split["val"] & by_split["test"]
    test = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    pictures = Counter(q["category"] for q in test if "image" in q)
    assert set(pictures) == {"attribute", "existence", "count", "spatial", "detail"}
    assert len(set(pictures.values())) == 1
    answers = Counter(q["answer"] for q in test if q["category"] == "existence")
    assert abs(answers["yes"] - answers["no"]) <= 1
    assert Counter(q["category"] for q in test if "video" in q) == {"motion": 4, "blinks": 4}


def test_train_files_are_llava_conversations(world):
    for name in ("train.json", "captions.json", "instruct.json"):
        entries = json.loads((world / name).read_text())
        assert entries
        for entry in entries:
            assert set(entry) == {"id", "image", "conversations"} or set(entry) == {"id", "video", "conversations"}
            turns = entry["conversations"]
            assert len(turns) % 2 == 0 and turns[0]["value"].startswith(("<image>\n", "<video>\n"))
            for number, (human, gpt) in enumerate(zip(turns[::2], turns[1::2])):
                assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"]
                assert number == 0 or "<image>" not in human["value"]
            assert (world / (entry.get("image") or entry["video"])).is_file()
    description = json.loads((world / "world.json").read_text())
    assert description["format"] == "squint-world/1" and description["counts"]["train"]["pictures"] == 12


def test_train_videos_ask_their_questions_in_both_orders(tmp_path):
    """Asked always motion first, a model learns each answer's turn and answers the blinks
    question, asked alone, with a direction."""
    settings = WorldSettings(seed=3, train=0, val=0, test=0, train_videos=12, val_videos=0, test_videos=0)
    write_world(tmp_path, settings)
    firsts = []
    for entry in json.loads((tmp_path / "train.json").read_text()):
        turns = entry["conversations"]
        assert turns[0]["value"].startswith("<video>\n") and "<video>" not in turns[2]["value"]
        firsts.append("move?" in turns[0]["value"])
    assert len(firsts) == 12 and 0 < sum(firsts) < 12


def test_the_training_mix_draws_every_family_evenly_from_the_pictures_questions(world):
    from evaluation.world import make_scene, mix, training_questions

    scene = make_scene(SMALL, "train", 1)
    asked = training_questions(scene)
    picked = mix(asked, 10, random.Random(0))
    counts = Counter(q.category for q in picked)
    assert len(picked) == 10 and "caption" not in counts and set(counts) == {q.category for q in asked} - {"caption"}
    assert max(counts.values()) - min(counts.values()) <= 1  # the digit question as often as the rest
    assert all(q in asked for q in picked)

    pairs = {}
    for entry in json.loads((world / "train.json").read_text()):
        turns = entry["conversations"]
        pairs[entry["id"]] = {
            (h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])
        }
    instruct = json.loads((world / "instruct.json").read_text())
    assert len(instruct) == SMALL.mixes * SMALL.train
    for entry in instruct:
        turns = entry["conversations"]
        assert len(turns) == 2 * SMALL.turns
        picture = entry["id"].rsplit("-mix", 1)[0]
        assert {(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])} <= pairs[
            picture
        ]
    words = json.loads((world / "instruct_words.json").read_text())
    assert len(words) == 4 * SMALL.train and all(set(e) == {"id", "conversations"} for e in words)
    for entry in words[:3]:
        index = int(entry["id"].split("-")[1])
        assert entry["conversations"][0]["value"].startswith(caption(make_scene(SMALL, "train", index)) + "\n")


def test_segment_maps_cover_exactly_what_the_pictures_paint(world):
    from dataclasses import asdict

    from evaluation.world import BACKGROUND, make_scene

    scenes = _scenes(world)
    entries = json.loads((world / "segments.json").read_text())
    # The train pictures, then the pictures drawn for dense alone (three per train picture), none of them a train one.
    train = [f"images/train/train-{i:05d}.png" for i in range(SMALL.train)]
    assert [e["image"] for e in entries[: SMALL.train]] == train
    dense = entries[SMALL.train :]
    assert len(dense) == 3 * SMALL.train and all(e["image"].startswith("images/dense/dense-") for e in dense)
    for entry in dense:
        scenes[entry["image"]] = asdict(make_scene(SMALL, "dense", int(entry["id"].split("-")[1])))
    for entry in entries:
        scene = scenes[entry["image"]]
        segments = np.asarray(Image.open(world / entry["segments"]))
        pixels = np.asarray(Image.open(world / entry["image"]).convert("RGB"))
        assert ((segments > 0) == (pixels != BACKGROUND).any(axis=-1)).all()
        things = scene["things"]
        assert entry["labels"][: len(things)] == [f"{t['size']} {t['colour']} {t['shape']}" for t in things]
        for index, thing in enumerate(things):
            y = thing["y"] + (thing["extent"] // 2 if thing["shape"] == "triangle" else 0)
            assert segments[y, thing["x"]] == index + 1
        if scene["glyph"]:
            glyph = scene["glyph"]
            assert (
                entry["labels"][-1] == f"box {glyph['digit']}" and segments[glyph["y"], glyph["x"]] == len(things) + 1
            )
        else:
            assert len(entry["labels"]) == len(things)


def test_words_json_is_each_train_pictures_conversation_with_its_caption_in_place_of_the_picture(world):
    from evaluation.world import caption, make_scene

    pictures = {e["id"]: e for e in json.loads((world / "train.json").read_text()) if "image" in e}
    words = json.loads((world / "words.json").read_text())
    assert [e["id"] for e in words] == [f"{item}-words" for item in pictures]
    for index, entry in enumerate(words):
        assert set(entry) == {"id", "conversations"}  # text only: no picture
        scene_caption = caption(make_scene(SMALL, "train", index))
        first = entry["conversations"][0]["value"]
        assert first.startswith(scene_caption + "\n") and "<image>" not in first
        # The same questions and answers as the picture's conversation, less the caption question.
        pairs = [(h["value"], g["value"]) for h, g in zip(entry["conversations"][::2], entry["conversations"][1::2])]
        pictured = pictures[entry["id"].removesuffix("-words")]["conversations"]
        expected = [
            (h["value"].removeprefix("<image>\n"), g["value"])
            for h, g in zip(pictured[::2], pictured[1::2])
            if g["value"] != scene_caption
        ]
        assert [(pairs[0][0].removeprefix(scene_caption + "\n"), pairs[0][1]), *pairs[1:]] == expected


def test_the_command_writes_a_world_and_refuses_a_bad_size(tmp_path, capsys):
    argv = ["data", "world", str(tmp_path / "w"), "--train", "2", "--val", "1", "--test", "2"]
    assert main([*argv, "--train-videos", "0", "--val-videos", "0", "--test-videos", "1"]) == 0
    assert "test: 2 pictures, 1 videos" in capsys.readouterr().out
    assert Image.open(io.BytesIO((tmp_path / "w/images/test/test-00001.png").read_bytes())).size == (336, 336)
    assert main(["data", "world", str(tmp_path / "x"), "--size", "30"]) == 2
    assert "size must be an even number of pixels >= 48, not 30" in capsys.readouterr().err
