"""The run options the model-inversion attack (--attack, functions.privacy.attack_run) reads, as one typed group."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class AttackOptions:
    """Whose images the attack rebuilds, with which attacker, and where it writes; the options of one protocol only
    default to the command line's defaults (a group built without a namespace sets those of its own protocol)."""

    attack_client: int                      # the client whose training images are attacked
    attack_images: int                      # target images rebuilt and scored
    attack_epochs: int                      # epochs of the attacker's decoder training
    seed: int                               # draws the targets and the attacker's images, seeds the decoder
    output_dir: str                         # the run folder: attack.png and the tensorboard image
    dataset: str                            # the run's dataset (its test images for --aux_data heldout)
    data_dir: str                           # where --aux_data is read
    data_size: int | None                   # the run's --data_size, the auxiliary dataset's too (None: its own size)
    attack_protocol: str = "auxiliary"      # auxiliary (this project's), or mocosfl
    attack_data_proportion: float = 0.01    # mocosfl: the share of the run's training images the attacker gets
    MIA_arch: str = "custom"                # auxiliary: the decoder (custom is this project's default decoder)
    aux_data: str = "cifar100"              # auxiliary: the attacker's dataset, or heldout (the run's test images)
    aux_images: int = 10000                 # auxiliary: at most this many of the attacker's images

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AttackOptions:
        """The group of a namespace (one not made by configs.parse_args may lack --attack_protocol)."""
        return cls(attack_client=args.attack_client, attack_images=args.attack_images,
                   attack_epochs=args.attack_epochs, seed=args.seed, output_dir=args.output_dir,
                   dataset=args.dataset, data_dir=args.data_dir, data_size=args.data_size,
                   attack_protocol=getattr(args, "attack_protocol", "auxiliary"),
                   attack_data_proportion=args.attack_data_proportion, MIA_arch=args.MIA_arch,
                   aux_data=args.aux_data, aux_images=args.aux_images)
