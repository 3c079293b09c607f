"""The options of runs with remote clients: which clients are remote, and what is refused at start."""
from __future__ import annotations

import pytest
from sfl_helpers import TINY_MOCO

from configs import RUNTIME_OPTIONS, parse_args
from functions.core.errors import UserError
from functions.net.options import NETWORK_OPTIONS, remote_client_ids

BASE = [*TINY_MOCO, "--num_client", "4"]


def test_the_last_clients_or_the_named_ones_are_remote() -> None:
    args = parse_args("moco", [*BASE, "--remote_clients", "2", "--insecure"])
    assert remote_client_ids(args) == [2, 3] and args.client_exec == "loop"
    assert remote_client_ids(parse_args("moco", [*BASE, "--remote_client_ids", "0", "2", "--insecure"])) == [0, 2]
    assert remote_client_ids(parse_args("moco", BASE)) == []
    assert NETWORK_OPTIONS <= RUNTIME_OPTIONS  # how clients are reached is not part of what a run computes


@pytest.mark.parametrize("extra, fragment", [
    (["--remote_clients", "1"], "--credentials"),
    (["--remote_clients", "1", "--insecure", "--listen", "0.0.0.0:50051"], "loopback"),
    (["--remote_clients", "4", "--insecure"], "simulated client"),
    (["--remote_client_ids", "7", "--insecure"], "[0, 4)"),
    (["--remote_clients", "1", "--insecure", "--client_exec", "vmap"], "--client_exec vmap"),
    (["--remote_clients", "1", "--insecure", "--scheme", "fl"], "--scheme fl"),
])
def test_unsupported_settings_are_refused_with_one_line(extra: list[str], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("[", "\\[").replace(")", "\\)")):
        parse_args("moco", [*BASE, *extra])
