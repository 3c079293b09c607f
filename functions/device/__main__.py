"""python -m functions.device --server HOST:PORT --client_id ID --credentials FOLDER: one real client."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from functions.core.errors import UserError, run_cli
from functions.device.client import device_main


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the device's options and run it until the server says stop."""
    parser = argparse.ArgumentParser(prog="python -m functions.device",
                                     description="Join a split federated run as one of its clients.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--server", type=str, required=True, help="HOST:PORT of the run's --listen address")
    parser.add_argument("--client_id", type=int, required=True, help="which client of the run this device is")
    parser.add_argument("--credentials", type=Path, default=None,
                        help="folder with ca.crt and client-<id>.crt/.key (python -m functions.device.certificates)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain text, no certificates (only against a server started with --insecure)")
    parser.add_argument("--data_dir", type=str, default="./data", help="where this device's copy of the dataset is")
    parser.add_argument("--retry_s", type=float, default=120.0,
                        help="give up after this many seconds without reaching the server")
    parser.add_argument("--call_timeout", type=float, default=60.0, help="seconds one call to the server may take")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if (args.credentials is None) == (not args.insecure):
        raise UserError("give --credentials FOLDER (TLS) or --insecure (plain text, loopback demos), not both or none")
    if args.client_id < 0 or args.retry_s <= 0 or args.call_timeout <= 0:
        raise UserError("--client_id must be >= 0, --retry_s and --call_timeout above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    return device_main(args.server, args.client_id, args.credentials, args.data_dir, args.retry_s,
                       args.call_timeout, args.threads)


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
