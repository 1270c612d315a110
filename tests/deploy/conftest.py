"""Render the Helm chart with Helm v4's own engine (helm-python-sdk) and read what it made.

The values profiles are the files an operator passes with ``-f``; each is rendered once per
session. :class:`Rendered` gives the tests the manifests as dicts, the merged values Helm
used, and the environment each container would get.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "squint"
RELEASE = "squint"
NAMESPACE = "squint-test"

# Values files by profile name, as `helm install -f A -f B` would take them.
PROFILES: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "external-redis": ("ci/external-redis-values.yaml",),
    "vision-autoscaling": ("ci/vision-autoscaling-values.yaml",),
    "dev-cpu": ("values-dev-cpu.yaml",),
    "locked-down": ("ci/locked-down-values.yaml",),
    "dns-discovery": ("ci/dns-discovery-values.yaml",),
}

# The value of a downward-API field in the tests' stand-in pod.
FAKE_POD_NAME = "squint-vision-worker-7d9c8-x2x4q"


def load_settings_sync():
    """helm/tools/settings_sync.py, the generator of the chart's settings files, as a module."""
    path = REPO / "helm" / "tools" / "settings_sync.py"
    spec = importlib.util.spec_from_file_location("squint_settings_sync", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The recipe of importlib's docs: dataclasses look their module up while it executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def coalesce(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, anything else is replaced, null deletes."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    """One rendered release."""

    values: dict[str, Any]  # the user values passed to Helm
    merged: dict[str, Any]  # the chart's defaults coalesced with them: what the templates saw
    files: dict[str, str]  # template path -> rendered text
    namespace: str

    @functools.cached_property
    def manifests(self) -> list[dict[str, Any]]:
        docs = []
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
        return docs

    @property
    def notes(self) -> str:
        return next((text for path, text in self.files.items() if path.endswith("NOTES.txt")), "")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        assert found, f"no {kind} {name}; have {[m['metadata']['name'] for m in self.of_kind(kind)]}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] in ("Deployment", "StatefulSet")]

    def workload(self, component: str) -> dict[str, Any]:
        found = [
            w
            for w in self.workloads()
            if w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"{len(found)} workloads of component {component}"
        return found[0]

    def container(self, component: str) -> dict[str, Any]:
        containers = self.workload(component)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{component} has {len(containers)} containers"
        return containers[0]

    def container_env(self, container: dict[str, Any]) -> dict[str, str]:
        """The environment the kubelet would give ``container``: envFrom ConfigMaps, then env.

        Secrets are not in the release: a secretKeyRef becomes ``<secret:NAME/KEY>``.
        """
        configmaps = {m["metadata"]["name"]: m.get("data") or {} for m in self.of_kind("ConfigMap")}
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source["configMapRef"]["name"]
            assert ref in configmaps, f"envFrom names ConfigMap {ref}, which the chart does not render"
            env.update(configmaps[ref])
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                assert source["fieldRef"]["fieldPath"] == "metadata.name", source
                env[item["name"]] = FAKE_POD_NAME
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[item["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
            else:
                raise AssertionError(f"unexpected valueFrom {source}")
        return env


def _values_from_files(files: tuple[str, ...]) -> dict[str, Any]:
    import helm_python

    values: dict[str, Any] = {}
    for name in files:
        values = coalesce(values, helm_python.values_from_yaml((CHART / name).read_text()))
    return values


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm v4's engine) is a test dependency")
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart) -> Callable[..., Rendered]:
    """``render(profile="defaults", overrides=None, namespace=NAMESPACE)`` -> :class:`Rendered`."""
    cache: dict[str, Rendered] = {}

    def _render(
        profile: str = "defaults", overrides: dict[str, Any] | None = None, namespace: str = NAMESPACE
    ) -> Rendered:
        key = repr((profile, overrides, namespace))
        if key not in cache:
            values = coalesce(_values_from_files(PROFILES[profile]), overrides or {})
            files = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
            cache[key] = Rendered(values, chart.merge_values(values), files, namespace)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def settings_sync():
    return load_settings_sync()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``profile`` runs once per values profile."""
    if "profile" in metafunc.fixturenames:
        metafunc.parametrize("profile", list(PROFILES))
