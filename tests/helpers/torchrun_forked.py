"""torchrun, its own command line, with the workers forked from this process once it has imported the entry scripts
(torchrun's --run-path --start-method fork), instead of each worker starting Python and importing torch, torchvision
and the project again: the same rendezvous, environment and ranks, a few seconds of CPU less per worker.

    python tests/helpers/torchrun_forked.py --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P script args
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import multicropdataset  # noqa: E402,F401  (the torch data path and torchvision, for the forked workers)
import run_sflmoco  # noqa: E402,F401
import run_sflswav  # noqa: E402,F401
from torch.distributed import run as torchrun  # noqa: E402

if __name__ == "__main__":
    torchrun.main(["--run-path", "--start-method", "fork", *sys.argv[1:]])
