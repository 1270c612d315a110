"""``text_recovery`` (docs/methods.md §4): the released code's golden data in reference mode, and the
properties both modes keep on inputs the golden data do not cover."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor_plugins._lof import lof_outlier_fraction
from compressor_plugins.builtin import text_recovery
from compressor_plugins.builtin.text_recovery import TextGuidedRecovery, cls_attention, text_scores
from compressor_plugins.protocol import Compressor, ImageFeatures, resolve_params
from compressor_plugins.registry import CompressorRegistry
from squint.errors import InvalidRequest

# shared/ sits beside the repository: /work/shared next to /work/main.
# tests/conftest.py resolves the golden data folder (../shared/oracles or the vendored copy).
ORACLES = Path(os.environ["SQUINT_ORACLES"]) / "recoverable_compression"
CASES = sorted(ORACLES.glob("*.npz"))

RC = TextGuidedRecovery()


def params(**overrides):
    return resolve_params(RC, overrides)


def spiky(side, seed, width=64, proj=32, key_gain=0.6, text_gain=3.0, n_keys=None, n_text=None, half_query=False):
    """Random CLIP outputs shaped like the oracles' recipe (README of the golden data): X, K, Q,
    Z, t drawn in that order, then ``n_keys`` keys pushed towards the CLS query and ``n_text``
    projected patches towards the text, each by gain * (1 + U[0, 1)) * sqrt(width)."""
    n = side * side
    g = torch.Generator().manual_seed(seed)
    x, k, q = (torch.randn(1 + n, width, generator=g) for _ in range(3))  # [1 + n, width] each
    z, t = torch.randn(1 + n, proj, generator=g), torch.randn(proj, generator=g)
    if half_query:
        q[0, width // 2 :] = 0  # keys' second half then never touches the CLS attention
    n_keys = max(1, n // 10) if n_keys is None else n_keys
    n_text = max(1, n // 10) if n_text is None else n_text
    rows, gain = torch.randperm(n, generator=g)[:n_keys] + 1, 1 + torch.rand(n_keys, generator=g)
    k[rows] += key_gain * gain[:, None] * width**0.5 * q[0] / q[0].norm()
    rows, gain = torch.randperm(n, generator=g)[:n_text] + 1, 1 + torch.rand(n_text, generator=g)
    z[rows] += text_gain * gain[:, None] * proj**0.5 * t / t.norm()
    return ImageFeatures(
        patch_features=x[1:], grid=(side, side), last_block_qk=(q, k), projected_patches=z, question_embedding=t
    )


def with_keys(features, k):
    return dataclasses.replace(features, last_block_qk=(features.last_block_qk[0], k))


def check_output(features, out):
    """Count, shapes, and covers that say exactly what each token is built from."""
    x = features.patch_features
    n, d = x.shape
    n_kept = out.notes["n_vision"] + out.notes["n_text"]
    n_centres = out.notes["n_centres"]
    leftover = n_centres >= 1 or n_kept == 0
    m = out.tokens.shape[0]
    assert m == n_kept + n_centres + int(leftover) >= 1
    assert out.notes["leftover"] == leftover
    assert out.tokens.shape == (m, d) and out.tokens.dtype == x.dtype
    assert len(out.covers) == m and all(0 <= i < n for cover in out.covers for i in cover)
    kept = [cover[0] for cover in out.covers[:n_kept]]
    assert all(len(cover) == 1 for cover in out.covers[:n_kept]) and kept == sorted(kept)
    assert torch.equal(out.tokens[:n_kept], x[kept])  # kept tokens are their own patches
    rest = n - n_kept
    assert n_centres <= max(rest - 1, 0)  # the leftover always keeps at least one patch
    for cover in out.covers[n_kept : n_kept + n_centres]:  # the centre and its distinct neighbours
        assert len(cover) == 1 + out.notes["neighbours_per_centre"] and not set(cover) & set(kept)
    if n_centres:
        assert out.notes["neighbours_per_centre"] == min(32, rest - 1)
    if leftover:
        attention = cls_attention(*(t.float() for t in features.last_block_qk))  # [n]
        cover = list(out.covers[-1])
        assert cover and not set(cover) & set(kept)
        expected = (x[cover].float() * attention[cover, None]).sum(0)
        torch.testing.assert_close(out.tokens[-1].float(), expected, atol=1e-5, rtol=1e-5)
    # With a leftover token every patch reaches the LLM; without one the rest is dropped.
    assert set().union(*out.covers) == (set(range(n)) if leftover else set(kept))


# --- golden data: the released code, run unmodified ------------------------------------------


def oracle_features(case):
    first = {
        name: torch.from_numpy(case[name][0])
        for name in ("in_hidden_penultimate", "in_q_last", "in_k_last", "in_proj_tokens", "in_text_embed")
    }
    return ImageFeatures(
        patch_features=first["in_hidden_penultimate"][1:],  # [576, C]
        grid=(24, 24),
        last_block_qk=(first["in_q_last"], first["in_k_last"]),  # [577, C] each
        projected_patches=first["in_proj_tokens"],  # [577, Dp]
        question_embedding=first["in_text_embed"],  # [Dp]
    )


ORACLE_CASES = [pytest.param(path, id=path.stem) for path in CASES]


@pytest.mark.parametrize("path", ORACLE_CASES)
def test_reference_mode_matches_the_released_code(path):
    case = dict(np.load(path))
    features = oracle_features(case)
    result = RC.analyse(features, params(reference_mode=True))
    # float32 tolerances. The CLS attention is a probability, accurate relative to itself (values
    # go down to 1e-8); the text score is a scaled cosine, accurate relative to its scale (~0.1),
    # not to the values near 0. The LOF ratios and every index set below are compared exactly.
    attention_tol = dict(rtol=1e-5, atol=1e-9)
    score_tol = dict(rtol=1e-5, atol=1e-7)

    # The three LOF inputs and their ratios.
    q, k = features.last_block_qk
    attention = cls_attention(q, k)  # [576]
    torch.testing.assert_close(attention, torch.from_numpy(case["lof_vision_input"][0]), **attention_tol)
    similarity = text_scores(features.projected_patches, features.question_embedding)  # [576]
    torch.testing.assert_close(similarity, torch.from_numpy(case["sim_text"][0, 0]), **score_tol)
    s_prime = similarity.clone()
    s_prime[result.vision] = similarity.min()
    torch.testing.assert_close(s_prime, torch.from_numpy(case["lof_text_input"][0]), **score_tol)
    torch.testing.assert_close(attention[result.rest], torch.from_numpy(case["lof_merge_input"][0]), **attention_tol)
    for name, k_lof, got in (
        ("vision", 20, result.ratio_vision),
        ("text", 20, result.ratio_text),
        ("merge", 10, result.ratio_merge),
    ):
        assert lof_outlier_fraction(case[f"lof_{name}_input"][0], k_lof) == float(case[f"ratio_{name}"]) == got, name

    # Every index set, in the released code's order.
    assert result.vision.tolist() == case["idx_vision"][0].tolist()
    assert result.text.tolist() == case["idx_text"][0].tolist()
    assert result.kept.tolist() == case["idx_kept_sorted"][0].tolist()
    assert result.centres_rel.tolist() == case["idx_centres_rel"][0].tolist()
    for i, chosen in enumerate(case["cluster_topk_rel"]):  # positions in centre i's candidate list
        candidates = torch.cat([result.centres_rel[:i], result.centres_rel[i + 1 :], result.others_rel])
        assert result.clusters_rel[i].tolist() == candidates[torch.from_numpy(chosen)].tolist()

    out = RC.compress(features, params(reference_mode=True))
    torch.testing.assert_close(out.tokens, torch.from_numpy(case["out_tokens"][0]), rtol=1e-5, atol=1e-6)
    check_output(features, out)


@pytest.mark.parametrize(
    ("seed", "width", "key_gain", "text_gain", "counts"),
    [
        # The README's held-back cases, rebuilt from their published recipe: (n_v, n_t, L, tokens).
        (2, 256, 0.6, 3.0, {True: (35, 17, 0, 52), False: (35, 17, 0, 52)}),
        (4, 1024, 0.08, 1.0, {True: (40, 26, 32, 99), False: (40, 26, 16, 83)}),  # 32 centres; 83 with the quirks fixed
    ],
)
def test_the_oracle_recipe_reproduces_the_published_counts(seed, width, key_gain, text_gain, counts):
    features = spiky(24, seed, width=width, proj=64, key_gain=key_gain, text_gain=text_gain, n_keys=24, n_text=30)
    for reference_mode, expected in counts.items():
        out = RC.compress(features, params(reference_mode=reference_mode))
        notes = out.notes
        assert (notes["n_vision"], notes["n_text"], notes["n_centres"], out.tokens.shape[0]) == expected
        check_output(features, out)


# --- LOF: the counts scikit-learn 1.9.1 gives, pinned -----------------------------------------


@pytest.mark.parametrize(
    ("seed", "n", "k", "duplicates", "outliers"),
    [
        # Outlier counts of sklearn 1.9.1 LocalOutlierFactor(n_neighbors=k).fit_predict on the same
        # float32 values (kd-tree for large n, brute force for small n, k >= n clamped with a warning).
        (0, 576, 20, False, 75),
        (1, 576, 20, True, 80),
        (2, 576, 10, False, 44),
        (3, 500, 10, True, 25),
        (4, 200, 20, False, 89),
        (5, 100, 5, True, 20),
        (6, 40, 20, False, 13),
        (7, 30, 10, False, 18),
        (8, 16, 20, False, 0),
        (9, 12, 3, True, 3),
        (10, 5, 20, False, 0),
        (11, 3, 1, False, 1),
        (12, 2, 10, False, 0),
        (13, 64, 1, False, 13),
    ],
)
def test_lof_counts_are_scikit_learns(seed, n, k, duplicates, outliers):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) ** 3  # heavy tails: a few isolated values
    if duplicates:
        values[: n // 3] = values.min()  # a block of equal values, like s' after the visual filter
    assert lof_outlier_fraction(values.numpy(), k) * n == pytest.approx(outliers)


def test_lof_degenerate_inputs():
    assert lof_outlier_fraction(np.zeros(0, np.float32), 20) == 0.0
    assert lof_outlier_fraction(np.ones(1, np.float32), 20) == 0.0  # scikit-learn would raise
    assert lof_outlier_fraction(np.full(50, 0.3, np.float32), 20) == 0.0  # all equal: LOF 1 everywhere


# --- both modes on inputs the oracles do not cover ---------------------------------------------


@pytest.mark.parametrize("reference_mode", [False, True])
@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 8, 24])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_grid_gives_a_consistent_nonempty_output(side, seed, reference_mode):
    features = spiky(side, seed)
    out = RC.compress(features, params(reference_mode=reference_mode))
    check_output(features, out)
    again = RC.compress(features, params(reference_mode=reference_mode))
    assert torch.equal(out.tokens, again.tokens) and out.covers == again.covers and out.notes == again.notes


def test_small_grid_clamps_what_the_released_code_crashes_on():
    # 4x4 in reference mode: floor(64 * ratio) centres for 16 patches, and < 32 candidates each.
    out = RC.compress(spiky(4, 0), params(reference_mode=True))
    notes = out.notes
    assert notes["n_vision"] + notes["n_text"] == 0 and notes["n_centres_wanted"] == 16
    assert notes["n_centres"] == 15 and notes["neighbours_per_centre"] == 15 and out.tokens.shape[0] == 16
    check_output(spiky(4, 0), out)


@pytest.mark.parametrize("reference_mode", [False, True])
@pytest.mark.parametrize("side", [2, 4, 24])
def test_uniform_attention_and_text_give_one_leftover_token(side, reference_mode):
    # Nothing stands out: n_v = n_t = L = 0. The released code would return no token at all;
    # here the leftover token, the attention-weighted sum of every patch, stands for the image.
    n, width = side * side, 16
    g = torch.Generator().manual_seed(side)
    x = torch.randn(n, width, generator=g)
    q = torch.randn(1 + n, width, generator=g)
    features = ImageFeatures(
        patch_features=x,
        grid=(side, side),
        last_block_qk=(q, torch.zeros(1 + n, width)),  # every logit 0: attention 1 / (1 + n)
        projected_patches=torch.ones(1 + n, 8),  # every text score equal
        question_embedding=torch.randn(8, generator=g),
    )
    out = RC.compress(features, params(reference_mode=reference_mode))
    notes = out.notes
    assert (notes["n_vision"], notes["n_text"], notes["n_centres"], notes["leftover"]) == (0, 0, 0, True)
    assert out.covers == (tuple(range(n)),)
    torch.testing.assert_close(out.tokens[0], x.sum(0) / (1 + n))
    check_output(features, out)


def test_default_mode_counts_centres_from_the_rest_not_the_width():
    # Quirk 1 on the spiky oracle's own recipe (seed 1, C = 64): 11 of 528 remaining patches are
    # LOF outliers; the released code makes floor(64 * 11/528) = 1 centre of them, the paper 11.
    features = spiky(24, 1, width=64, proj=64, n_keys=24, n_text=30)
    reference = RC.compress(features, params(reference_mode=True))
    default = RC.compress(features, params())
    assert reference.notes["ratio_merge"] == default.notes["ratio_merge"] == 11 / 528
    assert (reference.notes["n_centres"], default.notes["n_centres"]) == (1, 11)
    assert reference.covers[:48] == default.covers[:48]  # the same 48 kept patches
    assert torch.equal(reference.tokens[:48], default.tokens[:48])


def test_default_mode_reads_keys_at_the_patches_own_indices():
    # Quirk 2. Changing the keys of *kept* patches where the CLS query is zero leaves the attention
    # bit for bit unchanged. The default mode reads keys only at the remaining patches, so nothing
    # changes; the released code reads k[1:][j] for positions j within the rest -- kept patches'
    # keys among them -- so its clusters change. (8x8, seed 0: 2 centres in both modes.)
    features = spiky(8, 0, half_query=True)
    _, k = features.last_block_qk
    for reference_mode in (False, True):
        result = RC.analyse(features, params(reference_mode=reference_mode))
        assert result.centres_rel.shape[0] == 2
        moved = k.clone()
        moved[1 + result.kept, 32:] += 10 * torch.randn(
            len(result.kept), 32, generator=torch.Generator().manual_seed(9)
        )
        again = RC.analyse(with_keys(features, moved), params(reference_mode=reference_mode))
        assert torch.equal(again.kept, result.kept) and torch.equal(again.centres_rel, result.centres_rel)
        assert torch.equal(again.tokens, result.tokens) != reference_mode


def test_default_mode_never_keeps_a_patch_twice():
    for seed in range(3):
        result = RC.analyse(spiky(24, seed), params())
        assert len(set(result.kept.tolist())) == result.kept.shape[0]
        assert not set(result.vision.tolist()) & set(result.text.tolist())


def test_half_precision_features_are_scored_in_float32():
    def cast(features, dtype):
        return dataclasses.replace(
            features,
            patch_features=features.patch_features.to(dtype),
            last_block_qk=tuple(t.to(dtype) for t in features.last_block_qk),
            projected_patches=features.projected_patches.to(dtype),
            question_embedding=features.question_embedding.to(dtype),
        )

    half = cast(spiky(8, 3), torch.float16)
    rounded = cast(half, torch.float32)
    out, expected = RC.compress(half, params()), RC.compress(rounded, params())
    assert out.tokens.dtype == torch.float16 and out.covers == expected.covers
    assert torch.equal(out.tokens, expected.tokens.half())


def test_reference_mode_uses_the_last_position_text_embedding_when_given():
    features = spiky(24, 1, width=64, proj=64, n_keys=24, n_text=30)
    last_position = torch.randn(64, generator=torch.Generator().manual_seed(5))
    both = dataclasses.replace(features, question_embedding_last_position=last_position)
    default = RC.compress(both, params())
    assert default.notes["text_embedding"] == "pooled_eot"
    assert torch.equal(default.tokens, RC.compress(features, params()).tokens)
    reference = RC.compress(both, params(reference_mode=True))
    assert reference.notes["text_embedding"] == "last_position"
    only_last = dataclasses.replace(features, question_embedding=last_position)
    assert torch.equal(reference.tokens, RC.compress(only_last, params(reference_mode=True)).tokens)


# --- the plugin surface -------------------------------------------------------------------------


def test_declaration_and_registration():
    assert isinstance(RC, Compressor)
    assert RC.predict_tokens((24, 24), params()) is None
    assert params() == {
        "reference_mode": False,
        "vision_lof_k": 20,
        "text_lof_k": 20,
        "merge_lof_k": 10,
        "text_weight": 50.0,
        "cluster_size": 32,
    }
    with pytest.raises(InvalidRequest, match="cluster_size .* is 0; the minimum is 1"):
        params(cluster_size=0)
    registry = CompressorRegistry()
    text_recovery.squint_register_compressors(registry=registry)
    assert registry.get("text_recovery").cls is TextGuidedRecovery


def test_constants_are_parameters():
    features = spiky(24, 0)
    base = RC.analyse(features, params())
    assert RC.analyse(features, params(cluster_size=4)).clusters_rel.shape[1] == 4
    fewer = RC.analyse(features, params(vision_lof_k=5))
    assert fewer.ratio_vision != base.ratio_vision


def test_missing_or_mismatched_inputs_are_named():
    features = spiky(4, 0)
    with pytest.raises(ValueError, match="needs last_block_qk, projected_patches"):
        RC.compress(
            ImageFeatures(
                patch_features=features.patch_features, grid=(4, 4), question_embedding=features.question_embedding
            ),
            params(),
        )
    q, k = features.last_block_qk
    with pytest.raises(ValueError, match=r"k has shape \(16, 64\); expected \[1 \+ n, \*\] = \[17, \*\]"):
        RC.compress(with_keys(features, k[1:]), params())


def test_a_budget_drops_the_leftover_and_centres_before_kept_patches():
    features = spiky(24, 4, width=1024, proj=64, key_gain=0.08, text_gain=1.0, n_keys=24, n_text=30)
    full = RC.compress(features, params(reference_mode=True))
    n_v, n_t = full.notes["n_vision"], full.notes["n_text"]
    fitted = RC.compress_within(features, params(reference_mode=True), budget=n_v + n_t)
    assert fitted.tokens.shape[0] == n_v + n_t
    torch.testing.assert_close(fitted.tokens, full.tokens[: n_v + n_t])
    tiny = RC.compress_within(features, params(reference_mode=True), budget=5)
    assert tiny.tokens.shape[0] == 5 and tiny.notes["dropped_for_budget"] == full.tokens.shape[0] - 5
    # Within budget nothing changes.
    same = RC.compress_within(features, params(), budget=10_000)
    torch.testing.assert_close(same.tokens, RC.compress(features, params()).tokens)
