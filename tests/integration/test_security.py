"""TLS, mutual TLS and token authentication on real servers with real handshakes."""

from __future__ import annotations

import asyncio
import struct
import time

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squint_test_certs import Authority
from squint_test_media import make_video, png_claiming

from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import (
    AuthSettings,
    ClientTlsSettings,
    GrpcServerSettings,
    ServerTlsSettings,
    client_channel,
    create_server,
)

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(folder, "squint-ca"), Authority(folder, "rogue-ca")
    return {
        "ca": ca.pair.cert,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
    }


class Echo(pb_grpc.GenerationServiceServicer):
    async def Generate(self, request, context):
        return pb.GenerateResponse(request_id=request.request_id, text="ok")


def run_server(tls: ServerTlsSettings, auth: AuthSettings | None, calls):
    """Start a real grpc.aio server, run ``calls(address)`` in its loop, stop it."""

    async def scenario():
        def add(server):
            pb_grpc.add_GenerationServiceServicer_to_server(Echo(), server)
            return [pb.DESCRIPTOR.services_by_name["GenerationService"].full_name]

        serving = create_server(GrpcServerSettings(port=0, tls=tls), "test", add, auth=auth)
        await serving.start()
        await serving.set_serving(True)
        try:
            return await calls(f"localhost:{serving.port}")
        finally:
            await serving.stop(0)

    return asyncio.run(scenario())


async def generate(address, tls: ClientTlsSettings, metadata=()):
    async with client_channel(address, tls, []) as channel:
        return await pb_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(request_id="r"), metadata=metadata, timeout=10
        )


def mtls_server(pki) -> ServerTlsSettings:
    return ServerTlsSettings(
        cert_file=str(pki["server"].cert), key_file=str(pki["server"].key), client_ca_file=str(pki["ca"])
    )


def test_mutual_tls_admits_our_client_and_refuses_others_at_the_handshake(pki):
    good = ClientTlsSettings(True, str(pki["ca"]), str(pki["client"].cert), str(pki["client"].key))
    rogue = ClientTlsSettings(True, str(pki["ca"]), str(pki["rogue_client"].cert), str(pki["rogue_client"].key))
    anonymous = ClientTlsSettings(True, str(pki["ca"]))

    async def calls(address):
        outcomes = {"good": (await generate(address, good)).text}
        for name, tls in (("rogue", rogue), ("anonymous", anonymous), ("plaintext", ClientTlsSettings())):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate(address, tls)
            outcomes[name] = raised.value.code()
        return outcomes

    outcomes = run_server(mtls_server(pki), None, calls)
    assert outcomes["good"] == "ok"
    # Refused before any RPC: the handshake fails, so the channel never becomes ready.
    assert outcomes["rogue"] == outcomes["anonymous"] == outcomes["plaintext"] == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_required_on_the_api_but_not_on_health(pki):
    tls = ServerTlsSettings(cert_file=str(pki["server"].cert), key_file=str(pki["server"].key))
    client = ClientTlsSettings(True, str(pki["ca"]))

    async def calls(address):
        codes = {}
        for name, metadata in (
            ("none", ()),
            ("wrong", (("authorization", "Bearer nope"),)),
            ("basic", (("authorization", "Basic s3cret"),)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generate(address, client, metadata)
            codes[name] = (raised.value.code(), raised.value.details())
        codes["right"] = (await generate(address, client, (("authorization", "Bearer s3cret"),))).text
        async with client_channel(address, client, []) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        codes["health"] = health.status
        return codes

    codes = run_server(tls, AuthSettings(tokens=("s3cret", "other")), calls)
    for name in ("none", "wrong", "basic"):
        assert codes[name] == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (authorization metadata)",
        )
    assert codes["right"] == "ok" and codes["health"] == health_pb2.HealthCheckResponse.SERVING


def test_a_vision_worker_serves_the_orchestrators_client_over_mutual_tls(pki, tiny_pack, png):
    from orchestrator.vision_client import ImageToEncode, VisionClient, VisionContext
    from vision_worker.server import start
    from vision_worker.settings import vision_settings

    settings = vision_settings(
        env={},
        overrides={
            "pack_dir": tiny_pack.root,
            "grpc.port": 0,
            "grpc.tls": mtls_server(pki),
            "cache.redis_url": "",
            "metrics.enabled": False,
        },
    )

    async def scenario():
        serving, encoder = await start(settings)
        try:
            client = VisionClient(
                f"localhost:{serving.port}",
                64 << 20,
                60,
                ClientTlsSettings(True, str(pki["ca"]), str(pki["client"].cert), str(pki["client"].key)),
            )
            image = ImageToEncode(png(1), "chunks[0].image")
            [analysis] = await client.analyze([image], VisionContext("avgpool", {}, "", "r"))
            await client.close()
            return analysis
        finally:
            await serving.stop(0)
            await encoder.close()

    analysis = asyncio.run(scenario())
    assert analysis.natural_tokens == 144


def test_tritonserver_serves_the_orchestrators_triton_client_over_mutual_tls(pki, tiny_pack, tmp_path):
    from llm_worker import STAGED_MODEL_NAME
    from llm_worker.tritonserver import TritonServerProcess, TritonServerSettings
    from orchestrator.llm_client import LLMRequest, TritonLLMClient
    from orchestrator.prompting import PromptBuilder
    from orchestrator.server import build_orchestrator
    from orchestrator.settings import orchestrator_settings
    from orchestrator.types import Finished, GenerationRequest, Sampling, TextChunk
    from squint.errors import UpstreamUnavailable

    ours = ClientTlsSettings(True, str(pki["ca"]), str(pki["client"].cert), str(pki["client"].key))
    rogue = ClientTlsSettings(True, str(pki["ca"]), str(pki["rogue_client"].cert), str(pki["rogue_client"].key))
    # The staged engine alone: this is about the transport, and it spares loading vLLM.
    server = TritonServerSettings(
        pack_dir=tiny_pack.root,
        run_dir=tmp_path,
        grpc_tls=mtls_server(pki),
        probe_tls=ours,
        models=(STAGED_MODEL_NAME,),
    )
    prompts = PromptBuilder(tiny_pack)

    async def scenario(url):
        settings = orchestrator_settings(
            env={},
            overrides={
                "pack_dir": tiny_pack.root,
                "triton_url": url,
                "triton_tls": ours,
                "triton_model": STAGED_MODEL_NAME,
                "metrics.enabled": False,
            },
        )
        orchestrator = build_orchestrator(settings, prompts)
        orchestrator.llm.start()  # its one endpoint: triton_url
        try:
            request = GenerationRequest((TextChunk("Hello?"),), "tls", sampling=Sampling(max_new_tokens=3))
            events = [event async for event in orchestrator.generate(request)]
        finally:
            await orchestrator.llm.close()
        refused = {}
        for name, tls in (
            ("plaintext", ClientTlsSettings()),
            ("rogue", rogue),
            ("anonymous", ClientTlsSettings(True, str(pki["ca"]))),
        ):
            client = TritonLLMClient(url, STAGED_MODEL_NAME, 1 << 20, 10, tls)
            ids = np.asarray(prompts.render((TextChunk("Hi"),)).token_ids, dtype=np.int64)
            try:
                with pytest.raises(UpstreamUnavailable) as caught:
                    async for _ in client.generate(LLMRequest(ids, None, Sampling(max_new_tokens=2), name)):
                        pass
                refused[name] = caught.value.message
            finally:
                await client.close()
        return events, refused

    with TritonServerProcess(server) as triton:
        events, refused = asyncio.run(scenario(triton.grpc_url))
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 3
    assert set(refused) == {"plaintext", "rogue", "anonymous"}


def _ten_hour_video() -> bytes:
    """A few frames of Matroska whose Segment Duration claims ten hours."""
    data = make_video(16, container="matroska")
    at = data.index(b"\x44\x89\x88")  # EBML ID of Duration, size 8: a big-endian double, in ms
    return data[: at + 3] + struct.pack(">d", 10 * 3600 * 1000.0) + data[at + 11 :]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        pytest.param(
            lambda: pb.Chunk(image=pb.Image(data=png_claiming(10_000, 10_000))),
            "chunks[0].image.data is 10000x10000 = 100000000 pixels; the limit is 40000000 pixels (max_image_pixels)",
            id="100-megapixel-png",
        ),
        pytest.param(
            lambda: pb.Chunk(video=pb.Video(data=_ten_hour_video())),
            "chunks[0].video.data declares a duration of 36000.0 s; the limit is 600.0 s (max_duration_seconds)",
            id="ten-hour-video",
        ),
    ],
)
def test_media_bombs_are_refused_quickly_through_the_public_api(default_client, chunk, message):
    request = pb.GenerateRequest(
        chunks=[chunk(), pb.Chunk(text="What is it?")], sampling=pb.SamplingParams(max_new_tokens=2)
    )
    assert len(request.SerializeToString()) < 64 * 1024  # small files, absurd claims
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        default_client.Generate(request, timeout=30)
    elapsed = time.monotonic() - started
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == message
    assert elapsed < 2.0, f"refused after {elapsed:.2f} s"


def test_the_http_api_serves_tls_and_mutual_tls_with_the_grpc_certificates(pki):
    import ssl as ssl_module

    import httpx

    from orchestrator.openai_http import create_app
    from orchestrator.server import http_server

    async def scenario(tls: ServerTlsSettings) -> dict[str, object]:
        server = http_server(create_app(None, ("m",)), "127.0.0.1", 0, tls)
        server.install_signal_handlers = lambda: None
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"https://localhost:{port}/health"
        outcomes: dict[str, object] = {}
        try:
            trusted = ssl_module.create_default_context(cafile=str(pki["ca"]))
            with_cert = ssl_module.create_default_context(cafile=str(pki["ca"]))
            with_cert.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))
            for name, context in (("trusted", trusted), ("with client cert", with_cert)):
                try:
                    async with httpx.AsyncClient(verify=context) as client:
                        outcomes[name] = (await client.get(url, timeout=10)).status_code
                except httpx.HTTPError as exc:
                    outcomes[name] = type(exc).__name__
            try:
                async with httpx.AsyncClient(verify=True) as client:  # the system CAs do not know ours
                    outcomes["untrusted"] = (await client.get(url, timeout=10)).status_code
            except httpx.HTTPError as exc:
                outcomes["untrusted"] = type(exc).__name__
        finally:
            server.should_exit = True
            await task
        return outcomes

    server_only = ServerTlsSettings(cert_file=str(pki["server"].cert), key_file=str(pki["server"].key))
    tls = asyncio.run(scenario(server_only))
    assert tls["trusted"] == 200 and tls["with client cert"] == 200 and tls["untrusted"] == "ConnectError"
    mutual = asyncio.run(scenario(mtls_server(pki)))
    assert mutual["with client cert"] == 200
    assert mutual["trusted"] in ("ConnectError", "ReadError", "RemoteProtocolError")  # no client certificate
