"""Certificates for the network tests, made once: a CA, the server's for 127.0.0.1, and clients 0, 2 and 3."""
from __future__ import annotations

from pathlib import Path

import pytest

from functions.device.certificates import make_certificates


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, "127.0.0.1", [0, 2, 3])
    return folder
