"""LLaVA's answer-only loss mask on a hand-built conversation, and the serving prompt reused."""

from __future__ import annotations

import json

import pytest

from orchestrator.prompting import PromptBuilder, frame_time_text
from orchestrator.types import ImageChunk, TextChunk, VideoChunk
from training.data import IGNORE, Conversation, TrainingDataError, encode, read_conversations


@pytest.fixture(scope="module")
def prompts(tiny_pack) -> PromptBuilder:
    return PromptBuilder(tiny_pack)


def test_only_the_answers_and_their_end_tokens_are_targets(prompts, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"not read by encode")
    conversation = Conversation(
        "c1", picture, (("<image>\nWhat colour is the circle?", "red"), ("And its shape?", "circle"))
    )
    ids, labels = encode(conversation, prompts, visual_tokens=4)
    tokenizer = prompts.tokenizer
    eos = tokenizer.eos_token_id
    assert len(ids) == len(labels)
    # The first turn is the prompt the orchestrator serves, placeholders expanded to 4 visual tokens.
    served = prompts.expand(prompts.render([ImageChunk(b""), TextChunk("What colour is the circle?")]), [4], 0)[0]
    assert ids[: len(served)] == served.tolist()
    assert ids.count(prompts.image_token_id) == 4
    # Targets: exactly "red</s>" and "circle</s>", in order; every other position ignored.
    targets = [i for i, label in enumerate(labels) if label != IGNORE]
    red = tokenizer("red", add_special_tokens=False)["input_ids"] + [eos]
    circle = tokenizer("circle", add_special_tokens=False)["input_ids"] + [eos]
    assert [labels[i] for i in targets] == red + circle
    assert all(labels[i] == ids[i] for i in targets)
    first_answer = targets[: len(red)]
    assert first_answer == list(range(len(served), len(served) + len(red)))  # right after the prompt
    second_prompt = ids[first_answer[-1] + 1 : targets[len(red)]]
    assert tokenizer.decode(second_prompt).strip().startswith("USER: And its shape?")
    assert tokenizer.decode(second_prompt).strip().endswith("ASSISTANT:")
    assert labels[-1] == eos and ids[-1] == eos


def test_a_video_is_prompted_as_served_its_frames_each_after_its_time(prompts, tmp_path):
    conversation = Conversation("v1", None, (("<video>\nWhich way does it move?", "left"),), tmp_path / "v.mp4")
    seconds = (0.0, 0.5, 1.0)
    # The middle frame repeats the first: serving skips it before CLIP, and it gets no tokens.
    ids, labels = encode(conversation, prompts, [3, 0, 3], seconds)
    question = TextChunk("Which way does it move?")
    served = prompts.expand(
        prompts.render([VideoChunk(b""), question], frames={0: seconds}, frame_times=True), [3, 0, 3], 0
    )
    assert ids[: len(served[0])] == served[0].tolist()
    assert ids.count(prompts.image_token_id) == 6
    text = prompts.tokenizer.decode(ids)
    assert all(frame_time_text(t) in text for t in seconds)
    targets = [label for label in labels if label != IGNORE]
    assert targets == prompts.tokenizer("left", add_special_tokens=False)["input_ids"] + [
        prompts.tokenizer.eos_token_id
    ]
    # Without frame times (a deployment with frame_timestamps off), the frames follow each other.
    bare, _ = encode(conversation, prompts, [3, 0, 3], seconds, frame_times=False)
    assert frame_time_text(0.5) not in prompts.tokenizer.decode(bare) and bare.count(prompts.image_token_id) == 6
    with pytest.raises(ValueError, match="one visual token count per frame"):
        encode(conversation, prompts, [3, 3], seconds)


def test_llava_json_is_read_and_its_mistakes_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    good = [
        {
            "id": "1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "v",
            "video": "v.mp4",
            "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A"}],
        },
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(good))
    picture, video = read_conversations(path)
    assert picture.image == tmp_path / "a.png" and picture.video is None and picture.turns == (("<image>\nQ?", "A"),)
    assert video.video == tmp_path / "v.mp4" and video.image is None and video.turns == (("<video>\nQ?", "A"),)
    for entry, message in [
        ({"image": "b.png", "conversations": good[0]["conversations"]}, r"\[0\]: image .*b.png does not exist"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "Q?"}]}, r"\[0\]: conversations alternate"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
         r"\[0\]: the first human turn of an entry with an image holds <image>"),
        ({"video": "w.mp4", "conversations": good[1]["conversations"]}, r"\[0\]: video .*w.mp4 does not exist"),
        ({"video": "v.mp4", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
         r"\[0\]: the first human turn of an entry with a video holds <video> or <image>"),
        ({"image": "a.png", "video": "v.mp4", "conversations": good[0]["conversations"]},
         r"\[0\]: an entry has an image or a video, not both"),
    ]:  # fmt: skip
        path.write_text(json.dumps([entry]))
        with pytest.raises(TrainingDataError, match=message):
            read_conversations(path)
