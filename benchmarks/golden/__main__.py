"""Run every golden part (or the named ones), each in its own process."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parts() -> list[str]:
    """The part modules of this folder (every module but the helpers)."""
    return sorted(path.stem for path in HERE.glob("*.py") if path.stem not in ("__init__", "__main__", "peer"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write tests/fixtures/mocosfl/ from MocoSFL's own code.")
    parser.add_argument("--peer_dir", required=True, help="a checkout of MocoSFL (github.com/SonyResearch/MocoSFL)")
    parser.add_argument("parts", nargs="*", help=f"parts to run (default: all of {', '.join(parts())})")
    options = parser.parse_args()
    chosen = options.parts or parts()
    unknown = sorted(set(chosen) - set(parts()))
    if unknown:
        raise SystemExit(f"error: unknown part {unknown[0]}; choose from {', '.join(parts())}")
    for part in chosen:
        print(f"golden part {part}", flush=True)
        subprocess.run([sys.executable, str(HERE / f"{part}.py"), "--peer_dir", options.peer_dir], check=True)


if __name__ == "__main__":
    main()
