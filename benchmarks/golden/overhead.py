"""Golden part: the client FLOPs MocoSFL's overhead_calculator.py reports, for ResNet-18 at cuts 1-3.

Its script is run as it is, with three settings changed in its text (scheme SFL, the cut layer, the image size)
and torch.cuda.memory_allocated answering 0 on a machine without a GPU; its printed "FLOPs/image" (3x the
forward count of fvcore's FlopCountAnalysis, in units of 2^20) and fvcore's forward count are recorded.
fvcore is not a requirement of this project: install it for this part only (pip install fvcore, or
pip install --target <dir> fvcore iopath yacs termcolor tabulate portalocker and pass --deps_dir <dir>).

    python benchmarks/golden/overhead.py --peer_dir MOCOSFL_CHECKOUT [--deps_dir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path
from typing import Any

import peer

CUTS = (1, 2, 3)
IMAGE_SIZES = (32, 64, 224)
SETTINGS = {'scheme="FL" #SFL/FL': 'scheme="SFL"', "cutlayer=2": "cutlayer={cut}", "data_size=32": "data_size={size}"}


def run_calculator(source: str, cut: int, size: int, peer_dir: str) -> dict[str, Any]:
    """Run MocoSFL's overhead_calculator.py with its settings changed; its printed figures and fvcore's count."""
    for original, changed in SETTINGS.items():
        if source.count(original) != 1:
            raise SystemExit(f"error: {original!r} is not a setting of this overhead_calculator.py")
        source = source.replace(original, changed.format(cut=cut, size=size))
    namespace: dict[str, Any] = {"__name__": "overhead_calculator", "__file__": f"{peer_dir}/overhead_calculator.py"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, namespace["__file__"], "exec"), namespace)  # noqa: S102 - MocoSFL's own script
    text = printed.getvalue()
    figure = float(re.search(r"FLOPs/image: ([0-9.]+) M", text).group(1))
    return {"cut": cut, "image_size": size, "printed_flops_per_image_M": figure,
            "fvcore_forward_total": int(namespace["flops"].total()), "printed": text.strip().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True)
    parser.add_argument("--deps_dir", default=None, help="a folder holding fvcore (pip install --target)")
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    if options.deps_dir:
        sys.path.append(options.deps_dir)
    import torch

    torch.cuda.memory_allocated = lambda *args, **kwargs: 0  # printed only; there is no GPU here
    try:  # here, not inside the script, which would pip install it
        import fvcore  # noqa: F401
    except ImportError:
        raise SystemExit("error: this part runs MocoSFL's fvcore counter: pip install fvcore (or install it with "
                         "pip install --target <dir> and pass --deps_dir <dir>)") from None

    source = (Path(options.peer_dir) / "overhead_calculator.py").read_text(encoding="utf-8")
    records = []
    for size in IMAGE_SIZES:
        for cut in CUTS:
            torch.manual_seed(0)
            records.append(run_calculator(source, cut, size, options.peer_dir))
    peer.write_fixture("overhead", options.peer_dir, {
        "arch": "ResNet18", "records": records,
        "convention": "3 x fvcore forward count of the client on one image (a multiply-add is one FLOP, GroupNorm "
                      "5 per element), divided by 2^20",
    })


if __name__ == "__main__":
    main()
