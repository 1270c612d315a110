"""``text_recovery``: Recoverable Compression -- text-guided visual token recovery (docs/methods.md §4).

Training-free; the output stays in CLIP space and goes through the usual LLaVA projector. For
one image with n patches X_p (the LLaVA feature layer, CLS dropped):

1. a_p = CLS row of softmax(q k^T / sqrt(C)) over the last block's full-width q/k, CLS column dropped.
2. s_p = cos(text, Z_p) / sqrt(p), with Z the projected last-layer tokens.
3. Visual filter: n_v = floor(n * LOF-fraction(a_p, 20)); V = the n_v largest a_p.
4. Text recovery: s' = s with s'[V] = min(s); n_t = floor((n - n_v) * LOF-fraction(s', 20));
   T = the n_t largest s'.
5. Kept = sorted(V ++ T): the first output tokens, in raster order.
6. Rest = the other R patches. L = floor(R * LOF-fraction(a_rest, 10)) merge centres: the L
   largest a_rest, in descending attention.
7. Each centre adds the attention-weighted (raw, unnormalised) sum of its 32 best candidates
   -- the other centres, then the non-centre rest -- scored by key cosine + 50 * s'.
8. One leftover token: the attention-weighted sum of the non-centre rest. Output =
   [kept ; centres ; leftover], the leftover only when L >= 1.

LOF-fraction is scikit-learn's ``LocalOutlierFactor(k, contamination='auto')`` outlier fraction on
the values as float32 (:mod:`compressor_plugins._lof`).

Modes. The default is the paper's intent. ``reference_mode`` reproduces the released code
(commit d927594) exactly, both quirks included: the centre count is floor(C * ratio) with C the
feature width instead of R, and the keys of step 7 are read at positions *within Rest* instead
of at the patches' own indices; the text embedding is the released code's choice (the last,
padding position of 77) when the worker supplies it, CLIP's pooled end-of-text embedding
otherwise and in the default mode. The text is the user's question in both modes (the released
code embeds the first prompt line, the system prompt under LLaVA-1.5's template; docs/methods.md
§4.5). The merged rows are X_rest[j] in both modes, so ``covers`` name the patches a token is
built from.

Where the released code crashes or returns nothing, both modes instead (and ``notes`` say so):
- L is clamped to R - 1, so the leftover token always summarises at least one patch (the released
  code fails for L > R -- practically never on a 24 x 24 grid, often on small grids -- and emits
  an all-zero leftover for L = R);
- a centre merges min(32, R - 1) neighbours (the released code fails when R - 1 < 32);
- an image where nothing is kept and nothing merged (n_v = n_t = L = 0) returns the leftover token
  alone -- the attention-weighted sum of every patch -- instead of zero tokens.
LOF neighbour counts are clamped to n - 1 for fewer points, as scikit-learn does; fewer than two
points have no outliers.

Beyond the reference: in the default mode T is drawn from outside V (the released code could
only pick a V patch again when n_t reaches the minimum score, and would then emit it twice).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from compressor_plugins import hookimpl
from compressor_plugins._lof import lof_outlier_fraction
from compressor_plugins.protocol import (
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    OutputSpace,
    ParamSpec,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryConfig:
    """Resolved parameters; the defaults are the released code's constants (docs/methods.md §4.3)."""

    reference_mode: bool = False
    vision_lof_k: int = 20  # LOF neighbours for the visual filter
    text_lof_k: int = 20  # LOF neighbours for text recovery
    merge_lof_k: int = 10  # LOF neighbours for the merge-centre count
    text_weight: float = 50.0  # weight of the text score in the merge score
    cluster_size: int = 32  # neighbours merged into each centre

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RecoveryConfig:
        return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls)})


_DEFAULTS = RecoveryConfig()


@dataclass(frozen=True)
class Recovery:
    """Everything one image's recovery decided. Indices are 0-based patch indices (raster order);
    ``*_rel`` are positions within ``rest``. ``n`` patches, ``R`` = |rest|, ``L`` centres,
    ``m`` neighbours per centre, ``d`` feature width."""

    vision: torch.Tensor  # [n_v] V, by descending CLS attention
    text: torch.Tensor  # [n_t] T, by descending text score
    kept: torch.Tensor  # [n_v + n_t] ascending: the first output tokens
    rest: torch.Tensor  # [R] ascending complement of kept
    centres_rel: torch.Tensor  # [L] by descending attention
    others_rel: torch.Tensor  # [R - L] ascending: what the leftover token sums
    clusters_rel: torch.Tensor  # [L, m] each centre's merged neighbours, best first
    ratio_vision: float
    ratio_text: float
    ratio_merge: float
    centres_wanted: int  # L before clamping to R - 1
    leftover: bool  # whether the last token is the leftover sum
    tokens: torch.Tensor  # [n_v + n_t + L + leftover, d]


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[1 + n, C] each -> [n]: the CLS query's softmax over all keys, one head over the full width.

    The whole [1 + n, 1 + n] product is formed, as the released code does, although only the CLS
    row is used: a single-row product rounds differently (~1e-7), and LOF counts at the margin
    follow the rounding. It costs a few milliseconds on a CPU.
    """
    logits = (q @ k.T) * q.shape[-1] ** -0.5  # [1 + n, 1 + n]
    return logits.softmax(dim=-1)[0, 1:]  # [n], CLS column dropped after the softmax


def text_scores(projected: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[1 + n, p], [p] -> [n]: cosine of the text with every projected patch, scaled by p^-0.5."""
    z_p = F.normalize(projected[1:], dim=-1)  # [n, p]
    t = F.normalize(text, dim=-1)  # [p]
    return (t[None] @ z_p.T)[0] * projected.shape[-1] ** -0.5  # [n]


def complement(index: torch.Tensor, size: int) -> torch.Tensor:
    """Ascending 0..size-1 without ``index``: [size - len(index)].

    Written as the released code's ``complement_idx`` (zero the listed positions, sort, drop as
    many entries as were listed), which is the plain complement when ``index`` has no repeats --
    always so in the default mode -- and reproduces the released code when it has.
    """
    masked = torch.arange(size, device=index.device).scatter(0, index, 0)  # [size]
    return masked.sort().values[index.shape[0] :]


def recover(
    x_p: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    projected: torch.Tensor,
    text: torch.Tensor,
    config: RecoveryConfig,
) -> Recovery:
    """Recover one image: X_p [n, d], q/k [1 + n, C], projected [1 + n, p], text [p] (float32)."""
    n, d = x_p.shape
    reference = config.reference_mode

    # 1-2. Scores.
    a_p = cls_attention(q, k)  # [n]
    s = text_scores(projected, text)  # [n]

    # 3. Visual filter: as many of the most-attended patches as LOF finds outliers.
    ratio_vision = lof_outlier_fraction(a_p.detach().cpu().numpy(), config.vision_lof_k)
    n_v = int(n * ratio_vision)
    vision = a_p.topk(n_v).indices  # [n_v]

    # 4. Text recovery, with V pushed to the bottom so LOF and top-k look past it.
    s_prime = s.clone()
    s_prime[vision] = s.min()  # [n]
    ratio_text = lof_outlier_fraction(s_prime.detach().cpu().numpy(), config.text_lof_k)
    n_t = int((n - n_v) * ratio_text)
    if reference:
        text_idx = s_prime.topk(n_t).indices  # [n_t]
    else:  # n_t <= n - n_v, so T fits outside V
        text_idx = s_prime.index_fill(0, vision, float("-inf")).topk(n_t).indices  # [n_t]

    # 5-6. Kept (raster order) and the rest.
    kept = torch.cat([vision, text_idx]).sort().values  # [n_v + n_t]
    rest = complement(kept, n)  # [R]
    r = rest.shape[0]
    a_r = a_p[rest]  # [R]
    s_r = config.text_weight * s_prime[rest]  # [R]
    x_r = x_p.index_select(0, rest)  # [R, d]

    # 7. Merge centres. The released code counts them from the feature width (quirk 1).
    ratio_merge = lof_outlier_fraction(a_r.detach().cpu().numpy(), config.merge_lof_k)
    centres_wanted = int((d if reference else r) * ratio_merge)
    n_centres = min(centres_wanted, max(r - 1, 0))  # the leftover keeps at least one patch
    if n_centres < centres_wanted:
        logger.debug("text_recovery: %d merge centres clamped to %d (R = %d)", centres_wanted, n_centres, r)
    centres_rel = a_r.topk(n_centres).indices  # [L]
    others_rel = complement(centres_rel, r)  # [R - L]

    # Keys: the released code reads them at positions within Rest (quirk 2), not at Rest[j].
    keys = F.normalize(k[1:], dim=-1)  # [n, C]
    keys_r = keys[:r] if reference else keys.index_select(0, rest)  # [R, C], by position within Rest
    cluster_size = min(config.cluster_size, r - 1)
    merged, clusters = [], []
    for i in range(n_centres):
        centre = centres_rel[i]
        candidates = torch.cat([centres_rel[:i], centres_rel[i + 1 :], others_rel])  # [R - 1]
        # Cosine over the gathered candidate keys: rounds exactly like the released code's bmm.
        score = keys_r.index_select(0, candidates) @ keys_r[centre] + s_r[candidates]  # [R - 1]
        chosen = candidates[score.topk(cluster_size).indices]  # [m]
        # Raw attention weights (about 1/n each): the centre itself dominates.
        neighbours = x_r.index_select(0, chosen) * a_r[chosen, None]  # [m, d]
        merged.append(x_r[centre] + neighbours.sum(dim=0))  # [d]
        clusters.append(chosen)

    # 8. Leftover token; without centres the released code drops it -- unless nothing else is left.
    parts = [x_p.index_select(0, kept)]  # [n_v + n_t, d]
    if merged:
        parts.append(torch.stack(merged))  # [L, d]
    leftover = n_centres >= 1 or kept.shape[0] == 0
    if leftover:
        parts.append((x_r.index_select(0, others_rel) * a_r[others_rel, None]).sum(dim=0, keepdim=True))  # [1, d]
    return Recovery(
        vision=vision,
        text=text_idx,
        kept=kept,
        rest=rest,
        centres_rel=centres_rel,
        others_rel=others_rel,
        clusters_rel=torch.stack(clusters) if clusters else rest.new_zeros((0, max(cluster_size, 0))),
        ratio_vision=ratio_vision,
        ratio_text=ratio_text,
        ratio_merge=ratio_merge,
        centres_wanted=centres_wanted,
        leftover=leftover,
        tokens=torch.cat(parts),
    )


class TextGuidedRecovery:
    name: ClassVar[str] = "text_recovery"
    summary: ClassVar[str] = (
        "Recoverable Compression: keep LOF-outlier patches by CLS attention and question similarity, "
        "merge the rest into a few centres and one leftover token (count depends on the image)"
    )
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec(
            "reference_mode",
            bool,
            _DEFAULTS.reference_mode,
            description="reproduce the released code exactly: centre count from the feature width, keys at "
            "positions within the rest, last-position text embedding",
        ),
        ParamSpec(
            "vision_lof_k",
            int,
            _DEFAULTS.vision_lof_k,
            minimum=1,
            maximum=1024,
            description="LOF neighbours of the visual filter",
        ),
        ParamSpec(
            "text_lof_k",
            int,
            _DEFAULTS.text_lof_k,
            minimum=1,
            maximum=1024,
            description="LOF neighbours of text recovery",
        ),
        ParamSpec(
            "merge_lof_k",
            int,
            _DEFAULTS.merge_lof_k,
            minimum=1,
            maximum=1024,
            description="LOF neighbours of the merge-centre count",
        ),
        ParamSpec(
            "text_weight",
            float,
            _DEFAULTS.text_weight,
            minimum=0.0,
            maximum=1000.0,
            description="weight of the question score when merging",
        ),
        ParamSpec(
            "cluster_size",
            int,
            _DEFAULTS.cluster_size,
            minimum=1,
            maximum=1024,
            description="neighbours merged into each centre (fewer when fewer candidates)",
        ),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset(
        {
            CompressorInput.PATCH_FEATURES,
            CompressorInput.LAST_BLOCK_QK,
            CompressorInput.PROJECTED_PATCHES,
            CompressorInput.QUESTION_EMBEDDING,
        }
    )
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int | None:
        return None  # depends on the image

    def analyse(self, features: ImageFeatures, params: Mapping[str, Any]) -> Recovery:
        """Every decision of the recovery for one image, tokens included."""
        config = RecoveryConfig.from_params(params)
        x_p, q, k, projected, text = self._inputs(features, config)
        # float32 throughout: LOF counts change under fp16 (docs/methods.md §6, pitfall 2).
        return recover(x_p.float(), q.float(), k.float(), projected.float(), text.float(), config)

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        return self._output(features, params, self.analyse(features, params))

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        """At most ``budget`` tokens: drop the lowest-priority ones, the leftover token first, then
        the least-attended centres, the lowest-scored text-recovered patches, the least-attended
        visual ones. The survivors keep their output order."""
        result = self.analyse(features, params)
        full = self._output(features, params, result)
        if full.tokens.shape[0] <= budget:
            return full
        slots: dict[int, list[int]] = {}
        for position, patch in enumerate(result.kept.tolist()):
            slots.setdefault(patch, []).append(position)
        priority = [slots[p].pop(0) for p in [*result.vision.tolist(), *result.text.tolist()] if slots.get(p)]
        n_kept = result.kept.shape[0]
        priority += [n_kept + i for i in range(result.centres_rel.shape[0])]
        priority += [n_kept + result.centres_rel.shape[0]] if result.leftover else []
        chosen = sorted(priority[:budget])
        return CompressedImage(
            tokens=full.tokens[chosen],
            covers=tuple(full.covers[i] for i in chosen),
            notes={**full.notes, "dropped_for_budget": full.tokens.shape[0] - len(chosen)},
        )

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        """Any count from the natural one down to a single token: it drops tokens one by one."""
        return tuple(range(natural, 0, -1))

    def _output(self, features: ImageFeatures, params: Mapping[str, Any], result: Recovery) -> CompressedImage:
        last_position = params["reference_mode"] and features.question_embedding_last_position is not None
        rest = result.rest.tolist()
        covers = [(i,) for i in result.kept.tolist()]
        for centre, cluster in zip(result.centres_rel.tolist(), result.clusters_rel.tolist()):
            covers.append(tuple(sorted({rest[centre], *(rest[j] for j in cluster)})))
        if result.leftover:
            covers.append(tuple(rest[j] for j in result.others_rel.tolist()))
        n_centres = result.centres_rel.shape[0]
        return CompressedImage(
            tokens=result.tokens.to(features.patch_features.dtype),
            covers=tuple(covers),
            notes={
                "n_vision": result.vision.shape[0],
                "n_text": result.text.shape[0],
                "n_centres": n_centres,
                "n_centres_wanted": result.centres_wanted,  # before clamping to R - 1
                "leftover": result.leftover,
                "ratio_vision": result.ratio_vision,
                "ratio_text": result.ratio_text,
                "ratio_merge": result.ratio_merge,
                "neighbours_per_centre": result.clusters_rel.shape[1] if n_centres else 0,
                "text_embedding": "last_position" if last_position else "pooled_eot",
                "reference_mode": params["reference_mode"],
            },
        )

    def _inputs(
        self, features: ImageFeatures, config: RecoveryConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The five inputs, checked against each other: X_p [n, d], q, k [1 + n, C], Z [1 + n, p], t [p]."""
        text = features.question_embedding
        if config.reference_mode and features.question_embedding_last_position is not None:
            text = features.question_embedding_last_position  # the released code's choice (§4.5)
        missing = [
            name
            for name, value in (
                ("last_block_qk", features.last_block_qk),
                ("projected_patches", features.projected_patches),
                ("question_embedding", text),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"compressor {self.name!r} needs {', '.join(missing)}; the vision worker did not supply it"
            )
        x_p = features.patch_features  # [n, d]
        q, k = features.last_block_qk  # [1 + n, C] each
        projected = features.projected_patches  # [1 + n, p]
        n = x_p.shape[0]
        if n < 1:
            raise ValueError(f"compressor {self.name!r} needs at least one patch; got {n}")
        shapes = {"q": q, "k": k, "projected_patches": projected}
        for label, tensor in shapes.items():
            if tensor.ndim != 2 or tensor.shape[0] != n + 1:
                raise ValueError(
                    f"compressor {self.name!r}: {label} has shape {tuple(tensor.shape)}; "
                    f"expected [1 + n, *] = [{n + 1}, *] (CLS first) for {n} patches"
                )
        if q.shape != k.shape:
            raise ValueError(f"compressor {self.name!r}: q has shape {tuple(q.shape)} but k has {tuple(k.shape)}")
        if text.shape != projected.shape[1:]:
            raise ValueError(
                f"compressor {self.name!r}: the question embedding has shape {tuple(text.shape)}; "
                f"the projected patches are {projected.shape[1]} wide"
            )
        return x_p, q, k, projected, text


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(TextGuidedRecovery)
