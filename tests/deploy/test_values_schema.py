"""values.schema.json rejects bad values with a message naming the value, and
validateValues catches what a schema cannot express, with the --set that fixes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm v4's engine) is a test dependency")

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "squint"
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def _rejected(chart, values) -> str:
    """The schema's message for ``values``: from validate_schema and from a render alike."""
    with pytest.raises(helm_python.HelmValuesError) as checked:
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError) as rendered:
        chart.render(values, name="squint", namespace="squint-test")
    assert str(checked.value).strip() in str(rendered.value)
    return str(rendered.value)


@pytest.mark.parametrize("component", ["orchestrator", "vision", "llm"])
def test_a_negative_replica_count_is_rejected(chart, component):
    message = _rejected(chart, {component: {"replicaCount": -1}})
    assert f"at '/{component}/replicaCount': minimum: got -1, want 0" in message


@pytest.mark.parametrize(
    ("values", "where", "key"),
    [
        ({"vision": {"replicas": 3}}, "/vision", "replicas"),
        ({"orchestrator": {"config": {"grpc": {"prot": 1}}}}, "/orchestrator/config/grpc", "prot"),
        ({"llm": {"config": {"device": "cuda"}}}, "/llm/config", "device"),
        ({"vision": {"config": {"packDir": "/elsewhere"}}}, "/vision/config", "packDir"),
        ({"redis": {"external": {"host": "cache"}}}, "/redis/external", "host"),
        ({"vision": {"affinity": {"nodeAfinity": {}}}}, "/vision/affinity", "nodeAfinity"),
        ({"vision": {"resources": {"limit": {"cpu": 1}}}}, "/vision/resources", "limit"),
        ({"replicaCount": 1}, "", "replicaCount"),
    ],
)
def test_an_unknown_key_is_rejected(chart, values, where, key):
    message = _rejected(chart, values)
    assert f"at '{where}': additional properties '{key}' not allowed" in message


@pytest.mark.parametrize("name", ["Bad-Name", "DFMR", "1pool", "stf mbtf", "staged.pool"])
def test_a_malformed_compressor_name_is_rejected(chart, name):
    message = _rejected(chart, {"vision": {"config": {"defaultCompressor": name}}})
    assert "at '/vision/config/defaultCompressor'" in message
    assert f"'{name}' does not match pattern" in message
    message = _rejected(chart, {"orchestrator": {"config": {"defaultCompressor": name}}})
    assert "at '/orchestrator/config/defaultCompressor'" in message


@pytest.mark.parametrize("name", ["none", "dfmr", "staged_pool", "text_recovery", "_private"])
def test_well_formed_compressor_names_pass(chart, name):
    chart.validate_schema({"vision": {"config": {"defaultCompressor": name}}})
    chart.validate_schema({"orchestrator": {"config": {"defaultCompressor": name}}})


def test_the_orchestrator_may_leave_the_compressor_to_the_vision_worker(chart):
    chart.validate_schema({"orchestrator": {"config": {"defaultCompressor": ""}}})
    _rejected(chart, {"vision": {"config": {"defaultCompressor": ""}}})


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"vision": {"image": {"tag": "latest"}}}, "at '/vision/image/tag'"),
        ({"vision": {"image": {"digest": "sha256:abc"}}}, "at '/vision/image/digest'"),
        ({"orchestrator": {"config": {"grpc": {"port": 0}}}}, "at '/orchestrator/config/grpc/port': minimum"),
        ({"orchestrator": {"config": {"grpc": {"port": 70000}}}}, "at '/orchestrator/config/grpc/port': maximum"),
        ({"orchestrator": {"config": {"allocationPolicy": "greedy"}}}, "at '/orchestrator/config/allocationPolicy'"),
        ({"vision": {"config": {"dtype": "bfloat16"}}}, "at '/vision/config/dtype'"),
        ({"llm": {"config": {"dtype": "int8"}}}, "at '/llm/config/dtype'"),
        ({"vision": {"config": {"cache": {"ttlSeconds": -5}}}}, "at '/vision/config/cache/ttlSeconds'"),
        ({"vision": {"config": {"cache": {"enabled": "yes"}}}}, "at '/vision/config/cache/enabled'"),
        ({"orchestrator": {"config": {"dedupThreshold": "high"}}}, "at '/orchestrator/config/dedupThreshold'"),
        ({"orchestrator": {"config": {"dedupThreshold": -0.5}}}, "at '/orchestrator/config/dedupThreshold'"),
        ({"orchestrator": {"discovery": {"mode": "static"}}}, "at '/orchestrator/discovery/mode'"),
        ({"pack": {"source": "s3"}}, "at '/pack/source'"),
        ({"redis": {"external": {"url": "cache:6379"}}}, "at '/redis/external/url'"),
        ({"vision": {"gpu": {"count": 0}}}, "at '/vision/gpu/count'"),
        ({"vision": {"pdb": {"maxUnavailable": "half"}}}, "at '/vision/pdb/maxUnavailable'"),
        ({"vision": {"tolerations": [{"key": "a", "effekt": "NoSchedule"}]}}, "at '/vision/tolerations/0'"),
    ],
)
def test_malformed_values_are_rejected_where_they_are(chart, values, fragment):
    assert fragment in _rejected(chart, values)


def test_every_object_in_the_schema_rejects_unknown_keys():
    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" or (isinstance(node.get("type"), list) and "object" in node["type"]):
                assert "additionalProperties" in node, f"{path}: an object without additionalProperties"
                if "properties" in node:
                    assert node["additionalProperties"] is False, f"{path}: properties but additional ones allowed"
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")

    walk(SCHEMA, "")
    assert SCHEMA["additionalProperties"] is False


def test_every_schema_property_has_a_default_in_values_yaml():
    """values.yaml documents every value the schema admits (and the schema admits every value there)."""
    defaults = helm_python.values_from_yaml((CHART_DIR / "values.yaml").read_text())

    def walk(schema, values, path):
        for key, sub in schema.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            assert key in values, f"{where} is in values.schema.json but not in values.yaml"
            # securityContexts are Kubernetes objects with an "enabled" switch: values.yaml sets a few fields
            kubernetes_object = "(Kubernetes " in sub.get("description", "")
            if sub.get("type") == "object" and "properties" in sub and not kubernetes_object:
                walk(sub, values[key], where)

    walk(SCHEMA, defaults, "")


# --------------------------------------------------------------------------- validateValues


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"pack": {"pvc": {"claimName": ""}}}, "--set pack.pvc.claimName=my-pack"),
        ({"pack": {"source": "initContainer", "initContainer": {"command": []}}}, "pack.initContainer.command"),
        ({"vision": {"config": {"grpc": {"host": "127.0.0.1"}}}}, "--set vision.config.grpc.host=0.0.0.0"),
        (
            {"orchestrator": {"config": {"metrics": {"host": "localhost"}}}},
            "--set orchestrator.config.metrics.host=0.0.0.0",
        ),
        ({"redis": {"external": {"url": "redis://cache:6379/0"}}}, "--set redis.enabled=false"),
        (
            {"vision": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            "--set vision.autoscaling.maxReplicas=5",
        ),
        (
            {"llm": {"autoscaling": {"enabled": True, "targetCPU": 0}}},
            "--set llm.autoscaling.targetCPU=80",
        ),
        ({"vision": {"terminationGracePeriodSeconds": 5}}, "--set vision.terminationGracePeriodSeconds=15"),
        ({"llm": {"terminationGracePeriodSeconds": 20}}, "--set llm.terminationGracePeriodSeconds=40"),
        ({"orchestrator": {"config": {"metrics": {"port": 50051}}}}, "--set orchestrator.config.metrics.port=51051"),
    ],
)
def test_validate_values_names_the_fix(chart, values, expected):
    with pytest.raises(helm_python.HelmRenderError) as failed:
        chart.render(values, name="squint", namespace="squint-test")
    message = str(failed.value)
    assert "VALUES VALIDATION" in message
    assert expected in message, message


def test_validate_values_reports_every_problem_at_once(chart):
    values = {"pack": {"pvc": {"claimName": ""}}, "vision": {"config": {"grpc": {"host": "localhost"}}}}
    with pytest.raises(helm_python.HelmRenderError) as failed:
        chart.render(values, name="squint", namespace="squint-test")
    assert "pack.pvc.claimName" in str(failed.value) and "vision.config.grpc.host" in str(failed.value)
