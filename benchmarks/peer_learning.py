"""Learning side by side: MocoSFL's own run_sflmoco.py and this project's, same images and settings, per epoch.

    python benchmarks/peer_learning.py --peer_dir ~/src/MocoSFL --data_dir ~/data/cifar10-mini \
        --epochs 8 --seeds 0 1 2 --json learning.json
    python benchmarks/peer_learning.py ... --own_extra "--compat mocosfl"    # this project with MocoSFL's bugs

Both scripts train SFL-MoCo (ResNet-18 at --width, cut --cutlayer, MocoSFL's --moco_version V2, --clients clients of
--batch images, IID, --lr, --K) on the same CIFAR-10 files (--data_dir holds cifar-10-batches-py; --data_proportion
of the training images) for --epochs epochs, once per seed, each run in a process of its own and one after another.
The table gives, per epoch, the kNN accuracy and the epoch's mean loss of each side (mean +- standard deviation over
the seeds); --json keeps every run's figures.

MocoSFL's side is its run_sflmoco.py from --peer_dir (github.com/SonyResearch/MocoSFL; nothing of it is copied
here), run as a script and patched at run time only: `.cuda()` of tensors and modules is a no-op (CPU); its
datasets.py reads CIFAR-10 from ./data through torchvision with download=True, so the run's folder gets a `data`
link to --data_dir and torchvision's archive check is skipped (files of a reduced CIFAR-10 are not the archive's);
for a --width other than its 64, its stem and blocks are built that wide (benchmarks/peer_mocosfl.py's
scale_peer_width) and its projection head's first layer takes the narrower pooled features (its script hard-codes
512); NumPy 2's missing `numpy.Inf` alias is put back. Training ends where its script would start the final probes
(its `load_model` of the best checkpoint), so the figures are those of its own per-epoch log line (kNN with 2
decimals, mean contrastive loss).

Differences in what is measured, not in training: MocoSFL's kNN monitor reads the projection head's output and
keeps all training images as its memory; this project's reads the backbone's pooled features and keeps the
--data_proportion it trained on (both k = 200, t = 0.1, against all test images). With --peer_backbone_knn,
MocoSFL's model is also measured on its backbone's pooled features after each of its own kNN monitors (its random
state saved and put back, so its training is unchanged): the column "MocoSFL backbone". This project's run also
gives the kNN accuracy before training (epoch 0). Epoch length: MocoSFL runs ceil(client 0's images / --batch)
steps, this project round(images / rows per step), which can differ by one; the footer gives both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from peer_mocosfl import scale_peer_width  # noqa: E402

from functions.core.errors import UserError, run_cli  # noqa: E402

SIDES = ("mocosfl", "ours")
SIDE_NAMES = {"mocosfl": "MocoSFL", "ours": "this project"}
PEER_FILES = ("run_sflmoco.py", "datasets.py", "models/resnet.py", "functions/sflmoco_functions.py",
              "configs/__init__.py")
# MocoSFL's per-epoch line (run_sflmoco.py) and its count of steps per epoch.
PEER_EPOCH_LINE = re.compile(r"epoch:(\d+), knn_val_accu: ([-\d.naife]+), contrast_loss: ([-\d.naife]+)")
PEER_STEPS_LINE = re.compile(r"total number of batches for each client is (\d+)")
FIGURES = ("knn", "knn_backbone", "loss")
BACKBONE_KNN_FILE = "backbone_knn.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer_dir", type=str, required=True, help="a checkout of MocoSFL (its run_sflmoco.py)")
    parser.add_argument("--data_dir", type=str, required=True, help="a folder with cifar-10-batches-py/")
    parser.add_argument("--data_proportion", type=float, default=0.5, help="fraction of the training images used")
    parser.add_argument("--clients", type=int, default=10, help="clients, all in every step")
    parser.add_argument("--batch", type=int, default=8, help="images per client per step")
    parser.add_argument("--cutlayer", type=int, default=2, help="cut layer (MocoSFL's numbering = this project's)")
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width (MocoSFL's own is 64, others scaled)")
    parser.add_argument("--moco_version", type=str, default="V2", help="MocoSFL's version (head, views, loss, lr)")
    parser.add_argument("--K", type=int, default=6000, help="keys in the queue (MocoSFL's default)")
    parser.add_argument("--lr", type=float, default=0.06, help="server and client learning rate")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per side and seed")
    parser.add_argument("--sides", type=str, nargs="+", default=list(SIDES), choices=SIDES, help="what to train")
    parser.add_argument("--own_extra", type=str, default="",
                        help="more options for this project's run, e.g. '--compat mocosfl' or '--client_exec loop'")
    parser.add_argument("--peer_backbone_knn", action="store_true",
                        help="also measure MocoSFL's model each epoch as this project's monitor does (kNN on the "
                             "backbone's pooled features), its random state kept as it was")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run")
    parser.add_argument("--runs_dir", type=str, default=None,
                        help="keep the runs' folders here (default: a temporary folder, removed at the end)")
    parser.add_argument("--json", type=str, default=None, help="write every run's figures to this JSON file")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", type=str, default=None, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def shared_options(options: argparse.Namespace, seed: int) -> list[str]:
    """The options both run_sflmoco.py scripts read, with the same meaning on both sides."""
    return ["--dataset", "cifar10", "--arch", "ResNet18", "--num_client", str(options.clients),
            "--batch_size", str(options.batch), "--cutlayer", str(options.cutlayer),
            "--moco_version", options.moco_version, "--K", str(options.K), "--lr", str(options.lr),
            "--num_epoch", str(options.epochs), "--data_proportion", str(options.data_proportion),
            "--noniid_ratio", "1.0", "--avg_freq", "1", "--num_workers", "0", "--seed", str(seed)]


def peer_command(options: argparse.Namespace, seed: int, output_dir: Path) -> list[str]:
    """MocoSFL's command line (its script reads the images from ./data, linked to --data_dir)."""
    return ["run_sflmoco.py", *shared_options(options, seed), "--output_dir", str(output_dir)]


def own_command(options: argparse.Namespace, seed: int, output_dir: Path) -> list[str]:
    """This project's command line: the shared options plus its width, the IID split, no final probes and a loss
    logged every step (the epoch's mean is taken from metrics.json)."""
    return [sys.executable, str(REPO_ROOT / "run_sflmoco.py"), *shared_options(options, seed),
            "--data_dir", str(Path(options.data_dir).resolve()), "--width", str(options.width), "--partition", "iid",
            "--eval_freq", "1", "--skip_linear", "--log_freq", "1", "--output_dir", str(output_dir),
            *shlex.split(options.own_extra)]


# ------------------------------------------------------------------------------------------------- parsing
def parse_peer_log(text: str) -> dict[str, Any]:
    """MocoSFL's output.log: its steps per epoch and, per epoch, the kNN accuracy and the mean loss it printed."""
    epochs = [{"epoch": int(epoch), "knn": float(knn), "loss": float(loss)}
              for epoch, knn, loss in PEER_EPOCH_LINE.findall(text)]
    steps = PEER_STEPS_LINE.search(text)
    return {"steps_per_epoch": int(steps.group(1)) if steps else None, "epochs": epochs}


def merge_backbone_knn(parsed: dict[str, Any], lines: Sequence[str]) -> dict[str, Any]:
    """Add the worker's per-epoch backbone kNN accuracies (JSON lines {"epoch", "knn_backbone"}) to a parsed log."""
    by_epoch = {}
    for line in lines:
        if line.strip():
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = float(record["knn_backbone"])
    for row in parsed["epochs"]:
        row["knn_backbone"] = by_epoch.get(row["epoch"])
    return parsed


def parse_own_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """This project's metrics.json: per epoch the kNN accuracy and the mean of its steps' losses (epoch 0: the kNN
    accuracy before training, no loss)."""
    steps_per_epoch = int(metrics["steps_per_epoch"])
    losses: dict[int, list[float]] = {}
    for step, loss in metrics.get("train_loss", []):
        losses.setdefault((int(step) - 1) // steps_per_epoch + 1, []).append(float(loss))
    knn = {int(epoch): float(accuracy) for epoch, accuracy in metrics.get("knn_acc", [])}
    epochs = []
    for epoch in sorted(set(knn) | set(losses)):
        epochs.append({"epoch": epoch, "knn": knn.get(epoch),
                       "loss": statistics.fmean(losses[epoch]) if epoch in losses else None})
    return {"steps_per_epoch": steps_per_epoch, "epochs": epochs}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """{side: {epoch: {"knn": [one value per seed], "loss": [...]}}} from the runs' records."""
    summary: dict[str, dict[int, dict[str, list[float]]]] = {}
    for record in records:
        for row in record["epochs"]:
            cell = summary.setdefault(record["side"], {}).setdefault(row["epoch"], {name: [] for name in FIGURES})
            for name in FIGURES:
                if row.get(name) is not None:
                    cell[name].append(row[name])
    return summary


def mean_and_spread(values: Sequence[float], digits: int) -> str:
    """'mean' for one value, 'mean ± sd' for several, '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(records: Sequence[dict[str, Any]], sides: Sequence[str]) -> str:
    """Markdown: a row per epoch; kNN accuracy (%) then epoch loss, a column per side (mean ± sd over seeds)."""
    summary = summarise(records)
    columns = [(f"kNN % {SIDE_NAMES[side]}", side, "knn", 2) for side in sides]
    if "mocosfl" in sides and any(row.get("knn_backbone") is not None for record in records
                                  for row in record["epochs"]):
        columns.insert(sides.index("mocosfl") + 1, ("kNN % MocoSFL backbone", "mocosfl", "knn_backbone", 2))
    columns += [(f"loss {SIDE_NAMES[side]}", side, "loss", 3) for side in sides]
    lines = ["| epoch | " + " | ".join(column[0] for column in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for epoch in sorted({epoch for side in sides for epoch in summary.get(side, {})}):
        cells = [mean_and_spread(summary.get(side, {}).get(epoch, {}).get(name, []), digits)
                 for _, side, name, digits in columns]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_footer(records: Sequence[dict[str, Any]], sides: Sequence[str]) -> str:
    """Seeds, steps per epoch and minutes per run of each side."""
    parts = []
    for side in sides:
        runs = [r for r in records if r["side"] == side]
        if runs:
            steps = sorted({r["steps_per_epoch"] for r in runs if r["steps_per_epoch"] is not None})
            minutes = statistics.fmean(r["seconds"] for r in runs) / 60
            parts.append(f"{SIDE_NAMES[side]}: seeds {', '.join(str(r['seed']) for r in runs)}, steps per epoch "
                         f"{', '.join(map(str, steps)) or '?'}, {minutes:.1f} min per run")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------- workers
class TrainingDone(Exception):
    """Raised where MocoSFL's script would load its best checkpoint for the final probes: training is over."""


def scale_head_input(resnet_module: Any, width: int) -> None:
    """Give MocoSFL's projection head the pooled features of a `width`-wide ResNet (its script builds the first
    layer for 512 = 8 x 64): the first Linear is rebuilt with 8 x width inputs, initialised by its init_weights."""
    if width == 64:
        return
    from torch import nn

    merge = resnet_module.ResNet.merge_classifier_cloud

    def merged(self: Any) -> None:
        features = 8 * width * self.expansion
        head = self.classifier
        first = head[0] if isinstance(head, nn.Sequential) else head
        if isinstance(first, nn.Linear) and first.in_features != features:
            replacement = nn.Linear(features, first.out_features)
            replacement.apply(resnet_module.init_weights)
            if isinstance(head, nn.Sequential):
                head[0] = replacement
            else:
                self.classifier = replacement
        merge(self)

    resnet_module.ResNet.merge_classifier_cloud = merged


def weighted_knn_accuracy(bank: Any, bank_labels: Any, queries: Any, query_labels: Any, classes: int,
                          k: int = 200, temperature: float = 0.1) -> float:
    """Accuracy (%) of the similarity-weighted kNN vote (InstDisc's monitor) on L2-normalised features."""
    import torch

    similarity = queries @ bank.t()
    weights, indices = similarity.topk(k=min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], classes).scatter_add_(1, bank_labels[indices], (weights / temperature).exp())
    return 100.0 * (votes.argmax(dim=1) == query_labels).float().mean().item()


def peer_backbone_knn(simulator: Any, memloader: Any) -> float:
    """kNN accuracy of MocoSFL's model (client 0's part and the server's) on the backbone's pooled features, with
    its own memory and test loaders; every random state is put back, so its training goes on unchanged."""
    import random

    import numpy
    import torch
    import torch.nn.functional as F
    from torch import nn

    states = torch.get_rng_state(), numpy.random.get_state(), random.getstate()
    layers = list(simulator.model.cloud.children())
    pooled = next(i for i, layer in enumerate(layers) if type(layer).__name__ == "MobView") + 1
    backbone = nn.Sequential(simulator.model.local_list[0], *layers[:pooled])

    def features(loader: Any) -> tuple[Any, Any]:
        batches = [(F.normalize(backbone(images), dim=1), labels) for images, labels in loader]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    simulator.eval()
    with torch.no_grad():
        bank, bank_labels = features(memloader[0])
        queries, query_labels = features(simulator.validate_loader)
    simulator.train()
    torch.set_rng_state(states[0])
    numpy.random.set_state(states[1])
    random.setstate(states[2])
    return weighted_knn_accuracy(bank, bank_labels, queries, query_labels, simulator.num_class)


def run_peer_worker(options: argparse.Namespace) -> None:
    """MocoSFL's run_sflmoco.py as a script, in this process (cwd: the run's folder, with its data link)."""
    import runpy

    import numpy
    import torch
    import torchvision
    from torch import nn

    torch.set_num_threads(options.threads)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    # A reduced CIFAR-10 is not the archive torchvision checks before it would download one.
    torchvision.datasets.CIFAR10._check_integrity = lambda self: True  # type: ignore[method-assign]
    if not hasattr(numpy, "Inf"):
        numpy.Inf = numpy.inf  # NumPy 2 dropped the alias MocoSFL's loss_based_status starts from
    # MocoSFL's packages have this project's names (functions, models, configs): forget ours in this process.
    for name in list(sys.modules):
        if name.split(".")[0] in ("functions", "models", "configs", "utils", "datasets"):
            del sys.modules[name]
    peer = Path(options.peer_dir).resolve()
    sys.path[:] = [entry for entry in sys.path
                   if Path(entry or ".").resolve() not in (REPO_ROOT, REPO_ROOT / "benchmarks")]
    sys.path.insert(0, str(peer))
    from functions import sflmoco_functions  # MocoSFL's
    from models import resnet  # MocoSFL's

    scale_peer_width(resnet, options.width)
    scale_head_input(resnet, options.width)

    def stop(*args: Any, **kwargs: Any) -> None:
        raise TrainingDone

    sflmoco_functions.sflmoco_simulator.load_model = stop
    if options.peer_backbone_knn:
        own_knn = sflmoco_functions.sflmoco_simulator.knn_eval
        measured = Path(options.output_dir) / BACKBONE_KNN_FILE

        def knn_eval(self: Any, memloader: Any) -> float:
            accuracy = own_knn(self, memloader)
            epoch = len(measured.read_text().splitlines()) + 1 if measured.exists() else 1
            with open(measured, "a") as lines:
                lines.write(json.dumps({"epoch": epoch, "knn_backbone": peer_backbone_knn(self, memloader)}) + "\n")
            return accuracy

        sflmoco_functions.sflmoco_simulator.knn_eval = knn_eval
    sys.argv = peer_command(options, options.seed, Path(options.output_dir))
    try:
        runpy.run_path(str(peer / "run_sflmoco.py"), run_name="__main__")
    except TrainingDone:
        pass


def run_side(options: argparse.Namespace, side: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """One training run of one side in a process of its own; its per-epoch figures."""
    run_dir = runs_dir / f"{side}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    output_dir = run_dir / "output"
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads), "MKL_NUM_THREADS": str(options.threads)}
    if side == "mocosfl":
        data_link = run_dir / "data"
        if not data_link.exists():
            data_link.symlink_to(Path(options.data_dir).resolve(), target_is_directory=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "mocosfl", "--peer_dir",
                   options.peer_dir, "--data_dir", options.data_dir, "--seed", str(seed), "--output_dir",
                   str(output_dir), *worker_options(options)]
    else:
        command = own_command(options, seed, output_dir)
    print(f"training {SIDE_NAMES[side]}, seed {seed} ...", file=sys.stderr, flush=True)
    begin = time.perf_counter()
    with open(run_dir / "console.log", "w") as console:
        finished = subprocess.run(command, cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - begin
    if finished.returncode != 0:
        tail = (run_dir / "console.log").read_text(errors="replace").splitlines()[-15:]
        raise UserError(f"the {SIDE_NAMES[side]} run (seed {seed}) failed; the end of {run_dir / 'console.log'}:\n"
                        + "\n".join(tail))
    if side == "mocosfl":
        result = parse_peer_log((output_dir / "output.log").read_text(errors="replace"))
        if options.peer_backbone_knn:
            result = merge_backbone_knn(result, (output_dir / BACKBONE_KNN_FILE).read_text().splitlines())
    else:
        result = parse_own_metrics(json.loads((output_dir / "metrics.json").read_text()))
    return {"side": side, "seed": seed, "seconds": seconds, **result}


def worker_options(options: argparse.Namespace) -> list[str]:
    """The settings a MocoSFL worker needs, as options of this script."""
    return ["--data_proportion", str(options.data_proportion), "--clients", str(options.clients),
            "--batch", str(options.batch), "--cutlayer", str(options.cutlayer), "--width", str(options.width),
            "--moco_version", options.moco_version, "--K", str(options.K), "--lr", str(options.lr),
            "--epochs", str(options.epochs), "--threads", str(options.threads),
            *(["--peer_backbone_knn"] if options.peer_backbone_knn else [])]


def check_options(options: argparse.Namespace) -> None:
    """Refuse a missing checkout or data folder and impossible numbers (one line each)."""
    peer = Path(options.peer_dir)
    missing = [name for name in PEER_FILES if not (peer / name).is_file()]
    if missing:
        raise UserError(f"--peer_dir {peer} is not a MocoSFL checkout (no {missing[0]}); clone "
                        "https://github.com/SonyResearch/MocoSFL and pass its folder")
    if not (Path(options.data_dir) / "cifar-10-batches-py").is_dir():
        raise UserError(f"--data_dir {options.data_dir} has no cifar-10-batches-py/ folder")
    for name in ("clients", "batch", "epochs", "threads", "width", "K"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0.0 < options.data_proportion <= 1.0:
        raise UserError(f"--data_proportion must be in (0, 1], got {options.data_proportion}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    options = build_parser().parse_args(argv)
    if options.worker is not None:
        run_peer_worker(options)
        return []
    check_options(options)
    temporary = None if options.runs_dir else tempfile.TemporaryDirectory(prefix="peer_learning_")
    runs_dir = Path(options.runs_dir or temporary.name)
    try:
        records = [run_side(options, side, seed, runs_dir) for seed in options.seeds for side in options.sides]
    finally:
        if temporary is not None:
            temporary.cleanup()
    print(f"SFL-MoCo {options.moco_version}, ResNet-18 width {options.width}, cut {options.cutlayer}, "
          f"{options.clients} IID clients x {options.batch} images, {options.data_proportion:g} of the training "
          f"images, K {options.K}, lr {options.lr:g}, {options.epochs} epochs"
          + (f", this project with {options.own_extra}" if options.own_extra else "")
          + "; kNN: MocoSFL's on the projection output, this project's on the backbone features:")
    print(format_table(records, options.sides))
    print(format_footer(records, options.sides))
    if options.json:
        Path(options.json).write_text(json.dumps({"options": {k: v for k, v in vars(options).items()
                                                              if k not in ("worker", "seed", "output_dir")},
                                                  "runs": records}, indent=1))
    return records


if __name__ == "__main__":
    run_cli(main)
