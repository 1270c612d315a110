"""The Triton model repository's configs, and what the launcher prepares, checked without a server."""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import llm_worker
from llm_worker import MODEL_NAME, STAGED_MODEL_NAME, model_repository_path
from llm_worker.tritonserver import (
    PACK_DIR_ENV,
    TritonServerProcess,
    TritonServerSettings,
    prepare_backend_directory,
    tritonserver_command,
    tritonserver_env,
)

T = mc.DataType
# name: (data type, dims, optional) -- the contract the orchestrator is written to.
INPUTS = {
    "input_ids": (T.TYPE_INT64, [-1], False),
    "visual_embeds": (T.TYPE_FP32, [-1, -1], True),
    "max_new_tokens": (T.TYPE_INT32, [1], True),
    "temperature": (T.TYPE_FP32, [1], True),
    "top_p": (T.TYPE_FP32, [1], True),
    "top_k": (T.TYPE_INT32, [1], True),
    "seed": (T.TYPE_UINT64, [1], True),
    "repetition_penalty": (T.TYPE_FP32, [1], True),
    "stop_token_ids": (T.TYPE_INT64, [-1], True),
    # a UTF-8 JSON array: no BYTES tensor crosses the python stub beside numpy 2
    "stop": (T.TYPE_UINT8, [-1], True),
}
# The staged engine's inputs besides: in-LLM pooling.
SPAN_INPUTS = {
    # (start, length, layer K, stride S, shape 1 = 1d / 2 = 2d) per span pooled inside the LLM
    "image_spans": (T.TYPE_INT64, [-1, 5], True),
    # per span (or one for every span): pooled position ids as the released code
    "reference_mode": (T.TYPE_BOOL, [-1], True),
}
OUTPUTS = {"token_ids": (T.TYPE_INT64, [-1]), "finish_reason": (T.TYPE_UINT8, [-1])}
MODELS = {MODEL_NAME: INPUTS, STAGED_MODEL_NAME: dict(INPUTS, **SPAN_INPUTS)}


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize(
    ("relative", "kind", "visual_type"),
    [
        ("config.pbtxt", mc.ModelInstanceGroup.KIND_CPU, T.TYPE_FP32),
        ("configs/gpu.pbtxt", mc.ModelInstanceGroup.KIND_GPU, T.TYPE_FP16),
    ],
)
def test_configs_declare_the_tensor_contract(model: str, relative: str, kind: int, visual_type: int) -> None:
    config = _config(model_repository_path() / model / relative)
    assert config.name == model and config.backend == "python"
    assert config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    assert [group.kind for group in config.instance_group] == [kind]
    expected = dict(MODELS[model], visual_embeds=(visual_type, [-1, -1], True))
    assert {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input} == expected
    assert {o.name: (o.data_type, list(o.dims)) for o in config.output} == OUTPUTS


@pytest.mark.parametrize("model", sorted(MODELS))
def test_gpu_config_differs_from_the_cpu_one_only_where_it_must(model: str) -> None:
    cpu, gpu = (_config(model_repository_path() / model / p) for p in ("config.pbtxt", "configs/gpu.pbtxt"))
    for config in (cpu, gpu):
        config.ClearField("instance_group")
        next(i for i in config.input if i.name == "visual_embeds").data_type = T.TYPE_FP32
    assert cpu == gpu


def test_the_repository_ships_in_the_package_and_only_the_adapter_imports_triton() -> None:
    repository = model_repository_path()
    assert repository.parent == Path(llm_worker.__file__).resolve().parent
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == sorted(MODELS)
    for model, adapter in ((MODEL_NAME, "VLLMModel"), (STAGED_MODEL_NAME, "StagedModel")):
        source = (repository / model / "1" / "model.py").read_text()
        assert f"from llm_worker.triton_python import {adapter} as TritonPythonModel" in source
    importers = sorted(
        str(path.relative_to(repository.parent))
        for path in repository.parent.rglob("*.py")
        if re.search(r"^\s*(import|from)\s+triton_python_backend_utils\b", path.read_text(), re.M)
    )
    assert importers == ["triton_python.py"]


def test_backend_directory_holds_the_stub_for_this_python(tmp_path: Path) -> None:
    backends = prepare_backend_directory(tmp_path)
    assert prepare_backend_directory(tmp_path) == backends  # idempotent
    python_dir = backends / "python"
    assert sorted(p.name for p in python_dir.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    stub = (python_dir / "triton_python_backend_stub").resolve()
    assert stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}" and os.access(stub, os.X_OK)


def test_server_env_puts_this_python_first(tmp_path: Path) -> None:
    env = tritonserver_env(tmp_path, base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == sysconfig.get_config_var("LIBDIR")
    assert libs[1].endswith("nvidia_pytriton.libs") and Path(libs[1]).is_dir() and libs[2] == "/opt/lib"
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.prefix) / "bin"), "/usr/bin"]
    assert env[PACK_DIR_ENV] == str(tmp_path.resolve())


def test_a_server_not_started_says_so() -> None:
    server = TritonServerProcess(TritonServerSettings())
    with pytest.raises(RuntimeError, match="has not been started"):
        _ = server.grpc_url
    with pytest.raises(RuntimeError, match="has not been started"):
        server.wait_ready(1)
    assert server.stop() is None


def test_command_binds_loopback_and_selects_the_gpu_config_on_request(tmp_path: Path) -> None:
    settings = TritonServerSettings(model_config_name="gpu")
    command = tritonserver_command(settings, tmp_path / "backends", (1001, 1002, 1003))
    assert Path(command[0]).name == "tritonserver" and Path(command[0]).is_file()
    for flag in (
        f"--model-repository={model_repository_path()}",
        f"--backend-directory={tmp_path / 'backends'}",
        "--grpc-address=127.0.0.1",
        "--grpc-port=1001",
        "--http-address=127.0.0.1",
        "--http-port=1002",
        "--metrics-address=127.0.0.1",
        "--metrics-port=1003",
        "--model-config-name=gpu",
        "--model-control-mode=explicit",
        "--disable-auto-complete-config",
        f"--load-model={MODEL_NAME}",
        f"--load-model={STAGED_MODEL_NAME}",
    ):
        assert flag in command
    again = tritonserver_command(settings, tmp_path, (1, 2, 3))
    prefixes = {arg for arg in command + again if "shm-region-prefix-name" in arg}
    assert len(prefixes) == 2, "each server needs its own shared-memory prefix"
    assert not any("model-config-name" in a for a in tritonserver_command(TritonServerSettings(), tmp_path, (1, 2, 3)))
