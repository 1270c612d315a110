"""The chart renders with Helm v4's engine, lints clean in strict mode, and every manifest is
valid Kubernetes (strict schemas: no unknown fields) for the oldest and newest supported versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm v4's engine) is a test dependency")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency")

from kubernetes_validate.utils import ValidationError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "squint"

# Chart.yaml says kubeVersion >=1.30; the newest schemas kubernetes-validate ships come second.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def test_helm_is_version_4():
    assert helm_python.helm_sdk_version().startswith("v4."), helm_python.helm_sdk_version()


def test_chart_metadata_matches_the_package():
    chart = helm_python.Chart.load(CHART_DIR)
    try:
        metadata = chart.metadata
    finally:
        chart.close()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert metadata["apiVersion"] == "v2"
    assert metadata["appVersion"] == pyproject["project"]["version"], (
        "Chart.yaml appVersion must be the squint package version the images are built from"
    )
    assert metadata["kubeVersion"] == ">=1.30.0-0"


def test_lint_is_clean_in_strict_mode(profile, render):
    values = render(profile).values
    report = helm_python.lint(str(CHART_DIR), values, strict=True, kube_version="v1.30.0", namespace="squint-test")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(profile, version, render):
    rendered = render(profile)
    assert len(rendered.manifests) >= 15
    failures = []
    for manifest in rendered.manifests:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            failures.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_every_namespaced_resource_is_in_the_release_namespace(render):
    for namespace in ("team-a", "ml-serving"):
        rendered = render("locked-down", namespace=namespace)
        for manifest in rendered.manifests:
            assert manifest["metadata"].get("namespace") == namespace, manifest["metadata"]
        for binding in rendered.of_kind("RoleBinding"):
            assert {s["namespace"] for s in binding["subjects"]} == {namespace}


def test_no_template_hard_codes_a_namespace():
    for template in (CHART_DIR / "templates").rglob("*"):
        if template.is_file():
            for line in template.read_text().splitlines():
                match = re.match(r"\s*namespace:\s*(\S+)", line)
                assert match is None or "{{" in match.group(1), f"{template.name}: {line.strip()}"


def test_every_resource_carries_the_standard_labels(profile, render):
    rendered = render(profile)
    for manifest in rendered.manifests:
        labels = manifest["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ):
            assert key in labels, f"{manifest['kind']}/{manifest['metadata']['name']} lacks {key}"


def test_common_labels_and_annotations_reach_every_resource(render):
    rendered = render("dns-discovery")
    for manifest in rendered.manifests:
        assert manifest["metadata"]["labels"]["team"] == "ml-serving"
        assert manifest["metadata"]["annotations"]["owner"] == "ml-platform"


def test_notes_say_how_to_reach_the_orchestrator(render):
    notes = render().notes
    assert "kubectl port-forward --namespace squint-test svc/squint-orchestrator 50051:50051" in notes
    assert "squint ask --address 127.0.0.1:50051" in notes
    assert "/metrics" in notes
    assert "in-process cache" not in notes
    no_redis = render("defaults", {"redis": {"enabled": False}}).notes
    assert "in-process cache" in no_redis


def test_values_files_carry_comments_for_every_value():
    """Bitnami style: each leaf value of values.yaml is documented with an @param line."""
    values = helm_python.values_from_yaml((CHART_DIR / "values.yaml").read_text())
    documented = set(re.findall(r"## @param (\S+)", (CHART_DIR / "values.yaml").read_text()))

    def leaves(node, prefix=()):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from leaves(value, (*prefix, key))
        else:
            yield ".".join(prefix)

    missing = []
    for leaf in leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:n]) in documented for n in range(len(parts), 0, -1)):
            missing.append(leaf)
    assert not missing, f"values without a ## @param comment: {missing}"
