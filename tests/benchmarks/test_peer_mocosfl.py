"""benchmarks/peer_mocosfl.py without a MocoSFL checkout: its options, settings and table."""
from __future__ import annotations

import sys

import pytest
from paths import REPO_ROOT

from functions.core.errors import UserError

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


def test_the_speed_over_mocosfl_is_the_median_of_the_rounds_ratios() -> None:
    # The machine slowed down in rounds 3-4 for both sides; each ratio compares two rounds timed next to each other.
    records = [
        {"side": "mocosfl", "clients": 10, "per_client_batch": 8, "step_ms": 1100.0, "spread_pct": 90.0,
         "busy_machine": False, "step_ms_all": [1000.0, 1100.0, 2000.0, 2100.0, 1000.0]},
        {"side": "auto", "clients": 10, "per_client_batch": 8, "step_ms": 1000.0, "spread_pct": 100.0,
         "busy_machine": False, "step_ms_all": [800.0, 1000.0, 1600.0, 2100.0, 1000.0]},
    ]
    peer_mocosfl.add_speed_over_peer(records)
    assert "speed_over_mocosfl" not in records[0]
    assert records[1]["speed_over_mocosfl"] == pytest.approx(1.1)  # ratios 1.25, 1.1, 1.25, 1.0, 1.0
    assert records[1]["speed_over_mocosfl_range"] == pytest.approx([1.0, 1.25])
    table = peer_mocosfl.format_table(records, ["mocosfl", "auto"]).splitlines()
    assert table[2] == "| 10 clients x 8 | 1,100 (90 %) | 1,000 (100 %), 1.10x [1.00-1.25] |"


# The shape of MocoSFL's models/resnet.py that the width patch relies on: GroupNorm stem and block classes whose
# constructors call super(Class, self) by the module-level name, and 64-based channel counts from make_layers.
FAKE_RESNET = '''
import torch.nn as nn

class conv3x3_gn(nn.Module):
    def __init__(self, in_planes, planes, input_size=32):
        super(conv3x3_gn, self).__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.bn1 = nn.GroupNorm(max(planes // 4, 1), planes)

class BasicBlock_gn(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, residual=True, WS=True):
        super(BasicBlock_gn, self).__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.GroupNorm(max(planes // 4, 1), planes)

def make_layers():
    return [conv3x3_gn(3, 64), BasicBlock_gn(64, 64), BasicBlock_gn(64, 128, 2)]
'''


def _fake_resnet(tmp_path, name):
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(FAKE_RESNET)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("width, expected", [(16, [(3, 16, 4), (16, 16, 4), (16, 32, 8)]),
                                             (64, [(3, 64, 16), (64, 64, 16), (64, 128, 32)])])
def test_the_peer_model_is_built_at_the_asked_width(tmp_path, width, expected) -> None:
    module = _fake_resnet(tmp_path, f"fake_resnet_{width}")
    peer_mocosfl.scale_peer_width(module, width)
    layers = module.make_layers()
    assert [(layer.conv1.in_channels, layer.conv1.out_channels, layer.bn1.num_groups) for layer in layers] == expected
