"""The command lines of MocoSFL's scripts/table2 and scripts/table3 and of the seed collection's run scripts
(scripts/exp1, scripts/table2/run_sflmoco_cross_client_cifar10_new.sh), expanded from their loops as the scripts
write them, and their translation to a CPU test: data and output paths, `--device cuda:N` to the CPU,
`torchrun --nproc_per_node=4` to two processes, and a step limit.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dataset_files import nhwc_to_rows

from functions.data.cifar import read_batch

FULL_TRAIN_SIZE = 50_000  # CIFAR-10's and CIFAR-100's training sets: the scripts' client counts are sized for it


@dataclass(frozen=True)
class ScriptLine:
    """One command line of a script: its launcher, entry script and options, as the script runs it."""

    script: str
    launcher: tuple[str, ...]
    entry: str
    argv: tuple[str, ...]

    @property
    def processes(self) -> int:
        """Processes the line starts (torchrun's --nproc_per_node, else 1)."""
        for part in self.launcher:
            if part.startswith("--nproc_per_node="):
                return int(part.split("=", 1)[1])
        return 1

    def option(self, name: str) -> str | None:
        """The value given to --name, or None."""
        return self.argv[self.argv.index(name) + 1] if name in self.argv else None

    def label(self) -> str:
        """A short name for test ids."""
        keys = ("--dataset", "--num_client", "--noniid_ratio", "--cutlayer", "--seed")
        values = "-".join(f"{key[2:]}{self.option(key)}" for key in keys if self.option(key) is not None)
        return f"{Path(self.script).stem}-{self.entry[7:-3]}-{values}"


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def mocosfl_table2(dataset: str) -> list[ScriptLine]:
    """scripts/table2/run_sflmoco_cross_client_{dataset}.sh of MocoSFL: 5 clients, then 20 sampled at 0.25."""
    script, lines = f"scripts/table2/run_sflmoco_cross_client_{dataset}.sh", []
    for noniid_ratio in ("0.2", "1.0"):
        for cutlayer in ("1", "2"):
            output = f"./outputs/mocosflV2_ResNet18_{dataset}_cut{cutlayer}_bnlNone_client5_nonIID{noniid_ratio}"
            lines.append(ScriptLine(script, ("python",), "run_sflmoco.py", _split(
                f"--num_client 5 --lr 0.06 --cutlayer {cutlayer} --num_epoch 200 --noniid_ratio {noniid_ratio} "
                f"--output_dir {output} --moco_version V2 --arch ResNet18 --dataset {dataset} --loss_threshold 0.0 "
                "--ressfl_alpha 0.0 --bottleneck_option None --auto_adjust")))
    for noniid_ratio in ("0.2", "1.0"):
        for cutlayer in ("1", "2"):
            output = f"./outputs/mocosflV2_ResNet18_{dataset}_cut{cutlayer}_bnlNone_client20_nonIID{noniid_ratio}"
            lines.append(ScriptLine(script, ("python",), "run_sflmoco.py", _split(
                f"--num_client 20 --lr 0.06 --cutlayer {cutlayer} --num_epoch 200 --noniid_ratio {noniid_ratio} "
                f"--output_dir {output} --moco_version V2 --arch ResNet18 --dataset {dataset} --loss_threshold 0.0 "
                "--ressfl_alpha 0.0 --bottleneck_option None --batch_size 20 --client_sample_ratio 0.25 "
                "--avg_freq 10")))
    return lines


def mocosfl_table3() -> list[ScriptLine]:
    """scripts/table3/run_sflmoco_cross_client.sh of MocoSFL: 100, 200 and 1000 clients, three seeds."""
    script, lines = "scripts/table3/run_sflmoco_cross_client.sh", []
    for dataset in ("cifar10", "cifar100", "imagenet12"):
        for seed in ("1234", "1235", "1236"):
            for num_client in ("100", "200", "1000"):
                for noniid_ratio in ("0.2", "1.0"):
                    for cutlayer in ("1", "2"):
                        output = (f"./outputs/imagenet12_cut2/mocosflV2_ResNet18_{dataset}_cut{cutlayer}_bnlNone_"
                                  f"client{num_client}_nonIID{noniid_ratio}_seed_{seed}")
                        lines.append(ScriptLine(script, ("python",), "run_sflmoco.py", _split(
                            f"--num_client {num_client} --lr 0.06 --cutlayer {cutlayer} --num_epoch 200 "
                            f"--noniid_ratio {noniid_ratio} --output_dir {output} --moco_version V2 --arch ResNet18 "
                            f"--dataset {dataset} --loss_threshold 0.0 --ressfl_alpha 0.0 --bottleneck_option None "
                            f"--auto_adjust --seed {seed}")))
    return lines


def seed_run_scripts() -> list[ScriptLine]:
    """The seed collection's scripts/exp1/*.sh and scripts/table2/run_sflmoco_cross_client_cifar10_new.sh."""
    common = ("--moco_version V2 --arch ResNet18 --dataset cifar10 --loss_threshold 0.0 --ressfl_alpha 0.0 "
              "--bottleneck_option None")
    torchrun = ("torchrun", "--nproc_per_node=4")
    return [
        ScriptLine("scripts/exp1/run_sflmoco_cross_client_cifar10_DDP.sh", torchrun, "run_sflmoco.py", _split(
            "--num_client 10 --lr 0.06 --cutlayer 1 --num_epoch 200 --noniid_ratio 1.0 --hetero --output_dir "
            f"./outputs/simcosflV2_ResNet18_cifar10_cut1_bnlNone_client10_nonIID1.0_dirichlet {common} "
            "--pairloader_option mocov2 --batch_size 16 --avg_freq 10 --is_distributed --cos")),
        ScriptLine("scripts/exp1/run_sflmoco_cross_client_cifar10_new.sh", ("python",), "run_sflmoco.py", _split(
            "--num_client 10 --lr 0.06 --cutlayer 1 --num_epoch 200 --noniid_ratio 1.0 --hetero --output_dir "
            f"./outputs/mocosflV2_ResNet18_cifar10_cut1_bnlNone_client10_nonIID1.0_dirichlet {common} "
            "--pairloader_option mocov2 --batch_size 16 --avg_freq 10 --device cuda:7")),
        ScriptLine("scripts/exp1/run_sflswav_cross_client_cifar10.sh", ("python",), "run_sflswav.py", _split(
            "--num_client 10 --lr 0.006 --cutlayer 1 --num_epoch 200 --nmb_crops 2 6 --size_crops 224 96 "
            "--min_scale_crops 0.14 0.05 --max_scale_crops 1 0.14 --use_dali --use_fp16 --queue_length 3840 "
            "--noniid_ratio 1.0 --hetero --output_dir "
            f"./outputs/SwavSflV2_ResNet18_cifar10_cut1_bnlNone_client10_nonIID1.0_dirichlet {common} "
            "--batch_size 2 --avg_freq 10 --device cuda:5")),
        ScriptLine("scripts/exp1/run_sflswav_cross_client_cifar10_DDP.sh", torchrun, "run_sflswav.py", _split(
            "--num_client 10 --cutlayer 1 --num_epoch 200 --nmb_crops 2 6 --size_crops 224 96 "
            "--min_scale_crops 0.14 0.05 --max_scale_crops 1 0.14 --is_distributed --lr 0.5 --final_s_lr 0.000001 "
            "--c_lr 0.5 --final_c_lr 0.0001 --warmup_epochs 3 --K 3840 --freeze_prototypes_niters 1000 "
            "--noniid_ratio 1.0 --hetero --output_dir "
            f"./outputs/SwavSflV2_ResNet18_cifar10_cut1_bnlNone_client10_nonIID1.0_dirichlet {common} "
            "--batch_size 2 --avg_freq 10 --device cuda:5")),
        ScriptLine("scripts/table2/run_sflmoco_cross_client_cifar10_new.sh", ("python",), "run_sflmoco.py", _split(
            "--num_client 10 --lr 0.06 --cutlayer 2 --num_epoch 200 --noniid_ratio 1.0 --output_dir "
            f"./outputs/mocosflV2_ResNet18_cifar10_cut2_bnlNone_client10_nonIID1.0 {common} "
            "--batch_size 16 --avg_freq 10 --device cuda:0")),
    ]


def all_script_lines() -> list[ScriptLine]:
    """Every line: MocoSFL's table 2 (CIFAR-10, CIFAR-100) and table 3, then the seed's run scripts."""
    return [*mocosfl_table2("cifar10"), *mocosfl_table2("cifar100"), *mocosfl_table3(), *seed_run_scripts()]


def translate(line: ScriptLine, data_dir: Path, output_dir: Path, max_steps: int = 2) -> list[str]:
    """The line's options for this machine: paths, the CPU for a CUDA device, a step limit, no kNN monitor."""
    argv = list(line.argv)
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    if "--device" in argv:
        argv[argv.index("--device") + 1] = "cpu"
    return [*argv, "--data_dir", str(data_dir), "--max_steps", str(max_steps), "--eval_freq", "0"]


def _write_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=4)


def full_size_copies(mini_dir: Path, destination: Path) -> Path:
    """A data folder with cifar-10-batches-py and cifar-100-python as large as the real training sets, made by
    repeating the real images of `mini_dir` (the scripts' 1000 clients need about 50 images each); CIFAR-100's
    labels spread each CIFAR-10 class over ten fine classes. Made once per folder."""
    cifar10, cifar100 = destination / "cifar-10-batches-py", destination / "cifar-100-python"
    if (cifar100 / "test").is_file():
        return destination
    source = mini_dir / "cifar-10-batches-py"
    parts = [read_batch(source / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
    images = nhwc_to_rows(np.concatenate([part[0] for part in parts]))
    labels = np.concatenate([part[1] for part in parts])
    test_images, test_labels = read_batch(source / "test_batch", "labels", 10)
    test = {"data": nhwc_to_rows(test_images), "labels": test_labels.tolist()}
    repeats = -(-FULL_TRAIN_SIZE // len(images))
    images, labels = np.tile(images, (repeats, 1))[:FULL_TRAIN_SIZE], np.tile(labels, repeats)[:FULL_TRAIN_SIZE]
    cifar10.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(FULL_TRAIN_SIZE), 5), start=1):
        _write_pickle(cifar10 / f"data_batch_{index}", {"data": images[part], "labels": labels[part].tolist()})
    _write_pickle(cifar10 / "test_batch", test)
    cifar100.mkdir(parents=True, exist_ok=True)

    def fine(values: np.ndarray) -> list[int]:
        return (np.asarray(values) * 10 + np.arange(len(values)) % 10).tolist()

    _write_pickle(cifar100 / "train", {"data": images, "fine_labels": fine(labels), "coarse_labels": labels.tolist()})
    _write_pickle(cifar100 / "test", {"data": test["data"], "fine_labels": fine(test_labels),
                                      "coarse_labels": test_labels.tolist()})
    return destination
