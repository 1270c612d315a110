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
    ``params``, ``needs`` and ``output_space``, ``predict_tokens`` and ``compress``. A name
    registered twice fails start-up, naming both distributions.

    :param registry: The registry of the plugin manager being built.

    The return value is ignored.

    Called once per plugin manager, after every plugin has been loaded and before the vision
    worker serves its first request. Registering is all it may do: no model is loaded yet.
    """
