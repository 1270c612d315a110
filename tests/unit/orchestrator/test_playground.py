"""The playground's routes as the settings build them: the page, its files, examples, and off means 404."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient

from orchestrator.metrics import OrchestratorMetrics
from orchestrator.server import build_http_app
from orchestrator.settings import HttpSettings, OrchestratorSettings
from orchestrator.vision_client import CompressorSummary
from squint.errors import UpstreamUnavailable


class FakeVision:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.contexts = []

    async def list_compressors(self, context):
        self.contexts.append(context)
        if self.error is not None:
            raise self.error
        return [CompressorSummary("avgpool", "average pooling", "vision", "squint")]


class FakeOrchestrator:
    def __init__(self, vision: FakeVision | None = None) -> None:
        self.vision = vision or FakeVision()
        self.metrics = OrchestratorMetrics()


def app(pack_dir, tokens: str = "", **http) -> TestClient:
    settings = OrchestratorSettings(pack_dir=pack_dir, http=replace(HttpSettings(enabled=True), **http))
    if tokens:
        settings = replace(settings, auth=replace(settings.auth, tokens=(tokens,)))
    return TestClient(build_http_app(settings, FakeOrchestrator()))


def test_the_page_and_its_files_are_served_and_nothing_else_of_the_package(tiny_pack):
    client = app(tiny_pack.root)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/playground/playground.js"' in page.text and "/playground/playground.css" in page.text
    script = client.get("/playground/playground.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "return_coverage: true" in script.text
    assert client.get("/playground/playground.css").headers["content-type"].startswith("text/css")
    for other in ("/playground/index.html", "/playground/..%2Fplayground.py", "/playground/missing.js"):
        reply = client.get(other)
        assert reply.status_code == 404, other
        assert reply.json()["error"]["type"] == "invalid_request_error"


def test_with_the_setting_off_the_page_is_404_and_the_api_stays(tiny_pack):
    client = app(tiny_pack.root, playground=False)
    for path in ("/", "/playground/playground.js", "/playground/examples"):
        assert client.get(path).status_code == 404, path
    assert client.get("/v1/models").status_code == 200


def test_examples_are_the_configured_folders_pictures_only(tiny_pack, tmp_path, png):
    (tmp_path / "b.png").write_bytes(png(1, 32, 32))
    (tmp_path / "a.png").write_bytes(png(2, 32, 32))
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "sub").mkdir()
    client = app(tiny_pack.root, playground_examples=str(tmp_path))
    assert client.get("/playground/examples").json()["data"] == ["a.png", "b.png"]
    picture = client.get("/playground/examples/a.png")
    assert picture.status_code == 200 and picture.content == png(2, 32, 32)
    assert picture.headers["content-type"] == "image/png"
    for name in ("notes.txt", "..%2F..%2Fetc%2Fpasswd", "c.png"):
        assert client.get(f"/playground/examples/{name}").status_code == 404, name
    # Without the setting: the pack's examples/ folder, and none when the pack has none.
    assert app(tiny_pack.root).get("/playground/examples").json()["data"] == []


def test_compressors_are_listed_behind_the_same_tokens_as_the_api(tiny_pack):
    client = app(tiny_pack.root, tokens="s3cret")
    assert client.get("/v1/squint/compressors").status_code == 401
    assert client.get("/").status_code == 200  # the page itself asks for the token
    listed = client.get("/v1/squint/compressors", headers={"authorization": "Bearer s3cret"})
    assert listed.json()["data"] == [
        {"name": "avgpool", "summary": "average pooling", "output_space": "vision", "distribution": "squint"}
    ]


def test_a_vision_side_outage_lists_no_compressors_with_503(tiny_pack):
    settings = OrchestratorSettings(pack_dir=tiny_pack.root, http=HttpSettings(enabled=True))
    down = FakeOrchestrator(FakeVision(UpstreamUnavailable("no vision worker listed its compressors")))
    reply = TestClient(build_http_app(settings, down)).get("/v1/squint/compressors")
    assert reply.status_code == 503
    assert "no vision worker" in reply.json()["error"]["message"]
