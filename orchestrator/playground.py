"""The playground page: plain HTML, CSS and JavaScript from the package, served at ``/``.

The page calls the same HTTP API as any client (``/v1/chat/completions`` with Squint's
``return_coverage``, one streaming request per compressor) and draws each visual token's patches
over the picture. Nothing here is a second API: only the page's files and, when a folder of
example pictures is configured, that folder's pictures.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from orchestrator.openai_http import error_response

FILES = Path(__file__).with_name("static")
PAGE_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
EXAMPLE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
EXAMPLE_TYPES |= {".mp4": "video/mp4", ".webm": "video/webm"}
MAX_EXAMPLES = 24


def examples_in(folder: Path | None) -> dict[str, Path]:
    """The example files a folder offers (the first ``MAX_EXAMPLES`` by name; none when absent)."""
    if folder is None or not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXAMPLE_TYPES)
    return {p.name: p for p in files[:MAX_EXAMPLES]}


def add_playground(app: FastAPI, examples: Path | None) -> None:
    """``GET /`` (the page), ``GET /playground/FILE`` (its script and style) and the examples."""
    offered = examples_in(examples)

    def not_found():
        return error_response(404, "no such file", "invalid_request_error")  # as an unknown path is

    @app.get("/")
    async def page():
        return FileResponse(FILES / "index.html", media_type="text/html", headers={"cache-control": "no-cache"})

    @app.get("/playground/examples")
    async def example_list():
        return {"object": "list", "data": list(offered)}

    @app.get("/playground/examples/{name}")
    async def example(name: str):
        path = offered.get(name)
        if path is None:
            return not_found()
        return FileResponse(path, media_type=EXAMPLE_TYPES[path.suffix.lower()])

    @app.get("/playground/{name}")
    async def page_file(name: str):
        if name not in PAGE_FILES:
            return not_found()
        return FileResponse(FILES / name, media_type=PAGE_FILES[name], headers={"cache-control": "no-cache"})
