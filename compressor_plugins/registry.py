"""The compressor registry and the plugin manager that fills it."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pluggy

from compressor_plugins import hookspecs
from compressor_plugins.protocol import (
    Calibrates,
    Compressor,
    CompressorInput,
    IncompleteCapability,
    OutputSpace,
    ParamSpec,
    capabilities_of,
)
from squint.errors import CompressorNotFound

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "squint.compressors"

# Built-ins are plugins like any other (datasette's DEFAULT_PLUGINS): same hook, same checks.
BUILTIN_PLUGINS = (
    "compressor_plugins.builtin.none",
    "compressor_plugins.builtin.avgpool",
    "compressor_plugins.builtin.dfmr",
    "compressor_plugins.builtin.staged_pool",
    "compressor_plugins.builtin.stf",
    "compressor_plugins.builtin.text_recovery",
)


class PluginLoadError(RuntimeError):
    """A plugin failed to load or register; the message names it and how to deny it."""


@dataclass(frozen=True)
class PluginSettings:
    """Which plugins load."""

    deny: tuple[str, ...] = field(
        default=(), metadata={"help": "plugin names (entry-point names, or builtin.<name>) never to load"}
    )


@dataclass(frozen=True)
class RegisteredCompressor:
    """A compressor class and where it came from."""

    cls: type[Compressor]
    plugin: str
    distribution: str
    version: str


class CompressorRegistry:
    """Compressor classes by name. Filled by ``squint_register_compressors`` hooks."""

    def __init__(self) -> None:
        self._entries: dict[str, RegisteredCompressor] = {}
        self._source: tuple[str, str, str] = ("", "", "")

    def register(self, cls: type[Compressor]) -> None:
        """Add a compressor class; its ``name`` must be new."""
        plugin, distribution, version = self._source
        _check_declaration(cls, plugin)
        if cls.name in self._entries:
            other = self._entries[cls.name]
            raise PluginLoadError(
                f"compressor {cls.name!r} is registered twice: by plugin {other.plugin!r} "
                f"({other.distribution} {other.version}) and by plugin {plugin!r} ({distribution} {version})"
            )
        self._entries[cls.name] = RegisteredCompressor(cls, plugin, distribution, version)

    def get(self, name: str) -> RegisteredCompressor:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise CompressorNotFound(f"compressor.name {name!r} is not registered; available: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[RegisteredCompressor]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _check_declaration(cls: type, plugin: str) -> None:
    missing = [
        attr
        for attr in ("name", "summary", "params", "needs", "output_space", "predict_tokens", "compress")
        if not hasattr(cls, attr)
    ]
    if missing:
        raise PluginLoadError(f"plugin {plugin!r} registered {cls!r}, which lacks {', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name != cls.name.lower():
        raise PluginLoadError(f"plugin {plugin!r}: compressor name {cls.name!r} must be a lowercase identifier")
    if not isinstance(cls.output_space, OutputSpace):
        raise PluginLoadError(f"plugin {plugin!r}: {cls.name}.output_space must be an OutputSpace")
    if not all(isinstance(need, CompressorInput) for need in cls.needs):
        raise PluginLoadError(f"plugin {plugin!r}: {cls.name}.needs must hold CompressorInput members")
    if not all(isinstance(spec, ParamSpec) for spec in cls.params):
        raise PluginLoadError(f"plugin {plugin!r}: {cls.name}.params must hold ParamSpec entries")
    try:
        protocols = {capability.protocol for capability in capabilities_of(cls)}
    except IncompleteCapability as exc:
        raise PluginLoadError(f"plugin {plugin!r}: {exc}") from None
    if Calibrates in protocols and not all(isinstance(spec, ParamSpec) for spec in cls.calibration_params):
        raise PluginLoadError(f"plugin {plugin!r}: {cls.name}.calibration_params must hold ParamSpec entries")


def _squint_version() -> str:
    try:
        return importlib.metadata.version("squint")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class SquintPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}


def get_plugin_manager(settings: PluginSettings) -> SquintPluginManager:
    """A plugin manager with the hook specs, the third-party plugins and the built-ins.

    Third-party plugins come from the entry-point group ``squint.compressors``; one that fails
    to import fails start-up with its distribution and entry point named. Plugins named in
    ``settings.deny`` are never imported.
    """
    pm = SquintPluginManager()
    for name in settings.deny:
        pm.set_blocked(name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(entry_point.name):
            logger.info("compressor plugin %r is denied by settings; not loading it", entry_point.name)
            continue
        dist = entry_point.dist
        where = f"{dist.name} {dist.version}" if dist else "an unknown distribution"
        try:
            plugin = entry_point.load()
        except Exception as exc:  # any import failure is reported the same way
            raise PluginLoadError(
                f"compressor plugin {entry_point.name!r} from {where} failed to load "
                f"(entry point {entry_point.name} = {entry_point.value}): {type(exc).__name__}: {exc}. "
                f"Fix or uninstall it, or deny it with SQUINT_VISION_PLUGINS_DENY={entry_point.name}"
            ) from exc
        pm.register(plugin, name=entry_point.name)
        pm.distributions[entry_point.name] = (dist.name, dist.version) if dist else ("unknown", "")
    for module_name in BUILTIN_PLUGINS:
        plugin_name = "builtin." + module_name.rsplit(".", 1)[1]
        if pm.is_blocked(plugin_name):
            continue
        pm.register(importlib.import_module(module_name), name=plugin_name)
        pm.distributions[plugin_name] = ("squint", _squint_version())
    pm.check_pending()
    return pm


def build_registry(pm: SquintPluginManager) -> CompressorRegistry:
    """Call every plugin's ``squint_register_compressors`` and return the filled registry."""
    registry = CompressorRegistry()
    # Called implementation by implementation so each registration is attributed to its plugin.
    for impl in reversed(pm.hook.squint_register_compressors.get_hookimpls()):
        distribution, version = pm.distributions.get(impl.plugin_name, ("unknown", ""))
        registry._source = (impl.plugin_name, distribution, version)
        try:
            impl.function(registry=registry)
        except PluginLoadError:
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"compressor plugin {impl.plugin_name!r} ({distribution} {version}) failed in "
                f"squint_register_compressors: {type(exc).__name__}: {exc}. "
                f"Deny it with SQUINT_VISION_PLUGINS_DENY={impl.plugin_name}"
            ) from exc
    registry._source = ("", "", "")
    return registry


def load_compressors(settings: PluginSettings) -> CompressorRegistry:
    """The registry of every compressor the settings allow: the usual entry point."""
    return build_registry(get_plugin_manager(settings))


def describe(entries: Iterable[RegisteredCompressor]) -> list[dict]:
    """Plain data about compressors, for `squint plugins list` and ListCompressors."""
    return [
        {
            "name": e.cls.name,
            "summary": e.cls.summary,
            "distribution": e.distribution,
            "version": e.version,
            "plugin": e.plugin,
            "output_space": e.cls.output_space.value,
            "capabilities": sorted(capability.name for capability in capabilities_of(e.cls)),
            "needs": sorted(need.value for need in e.cls.needs),
            "params": [_describe_param(p) for p in e.cls.params],
            "calibration_params": [_describe_param(p) for p in getattr(e.cls, "calibration_params", ())],
        }
        for e in entries
    ]


def _describe_param(spec: ParamSpec) -> dict:
    return {
        "name": spec.name,
        "type": spec.type.__name__,
        "default": spec.default,
        "minimum": spec.minimum,
        "maximum": spec.maximum,
        "choices": list(spec.choices),
        "description": spec.description,
    }
