"""Fixtures shared by every test: tiny packs, images, the real Redis."""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import secrets
from collections.abc import Callable
from pathlib import Path

# Tests start tritonserver and servers as child processes while their own gRPC clients run; grpc's
# fork handlers can abort such a child between fork and exec ("Check failed: ... KICKED"). The
# children exec at once, so the handlers have nothing to do. Read when grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import numpy as np
import pytest
import redis
from PIL import Image

from squint.app.tiny_pack import write_tiny_pack
from squint.packs import ModelPack

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory) -> ModelPack:
    """The default tiny pack: 24 x 24 grid (576 visual tokens), seed 0."""
    return write_tiny_pack(tmp_path_factory.mktemp("pack-default"), seed=0, shape="default")


@pytest.fixture(scope="session")
def alt_pack(tmp_path_factory) -> ModelPack:
    """A differently shaped tiny pack: 16 x 16 grid, wider LLM with grouped-query attention."""
    return write_tiny_pack(tmp_path_factory.mktemp("pack-alt"), seed=1, shape="alt")


def random_image(seed: int, width: int = 300, height: int = 200) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def png() -> Callable[..., bytes]:
    """``png(seed, width=300, height=200)``: the PNG bytes of a seeded random image."""
    return lambda seed, width=300, height=200: encode_png(random_image(seed, width, height))


@pytest.fixture
def unseen_seed() -> int:
    """A seed for images no earlier run cached: it and the next 1,000 (``unseen_seed + i``).

    The Redis cache outlives test runs, so a seed below a million came back a cache hit once enough runs'
    pictures were in it (a first request counted as cached); 32 random bits make that a chance in millions."""
    return secrets.randbelow(2**32 - 1_000)


@pytest.fixture(scope="session")
def redis_client():
    """The real Redis server on 127.0.0.1:6379 (scripts/test starts one where none runs)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "squint-tome"


REPO = Path(__file__).resolve().parents[1]
VENDORED_ORACLES = REPO / "tests" / "golden"


def oracles_folder() -> Path:
    """Where the golden data is: SQUINT_ORACLES, else ../shared/oracles, else the vendored copy."""
    for candidate in (os.environ.get("SQUINT_ORACLES"), REPO.parent / "shared" / "oracles", VENDORED_ORACLES):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise RuntimeError(f"no golden data: {VENDORED_ORACLES} is missing from the checkout")


def pytest_configure(config):
    # Test modules read this at collection to parametrize over every case file.
    os.environ["SQUINT_ORACLES"] = str(oracles_folder())
    _require_example_plugin()


def _require_example_plugin():
    """The example third-party plugin must be installed before pytest starts (scripts/test does
    it), so every registry the tests build and every server they start discovers its entry point."""
    try:
        importlib.metadata.distribution("squint-tome")
    except importlib.metadata.PackageNotFoundError:
        raise pytest.UsageError(
            "the example plugin squint-tome is not installed: run scripts/test, or "
            f"pip install --no-deps -e {EXAMPLE_PLUGIN}"
        ) from None
