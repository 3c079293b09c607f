"""Make a lab certificate authority, the server's certificate and one per client, for mutual TLS:

    python -m functions.device.certificates --out certs/ --server_name 192.168.1.10 --clients 0 1 2 3

--server_name is the address (or host name) the devices dial. Copy ca.crt and client-<id>.crt/.key to device <id>;
ca.key stays with whoever makes certificates. Certificates made elsewhere work too (see functions.net.credentials).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from functions.core.errors import UserError, run_cli
from functions.net.credentials import client_common_name

VALID_DAYS = 365


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def make_certificates(out: Path, server_name: str, clients: Sequence[int]) -> list[Path]:
    """A new CA, a server certificate for `server_name` and one certificate per client, written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                    issuer_key: ec.EllipticCurvePrivateKey, is_ca: bool,
                    extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("sfl-lab-ca", ca_key, name("sfl-lab-ca"), ca_key, True)
    written = [out / "ca.crt", out / "ca.key"]
    written[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(written[1], pem_key(ca_key))
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        alternative = x509.DNSName(server_name)
    parties = [("server", server_name, [x509.SubjectAlternativeName([alternative]),
                                        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])]
    parties += [(client_common_name(c), client_common_name(c),
                 [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]) for c in clients]
    for file_stem, common, extensions in parties:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(common, key, ca_cert.subject, ca_key, False, extensions)
        (out / f"{file_stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / f"{file_stem}.key", pem_key(key))
        written += [out / f"{file_stem}.crt", out / f"{file_stem}.key"]
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: make the folder of certificates."""
    parser = argparse.ArgumentParser(prog="python -m functions.device.certificates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the CA, server and client files to")
    parser.add_argument("--server_name", type=str, required=True,
                        help="IP address or host name the devices connect to (in the server certificate)")
    parser.add_argument("--clients", type=int, nargs="+", required=True, help="client ids to make certificates for")
    args = parser.parse_args(argv)
    if any(client < 0 for client in args.clients):
        raise UserError(f"--clients must be client ids >= 0, got {args.clients}")
    if (args.out / "ca.key").exists():
        raise UserError(f"--out {args.out} already holds a CA (ca.key); choose a new folder so no device's "
                        "certificate is silently replaced")
    written = make_certificates(args.out, args.server_name, sorted(set(args.clients)))
    print(f"wrote {len(written)} files to {args.out}: give device <id> ca.crt, client-<id>.crt and client-<id>.key")


if __name__ == "__main__":
    run_cli(main)
