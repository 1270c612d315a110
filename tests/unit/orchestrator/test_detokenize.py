import pytest
from transformers import AutoTokenizer

from orchestrator.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_pack):
    return AutoTokenizer.from_pretrained(tiny_pack.llava_dir)


def stream(detokenizer, ids):
    return [detokenizer.push([i]) for i in ids]


def test_deltas_join_to_the_full_decode(tokenizer):
    ids = tokenizer("Hello there, café!", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(stream(detokenizer, ids)) + detokenizer.flush()
    assert text == tokenizer.decode(ids) == "Hello there, café!"


def test_partial_utf8_is_held_until_complete(tokenizer):
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2  # byte fallback: two byte tokens
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert deltas[0] == "" and "".join(deltas).strip() == "é"


def test_stop_string_cuts_the_text_and_stops(tokenizer):
    ids = tokenizer("abc STOP def", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    deltas = stream(detokenizer, ids)
    assert "".join(deltas) + detokenizer.flush() == "abc "
    assert detokenizer.stopped


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end(tokenizer):
    ids = tokenizer("abc ST", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    held = "".join(stream(detokenizer, ids))
    assert held == "abc " and detokenizer.flush() == "ST" and not detokenizer.stopped
