"""The language model of a LLaVA checkpoint as a causal-LM checkpoint of its own: what vLLM loads.

vLLM serves the pack's language model with the prompt given as embeddings (the token ids
embedded with the model's own table, the visual tokens spliced in at the ``<image>`` positions:
:func:`llm_worker.prompt.prompt_embeddings`), so it needs the decoder and LM head alone, saved as
an ordinary ``LlamaForCausalLM`` (or whatever the LLaVA's ``text_config`` names) with the
tokenizer and generation config. A pack carries that folder (``language_model`` in its manifest);
it is written once, when the pack is made or imported, never at request time.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlavaForConditionalGeneration

logger = logging.getLogger(__name__)


def export_language_model(llava_dir: Path | str, out_dir: Path | str) -> Path:
    """Write the language model of the LLaVA checkpoint in ``llava_dir`` into ``out_dir``.

    The weights are the LLaVA's own tensors (shared, not copied, while saving), in the
    checkpoint's dtype; ``out_dir`` is replaced.
    """
    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype="auto")
    text_config = llava.config.text_config
    # The causal LM's modules are the LLaVA's: built empty on the meta device, then given them.
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(text_config, dtype=llava.dtype)
    causal_lm.model = llava.model.language_model
    causal_lm.lm_head = llava.lm_head
    causal_lm.generation_config = GenerationConfig.from_model_config(text_config)
    generation = llava.generation_config
    causal_lm.generation_config.eos_token_id = generation.eos_token_id or text_config.eos_token_id
    causal_lm.generation_config.do_sample = bool(generation.do_sample)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    causal_lm.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(llava_dir).save_pretrained(out_dir)
    logger.info("wrote the language model of %s to %s", llava_dir, out_dir)
    return out_dir


__all__ = ["export_language_model"]
