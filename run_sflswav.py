"""SFL-SwAV: split federated SwAV (multi-crop, prototypes, Sinkhorn over all clients' rows).

    python run_sflswav.py --config configs/swav_recommended.yaml
"""
from __future__ import annotations

import sys

from configs import parse_args
from functions.core.errors import run_cli
from functions.train.runner import run


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args("swav", argv))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
