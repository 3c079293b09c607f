"""Reading the certificates of mutual TLS: the server's and each client's, and the CA that signed them.

One folder holds everything (`python -m functions.device.certificates --out certs/ ...` writes it):

    ca.crt, ca.key                 the lab CA (keep ca.key off the devices)
    server.crt, server.key         the server's, for --server_name (an IP address or a host name)
    client-<id>.crt, .key          client <id>'s; its certificate's common name is "client-<id>"

The server trusts any client certificate the CA signed and reads the client id from its common name; a device
trusts the server certificate the same CA signed. Certificates made elsewhere work too, named the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from functions.core.errors import UserError

CLIENT_NAME = re.compile(r"^client-(\d{1,6})$")


def client_common_name(client_id: int) -> str:
    """The common name of client `client_id`'s certificate."""
    return f"client-{client_id}"


def client_of_common_name(name: str) -> int | None:
    """The client id a certificate's common name names (None when it names none)."""
    match = CLIENT_NAME.match(name)
    return int(match.group(1)) if match else None


def _read(folder: Path, file_name: str, option: str) -> bytes:
    """A credential file's bytes, or a UserError naming the option and the command that makes it."""
    path = folder / file_name
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserError(f"{option} {folder}: cannot read {file_name} ({error.strerror or error}); make the files "
                        "with python -m functions.device.certificates --out FOLDER --server_name HOST --clients ...") \
            from None


@dataclass(frozen=True)
class ServerCredentials:
    """The server's certificate and key, and the CA its clients' certificates must come from."""

    certificate: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, folder: Path) -> ServerCredentials:
        return cls(_read(folder, "server.crt", "--credentials"), _read(folder, "server.key", "--credentials"),
                   _read(folder, "ca.crt", "--credentials"))


@dataclass(frozen=True)
class ClientCredentials:
    """A client's certificate and key, and the CA the server's certificate must come from."""

    certificate: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, folder: Path, client_id: int) -> ClientCredentials:
        stem = client_common_name(client_id)
        return cls(_read(folder, f"{stem}.crt", "--credentials"), _read(folder, f"{stem}.key", "--credentials"),
                   _read(folder, "ca.crt", "--credentials"))
