"""benchmarks/peer_mocosfl.py without a MocoSFL checkout: its options, settings and table."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT
from functions.errors import UserError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import peer_mocosfl  # noqa: E402


def test_a_folder_that_is_not_a_mocosfl_checkout_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match="is not a MocoSFL checkout .no run_sflmoco.py"):
        peer_mocosfl.main(["--peer_dir", str(tmp_path)])


@pytest.mark.parametrize("text, expected", [("100x1", (100, 1)), ("10X8", (10, 8))])
def test_settings_are_clients_by_images_per_client(text, expected) -> None:
    assert peer_mocosfl.parse_setting(text) == expected


@pytest.mark.parametrize("text", ["100", "ax1", "0x4"])
def test_a_bad_setting_is_refused(text) -> None:
    with pytest.raises(UserError, match="--settings"):
        peer_mocosfl.parse_setting(text)


def test_the_table_has_a_row_per_setting_and_a_column_per_side() -> None:
    records = [
        {"side": "mocosfl", "clients": 100, "per_client_batch": 1, "step_ms": 4018.4, "spread_pct": 3.2,
         "busy_machine": False},
        {"side": "loop", "clients": 100, "per_client_batch": 1, "step_ms": 3900.0, "spread_pct": 5.0,
         "busy_machine": True},
    ]
    table = peer_mocosfl.format_table(records, ["mocosfl", "loop", "vmap"]).splitlines()
    assert table[0] == "| setting | mocosfl | loop | vmap |"
    assert table[2] == "| 100 clients x 1 | 4,018 (3 %) | 3,900 (5 %) BUSY | - |"
