"""Golden part `communication`: MocoSFL's loss-based communication status (--loss_threshold) on fixed loss sequences.

    python benchmarks/golden/communication.py --peer_dir MOCOSFL_CHECKOUT

MocoSFL's loss_based_status (functions/sfl_functions.py) is fed each sequence's epoch losses in run_sflmoco.py's
order: the status read at the start of epoch e is the one epoch e trains in, then record_loss(e, loss of epoch e).
Recorded per sequence: the status of every epoch, MocoSFL's epoch_recording at the end and its printed saving
(C + B / 2).
"""
from __future__ import annotations

import argparse

import peer

THRESHOLD = 0.05
# Epoch losses (the first 10 epochs always communicate): slow falls (below the threshold), fast falls, rises.
SEQUENCES = {
    "plateau_then_drop": [6.0, 5.8, 5.6, 5.5, 5.4, 5.3, 5.2, 5.1, 5.0, 4.9, 4.88, 4.87, 4.86, 4.85, 4.84, 4.7,
                          4.69, 4.68, 4.67, 4.66],
    "flat": [5.0] * 10 + [4.99, 4.98, 4.975, 4.97, 4.969, 4.968, 4.967, 4.966, 4.965, 4.964, 4.963, 4.962, 4.961,
                          4.96, 4.959, 4.958],
    "alternating": [6.0, 5.9, 5.8, 5.7, 5.6, 5.5, 5.4, 5.3, 5.2, 5.1, 5.09, 5.0, 4.99, 4.98, 4.9, 4.89, 4.95, 4.94,
                    4.8, 4.79, 4.78],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True, help="a checkout of MocoSFL")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    import numpy

    if not hasattr(numpy, "Inf"):
        numpy.Inf = numpy.inf  # MocoSFL's starting loss; NumPy 2 dropped the alias (the value is the same)
    from functions.sfl_functions import loss_based_status  # MocoSFL's

    values = {"threshold": THRESHOLD}
    for name, losses in SEQUENCES.items():
        status = loss_based_status(loss_threshold=THRESHOLD)
        statuses = []
        for epoch, loss in enumerate(losses, start=1):
            statuses.append(status.status)
            status.record_loss(epoch, loss)
        recording = dict(status.epoch_recording)
        values[name] = {"losses": losses, "statuses": statuses, "status_after_last": status.status,
                        "epoch_recording": recording, "saving": recording["C"] + recording["B"] / 2}
    peer.write_fixture("communication", options.peer_dir, values)


if __name__ == "__main__":
    main()
