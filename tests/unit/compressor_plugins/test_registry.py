import pytest

from compressor_plugins.protocol import ParamSpec, resolve_params
from compressor_plugins.registry import PluginLoadError, PluginSettings, load_compressors
from squint.errors import CompressorNotFound, InvalidRequest


def test_builtins_register_through_the_hook():
    registry = load_compressors(PluginSettings())
    assert {"none", "avgpool", "dfmr", "staged_pool"} <= set(registry.names())
    entry = registry.get("avgpool")
    assert entry.plugin == "builtin.avgpool" and entry.distribution == "squint"


def test_denied_builtin_is_not_registered():
    registry = load_compressors(PluginSettings(deny=("builtin.avgpool",)))
    assert "avgpool" not in registry.names()


def test_unknown_compressor_lists_the_known_ones():
    registry = load_compressors(PluginSettings())
    with pytest.raises(
        CompressorNotFound, match=r"'pruner' is not registered; available: avgpool, dfmr, none"
    ) as raised:
        registry.get("pruner")
    assert raised.value.message.endswith(", ".join(registry.names()))


def test_duplicate_name_names_both_plugins():
    registry = load_compressors(PluginSettings())
    registry._source = ("other", "other-dist", "1.0")
    with pytest.raises(PluginLoadError, match=r"registered twice: by plugin 'builtin.none' .* and by plugin 'other'"):
        registry.register(registry.get("none").cls)


def test_params_are_validated_and_completed():
    avgpool = load_compressors(PluginSettings()).get("avgpool").cls
    assert resolve_params(avgpool, {}) == {"stride": 2}
    assert resolve_params(avgpool, {"stride": 3.0}) == {"stride": 3}  # JSON numbers arrive as floats
    with pytest.raises(InvalidRequest, match=r"compressor.params.stride .* is 0; the minimum is 1"):
        resolve_params(avgpool, {"stride": 0})
    with pytest.raises(InvalidRequest, match="must be a whole number"):
        resolve_params(avgpool, {"stride": 2.5})
    with pytest.raises(
        InvalidRequest, match="compressor.params.strid is not a parameter of compressor 'avgpool'; it accepts stride"
    ):
        resolve_params(avgpool, {"strid": 2})


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (ParamSpec("flag", bool, False), 1, "must be true or false"),
        (ParamSpec("mode", str, "a", choices=("a", "b")), "c", "must be one of a, b"),
        (ParamSpec("tau", float, 0.05, maximum=1.0), 2.0, "the maximum is 1"),
        (ParamSpec("tau", float, 0.05), float("nan"), "must be finite"),
    ],
)
def test_param_spec_messages(spec, value, message):
    with pytest.raises(InvalidRequest, match=message):
        spec.coerce("x", value)
