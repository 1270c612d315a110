"""The environment each rendered container gets is exactly what its settings loader reads.

The settings classes are read at test time (``squint.config.env_table``), so a field added to
any of them is covered at once: it needs a ``config`` value, a schema entry, a ConfigMap line
and a row in docs/deploy.md, which ``python helm/tools/settings_sync.py`` writes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python", reason="helm-python-sdk (Helm v4's engine) is a test dependency")

from squint.config import env_table, load_settings

REPO = Path(__file__).resolve().parents[2]
CONTAINER_OF = {"orchestrator": "orchestrator", "vision": "vision-worker", "llm": "llm-worker"}
FIX = "run `.venv/bin/python helm/tools/settings_sync.py` and commit what it writes"


@pytest.fixture(scope="module")
def processes(settings_sync):
    return settings_sync.PROCESSES


# --------------------------------------------------------------------------- generated files and the table


def test_generated_chart_files_are_fresh(settings_sync):
    stale = [str(path.relative_to(REPO)) for path in settings_sync.stale()]
    assert not stale, f"{', '.join(stale)} no longer match the settings classes: {FIX}"


def test_every_setting_has_a_row_in_the_documented_table(processes):
    doc = (REPO / "docs" / "deploy.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 6 and cells[1].startswith("`SQUINT_"):
            rows[cells[1].strip("`")] = cells
    for process in processes:
        for cls in process.settings_classes:
            for row in env_table(cls, process.prefix):
                _check_row(rows, process, cls, row)


def _check_row(rows, process, cls, row) -> None:
    assert row.name in rows, f"{cls.__name__}.{row.field} ({row.name}) has no row in docs/deploy.md: {FIX}"
    helm_value, _, field, *_ = rows[row.name]
    assert field == f"`{cls.__name__}.{row.field}`"
    if row.field in process.managed:
        assert helm_value, row.name
        return
    camel = ".".join(p.split("_")[0] + "".join(w.title() for w in p.split("_")[1:]) for p in row.field.split("."))
    assert helm_value == f"`{process.key}.config.{camel}`", row.name


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, (*prefix, key))
        else:
            out.add((*prefix, key))
    return out


def test_config_values_are_exactly_the_settings_the_chart_does_not_decide(render, processes, settings_sync):
    merged = render().merged
    for process in processes:
        expected = {f.value_path for f in settings_sync.config_fields(process)}
        have = _flatten(merged[process.key]["config"])
        assert have == expected, (
            f"{process.key}.config differs from {process.class_name}: missing {sorted(expected - have)}, "
            f"unknown {sorted(have - expected)}; {FIX}"
        )
        for path in process.managed:
            assert tuple(settings_sync.camel(p) for p in path.split(".")) not in have, (
                f"{process.key}.config must not offer {path}: the chart decides it"
            )


# --------------------------------------------------------------------------- rendered env -> settings


def _expected_value(value: Any, annotation: Any) -> Any:
    """A values.yaml value as the settings field holds it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value == "" else _expected_value(value, inner)
    if origin is tuple:
        (item, _) = typing.get_args(annotation)
        return tuple(_expected_value(v, item) for v in value)
    if annotation is Path:
        return Path(value)
    if annotation is float:
        return float(value)
    if annotation is int:
        assert float(value).is_integer(), value
        return int(value)
    return value


def _dig(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _managed_expectations(process, rendered) -> dict[str, Any]:
    """What the chart must set for each setting it decides, from the merged values."""
    merged = rendered.merged
    pack = Path(merged["pack"]["mountPath"])
    if process.key == "orchestrator":
        mode = merged["orchestrator"]["discovery"]["mode"]
        headless = "squint-vision-worker-headless"
        defaults = process.settings_classes[0]().discovery
        llm_headless = "squint-llm-worker-headless"
        llm_defaults = process.settings_classes[0]().llm_discovery
        return {
            "pack_dir": pack,
            "triton_url": f"squint-llm-worker:{merged['llm']['service']['ports']['grpc']}",
            "discovery.mode": mode,
            "discovery.static_workers": defaults.static_workers,  # not rendered
            "discovery.dns_name": (
                f"{headless}.{rendered.namespace}.svc:{merged['vision']['config']['grpc']['port']}"
                if mode == "dns"
                else defaults.dns_name
            ),
            "discovery.kubernetes_namespace": rendered.namespace
            if mode == "kubernetes"
            else defaults.kubernetes_namespace,
            "discovery.kubernetes_service": headless if mode == "kubernetes" else defaults.kubernetes_service,
            "discovery.kubernetes_port_name": "grpc",
            # The LLM workers: the same mode, over their own headless Service (Triton's gRPC port).
            "llm_discovery.mode": mode,
            "llm_discovery.static_workers": llm_defaults.static_workers,  # not rendered
            "llm_discovery.dns_name": (
                f"{llm_headless}.{rendered.namespace}.svc:{merged['llm']['containerPorts']['grpc']}"
                if mode == "dns"
                else llm_defaults.dns_name
            ),
            "llm_discovery.kubernetes_namespace": rendered.namespace
            if mode == "kubernetes"
            else llm_defaults.kubernetes_namespace,
            "llm_discovery.kubernetes_service": llm_headless
            if mode == "kubernetes"
            else llm_defaults.kubernetes_service,
            "llm_discovery.kubernetes_port_name": "grpc",
            "auth.tokens": (),  # never in a ConfigMap
        }
    if process.key == "vision":
        redis = merged["redis"]
        if redis["enabled"]:
            url = f"redis://squint-redis:{redis['service']['ports']['redis']}/{redis['database']}"
        elif redis["external"]["existingSecret"]:
            url = f"<secret:{redis['external']['existingSecret']}/{redis['external']['existingSecretKey']}>"
        else:
            url = redis["external"]["url"]
        return {
            "pack_dir": pack,
            "device": "cuda" if merged["vision"]["gpu"]["enabled"] else "cpu",
            "worker_name": "squint-vision-worker-7d9c8-x2x4q",
            "cache.redis_url": url,
        }
    return {"pack_dir": pack, "device": "cpu"}  # llm: Triton's instance kind replaces it at initialize


def _check_env(rendered, process, settings_sync) -> None:
    classes = process.settings_classes
    container = rendered.container(CONTAINER_OF[process.key])
    env = rendered.container_env(container)

    read = {row.name for cls in classes for row in env_table(cls, process.prefix)}
    squint_vars = {name for name in env if name.startswith("SQUINT_")}
    unread = squint_vars - read
    names = ", ".join(cls.__name__ for cls in classes)
    assert not unread, f"{process.key}: rendered {sorted(unread)}, which no field of {names} reads"

    settings = {cls: load_settings(cls, process.prefix, env=env) for cls in classes}
    mismatches = []
    for field in settings_sync.config_fields(process):
        asked = _expected_value(_dig(rendered.merged[process.key]["config"], field.value_path), field.type)
        got = operator.attrgetter(field.row.field)(settings[field.cls])
        assert field.row.name in env, f"{field.row.name} ({field.helm_value}) is not rendered"
        if got != asked:
            mismatches.append(f"{field.row.name}: values ask {asked!r}, the loader read {got!r}")
    expected = _managed_expectations(process, rendered)
    assert set(expected) == set(process.managed), "a setting the chart decides has no expectation here"
    owner = {f.row.field: f.cls for f in settings_sync.fields(process)}
    for path, want in expected.items():
        got = operator.attrgetter(path)(settings[owner[path]])
        if got != want:
            mismatches.append(f"{path}: expected {want!r}, the loader read {got!r}")
    assert not mismatches, "\n".join(mismatches)


def test_rendered_env_is_what_the_settings_loaders_read(profile, render, processes, settings_sync):
    rendered = render(profile)
    for process in processes:
        _check_env(rendered, process, settings_sync)


def _non_default(field, settings_sync) -> Any:
    """A valid value of ``field`` that differs from the chart's default, found from its type and schema."""
    schema = settings_sync.setting_schema(field)
    schema = schema.get("anyOf", [schema])[0] | {k: v for k, v in schema.items() if k != "anyOf"}
    default = field.chart_default
    if "enum" in schema:
        return next(v for v in schema["enum"] if v != default)
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if "boolean" in kinds:
        return not default
    if "integer" in kinds:
        return int(default or 0) + (1 if field.path[-1] == "port" else 7)
    if "number" in kinds:
        value = float(default or 0) + 0.25
        return value if value <= schema.get("maximum", math.inf) else float(default) - 0.25
    if "array" in kinds:
        return ["alpha-1", "beta.2"]
    if "pattern" in schema:  # compressor names
        return next(v for v in ("avgpool", "dfmr") if v != default)
    if field.path[-1] == "host":
        return "::"
    return f"/etc/squint/{field.row.name.lower()}"


def _overrides(processes, settings_sync) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for process in processes:
        for field in settings_sync.config_fields(process):
            node = values.setdefault(process.key, {}).setdefault("config", {})
            *groups, leaf = field.value_path
            for group in groups:
                node = node.setdefault(group, {})
            node[leaf] = _non_default(field, settings_sync)
    return values


def test_every_setting_reaches_its_process_with_a_non_default_value(render, processes, settings_sync):
    """Every config value, set to something else than its default, is read back by the loader."""
    overrides = _overrides(processes, settings_sync)
    rendered = render("defaults", overrides)
    for process in processes:
        _check_env(rendered, process, settings_sync)
        env = rendered.container_env(rendered.container(CONTAINER_OF[process.key]))
        for field in settings_sync.config_fields(process):
            got = operator.attrgetter(field.row.field)(load_settings(field.cls, process.prefix, env=env))
            assert got != _expected_value(field.chart_default, field.type), field.row.name


def test_numbers_survive_helm_float64_values(render):
    """Helm reads YAML numbers as float64: big integers and tiny floats must not become exponents."""
    rendered = render(
        "defaults",
        {
            "orchestrator": {"config": {"limits": {"maxTextChars": 4_000_000_000}, "dedupThreshold": 0.000001}},
            "vision": {"config": {"cache": {"featuresMemoryBytes": 64 * 1024**3, "socketTimeoutSeconds": 1e-3}}},
        },
    )
    orchestrator = rendered.container_env(rendered.container("orchestrator"))
    assert orchestrator["SQUINT_ORCHESTRATOR_LIMITS_MAX_TEXT_CHARS"] == "4000000000"
    assert math.isclose(float(orchestrator["SQUINT_ORCHESTRATOR_DEDUP_THRESHOLD"]), 1e-6)
    vision = rendered.container_env(rendered.container("vision-worker"))
    assert vision["SQUINT_VISION_CACHE_FEATURES_MEMORY_BYTES"] == str(64 * 1024**3)
    assert vision["SQUINT_VISION_CACHE_SOCKET_TIMEOUT_SECONDS"] == "0.001"


def test_settings_given_with_set_reach_the_processes(render, processes, settings_sync):
    """`helm install --set` hands Helm integers as int64 and decimals as strings: both must work."""
    import helm_python

    overrides = helm_python.parse_set_string(
        "orchestrator.config.dedupThreshold=0.5,orchestrator.config.requestTimeoutSeconds=45,"
        "vision.config.cache.ttlSeconds=3600,vision.config.cache.socketTimeoutSeconds=1e-2,"
        "vision.config.plugins.deny={builtin.stf,evil},vision.config.cache.enabled=false,"
        "llm.config.defaultMaxNewTokens=512"
    )
    assert overrides["orchestrator"]["config"]["dedupThreshold"] == "0.5"
    rendered = render("defaults", overrides)
    for process in processes:
        _check_env(rendered, process, settings_sync)
    (vision_process,) = [p for p in processes if p.key == "vision"]
    vision = load_settings(
        vision_process.settings_classes[0],
        vision_process.prefix,
        env=rendered.container_env(rendered.container("vision-worker")),
    )
    assert vision.plugins.deny == ("builtin.stf", "evil")
    assert vision.cache.socket_timeout_seconds == 0.01 and vision.cache.enabled is False


def test_an_unread_squint_variable_fails_the_check(render, processes, settings_sync):
    rendered = render("defaults", {"vision": {"extraEnv": [{"name": "SQUINT_VISION_GPRC_PORT", "value": "1"}]}})
    (vision,) = [p for p in processes if p.key == "vision"]
    with pytest.raises(AssertionError, match="SQUINT_VISION_GPRC_PORT"):
        _check_env(rendered, vision, settings_sync)


def test_configmaps_define_each_variable_once(render):
    """A duplicate YAML key would silently drop one of two values."""
    rendered = render("locked-down")
    for path, text in rendered.files.items():
        if not path.endswith("configmap.yaml"):
            continue
        root = yaml.compose(text)
        data = next(value for key, value in root.value if key.value == "data")
        names = [key.value for key, _ in data.value]
        assert len(names) == len(set(names)), f"{path}: {sorted(n for n in names if names.count(n) > 1)}"


def test_the_llm_worker_device_is_left_to_triton(render):
    """settings_from_triton_args replaces the device with the instance kind's: the chart does not set it."""
    for profile in ("defaults", "dev-cpu"):
        rendered = render(profile)
        assert "SQUINT_LLM_DEVICE" not in rendered.container_env(rendered.container("llm-worker"))


def test_dataclass_fields_are_what_env_table_lists(processes):
    """env_table walks nested dataclasses; the chart relies on it listing every leaf field."""

    def leaves(klass, prefix=()):
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], (*prefix, f.name))
            else:
                yield ".".join((*prefix, f.name))

    for process in processes:
        for cls in process.settings_classes:
            assert [row.field for row in env_table(cls, process.prefix)] == list(leaves(cls))
