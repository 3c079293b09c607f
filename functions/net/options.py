"""The options of runs with real clients (--remote_clients ...), and what they may not be combined with."""
from __future__ import annotations

import argparse
import ipaddress

from functions.core.errors import UserError
from functions.data.loaders import pool_size_of
from functions.privacy.defences import selected_defences

# Options of the network only: how clients are reached changes nothing a run computes (not in its signature).
NETWORK_OPTIONS = frozenset({"remote_clients", "remote_client_ids", "listen", "credentials", "insecure",
                             "client_timeout", "join_timeout"})


def add_network_arguments(group: argparse._ArgumentGroup) -> None:
    """--remote_clients and the server's network settings (docs/devices.md)."""
    group.add_argument("--remote_clients", type=int, default=0,
                       help="this many clients (the last ids) run on devices that join over the network "
                            "(python -m functions.device); 0: every client is simulated")
    group.add_argument("--remote_client_ids", type=int, nargs="+", default=None, metavar="ID",
                       help="which clients are remote, instead of the last --remote_clients")
    group.add_argument("--listen", type=str, default="127.0.0.1:50051",
                       help="HOST:PORT the server listens on for devices (0.0.0.0:PORT for every interface)")
    group.add_argument("--credentials", type=str, default=None,
                       help="folder with server.crt, server.key and ca.crt (python -m functions.device.certificates)")
    group.add_argument("--insecure", action="store_true",
                       help="plain text without certificates: loopback --listen addresses only (demos, tests)")
    group.add_argument("--client_timeout", type=float, default=30.0,
                       help="seconds a remote client may take to answer before it is left out of the step")
    group.add_argument("--join_timeout", type=float, default=300.0,
                       help="seconds the run waits for its remote clients to join before the first step")


def is_loopback(address: str) -> bool:
    """Whether a HOST:PORT listens on the loopback interface only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_client_ids(args: argparse.Namespace) -> list[int]:
    """The remote clients of a run (none without the options)."""
    if getattr(args, "remote_client_ids", None):
        return sorted({int(c) for c in args.remote_client_ids})
    count = int(getattr(args, "remote_clients", 0) or 0)
    return list(range(args.num_client - count, args.num_client)) if count > 0 else []


def check_network_options(args: argparse.Namespace) -> None:
    """Refuse remote clients with what they do not support, and a server without credentials (one line each)."""
    remote = remote_client_ids(args)
    if not remote:
        return
    if args.remote_clients < 0 or any(not 0 <= c < args.num_client for c in remote):
        raise UserError(f"--remote_clients/--remote_client_ids must name clients in [0, {args.num_client}), got "
                        f"{args.remote_client_ids or args.remote_clients}")
    if pool_size_of(args.num_client, args.client_sample_ratio) <= len(remote):
        raise UserError(f"{len(remote)} remote clients of {args.num_client}: every step needs a simulated client "
                        "too; use fewer remote clients or a larger --client_sample_ratio")
    refused = {"--scheme fl": args.scheme == "fl", "--client_exec vmap": args.client_exec == "vmap",
               "--use_fp16": bool(args.use_fp16), "--use_dali": bool(args.use_dali),
               "--loss_threshold": args.loss_threshold > 0,
               "--defence": bool(selected_defences(args.defence, args.enable_ressfl))}
    for option, given in refused.items():
        if given:
            raise UserError(f"remote clients (--remote_clients) do not support {option}; drop one of the two")
    if args.client_timeout <= 0 or args.join_timeout < 0:
        raise UserError("--client_timeout must be above 0 and --join_timeout at least 0 seconds")
    if args.insecure and not is_loopback(args.listen):
        raise UserError(f"--insecure sends weights and smashed data in plain text: only on a loopback --listen "
                        f"address, not {args.listen}; make certificates (python -m functions.device.certificates) "
                        "and pass --credentials")
    if not args.insecure and not args.credentials:
        raise UserError("remote clients need --credentials FOLDER (python -m functions.device.certificates), or "
                        "--insecure on a loopback --listen address")
    if args.client_exec == "auto":
        args.client_exec = "loop"  # the remote clients' mirrors live in the loop engine
