"""The LLM worker: a Triton python-backend model that generates text from LLaVA prompts.

The orchestrator sends the prompt's token ids, with each image's placeholder token repeated
once per visual token, and the images' LLM-space tokens; the worker splices them into the
prompt's embeddings and streams the generated token ids back, one response per token.

- :mod:`llm_worker.engine`: the Triton-free engine (load, splice, prefill, decode, sample).
- :mod:`llm_worker.serving`: request parsing and the generation thread, Triton-free too.
- ``model_repository/squint_llm/1/model.py``: the thin Triton adapter.
- :mod:`llm_worker.tritonserver`: starts the real ``tritonserver`` on that repository.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "squint_llm"
# Starts the message of every request the model refuses as invalid. Triton's stream responses
# carry an error's message but not its code, so clients tell "your request is wrong" from
# "we failed" by this prefix.
INVALID_REQUEST_PREFIX = "invalid request: "


def model_repository_path() -> Path:
    """The Triton model repository shipped inside this package (serves CPU and GPU configs)."""
    return Path(__file__).resolve().parent / "model_repository"


__all__ = ["INVALID_REQUEST_PREFIX", "MODEL_NAME", "model_repository_path"]
