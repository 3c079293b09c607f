"""Client partitions: coverage, determinism, skew of each method, impossible requests, options, saved files, CLI."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from paths import REPO_ROOT

from functions.core.errors import UserError
from functions.data.datasets import load_dataset
from functions.data.partition import (
    add_partition_arguments,
    classes_per_client,
    main,
    make_partition,
    partition_hash,
    partition_summary,
    resolve_partition_method,
    save_partition,
)

SAMPLE_DIR = REPO_ROOT / "sample_data" / "cifar10"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHOD_OPTIONS = {
    "iid": {},
    "shard": {"noniid_ratio": 0.3},
    "dirichlet": {"dirichlet_alpha": 0.5},
}


@pytest.fixture
def labels() -> np.ndarray:
    """3000 labels over 10 classes with unequal class sizes, in random order."""
    rng = np.random.default_rng(123)
    sizes = [200, 250, 300, 350, 400, 200, 250, 300, 350, 400]
    return rng.permutation(np.repeat(np.arange(10), sizes)).astype(np.int64)


def class_shares(labels: np.ndarray, client_indices: list[np.ndarray], num_classes: int = 10) -> np.ndarray:
    """(clients, classes) matrix of each client's class distribution."""
    counts = np.stack([np.bincount(labels[indices], minlength=num_classes) for indices in client_indices])
    return counts / counts.sum(axis=1, keepdims=True)


def one_line(error: pytest.ExceptionInfo) -> str:
    """The UserError message, checked to be a single line."""
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_disjoint_sorted_and_complete(labels: np.ndarray, method: str) -> None:
    parts = make_partition(labels, 7, method, 10, seed=3, **METHOD_OPTIONS[method])
    assert len(parts) == 7
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0)  # sorted, no repeats within a client
        assert part.size >= 10  # the default min_client_samples
    joined = np.concatenate(parts)
    assert joined.size == labels.size  # no index in two clients ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.size))  # ... and none left out


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_deterministic_from_seed(labels: np.ndarray, method: str) -> None:
    first = make_partition(labels, 8, method, 10, seed=11, **METHOD_OPTIONS[method])
    again = make_partition(labels, 8, method, 10, seed=11, **METHOD_OPTIONS[method])
    other = make_partition(labels, 8, method, 10, seed=12, **METHOD_OPTIONS[method])
    for left, right in zip(first, again):
        np.testing.assert_array_equal(left, right)
    assert partition_hash(first) == partition_hash(again)
    assert partition_hash(first) != partition_hash(other)


def test_partition_hash_sees_order_and_boundaries() -> None:
    a, b = np.array([0, 1], dtype=np.int64), np.array([2], dtype=np.int64)
    assert len(partition_hash([a, b])) == 64
    assert partition_hash([a, b]) == partition_hash([a.astype(np.int32), b.tolist()])  # same lists, same hash
    assert partition_hash([a, b]) != partition_hash([b, a])  # client order matters
    assert partition_hash([a, b]) != partition_hash([np.array([0]), np.array([1, 2])])  # boundaries matter


def test_iid_sizes_differ_by_at_most_one(labels: np.ndarray) -> None:
    parts = make_partition(labels, 7, "iid", 10, seed=0)
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= 1
    shares = class_shares(labels, parts)
    global_share = np.bincount(labels) / labels.size
    assert np.abs(shares - global_share).sum(axis=1).max() < 0.25  # random split: roughly the global mix


def test_large_alpha_is_close_to_iid(labels: np.ndarray) -> None:
    parts = make_partition(labels, 10, "dirichlet", 10, dirichlet_alpha=1000.0, seed=0)
    global_share = np.bincount(labels) / labels.size
    total_variation = 0.5 * np.abs(class_shares(labels, parts) - global_share).sum(axis=1)
    assert total_variation.max() < 0.06
    sizes = np.array([part.size for part in parts])
    assert np.all(np.abs(sizes - labels.size / 10) < 0.1 * labels.size / 10)


def test_small_alpha_is_skewed(labels: np.ndarray) -> None:
    skewed = make_partition(labels, 10, "dirichlet", 10, dirichlet_alpha=0.05, seed=0)
    iid = make_partition(labels, 10, "iid", 10, seed=0)
    assert class_shares(labels, skewed).max(axis=1).mean() > 0.6
    assert class_shares(labels, iid).max(axis=1).mean() < 0.25
    classes_held = (class_shares(labels, skewed) > 0.01).sum(axis=1)
    assert classes_held.mean() < 5


@pytest.mark.parametrize("num_client, noniid_ratio, expected", [(10, 0.2, 2), (7, 0.2, 2), (25, 0.3, 3),
                                                                  (4, 0.5, 5), (20, 0.01, 1)])
def test_shard_gives_the_requested_classes_per_client(labels: np.ndarray, num_client: int, noniid_ratio: float,
                                                      expected: int) -> None:
    assert classes_per_client(noniid_ratio, 10) == expected
    parts = make_partition(labels, num_client, "shard", 10, noniid_ratio=noniid_ratio, seed=4)
    counts = np.stack([np.bincount(labels[part], minlength=10) for part in parts])
    assert np.all((counts > 0).sum(axis=1) == expected)
    holders = (counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1  # every class held by about the same number of clients
    for label in range(10):
        pieces = counts[counts[:, label] > 0, label]
        assert pieces.max() - pieces.min() <= 1  # each class split evenly among its holders


def test_shard_with_ratio_one_behaves_like_iid(labels: np.ndarray) -> None:
    parts = make_partition(labels, 6, "shard", 10, noniid_ratio=1.0, seed=0)
    counts = np.stack([np.bincount(labels[part], minlength=10) for part in parts])
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)
    sizes = counts.sum(axis=1)
    assert sizes.max() - sizes.min() <= 10


def test_min_client_samples_respected(labels: np.ndarray) -> None:
    unconstrained_smallest = []
    for seed in range(4):
        parts = make_partition(labels, 10, "dirichlet", 10, dirichlet_alpha=0.1, min_client_samples=60, seed=seed)
        assert min(part.size for part in parts) >= 60
        loose = make_partition(labels, 10, "dirichlet", 10, dirichlet_alpha=0.1, min_client_samples=1, seed=seed)
        unconstrained_smallest.append(min(part.size for part in loose))
    assert min(unconstrained_smallest) < 60  # the bound was binding for some seed, so redrawing did work


@pytest.mark.parametrize("request_kwargs, fragment", [
    ({"num_client": 0}, "--num_client"),
    ({"num_client": 3001}, "3001 clients"),
    ({"num_client": 10, "min_client_samples": 301}, "--min_client_samples"),
    ({"num_client": 10, "min_client_samples": 0}, "--min_client_samples"),
    ({"method": "dirichlet", "dirichlet_alpha": 0.0}, "--dirichlet_alpha"),
    ({"method": "dirichlet", "dirichlet_alpha": -1.0}, "--dirichlet_alpha"),
    ({"method": "shard", "noniid_ratio": 0.0}, "--noniid_ratio"),
    ({"method": "shard", "noniid_ratio": 1.5}, "--noniid_ratio"),
    ({"method": "shard", "num_client": 3, "noniid_ratio": 0.1}, "cannot cover all 10 classes"),
    ({"method": "dirichlet", "num_client": 20, "dirichlet_alpha": 0.001, "min_client_samples": 100},
     "dirichlet_alpha=0.001"),
    ({"method": "shard", "num_client": 40, "noniid_ratio": 0.1, "min_client_samples": 60}, "client"),
    ({"method": "random"}, "iid, shard, dirichlet"),
])
def test_impossible_requests_raise_user_error(labels: np.ndarray, request_kwargs: dict, fragment: str) -> None:
    arguments = {"num_client": 5, "method": "iid", **request_kwargs}
    num_client, method = arguments.pop("num_client"), arguments.pop("method")
    with pytest.raises(UserError) as error:
        make_partition(labels, num_client, method, 10, **arguments)
    assert fragment in one_line(error)


def resolved_method(argv: list[str]) -> str:
    """The partition method that argv's partition options resolve to."""
    parser = argparse.ArgumentParser()
    add_partition_arguments(parser)
    args = parser.parse_args(argv)
    return resolve_partition_method(args.partition, dirichlet=args.dirichlet, noniid_ratio=args.noniid_ratio)


@pytest.mark.parametrize("argv, expected", [
    ([], "iid"),
    (["--dirichlet"], "dirichlet"),
    (["--partition", "dirichlet", "--dirichlet"], "dirichlet"),
    (["--noniid_ratio", "0.2"], "shard"),
    (["--partition", "shard", "--noniid_ratio", "0.5"], "shard"),
    (["--partition", "shard"], "shard"),
    (["--partition", "iid", "--noniid_ratio", "1.0"], "iid"),
])
def test_resolve_partition_method(argv: list[str], expected: str) -> None:
    assert resolved_method(argv) == expected


@pytest.mark.parametrize("argv", [
    ["--dirichlet", "--partition", "iid"],
    ["--dirichlet", "--partition", "shard"],
    ["--partition", "iid", "--noniid_ratio", "0.5"],
    ["--dirichlet", "--noniid_ratio", "0.3"],
    ["--noniid_ratio", "0"],
    ["--noniid_ratio", "1.2"],
])
def test_contradictory_options_raise_user_error(argv: list[str]) -> None:
    with pytest.raises(UserError) as error:
        resolved_method(argv)
    one_line(error)


def test_partition_method_without_options_is_iid_or_shard_below_a_noniid_ratio_of_one() -> None:
    assert resolve_partition_method() == "iid"
    assert resolve_partition_method(noniid_ratio=0.5) == "shard"
    assert resolve_partition_method(dirichlet=True) == "dirichlet"


def test_an_unknown_partition_method_is_one_line() -> None:
    # A caller outside argparse (which checks the choices) may pass any string.
    with pytest.raises(UserError) as error:
        resolve_partition_method("random")
    assert one_line(error) == "unknown --partition 'random'; choose one of iid, shard, dirichlet"


def test_partition_options_defaults_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_partition_arguments(parser)
    args = parser.parse_args([])
    assert (args.partition, args.dirichlet, args.noniid_ratio, args.dirichlet_alpha, args.min_client_samples) == (
        None, False, 1.0, 0.4, 10)
    help_text = parser.format_help()
    for flag in ("--partition", "--dirichlet ", "--noniid_ratio", "--dirichlet_alpha", "--min_client_samples"):
        assert flag in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--partition", "random"])


def test_summary_and_saved_files(tmp_path: Path, labels: np.ndarray) -> None:
    parts = make_partition(labels, 6, "dirichlet", 10, dirichlet_alpha=0.3, seed=2)
    summary = save_partition(tmp_path / "run", labels, parts, 10, {"method": "dirichlet", "seed": 2})
    saved = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert saved == {**summary, "method": "dirichlet", "seed": 2}
    assert summary == partition_summary(labels, parts, 10)
    assert saved["num_client"] == 6 and saved["num_classes"] == 10 and len(saved["clients"]) == 6
    assert saved["hash"] == partition_hash(parts)
    for client, part in zip(saved["clients"], parts):
        assert client["num_samples"] == part.size
        assert client["class_counts"] == np.bincount(labels[part], minlength=10).tolist()
    assert saved["num_samples"] == labels.size
    assert saved["class_totals"] == np.bincount(labels, minlength=10).tolist()
    assert (tmp_path / "run" / "partition.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        save_partition(tmp_path / "clash", labels, parts, 10, {"hash": "mine"})


def test_plot_handles_many_clients_and_classes(tmp_path: Path) -> None:
    from matplotlib.image import imread

    rng = np.random.default_rng(0)
    many_labels = rng.integers(0, 100, size=12000)
    parts = make_partition(many_labels, 1000, "iid", 100, min_client_samples=5, seed=0)
    save_partition(tmp_path, many_labels, parts, 100)
    image = imread(tmp_path / "partition.png")
    assert image.shape[0] > 1000 and image.shape[1] > 800  # tall enough for 1000 rows, wide enough for 100 classes
    assert image[..., :3].std() > 0.05  # not a blank canvas


def check_cli_output(output_dir: Path, expected_samples: int, num_client: int) -> dict:
    """Common checks on the files the command line writes."""
    saved = json.loads((output_dir / "partition.json").read_text())
    assert saved["num_client"] == num_client and len(saved["clients"]) == num_client
    assert saved["num_samples"] == expected_samples
    assert sum(client["num_samples"] for client in saved["clients"]) == expected_samples
    for client in saved["clients"]:
        assert sum(client["class_counts"]) == client["num_samples"] >= 10
    assert (output_dir / "partition.png").read_bytes()[:8] == PNG_MAGIC
    return saved


def test_cli_on_bundled_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--dataset", "cifar10", "--data_dir", str(SAMPLE_DIR), "--num_client", "10", "--partition", "dirichlet",
          "--dirichlet_alpha", "0.1", "--output_dir", str(tmp_path), "--seed", "3", "--no_download"])
    saved = check_cli_output(tmp_path, 2000, 10)
    assert (saved["method"], saved["dirichlet_alpha"], saved["seed"]) == ("dirichlet", 0.1, 3)
    dataset = load_dataset("cifar10", SAMPLE_DIR, download=False)
    expected = make_partition(dataset.train_labels, 10, "dirichlet", 10, dirichlet_alpha=0.1, seed=3)
    assert saved["hash"] == partition_hash(expected)
    printed = capsys.readouterr().out
    assert "dirichlet partition of 2000 samples over 10 clients" in printed
    assert str(tmp_path / "partition.json") in printed


def test_cli_on_real_mini_set(tmp_path: Path, cifar10_mini_dir: Path) -> None:
    main(["--data_dir", str(cifar10_mini_dir), "--num_client", "10", "--noniid_ratio", "0.2",
          "--output_dir", str(tmp_path / "shard"), "--no_download"])
    saved = check_cli_output(tmp_path / "shard", 5170, 10)
    assert saved["method"] == "shard" and saved["classes_per_client"] == 2
    assert all(sum(count > 0 for count in client["class_counts"]) == 2 for client in saved["clients"])
    main(["--data_dir", str(cifar10_mini_dir), "--num_client", "10", "--dirichlet", "--dirichlet_alpha", "0.1",
          "--data_proportion", "0.5", "--output_dir", str(tmp_path / "half"), "--no_download"])
    half = json.loads((tmp_path / "half" / "partition.json").read_text())
    check_cli_output(tmp_path / "half", half["num_samples"], 10)
    assert abs(half["num_samples"] - 2585) <= 10


def test_cli_bad_request_exits_2_with_one_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "functions.data.partition", "--dataset", "synthetic", "--num_client", "100000",
         "--output_dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "100000 clients" in lines[0]
    assert not (tmp_path / "partition.json").exists()


def test_cli_contradiction_raises_before_loading_data(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        main(["--data_dir", str(tmp_path / "absent"), "--dirichlet", "--partition", "iid",
              "--output_dir", str(tmp_path)])
    assert "--dirichlet" in one_line(error)
