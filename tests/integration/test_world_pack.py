"""The committed world pack (models/world, trained here by ``squint pack world``) answers the shapes
world's questions through the real stack — and the demo's question about examples/sample.png."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from evaluation.world import SHORT_ANSWER, WorldSettings, write_world
from squint.app.cli import main
from squint.app.client import build_request
from squint.app.stack import Stack, StackSettings
from squint.generate.v1 import generate_pb2_grpc
from squint.packs import load_pack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORLD_PACK = REPO / "models" / "world"
SAMPLE = REPO / "examples" / "sample.png"
# What scripts/demo asks, and the answer of the scene in examples/sample.png (the world's
# make_scene(WorldSettings(seed=0), "example", 88): not a train, validation or test picture).
DEMO_QUESTION = f"What colour is the large circle?\n{SHORT_ANSWER}"
DEMO_ANSWER = "green"
# The measured accuracy on these 200 questions (0.595) is in models/world/README.md; the floor sits a few
# points under it (vLLM's CPU kernels may round differently on another machine). Issue 15's
# target is 0.80.
FLOOR = 0.55
QUESTIONS = 200


@pytest.fixture(scope="module")
def world_stack(tmp_path_factory) -> Iterator[Stack]:
    """The whole stack on the committed pack (vLLM engine, no cache: every answer is computed)."""
    settings = StackSettings.on_free_ports(
        pack_dir=WORLD_PACK, state_dir=tmp_path_factory.mktemp("stack-world"), redis_url="", engine="vllm"
    )
    stack = Stack(settings)
    stack.start()
    yield stack
    stack.stop()


def test_the_committed_pack_is_the_recipe_s_and_small():
    pack = load_pack(WORLD_PACK)
    recipe = json.loads((WORLD_PACK / "recipe.json").read_text())
    assert recipe["command"].startswith("squint pack world ") and "--seed 0" in recipe["command"]
    assert pack.name == "world"
    size = sum(p.stat().st_size for p in WORLD_PACK.rglob("*") if p.is_file())
    assert size <= 30 * 1024 * 1024


def test_the_committed_pack_answers_the_world_s_test_questions(world_stack, tmp_path):
    # The test split alone: its scenes and its balanced questions do not depend on the other splits.
    world = tmp_path / "world"
    write_world(world, WorldSettings(seed=0, train=0, val=0, test=400, train_videos=0, val_videos=0, test_videos=0))
    out = tmp_path / "eval"
    argv = ["eval", str(world), "--address", world_stack.orchestrator_address, "--pack", str(WORLD_PACK)]
    assert main([*argv, "--compressor", "none", "--limit", str(QUESTIONS), "--out", str(out)]) == 0
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert row["n"] == QUESTIONS and row["errors"] == 0, row
    by_family = row["accuracy_by_category"]
    assert row["accuracy"] >= FLOOR, f"accuracy {row['accuracy']:.3f} < {FLOOR}; by family {by_family}"
    # The answers follow the questions: not one word said to everything.
    answers = [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(Counter(answers)) >= 10


def test_the_demo_s_question_is_answered_right(world_stack):
    request = build_request(question=DEMO_QUESTION, images=[SAMPLE.read_bytes()], compressor="none", max_new_tokens=8)
    with grpc.insecure_channel(world_stack.orchestrator_address) as channel:
        reply = generate_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120)
    assert reply.text.strip().lower().rstrip(".") == DEMO_ANSWER
