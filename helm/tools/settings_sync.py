"""Keep the Helm chart in step with the settings classes of the three processes.

The orchestrator, the vision worker and the LLM worker each read their settings dataclass
(the LLM worker also its scheduler's) from ``SQUINT_<PROCESS>_*`` variables
(``squint.config.load_settings``). This script reads those classes
(``squint.config.env_table``; :data:`PROCESSES` lists them) and writes, from them:

- ``helm/squint/values.yaml``: the ``config`` block of each process, one value per setting
  (camelCase), with its default and help text;
- ``helm/squint/templates/_settings.tpl``: one ConfigMap line per setting, value -> variable;
- ``helm/squint/values.schema.json``: the values schema. All but the settings is written by
  hand in ``helm/tools/values.schema.base.json`` (``additionalProperties: false`` everywhere),
  where a placeholder string stands for each process's ``config`` schema; this script puts the
  ``config`` schemas in their places and appends the Kubernetes definitions the schema refers to
  (``#/definitions/io.k8s...``: ``affinity`` and the like are checked against the Kubernetes
  1.30 definitions that ship with ``kubernetes-validate``);
- ``docs/deploy.md``: the table Helm value -> environment variable -> settings field.

A few settings are not values of their own because the chart decides them from other
values (:data:`PROCESSES` ``managed``): the pack folder, the device, the Redis URL, the
discovery of the vision workers and of the LLM workers, the Triton address. Every other field is a
``config`` value.

Run it after a settings class or values.schema.base.json changes (``tests/deploy`` fails until then)::

    .venv/bin/python helm/tools/settings_sync.py           # rewrite the four files
    .venv/bin/python helm/tools/settings_sync.py --check   # exit 1 if any is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from squint.config import EnvVar, env_table

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "squint"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
# The schema but for the settings: hand-written, with a placeholder where each config goes.
SCHEMA_BASE = Path(__file__).resolve().parent / "values.schema.base.json"
SETTINGS_TPL = CHART / "templates" / "_settings.tpl"
DOC = REPO / "docs" / "deploy.md"

# The Kubernetes version whose object definitions check pass-through values (affinity, ...):
# the oldest the chart supports (Chart.yaml kubeVersion).
KUBERNETES_SCHEMA_VERSION = "1.30.0"

COMPRESSOR_NAME = r"^[a-z_][a-z0-9_]*$"  # compressor_plugins.registry: a lowercase identifier


@dataclasses.dataclass(frozen=True)
class Managed:
    """A setting the chart derives from other values instead of a ``config`` value."""

    values: str  # the Helm value(s) that decide it, as the table shows them
    how: str  # what the chart sets


@dataclasses.dataclass(frozen=True)
class SettingsClass:
    """A settings dataclass a process loads with its prefix."""

    module: str
    name: str
    # False: the class may not exist (yet); its fields are covered once it does.
    required: bool = True

    def load(self) -> type | None:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            if self.required:
                raise
            return None
        cls = getattr(module, self.name, None)
        if cls is None and self.required:
            raise SystemExit(f"{self.module} has no settings class {self.name} (settings_sync.PROCESSES)")
        return cls


@dataclasses.dataclass(frozen=True)
class Process:
    key: str  # the values key: orchestrator, vision, llm
    # The settings classes it reads with its prefix: its own, first; any helper class after.
    classes: tuple[SettingsClass, ...]
    # Settings the chart decides, by field path (unique across the classes).
    managed: dict[str, Managed]
    # Defaults that differ from the settings class's, because a pod is not a laptop.
    chart_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Extra JSON-schema constraints by field path.
    rules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """Its variables' prefix: ``SQUINT_<KEY>_``."""
        return f"SQUINT_{self.key.upper()}_"

    @property
    def settings_classes(self) -> list[type]:
        return [cls for cls in (c.load() for c in self.classes) if cls is not None]

    @property
    def class_name(self) -> str:
        """The process's own settings class (the first)."""
        return self.classes[0].name


def _policies() -> list[str]:
    from orchestrator.budget import POLICIES

    return list(POLICIES)


PACK = Managed("`pack.mountPath`", "the pack folder mounted from `pack.source`")

PROCESSES: tuple[Process, ...] = (
    Process(
        key="orchestrator",
        classes=(SettingsClass("orchestrator.settings", "OrchestratorSettings"),),
        managed={
            "pack_dir": PACK,
            "triton_url": Managed(
                "`llm.service.ports.grpc`",
                "`<fullname>-llm-worker:<port>`, the Triton Service (unused: `llm_discovery` finds every LLM worker)",
            ),
            "discovery.mode": Managed("`orchestrator.discovery.mode`", "`kubernetes` or `dns`"),
            "discovery.static_workers": Managed("—", "not set: the cluster discovers its workers"),
            "discovery.dns_name": Managed(
                "`vision.config.grpc.port`",
                "mode dns: `<fullname>-vision-worker-headless.<namespace>.svc:<port>`",
            ),
            "discovery.kubernetes_namespace": Managed(
                "(the release namespace)", "mode kubernetes: the release namespace"
            ),
            "discovery.kubernetes_service": Managed(
                "(the vision workers' headless Service)", "mode kubernetes: `<fullname>-vision-worker-headless`"
            ),
            "discovery.kubernetes_port_name": Managed(
                "(the headless Service's port name)", "mode kubernetes: `grpc`, the name of that Service's port"
            ),
            "llm_discovery.mode": Managed(
                "`orchestrator.discovery.mode`", "`kubernetes` or `dns`, as for the vision workers"
            ),
            "llm_discovery.static_workers": Managed("—", "not set: the cluster discovers its LLM workers"),
            "llm_discovery.dns_name": Managed(
                "`llm.containerPorts.grpc`",
                "mode dns: `<fullname>-llm-worker-headless.<namespace>.svc:<port>`",
            ),
            "llm_discovery.kubernetes_namespace": Managed(
                "(the release namespace)", "mode kubernetes: the release namespace"
            ),
            "llm_discovery.kubernetes_service": Managed(
                "(the LLM workers' headless Service)", "mode kubernetes: `<fullname>-llm-worker-headless`"
            ),
            "llm_discovery.kubernetes_port_name": Managed(
                "(the headless Service's port name)", "mode kubernetes: `grpc`, Triton's KServe gRPC port"
            ),
            "auth.tokens": Managed(
                "(a Secret, see `orchestrator.extraEnv`)",
                "never written to the ConfigMap: mount a Secret for `auth.tokensFile`, or set this variable "
                "with `orchestrator.extraEnv` and `valueFrom.secretKeyRef`",
            ),
        },
        chart_defaults={
            "grpc.host": "0.0.0.0",
            "metrics.host": "0.0.0.0",
            "http.enabled": True,
            "http.host": "0.0.0.0",
            "http.playground": False,  # a page for trying things, not for a production front door
        },
        rules={
            "default_compressor": {
                "pattern": r"^([a-z_][a-z0-9_]*)?$",
                "description": "a compressor name (a lowercase identifier), or empty for the vision worker's default",
            },
            "allocation_policy": {"enum": "POLICIES"},
        },
    ),
    Process(
        key="vision",
        classes=(SettingsClass("vision_worker.settings", "VisionWorkerSettings"),),
        managed={
            "pack_dir": PACK,
            "device": Managed("`vision.gpu.enabled`", "`cuda` with a GPU, else `cpu`"),
            "worker_name": Managed("(the pod's name)", "the pod's name, from the downward API"),
            "cache.redis_url": Managed(
                "`redis.enabled`, `redis.external.url`, `redis.external.existingSecret`",
                "the bundled Redis (`redis://<fullname>-redis:6379/<redis.database>`), else the external URL "
                "(from the Secret when one is named), else empty (an in-process cache)",
            ),
        },
        chart_defaults={"grpc.host": "0.0.0.0", "metrics.host": "0.0.0.0"},
        rules={
            "default_compressor": {
                "pattern": COMPRESSOR_NAME,
                "description": "a compressor name: a lowercase identifier such as none, avgpool or dfmr",
            },
            "dtype": {"enum": ["auto", "float32", "float16"]},
        },
    ),
    Process(
        key="llm",
        classes=(SettingsClass("llm_worker.settings", "LLMWorkerSettings"),),
        rules={
            "max_batch": {"minimum": 1},
            "max_queue": {"minimum": 1},
            "vllm_tensor_parallel_size": {"minimum": 1},
            "vllm_memory_fraction": {"exclusiveMinimum": 0, "maximum": 1},
            "vllm_cpu_reserved_cores": {"minimum": -1},
            "vllm_idle_spin_seconds": {"minimum": -1},
        },
        managed={
            "pack_dir": PACK,
            "device": Managed(
                "`llm.gpu.enabled`",
                "not set: Triton's instance kind decides (`configs/gpu.pbtxt`, KIND_GPU, with a GPU)",
            ),
        },
    ),
)


# --------------------------------------------------------------------------- fields


@dataclasses.dataclass(frozen=True)
class Field:
    process: Process
    cls: type  # the settings class that reads it
    row: EnvVar  # name, field (dotted path), type, default, help
    type: Any  # the annotation
    default: Any  # the settings class's default

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.row.field.split("."))

    @property
    def managed(self) -> Managed | None:
        return self.process.managed.get(self.row.field)

    @property
    def value_path(self) -> tuple[str, ...]:
        """Where the value lives under ``<process>.config`` (camelCase)."""
        return tuple(camel(part) for part in self.path)

    @property
    def helm_value(self) -> str:
        return ".".join((self.process.key, "config", *self.value_path))

    @property
    def chart_default(self) -> Any:
        return self.process.chart_defaults.get(self.row.field, self.default)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _resolve(cls: type, path: tuple[str, ...]) -> tuple[Any, Any]:
    """The annotation and the default of the field at ``path`` of ``cls``."""
    value: Any = cls()
    annotation: Any = cls
    for part in path:
        annotation = _hints(type(value))[part]
        value = getattr(value, part)
    return annotation, value


def fields(process: Process) -> list[Field]:
    out: list[Field] = []
    for cls in process.settings_classes:
        for row in env_table(cls, process.prefix):
            annotation, default = _resolve(cls, tuple(row.field.split(".")))
            out.append(Field(process, cls, row, annotation, default))
    names = [f.row.name for f in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"{process.key}: {', '.join(twice)} read by more than one settings class")
    # (rules may name fields of a class that is not there yet: they apply once it is)
    unknown = (set(process.managed) | set(process.chart_defaults)) - {f.row.field for f in out}
    if unknown:
        raise SystemExit(f"{process.class_name} has no field {', '.join(sorted(unknown))} (settings_sync.PROCESSES)")
    return out


def config_fields(process: Process) -> list[Field]:
    return [f for f in fields(process) if f.managed is None]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


# --------------------------------------------------------------------------- values.yaml


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return json.dumps(str(value))


def values_block(process: Process, indent: str = "  ") -> str:
    """The ``config:`` block of ``process`` in values.yaml (without the marker lines)."""
    lines = [f"{indent}config:"]
    opened: tuple[str, ...] = ()
    for field in config_fields(process):
        *groups, leaf = field.value_path
        common = 0
        while common < min(len(opened), len(groups)) and opened[common] == groups[common]:
            common += 1
        for depth in range(common, len(groups)):
            lines.append(f"{indent}{'  ' * (depth + 1)}{groups[depth]}:")
        opened = tuple(groups)
        pad = indent + "  " * (len(groups) + 1)
        help_text = field.row.help or field.row.field
        lines.append(f"{pad}## @param {field.helm_value} {help_text} ({field.row.name})")
        lines.append(f"{pad}{leaf}: {_yaml_scalar(field.chart_default)}")
    if len(lines) == 1:
        lines[0] += " {}"
    return "\n".join(lines)


def _replace_between(text: str, begin: str, end: str, body: str, where: Path) -> str:
    pattern = re.compile(rf"(^[ \t]*{re.escape(begin)}[^\n]*\n)(.*?)(^[ \t]*{re.escape(end)}[^\n]*$)", re.S | re.M)
    match = pattern.search(text)
    if match is None:
        raise SystemExit(f"{where}: the markers {begin!r} ... {end!r} are missing")
    return text[: match.start(2)] + body + "\n" + text[match.start(3) :]


def render_values(text: str) -> str:
    for process in PROCESSES:
        text = _replace_between(
            text,
            f"# BEGIN GENERATED {process.key}.config",
            f"# END GENERATED {process.key}.config",
            values_block(process),
            VALUES,
        )
    return text


# --------------------------------------------------------------------------- _settings.tpl


def render_settings_tpl() -> str:
    out = [
        "{{/*",
        "Generated by helm/tools/settings_sync.py from the settings classes: do not edit.",
        "One ConfigMap line per `config` value: the variable its process's settings loader reads.",
        "The settings the chart decides itself (pack folder, device, Redis URL, discovery,",
        "Triton address) are in each component's configmap.yaml.",
        "*/}}",
    ]
    for process in PROCESSES:
        out += [
            "",
            f"{{{{/* {', '.join(c.__name__ for c in process.settings_classes)}: {process.prefix}* */}}}}",
            f'{{{{- define "squint.{process.key}.settingsEnv" -}}}}',
            f"{{{{- $config := .Values.{process.key}.config -}}}}",
        ]
        for field in config_fields(process):
            accessor = ".".join(("$config", *field.value_path))
            out.append(f'{field.row.name}: {{{{ include "squint.envValue" {accessor} | quote }}}}')
        out.append("{{- end }}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- docs table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table() -> str:
    lines = [
        "| Helm value | Environment variable | Settings field | Type | Default (chart) | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for process in PROCESSES:
        for field in fields(process):
            managed = field.managed
            if managed is None:
                helm, default = f"`{field.helm_value}`", _yaml_scalar(field.chart_default).strip('"')
                meaning = field.row.help
            else:
                helm, default = managed.values, "set by the chart"
                meaning = f"{field.row.help}. Chart: {managed.how}"
            lines.append(
                "| "
                + " | ".join(
                    _cell(cell)
                    for cell in (
                        helm,
                        f"`{field.row.name}`",
                        f"`{field.cls.__name__}.{field.row.field}`",
                        field.row.type,
                        f"`{default}`" if default not in ("", "set by the chart") else default or "(empty)",
                        meaning,
                    )
                )
                + " |"
            )
    return "\n".join(lines)


def render_doc(text: str) -> str:
    return _replace_between(
        text, "<!-- BEGIN GENERATED settings-table", "<!-- END GENERATED settings-table", render_table(), DOC
    )


# --------------------------------------------------------------------------- values.schema.json


PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
FLOAT_TEXT = r"^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$"


def obj(properties: dict[str, Any], description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False, "properties": properties}


def setting_schema(field: Field) -> dict[str, Any]:
    tp, optional = _unwrap_optional(field.type)
    origin = typing.get_origin(tp)
    description = field.row.help or field.row.field
    schema: dict[str, Any]
    if tp is bool:
        schema = {"type": "boolean"}
    elif tp is int:
        schema = {"type": "integer", "minimum": 0}
    elif tp is float:
        # `--set x=0.5` hands Helm the string "0.5" (only integers are parsed): take both forms.
        schema = {"type": ["number", "string"], "minimum": 0, "pattern": FLOAT_TEXT}
    elif tp in (str, Path):
        schema = {"type": "string"}
    elif origin is tuple:
        item, _ = typing.get_args(tp)
        schema = {"type": "array", "items": setting_schema_of_type(item)}
    elif origin is typing.Literal:
        schema = {"type": "string", "enum": [str(a) for a in typing.get_args(tp)]}
    else:
        raise SystemExit(f"{field.row.name}: no schema for the type {tp!r} (settings_sync.setting_schema)")
    if field.path[-1] == "port":
        schema = {**PORT}
    if field.path[-1] == "host":
        schema["minLength"] = 1
    rule = dict(field.process.rules.get(field.row.field, {}))
    if rule.get("enum") == "POLICIES":
        rule["enum"] = _policies()
    if "description" in rule:
        description = rule.pop("description")
    schema.update(rule)
    if optional:
        schema = {"anyOf": [schema, {"type": "string", "const": ""}]}
    return {"description": f"{description} ({field.row.name})", **schema}


def setting_schema_of_type(tp: Any) -> dict[str, Any]:
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    return {"type": "string"}


def config_schema(process: Process) -> dict[str, Any]:
    names = ", ".join(c.__name__ for c in process.settings_classes)
    root: dict[str, Any] = obj({}, f"{names} settings ({process.prefix}*); see docs/deploy.md")
    for field in config_fields(process):
        node = root
        *groups, leaf = field.value_path
        for group in groups:
            node = node["properties"].setdefault(group, obj({}, f"settings group {group}"))
        node["properties"][leaf] = setting_schema(field)
    return root


def placeholder(process: Process) -> str:
    """What stands in values.schema.base.json where ``process``'s config schema goes."""
    return f"GENERATED {process.key}.config (helm/tools/settings_sync.py: the settings class's fields)"


def _splice(node: Any, parts: dict[str, dict[str, Any]], spliced: set[str]) -> Any:
    if isinstance(node, dict):
        return {key: _splice(value, parts, spliced) for key, value in node.items()}
    if isinstance(node, list):
        return [_splice(item, parts, spliced) for item in node]
    if isinstance(node, str) and node in parts:
        spliced.add(node)
        return parts[node]
    return node


def _k8s_definitions() -> dict[str, Any]:
    import importlib.resources

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"v{KUBERNETES_SCHEMA_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def _strip(node: Any) -> Any:
    """A Kubernetes definition without descriptions and x-kubernetes-* keys, refs made local."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" or key.startswith("x-kubernetes-"):
                continue
            if key == "$ref":
                out[key] = "#/definitions/" + value.rsplit("/", 1)[-1]
            else:
                out[key] = _strip(value)
        return out
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


# Fields the API server fills in, never a value: dropped from the embedded definitions
# (managedFields is free-form JSON, the one object Kubernetes leaves open).
SERVER_SIDE_FIELDS = {"io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": ("managedFields",)}


def _refs(node: Any) -> list[str]:
    return re.findall(r'"\$ref": "#/definitions/([^"]+)"', json.dumps(node))


def k8s_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes definitions ``schema`` refers to (``#/definitions/io.k8s...``), and those
    they refer to, by name."""
    known = _k8s_definitions()
    found: dict[str, Any] = {}
    todo = _refs(schema)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        definition = _strip(known[name])
        for field in SERVER_SIDE_FIELDS.get(name, ()):
            definition["properties"].pop(field)
        found[name] = definition
        todo.extend(_refs(definition))
    return dict(sorted(found.items()))


def build_schema() -> dict[str, Any]:
    """:data:`SCHEMA_BASE` with each process's config schema in its place, and the Kubernetes
    definitions it refers to."""
    parts = {placeholder(process): config_schema(process) for process in PROCESSES}
    spliced: set[str] = set()
    schema = _splice(json.loads(SCHEMA_BASE.read_text()), parts, spliced)
    if spliced != set(parts):
        missing = ", ".join(sorted(set(parts) - spliced))
        raise SystemExit(f"{SCHEMA_BASE}: the placeholder {missing!r} is missing")
    schema["definitions"] = k8s_definitions(schema)
    return schema


def render_schema() -> str:
    """The schema as JSON: our part indented, one line per Kubernetes definition."""
    schema = build_schema()
    definitions = schema.pop("definitions")
    body = json.dumps(schema, indent=2)
    defs = ",\n".join(
        f"    {json.dumps(name)}: {json.dumps(value, sort_keys=True)}" for name, value in definitions.items()
    )
    return body[:-2] + ',\n  "definitions": {\n' + defs + "\n  }\n}\n"


# --------------------------------------------------------------------------- main


def outputs() -> Iterator[tuple[Path, str]]:
    yield VALUES, render_values(VALUES.read_text())
    yield SETTINGS_TPL, render_settings_tpl()
    yield SCHEMA, render_schema()
    yield DOC, render_doc(DOC.read_text())


def stale() -> list[Path]:
    return [path for path, text in outputs() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale; write nothing")
    args = parser.parse_args(argv)
    changed = []
    for path, text in outputs():
        if not path.is_file() or path.read_text() != text:
            changed.append(path)
            if not args.check:
                path.write_text(text)
    for path in changed:
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(REPO)}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
