"""Conversations through the real stack: a multi-turn conversation answers as Hugging Face does,
and the single-turn form keeps working beside it."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from squint.app.client import build_request
from squint.generate.v1 import generate_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW_TOKENS = 12


def test_a_multi_turn_conversation_answers_as_hugging_face(tiny_pack, default_client, png):
    first, second = png(7, 300, 220), png(8, 240, 240)
    request = pb.GenerateRequest(
        messages=[
            pb.Message(role="user", content=[pb.Chunk(image=pb.Image(data=first)), pb.Chunk(text="What is this?")]),
            pb.Message(role="assistant", content=[pb.Chunk(text="A picture of shapes.")]),
            pb.Message(role="user", content=[pb.Chunk(image=pb.Image(data=second)), pb.Chunk(text="And this one?")]),
        ],
        sampling=pb.SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
    )
    reply = default_client.Generate(request)

    processor = AutoProcessor.from_pretrained(tiny_pack.llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir).eval()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture of shapes."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    pictures = [Image.open(io.BytesIO(data)) for data in (first, second)]
    inputs = processor(images=pictures, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert list(reply.token_ids) == output[0, inputs["input_ids"].shape[1] :].tolist()
    assert [m.chunk_index for m in reply.usage.media] == [0, 3] and reply.usage.visual_tokens == 2 * 576


def test_one_user_message_and_the_single_turn_form_give_the_same_answer(default_client, png):
    image = png(9, 256, 256)
    old = default_client.Generate(build_request("Describe it.", [image], max_new_tokens=MAX_NEW_TOKENS))
    new = default_client.Generate(
        pb.GenerateRequest(
            messages=[
                pb.Message(role="user", content=[pb.Chunk(image=pb.Image(data=image)), pb.Chunk(text="Describe it.")])
            ],
            sampling=pb.SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
        )
    )
    assert list(new.token_ids) == list(old.token_ids) and new.usage.prompt_tokens == old.usage.prompt_tokens
