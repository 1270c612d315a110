"""Triton's entry point for ``squint_llm``: the adapter is :class:`llm_worker.triton_python.VLLMModel`."""

from llm_worker.triton_python import VLLMModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
