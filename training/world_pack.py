"""``squint pack world DIR``: the documented recipe, end to end, for a small pack that answers the
shapes world's questions — world data, then ``clip``, ``pretrain`` and ``finetune``.

The pack keeps LLaVA-1.5's geometry at a quarter of its tokens: 336-pixel pictures cut into a
12 x 12 grid of 28-pixel patches (144 visual tokens; 1/4 is 36, 1/9 is 16, as 144 and 64 are of
576). Its towers are narrow and shallow so that the whole recipe trains on a 2-CPU machine; its
Llama and CLIP tokenizers know the world's words (a token a word), and CLIP's text tower reads
128 positions so that a whole dense caption fits.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evaluation.world import WorldSettings, write_world
from squint.app.tiny_pack import TinyPackShape, make_llama_tokenizer, write_tiny_pack
from training.run import TrainSettings, train

WORLD_SHAPE = TinyPackShape(
    image_size=336,
    patch_size=28,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    projection_dim=128,
    text_hidden=128,
    text_layers=2,
    llm_hidden=256,
    llm_layers=4,
    llm_heads=8,
    llm_kv_heads=8,
    weight_std=0.02,
    text_positions=128,
)


@dataclass(frozen=True)
class WorldRecipe:
    """The recipe's settings: the world's size and each stage's schedule."""

    seed: int = 0
    train_pictures: int = 4000
    clip_epochs: float = 8.0
    clip_learning_rate: float = 1e-3
    clip_batch: int = 64
    pretrain_epochs: float = 1.0
    pretrain_learning_rate: float = 1e-3
    finetune_epochs: float = 3.0
    finetune_learning_rate: float = 1e-3
    batch: int = 32
    shape: TinyPackShape = WORLD_SHAPE


def _words(world: Path) -> set[str]:
    """Every word of the world's questions, answers and captions (and the chat template's roles)."""
    text = (world / "train.json").read_text() + (world / "captions.json").read_text()
    text += (world / "test.jsonl").read_text()
    return set(re.findall(r"[A-Za-z]+", text)) | {"USER", "ASSISTANT"}


def build_world_pack(out: Path, recipe: WorldRecipe = WorldRecipe(), world: Path | None = None) -> dict[str, Any]:
    """Write the world (unless given), a fresh pack, and train it; returns the run summary."""
    started = time.perf_counter()
    world = world or out / "world"
    if not (world / "world.json").is_file():
        write_world(world, WorldSettings(seed=recipe.seed, size=recipe.shape.image_size, train=recipe.train_pictures))
    command = f"squint pack world {out} --seed {recipe.seed}"
    write_tiny_pack(
        out,
        seed=recipe.seed,
        shape=recipe.shape,
        llm_tokenizer=make_llama_tokenizer(_words(world)),
        clip_words=_words(world),
        name="world",
        created_by=command,
    )
    # Each stage: its data, epochs, batch and learning rate; checkpoints only at the end.
    schedule = (
        ("clip", "captions.json", recipe.clip_epochs, recipe.clip_batch, recipe.clip_learning_rate),
        ("pretrain", "captions.json", recipe.pretrain_epochs, recipe.batch, recipe.pretrain_learning_rate),
        ("finetune", "train.json", recipe.finetune_epochs, recipe.batch, recipe.finetune_learning_rate),
    )
    summaries = {}
    for mode, data, epochs, batch, rate in schedule:
        print(f"squint pack world: {mode}", file=sys.stderr)
        stage = TrainSettings(
            mode,
            out,
            world / data,
            epochs=epochs,
            batch_size=batch,
            learning_rate=rate,
            seed=recipe.seed,
            save_steps=10**9,
            logging_steps=20,
        )
        summaries[stage.mode] = train(stage)
    summary = {
        "command": command,
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "shape"},
        "shape": asdict(recipe.shape),
        "world": str(world),
        "seconds": round(time.perf_counter() - started, 1),
        "stages": {
            mode: {k: s[k] for k in ("steps", "seconds", "first_loss", "final_loss", "examples")}
            for mode, s in summaries.items()
        },
    }
    (out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
