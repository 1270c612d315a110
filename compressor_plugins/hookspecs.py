"""Hook specifications for Squint compressor plugins.

A plugin is a module or object with functions marked ``@compressor_plugins.hookimpl``, found
through the entry-point group ``squint.compressors``. Built-in compressors are plugins too
and register through the same hooks. Hooks register classes; requests never go through the
plugin manager: the vision worker resolves a compressor once and calls its methods directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from compressor_plugins.registry import CompressorRegistry

PROJECT_NAME = "squint"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# -------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------


@hookspec
def squint_register_compressors(registry: CompressorRegistry) -> None:
    """Register the compressor classes this plugin provides.

    Call ``registry.register(cls)`` once per class. A class must satisfy
    :class:`compressor_plugins.protocol.Compressor`: a unique ``name``, a ``summary``, its
    ``params``, ``needs`` and ``output_space``, ``predict_tokens`` and ``compress``, keeping the
    rules stated there (output dtype and width, finite tokens, the count equal to the
    prediction, coverage, determinism, which errors to raise). It may implement optional
    capabilities, each defined by one Protocol in
    :data:`compressor_plugins.protocol.CAPABILITIES`: ``fits_budget`` (``compress_within`` and
    ``token_levels``), ``loads_weights`` (``load_weights``) and ``calibrates``
    (``calibration_params``, ``calibrate`` and ``load_calibration``).

    ``register`` raises :class:`compressor_plugins.registry.PluginLoadError`, failing start-up,
    when the declaration is malformed, when the class has some members of a capability but not
    all (naming the missing ones), or when the name is registered twice (naming both
    distributions).

    :param registry: The registry of the plugin manager being built.

    The return value is ignored.

    Called once per plugin manager, after every plugin has been loaded and before the vision
    worker serves its first request. Registering is all it may do: no model is loaded yet; the
    worker then creates one instance per class and hands it what the pack holds for it
    (:func:`compressor_plugins.protocol.create_compressor`).
    """
