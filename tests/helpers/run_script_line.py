"""Run an entry script's options without the final evaluations (for the script-line tests under torchrun):

    torchrun --nproc_per_node 2 tests/helpers/run_script_line.py moco --num_client 10 ...
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configs import parse_args  # noqa: E402
from functions.core.errors import run_cli  # noqa: E402
from functions.train.runner import run  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: run(parse_args(sys.argv[1], sys.argv[2:]), evaluations=[]))
