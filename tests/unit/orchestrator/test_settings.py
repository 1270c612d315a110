"""The orchestrator's settings object: values out of range are refused when the process starts."""

from __future__ import annotations

import re

import pytest

from orchestrator.settings import orchestrator_settings
from squint.config import SettingsError


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("BUDGET_FLOOR_SHARE", "1.5", "BUDGET_FLOOR_SHARE is 1.5; it must be in [0, 1]"),
        ("ALLOCATION_POLICY", "greedy", "ALLOCATION_POLICY is 'greedy'"),
        ("DEDUP_THRESHOLD", "-2", "DEDUP_THRESHOLD is -2.0"),
        ("PIXEL_DEDUP_THRESHOLD", "-0.1", "PIXEL_DEDUP_THRESHOLD is -0.1"),
    ],
)
def test_settings_out_of_range_are_refused_at_start_up_naming_the_variable(name, value, named):
    with pytest.raises(SettingsError, match=re.escape(f"SQUINT_ORCHESTRATOR_{named}")):
        orchestrator_settings(env={f"SQUINT_ORCHESTRATOR_{name}": value})
    assert orchestrator_settings(env={"SQUINT_ORCHESTRATOR_BUDGET_FLOOR_SHARE": "0.25"}).budget_floor_share == 0.25
