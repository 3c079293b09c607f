"""Split a labelled training set across federated clients: IID, class shards (MocoSFL noniid_ratio) or Dirichlet.

Every method returns one sorted int64 index array per client; the arrays are disjoint, together cover every
sample, and depend only on the labels, the options and the seed.

Command line: ``python -m functions.data.partition --dataset cifar10 --data_dir D --num_client 10
--partition dirichlet --dirichlet_alpha 0.1 --output_dir OUT`` writes OUT/partition.json and OUT/partition.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from functions.core.errors import UserError, run_cli
from functions.core.files import write_atomic, write_text_atomic
from functions.data.datasets import dataset_names, load_dataset

PARTITION_METHODS = ("iid", "shard", "dirichlet")
DIRICHLET_MAX_DRAWS = 200  # redraws allowed to reach min_client_samples before giving up
ANNOTATE_MAX_CELLS = 400  # write counts into heatmap cells only while they stay legible
_TITLE_KEYS = ("dataset", "method", "partition", "dirichlet_alpha", "noniid_ratio", "seed")  # extra keys shown on the plot


def _check_request(labels: np.ndarray, num_client: int, num_classes: int, min_client_samples: int) -> None:
    """Raise UserError for client counts and minimum sizes that no split of these labels can satisfy."""
    if num_client < 1:
        raise UserError(f"--num_client must be at least 1, got {num_client}")
    if min_client_samples < 1:
        raise UserError(f"--min_client_samples must be at least 1, got {min_client_samples}")
    num_samples = int(labels.shape[0])
    if num_client > num_samples:
        raise UserError(f"cannot split {num_samples} samples across {num_client} clients; "
                        f"use at most {num_samples} clients (or a larger --data_proportion)")
    if num_client * min_client_samples > num_samples:
        raise UserError(f"{num_client} clients x --min_client_samples {min_client_samples} needs "
                        f"{num_client * min_client_samples} samples but there are {num_samples}; "
                        f"use fewer clients or lower --min_client_samples")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")


def _iid(labels: np.ndarray, num_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random split into num_client parts whose sizes differ by at most one."""
    return list(np.array_split(rng.permutation(labels.shape[0]), num_client))


def classes_per_client(noniid_ratio: float, num_classes: int) -> int:
    """Number of classes each client holds in shard mode: round(noniid_ratio * num_classes), at least 1."""
    return max(1, min(num_classes, math.floor(noniid_ratio * num_classes + 0.5)))


def _shard(labels: np.ndarray, num_client: int, num_classes: int, noniid_ratio: float,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Each client gets classes_per_client classes, each class's samples split evenly among its holders."""
    held = classes_per_client(noniid_ratio, num_classes)
    if num_client * held < num_classes:
        raise UserError(f"shard partition: {num_client} clients x {held} classes each (noniid_ratio "
                        f"{noniid_ratio}) cannot cover all {num_classes} classes; raise --noniid_ratio to at least "
                        f"{math.ceil(num_classes / num_client) / num_classes:g} or use more clients")
    # Walking round a shuffled class cycle hands out consecutive classes, so one client's classes are distinct
    # and every class is held by floor or ceil of num_client * held / num_classes clients.
    class_cycle = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_client):
        for slot in range(held):
            holders[int(class_cycle[(client * held + slot) % num_classes])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_client)]
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        clients = rng.permutation(holders[label])  # which holder gets the larger piece is left to chance
        for client, piece in zip(clients, np.array_split(members, len(clients))):
            parts[int(client)].append(piece)
    return [np.concatenate(pieces) if pieces else np.empty(0, np.int64) for pieces in parts]


def _dirichlet_draw(members_by_class: Sequence[np.ndarray], num_client: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray] | None:
    """One Dirichlet split: per class, client shares ~ Dirichlet(alpha); None when the draw is numerically unusable."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_client)]
    for members in members_by_class:
        shares = rng.dirichlet(np.full(num_client, alpha))
        if not np.all(np.isfinite(shares)):  # tiny alphas can underflow to 0/0
            return None
        cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for client, piece in enumerate(np.split(rng.permutation(members), cuts)):
            parts[client].append(piece)
    return [np.concatenate(pieces) for pieces in parts]


def _dirichlet(labels: np.ndarray, num_client: int, num_classes: int, alpha: float, min_client_samples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet split, redrawn (at most DIRICHLET_MAX_DRAWS times) until every client has min_client_samples."""
    members_by_class = [np.flatnonzero(labels == label) for label in range(num_classes)]
    members_by_class = [members for members in members_by_class if members.size]
    for _ in range(DIRICHLET_MAX_DRAWS):
        parts = _dirichlet_draw(members_by_class, num_client, alpha, rng)
        if parts is not None and min(part.size for part in parts) >= min_client_samples:
            return parts
    raise UserError(f"dirichlet partition: no draw in {DIRICHLET_MAX_DRAWS} gave all {num_client} clients at "
                    f"least {min_client_samples} samples with dirichlet_alpha={alpha}; raise --dirichlet_alpha, "
                    f"lower --min_client_samples or use fewer clients")


def make_partition(labels: np.ndarray, num_client: int, method: str, num_classes: int, *,
                   dirichlet_alpha: float = 0.4, noniid_ratio: float = 1.0,
                   min_client_samples: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Split sample indices across clients by method (iid, shard, dirichlet); sorted int64 arrays, deterministic."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if method not in PARTITION_METHODS:
        raise UserError(f"unknown partition '{method}'; choose one of {', '.join(PARTITION_METHODS)}")
    if not dirichlet_alpha > 0:
        raise UserError(f"--dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    if not 0.0 < noniid_ratio <= 1.0:
        raise UserError(f"--noniid_ratio must be in (0, 1], got {noniid_ratio}")
    _check_request(labels, num_client, num_classes, min_client_samples)
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = _iid(labels, num_client, rng)
    elif method == "shard":
        parts = _shard(labels, num_client, num_classes, noniid_ratio, rng)
    else:
        parts = _dirichlet(labels, num_client, num_classes, dirichlet_alpha, min_client_samples, rng)
    client_indices = [np.sort(part).astype(np.int64) for part in parts]
    smallest = min(range(num_client), key=lambda client: client_indices[client].size)
    if client_indices[smallest].size < min_client_samples:
        raise UserError(f"{method} partition leaves client {smallest} with {client_indices[smallest].size} samples, "
                        f"fewer than --min_client_samples {min_client_samples}; use fewer clients, "
                        f"lower --min_client_samples or pick another --partition")
    return client_indices


def hetero_partition(num_samples: int, num_client: int, hetero_string: str, seed: int) -> list[np.ndarray]:
    """IID split where a fraction A of clients (rich) holds a fraction B of the data (MocoSFL's --hetero_string)."""
    rich_fraction, rich_data, _ = parse_hetero_string(hetero_string)
    num_rich = max(1, int(round(rich_fraction * num_client)))
    if num_rich >= num_client:
        raise UserError(f"--hetero_string {hetero_string!r} leaves no poor clients among {num_client}")
    order = np.random.default_rng([seed, 7]).permutation(num_samples)
    rich_total = int(round(rich_data * num_samples))
    rich_parts = np.array_split(order[:rich_total], num_rich)
    poor_parts = np.array_split(order[rich_total:], num_client - num_rich)
    parts = [np.sort(part).astype(np.int64) for part in (*rich_parts, *poor_parts)]
    if min(len(part) for part in parts) == 0:
        raise UserError(f"--hetero_string {hetero_string!r} leaves a client with no data; use fewer clients")
    return parts


_HETERO = re.compile(r"^([0-9.]+)_([0-9.]+)\|([0-9.]+)\|([0-9.]+)_([0-9.]+)$")


def parse_hetero_string(text: str) -> tuple[float, float, float]:
    """'A_B|C|D_E' -> (rich client fraction A, their data fraction B, batch multiplier C)."""
    match = _HETERO.match(text.strip())
    if not match:
        raise UserError(f"--hetero_string {text!r} must look like 'A_B|C|D_E', e.g. '0.2_0.8|16|0.8_0.2'")
    rich_clients, rich_data, multiplier, poor_clients, poor_data = (float(g) for g in match.groups())
    if abs(rich_clients + poor_clients - 1) > 1e-6 or abs(rich_data + poor_data - 1) > 1e-6:
        raise UserError(f"--hetero_string {text!r}: A + D and B + E must each be 1")
    if not (0 < rich_clients < 1 and 0 < rich_data < 1 and multiplier >= 1):
        raise UserError(f"--hetero_string {text!r}: fractions must be in (0, 1) and the multiplier at least 1")
    return rich_clients, rich_data, multiplier


def partition_hash(client_indices: Sequence[np.ndarray]) -> str:
    """SHA-256 hex digest of every client's index list, in client order (sizes included, so boundaries count)."""
    digest = hashlib.sha256()
    digest.update(np.int64(len(client_indices)).astype("<i8").tobytes())
    for indices in client_indices:
        indices = np.asarray(indices, dtype="<i8")
        digest.update(np.int64(indices.size).astype("<i8").tobytes())
        digest.update(indices.tobytes())
    return digest.hexdigest()


def class_count_matrix(labels: np.ndarray, client_indices: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(num_client, num_classes) int64 matrix of how many samples of each class each client holds."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.bincount(labels[np.asarray(indices, dtype=np.int64)], minlength=num_classes)
                     for indices in client_indices]).astype(np.int64)


def partition_summary(labels: np.ndarray, client_indices: Sequence[np.ndarray], num_classes: int) -> dict:
    """JSON-ready description: per-client sizes and class counts, totals, and the partition hash."""
    counts = class_count_matrix(labels, client_indices, num_classes)
    sizes = counts.sum(axis=1)
    return {
        "num_client": len(client_indices),
        "num_classes": int(num_classes),
        "num_samples": int(sizes.sum()),
        "hash": partition_hash(client_indices),
        "client_size_min": int(sizes.min()),
        "client_size_max": int(sizes.max()),
        "class_totals": [int(value) for value in counts.sum(axis=0)],
        "clients": [{"num_samples": int(size), "class_counts": [int(value) for value in row]}
                    for size, row in zip(sizes, counts)],
    }


def _plot_partition(path: Path, counts: np.ndarray, title: str) -> None:
    """Save a clients x classes heatmap with a bar of client sizes beside it (Agg canvas, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    num_client, num_classes = counts.shape
    height = min(14.0, 2.5 + 0.3 * num_client)  # 1000 clients still fit: rows shrink, ticks thin out
    width = min(16.0, 5.0 + 0.35 * num_classes)
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    # Colour bar, heatmap and client sizes side by side; the bar spans the full height however many clients.
    bar_axes, heat_axes, size_axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [0.12, 4, 1]})
    size_axes.sharey(heat_axes)
    image = heat_axes.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis",
                             extent=(-0.5, num_classes - 0.5, num_client - 0.5, -0.5))
    heat_axes.set_xlabel("class")
    heat_axes.set_ylabel("client")
    heat_axes.xaxis.set_major_locator(MaxNLocator(nbins=min(num_classes, 20), integer=True))
    heat_axes.yaxis.set_major_locator(MaxNLocator(nbins=min(num_client, 25), integer=True))
    if counts.size <= ANNOTATE_MAX_CELLS:
        threshold = counts.max() / 2 if counts.max() else 1
        for client in range(num_client):
            for label in range(num_classes):
                value = int(counts[client, label])
                heat_axes.text(label, client, str(value), ha="center", va="center", fontsize=7,
                               color="black" if value > threshold else "white")
    figure.colorbar(image, cax=bar_axes, label="samples")
    bar_axes.yaxis.set_ticks_position("left")
    bar_axes.yaxis.set_label_position("left")
    size_axes.barh(np.arange(num_client), counts.sum(axis=1), height=0.8 if num_client <= 100 else 1.0,
                   color="tab:gray")
    size_axes.set_xlabel("samples per client")
    size_axes.tick_params(axis="y", labelleft=False)
    figure.suptitle(title)
    write_atomic(path, lambda stream: figure.savefig(stream, format="png"))


def _json_text(value: Any, level: int = 0) -> str:
    """Indented JSON in which flat lists, and nested records of them, take one line (one line per client)."""
    pad, inner = " " * level, " " * (level + 1)

    def is_flat(item: Any) -> bool:
        """True for scalars and for lists that hold no lists or dicts."""
        return not isinstance(item, (dict, list, tuple)) or (
            isinstance(item, (list, tuple)) and not any(isinstance(part, (dict, list, tuple)) for part in item))

    if isinstance(value, dict) and level > 0 and all(is_flat(item) for item in value.values()):
        return json.dumps(value)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(key))}: {_json_text(item, level + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and not is_flat(value):
        return "[\n" + ",\n".join(f"{inner}{_json_text(item, level + 1)}" for item in value) + f"\n{pad}]"
    return json.dumps(value)


def save_partition(output_dir: str | Path, labels: np.ndarray, client_indices: Sequence[np.ndarray],
                   num_classes: int, extra: dict | None = None) -> dict:
    """Write output_dir/partition.json (summary plus extra) and output_dir/partition.png; return the summary."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = partition_summary(labels, client_indices, num_classes)
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(summary))
    if clashes:
        raise ValueError(f"extra keys {clashes} would overwrite the partition summary")
    write_text_atomic(output_dir / "partition.json", _json_text({**extra, **summary}) + "\n")
    described = ", ".join(f"{key}={extra[key]}" for key in _TITLE_KEYS if key in extra)
    title = f"{summary['num_client']} clients x {num_classes} classes" + (f" ({described})" if described else "")
    _plot_partition(output_dir / "partition.png", class_count_matrix(labels, client_indices, num_classes), title)
    return summary


def add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --partition, --dirichlet, --noniid_ratio, --dirichlet_alpha and --min_client_samples to parser."""
    group = parser.add_argument_group("data partition across clients")
    group.add_argument("--partition", choices=PARTITION_METHODS, default=None,
                       help="how training data is split across clients: iid (random equal split), shard (each "
                            "client holds round(noniid_ratio * classes) classes) or dirichlet (per-class shares "
                            "~ Dirichlet(dirichlet_alpha)); default: shard when --noniid_ratio < 1, else iid")
    group.add_argument("--dirichlet", action="store_true",
                       help="same as --partition dirichlet")
    group.add_argument("--noniid_ratio", type=float, default=1.0,
                       help="shard mode: fraction of the classes each client holds, in (0, 1]; a value below 1 "
                            "without --partition selects shard mode (default: 1.0)")
    group.add_argument("--dirichlet_alpha", type=float, default=0.4,
                       help="dirichlet mode: concentration; small values give skewed clients, large values "
                            "approach IID (default: 0.4)")
    group.add_argument("--min_client_samples", type=int, default=10,
                       help="every client must get at least this many samples; dirichlet mode redraws until "
                            "it does (default: 10)")


def resolve_partition_method(partition: str | None = None, *, dirichlet: bool = False,
                             noniid_ratio: float = 1.0) -> str:
    """Final partition method from --partition (None when not given), the --dirichlet alias and --noniid_ratio;
    UserError on conflicts."""
    if partition is not None and partition not in PARTITION_METHODS:
        raise UserError(f"unknown --partition '{partition}'; choose one of {', '.join(PARTITION_METHODS)}")
    if not 0.0 < noniid_ratio <= 1.0:
        raise UserError(f"--noniid_ratio must be in (0, 1], got {noniid_ratio}")
    if dirichlet and partition not in (None, "dirichlet"):
        raise UserError(f"--dirichlet contradicts --partition {partition}; pass only one of them")
    method = "dirichlet" if dirichlet else partition
    if noniid_ratio < 1.0 and method not in (None, "shard"):
        raise UserError(f"--noniid_ratio {noniid_ratio} only applies to shard mode but the partition is {method}; "
                        f"drop --noniid_ratio or use --partition shard")
    if method is None:
        method = "shard" if noniid_ratio < 1.0 else "iid"
    return method


def _print_summary(summary: dict, method: str, files: Sequence[Path], max_rows: int = 20) -> None:
    """Print a short per-client table (first rows only for many clients) and where the files went."""
    clients = summary["clients"]
    print(f"{method} partition of {summary['num_samples']} samples over {summary['num_client']} clients "
          f"(sizes {summary['client_size_min']}..{summary['client_size_max']}), hash {summary['hash'][:16]}")
    print(f"{'client':>6} {'samples':>8} {'classes':>8} {'top class':>10} {'top share':>10}")
    for client, entry in enumerate(clients[:max_rows]):
        counts = np.asarray(entry["class_counts"])
        share = counts.max() / max(1, entry["num_samples"])
        print(f"{client:>6} {entry['num_samples']:>8} {int((counts > 0).sum()):>8} {int(counts.argmax()):>10} "
              f"{share:>10.2f}")
    if len(clients) > max_rows:
        print(f"   ... {len(clients) - max_rows} more clients in partition.json")
    for path in files:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Load a dataset, partition its training set across clients, save partition.json/.png, print a summary."""
    parser = argparse.ArgumentParser(prog="python -m functions.data.partition",
                                     description="Split a training set across federated clients and save "
                                                 "partition.json and partition.png.")
    parser.add_argument("--dataset", choices=dataset_names(), default="cifar10", help="dataset (default: cifar10)")
    parser.add_argument("--data_dir", default="./data",
                        help="folder that contains cifar-10-batches-py / cifar-100-python (default: ./data)")
    parser.add_argument("--no_download", action="store_true", help="fail instead of downloading missing data")
    parser.add_argument("--data_proportion", type=float, default=1.0,
                        help="fraction of the training set to keep, in (0, 1] (default: 1.0)")
    parser.add_argument("--num_client", type=int, default=10, help="number of clients (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the subsample (default: 0)")
    parser.add_argument("--output_dir", required=True, help="folder for partition.json and partition.png")
    add_partition_arguments(parser)
    args = parser.parse_args(argv)

    method = resolve_partition_method(args.partition, dirichlet=args.dirichlet, noniid_ratio=args.noniid_ratio)
    dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download,
                           data_proportion=args.data_proportion, seed=args.seed)
    client_indices = make_partition(dataset.train_labels, args.num_client, method, dataset.num_classes,
                                    dirichlet_alpha=args.dirichlet_alpha, noniid_ratio=args.noniid_ratio,
                                    min_client_samples=args.min_client_samples, seed=args.seed)
    extra: dict[str, Any] = {"dataset": args.dataset, "data_source": dataset.source, "method": method,
                             "seed": args.seed, "data_proportion": args.data_proportion,
                             "min_client_samples": args.min_client_samples}
    if method == "dirichlet":
        extra["dirichlet_alpha"] = args.dirichlet_alpha
    if method == "shard":
        extra["noniid_ratio"] = args.noniid_ratio
        extra["classes_per_client"] = classes_per_client(args.noniid_ratio, dataset.num_classes)
    summary = save_partition(args.output_dir, dataset.train_labels, client_indices, dataset.num_classes, extra)
    output_dir = Path(args.output_dir)
    _print_summary(summary, method, [output_dir / "partition.json", output_dir / "partition.png"])


if __name__ == "__main__":
    run_cli(main)
