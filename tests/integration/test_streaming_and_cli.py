"""Streaming replies and the `squint` command against a running stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from squint.app.client import build_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_stream_carries_the_same_tokens_as_unary_and_ends_with_usage(default_client, png):
    request = build_request("What is it?", [png(21)], compressor="avgpool", max_new_tokens=8)
    unary = default_client.Generate(request, timeout=60)
    messages = list(default_client.GenerateStream(request, timeout=60))
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert all(not m.HasField("usage") for m in messages[:-1])
    final = messages[-1]
    assert final.finish_reason == "length" and final.usage.completion_tokens == 8
    timings = final.usage.timings
    assert 0 < timings.encode_ms <= timings.time_to_first_token_ms <= timings.total_ms


def test_squint_ask_prints_the_answer_and_usage(default_stack, tmp_path, png):
    image = tmp_path / "image.png"
    image.write_bytes(png(22))
    command = [sys.executable, "-m", "squint", "ask", "--address", default_stack.orchestrator_address]
    text = subprocess.run(
        [*command, "--image", str(image), "--compressor", "avgpool", "--max-new-tokens", "6", "What is it?"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "visual tokens 576 -> 144 (avgpool)" in text
    whole = json.loads(
        subprocess.run(
            [*command, "--image", str(image), "--json", "--max-new-tokens", "6", "What is it?"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )
    assert len(whole["token_ids"]) == 6 and "text" in whole
    assert whole["usage"]["media"][0]["tokens_after"] == 576
