"""squint train: each stage runs a few steps on the tiny pack, its loss falls, its checkpoints load
with from_pretrained, and the trained pack serves through the stack as Hugging Face answers."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration

from evaluation.world import WorldSettings, write_world
from squint.app.cli import main
from squint.app.client import build_request
from squint.app.stack import Stack, StackSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 12


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, WorldSettings(seed=2, train=16, val=0, test=0, train_videos=1, val_videos=0, test_videos=0))
    # Two turns of each conversation: the tiny pack's tokens are characters, whole conversations are long.
    conversations = json.loads((root / "train.json").read_text())
    short = [{**c, "conversations": c["conversations"][:4]} for c in conversations]
    (root / "train-short.json").write_text(json.dumps([c for c in short if "video" not in c]))
    (root / "videos.json").write_text(json.dumps([c for c in short if "video" in c]))
    return root


@pytest.fixture(scope="module")
def trained(tiny_pack, world, tmp_path_factory):
    """The tiny pack through every stage, in the world recipe's order: each stage's summary, and the pack."""
    out = tmp_path_factory.mktemp("trained") / "pack"
    summaries = {}
    for mode, data, rate, batch in (
        ("clip", "captions.json", 1e-3, 8),
        ("dense", "segments.json", 1e-3, 4),
        ("pretrain", "captions.json", 1e-2, 4),
        ("align", "segments.json", 1e-2, 4),
        ("finetune", "train-short.json", 1e-3, 4),
    ):
        source = tiny_pack.root if mode == "clip" else out
        argv = ["train", mode, "--pack", str(source), "--out", str(out), "--data", str(world / data)]
        argv += ["--max-steps", str(STEPS), "--batch-size", str(batch), "--learning-rate", str(rate)]
        assert main([*argv, "--logging-steps", "1", "--save-steps", "6"]) == 0
        summaries[mode] = json.loads((out / "train" / mode / "summary.json").read_text())
    return out, summaries


@pytest.mark.parametrize("mode", ["clip", "dense", "pretrain", "align", "finetune"])
def test_each_stage_lowers_its_loss_and_keeps_checkpoints(trained, mode):
    out, summaries = trained
    summary = summaries[mode]
    assert summary["steps"] == STEPS
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert sorted(p.name for p in (out / "train" / mode).glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


def test_stages_train_what_llava_trains_and_write_loadable_checkpoints(tiny_pack, trained, world):
    out, summaries = trained
    original = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(out / "llava")
    clip = CLIPModel.from_pretrained(out / "clip")
    LlamaForCausalLM.from_pretrained(out / "language_model")
    # LLaVA's frozen CLIP is the trained CLIP, weight for weight; the projector and the LLM moved.
    for name, weight in clip.vision_model.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[name], weight), name
    assert not torch.equal(
        llava.model.multi_modal_projector.linear_1.weight, original.model.multi_modal_projector.linear_1.weight
    )
    assert not torch.equal(llava.lm_head.weight, original.lm_head.weight)
    # pretrain and align train the projector alone; finetune the projector and the LLM; dense the
    # vision tower and its patch head (a weight and a bias a word of the segments' labels).
    projector = sum(p.numel() for p in original.model.multi_modal_projector.parameters())
    assert summaries["pretrain"]["trainable_parameters"] == projector
    assert summaries["align"]["trainable_parameters"] == projector
    tower = sum(p.numel() for p in original.model.vision_tower.parameters())
    words = len(
        {w for e in json.loads((world / "segments.json").read_text()) for label in e["labels"] for w in label.split()}
    )
    assert summaries["dense"]["trainable_parameters"] == tower + words * (clip.config.vision_config.hidden_size + 1)
    assert summaries["finetune"]["trainable_parameters"] > projector
    manifest = json.loads((out / "squint-pack.json").read_text())
    assert manifest["id"] != tiny_pack.id and manifest["created_by"].endswith("squint train finetune")


def test_the_trained_pack_serves_as_hugging_face_answers(trained, world, tmp_path):
    out, _ = trained
    picture = (world / "images/train/train-00003.png").read_bytes()
    question = "What colour is the large circle?\nAnswer the question using a single word or phrase."
    processor = AutoProcessor.from_pretrained(out / "llava")
    model = LlavaForConditionalGeneration.from_pretrained(out / "llava").eval()
    content = [{"type": "image"}, {"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.open(io.BytesIO(picture))], text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    stack = Stack(StackSettings.on_free_ports(pack_dir=out, state_dir=tmp_path / "stack", redis_url=""))
    stack.start()
    try:
        import grpc

        from squint.generate.v1 import generate_pb2_grpc

        with grpc.insecure_channel(stack.orchestrator_address) as channel:
            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            reply = stub.Generate(build_request(question, [picture], compressor="none", max_new_tokens=8), timeout=120)
    finally:
        stack.stop()
    assert list(reply.token_ids) == expected.tolist()


def test_finetune_with_dfmr_random_pools_each_sample_and_still_learns(trained, world, tmp_path):
    out, _ = trained
    argv = ["train", "finetune", "--pack", str(out), "--out", str(tmp_path / "dfmr"), "--dfmr", "random"]
    argv += ["--data", str(world / "train-short.json"), "--max-steps", "8", "--batch-size", "4"]
    assert main([*argv, "--learning-rate", "1e-3", "--logging-steps", "1"]) == 0
    summary = json.loads((tmp_path / "dfmr" / "train" / "finetune" / "summary.json").read_text())
    losses = [loss for _, loss in summary["losses"]]
    assert summary["settings"]["dfmr"] == "random" and len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # Each sample pooled by a factor drawn from 1, 2, 3 (576, 144 or 64 tokens); unpooled, always 576.
    assert trained[1]["finetune"]["visual_tokens_per_sample"] == 576
    assert 64 < summary["visual_tokens_per_sample"] < 400


@pytest.fixture(scope="module")
def variants(trained, world, tmp_path_factory):
    """finetune --stf on the trained pack, then finetune --llavolta on that one (so one stack
    serves both): each run's summary, the packs, and the answers of the last one served with
    none, in-LLM staged_pool at the stage it trained in, and stf."""
    out, _ = trained
    root = tmp_path_factory.mktemp("variants")
    summaries = {}
    for name, source, flags in (
        ("stf", out, ["--stf"]),
        ("llavolta", root / "stf", ["--llavolta", "1:8:0.5,0:2:0.25,none:0.25"]),
    ):
        argv = ["train", "finetune", "--pack", str(source), "--out", str(root / name), *flags]
        argv += ["--data", str(world / "train-short.json"), "--max-steps", "8", "--batch-size", "4"]
        assert main([*argv, "--learning-rate", "1e-3", "--logging-steps", "1"]) == 0
        summaries[name] = json.loads((root / name / "train" / "finetune" / "summary.json").read_text())
    picture = (world / "images/train/train-00003.png").read_bytes()
    stack = Stack(StackSettings.on_free_ports(pack_dir=root / "llavolta", state_dir=root / "stack", redis_url=""))
    stack.start()
    try:
        import grpc

        from squint.generate.v1 import generate_pb2_grpc

        with grpc.insecure_channel(stack.orchestrator_address) as channel:
            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            replies = {
                compressor: stub.Generate(
                    build_request("What?", [picture], compressor, params, max_new_tokens=4), timeout=120
                )
                for compressor, params in (("none", None), ("staged_pool", {"layer": 1, "stride": 8}), ("stf", None))
            }
    finally:
        stack.stop()
    return root, summaries, replies


def _losses_fall(summary) -> None:
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_finetune_with_llavolta_stages_learns_and_serves_uncompressed_and_in_its_stage(variants):
    root, summaries, replies = variants
    _losses_fall(summaries["llavolta"])
    assert summaries["llavolta"]["llavolta"] == [
        {"stage": "layer 1, stride 8", "until_step": 4},
        {"stage": "layer 0, stride 2", "until_step": 6},
        {"stage": "none", "until_step": 8},
    ]
    LlavaForConditionalGeneration.from_pretrained(root / "llavolta" / "llava")
    # Served unchanged: uncompressed (as LLaVolta's staged models are evaluated) and pooled
    # inside the LLM by the staged engine at the stage it trained in.
    assert len(replies["none"].token_ids) > 0 and len(replies["staged_pool"].token_ids) > 0
    assert replies["staged_pool"].usage.media[0].tokens_after == 576  # spliced whole; 72 from layer 1


def test_finetune_with_stf_trains_the_fusion_module_where_the_stf_compressor_loads_it(trained, variants):
    from compressor_plugins.builtin.stf import read_state

    out, _ = trained
    root, summaries, replies = variants
    _losses_fall(summaries["stf"])
    assert summaries["stf"]["visual_tokens_per_sample"] == 144  # one per 2 x 2 window of the 24 x 24 grid
    before, after = read_state(out / "stf"), read_state(root / "stf" / "stf")
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    # LLaVA's own projector is not what STF trains: it stays as it was.
    original = LlavaForConditionalGeneration.from_pretrained(out / "llava")
    trained_llava = LlavaForConditionalGeneration.from_pretrained(root / "stf" / "llava")
    projector, original_projector = trained_llava.model.multi_modal_projector, original.model.multi_modal_projector
    assert torch.equal(projector.linear_1.weight, original_projector.linear_1.weight)
    assert not torch.equal(trained_llava.lm_head.weight, original.lm_head.weight)  # the LLM learned beside it
    assert replies["stf"].usage.media[0].tokens_after == 144 and len(replies["stf"].token_ids) > 0


def test_finetune_on_text_only_conversations_trains_the_llm_and_leaves_the_projector(trained, world, tmp_path, capsys):
    # LLaVA's instruction mix has conversations without pictures; the world's words.json is all such.
    out, _ = trained
    conversations = json.loads((world / "words.json").read_text())
    (world / "words-short.json").write_text(
        json.dumps([{**c, "conversations": c["conversations"][:4]} for c in conversations])
    )
    words = tmp_path / "words"
    argv = ["train", "finetune", "--pack", str(out), "--out", str(words), "--data", str(world / "words-short.json")]
    assert (
        main([*argv, "--max-steps", "8", "--batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1"]) == 0
    )
    summary = json.loads((words / "train" / "finetune" / "summary.json").read_text())
    losses = [loss for _, loss in summary["losses"]]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert summary["visual_tokens_per_sample"] == 0
    before = LlavaForConditionalGeneration.from_pretrained(out / "llava")
    after = LlavaForConditionalGeneration.from_pretrained(words / "llava")
    assert torch.equal(
        after.model.multi_modal_projector.linear_1.weight, before.model.multi_modal_projector.linear_1.weight
    )
    assert not torch.equal(after.lm_head.weight, before.lm_head.weight)
    # Compression needs pictures: refused, naming the file.
    refused = ["train", "finetune", "--pack", str(out), "--out", str(tmp_path / "refused"), "--dfmr", "random"]
    assert main([*refused, "--data", str(world / "words-short.json"), "--max-steps", "2"]) == 2
    assert "words-short.json: no pictures to compress" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_finetune_reads_videos_as_the_orchestrator_samples_them(trained, world, tmp_path, capsys):
    out, _ = trained
    argv = ["train", "finetune", "--pack", str(out), "--data", str(world / "videos.json"), "--max-steps", "8"]
    argv += ["--batch-size", "1", "--learning-rate", "1e-3", "--logging-steps", "1"]
    # The orchestrator's 8 frames of 576 tokens overflow the tiny LLM's context of 4,096: refused
    # before a step runs, naming the fix, and nothing left behind.
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "8 frames of 576 visual tokens" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*argv, "--out", str(tmp_path / "video"), "--video-frames", "2"]) == 0
    summary = json.loads((tmp_path / "video" / "train" / "finetune" / "summary.json").read_text())
    assert summary["visual_tokens_per_sample"] == 2 * 576  # the world's mover moves: no frame repeats
    losses = [loss for _, loss in summary["losses"]]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    before = LlavaForConditionalGeneration.from_pretrained(out / "llava")
    after = LlavaForConditionalGeneration.from_pretrained(tmp_path / "video" / "llava")
    assert not torch.equal(after.lm_head.weight, before.lm_head.weight)


def test_the_world_recipe_runs_its_stages_in_order_and_records_each(world, tmp_path):
    from dataclasses import replace

    from squint.packs import load_pack
    from training.world_pack import WORLD_STAGES, WorldRecipe, build_world_pack

    stages = tuple(replace(stage, steps=2, batch=2) for stage in WORLD_STAGES)
    summary = build_world_pack(tmp_path / "world-pack", WorldRecipe(seed=2, stages=stages), world=world)
    assert list(summary["stages"]) == ["clip", "dense", "text", "align", "finetune"]
    assert all(stage["steps"] == 2 for stage in summary["stages"].values())
    pack = load_pack(tmp_path / "world-pack")
    for stage in stages:  # each run in its own folder: the two finetunes (text, then pictures) both kept
        recorded = json.loads((pack.root / "train" / stage.name / "summary.json").read_text())
        assert (recorded["mode"], recorded["data"]) == (stage.mode, str(world / stage.data))
    assert json.loads((pack.root / "recipe.json").read_text())["stages"] == summary["stages"]
    manifest = json.loads((pack.root / "squint-pack.json").read_text())
    assert manifest["created_by"].startswith(f"squint pack world {tmp_path / 'world-pack'} --seed 2")
    LlavaForConditionalGeneration.from_pretrained(pack.llava_dir)
