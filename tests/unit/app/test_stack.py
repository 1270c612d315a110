"""The local stack's LLM workers without starting servers: the flags, the orchestrator's command
line, and `squint down` stopping every tritonserver it recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from squint.app.cli import _stack_settings, build_parser, main
from squint.app.stack import STATE_FILE, Stack, StackSettings, stop_detached


def test_up_takes_the_number_of_llm_workers(tmp_path):
    args = build_parser().parse_args(["up", "--pack", str(tmp_path), "--llm-workers", "3"])
    assert _stack_settings(args).llm_workers == 3
    assert _stack_settings(build_parser().parse_args(["up", "--pack", str(tmp_path)])).llm_workers == 1


def test_a_stack_needs_an_llm_worker(tmp_path, capsys):
    with pytest.raises(ValueError, match="llm_workers is 0"):
        StackSettings(pack_dir=tmp_path, llm_workers=0)
    assert main(["up", "--pack", str(tmp_path), "--llm-workers", "0", "--state-dir", str(tmp_path / "s")]) == 2
    assert "at least one LLM worker" in capsys.readouterr().err


def test_the_orchestrator_is_given_every_llm_worker(tiny_pack, tmp_path):
    stack = Stack(StackSettings.on_free_ports(pack_dir=tiny_pack.root, state_dir=tmp_path, llm_workers=2))
    stack.tritons = [SimpleNamespace(grpc_url="127.0.0.1:8001"), SimpleNamespace(grpc_url="127.0.0.1:9101")]
    argv = stack.orchestrator_process("orchestrator", "orchestrator").argv
    assert argv[argv.index("--llm-workers") + 1] == "127.0.0.1:8001,127.0.0.1:9101"
    assert stack.triton is stack.tritons[0] and stack.llm_addresses == ["127.0.0.1:8001", "127.0.0.1:9101"]


def test_serve_orchestrator_reads_the_llm_worker_list():
    args = build_parser().parse_args(["serve", "orchestrator", "--llm-workers", "a:8001,b:8001"])
    assert args.llm_workers == "a:8001,b:8001"


def test_down_stops_every_tritonserver_recorded(tmp_path):
    sleepers = {
        name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        for name in ("tritonserver", "tritonserver_1", "tritonserver_2")
    }
    try:
        state = {"pids": {name: p.pid for name, p in sleepers.items()}, "endpoints": {}}
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        stopped = stop_detached(tmp_path)
        assert stopped == ["tritonserver", "tritonserver_1", "tritonserver_2"]
        for process in sleepers.values():
            assert process.wait(10) is not None
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        for process in sleepers.values():
            if process.poll() is None:
                os.killpg(process.pid, 9)
