"""Training data: LLaVA's conversation JSON, encoded with the serving prompt code and LLaVA's loss mask.

A LLaVA JSON file is a list of ``{"id", "image" | "video"?, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``, image paths relative to an image
folder (LLaVA's ``--image_folder``; by default the JSON's own folder).

The first human turn is rendered exactly as the orchestrator renders a request — the pack's chat
template through :class:`orchestrator.prompting.PromptBuilder`, the image placeholder repeated once
per visual token by its ``expand`` — so a model learns the prompt it will be served. Each answer is
followed by the end-of-sequence token. Later turns are rendered one user message at a time with the
same template. As in LLaVA, only the answers (and their end-of-sequence tokens) are targets: every
other label is ``IGNORE`` (-100, what the loss skips).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.prompting import PromptBuilder
from orchestrator.types import ImageChunk, TextChunk

IGNORE = -100
IMAGE_TAG = "<image>"


class TrainingDataError(ValueError):
    """A training file the trainer cannot read; the message names the file and the entry."""


@dataclass(frozen=True)
class Conversation:
    """One entry of a LLaVA JSON file: a picture (or none) and its (question, answer) turns."""

    id: str
    image: Path | None
    turns: tuple[tuple[str, str], ...]


def read_conversations(path: Path, image_folder: Path | None = None, limit: int | None = None) -> list[Conversation]:
    """The entries of a LLaVA conversation JSON; errors name the file and the entry's index.
    Video entries are left out (not trained yet): :func:`count_videos` says how many."""
    folder = image_folder or path.parent
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingDataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(entries, list):
        raise TrainingDataError(f"{path}: a LLaVA JSON file is a list of conversations")
    conversations = []
    for index, entry in enumerate(entries[:limit] if limit else entries):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise TrainingDataError(f"{where}: each entry needs a 'conversations' list")
        if "video" in entry:
            continue
        messages = entry["conversations"]
        if len(messages) < 2 or len(messages) % 2:
            raise TrainingDataError(f"{where}: conversations alternate human and gpt turns, {len(messages)} given")
        turns = []
        for k in range(0, len(messages), 2):
            human, gpt = messages[k], messages[k + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise TrainingDataError(f"{where}: turn {k // 2} is not a human message followed by a gpt one")
            turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
        image = entry.get("image")
        if image is not None:
            image = folder / image
            if not image.is_file():
                raise TrainingDataError(f"{where}: image {image} does not exist")
            if IMAGE_TAG not in turns[0][0]:
                raise TrainingDataError(f"{where}: the first human turn of an entry with an image holds {IMAGE_TAG}")
        conversations.append(Conversation(str(entry.get("id", index)), image, tuple(turns)))
    if not conversations:
        raise TrainingDataError(f"{path}: no conversations")
    return conversations


def count_videos(path: Path) -> int:
    """Video entries of a LLaVA JSON file (which :func:`read_conversations` leaves out)."""
    entries = json.loads(path.read_text())
    return sum(1 for entry in entries if isinstance(entry, dict) and "video" in entry)


def _question(text: str) -> str:
    """The human turn without LLaVA's image tag (the template places the image)."""
    return text.replace(IMAGE_TAG + "\n", "").replace("\n" + IMAGE_TAG, "").replace(IMAGE_TAG, "").strip()


def encode(conversation: Conversation, prompts: PromptBuilder, visual_tokens: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the prompt as served (``visual_tokens`` placeholders for the
    picture), each answer and its end-of-sequence token as the only targets."""
    tokenizer = prompts.tokenizer
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for turn, (human, gpt) in enumerate(conversation.turns):
        if turn == 0:
            chunks = ([ImageChunk(b"")] if conversation.image is not None else []) + [TextChunk(_question(human))]
            prompt = prompts.render(chunks)
            rows = [visual_tokens] if conversation.image is not None else []
            prompt_ids = prompts.expand(prompt, rows, 0)[0].tolist()
        else:
            text = prompts.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": _question(human)}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(gpt.strip(), add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
    return ids, labels
