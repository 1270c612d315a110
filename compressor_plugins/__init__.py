"""Compressor plugins: the hook specs, the registry, the built-in compressors.

Third-party plugins implement hooks with :data:`hookimpl` and expose themselves through the
entry-point group ``squint.compressors``::

    [project.entry-points."squint.compressors"]
    my_merge = "my_package.plugin"
"""

import pluggy

from compressor_plugins.hookspecs import PROJECT_NAME

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["hookimpl"]
