"""Each optional capability is defined once (its Protocol in CAPABILITIES) and is all or nothing:
the registry and the kit refuse a class with part of one, naming what is missing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch

from compressor_plugins.protocol import (
    CAPABILITIES,
    Calibrates,
    Calibration,
    CompressedImage,
    CompressorInput,
    FitsBudget,
    ImageFeatures,
    IncompleteCapability,
    LoadsWeights,
    OutputSpace,
    ParamSpec,
    capabilities_of,
)
from compressor_plugins.registry import (
    CompressorRegistry,
    PluginLoadError,
    PluginSettings,
    describe,
    load_compressors,
)
from compressor_plugins.testing import CompressorConformance, ConformanceError, check_compressor


class KeepFirst:
    """A plugin as docs/plugins.md describes one: keeps the first ``keep`` patches."""

    name: ClassVar[str] = "keep_first"
    summary: ClassVar[str] = "the first patches, in raster order"
    params: ClassVar[tuple[ParamSpec, ...]] = (ParamSpec("keep", int, 64, minimum=1, maximum=100_000),)
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.PATCH_FEATURES})
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        return min(params["keep"], grid[0] * grid[1])

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        return self._first(features, self.predict_tokens(features.grid, params))

    @staticmethod
    def _first(features: ImageFeatures, m: int) -> CompressedImage:
        return CompressedImage(tokens=features.patch_features[:m], covers=tuple((i,) for i in range(m)))


class BudgetWithoutLevels(KeepFirst):
    """The budget capability as the old docs named it: compress_within alone."""

    name: ClassVar[str] = "budget_without_levels"

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        return self._first(features, min(budget, self.predict_tokens(features.grid, params)))


class FitsBudgetInFull(BudgetWithoutLevels):
    name: ClassVar[str] = "fits_budget_in_full"
    calls: ClassVar[list[int]] = []

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        FitsBudgetInFull.calls.append(budget)
        return super().compress_within(features, params, budget)

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        return tuple(range(natural, 0, -1))


class CalibratesWithoutLoading(KeepFirst):
    name: ClassVar[str] = "calibrates_without_loading"
    calibration_params: ClassVar[tuple[ParamSpec, ...]] = ()

    def calibrate(self, samples, params) -> Calibration:
        return Calibration(data={})


def registered(cls: type) -> CompressorRegistry:
    registry = CompressorRegistry()
    registry._source = ("third_party", "third-party", "1.0")
    registry.register(cls)
    return registry


def test_compress_within_without_token_levels_is_refused_at_registration_naming_the_missing_method():
    message = (
        "plugin 'third_party': compressor 'budget_without_levels' has compress_within but not token_levels: "
        "a budget-fitting compressor needs both"
    )
    with pytest.raises(PluginLoadError, match=message):
        registered(BudgetWithoutLevels)


def test_the_kit_refuses_it_too_rather_than_skipping_the_budget_checks():
    with pytest.raises(ConformanceError, match="has compress_within but not token_levels"):
        check_compressor(BudgetWithoutLevels(), ({},))


class TestHalfACapabilityFailsTheSuite(CompressorConformance):
    compressor_class = BudgetWithoutLevels

    def test_declaration(self, compressor):
        with pytest.raises(PluginLoadError, match="but not token_levels"):
            super().test_declaration(compressor)

    def test_contract(self, compressor):
        with pytest.raises(ConformanceError, match="but not token_levels"):
            super().test_contract(compressor)


def test_a_calibration_without_load_calibration_is_refused_naming_it():
    with pytest.raises(
        PluginLoadError,
        match="has calibration_params, calibrate but not load_calibration: "
        "a calibrated compressor needs all of calibration_params, calibrate, load_calibration",
    ):
        registered(CalibratesWithoutLoading)


def test_with_both_methods_it_is_listed_as_fitting_and_the_kit_calls_compress_within():
    registry = registered(FitsBudgetInFull)
    [info] = describe(registry)
    assert info["capabilities"] == ["fits_budget"] and info["calibration_params"] == []
    assert isinstance(FitsBudgetInFull(), FitsBudget)
    FitsBudgetInFull.calls.clear()
    check_compressor(FitsBudgetInFull(), ({}, {"keep": 10}))
    assert 32 in FitsBudgetInFull.calls  # half of its 64 tokens: the kit's budget check ran
    assert 5 in FitsBudgetInFull.calls  # and a level token_levels offered for keep=10


class TestFullCapabilityPassesTheSuite(CompressorConformance):
    compressor_class = FitsBudgetInFull
    param_cases = ({}, {"keep": 3})


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: c.name)
def test_the_table_and_the_protocol_agree_member_by_member(capability):
    def stub(members):
        namespace = {"name": "stub"}
        for member in members:
            namespace[member] = () if member in capability.attributes else (lambda self, *args: None)
        return type("Stub", (), namespace)

    full = stub(capability.members)
    assert isinstance(full(), capability.protocol) and capability in capabilities_of(full)
    for missing in capability.members:
        partial = stub([m for m in capability.members if m != missing])
        assert not isinstance(partial(), capability.protocol)
        if len(capability.members) > 1:
            with pytest.raises(IncompleteCapability, match=f"but not {missing}:"):
                capabilities_of(partial)


def test_the_builtins_declare_what_they_implement():
    capabilities = {info["name"]: info["capabilities"] for info in describe(load_compressors(PluginSettings()))}
    assert capabilities["dfmr"] == ["calibrates", "fits_budget"]
    assert capabilities["stf"] == ["loads_weights"]
    assert capabilities["avgpool"] == capabilities["text_recovery"] == ["fits_budget"]
    assert capabilities["none"] == []
    assert [c.protocol for c in CAPABILITIES] == [FitsBudget, LoadsWeights, Calibrates]


def test_the_kit_refuses_calibration_data_that_is_not_json():
    class TensorCalibration(KeepFirst):
        name: ClassVar[str] = "tensor_calibration"
        calibration_params: ClassVar[tuple[ParamSpec, ...]] = ()

        def calibrate(self, samples, params) -> Calibration:
            return Calibration(data={"mean": torch.stack([s.patch_features.mean() for s in samples])})

        def load_calibration(self, data) -> None:
            pass

    with pytest.raises(ConformanceError, match="calibration data is not plain JSON"):
        check_compressor(TensorCalibration(), ({},))
