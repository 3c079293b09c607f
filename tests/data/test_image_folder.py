"""Image-folder datasets: the tree's classes and splits, decoding on demand in both data paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from configs import parse_args
from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.data import image_folder
from functions.data.datasets import load_dataset, resolved_entry
from functions.data.image_folder import ImageFiles, read_image_folder
from functions.train.trainer import Trainer


def write_folder(root: Path, classes=("cat", "dog", "eel"), train: int = 6, val: int = 2) -> Path:
    """root/train/<class>/ and root/val/<class>/ with PNG and JPEG files of assorted sizes, plus a stray text file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.full((30 + index, 40, 3), (40 * label) % 240, dtype=np.uint8)
                pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.{'png' if index % 2 else 'jpg'}")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_reader_lists_classes_in_order_and_decodes_resized(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "tree")
    train, train_labels, test, test_labels, _ = read_image_folder(root, data_size=24)
    assert isinstance(train, ImageFiles) and train.shape == (18, 24, 24, 3) and len(test) == 6
    assert train_labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    image = train[7]
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    # Class "dog" was drawn around 40, "eel" around 80: the decoded pixels keep that.
    assert 35 < train[7].mean() < 65 and 75 < train[13].mean() < 105
    assert train[np.array([0, 13])].shape == (2, 24, 24, 3) and train[2:5].shape == (3, 24, 24, 3)


def test_reader_refuses_broken_trees_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs .*/train/<class>"):
        read_image_folder(tmp_path)
    root = write_folder(tmp_path / "tree")
    (root / "val" / "fox").mkdir()
    with pytest.raises(UserError, match="class folders that .* lacks \\(fox\\)"):
        read_image_folder(root)
    (root / "val" / "fox").rmdir()
    (root / "train" / "cat" / "0.jpg").write_bytes(b"broken")
    files, *_ = read_image_folder(root, data_size=16)
    with pytest.raises(UserError, match="cannot decode .*0.jpg"):
        files[0]


def test_views_follow_data_size() -> None:
    assert resolved_entry("imagefolder", None).crop_sizes == (224, 96)
    # MocoSFL's blur at every size: PIL's radius blur, whose extent follows sigma, not a kernel sized to the image.
    assert resolved_entry("imagefolder", None).blur_kernel_size == 0
    small = resolved_entry("imagefolder", 64)
    assert small.image_size == 64 and small.crop_sizes == (64, 27) and small.blur_kernel_size == 0
    assert resolved_entry("cifar10", 64).image_size == 32  # other datasets have one size
    args = parse_args("moco", ["--dataset", "imagefolder", "--data_size", "48"])
    assert args.data_size == 48
    with pytest.raises(UserError, match="--data_size 64 does not match --dataset cifar10"):
        parse_args("moco", ["--dataset", "cifar10", "--data_size", "64"])


@pytest.mark.parametrize("size", ["0", "-32"])
def test_a_data_size_below_one_pixel_names_data_size(size: str) -> None:
    for method in ("moco", "swav"):
        with pytest.raises(UserError, match=f"^--data_size must be in \\[1, inf\\) \\(got {size}\\)$"):
            parse_args(method, ["--dataset", "imagefolder", "--data_size", size])
    with pytest.raises(UserError, match=f"--data_size must be at least 1 pixel \\(got {size}\\)"):
        resolved_entry("imagefolder", int(size))


def test_a_proportion_keeps_files_undecoded(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "tree", train=10)
    dataset = load_dataset("imagefolder", root, data_proportion=0.5, data_size=16)
    assert isinstance(dataset.train_images, ImageFiles) and len(dataset.train_images) == 15
    assert dataset.num_classes == 3 and sorted(set(dataset.train_labels.tolist())) == [0, 1, 2]


def count_decodes(monkeypatch) -> list[int]:
    decoded: list[int] = []
    original = ImageFiles.decode

    def counting(self: ImageFiles, index: int) -> np.ndarray:
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(image_folder.ImageFiles, "decode", counting)
    return decoded


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("method", ["moco", "swav"])
def test_two_steps_decode_only_the_images_they_read(tmp_path: Path, monkeypatch, method: str, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = write_folder(tmp_path / "tree", train=8)
    decoded = count_decodes(monkeypatch)
    options = ["--dataset", "imagefolder", "--data_dir", str(root), "--data_size", "32", "--output_dir",
               str(tmp_path / "run"), "--width", "2", "--num_client", "2", "--batch_size", "2", "--partition", "iid",
               "--min_client_samples", "1", "--num_workers", "0", "--max_steps", "2", "--eval_freq", "0",
               "--skip_linear", "--log_freq", "1"]
    options += (["--K", "16", "--K_dim", "8"] if method == "moco" else
                ["--nmb_prototypes", "4", "--feat_dim", "8", "--hidden_mlp", "16"])
    if backend == "dali":
        options += ["--use_dali", "--dali_device", "cpu"]
    (tmp_path / "run").mkdir()
    trainer = Trainer(parse_args(method, options), Runtime(device=torch.device("cpu")), tmp_path / "run")
    assert decoded == []  # building the loaders (memory and test sets included) decoded nothing
    trainer.train()
    assert trainer.global_step == 2 and trainer.data.loaders.backend == backend
    # The torch path decodes each image it reads once per step (2 steps x 2 clients x 2 rows); DALI reads the
    # files' bytes and decodes them itself.
    assert len(decoded) == (0 if backend == "dali" else 8)
    features = [images.shape for images, _ in trainer.data.loaders.test]
    assert features == [(6, 3, 32, 32)] and len(decoded) == (6 if backend == "dali" else 14)
    trainer.close()


def test_imagenet12_reads_mocosfls_folder_at_224_pixels(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ImageNet-12 not found .*prepare_imagenet12.py"):
        load_dataset("imagenet12", tmp_path)
    classes = [f"n{index:08d}" for index in range(12)]
    write_folder(tmp_path / "imagnet-12", classes=classes, train=1, val=1)  # MocoSFL's spelling
    dataset = load_dataset("imagenet12", tmp_path)
    assert dataset.num_classes == 12 and dataset.train_images.shape == (12, 224, 224, 3)
    write_folder(tmp_path / "eleven", classes=classes[:11], train=1, val=1)
    with pytest.raises(UserError, match="holds 11 classes, ImageNet-12 has 12"):
        load_dataset("imagenet12", tmp_path / "eleven")
