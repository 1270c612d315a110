"""Training data: LLaVA's conversation JSON, encoded with the serving prompt code and LLaVA's loss mask.

A LLaVA JSON file is a list of ``{"id", "image" | "video"?, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``, image and video paths relative to
an image folder (LLaVA's ``--image_folder``; by default the JSON's own folder). A video's first
turn holds ``<video>`` (or ``<image>``, as LLaVA-NeXT's video data writes it).

The first human turn is rendered exactly as the orchestrator renders a request — the pack's chat
template through :class:`orchestrator.prompting.PromptBuilder`, the image placeholder repeated once
per visual token by its ``expand``, a video's frames each after its time ("frame at 1.5 s:") — so a
model learns the prompt it will be served. Each answer is
followed by the end-of-sequence token. Later turns are rendered one user message at a time with the
same template. As in LLaVA, only the answers (and their end-of-sequence tokens) are targets: every
other label is ``IGNORE`` (-100, what the loss skips).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.prompting import PromptBuilder
from orchestrator.types import ImageChunk, TextChunk, VideoChunk

IGNORE = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


class TrainingDataError(ValueError):
    """A training file the trainer cannot read; the message names the file and the entry."""


@dataclass(frozen=True)
class Conversation:
    """One entry of a LLaVA JSON file: a picture, a video or neither, and its (question, answer) turns."""

    id: str
    image: Path | None
    turns: tuple[tuple[str, str], ...]
    video: Path | None = None


def read_conversations(path: Path, image_folder: Path | None = None, limit: int | None = None) -> list[Conversation]:
    """The entries of a LLaVA conversation JSON; errors name the file and the entry's index."""
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
        messages = entry["conversations"]
        if len(messages) < 2 or len(messages) % 2:
            raise TrainingDataError(f"{where}: conversations alternate human and gpt turns, {len(messages)} given")
        turns = []
        for k in range(0, len(messages), 2):
            human, gpt = messages[k], messages[k + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise TrainingDataError(f"{where}: turn {k // 2} is not a human message followed by a gpt one")
            turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
        if entry.get("image") is not None and entry.get("video") is not None:
            raise TrainingDataError(f"{where}: an entry has an image or a video, not both")
        media = {}
        for kind, tags in (("image", (IMAGE_TAG,)), ("video", (VIDEO_TAG, IMAGE_TAG))):
            if entry.get(kind) is None:
                continue
            media[kind] = folder / entry[kind]
            if not media[kind].is_file():
                raise TrainingDataError(f"{where}: {kind} {media[kind]} does not exist")
            if not any(tag in turns[0][0] for tag in tags):
                raise TrainingDataError(
                    f"{where}: the first human turn of an entry with a{'n' * (kind == 'image')} {kind} holds "
                    + " or ".join(tags)
                )
        conversations.append(
            Conversation(str(entry.get("id", index)), media.get("image"), tuple(turns), media.get("video"))
        )
    if not conversations:
        raise TrainingDataError(f"{path}: no conversations")
    return conversations


def _question(text: str) -> str:
    """The human turn without LLaVA's media tags (the template places the picture or the frames)."""
    for tag in (IMAGE_TAG, VIDEO_TAG):
        text = text.replace(tag + "\n", "").replace("\n" + tag, "").replace(tag, "")
    return text.strip()


def encode(
    conversation: Conversation,
    prompts: PromptBuilder,
    visual_tokens: int | Sequence[int],
    frame_seconds: Sequence[float] = (),
    frame_times: bool = True,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the prompt as served, each answer and its end-of-sequence token as
    the only targets. ``visual_tokens``: the picture's placeholders, or for a video one count per
    frame (0 for a frame serving skips as a repeat), the frames at ``frame_seconds``, each after
    its time when ``frame_times`` (the orchestrator's ``frame_timestamps``)."""
    tokenizer = prompts.tokenizer
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for turn, (human, gpt) in enumerate(conversation.turns):
        if turn == 0:
            text = TextChunk(_question(human))
            if conversation.video is not None:
                if isinstance(visual_tokens, int) or len(visual_tokens) != len(frame_seconds):
                    raise ValueError(f"{conversation.id}: one visual token count per frame, and each frame's time")
                prompt = prompts.render([VideoChunk(b""), text], frames={0: frame_seconds}, frame_times=frame_times)
                rows = list(visual_tokens)
            elif conversation.image is not None:
                prompt, rows = prompts.render([ImageChunk(b""), text]), [visual_tokens]
            else:
                prompt, rows = prompts.render([text]), []
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
