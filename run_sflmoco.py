"""SFL-MoCo (MocoSFL): split federated MoCo training, evaluation, checkpoints and resume.

    python run_sflmoco.py --config configs/quickstart.yaml
    python run_sflmoco.py --num_client 100 --batch_size 1 --partition dirichlet --cos --symmetric
"""
from __future__ import annotations

import sys

from configs import parse_args
from functions.core.errors import run_cli
from functions.train.runner import run


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args("moco", argv))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
