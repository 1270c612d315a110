import pytest

from orchestrator.service import request_from_proto
from orchestrator.types import ImageChunk, TextChunk
from squint.app.client import build_request
from squint.errors import InvalidRequest
from squint.generate.v1 import generate_pb2 as pb


def test_proto_becomes_the_domain_request():
    message = build_request("q", [b"img"], compressor="avgpool", params={"stride": 3}, budget=50, max_new_tokens=7)
    message.sampling.stop.append("END")
    request = request_from_proto(message, "fallback-id")
    assert request.chunks == (ImageChunk(b"img"), TextChunk("q"))
    assert (request.compressor, request.compressor_params) == ("avgpool", {"stride": 3.0})
    assert (request.visual_token_budget, request.sampling.max_new_tokens, request.sampling.stop) == (50, 7, ("END",))
    assert request.request_id == "fallback-id"


@pytest.mark.parametrize("bad", ["x" * 129, "line\nbreak", "naïve"])
def test_request_id_must_be_short_printable_ascii(bad):
    with pytest.raises(InvalidRequest, match="request_id must be at most 128 printable ASCII"):
        request_from_proto(pb.GenerateRequest(request_id=bad, chunks=[pb.Chunk(text="q")]), "x")
