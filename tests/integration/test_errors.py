"""Bad input gets the right status and a message naming the field and the limit; nothing breaks."""

from __future__ import annotations

import os

import grpc
import pytest
from squint_test_media import png_claiming

from squint.app.client import build_request
from squint.generate.v1 import generate_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]


CASES = {
    "undecodable image": (
        build_request("What is it?", [b"GIF89a but not really an image"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"chunks[0].image.data is not a decodable image",
    ),
    "empty request": (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "chunks is empty"),
    "empty chunk": (
        pb.GenerateRequest(chunks=[pb.Chunk()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunks[0] is empty; set its text, image or video",
    ),
    "unknown compressor": (
        build_request("What is it?", [b"png?"], compressor="magic"),
        grpc.StatusCode.NOT_FOUND,
        "compressor.name 'magic' is not registered; available: avgpool, dfmr, ",
    ),
    "bad compressor parameter": (
        build_request("What is it?", [b"png?"], compressor="avgpool", params={"stride": 0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "compressor.params.stride (compressor 'avgpool') is 0; the minimum is 1",
    ),
    "oversize image by pixels": (
        build_request("What is it?", [png_claiming(9000, 9000)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunks[0].image.data is 9000x9000 = 81000000 pixels; the limit is 40000000 pixels (max_image_pixels)",
    ),
    "oversize image by bytes": (
        build_request("What is it?", [os.urandom(21 * 1024 * 1024)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunks[0].image.data is 21.0 MiB; the limit is 20.0 MiB (max_image_bytes=20971520)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_status_and_the_servers_keep_serving(case, default_client, png):
    request, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        default_client.Generate(request, timeout=60)
    assert raised.value.code() == code
    assert message in raised.value.details()
    assert "Traceback" not in raised.value.details()
    # The same servers answer the next good request.
    reply = default_client.Generate(build_request("And now?", [png(11)], max_new_tokens=2), timeout=60)
    assert len(reply.token_ids) == 2


def test_budget_below_the_compressors_output_is_resource_exhausted(default_client, png):
    with pytest.raises(grpc.RpcError) as raised:
        default_client.Generate(build_request("What is it?", [png(12)], compressor="none", budget=100), timeout=60)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the 1 media item needs at least 576 visual tokens" in raised.value.details()
    assert "visual_token_budget is 100" in raised.value.details()


def test_streaming_reports_errors_with_the_same_status(default_client):
    with pytest.raises(grpc.RpcError) as raised:
        list(default_client.GenerateStream(pb.GenerateRequest(), timeout=60))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunks is empty" in raised.value.details()


def test_a_pooling_layer_beyond_the_llms_depth_is_invalid_with_the_llms_reason(default_client, png):
    # Only the LLM worker knows its depth; its refusal reaches the client as INVALID_ARGUMENT.
    request = build_request("What is it?", [png(13)], compressor="staged_pool", params={"layer": 50, "stride": 4})
    with pytest.raises(grpc.RpcError) as raised:
        default_client.Generate(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the LLM refused the request: image_spans row 0" in raised.value.details()
    assert "layer 50 is not a decoder layer of this model" in raised.value.details()
    reply = default_client.Generate(build_request("And now?", [png(11)], max_new_tokens=2), timeout=60)
    assert len(reply.token_ids) == 2
