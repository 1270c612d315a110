"""Plugins are found through their entry point; a broken one fails start-up by name until denied.

The broken distribution is a real one on disk (a dist-info with an entry point), put on the
path of a child process only, so the shared environment never holds a broken plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def broken_dist(tmp_path: Path) -> Path:
    (tmp_path / "squint_broken_plugin.py").write_text("raise ImportError('this plugin is deliberately broken')\n")
    info = tmp_path / "squint_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: squint-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[squint.compressors]\nbroken = squint_broken_plugin\n")
    return tmp_path


def run_squint(*args: str, path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "squint", *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_broken_plugin_fails_start_up_naming_its_distribution_and_entry_point(broken_dist):
    result = run_squint("plugins", "list", path=broken_dist)
    assert result.returncode == 1
    assert (
        "compressor plugin 'broken' from squint-broken 0.3 failed to load "
        "(entry point broken = squint_broken_plugin): ImportError: this plugin is deliberately broken"
    ) in result.stderr
    assert "SQUINT_VISION_PLUGINS_DENY=broken" in result.stderr
    assert "Traceback" not in result.stderr


def test_start_up_succeeds_once_it_is_denied(broken_dist):
    result = run_squint("plugins", "list", path=broken_dist, extra_env={"SQUINT_VISION_PLUGINS_DENY": "broken"})
    assert result.returncode == 0, result.stderr
    assert "avgpool" in result.stdout and "broken" not in result.stdout


def test_the_vision_worker_refuses_to_start_with_it(broken_dist, tiny_pack):
    result = run_squint("serve", "vision", "--pack", str(tiny_pack.root), "--port", "0", path=broken_dist)
    assert result.returncode == 1
    assert "compressor plugin 'broken' from squint-broken 0.3 failed to load" in result.stderr


def test_the_example_plugin_is_discovered_through_its_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "squint", "plugins", "list", "--json"], capture_output=True, text=True, timeout=120
    )
    import json

    tome = next(info for info in json.loads(result.stdout) if info["name"] == "tome")
    assert (tome["distribution"], tome["plugin"]) == ("squint-tome", "tome")
