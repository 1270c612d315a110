"""The Dockerfiles of the images the chart names: pinned, multi-stage, non-root, and installing
the package versions of pyproject.toml. No container engine runs here, so they are parsed,
not built (docs/deploy.md says how to build them)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# The image each chart component names (values.yaml <component>.image.repository) and its Dockerfile.
IMAGES = {
    "orchestrator": ("squint/orchestrator", "orchestrator.Dockerfile"),
    "vision": ("squint/vision-worker", "vision-worker.Dockerfile"),
    "llm": ("squint/llm-worker", "llm-worker.Dockerfile"),
}

# nvidia-pytriton embeds one Triton release; its Python 3.11 stub must match the NGC image's
# python backend (pytriton's changelog: 0.7.0 embeds Triton 2.51.0 = NGC 24.10).
NGC_RELEASE_OF_PYTRITON = {"0.7.0": "24.10"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


@pytest.fixture(params=sorted(name for _, name in IMAGES.values()))
def dockerfile(request) -> Path:
    return DOCKER / request.param


def test_every_image_the_chart_names_has_a_dockerfile():
    values = yaml.safe_load((REPO / "helm" / "squint" / "values.yaml").read_text())
    for component, (repository, name) in IMAGES.items():
        assert values[component]["image"]["repository"] == repository
        assert (DOCKER / name).is_file()
        assert (DOCKER / f"{name}.dockerignore").is_file(), "the build context is the repository root"


def test_every_base_image_is_pinned(dockerfile):
    names: set[str] = set()
    for stage in stages(dockerfile):
        keyword, rest = stage[0]
        image, *alias = rest.split()
        if image in names:
            continue
        if "@sha256:" not in image:
            _, _, tag = image.rpartition(":")
            assert tag and "/" not in tag, f"{dockerfile.name}: FROM {image} has no tag"
            assert tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: FROM {image} is not a version"
        if alias:
            assert alias[0].upper() == "AS"
            names.add(alias[1])
    assert "latest" not in dockerfile.read_text().lower()


def test_images_are_multi_stage_and_run_as_a_user_who_is_not_root(dockerfile):
    built = stages(dockerfile)
    assert len(built) >= 2, f"{dockerfile.name}: build the wheel in a stage of its own"
    users = [rest for keyword, rest in built[-1] if keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: USER {users[-1]}"
    assert any(keyword == "COPY" and "--from=wheel" in rest for keyword, rest in built[-1])


def test_images_install_the_pinned_package_versions(dockerfile):
    text = dockerfile.read_text()
    torch = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert torch == "torch==2.13.0"
    assert f"{torch}" in text, f"{dockerfile.name}: install {torch}"
    assert f"squint-{VERSION}-py3-none-any.whl" in text
    assert "--constraint /tmp/constraints.txt" in text and "COPY docker/constraints.txt" in text
    requires_python = PYPROJECT["project"]["requires-python"]
    assert requires_python == ">=3.11,<3.12"
    for image in re.findall(r"^FROM (python:\S+)", text, re.M):
        assert image.startswith("python:3.11."), image
    if "nvidia/cuda" in text or "tritonserver" in text:
        assert "python3.11" in text and "python3.11 -m venv" in text


def test_the_orchestrator_uses_the_cpu_torch_build():
    text = (DOCKER / "orchestrator.Dockerfile").read_text()
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.M)


def test_the_vision_worker_builds_on_cuda():
    assert re.search(
        r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu22\.04$", (DOCKER / "vision-worker.Dockerfile").read_text(), re.M
    )


def values_models() -> list[str]:
    values = yaml.safe_load((REPO / "helm" / "squint" / "values.yaml").read_text())
    return values["llm"]["triton"]["models"]


def test_the_llm_worker_is_the_ngc_triton_release_pytriton_embeds():
    text = (DOCKER / "llm-worker.Dockerfile").read_text()
    (release,) = re.findall(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$", text, re.M)
    pytriton = str(constraints()["nvidia-pytriton"])
    assert NGC_RELEASE_OF_PYTRITON[pytriton] == release, (
        f"nvidia-pytriton {pytriton}'s python backend stub needs NGC tritonserver {NGC_RELEASE_OF_PYTRITON[pytriton]}"
    )
    assert "COPY llm_worker/model_repository/ /models/" in text
    assert "python_backend_stubs/3.11/triton_python_backend_stub" in text
    # Each model of the repository gets the 3.11 stub, and the image carries vLLM.
    assert "for model in squint_llm squint_llm_staged; do" in text
    assert "/models/$model/triton_python_backend_stub" in text
    assert re.search(r"\bvllm==\d", text) and "--no-deps nvidia-pytriton" in text
    assert sorted(values_models()) == ["squint_llm", "squint_llm_staged"]
    values = yaml.safe_load((REPO / "helm" / "squint" / "values.yaml").read_text())
    assert values["llm"]["triton"]["modelRepository"] == "/models"
    assert values["llm"]["containerSecurityContext"]["runAsUser"] == 1000, "triton-server, the NGC image's user"


def test_exposed_ports_are_the_chart_defaults():
    values = yaml.safe_load((REPO / "helm" / "squint" / "values.yaml").read_text())
    expected = {
        "orchestrator": {
            values["orchestrator"]["config"]["grpc"]["port"],
            values["orchestrator"]["config"]["metrics"]["port"],
        },
        "vision": {values["vision"]["config"]["grpc"]["port"], values["vision"]["config"]["metrics"]["port"]},
        "llm": set(values["llm"]["containerPorts"].values()),
    }
    for component, (_, name) in IMAGES.items():
        exposed = {int(p) for keyword, rest in instructions(DOCKER / name) if keyword == "EXPOSE" for p in rest.split()}
        assert exposed == expected[component], name
    uids = {values[c]["containerSecurityContext"]["runAsUser"] for c in ("orchestrator", "vision")}
    assert uids == {10001}
    for name in ("orchestrator.Dockerfile", "vision-worker.Dockerfile"):
        assert "USER 10001:10001" in (DOCKER / name).read_text()


def test_constraints_satisfy_pyproject():
    pins = constraints()
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"docker/constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"docker/constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {line!r}"
        )
