"""The attack's option group: built from a run's namespace, with the command line's defaults."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest
import torch

from configs import parse_args
from functions.core.errors import UserError
from functions.evaluation.context import EvaluationContext, EvaluationOptions
from functions.privacy.attack_options import AttackOptions
from functions.privacy.attack_run import attack_on_client


def test_the_group_holds_the_attack_options_of_the_command_line() -> None:
    args = parse_args("moco", ["--attack", "--attack_protocol", "mocosfl", "--attack_data_proportion", "0.5",
                               "--aux_data", "heldout", "--aux_images", "7", "--MIA_arch", "conv_normN0C8",
                               "--attack_epochs", "3", "--attack_images", "5", "--seed", "9", "--data_dir", "images",
                               "--output_dir", "run", "--num_client", "3", "--attack_client", "2"])
    options = AttackOptions.from_args(args)
    assert {field.name: getattr(options, field.name) for field in fields(AttackOptions)} == {
        "attack_client": 2, "attack_images": 5, "attack_epochs": 3, "seed": 9, "output_dir": "run",
        "dataset": args.dataset, "data_dir": "images", "data_size": 32, "attack_protocol": "mocosfl",
        "attack_data_proportion": 0.5, "MIA_arch": "conv_normN0C8", "aux_data": "heldout", "aux_images": 7}
    assert EvaluationOptions.from_args(args).attack == options


def test_the_groups_defaults_are_the_command_lines() -> None:
    args = parse_args("moco", ["--attack"])
    required = {field.name: getattr(args, field.name) for field in fields(AttackOptions)
                if field.default is MISSING}
    assert AttackOptions(**required) == AttackOptions.from_args(args)


def test_no_attack_without_the_option_and_the_auxiliary_protocol_by_default() -> None:
    args = parse_args("moco", [])
    assert EvaluationOptions.from_args(args).attack is None
    older = argparse.Namespace(**{key: value for key, value in vars(args).items() if key != "attack_protocol"})
    assert AttackOptions.from_args(older).attack_protocol == "auxiliary"


def test_the_attack_refuses_an_evaluation_without_its_options() -> None:
    args = parse_args("moco", [])
    context = EvaluationContext(lambda images: images, torch.nn.Identity(), [], [], 10, args, torch.device("cpu"),
                                EvaluationOptions.from_args(args))
    with pytest.raises(UserError, match="no attack options; pass --attack"):
        attack_on_client(context)
