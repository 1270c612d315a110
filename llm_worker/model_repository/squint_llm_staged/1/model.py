"""Triton's entry point for ``squint_llm_staged``: the adapter is :class:`llm_worker.triton_python.StagedModel`."""

from llm_worker.triton_python import StagedModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
