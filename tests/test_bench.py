"""The benchmark harness: a tiny CPU run of every mode writes comparable records; bad options are user errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from functions.errors import UserError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_sfl  # noqa: E402

TINY = ["--device", "cpu", "--threads", "1", "--arch", "ResNet18", "--width", "4", "--per_client_batch", "2",
        "--steps", "1", "--warmup", "1", "--repeats", "2"]
KEYS = {"method", "mode", "device", "clients", "sampled_clients", "per_client_batch", "cutlayer", "amp", "engine",
        "images_per_sec", "step_ms", "peak_mem_mb", "peak_mem_kind", "first_loss"}


@pytest.mark.parametrize("method", ["moco", "swav"])
def test_a_tiny_cpu_run_records_every_mode_with_the_same_first_loss(tmp_path, method):
    path = tmp_path / "bench.json"
    returned = bench_sfl.main([*TINY, "--method", method, "--clients", "5", "--sampled_clients", "3",
                               "--cutlayer", "1", "2", "--json", str(path)])
    records = json.loads(path.read_text())
    assert records == json.loads(json.dumps(returned))
    assert [(r["mode"], r["cutlayer"]) for r in records] == [
        ("centralised", None), ("loop", 1), ("vmap", 1), ("loop", 2), ("vmap", 2)]
    for record in records:
        assert KEYS <= record.keys()
        assert (record["method"], record["device"], record["clients"], record["sampled_clients"]) == (method, "cpu", 5, 3)
        assert record["per_client_batch"] == 2 and record["amp"] is False
        assert record["images_per_sec"] > 0 and record["step_ms"] > 0 and len(record["step_ms_all"]) == 2
        assert record["peak_mem_mb"] >= 0 and record["peak_mem_kind"] == "cpu_peak_rss_increase"
        assert record["cpu_step_ms"] > 0
        assert record["images_per_sec"] == pytest.approx(3 * 2 * 1000.0 / record["step_ms"])
    assert [r["engine"] for r in records] == [None, None, "grouped", None, "grouped"]
    # Same initial weights and data: the first step's loss is the same whichever way the step is computed.
    first = records[0]["first_loss"]
    assert all(r["first_loss"] == pytest.approx(first, rel=1e-5) for r in records)


def test_client_only_times_loop_and_vmap_on_the_same_smashed_data(tmp_path):
    records = bench_sfl.main([*TINY, "--clients", "4", "--cutlayer", "2", "--client_only"])
    assert [(r["mode"], r["client_only"]) for r in records] == [("loop", True), ("vmap", True)]
    assert records[1]["first_loss"] == pytest.approx(records[0]["first_loss"], rel=1e-5)
    with pytest.raises(UserError, match="--client_only"):
        bench_sfl.parse_options(["--device", "cpu", "--client_only", "--modes", "centralised", "vmap"])


def test_the_default_pool_is_at_most_a_hundred_clients():
    options = bench_sfl.parse_options(["--device", "cpu", "--clients", "7", "150", "--modes", "loop"])
    assert [(s.clients, s.sampled_clients) for s in bench_sfl.settings_of(options)] == [(7, 7), (150, 100)]


@pytest.mark.parametrize("argv, message", [
    (["--clients", "4", "--sampled_clients", "5"], "--sampled_clients"),
    (["--cutlayer", "12"], "--cutlayer 12"),
    (["--steps", "0"], "--steps"),
    (["--device", "tpu"], "--device"),
])
def test_impossible_options_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        bench_sfl.parse_options(["--device", "cpu", *argv] if "--device" not in argv else argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_the_script_exits_with_one_line_when_cuda_is_missing():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_sfl.py"), "--device", "cuda"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device cuda: CUDA is not available here; use --device cpu"]
