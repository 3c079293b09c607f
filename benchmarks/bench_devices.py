"""What real clients cost on loopback: the step time of a run whose last clients are device processes (mutual TLS on
127.0.0.1) over the same run all simulated, and the bytes a device sends and receives per step beside
functions.sfl.overhead's prediction.

    python benchmarks/bench_devices.py --cuts 1 2 [--width 16 --batch_size 8 --steps 12 --warmup 2]

Both runs train the same steps (MoCo, synthetic data, 4 clients, 2 remote, one torch thread everywhere); each step is
timed in the training loop (the networked one includes sending the tasks and waiting for the devices). Medians over
the steps after --warmup. Bytes are the framed messages (header and tensors), medians over steps without FedAvg.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import parse_args  # noqa: E402
from functions.core.distributed import Runtime  # noqa: E402
from functions.data.datasets import NO_DOWNLOAD_ENV  # noqa: E402
from functions.device.certificates import make_certificates  # noqa: E402
from functions.sfl.fedavg import fedavg_positions  # noqa: E402
from functions.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REMOTE = (2, 3)


def timed_trainer(options: list[str], folder: Path) -> tuple[Trainer, list[float]]:
    """A Trainer whose train_step records its wall time."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    trainer = Trainer(parse_args("moco", [*options, "--output_dir", str(folder)]), Runtime(torch.device("cpu")),
                      folder)
    times: list[float] = []
    step = trainer.train_step

    def timed(batch):
        started = time.perf_counter()
        result = step(batch)
        times.append(time.perf_counter() - started)
        return result

    trainer.train_step = timed
    return trainer, times


def run_cut(cut: int, args: argparse.Namespace, work: Path, certs: Path) -> dict[str, float]:
    """One cut: (simulated median step s, networked median step s, bytes up/down per step, predicted up/down)."""
    steps_per_epoch = 4
    options = ["--dataset", "synthetic", "--arch", "ResNet18", "--width", str(args.width), "--cutlayer", str(cut),
               "--num_client", "4", "--batch_size", str(args.batch_size), "--client_exec", "loop",
               "--data_proportion", str(4 * args.batch_size * steps_per_epoch / 512), "--min_client_samples", "1",
               "--num_epoch", str(-(-args.steps // steps_per_epoch)), "--max_steps", str(args.steps),
               "--num_workers", "0", "--K", "256", "--skip_linear", "--eval_freq", "0", "--log_freq", "100",
               "--seed", "1"]
    simulated, simulated_times = timed_trainer(options, work / f"simulated{cut}")
    simulated.train()
    simulated.close()
    networked, networked_times = timed_trainer([*options, "--remote_client_ids", *map(str, REMOTE), "--credentials",
                                                str(certs), "--listen", "127.0.0.1:0"], work / f"networked{cut}")
    env = {**os.environ, NO_DOWNLOAD_ENV: "1", "OMP_NUM_THREADS": "1"}
    devices = [subprocess.Popen([sys.executable, "-m", "functions.device", "--server",
                                 f"127.0.0.1:{networked.remote.server.port}", "--client_id", str(c), "--credentials",
                                 str(certs)], cwd=REPO, env=env, stderr=subprocess.DEVNULL) for c in REMOTE]
    try:
        networked.train()
        networked.close()
        for device in devices:
            device.wait(timeout=120)
    finally:
        for device in devices:
            device.kill()
    metrics = networked.log.metrics.data
    averaging = {epoch * steps_per_epoch + position + 1 for epoch in range(args.steps)
                 for position in fedavg_positions(steps_per_epoch, 1)}
    plain = [s for s in range(args.warmup + 1, args.steps + 1) if s not in averaging]

    def median_of(name: str) -> float:
        return statistics.median(v for c in REMOTE for s, v in metrics[f"device/{c}/{name}"] if s in plain)

    overhead = networked.overhead
    return {"simulated_s": statistics.median(simulated_times[args.warmup:]),
            "networked_s": statistics.median(networked_times[args.warmup:]),
            "bytes_up": median_of("bytes_up"), "bytes_down": median_of("bytes_down"),
            "round_trip_s": median_of("round_trip_s"), "compute_s": median_of("compute_s"),
            "predicted_up": overhead.smashed_up_bytes, "predicted_down": overhead.gradient_down_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        certs = work / "certs"
        make_certificates(certs, "127.0.0.1", list(REMOTE))
        print("cut  simulated s/step  networked s/step  ratio  up B/step (predicted)  down B/step (predicted)  "
              "device round trip s  device compute s")
        for cut in args.cuts:
            r = run_cut(cut, args, work, certs)
            print(f"{cut:>3}  {r['simulated_s']:>16.4f}  {r['networked_s']:>16.4f}  "
                  f"{r['networked_s'] / r['simulated_s']:>5.2f}  {r['bytes_up']:>9.0f} ({r['predicted_up']:>9})  "
                  f"{r['bytes_down']:>11.0f} ({r['predicted_down']:>9})  {r['round_trip_s']:>19.4f}  "
                  f"{r['compute_s']:>16.4f}", flush=True)


if __name__ == "__main__":
    main()
