"""LLaMA's decoder run layer by layer: LLaVolta's staged pooling in the prefill, batch-invariant decode.

The engine does not call the model's ``forward``; it runs the decoder layers itself (the
modules and attention functions are transformers' own, nothing is forked) so that it can

- **pool image spans inside the LLM** (docs/methods.md §2.4-2.5): at the entry of decoder layer K
  every image span carrying a directive for K is replaced by the averages of its windows
  (1-D raster windows of S tokens, or S x S squares of the span's grid), with
  :func:`compressor_plugins.pooling.pool_image_spans`. Pooled tokens get the (floor) mean
  of their window's position ids, text keeps its own (the ids have gaps); layers < K cache
  the full length, layers >= K the pooled one, and decoding continues from the unpooled
  length. Rotary embeddings are computed from the position ids themselves, so gapped ids
  and ids beyond the current length need no table (docs/methods.md §6, pitfall 9).
- **decode many sequences in one step whose tokens do not depend on the batch**: each
  sequence keeps its own cache (per-layer lengths differ), attention runs per sequence, and
  everything that mixes rows (the linear layers) runs on tiles of exactly ``decode_tile``
  rows, zero-padded. A BLAS matmul's row i depends on the matrix's row count (a 1-row
  product takes a different kernel than an 8-row one), but not on where the row sits in
  the tile nor on the other rows; a fixed tile therefore gives every sequence the same
  logits, bit for bit, whether it decodes alone or beside fifteen others. One more trap on
  CPU: PyTorch's vectorised elementwise kernels compute a tensor's last ``numel % 32``
  elements (and those at thread-chunk edges) with scalar code, and scalar SiLU rounds
  differently from the vector one; transcendental elementwise maths (rotary cos/sin, the
  MLP's activation) therefore runs on the whole tile only when its size keeps every row on
  the vector path, and row by row otherwise. Some BLAS kernels do place rows: with AVX2, a
  projection to a few features (6, say) computes a tile's last rows in an edge kernel. The
  decoder checks each linear layer's shape once (:func:`row_invariant`) and runs the layers
  that fail as one-row products, for every batch size alike.

Caches are ``DynamicCache`` objects whose layers keep their keys and values in buffers with
spare room (:class:`GrowingLayer`): a decode step writes one position instead of copying
the whole cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from compressor_plugins.pooling import pool_image_spans, pool_tokens_2d, pooled_positions
from llm_worker.spans import ImageSpan, SpanShape

# Rows of every linear layer's input in a decode step; see the module docstring.
DECODE_TILE = 8
# An elementwise CPU kernel keeps every element on its vector path when the tensor's size is
# a multiple of its unrolled vector width (32 floats with AVX-512; 64 leaves room) and the
# tensor is below PyTorch's grain size (so no thread splits it).
_VECTOR_MULTIPLE = 64
_GRAIN_SIZE = 32768
# Free positions a growing cache layer adds beyond what it needs: at least this, or a quarter.
_MIN_ROOM = 64


def row_invariant(linear: torch.nn.Module, tile: int) -> bool:
    """Whether ``linear`` computes each row of a ``tile``-row input alone: the same bits
    whatever the other rows hold and wherever the row sits. Kernel choice depends on shapes,
    so random rows, rolled through every place and zeroed around, expose an edge kernel."""
    weight = linear.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    rows = torch.randn(tile, weight.shape[1], generator=generator, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        expected = linear(rows)  # [tile, out]
        for shift in range(1, tile):
            if not torch.equal(linear(rows.roll(shift, 0)), expected.roll(shift, 0)):
                return False
        alone = torch.zeros_like(rows)
        alone[0] = rows[tile - 1]
        return torch.equal(linear(alone)[0], expected[tile - 1])


def _vector_safe(numel: int, device: torch.device) -> bool:
    """Whether an elementwise op over ``numel`` elements computes every element the same way."""
    return device.type != "cpu" or (numel % _VECTOR_MULTIPLE == 0 and numel < _GRAIN_SIZE)


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers with spare room.

    ``DynamicLayer`` concatenates on every update, copying the whole cache each decode step;
    this one writes the new positions into place and grows by a quarter when full.
    ``keys``/``values`` are views of the filled part, so what reads a ``DynamicLayer``
    (``get_seq_length``, attention) reads this one; the editing methods (``crop``, beam
    reordering) are not supported. The first update (the prefill) is sized exactly, so the
    prefill's attention reads the same contiguous tensors as with a ``DynamicLayer``.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            # [batch, kv_heads, n, head_dim]: the prefill's own tensors, no room yet.
            self._key_buffer, self._value_buffer = key_states.contiguous(), value_states.contiguous()
            self._length = key_states.shape[-2]
        else:
            length = self._length + key_states.shape[-2]
            if length > self._key_buffer.shape[-2]:
                room = max(_MIN_ROOM, length // 4)
                self._key_buffer = self._grow(self._key_buffer, length + room)
                self._value_buffer = self._grow(self._value_buffer, length + room)
            self._key_buffer[..., self._length : length, :] = key_states
            self._value_buffer[..., self._length : length, :] = value_states
            self._length = length
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]
        return self.keys, self.values

    def _grow(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = buffer.new_empty(*buffer.shape[:-2], capacity, buffer.shape[-1])
        grown[..., : self._length, :] = buffer[..., : self._length, :]
        return grown

    @property
    def nbytes(self) -> int:
        """Bytes held, spare room included."""
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in (self._key_buffer, self._value_buffer))


@dataclass(frozen=True)
class Prefill:
    """What a prefill leaves besides the cache.

    ``hidden``: ``[1, n_kept, hidden]`` the last layer's output after the final norm, one row
    per token the deepest layer kept; ``position_ids``: ``[1, n_kept]`` their position ids
    (gapped after in-LLM pooling).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor


def pool_span(
    hidden: torch.Tensor, position_ids: torch.Tensor, span: ImageSpan, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool one span that now begins at ``start``; other tokens keep their states and ids; the
    pooled ids as ``span.reference_mode`` says.

    ``hidden`` [1, L, D], ``position_ids`` [1, L] -> [1, L - length + pooled_length, ...].
    """
    if span.shape == "1d":
        return pool_image_spans(hidden, position_ids, [[start]], span.length, span.stride, span.reference_mode)
    end, side, stride = start + span.length, span.side, span.stride
    pooled = pool_tokens_2d(hidden[0, start:end], side, stride)  # [(side // stride)^2, D]
    # Each window's ids, window by window in raster order: [(side // stride)^2 * stride^2].
    usable = side // stride * stride
    grid = position_ids[0, start:end].reshape(side, side)[:usable, :usable]
    windows = grid.reshape(usable // stride, stride, usable // stride, stride).transpose(1, 2).reshape(-1)
    positions = pooled_positions(windows, stride * stride, span.reference_mode)  # [(side // stride)^2]
    hidden = torch.cat([hidden[:, :start], pooled[None], hidden[:, end:]], dim=1)
    position_ids = torch.cat([position_ids[:, :start], positions[None], position_ids[:, end:]], dim=1)
    return hidden, position_ids


def _pool_due(
    hidden: torch.Tensor, position_ids: torch.Tensor, spans: Sequence[ImageSpan], pooled: list[ImageSpan], layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """At the entry of ``layer``: pool one prompt's spans due there (``hidden`` [1, L, D]), and
    add them to ``pooled``, the spans pooled before (whose shrinking moved the later starts)."""
    due = sorted((s for s in spans if s.layer == layer), key=lambda s: s.start, reverse=True)
    # Last span first: pooling it does not move the spans before it.
    for span in due:
        start = span.start - sum(p.length - p.pooled_length for p in pooled if p.start < span.start)
        hidden, position_ids = pool_span(hidden, position_ids, span, start)
    pooled += due
    return hidden, position_ids


class StagedDecoder:
    """A LLaMA decoder (``LlamaModel``) and its LM head, run layer by layer.

    Not thread-safe: one thread runs it (the engine's caller serialises).
    """

    def __init__(self, model: torch.nn.Module, lm_head: torch.nn.Module, decode_tile: int = DECODE_TILE) -> None:
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(model, name):
                raise TypeError(
                    f"staged decoder: {type(model).__name__} has no {name}; it runs LLaMA-style decoders "
                    "(LlamaModel: embed_tokens, layers, norm, rotary_emb)"
                )
        # Per-row values of a tile ([tile, 1, 1], e.g. RMSNorm's rsqrt) must all take one code path:
        # all scalar below the vector width, all vector at a multiple of it.
        if decode_tile < 1 or not (decode_tile < 32 or decode_tile % _VECTOR_MULTIPLE == 0):
            raise ValueError(
                f"staged decoder: decode_tile {decode_tile} must be in 1..31 or a multiple of {_VECTOR_MULTIPLE}"
            )
        self._model = model
        self._layers: list[torch.nn.Module] = list(model.layers)
        self._lm_head = lm_head
        self.config = model.config
        self.n_layers = len(self._layers)
        self.decode_tile = decode_tile
        # Linear layers whose tile rows are not independent (see row_invariant) run row by row;
        # decided once per layer type and weight shape, as BLAS picks kernels by shape.
        checked: dict[tuple[object, ...], bool] = {}
        self._row_by_row: set[int] = set()
        for linear in self._linears():
            weight = linear.weight
            key = (
                type(linear),
                tuple(weight.shape),
                weight.dtype,
                weight.device,
                getattr(linear, "bias", None) is not None,
            )
            if key not in checked:
                checked[key] = row_invariant(linear, decode_tile)
            if not checked[key]:
                self._row_by_row.add(id(linear))
        self._attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

    def _linears(self) -> list[torch.nn.Module]:
        linears = [self._lm_head]
        for layer in self._layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
            linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        return linears

    def _linear(self, linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` on a tile [tile, 1, in], row by row where the kernel places rows."""
        if id(linear) not in self._row_by_row:
            return linear(x)
        # A copy per row: a row's view starts mid-buffer, and BLAS kernels differ by alignment.
        return torch.cat([linear(x[i : i + 1].clone()) for i in range(x.shape[0])])

    def new_cache(self) -> DynamicCache:
        """An empty cache for one sequence: a ``DynamicCache`` of :class:`GrowingLayer` layers."""
        cache = DynamicCache(config=self.config)
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def prefill(
        self,
        embeds: torch.Tensor,
        spans: Sequence[ImageSpan],
        cache: DynamicCache | None,
    ) -> Prefill:
        """Run one prompt's embeddings ``[1, L, hidden]`` through every layer, filling ``cache``
        (``None``: no cache, as a training forward runs; gradients flow as through ``forward``).

        Positions start as ``0..L-1``; at the entry of layer K the spans whose ``layer`` is K
        are pooled; a span in ``reference_mode`` gets pooled ids as the released code computes
        them (a float16 mean, truncated; rounded above 2048). Without spans this is, operation for
        operation, ``LlamaModel.forward`` with a fresh cache and no padding.
        """
        hidden = embeds  # [1, L, hidden]
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, L]
        pooled: list[ImageSpan] = []
        embeddings = self._model.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self._layers):
            if any(s.layer == index for s in spans):
                hidden, position_ids = _pool_due(hidden, position_ids, spans, pooled, index)
                embeddings = self._model.rotary_emb(hidden, position_ids)
            # No mask: one unpadded sequence and an empty cache in this layer -> causal SDPA.
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=embeddings,
            )
        return Prefill(hidden=self._model.norm(hidden), position_ids=position_ids)

    def prefill_padded(
        self, embeds: torch.Tensor, lengths: Sequence[int], spans: Sequence[Sequence[ImageSpan]]
    ) -> tuple[torch.Tensor, list[int]]:
        """Training's batched :meth:`prefill`, without a cache: right-padded prompts ``[B, L,
        hidden]`` (sample b's first ``lengths[b]`` rows are real), each with its own spans, pooled
        as :meth:`prefill` pools them and re-padded on the right. Causal attention never lets a
        real row see the pads after it, so every real row is what :meth:`prefill` gives its
        prompt alone (up to the rounding of batched kernels). Returns the last layer's output after
        the final norm ``[B, L', hidden]`` and each sample's kept length."""
        hidden = embeds
        lengths = list(lengths)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        pooled: list[list[ImageSpan]] = [[] for _ in lengths]
        embeddings = self._model.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self._layers):
            if any(s.layer == index for sample in spans for s in sample):
                rows, ids = [], []
                for b, n in enumerate(lengths):
                    row, row_ids = _pool_due(
                        hidden[b : b + 1, :n], position_ids[b : b + 1, :n], spans[b], pooled[b], index
                    )
                    lengths[b] = row.shape[1]
                    rows.append(row[0])
                    ids.append(row_ids[0])
                hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
                position_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
                embeddings = self._model.rotary_emb(hidden, position_ids)
            hidden = layer(
                hidden, attention_mask=None, position_ids=position_ids, use_cache=False, position_embeddings=embeddings
            )
        return self._model.norm(hidden), lengths

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of hidden states ``[..., hidden]``."""
        return self._lm_head(hidden).float()

    def decode(
        self, token_ids: torch.Tensor, position_ids: torch.Tensor, caches: Sequence[DynamicCache]
    ) -> torch.Tensor:
        """One decode step for ``B`` sequences: each feeds one token at its position, into its cache.

        ``token_ids`` [B] and ``position_ids`` [B] (int64); returns the logits ``[B, vocab]``
        (float32). A sequence's logits are the same, bit for bit, for any ``B`` and any
        neighbours: linear layers see tiles of ``decode_tile`` rows, attention one sequence.
        """
        logits = []
        for first in range(0, len(caches), self.decode_tile):
            last = first + self.decode_tile
            logits.append(self._decode_tile(token_ids[first:last], position_ids[first:last], caches[first:last]))
        return torch.cat(logits)

    def _decode_tile(
        self, token_ids: torch.Tensor, position_ids: torch.Tensor, caches: Sequence[DynamicCache]
    ) -> torch.Tensor:
        n, tile = len(caches), self.decode_tile
        ids = F.pad(token_ids, (0, tile - n))  # [tile]; padding rows are zeros, never read back
        positions = F.pad(position_ids, (0, tile - n))[:, None]  # [tile, 1]
        hidden = self._model.embed_tokens(ids)[:, None]  # [tile, 1, hidden]
        cos, sin = self._rotary(hidden, positions, n)  # [tile, 1, head_dim]
        for index, layer in enumerate(self._layers):
            attention = layer.self_attn
            head_dim = attention.head_dim
            residual = hidden
            normed = layer.input_layernorm(hidden)  # [tile, 1, hidden]
            query = (
                self._linear(attention.q_proj, normed).view(tile, 1, -1, head_dim).transpose(1, 2)
            )  # [tile, heads, 1, head_dim]
            key = (
                self._linear(attention.k_proj, normed).view(tile, 1, -1, head_dim).transpose(1, 2)
            )  # [tile, kv_heads, 1, head_dim]
            value = self._linear(attention.v_proj, normed).view(tile, 1, -1, head_dim).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            rows = []
            for i, cache in enumerate(caches):
                keys, values = cache.update(key[i : i + 1], value[i : i + 1], index)  # [1, kv_heads, n_kv, head_dim]
                out, _ = self._attention(
                    attention, query[i : i + 1], keys, values, None, dropout=0.0, scaling=attention.scaling
                )
                rows.append(out)  # [1, 1, heads, head_dim]
            rows.append(rows[0].new_zeros(tile - n, *rows[0].shape[1:]))
            attended = torch.cat(rows).reshape(tile, 1, -1)  # [tile, 1, heads * head_dim]
            hidden = residual + self._linear(attention.o_proj, attended)
            residual = hidden
            hidden = residual + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden), n)
        hidden = self._model.norm(hidden)  # [tile, 1, hidden]
        return self._linear(self._lm_head, hidden[:, 0]).float()[:n]  # [n, vocab]

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tile, 1, head_dim] for ``positions`` [tile, 1], whole-tile when that is row-invariant."""
        head_dim = self._layers[0].self_attn.head_dim
        if _vector_safe(positions.shape[0] * head_dim, positions.device):
            return self._model.rotary_emb(hidden, positions)
        rows = [self._model.rotary_emb(hidden[i : i + 1], positions[i : i + 1]) for i in range(n)]
        pad = rows[0][0].new_zeros(positions.shape[0] - n, 1, head_dim)
        return torch.cat([c for c, _ in rows] + [pad]), torch.cat([s for _, s in rows] + [pad])

    def _mlp(self, mlp: torch.nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
        """LlamaMLP's ``down(act(gate(x)) * up(x))`` on a tile [tile, 1, hidden]; the activation
        row by row unless the whole tile is row-invariant."""
        gate, up = self._linear(mlp.gate_proj, x), self._linear(mlp.up_proj, x)  # [tile, 1, intermediate]
        if _vector_safe(gate.numel(), gate.device):
            activated = mlp.act_fn(gate)
        else:
            rows = [mlp.act_fn(gate[i : i + 1]) for i in range(n)]
            activated = torch.cat(rows + [gate.new_zeros(gate.shape[0] - n, *gate.shape[1:])])
        return self._linear(mlp.down_proj, activated * up)


def cache_lengths(cache: DynamicCache, n_layers: int) -> tuple[int, ...]:
    """Tokens held by each layer of ``cache`` (they differ after in-LLM pooling)."""
    return tuple(cache.get_seq_length(i) for i in range(n_layers))


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of keys and values ``cache`` holds (a growing layer's spare room included)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            total += layer.nbytes
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


__all__ = [
    "DECODE_TILE",
    "GrowingLayer",
    "ImageSpan",
    "Prefill",
    "SpanShape",
    "StagedDecoder",
    "cache_bytes",
    "cache_lengths",
    "pool_span",
    "row_invariant",
]
