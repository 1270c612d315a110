"""The split stack (orchestrator -> vision worker -> Triton) equals Hugging Face, token for token."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from squint_test_stack import generated_tokens
from transformers import AutoProcessor, LlavaForConditionalGeneration

from squint.app.client import build_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW_TOKENS = 16
PAIRS = [
    (0, "What is in this image?"),
    (1, "What is in this image?"),
    (2, "Describe the colours, please."),
]


def hugging_face_answer(pack, image_bytes: bytes | list[bytes], question: str) -> list[int]:
    images = image_bytes if isinstance(image_bytes, list) else [image_bytes]
    processor = AutoProcessor.from_pretrained(pack.llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir).eval()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pictures = [Image.open(io.BytesIO(image)) for image in images]
    inputs = processor(images=pictures, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("which", ["default", "alt"])
def test_compressor_none_matches_hugging_face_generate(which, request, png):
    pack = request.getfixturevalue("tiny_pack" if which == "default" else "alt_pack")
    client = request.getfixturevalue(f"{which}_client")
    answers = []
    for seed, question in PAIRS:
        image = png(seed, 280 + 40 * seed, 200)
        reply = client.Generate(build_request(question, [image], compressor="none", max_new_tokens=MAX_NEW_TOKENS))
        expected = hugging_face_answer(pack, image, question)
        assert list(reply.token_ids) == expected, f"pair {seed}: stack {list(reply.token_ids)} != HF {expected}"
        grid = 24 if which == "default" else 16
        assert reply.usage.media[0].tokens_before == reply.usage.media[0].tokens_after == grid * grid
        assert reply.finish_reason in ("length", "stop")
        answers.append(list(reply.token_ids))
    # The model looks at the image: the same question about another image gets another answer.
    assert answers[0] != answers[1]


@pytest.mark.parametrize("which", ["default", "alt"])
def test_two_images_on_the_vllm_engine_match_hugging_face_generate(which, request, png):
    pack = request.getfixturevalue("tiny_pack" if which == "default" else "alt_pack")
    client = request.getfixturevalue(f"{which}_client")
    stack = request.getfixturevalue(f"{which}_stack")
    question = "What differs between the two pictures?"
    for first, second in ((3, 4), (5, 0)):
        images = [png(first, 240, 240 + 20 * first), png(second, 300, 180)]
        before = generated_tokens(stack)
        reply = client.Generate(build_request(question, images, compressor="none", max_new_tokens=MAX_NEW_TOKENS))
        expected = hugging_face_answer(pack, images, question)
        assert list(reply.token_ids) == expected, f"images {first}, {second}: stack {list(reply.token_ids)} != HF"
        after = generated_tokens(stack)
        # Served by vLLM (squint_llm), not the staged engine.
        assert after["squint_llm"] - before.get("squint_llm", 0) == len(reply.token_ids)
        assert after.get("squint_llm_staged", 0) == before.get("squint_llm_staged", 0)
