"""How long vLLM's worker processes poll for their next step before they sleep.

vLLM's worker reads each step's work from a shared-memory queue and, for a second after its last
read, polls that queue in a loop (``SpinCondition``'s ``busy_loop_s``, not one of vLLM's settings).
Under load the poll keeps steps back to back; after the last answer it keeps a core busy for that
second. On a CPU machine the vision worker's CLIP shares that core: on 2 cores a cold request sent
within a second of the previous answer ran its CLIP forward ~35% slower (docs/benchmarks.md).

The engine names :class:`IdleSpin` as vLLM's ``worker_extension_cls``, so vLLM imports this
module in every worker process it spawns; the import sets the window from
:data:`IDLE_SPIN_ENV`, which the engine exports before vLLM starts (spawned processes inherit the
environment, not the parent's patched modules).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

logger = logging.getLogger(__name__)

IDLE_SPIN_ENV = "SQUINT_VLLM_WORKER_IDLE_SPIN_SECONDS"
EXTENSION = f"{__name__}.IdleSpin"


def set_idle_spin(seconds: float) -> bool:
    """Make vLLM's shared-memory queue readers created from now on poll for ``seconds`` after each
    read; False (and nothing changed) where this vLLM has no such window."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    original = getattr(SpinCondition.__init__, "__wrapped__", SpinCondition.__init__)
    signature = inspect.signature(original)
    if "busy_loop_s" not in signature.parameters:
        return False

    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["busy_loop_s"] = seconds
        original(*bound.args, **bound.kwargs)

    SpinCondition.__init__ = __init__
    return True


class IdleSpin:
    """vLLM's ``worker_extension_cls``: it adds no method; importing its module in the worker
    applies :data:`IDLE_SPIN_ENV`."""


_seconds = os.environ.get(IDLE_SPIN_ENV)
if _seconds and not set_idle_spin(float(_seconds)):
    logger.warning("this vLLM has no worker poll window to set; %s=%s has no effect", IDLE_SPIN_ENV, _seconds)
