"""STL-10, SVHN and Tiny-ImageNet readers on files written in the official layouts; downloads refused offline;
2-step training on each dataset with both methods and both data paths."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_files import write_stl10, write_svhn, write_tiny_imagenet

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.data import cifar, readers
from functions.data.datasets import dataset_entry, load_dataset
from functions.train.trainer import Trainer


def test_stl10_reads_images_upright_and_labels_from_zero(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    train_images, train_labels, test_images, test_labels, source = readers.read_stl10(tmp_path, download=False)
    assert np.array_equal(train_images, written["train_images"]) and np.array_equal(test_images, written["test_images"])
    assert np.array_equal(train_labels, written["train_labels"]) and np.array_equal(test_labels, written["test_labels"])
    # The left half is the bright one: rows and columns are not swapped.
    assert train_images[:, :, :48].mean() > train_images[:, :, 48:].mean() + 50
    assert source.endswith("stl10_binary")


def test_stl10_unlabelled_split_joins_training_without_labels(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    dataset = load_dataset("stl10_unlabelled", tmp_path, download=False)
    assert dataset.train_images.shape == (50, 96, 96, 3) and dataset.has_unlabelled
    assert np.array_equal(dataset.train_images[20:], written["unlabeled_images"])
    assert (dataset.train_labels[20:] == readers.UNLABELLED).all()
    memory_images, memory_labels = dataset.memory_split
    assert np.array_equal(memory_images, written["train_images"]) and np.array_equal(memory_labels,
                                                                                     written["train_labels"])
    assert not load_dataset("stl10", tmp_path, download=False).has_unlabelled


def test_svhn_reads_mat_files_and_maps_ten_to_zero(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    train_images, train_labels, test_images, test_labels, _ = readers.read_svhn(tmp_path, download=False)
    assert np.array_equal(train_images, written["train_images"]) and np.array_equal(test_labels,
                                                                                    written["test_labels"])
    assert train_labels.min() == 0 and train_labels.max() == 9 and np.array_equal(train_labels,
                                                                                  written["train_labels"])
    extra = load_dataset("svhn_extra", tmp_path, download=False)
    assert extra.train_images.shape[0] == 35 and np.array_equal(extra.train_images[20:], written["extra_images"])


def test_tiny_imagenet_reads_folders_and_val_annotations_then_its_cache(tmp_path: Path, monkeypatch) -> None:
    written = write_tiny_imagenet(tmp_path)
    train_images, train_labels, test_images, test_labels, _ = readers.read_tiny_imagenet(tmp_path, download=False)
    assert np.array_equal(train_labels, written["train_labels"]) and np.array_equal(test_labels,
                                                                                    written["test_labels"])
    # JPEG at quality 100 is near lossless.
    assert np.abs(train_images.astype(int) - written["train_images"]).mean() < 3
    assert np.abs(test_images.astype(int) - written["test_images"]).mean() < 3

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(readers, "_decode", must_not_decode)
    again = readers.read_tiny_imagenet(tmp_path, download=False)
    assert np.array_equal(again[0], train_images) and np.array_equal(again[2], test_images)
    assert dataset_entry("tinyimagenet").num_classes == 200


@pytest.mark.parametrize("name, target", [("stl10", "stl10_binary"), ("svhn", "train_32x32.mat"),
                                          ("tinyimagenet", "tiny-imagenet-200")])
def test_missing_datasets_are_one_line_when_downloads_are_off(tmp_path: Path, name: str, target: str) -> None:
    with pytest.raises(UserError, match=f"not found at .*{target}.*download disabled.*http") as error:
        load_dataset(name, tmp_path, download=False)
    assert "\n" not in str(error.value)


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path: Path, monkeypatch) -> None:
    def fake_download(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        destination.write_bytes(b"not the archive")

    monkeypatch.setattr(cifar, "download_file", fake_download)
    with pytest.raises(UserError, match="could not be downloaded.*md5"):
        load_dataset("stl10", tmp_path, download=True)
    assert not (tmp_path / "stl10_binary.tar.gz").exists()


def test_damaged_files_are_one_line(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="not a whole number of 96x96"):
        load_dataset("stl10", tmp_path, download=False)
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"junk")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"junk")
    with pytest.raises(UserError, match="not an SVHN .mat file"):
        load_dataset("svhn", tmp_path / "svhn", download=False)


def test_unlabelled_images_refuse_a_label_based_partition(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    args = parse_args("moco", ["--dataset", "stl10_unlabelled", "--data_dir", str(tmp_path), "--partition",
                               "dirichlet", "--num_client", "2", "--min_client_samples", "1", "--output_dir",
                               str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="unlabelled images too.*--partition iid"):
        Trainer(args, Runtime(device=torch.device("cpu")), tmp_path / "run")


# stl10 trains through the same reader and views as stl10_unlabelled, which adds the unlabelled images.
DATASET_WRITERS = {"stl10_unlabelled": write_stl10, "svhn": write_svhn, "tinyimagenet": write_tiny_imagenet}


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("method", ["moco", "swav"])
@pytest.mark.parametrize("dataset", list(DATASET_WRITERS))
def test_two_training_steps_on_each_dataset(tmp_path: Path, dataset: str, method: str, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    DATASET_WRITERS[dataset](tmp_path / "data")
    size = dataset_entry(dataset).image_size
    options = ["--dataset", dataset, "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
               "--arch", "ResNet18", "--width", "2", "--num_client", "2", "--batch_size", "2", "--partition", "iid",
               "--min_client_samples", "1", "--num_workers", "0", "--max_steps", "2", "--eval_freq", "0",
               "--skip_linear", "--log_freq", "1"]
    if method == "moco":
        options += ["--K", "16", "--K_dim", "8"]
    else:
        options += ["--nmb_prototypes", "4", "--feat_dim", "8", "--hidden_mlp", "16", "--nmb_crops", "2", "1",
                    "--size_crops", str(size), str(size // 2), "--min_scale_crops", "0.3", "0.1",
                    "--max_scale_crops", "1.0", "0.3", "--crops_for_assign", "0", "1"]
    if backend == "dali":
        options += ["--use_dali", "--dali_device", "cpu"]
    args = parse_args(method, options)
    (tmp_path / "run").mkdir()
    trainer = Trainer(args, Runtime(device=torch.device("cpu")), tmp_path / "run")
    trainer.train()
    losses = [loss for _, loss in trainer.log.metrics.data["train_loss"]]
    assert trainer.global_step == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert trainer.data.loaders.backend == backend
    # The kNN memory holds the labelled images only.
    memory_labels = torch.cat([labels for _, labels in trainer.data.loaders.memory])
    assert memory_labels.min() >= 0
    trainer.close()


def test_a_symlinked_tiny_imagenet_cache_listing_is_replaced_not_written_through(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    cache = tmp_path / "tiny-imagenet-200" / readers.DECODED_CACHE
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (cache / "train.txt").symlink_to(victim)
    readers.read_tiny_imagenet(tmp_path, download=False)
    assert victim.read_text() == "keep me\n"
    assert not (cache / "train.txt").is_symlink() and "images" in (cache / "train.txt").read_text()


def write_svhn_train(folder: Path, images: object, labels: object) -> Path:
    """Replace train_32x32.mat of an SVHN folder with these X and y."""
    from scipy.io import savemat

    path = folder / "train_32x32.mat"
    savemat(path, {"X": images, "y": labels})
    return path


def svhn_variant(name: str, images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Write the SVHN file variant `name` at path (the official X and y of `images`, `labels` otherwise)."""
    from scipy.io import savemat

    content = {"X": images.transpose(1, 2, 3, 0), "y": np.where(labels == 0, 10, labels).reshape(-1, 1)}
    if name == "cell array":
        content["X"] = np.array([[content["X"]]], dtype=object)
    elif name == "text labels":
        content["y"] = np.array([str(label) for label in labels.tolist()])
    elif name == "constant":
        content["X"] = np.zeros_like(content["X"])
    elif name in ("NaN", "1e6"):
        content["X"] = content["X"].astype(np.float64)
        content["X"][0, 0, 0, 0] = np.nan if name == "NaN" else 1e6
    elif name == "labels 57":
        content["y"] = content["y"] + 47
    savemat(path, content)
    if name == "v7.3":
        data = bytearray(path.read_bytes())
        data[124:126] = b"\x00\x02"  # the header's version field of an HDF5-based v7.3 file
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("variant, reason", [
    ("v7.3", "is a MATLAB v7.3 \\(HDF5\\) file"), ("cell array", "X is a cell array, not a numeric array"),
    ("text labels", "y is text, not a numeric array"), ("constant", "images of one constant value"),
    ("NaN", "not finite"), ("1e6", "floating-point pixels from 0 to 1e\\+06, outside"),
    ("labels 57", "labels from 48 to 57, SVHN's are 1..10")])
def test_svhn_file_variants_are_one_line_naming_the_file(tmp_path: Path, variant: str, reason: str) -> None:
    written = write_svhn(tmp_path)
    svhn_variant(variant, written["train_images"], written["train_labels"], tmp_path / "train_32x32.mat")
    with pytest.raises(UserError, match=f"train_32x32.mat.*{reason}") as error:
        readers.read_svhn(tmp_path, download=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("scale", [1.0, 1 / 255])
def test_svhn_float_pixels_are_read_in_their_range(tmp_path: Path, scale: float) -> None:
    written = write_svhn(tmp_path)
    images = written["train_images"]
    stored = images.transpose(1, 2, 3, 0).astype(np.float64) * scale
    write_svhn_train(tmp_path, stored, np.where(written["train_labels"] == 0, 10, written["train_labels"]))
    train_images, train_labels, *_ = readers.read_svhn(tmp_path, download=False)
    assert train_images.dtype == np.uint8 and np.array_equal(train_images, images)
    assert np.array_equal(train_labels, written["train_labels"])


def test_a_replaced_tiny_imagenet_image_is_decoded_again(tmp_path: Path) -> None:
    from PIL import Image

    write_tiny_imagenet(tmp_path)
    first = readers.read_tiny_imagenet(tmp_path, download=False)[0]
    replaced = tmp_path / "tiny-imagenet-200" / "train" / "n00000002" / "images" / "n00000002_0.JPEG"
    new_pixels = 255 - first[0]
    Image.fromarray(new_pixels).save(replaced, quality=100, subsampling=0)
    os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    again = readers.read_tiny_imagenet(tmp_path, download=False)[0]
    assert np.abs(again[0].astype(int) - new_pixels).mean() < 3
    assert np.array_equal(again[1:], first[1:])


def damage_cache(cache: Path, how: str) -> None:
    """Turn a valid cache array into a damaged one."""
    images = np.load(cache)
    if how == "pickled":
        np.save(cache, np.array([images], dtype=object), allow_pickle=True)
    elif how == "truncated":
        cache.write_bytes(cache.read_bytes()[:-100])
    elif how == "wrong shape":
        np.save(cache, images[:, :32])
    elif how == "wrong dtype":
        np.save(cache, images.astype(np.float32))
    elif how == "constant":
        np.save(cache, np.zeros_like(images))
    elif how == "not an array":
        cache.write_bytes(b"PK\x03\x04 not numpy")


@pytest.mark.parametrize("how", ["pickled", "truncated", "wrong shape", "wrong dtype", "constant", "not an array"])
def test_a_damaged_tiny_imagenet_cache_is_rebuilt(tmp_path: Path, how: str) -> None:
    write_tiny_imagenet(tmp_path)
    first = readers.read_tiny_imagenet(tmp_path, download=False)
    cache = tmp_path / "tiny-imagenet-200" / readers.DECODED_CACHE / "train.npy"
    damage_cache(cache, how)
    again = readers.read_tiny_imagenet(tmp_path, download=False)
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[2], first[2])
    assert np.array_equal(np.load(cache, allow_pickle=False), first[0])  # written again, whole


def test_a_tiny_imagenet_cache_folder_linked_out_of_the_data_is_neither_read_nor_written(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data" / "tiny-imagenet-200" / readers.DECODED_CACHE).symlink_to(outside)
    first = readers.read_tiny_imagenet(tmp_path / "data", download=False)
    assert list(outside.iterdir()) == []
    # A cache planted there, however consistent, is not read.
    np.save(outside / "train.npy", np.zeros_like(first[0]))
    (outside / "train.txt").write_text("anything")
    assert np.array_equal(readers.read_tiny_imagenet(tmp_path / "data", download=False)[0], first[0])


def test_a_decompression_bomb_in_tiny_imagenet_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    write_tiny_imagenet(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the 64x64 images are past it: PIL warns
    with pytest.raises(UserError, match=r"n00000002_0.JPEG is too large to decode safely") as error:
        readers.read_tiny_imagenet(tmp_path, download=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, content, reason", [
    ("wnids.txt", b"\xff\xfe\x00binary", "cannot read .*wnids.txt"), ("wnids.txt", b"\n\n", "wnids.txt lists no"),
    ("val/val_annotations.txt", b"../../../x.JPEG\tn00000000\n", "names '../../../x.JPEG', not a file name"),
    ("val/val_annotations.txt", b"gone.JPEG\tn00000000\n", "gone.JPEG .*No such file")])
def test_damaged_tiny_imagenet_lists_are_one_line(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / name).write_bytes(content)
    with pytest.raises(UserError, match=reason) as error:
        readers.read_tiny_imagenet(tmp_path, download=False)
    assert "\n" not in str(error.value)


def test_a_tiny_imagenet_cache_listed_by_names_only_is_rebuilt(tmp_path: Path, caplog, monkeypatch) -> None:
    write_tiny_imagenet(tmp_path)
    first = readers.read_tiny_imagenet(tmp_path, download=False)[0]
    folder = tmp_path / "tiny-imagenet-200"
    cache = folder / readers.DECODED_CACHE
    np.save(cache / "train.npy", np.zeros_like(first))
    names = [str(path.relative_to(folder)) for wnid in (folder / "wnids.txt").read_text().split()
             for path in sorted((folder / "train" / wnid / "images").glob("*.JPEG"))]
    (cache / "train.txt").write_text("\n".join(names))  # an older release's listing: the file names only
    monkeypatch.setattr(logging.getLogger("sfl"), "propagate", True)  # to caplog's handler
    with caplog.at_level("INFO", logger="sfl"):
        again = readers.read_tiny_imagenet(tmp_path, download=False)[0]
    assert np.array_equal(again, first)
    assert "train.txt is damaged or an older version's" in caplog.text
