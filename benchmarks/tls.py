"""Certificates and contexts for the TLS references: Python `ssl` TLS 1.3 and DCMTK's TLS.

One private CA signs a server and a client certificate (RSA 2048, as DICOM TLS deployments commonly
use), and both ends verify each other, so TLS does the same job as ISCL: mutual authentication.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Credentials:
    """PEM files: the CA certificate, and a key and certificate for each end."""

    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER, self.server_cert, self.server_key)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT, self.client_cert, self.client_key)

    def _context(self, protocol: int, cert: Path, key: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert, key)
        context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: rsa.RSAPrivateKey, issuer: str, signer: rsa.RSAPrivateKey,
                 *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def make_credentials(folder: Path) -> Credentials:
    """Write a fresh CA, server and client key pair into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files: dict[str, Path] = {"ca": folder / "ca.crt"}
    files["ca"].write_bytes(
        _certificate("iscl-bench CA", ca_key, "iscl-bench CA", ca_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    for end in ("server", "client"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files[f"{end}_key"] = folder / f"{end}.key"
        files[f"{end}_key"].touch(mode=0o600)  # stunnel warns of a key others may read
        files[f"{end}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ))  # fmt: skip
        files[f"{end}_cert"] = folder / f"{end}.crt"
        files[f"{end}_cert"].write_bytes(
            _certificate(f"iscl-bench {end}", key, "iscl-bench CA", ca_key, ca=False)
            .public_bytes(serialization.Encoding.PEM)
        )
    return Credentials(**files)
