from dataclasses import dataclass, field
from pathlib import Path

import pytest

from squint.config import SettingsError, env_table, load_settings


@dataclass(frozen=True)
class Inner:
    port: int = 1
    hosts: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    ratio: float = 0.5
    enabled: bool = True
    folder: Path = Path("p")
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_without_env():
    assert load_settings(Outer, "T_", env={}) == Outer()


def test_env_fills_nested_fields_by_prefix():
    env = {
        "T_NAME": "n",
        "T_RATIO": "0.25",
        "T_ENABLED": "off",
        "T_FOLDER": "/tmp/f",
        "T_INNER_PORT": "9",
        "T_INNER_HOSTS": "a:1, b:2",
    }
    settings = load_settings(Outer, "T_", env=env)
    assert settings == Outer("n", 0.25, False, Path("/tmp/f"), None, Inner(9, ("a:1", "b:2")))


def test_overrides_win_over_env_and_none_means_not_given():
    settings = load_settings(Outer, "T_", env={"T_INNER_PORT": "9"}, overrides={"inner.port": 7, "name": None})
    assert settings.inner.port == 7 and settings.name == "x"


def test_bad_value_names_the_variable():
    with pytest.raises(SettingsError, match="T_INNER_PORT='many'"):
        load_settings(Outer, "T_", env={"T_INNER_PORT": "many"})


def test_unknown_override_is_refused():
    with pytest.raises(TypeError, match="inner.nope"):
        load_settings(Outer, "T_", env={}, overrides={"inner.nope": 1})


@dataclass(frozen=True)
class WithNestedDefault:
    inner: Inner = field(default_factory=lambda: Inner(port=50061))


def test_a_parents_nested_default_is_kept():
    assert load_settings(WithNestedDefault, "W_", env={}).inner.port == 50061
    assert load_settings(WithNestedDefault, "W_", env={"W_INNER_HOSTS": "b"}).inner == Inner(50061, ("b",))
    [port, _hosts] = env_table(WithNestedDefault, "W_")
    assert (port.name, port.default) == ("W_INNER_PORT", "50061")


def test_env_table_lists_every_leaf_field():
    names = [row.name for row in env_table(Outer, "T_")]
    assert names == ["T_NAME", "T_RATIO", "T_ENABLED", "T_FOLDER", "T_MAYBE", "T_INNER_PORT", "T_INNER_HOSTS"]
