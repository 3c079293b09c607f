"""SFL-MoCo (MocoSFL): split federated MoCo training, evaluation, checkpoints and resume.

    python run_sflmoco.py --config configs/quickstart.yaml
    python run_sflmoco.py --num_client 100 --batch_size 1 --partition dirichlet --cos --symmetric
"""
from __future__ import annotations

import sys

from functions.errors import run_cli


def main(argv: list[str] | None = None) -> dict:
    from configs import parse_args
    from functions.runner import run

    return run(parse_args("moco", argv))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
