"""LLaVA's answer-only loss mask on a hand-built conversation, and the serving prompt reused."""

from __future__ import annotations

import json

import pytest

from orchestrator.prompting import PromptBuilder
from orchestrator.types import ImageChunk, TextChunk
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


def test_llava_json_is_read_and_its_mistakes_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
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
    (conversation,) = read_conversations(path)
    assert conversation.image == tmp_path / "a.png" and conversation.turns == (("<image>\nQ?", "A"),)
    for entry, message in [
        ({"image": "b.png", "conversations": good[0]["conversations"]}, r"\[0\]: image .*b.png does not exist"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "Q?"}]}, r"\[0\]: conversations alternate"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
         r"\[0\]: the first human turn of an entry with an image holds <image>"),
    ]:  # fmt: skip
        path.write_text(json.dumps([entry]))
        with pytest.raises(TrainingDataError, match=message):
            read_conversations(path)
