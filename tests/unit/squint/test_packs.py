import json
import shutil

import pytest
import torch
from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

from squint.app.tiny_pack import write_tiny_pack
from squint.packs import MANIFEST_NAME, PackError, load_pack, reading, update_manifest, write_manifest


def test_same_seed_same_bytes_other_seed_other_pack(tmp_path):
    first = write_tiny_pack(tmp_path / "a", seed=3)
    second = write_tiny_pack(tmp_path / "b", seed=3)
    third = write_tiny_pack(tmp_path / "c", seed=4)
    assert first.id == second.id != third.id
    for name in ("clip/model.safetensors", "llava/model.safetensors", "llava/tokenizer.json"):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes()


def test_tiny_pack_loads_like_hub_checkpoints(tiny_pack):
    processor = AutoProcessor.from_pretrained(tiny_pack.llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir)
    clip = CLIPModel.from_pretrained(tiny_pack.clip_dir)
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.image_processor.do_pad  # LLaVA-1.5 pads to square with the mean colour
    assert model.config.image_seq_length == 576 and model.config.vision_feature_layer == -2
    # LLaVA-1.5 freezes CLIP: the two checkpoints share the vision tower.
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(tensor, model.model.vision_tower.state_dict()[name]), name
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT:"


def test_weights_are_wide(tiny_pack):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert 0.15 < weight.std().item() < 0.25


def test_manifest_errors_say_what_to_fix(tmp_path):
    with pytest.raises(PackError, match="squint-pack.json is missing"):
        load_pack(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "squint-pack/1", "id": "x", "clip": "c", "llava": "l"}))
    with pytest.raises(PackError, match="clip folder .* does not exist"):
        load_pack(tmp_path)


def test_import_points_a_manifest_at_existing_checkpoints(tiny_pack, tmp_path):
    pack = write_manifest(
        tmp_path / "real", clip=tiny_pack.clip_dir, llava=tiny_pack.llava_dir, name="real", pack_id="real-1"
    )
    assert pack.id == "real-1" and pack.llava_dir == tiny_pack.llava_dir


def test_a_manifest_update_keeps_every_field_it_does_not_change(tiny_pack, tmp_path):
    root = tmp_path / "pack"
    shutil.copytree(tiny_pack.root, root)
    before = json.loads((root / MANIFEST_NAME).read_text())
    (root / "extra").mkdir()
    (root / "extra" / "weights.bin").write_bytes(b"new content")
    pack = update_manifest(root, compressors={**before["compressors"], "extra": "extra"})
    after = json.loads((root / MANIFEST_NAME).read_text())
    assert after["compressors"]["extra"] == "extra" and pack.id != before["id"]  # new content, new id
    unchanged = ("clip", "llava", "name", "created_by", "language_model", "format")
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert update_manifest(root, pack_id="kept-1", created_by="me").id == "kept-1"
    assert load_pack(root).language_model_dir == root / "language_model"


def test_a_file_that_cannot_be_loaded_is_a_pack_error_naming_the_pack(tiny_pack, tmp_path):
    (tmp_path / "spoiled.json").write_text("{not json")
    with pytest.raises(PackError) as raised, reading(tiny_pack, "the spoiled file"):
        json.loads((tmp_path / "spoiled.json").read_text())
    assert str(raised.value).startswith(f"pack {tiny_pack.root}: cannot load the spoiled file: Expecting property name")
    with (
        pytest.raises(PackError, match="cannot load the missing file: .*No such file"),
        reading(tiny_pack, "the missing file"),
    ):
        (tmp_path / "missing.json").read_text()
    with pytest.raises(RuntimeError, match="not the files"), reading(tiny_pack, "anything"):
        raise RuntimeError("not the files")  # a bug or a device: not the pack's fault, not reworded
