"""The LLM worker: a Triton python-backend model that generates text from LLaVA prompts.

The orchestrator sends the prompt's token ids, with each image's placeholder token repeated
once per visual token, and the images' LLM-space tokens; the worker splices them into the
prompt's embeddings and streams the generated token ids back, one response per token.

- :mod:`llm_worker.requests`: the request, its checks and the prompt's embeddings (both engines).
- :mod:`llm_worker.vllm_engine`: vLLM serving those prompts (``squint_llm``).
- :mod:`llm_worker.engine`: Squint's own engine (load, splice, prefill, decode, sample), kept for
  in-LLM pooling and the reference-exact modes (``squint_llm_staged``).
- :mod:`llm_worker.serving`: request parsing and the staged engine's generation thread.
- :mod:`llm_worker.triton_python`: the Triton adapters of both (``model_repository/*/1/model.py``).
- :mod:`llm_worker.tritonserver`: starts the real ``tritonserver`` on that repository.
"""

from __future__ import annotations

from pathlib import Path

# The vLLM engine, and Squint's own engine for in-LLM pooling and the reference-exact modes.
MODEL_NAME = "squint_llm"
STAGED_MODEL_NAME = "squint_llm_staged"
# Starts the message of every request the model refuses as invalid. Triton's stream responses
# carry an error's message but not its code, so clients tell "your request is wrong" from
# "we failed" by this prefix.
INVALID_REQUEST_PREFIX = "invalid request: "


def model_repository_path() -> Path:
    """The Triton model repository shipped inside this package (serves CPU and GPU configs)."""
    return Path(__file__).resolve().parent / "model_repository"


__all__ = ["INVALID_REQUEST_PREFIX", "MODEL_NAME", "STAGED_MODEL_NAME", "model_repository_path"]
