"""Keep the Helm chart in step with the settings classes of the three processes.

The orchestrator, the vision worker and the LLM worker each read their settings dataclass
(the LLM worker also its scheduler's) from ``SQUINT_<PROCESS>_*`` variables
(``squint.config.load_settings``). This script reads those classes
(``squint.config.env_table``; :data:`PROCESSES` lists them) and writes, from them:

- ``helm/squint/values.yaml``: the ``config`` block of each process, one value per setting
  (camelCase), with its default and help text;
- ``helm/squint/templates/_settings.tpl``: one ConfigMap line per setting, value -> variable;
- ``helm/squint/values.schema.json``: the whole values schema (``additionalProperties: false``
  everywhere; Kubernetes objects such as ``affinity`` are checked against the Kubernetes 1.30
  definitions that ship with ``kubernetes-validate``);
- ``docs/deploy.md``: the table Helm value -> environment variable -> settings field.

A few settings are not values of their own because the chart decides them from other
values (:data:`PROCESSES` ``managed``): the pack folder, the device, the Redis URL, the
discovery of the vision workers, the Triton address. Every other field is a ``config`` value.

Run it after a settings class changes (``tests/deploy`` fails until then)::

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
    prefix: str
    # The settings classes it reads with that prefix: its own, first; any helper class after.
    classes: tuple[SettingsClass, ...]
    # Settings the chart decides, by field path (unique across the classes).
    managed: dict[str, Managed]
    # Defaults that differ from the settings class's, because a pod is not a laptop.
    chart_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Extra JSON-schema constraints by field path.
    rules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

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
        prefix="SQUINT_ORCHESTRATOR_",
        classes=(SettingsClass("orchestrator.settings", "OrchestratorSettings"),),
        managed={
            "pack_dir": PACK,
            "triton_url": Managed("`llm.service.ports.grpc`", "`<fullname>-llm-worker:<port>`, the Triton Service"),
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
            "auth.tokens": Managed(
                "(a Secret, see `orchestrator.extraEnv`)",
                "never written to the ConfigMap: mount a Secret for `auth.tokensFile`, or set this variable "
                "with `orchestrator.extraEnv` and `valueFrom.secretKeyRef`",
            ),
        },
        chart_defaults={"grpc.host": "0.0.0.0", "metrics.host": "0.0.0.0"},
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
        prefix="SQUINT_VISION_",
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
        prefix="SQUINT_LLM_",
        classes=(SettingsClass("llm_worker.settings", "LLMWorkerSettings"),),
        rules={"max_batch": {"minimum": 1}, "max_queue": {"minimum": 1}},
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


class SchemaBuilder:
    def __init__(self) -> None:
        self._k8s = _k8s_definitions()
        self.definitions: dict[str, Any] = {}

    def k8s(self, name: str) -> dict[str, Any]:
        """A ``$ref`` to the Kubernetes definition ``name`` (io.k8s.api.core.v1.Affinity, ...)."""
        full = name if name.startswith("io.k8s.") else f"io.k8s.api.core.v1.{name}"
        self._add(full)
        return {"$ref": f"#/definitions/{full}"}

    def _add(self, name: str) -> None:
        if name in self.definitions:
            return
        definition = _strip(self._k8s[name])
        for field in SERVER_SIDE_FIELDS.get(name, ()):
            definition["properties"].pop(field)
        self.definitions[name] = definition
        for ref in re.findall(r'"\$ref": "#/definitions/([^"]+)"', json.dumps(definition)):
            self._add(ref)

    def k8s_properties(self, name: str) -> dict[str, Any]:
        full = f"io.k8s.api.core.v1.{name}"
        definition = _strip(self._k8s[full])
        for ref in re.findall(r'"\$ref": "#/definitions/([^"]+)"', json.dumps(definition)):
            self._add(ref)
        return definition["properties"]


def obj(properties: dict[str, Any], description: str = "", required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object"}
    if description:
        out["description"] = description
    out["additionalProperties"] = False
    out["properties"] = properties
    if required:
        out["required"] = required
    return out


def string(description: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def integer(description: str = "", minimum: int | None = 0, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer"}
    if description:
        out["description"] = description
    if minimum is not None:
        out["minimum"] = minimum
    return {**out, **extra}


def boolean(description: str = "") -> dict[str, Any]:
    return {"type": "boolean", **({"description": description} if description else {})}


def string_map(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def array(items: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"type": "array", **({"description": description} if description else {}), "items": items}


PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
FLOAT_TEXT = r"^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$"
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([EPTGMk]i?|[mun])?$"}
INT_OR_PERCENT_OR_EMPTY = {
    "type": ["integer", "string"],
    "minimum": 0,
    "pattern": r"^([0-9]+%?)?$",
    "description": "a number, a percentage such as 50%, or empty",
}


def image_schema(what: str) -> dict[str, Any]:
    return obj(
        {
            "registry": string(f"{what} image registry; empty: none (global.imageRegistry wins when set)"),
            "repository": string(f"{what} image repository"),
            "tag": string(
                f"{what} image tag (pinned: never latest); empty: the chart's appVersion",
                pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$",
                **{"not": {"const": "latest"}},
            ),
            "digest": string(f"{what} image digest; wins over the tag", pattern=r"^(sha256:[a-f0-9]{64})?$"),
            "pullPolicy": string("image pull policy", enum=["Always", "IfNotPresent", "Never"]),
        },
        f"the {what} image",
    )


def probe_schema(what: str) -> dict[str, Any]:
    return obj(
        {
            "enabled": boolean(f"run the {what}"),
            "initialDelaySeconds": integer(),
            "periodSeconds": integer(minimum=1),
            "timeoutSeconds": integer(minimum=1),
            "failureThreshold": integer(minimum=1),
            "successThreshold": integer(minimum=1),
        },
        what,
    )


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


def build_schema() -> dict[str, Any]:
    b = SchemaBuilder()

    def pod_security_context() -> dict[str, Any]:
        return obj(
            {"enabled": boolean("set the pod's securityContext"), **b.k8s_properties("PodSecurityContext")},
            "the pod's securityContext (Kubernetes PodSecurityContext) and whether to set it",
        )

    def container_security_context() -> dict[str, Any]:
        return obj(
            {"enabled": boolean("set the container's securityContext"), **b.k8s_properties("SecurityContext")},
            "the container's securityContext (Kubernetes SecurityContext) and whether to set it",
        )

    def scheduling(what: str) -> dict[str, Any]:
        return {
            "nodeSelector": string_map(f"node labels the {what} pods must match"),
            "tolerations": array(b.k8s("Toleration"), f"tolerations of the {what} pods"),
            "affinity": b.k8s("Affinity"),
            "priorityClassName": string(f"priority class of the {what} pods"),
        }

    def pod_extras(what: str) -> dict[str, Any]:
        return {
            "podAnnotations": string_map(f"extra annotations of the {what} pods"),
            "podLabels": string_map(f"extra labels of the {what} pods"),
            "extraEnv": array(b.k8s("EnvVar"), f"extra environment variables of the {what} container"),
        }

    def pdb(what: str) -> dict[str, Any]:
        return obj(
            {
                "create": boolean(f"create a PodDisruptionBudget for the {what}"),
                "minAvailable": INT_OR_PERCENT_OR_EMPTY,
                "maxUnavailable": INT_OR_PERCENT_OR_EMPTY,
            },
            f"the {what}'s PodDisruptionBudget",
        )

    def workload(key: str, what: str) -> dict[str, Any]:
        """What orchestrator, vision and llm share: the Bitnami component shape."""
        return {
            "image": image_schema(what),
            "replicaCount": integer(f"number of {what} replicas (ignored when autoscaling is enabled)"),
            "revisionHistoryLimit": integer("old ReplicaSets kept for rollback"),
            "updateStrategy": b.k8s("io.k8s.api.apps.v1.DeploymentStrategy"),
            "resources": b.k8s("ResourceRequirements"),
            "podSecurityContext": pod_security_context(),
            "containerSecurityContext": container_security_context(),
            "startupProbe": probe_schema(f"{what} startup probe"),
            "livenessProbe": probe_schema(f"{what} liveness probe"),
            "readinessProbe": probe_schema(f"{what} readiness probe"),
            "terminationGracePeriodSeconds": integer("seconds between SIGTERM and SIGKILL"),
            **scheduling(what),
            "topologySpreadConstraints": array(b.k8s("TopologySpreadConstraint"), "topology spread constraints"),
            **pod_extras(what),
            "extraVolumes": array(b.k8s("Volume"), f"extra volumes of the {what} pods"),
            "extraVolumeMounts": array(b.k8s("VolumeMount"), f"extra volume mounts of the {what} container"),
            "autoscaling": obj(
                {
                    "enabled": boolean(f"create a HorizontalPodAutoscaler for the {what}"),
                    "minReplicas": integer("fewest replicas", minimum=1),
                    "maxReplicas": integer("most replicas", minimum=1),
                    "targetCPU": integer("target average CPU utilisation in percent of the request; 0: none"),
                    "targetMemory": integer("target average memory utilisation in percent of the request; 0: none"),
                    "metrics": array(b.k8s("io.k8s.api.autoscaling.v2.MetricSpec"), "extra HPA metrics"),
                    "behavior": b.k8s("io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"),
                },
                f"the {what}'s HorizontalPodAutoscaler (autoscaling/v2)",
            ),
            "pdb": pdb(what),
        }

    def gpu(what: str) -> dict[str, Any]:
        return obj(
            {
                "enabled": boolean(f"run the {what} on a GPU"),
                "resourceName": string("the device plugin's extended resource", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$"),
                "count": integer("GPUs per pod", minimum=1),
                "nodeSelector": string_map("extra node labels of GPU nodes"),
                "tolerations": array(b.k8s("Toleration"), "tolerations added when gpu.enabled"),
            },
            f"the {what}'s GPU",
        )

    processes = {p.key: p for p in PROCESSES}

    orchestrator = obj(
        {
            **workload("orchestrator", "orchestrator"),
            "discovery": obj(
                {"mode": string("how the orchestrator finds the vision workers", enum=["kubernetes", "dns"])},
                "discovery of the vision workers",
            ),
            "config": config_schema(processes["orchestrator"]),
            "service": obj(
                {
                    "type": string("Service type", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                    "ports": obj({"grpc": PORT, "metrics": PORT}, "Service ports"),
                    "annotations": string_map("Service annotations"),
                },
                "the orchestrator's Service",
            ),
            "serviceAccount": obj(
                {
                    "create": boolean("create the orchestrator's ServiceAccount"),
                    "name": string("ServiceAccount name"),
                    "annotations": string_map("ServiceAccount annotations"),
                },
                "the orchestrator's ServiceAccount",
            ),
            "rbac": obj({"create": boolean("create the Role and RoleBinding of EndpointSlice discovery")}, "RBAC"),
        },
        "the orchestrator: the public gRPC front door (CPU)",
    )
    vision = obj(
        {
            **workload("vision", "vision worker"),
            "gpu": gpu("vision worker"),
            "shm": obj({"sizeLimit": QUANTITY}, "the memory-backed /dev/shm"),
            "config": config_schema(processes["vision"]),
            "service": obj({"annotations": string_map("Service annotations")}, "the headless Service"),
        },
        "the vision workers: CLIP, compressors and projector (GPU)",
    )
    llm = obj(
        {
            **workload("llm", "LLM worker"),
            "gpu": gpu("LLM worker"),
            "shm": obj({"sizeLimit": QUANTITY}, "the memory-backed /dev/shm"),
            "triton": obj(
                {
                    "modelRepository": string("the model repository inside the image", minLength=1),
                    "modelConfigName": string(
                        "tritonserver --model-config-name: auto, empty, or a name under configs/",
                        pattern=r"^(auto|[A-Za-z0-9_.-]*)$",
                    ),
                    "logVerbose": integer("tritonserver --log-verbose"),
                    "exitTimeoutSeconds": integer("tritonserver --exit-timeout-secs"),
                    "extraArgs": array({"type": "string"}, "extra tritonserver arguments"),
                },
                "tritonserver's command line",
            ),
            "containerPorts": obj({"http": PORT, "grpc": PORT, "metrics": PORT}, "Triton's ports"),
            "config": config_schema(processes["llm"]),
            "service": obj(
                {
                    "ports": obj({"http": PORT, "grpc": PORT, "metrics": PORT}, "Service ports"),
                    "annotations": string_map("Service annotations"),
                },
                "the Triton Service",
            ),
        },
        "the LLM worker: NVIDIA Triton Inference Server with Squint's python backend model (GPU)",
    )
    redis = obj(
        {
            "enabled": boolean("deploy the bundled Redis"),
            "external": obj(
                {
                    "url": string(
                        "URL of an external Redis (redis://, rediss:// or unix://)",
                        pattern=r"^((redis|rediss|unix)://.+)?$",
                    ),
                    "existingSecret": string("a Secret holding the external Redis URL"),
                    "existingSecretKey": string("the key of the URL in existingSecret", minLength=1),
                },
                "an external Redis",
            ),
            "image": image_schema("Redis"),
            "database": integer("the Redis database number", maximum=15),
            "maxmemory": string("Redis maxmemory, e.g. 1gb", pattern=r"^[0-9]+(b|kb|mb|gb|k|m|g)?$"),
            "maxmemoryPolicy": string(
                "Redis eviction policy",
                enum=[
                    "noeviction",
                    "allkeys-lru",
                    "allkeys-lfu",
                    "allkeys-random",
                    "volatile-lru",
                    "volatile-lfu",
                    "volatile-random",
                    "volatile-ttl",
                ],
            ),
            "extraArgs": array({"type": "string"}, "extra redis-server arguments"),
            "persistence": obj(
                {
                    "enabled": boolean("keep the cache on a PersistentVolumeClaim"),
                    "storageClass": string("storage class; empty: the default"),
                    "accessModes": array(
                        {"type": "string", "enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
                        "access modes",
                    ),
                    "size": QUANTITY,
                },
                "Redis persistence",
            ),
            "service": obj(
                {"ports": obj({"redis": PORT}, "Service ports"), "annotations": string_map("Service annotations")},
                "the Redis Service",
            ),
            "resources": b.k8s("ResourceRequirements"),
            "podSecurityContext": pod_security_context(),
            "containerSecurityContext": container_security_context(),
            "startupProbe": probe_schema("Redis startup probe"),
            "livenessProbe": probe_schema("Redis liveness probe"),
            "readinessProbe": probe_schema("Redis readiness probe"),
            "terminationGracePeriodSeconds": integer("seconds between SIGTERM and SIGKILL"),
            **scheduling("Redis"),
            **pod_extras("Redis"),
            "pdb": pdb("Redis"),
        },
        "Redis, the vision workers' encoding cache: bundled or external",
    )
    pack = obj(
        {
            "mountPath": string("where the pack folder is mounted in every pod", pattern=r"^/.*"),
            "source": string("where the pack comes from", enum=["pvc", "initContainer"]),
            "pvc": obj(
                {
                    "claimName": string("an existing PersistentVolumeClaim holding the pack"),
                    "subPath": string("the pack's folder inside the volume"),
                },
                "the pack on a PersistentVolumeClaim (mounted read-only)",
            ),
            "initContainer": obj(
                {
                    "image": image_schema("pack init container"),
                    "command": array({"type": "string"}, "the command that writes the pack into $PACK_DIR"),
                    "extraEnv": array(b.k8s("EnvVar"), "extra environment variables of the init container"),
                    "resources": b.k8s("ResourceRequirements"),
                    "sizeLimit": QUANTITY,
                },
                "the pack written by an init container into an emptyDir",
            ),
        },
        "the model pack (squint-pack.json) all three processes read",
    )
    schema: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the Squint Helm chart",
        "description": "Generated by helm/tools/settings_sync.py; every object rejects unknown keys.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": obj(
                {
                    "imageRegistry": string("registry replacing every image's registry"),
                    "imagePullSecrets": array({"type": "string", "minLength": 1}, "names of image pull Secrets"),
                },
                "global parameters",
            ),
            "nameOverride": string("replaces the chart name in resource names"),
            "fullnameOverride": string("replaces <release>-squint in resource names"),
            "namespaceOverride": string("installs into this namespace instead of the release's"),
            "commonLabels": string_map("labels added to every resource"),
            "commonAnnotations": string_map("annotations added to every resource"),
            "pack": pack,
            "networkPolicy": obj(
                {
                    "enabled": boolean("create NetworkPolicies"),
                    "allowExternal": boolean("any client may reach the orchestrator's gRPC port"),
                    "clients": array(
                        b.k8s("io.k8s.api.networking.v1.NetworkPolicyPeer"),
                        "extra peers allowed to reach the orchestrator",
                    ),
                    "metricsFrom": array(
                        b.k8s("io.k8s.api.networking.v1.NetworkPolicyPeer"),
                        "peers allowed to scrape metrics; empty: any",
                    ),
                    "allowExternalEgress": boolean("leave egress open"),
                    "extraEgress": array(
                        b.k8s("io.k8s.api.networking.v1.NetworkPolicyEgressRule"),
                        "extra egress rules when allowExternalEgress is false",
                    ),
                },
                "NetworkPolicies",
            ),
            "metrics": obj({"podAnnotations": boolean("add prometheus.io/* pod annotations")}, "metrics"),
            "orchestrator": orchestrator,
            "vision": vision,
            "llm": llm,
            "redis": redis,
        },
        "definitions": dict(sorted(b.definitions.items())),
    }
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
