"""MocoSFL's attack (--attack_protocol mocosfl) on MocoSFL's published expert client parts, without a training run.

    python benchmarks/attack_experts.py --experts ../shared/mocosfl-expert --data_dir ../shared/data/cifar10-mini \
        --attack_data_proportion 0.1 --attack_epochs 50 [--cuts 1 2 3]

Each expert (ResNet-18 client, width 64, C4S2 bottleneck) is loaded as --initialze_path loads it and attacked as a
run's final evaluation attacks its clients (functions.privacy.attack_run with --attack_protocol mocosfl): the attacker
learns from --attack_data_proportion of the dataset's training images, then rebuilds --attack_images of them
(fixed by --seed). Prints one line of figures per cut (MocoSFL's logs: SSIM 0.46, 0.45 and 0.42 at cuts 1 to 3).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functions.data.datasets import load_dataset  # noqa: E402
from functions.evaluation.context import EvaluationContext, EvaluationOptions  # noqa: E402
from functions.privacy.attack import to_unit_images  # noqa: E402
from functions.privacy.attack_mocosfl import attack_set_size, invert_mocosfl  # noqa: E402
from functions.privacy.attack_options import AttackOptions  # noqa: E402
from functions.privacy.attack_run import attack_on_client, sample_images  # noqa: E402
from functions.privacy.expert import InitialWeightsOptions, load_initial_weights  # noqa: E402
from models.split import build_split_model  # noqa: E402

MOCOSFL_CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # MocoSFL's CIFAR-10 normalisation (its mean is this project's)


def _attack_given_targets(context: EvaluationContext, attack: AttackOptions, normalised: torch.Tensor) -> dict:
    """attack_on_client's MocoSFL protocol with the targets given as normalised images."""
    mean = torch.tensor(context.mean).view(1, 3, 1, 1)
    std = torch.tensor(context.std).view(1, 3, 1, 1)
    train_images = context.train_images()
    count = attack_set_size(len(train_images), attack.attack_data_proportion)
    attack_images = to_unit_images(sample_images(train_images, count, attack.seed + 1))
    targets = (normalised * std + mean).clamp(0, 1)  # MocoSFL's denormalize
    figures, _ = invert_mocosfl(context.client_model, attack_images, targets,
                                normalise=lambda images: (images - mean) / std, epochs=attack.attack_epochs,
                                seed=attack.seed)
    return {f"attack_{key}": value for key, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", required=True, help="the folder of MocoSFL's expert run folders")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--cuts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--attack_data_proportion", type=float, default=0.01)
    parser.add_argument("--attack_epochs", type=int, default=50)
    parser.add_argument("--attack_images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/attack_experts")
    parser.add_argument("--normalisation", choices=("mocosfl", "dataset"), default="mocosfl",
                        help="mocosfl: CIFAR-10 std (0.2023, 0.1994, 0.2010), which the experts were trained with; "
                             "dataset: this project's CIFAR-10 statistics, as a run would normalise")
    parser.add_argument("--mocosfl_targets", default=None,
                        help="attack these targets instead: a tensor file of normalised images such as MocoSFL's "
                             "saved_tensors/test_cifar10_image.pt, fed to the client as stored and denormalised with "
                             "--normalisation's statistics for the ground truth, as MocoSFL's attack does")
    options = parser.parse_args()
    dataset = load_dataset(options.dataset, options.data_dir, download=False)
    for cutlayer in options.cuts:
        folder = sorted(Path(options.experts).glob(f"*_cut{cutlayer}_*"))[0]
        split = build_split_model("ResNet18", cutlayer, width=64, bottleneck="C4S2")
        load_initial_weights(InitialWeightsOptions(initialze_path=str(folder), arch="ResNet18", cutlayer=cutlayer,
                                                   load_server=False), split)
        attack = AttackOptions(attack_client=0, attack_images=options.attack_images,
                               attack_epochs=options.attack_epochs, seed=options.seed,
                               output_dir=str(Path(options.output_dir) / f"cut{cutlayer}"), dataset=options.dataset,
                               data_dir=options.data_dir, data_size=None, attack_protocol="mocosfl",
                               attack_data_proportion=options.attack_data_proportion)
        Path(attack.output_dir).mkdir(parents=True, exist_ok=True)
        std = MOCOSFL_CIFAR10_STD if options.normalisation == "mocosfl" else dataset.std
        # Only the attack runs on this context: no kNN accuracy, no probe.
        attack_only = EvaluationOptions(knn_k=0, knn_t=0.0, skip_linear=True, linear_epochs=0, seed=options.seed,
                                        attack=attack)
        context = EvaluationContext(lambda images: images, split.client.eval(), [], [], dataset.num_classes, options,
                                    torch.device("cpu"), attack_only, client_images=lambda client: dataset.train_images,
                                    train_images=lambda: dataset.train_images, mean=dataset.mean, std=std)
        started = time.time()
        if options.mocosfl_targets:
            figures = _attack_given_targets(context, attack, torch.load(options.mocosfl_targets, map_location="cpu"))
        else:
            figures = attack_on_client(context)
        figures["wall_s"] = round(time.time() - started, 1)
        print(json.dumps({"cut": cutlayer, **figures}), flush=True)


if __name__ == "__main__":
    main()
