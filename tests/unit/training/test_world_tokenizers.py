"""The world pack's tokenizers: a token a known word, characters for the rest; the tiny pack's unchanged."""

from __future__ import annotations

from squint.app.tiny_pack import make_clip_tokenizer, make_llama_tokenizer

WORDS = ["What", "colour", "is", "the", "small", "triangle", "purple", "circle", "left", "USER", "ASSISTANT"]


def test_known_words_are_one_token_each_in_both_tokenizers():
    llama = make_llama_tokenizer(WORDS)
    ids = llama("USER: What colour is the small triangle? ASSISTANT: purple", add_special_tokens=False)["input_ids"]
    pieces = llama.convert_ids_to_tokens(ids)
    for word in ("▁What", "▁colour", "▁small", "▁triangle", "▁purple"):
        assert word in pieces
    assert llama.decode(ids) == "USER: What colour is the small triangle? ASSISTANT: purple"
    clip = make_clip_tokenizer(128, WORDS)
    pieces = clip.convert_ids_to_tokens(clip("A small purple circle at the left.")["input_ids"])
    assert len(pieces) == 10
    # "at" is a known word's ending ("what"), so it is one piece too; "by" is not.
    expected = ["a</w>", "small</w>", "purple</w>", "circle</w>", "at</w>", "the</w>", "left</w>", ".</w>"]
    assert pieces[1:-1] == expected
    assert clip.convert_ids_to_tokens(clip("by")["input_ids"])[1:-1] == ["b", "y</w>"]


def test_without_words_the_tokenizers_stay_character_level():
    clip = make_clip_tokenizer(77)
    assert len(clip) == 514 and clip.convert_ids_to_tokens(clip("the")["input_ids"])[1:-1] == ["t", "h", "e</w>"]
    llama = make_llama_tokenizer()
    assert all(len(p.lstrip("▁")) <= 1 for p in llama.convert_ids_to_tokens(llama("the circle")["input_ids"][1:]))
