"""The benchmark harness: a tiny CPU run of every mode writes comparable records; bad options are user errors."""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys

import pytest
import torch
from paths import REPO_ROOT

from functions.core.errors import UserError

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
    options = bench_sfl.parse_options(["--device", "cpu", "--clients", "7", "150", "--modes", "loop", "--cutlayer", "1"])
    assert [(s.clients, s.sampled_clients) for s in bench_sfl.settings_of(options)] == [(7, 7), (150, 100)]


def test_the_defaults_cover_the_issue_grid_of_clients_cuts_and_modes():
    options = bench_sfl.parse_options(["--device", "cpu"])
    settings = bench_sfl.settings_of(options)
    assert {(s.clients, s.sampled_clients) for s in settings} == {(10, 10), (100, 100), (1000, 100)}
    assert {(s.mode, s.cutlayer) for s in settings} == {("centralised", None), ("loop", 1), ("vmap", 1), ("loop", 2),
                                                         ("vmap", 2)}


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


# ------------------------------------------------------------------------------------------------ data mode
DATA_TINY = ["--device", "cpu", "--threads", "1", "--modes", "data", "--clients", "4", "--sampled_clients", "3",
             "--per_client_batch", "2", "--data_images_per_client", "8", "--steps", "2", "--warmup", "1",
             "--repeats", "2"]


def expected_crop_sizes(method: str) -> list[int]:
    """The crop sizes the method's options ask for, one per crop in order."""
    if method == "moco":
        return [32, 32]
    args = bench_sfl.method_args("swav", 0)
    return [size for count, size in zip(args.nmb_crops, args.size_crops) for _ in range(count)]


def check_data_record(record: dict, method: str, loader: str) -> None:
    """A data record of DATA_TINY: the pool's rows every step, the method's crops, step-record conventions."""
    assert (record["method"], record["mode"], record["loader"], record["device"]) == (method, "data", loader, "cpu")
    assert (record["clients"], record["sampled_clients"], record["per_client_batch"]) == (4, 3, 2)
    assert record["rows_per_step"] == 3 * 2 and record["global_batch"] == 3 * 2
    assert record["crop_sizes"] == expected_crop_sizes(method)
    assert record["cutlayer"] is None and record["amp"] is False and record["engine"] is None
    assert record["images_per_client"] == 8
    assert len(record["step_ms_all"]) == 2 and record["step_ms"] > 0
    assert record["images_per_sec"] == pytest.approx(3 * 2 * 1000.0 / record["step_ms"])
    assert record["peak_mem_mb"] >= 0 and record["peak_mem_kind"] == "cpu_peak_rss_increase"


def table_row(output: str, mode_label: str) -> list[str]:
    """The cells of the one printed table row whose mode column is `mode_label`."""
    rows = [line.split() for line in output.splitlines() if line.split()[1:2] == [mode_label]]
    assert len(rows) == 1, output
    return rows[0]


def test_the_data_mode_times_the_torch_loader_on_synthetic_images(tmp_path, capsys):
    path = tmp_path / "bench.json"
    returned = bench_sfl.main([*DATA_TINY, "--loaders", "torch", "--data_dir", str(tmp_path), "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(returned))
    [record] = returned
    check_data_record(record, "moco", "torch")
    assert record["num_workers"] == 0 and record["dali_threads"] is None and record["cpu_step_ms"] > 0
    assert record["data_source"] == "synthetic"  # tmp_path holds no CIFAR-10
    output = capsys.readouterr().out
    row = table_row(output, "data:torch")
    # method mode device clients pool batch global cut amp img/s ms/step cpu-ms peak-MB x-loop
    assert row[:9] == ["moco", "data:torch", "cpu", "4", "3", "2", "6", "-", "no"]
    assert float(row[9]) == pytest.approx(record["images_per_sec"], abs=0.1) and row[-1] == "-"
    assert "data: synthetic" in output


def test_the_data_mode_times_dali_on_cpu_next_to_the_step_modes(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    records = bench_sfl.main([*DATA_TINY, "--method", "swav", "--modes", "loop", "data", "--cutlayer", "1",
                              "--width", "4", "--data_dir", str(tmp_path)])
    # Step modes first, then per client count every loader (default: torch and DALI, on CPU operators here).
    assert [(r["mode"], r.get("loader")) for r in records] == [("loop", None), ("data", "torch"), ("data", "dali-cpu")]
    check_data_record(records[1], "swav", "torch")
    check_data_record(records[2], "swav", "dali-cpu")
    assert records[2]["dali_threads"] == 2 and records[2]["num_workers"] is None
    output = capsys.readouterr().out
    assert table_row(output, "data:dali-cpu")[-1] == "-" and table_row(output, "loop")[-1] == "1.00"


def test_the_data_mode_reads_real_images_when_there_are_enough(cifar10_mini_dir):
    [record] = bench_sfl.main([*DATA_TINY, "--loaders", "torch", "--data_dir", str(cifar10_mini_dir)])
    assert record["data_source"] == "cifar10"
    # More images than the folder holds: synthetic ones, and the source says why.
    from benchmarks.bench_loaders import load_images
    from functions.data.datasets import load_dataset

    available = load_dataset("cifar10", cifar10_mini_dir, download=False).train_images.shape[0]
    short = load_images(str(cifar10_mini_dir), available + 1, synthetic_when_short=True)
    assert short.train_images.shape == (available + 1, 32, 32, 3)
    assert short.source.startswith("synthetic (") and f"holds {available} training images" in short.source
    with pytest.raises(UserError, match="fewer than"):
        load_images(str(cifar10_mini_dir), available + 1)


def test_dali_is_skipped_with_a_note_unless_asked_for(monkeypatch):
    monkeypatch.setattr(bench_sfl, "dali_import_error", lambda: "No module named 'nvidia'")
    options = bench_sfl.parse_options(["--device", "cpu", "--modes", "data"])
    assert options.loader_names == ["torch"]
    assert len(options.notes) == 1 and "DALI" in options.notes[0] and "No module named" in options.notes[0]
    with pytest.raises(UserError, match="--loaders dali needs NVIDIA DALI"):
        bench_sfl.parse_options(["--device", "cpu", "--modes", "data", "--loaders", "torch", "dali"])


def test_the_data_mode_is_measured_only_when_asked():
    assert bench_sfl.parse_options(["--device", "cpu"]).modes == ["centralised", "loop", "vmap"]
    options = bench_sfl.parse_options(["--device", "cpu", "--modes", "data", "--loaders", "torch"])
    assert bench_sfl.settings_of(options) == [] and options.loader_names == ["torch"]
    with pytest.raises(UserError, match="--num_workers"):
        bench_sfl.parse_options(["--device", "cpu", "--modes", "data", "--num_workers", "-1"])


# ------------------------------------------------------------------------------------------- largest batch
def counting(threshold: int) -> tuple[list[int], object]:
    """A monotone predicate n <= threshold and the list of the values it was asked about."""
    asked: list[int] = []

    def fits(n: int) -> bool:
        asked.append(n)
        return n <= threshold

    return asked, fits


def test_largest_fitting_finds_every_threshold_of_a_monotone_predicate():
    for start in range(1, 6):
        for limit in range(start, 41):
            for threshold in range(0, 46):
                asked, fits = counting(threshold)
                expected = min(threshold, limit) if threshold >= start else 0
                assert bench_sfl.largest_fitting(fits, start, limit) == expected, (start, limit, threshold)
                assert all(start <= n <= limit for n in asked)


@pytest.mark.parametrize("threshold", [1, 2, 3, 1000, 2047, 2048, 4095, 4096, 10**6])
def test_largest_fitting_asks_a_logarithmic_number_of_times(threshold):
    asked, fits = counting(threshold)
    assert bench_sfl.largest_fitting(fits, 1, 4096) == min(threshold, 4096)
    assert len(asked) <= 2 * 12 + 1  # 12 doublings reach 4096, then at most 12 bisection steps
    assert len(set(asked)) == len(asked)  # no size is tried twice


def test_largest_fitting_edge_cases():
    asked, fits = counting(0)
    assert bench_sfl.largest_fitting(fits, 4, 64) == 0 and asked == [4]  # the start does not fit: one try
    asked, fits = counting(100)
    assert bench_sfl.largest_fitting(fits, 4, 64) == 64 and asked == [4, 8, 16, 32, 64]  # the limit fits
    asked, fits = counting(100)
    assert bench_sfl.largest_fitting(fits, 5, 5) == 5 and asked == [5]
    with pytest.raises(ValueError):
        bench_sfl.largest_fitting(fits, 8, 4)


class FakeStep:
    """A step that counts its calls and runs out of memory at call number `fail_at` (never when None)."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(())


@pytest.mark.parametrize("fail_at, fits", [(None, True), (1, False), (3, False), (4, True)])
def test_step_fits_is_false_exactly_when_a_step_runs_out_of_memory(monkeypatch, fail_at, fits):
    import gc
    import types
    import weakref

    built: list[weakref.ref] = []
    alive_at_collection: list[bool] = []

    def build() -> FakeStep:
        step = FakeStep(fail_at)
        built.append(weakref.ref(step))
        return step

    def collect() -> int:
        found = gc.collect()
        alive_at_collection.append(built[0]() is not None)
        return found

    # The step (model, optimizer, activations) must be unreachable when the search collects garbage.
    monkeypatch.setattr(bench_sfl, "gc", types.SimpleNamespace(collect=collect))
    # Two warm-up steps and one more: calls 1 to 3; a failure at call 4 would need a fourth step.
    assert bench_sfl.step_fits(build, 2, torch.device("cpu")) is fits
    assert len(built) == 1 and alive_at_collection == [False]


def test_step_fits_lets_other_errors_through_and_oom_while_building_is_a_miss():
    def out_of_memory() -> FakeStep:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert bench_sfl.step_fits(out_of_memory, 1, torch.device("cpu")) is False

    def unsupported_size() -> FakeStep:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    assert bench_sfl.step_fits(unsupported_size, 1, torch.device("cpu")) is False

    def broken() -> FakeStep:
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        bench_sfl.step_fits(broken, 1, torch.device("cpu"))


def tiny_setting(per_client_batch: int) -> "bench_sfl.Setting":
    """A loop setting small enough for CPU: 4 clients, 3 in the pool, width 4, cut 1."""
    return bench_sfl.Setting(method="moco", mode="loop", device="cpu", clients=4, sampled_clients=3,
                             per_client_batch=per_client_batch, cutlayer=1, amp=False, arch="ResNet18", width=4,
                             engine=None)


def test_the_batch_search_measures_the_largest_batch_before_memory_runs_out(monkeypatch, capsys):
    real_build_step = bench_sfl.build_step
    tried: list[int] = []

    def build_step_with_3_rows_of_memory(setting, device, seed):
        tried.append(setting.per_client_batch)
        if setting.per_client_batch > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_build_step(setting, device, seed)

    monkeypatch.setattr(bench_sfl, "build_step", build_step_with_3_rows_of_memory)
    record = bench_sfl.max_batch_record(tiny_setting(1), torch.device("cpu"), limit=16, steps=1, warmup=1, repeats=1,
                                        seed=0)
    assert max(tried) == 4 and tried[-1] == 3  # 4 was tried and missed; the record is measured at 3
    assert (record["per_client_batch"], record["global_batch"], record["max_batch_search"]) == (3, 9, True)
    assert record["max_batch_limit"] == 16
    assert record["images_per_sec"] == pytest.approx(9 * 1000.0 / record["step_ms"])

    def never_fits(setting, device, seed):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_sfl, "build_step", never_fits)
    none = bench_sfl.max_batch_record(tiny_setting(2), torch.device("cpu"), limit=16, steps=1, warmup=1, repeats=1,
                                      seed=0)
    assert (none["per_client_batch"], none["global_batch"], none["images_per_sec"]) == (0, 0, None)
    table = bench_sfl.format_table([record, none])
    cells = [line.split() for line in table.splitlines()[2:]]
    assert [row[1] for row in cells] == ["max:loop", "max:loop"]
    assert cells[0][5:7] == ["3", "9"] and cells[0][-1] == "1.00"
    assert cells[1][5:7] == ["0", "0"] and cells[1][9:] == ["-"] * 7


def test_the_batch_search_needs_cuda():
    with pytest.raises(UserError, match="^--find_max_batch needs a CUDA device"):
        bench_sfl.parse_options(["--device", "cpu", "--find_max_batch"])


def test_channels_last_and_compile_reach_the_measured_step(tmp_path, monkeypatch):
    compiled, layouts = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(type(module).__name__))
    from functions.sfl.clients.loop import ClientSide
    from functions.sfl.clients.vmap import VectorisedClientSide

    for side in (ClientSide, VectorisedClientSide):
        original = side.__init__

        def recording_init(self, *args, _original=original, **kwargs):
            layouts.append(kwargs["memory_format"])
            _original(self, *args, **kwargs)

        monkeypatch.setattr(side, "__init__", recording_init)
    records = bench_sfl.main([*TINY, "--clients", "3", "--cutlayer", "2", "--channels_last", "--compile"])
    assert [(r["mode"], r["channels_last"], r["compile"]) for r in records] == [
        ("centralised", True, True), ("loop", True, True), ("vmap", True, True)]
    assert len(compiled) == 3  # the server part of every mode (the whole network for the centralised step)
    assert layouts == [torch.channels_last, torch.channels_last]
    assert all(r["first_loss"] == pytest.approx(records[0]["first_loss"], rel=1e-5) for r in records)
    assert "vmap:grouped+nhwc+compile" in bench_sfl.format_table(records)


def test_a_method_preset_sets_the_crops_and_prototypes_of_the_step(tmp_path):
    assert bench_sfl.method_args("swav", 0, str(REPO_ROOT / "configs" / "swav_seed.yaml")).size_crops == [224, 96]
    preset = tmp_path / "tiny_swav.yaml"
    preset.write_text("nmb_crops: [2, 1]\nsize_crops: [16, 8]\nmin_scale_crops: [0.2, 0.05]\n"
                      "max_scale_crops: [1.0, 0.2]\nnmb_prototypes: 5\nfreeze_prototypes_niters: 0\n")
    options = [*TINY, "--method", "swav", "--clients", "3", "--modes", "vmap", "data", "--loaders", "torch"]
    default = bench_sfl.main(options)
    small = bench_sfl.main([*options, "--method_config", str(preset)])
    assert small[0]["method_config"] == str(preset) and default[0]["method_config"] is None
    assert [r["crop_sizes"] for r in small if r["mode"] == "data"] == [[16, 16, 8]]
    # At initialisation the swapped prediction is near ln K: ln 5 = 1.6 here, ln 300 = 5.7 with the defaults.
    assert small[0]["first_loss"] < 3.0 < default[0]["first_loss"]


def test_every_benchmark_call_of_the_gpu_script_uses_existing_options():
    import shlex

    script = (REPO_ROOT / "benchmarks" / "gpu_tables.sh").read_text().replace("\\\n", " ")
    calls = [line.strip() for line in script.splitlines() if line.strip().startswith("bench ")]
    assert len(calls) >= 8
    for call in calls:
        words = shlex.split(call.removesuffix(";;").replace("$method", "moco").replace("${method}", "moco"))[2:]
        bench_sfl.build_parser().parse_args(words)  # an unknown or misspelt option exits here
        assert all(not word.startswith("$") for word in words), call


def test_cudnn_benchmark_is_recorded_and_restored():
    assert torch.backends.cudnn.benchmark is False
    records = bench_sfl.main([*TINY, "--clients", "3", "--cutlayer", "1", "--modes", "vmap", "--cudnn_benchmark"])
    assert [r["cudnn_benchmark"] for r in records] == [True]
    assert torch.backends.cudnn.benchmark is False
    assert bench_sfl.main([*TINY, "--clients", "3", "--cutlayer", "1", "--modes", "vmap"])[0]["cudnn_benchmark"] is False


def test_the_modes_of_a_client_count_are_timed_in_turns(monkeypatch):
    order = []
    real_timed_seconds = bench_sfl.timed_seconds

    def recording(step, steps, device):
        order.append(step)
        return real_timed_seconds(step, steps, device)

    monkeypatch.setattr(bench_sfl, "timed_seconds", recording)
    # Stand-in steps (the order is what matters here; real steps are timed by the tests above).
    monkeypatch.setattr(bench_sfl, "build_step", lambda setting, device, seed: (lambda: torch.zeros(()), None))
    settings = [dataclasses.replace(tiny_setting(1), cutlayer=cutlayer) for cutlayer in (1, 2)]
    records = bench_sfl.measure_interleaved(settings, torch.device("cpu"), steps=1, warmup=1, repeats=3, seed=0)
    first, second = order[0], order[1]
    assert first is not second and order == [first, second] * 3  # A B A B A B, not A A A B B B
    assert [len(r["step_ms_all"]) for r in records] == [3, 3]
    for record in records:
        times = record["step_ms_all"]
        assert record["spread_pct"] == pytest.approx(100 * (max(times) - min(times)) / statistics.median(times))


def test_a_setting_timed_while_other_programs_load_the_machine_is_flagged(monkeypatch, capsys):
    # /proc/stat as seen by the benchmark: the machine's busy CPU seconds grow by the process's own CPU time plus
    # `others` cores for the whole wall time of each repetition.
    for others, expected in ((2.0, True), (0.0, False)):
        clock = {"busy": 0.0}

        def timed(step, steps, device, others=others):
            step()
            clock["busy"] += 0.5 + others * 1.0
            return 1.0, 0.5

        monkeypatch.setattr(bench_sfl, "timed_seconds", timed)
        monkeypatch.setattr(bench_sfl, "busy_cpu_seconds", lambda: clock["busy"])
        monkeypatch.setattr(bench_sfl, "build_step", lambda setting, device, seed: (lambda: torch.zeros(()), None))
        [record] = bench_sfl.measure_interleaved([tiny_setting(1)], torch.device("cpu"), steps=1, warmup=1,
                                                 repeats=2, seed=0)
        assert record["other_processes_cores"] == pytest.approx(others)
        assert record["busy_machine"] is expected
        row = bench_sfl.format_table([record]).splitlines()[2].split()
        assert row[-2] == ("BUSY" if expected else "idle")
