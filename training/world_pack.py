"""``squint pack world DIR``: the documented recipe, end to end, for a small pack that answers the
shapes world's questions.

The pack keeps LLaVA-1.5's geometry at a quarter of its tokens: 336-pixel pictures cut into a
12 x 12 grid of 28-pixel patches (144 visual tokens; 1/4 is 36, 1/9 is 16, as 144 and 64 are of
576). Its towers are narrow and shallow so that the whole recipe trains on a 2-CPU machine; its
Llama and CLIP tokenizers know the world's words (a token a word), and CLIP's text tower reads
128 positions so that a whole dense caption fits.

Nothing in it is pre-trained, so the recipe first makes the two things LLaVA-1.5 starts from
(docs/training.md says which experiment showed each was needed):

1. ``clip`` on the captions, then ``dense`` on the segment maps: a tower whose patches say what
   they show (contrastive training alone leaves them nearly blind to shape);
2. ``text``: ``finetune`` on the training mix told in words — an LLM that answers the world's
   questions from words (the pre-trained LLM; it learns the questions far faster from words);
3. ``align``: the projector onto that LLM's embeddings of each patch's words (LLaVA's stage 1,
   which through the LLM's loss alone does not find them);
4. ``finetune`` on the pictures' training mix (LLaVA's stage 2).
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
    llm_hidden=128,
    llm_layers=2,
    llm_heads=4,
    llm_kv_heads=4,
    weight_std=0.02,
    text_positions=128,
)


@dataclass(frozen=True)
class Stage:
    """One ``squint train`` run of the recipe: its mode, the world file it reads, its schedule."""

    name: str  # the run's folder under train/ (the two finetunes differ)
    mode: str
    data: str
    steps: int
    batch: int
    learning_rate: float


# Steps and rates from the experiments in docs/training.md (AdamW; 3e-4 for the LLM: 1e-3 stalls it).
WORLD_STAGES = (
    Stage("clip", "clip", "captions.json", 500, 64, 1e-3),
    Stage("dense", "dense", "segments.json", 3000, 32, 5e-4),
    Stage("text", "finetune", "instruct_words.json", 2500, 32, 3e-4),
    Stage("align", "align", "segments.json", 1000, 64, 1e-3),
    Stage("finetune", "finetune", "instruct.json", 1500, 32, 3e-4),
)


@dataclass(frozen=True)
class WorldRecipe:
    """The recipe's settings: the world's size and the stages."""

    seed: int = 0
    train_pictures: int = 4000
    stages: tuple[Stage, ...] = WORLD_STAGES
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
    summaries = {}
    for stage in recipe.stages:
        print(f"squint pack world: {stage.name} ({stage.mode}, {stage.steps} steps)", file=sys.stderr)
        settings = TrainSettings(
            stage.mode,
            out,
            world / stage.data,
            run_name=stage.name,
            max_steps=stage.steps,
            batch_size=stage.batch,
            learning_rate=stage.learning_rate,
            seed=recipe.seed,
            save_steps=10**9,
            logging_steps=20,
        )
        summaries[stage.name] = train(settings)
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
