"""CIFAR reader: real images, layout, bundled sample, CIFAR-100 layout, errors, download path, synthetic data."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from dataset_files import nhwc_to_rows
from entry_runs import FAST, assert_clean_user_error, cli_error, run_entry
from paths import REPO_ROOT, SAMPLE_CIFAR10
from sfl_helpers import moco_trainer

import run_sflmoco
from functions.core.errors import UserError
from functions.data import cifar
from functions.data.cifar import CIFAR_SPECS, rows_to_nhwc
from functions.data.datasets import NO_DOWNLOAD_ENV, ImageDataset, channel_stats, load_dataset

SAMPLE_DIR = REPO_ROOT / "sample_data" / "cifar10"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def raw_batch(path: Path) -> dict:
    """The batch file's dict as plain pickle reads it (independent of the reader under test)."""
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def write_batch(path: Path, batch: dict, protocol: int = 2) -> None:
    """Pickle a batch dict the way the official files are written."""
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def assert_one_line_user_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """The UserError message is one line and names every fragment."""
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def copy_sample(tmp_path: Path) -> Path:
    """A writable copy of the bundled sample; returns the data_dir that holds cifar-10-batches-py."""
    target = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, target)
    return target


def test_real_cifar10_shapes_dtypes_and_classes(cifar10_mini_dir: Path) -> None:
    dataset = load_dataset("cifar10", cifar10_mini_dir, download=False)
    assert isinstance(dataset, ImageDataset)
    assert dataset.name == "cifar10" and dataset.num_classes == 10
    assert dataset.train_images.shape == (5170, 32, 32, 3)
    assert dataset.test_images.shape == (1017, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8 and dataset.test_images.dtype == np.uint8
    assert dataset.train_images.flags["C_CONTIGUOUS"] and dataset.test_images.flags["C_CONTIGUOUS"]
    assert dataset.train_labels.dtype == np.int64 and dataset.test_labels.dtype == np.int64
    assert dataset.train_labels.shape == (5170,) and dataset.test_labels.shape == (1017,)
    for labels in (dataset.train_labels, dataset.test_labels):
        assert labels.min() == 0 and labels.max() == 9
        assert set(np.unique(labels)) == set(range(10))
    assert dataset.source == str(cifar10_mini_dir / "cifar-10-batches-py")
    # MocoSFL's normalisation constants; the pixels' own statistics (of this 5,170-image sample, near the full
    # training set's) show the images are CIFAR-10's.
    assert dataset.mean == (0.4914, 0.4822, 0.4465) and dataset.std == (0.2023, 0.1994, 0.2010)
    pixel_mean, pixel_std = channel_stats(dataset.train_images)
    assert pixel_mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=5e-3)
    assert pixel_std == pytest.approx((0.247, 0.2435, 0.2616), abs=5e-3)


def test_real_cifar10_known_label_sequences(cifar10_mini_dir: Path) -> None:
    dataset = load_dataset("cifar10", cifar10_mini_dir, download=False)
    # Opening labels of the official data_batch_1 and test_batch.
    assert dataset.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert dataset.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # Train batches follow each other in order: batch 2 starts right after batch 1.
    batch_1_length = len(raw_batch(cifar10_mini_dir / "cifar-10-batches-py" / "data_batch_1")["labels"])
    batch_2_labels = raw_batch(cifar10_mini_dir / "cifar-10-batches-py" / "data_batch_2")["labels"]
    assert dataset.train_labels[batch_1_length:batch_1_length + 10].tolist() == list(batch_2_labels[:10])


def test_nhwc_layout_matches_raw_rows(cifar10_mini_dir: Path) -> None:
    dataset = load_dataset("cifar10", cifar10_mini_dir, download=False)
    raw = np.asarray(raw_batch(cifar10_mini_dir / "cifar-10-batches-py" / "test_batch")["data"])
    for image, row, column in [(0, 0, 0), (3, 5, 7), (17, 31, 30), (500, 12, 0)]:
        pixel = dataset.test_images[image, row, column]
        offset = row * 32 + column
        assert pixel.tolist() == [raw[image, offset], raw[image, 1024 + offset], raw[image, 2048 + offset]]
    # The three channels really differ somewhere, so a channel mix-up could not pass unnoticed.
    assert (dataset.test_images[..., 0] != dataset.test_images[..., 2]).mean() > 0.5
    np.testing.assert_array_equal(nhwc_to_rows(dataset.test_images), raw)


def test_row_conversion_round_trip() -> None:
    rows = np.random.default_rng(0).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    images = rows_to_nhwc(rows)
    assert images.shape == (4, 32, 32, 3) and images.flags["C_CONTIGUOUS"]
    assert images[2, 1, 3, 1] == rows[2, 1024 + 32 + 3]
    np.testing.assert_array_equal(nhwc_to_rows(images), rows)


def test_bundled_sample_loads() -> None:
    dataset = load_dataset("cifar10", SAMPLE_DIR, download=False)
    assert dataset.train_images.shape == (2000, 32, 32, 3)
    assert dataset.test_images.shape == (500, 32, 32, 3)
    assert dataset.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert dataset.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert set(np.unique(dataset.train_labels)) == set(range(10))
    assert (SAMPLE_DIR / "cifar-10-batches-py" / "batches.meta").is_file()
    total_bytes = sum(path.stat().st_size for path in SAMPLE_DIR.rglob("*") if path.is_file())
    assert total_bytes <= 12 * 1024 * 1024


def test_bundled_sample_equals_first_rows_of_real_batches(cifar10_mini_dir: Path) -> None:
    sample = load_dataset("cifar10", SAMPLE_DIR, download=False)
    full = load_dataset("cifar10", cifar10_mini_dir, download=False)
    batch_lengths = [len(raw_batch(cifar10_mini_dir / "cifar-10-batches-py" / name)["labels"])
                     for name in TRAIN_FILES]
    starts = np.concatenate([[0], np.cumsum(batch_lengths)[:-1]])
    first_rows = np.concatenate([np.arange(start, start + 400) for start in starts])
    np.testing.assert_array_equal(sample.train_images, full.train_images[first_rows])
    np.testing.assert_array_equal(sample.train_labels, full.train_labels[first_rows])
    np.testing.assert_array_equal(sample.test_images, full.test_images[:500])
    np.testing.assert_array_equal(sample.test_labels, full.test_labels[:500])


def test_make_sample_script_rebuilds_the_sample(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", REPO_ROOT / "sample_data" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    make_sample.main([str(SAMPLE_DIR), "--output", str(tmp_path / "out"), "--train_per_batch", "7", "--test", "5"])
    small = load_dataset("cifar10", tmp_path / "out", download=False)
    sample = load_dataset("cifar10", SAMPLE_DIR, download=False)
    assert small.train_images.shape == (35, 32, 32, 3) and small.test_images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(small.train_images[7:14], sample.train_images[400:407])
    np.testing.assert_array_equal(small.test_labels, sample.test_labels[:5])


def make_fake_cifar100(data_dir: Path, train: int = 30, test: int = 12) -> tuple[np.ndarray, ...]:
    """Write a tiny cifar-100-python folder with the official keys; returns its rows and fine labels."""
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = []
    for name, count in (("train", train), ("test", test)):
        rows = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=count)
        fine[:2] = [0, 99]
        write_batch(folder / name, {"filenames": [f"img_{i}.png" for i in range(count)], "batch_label": name,
                                    "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                    "data": rows})
        arrays += [rows, fine]
    write_batch(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]})
    return tuple(arrays)


def test_cifar100_layout(tmp_path: Path) -> None:
    train_rows, train_fine, test_rows, test_fine = make_fake_cifar100(tmp_path)
    dataset = load_dataset("cifar100", tmp_path, download=False)
    assert dataset.name == "cifar100" and dataset.num_classes == 100
    assert dataset.train_images.shape == (30, 32, 32, 3) and dataset.test_images.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(dataset.train_labels, train_fine)  # fine labels, not coarse ones
    np.testing.assert_array_equal(dataset.test_labels, test_fine)
    assert dataset.train_images[4, 2, 9].tolist() == [train_rows[4, 73], train_rows[4, 1024 + 73],
                                                       train_rows[4, 2048 + 73]]
    np.testing.assert_array_equal(nhwc_to_rows(dataset.test_images), test_rows)
    assert dataset.mean == pytest.approx((0.5071, 0.4865, 0.4409), abs=1e-3)


def test_reads_pickles_in_numpy1_naming(tmp_path: Path) -> None:
    """The official files name numpy.core.multiarray (numpy 1.x); they must load under any numpy."""
    data_dir = copy_sample(tmp_path)
    path = data_dir / "cifar-10-batches-py" / "test_batch"
    batch = raw_batch(path)
    payload = pickle.dumps(batch, protocol=2)
    legacy = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert legacy != payload
    path.write_bytes(legacy)
    dataset = load_dataset("cifar10", data_dir, download=False)
    np.testing.assert_array_equal(nhwc_to_rows(dataset.test_images), batch["data"])


class _CreatesFolderWhenUnpickled:
    """A pickle payload that would create a folder if the reader ran arbitrary callables."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_refuses_pickles_that_call_other_code(tmp_path: Path) -> None:
    data_dir = copy_sample(tmp_path)
    marker = tmp_path / "created_by_pickle"
    path = data_dir / "cifar-10-batches-py" / "data_batch_2"
    batch = raw_batch(path)
    batch["extra"] = _CreatesFolderWhenUnpickled(str(marker))
    write_batch(path, batch)
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir, download=False)
    assert_one_line_user_error(error, str(path))
    assert not marker.exists()


def test_truncated_file_raises_user_error_naming_it(tmp_path: Path) -> None:
    data_dir = copy_sample(tmp_path)
    path = data_dir / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir, download=False)
    assert_one_line_user_error(error, str(path))


@pytest.mark.parametrize("damage", ["not_a_dict", "missing_labels", "short_rows", "label_count", "bad_label"])
def test_wrong_layout_raises_user_error_naming_file(tmp_path: Path, damage: str) -> None:
    data_dir = copy_sample(tmp_path)
    path = data_dir / "cifar-10-batches-py" / "test_batch"
    batch = raw_batch(path)
    if damage == "not_a_dict":
        batch = [batch["data"], batch["labels"]]
    elif damage == "missing_labels":
        batch["fine_labels"] = batch.pop("labels")
    elif damage == "short_rows":
        batch["data"] = np.ascontiguousarray(batch["data"][:, :3000])
    elif damage == "label_count":
        batch["labels"] = batch["labels"][:-1]
    else:
        batch["labels"][5] = 10
    write_batch(path, batch)
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir, download=False)
    assert_one_line_user_error(error, str(path))


def test_missing_batch_file_in_existing_folder(tmp_path: Path) -> None:
    data_dir = copy_sample(tmp_path)
    (data_dir / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir, download=False)
    assert_one_line_user_error(error, "data_batch_5", "missing")


def test_missing_folder_offline_names_folder_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(cifar, "download_file", offline)
    data_dir = tmp_path / "nowhere"
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir)
    assert_one_line_user_error(error, str(data_dir / "cifar-10-batches-py"), "could not be downloaded",
                               "Network is unreachable", CIFAR_SPECS["cifar10"].url, "--data_dir")
    with pytest.raises(UserError) as error:
        load_dataset("cifar100", data_dir)
    assert_one_line_user_error(error, str(data_dir / "cifar-100-python"), CIFAR_SPECS["cifar100"].url)


def test_download_disabled_never_touches_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setattr(cifar, "download_file", must_not_run)
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", tmp_path, download=False)
    assert_one_line_user_error(error, str(tmp_path / "cifar-10-batches-py"), "--data_dir")


def sample_archive(tmp_path: Path) -> Path:
    """A .tar.gz of the bundled sample laid out like the official archive."""
    archive = tmp_path / "source.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(SAMPLE_DIR / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_download_checks_md5_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = sample_archive(tmp_path)
    calls = []

    def fake_download(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        calls.append(url)
        shutil.copyfile(archive, destination)

    monkeypatch.setattr(cifar, "download_file", fake_download)
    true_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(CIFAR_SPECS, "cifar10", dataclasses.replace(CIFAR_SPECS["cifar10"], md5=true_md5))
    data_dir = tmp_path / "downloaded"
    dataset = load_dataset("cifar10", data_dir)
    assert calls == [CIFAR_SPECS["cifar10"].url]
    assert dataset.train_images.shape == (2000, 32, 32, 3)
    assert (data_dir / "cifar-10-python.tar.gz").is_file()
    load_dataset("cifar10", data_dir)  # now present: no second download
    assert len(calls) == 1


def test_download_with_wrong_md5_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = sample_archive(tmp_path)
    monkeypatch.setattr(cifar, "download_file",
                        lambda url, destination, timeout_s=0.0: shutil.copyfile(archive, destination))
    data_dir = tmp_path / "downloaded"
    with pytest.raises(UserError) as error:
        load_dataset("cifar10", data_dir)  # the real official md5 cannot match the sample archive
    assert_one_line_user_error(error, "md5", str(data_dir / "cifar-10-batches-py"))
    assert not (data_dir / "cifar-10-batches-py").exists()
    assert not (data_dir / "cifar-10-python.tar.gz").exists()


def test_synthetic_is_deterministic_and_learnable() -> None:
    first = load_dataset("synthetic", "unused", seed=5, synthetic_train=200, synthetic_test=60)
    again = load_dataset("synthetic", "unused", seed=5, synthetic_train=200, synthetic_test=60)
    other = load_dataset("synthetic", "unused", seed=6, synthetic_train=200, synthetic_test=60)
    assert first.source == "synthetic" and first.num_classes == 10
    assert first.train_images.shape == (200, 32, 32, 3) and first.train_images.dtype == np.uint8
    assert first.test_images.shape == (60, 32, 32, 3) and first.train_labels.dtype == np.int64
    assert set(np.unique(first.train_labels)) == set(range(10))
    np.testing.assert_array_equal(first.train_images, again.train_images)
    np.testing.assert_array_equal(first.test_labels, again.test_labels)
    assert not np.array_equal(first.train_images, other.train_images)
    assert all(0.0 < value < 1.0 for value in first.mean + first.std)

    def nearest_centroid_accuracy(transform) -> float:
        train, test = transform(first.train_images), transform(first.test_images)
        centroids = np.stack([train[first.train_labels == label].mean(axis=0) for label in range(10)])
        distances = ((test[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        return float((distances.argmin(axis=1) == first.test_labels).mean())

    def colour(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float64)

    def pattern_only(images: np.ndarray) -> np.ndarray:
        gray = images.astype(np.float64).mean(axis=-1)  # no colour, no brightness: only the spatial pattern
        return (gray - gray.mean(axis=(1, 2), keepdims=True)).reshape(len(images), -1)

    assert nearest_centroid_accuracy(colour) > 0.9
    assert nearest_centroid_accuracy(pattern_only) > 0.9


def test_data_proportion_keeps_a_stratified_deterministic_subset(cifar10_mini_dir: Path) -> None:
    full = load_dataset("cifar10", cifar10_mini_dir, download=False)
    part = load_dataset("cifar10", cifar10_mini_dir, download=False, data_proportion=0.1, seed=1)
    again = load_dataset("cifar10", cifar10_mini_dir, download=False, data_proportion=0.1, seed=1)
    other = load_dataset("cifar10", cifar10_mini_dir, download=False, data_proportion=0.1, seed=2)
    full_counts = np.bincount(full.train_labels, minlength=10)
    part_counts = np.bincount(part.train_labels, minlength=10)
    assert np.all(np.abs(part_counts - 0.1 * full_counts) <= 1)
    np.testing.assert_array_equal(part.train_images, again.train_images)
    assert not np.array_equal(part.train_images, other.train_images)
    # Every kept image is a row of the full set with its own label, kept in the original order.
    position = {image.tobytes(): index for index, image in enumerate(full.train_images)}
    kept = np.array([position[image.tobytes()] for image in part.train_images])
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(full.train_labels[kept], part.train_labels)
    np.testing.assert_array_equal(part.test_images, full.test_images)  # the test set is never subsampled


def test_data_proportion_on_synthetic_and_one_keeps_everything() -> None:
    whole = load_dataset("synthetic", "unused", data_proportion=1.0)
    half = load_dataset("synthetic", "unused", data_proportion=0.5)
    assert whole.train_images.shape[0] == 512
    assert abs(half.train_images.shape[0] - 256) <= 10


def test_data_proportion_trains_on_a_part_but_monitors_and_probes_on_all(tmp_path) -> None:
    """As MocoSFL: its kNN memory and probe sets are the whole training set whatever --data_proportion."""

    whole = load_dataset("synthetic", "unused", data_proportion=1.0)
    half = load_dataset("synthetic", "unused", data_proportion=0.5)
    images, labels = half.memory_split
    np.testing.assert_array_equal(images, whole.train_images)
    np.testing.assert_array_equal(labels, whole.train_labels)
    trainer = moco_trainer(tmp_path, "--num_client", "2", "--data_proportion", "0.5")
    assert sum(trainer.data.client_sizes) == half.train_images.shape[0]
    assert sum(labels.shape[0] for _, labels in trainer.data.loaders.memory) == 512


@pytest.mark.parametrize("proportion", [0.0, -0.2, 1.5])
def test_bad_data_proportion_raises(proportion: float) -> None:
    with pytest.raises(UserError) as error:
        load_dataset("synthetic", "unused", data_proportion=proportion)
    assert_one_line_user_error(error, "data_proportion", str(proportion))


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UserError) as error:
        load_dataset("imagenet", "unused")
    assert_one_line_user_error(error, "imagenet", "cifar10", "cifar100", "synthetic")


def test_cifar_module_does_not_import_dali() -> None:
    source = (REPO_ROOT / "functions" / "data" / "cifar.py").read_text()
    assert "dali" not in source.lower()


def test_missing_data_offline_exits_2_at_once(tmp_path):
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    started = time.monotonic()
    result = run_entry("run_sflmoco.py", [*FAST, "--dataset", "cifar10", "--data_dir", str(data_dir),
                                          "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, str(data_dir / "cifar-10-batches-py"), "download disabled", "--data_dir")
    assert time.monotonic() - started < 60
    assert list(data_dir.iterdir()) == []


def test_missing_data_when_the_download_fails_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_file", offline)
    monkeypatch.delenv(NO_DOWNLOAD_ENV, raising=False)
    code, line = cli_error(run_sflmoco.main, [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "none"),
                                              "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "could not be downloaded" in line and "name resolution" in line


def test_truncated_cifar_file_exits_2_naming_it(tmp_path):
    shutil.copytree(SAMPLE_CIFAR10, tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:50_000])
    result = run_entry("run_sflmoco.py", [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "data"),
                                          "--output_dir", str(tmp_path / "run")])
    assert_clean_user_error(result, str(batch), "truncated")


def test_cifar_file_of_the_wrong_layout_is_one_line(tmp_path, capsys):
    shutil.copytree(SAMPLE_CIFAR10, tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as stream:
        pickle.dump({"data": np.zeros((4, 1024), dtype=np.uint8), "labels": [0, 1, 2, 3]}, stream, protocol=2)
    code, line = cli_error(run_sflmoco.main, [*FAST, "--dataset", "cifar10", "--data_dir", str(tmp_path / "data"),
                                              "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and str(batch) in line and "wrong layout" in line
