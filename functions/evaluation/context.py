"""What an evaluation of a trained run may read, and the type of an evaluation."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from functions.evaluation.probes import extract_features
from functions.privacy.attack_options import AttackOptions


@dataclass(frozen=True)
class EvaluationOptions:
    """The run options the built-in evaluations read (the kNN monitor's too)."""

    knn_k: int                           # neighbours of the kNN accuracy
    knn_t: float                         # temperature of the kNN accuracy
    skip_linear: bool                    # no linear and semi-supervised probes
    linear_epochs: int                   # epochs of the probes
    seed: int                            # the probes' initialisation and order
    attack: AttackOptions | None = None  # the model-inversion attack after training (None: no attack)
    eval_protocol: str = "honest"        # honest, or mocosfl (figures selected on the test set)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluationOptions:
        """The group of a namespace (one not made by configs.parse_args may lack --attack and --eval_protocol)."""
        attack = AttackOptions.from_args(args) if getattr(args, "attack", False) else None
        return cls(knn_k=args.knn_k, knn_t=args.knn_t, skip_linear=args.skip_linear, linear_epochs=args.linear_epochs,
                   seed=args.seed, attack=attack, eval_protocol=getattr(args, "eval_protocol", "honest"))


@dataclass(eq=False)
class EvaluationContext:
    """What an evaluation of a trained run may read: the frozen encoder (averaged client part, then the server's
    backbone), the client part alone, the memory and test loaders, the run's options (the typed group the built-in
    evaluations read, the attack's included, and the whole namespace for an evaluation that reads options of its own).
    Features are extracted once, on first use, and shared by every evaluation."""

    encode: Callable[[Tensor], Tensor]
    client_model: nn.Module
    memory: Iterable
    test: Iterable
    num_classes: int
    args: Any
    device: torch.device
    options: EvaluationOptions
    # For the attack: a client's own training images (uint8 NHWC), the normalisation, whether this process writes.
    client_images: Callable[[int], np.ndarray] | None = None
    train_images: Callable[[], np.ndarray] | None = None  # all the run's training images (MocoSFL's attack)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    is_main: bool = True
    _features: dict[bool, tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def _extracted(self, normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if normalize not in self._features:
            train_features, train_labels = extract_features(self.encode, self.memory, self.device, normalize=normalize)
            test_features, test_labels = extract_features(self.encode, self.test, self.device, normalize=normalize)
            self._features[normalize] = (train_features, train_labels, test_features, test_labels)
        return self._features[normalize]

    @property
    def features(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train features, train labels, test features, test labels), L2-normalised, on the CPU."""
        return self._extracted(normalize=True)

    @property
    def raw_features(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The same, as the encoder returns them (MocoSFL's probes read unnormalised features)."""
        return self._extracted(normalize=False)

    @property
    def test_selected(self) -> bool:
        """Whether the figures are MocoSFL's, selected on the test set (--eval_protocol mocosfl)."""
        return self.options.eval_protocol == "mocosfl"


Evaluation = Callable[[EvaluationContext], dict[str, Any]]
