"""The compression table's comparison of a router with fixed levels at the same shares of images."""
from __future__ import annotations

import pytest

from vtr.tools.compression_fidelity import at_fixed_shares

FIXED = {1: {"accuracy": 0.9, "tokens": 64.0}, 2: {"accuracy": 0.6, "tokens": 16.0},
         4: {"accuracy": 0.3, "tokens": 4.0}}


def test_fixed_levels_at_a_routers_shares_weigh_each_level_by_its_images():
    routed = {"levels": {1: 0.333, 4: 0.667},               # rounded: the counts by type are exact
              "levels_by_type": {"colour": {1: 1, 4: 1}, "count": {1: 0, 4: 1}}}
    mix = at_fixed_shares(routed, FIXED)
    assert mix["accuracy"] == pytest.approx(0.9 / 3 + 0.3 * 2 / 3, abs=1e-12)
    assert mix["tokens"] == pytest.approx(64 / 3 + 4 * 2 / 3, abs=1e-12)


def test_a_level_without_a_fixed_row_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no fixed-level row for level\(s\) \[8\]"):
        at_fixed_shares({"levels_by_type": {"colour": {8: 2}}}, FIXED)
