import pytest
from transformers import AutoProcessor

from orchestrator.prompting import PromptBuilder
from orchestrator.types import ImageChunk, TextChunk, VideoChunk
from squint.errors import BudgetExceeded


@pytest.fixture(scope="module")
def builder(tiny_pack):
    return PromptBuilder(tiny_pack)


def test_expanded_ids_equal_the_hugging_face_processor(builder, tiny_pack, png):
    import io

    from PIL import Image

    chunks = (ImageChunk(png(0)), TextChunk("What is shown?"))
    prompt = builder.render(chunks)
    ids, starts = builder.expand(prompt, [576], max_new_tokens=8)
    assert ids[starts[0]] == builder.image_token_id and ids[starts[0] - 1] != builder.image_token_id
    processor = AutoProcessor.from_pretrained(tiny_pack.llava_dir)
    expected = processor(images=Image.open(io.BytesIO(png(0))), text=prompt.text, return_tensors="np")["input_ids"][0]
    assert ids.tolist() == expected.tolist()
    assert prompt.text == "USER: <image>\nWhat is shown? ASSISTANT:"


def test_interleaved_images_keep_their_places(builder):
    prompt = builder.render((TextChunk("Compare"), ImageChunk(b"a"), TextChunk("with"), ImageChunk(b"b")))
    assert prompt.text == "USER: Compare <image>\nwith <image>\nASSISTANT:"
    ids, starts = builder.expand(prompt, [3, 5], max_new_tokens=1)
    ids = ids.tolist()
    assert ids[starts[1] : starts[1] + 5] == [builder.image_token_id] * 5
    assert ids.count(builder.image_token_id) == 8
    first = ids.index(builder.image_token_id)
    assert ids[first : first + 3] == [builder.image_token_id] * 3 and ids[first + 3] != builder.image_token_id


def test_video_frames_follow_their_times_when_frame_times_are_on(builder):
    chunks = (TextChunk("What changed?"), VideoChunk(b"v"), ImageChunk(b"a"))
    timed = builder.render(chunks, frames={1: [0.5, 12.5]}, frame_times=True)
    assert timed.text == "USER: What changed? frame at 0.5 s: <image>\nframe at 12.5 s: <image>\n<image>\nASSISTANT:"
    assert timed.token_ids.count(builder.image_token_id) == 3
    untimed = builder.render(chunks, frames={1: [0.5, 12.5]})
    assert untimed.text == "USER: What changed? <image>\n<image>\n<image>\nASSISTANT:"


def test_system_prompt_goes_first(builder):
    prompt = builder.render((TextChunk("Hi"),), system_prompt="Be brief.")
    assert prompt.text.startswith("Be brief. USER: Hi")


def test_context_overflow_names_the_numbers(builder):
    prompt = builder.render((ImageChunk(b"a"), TextChunk("q")))
    with pytest.raises(BudgetExceeded, match=r"exceed the model's context of 4096"):
        builder.expand(prompt, [4000], max_new_tokens=200)
