"""Any ASGI app served by uvicorn on 127.0.0.1 in a daemon thread, optionally over TLS: a stand-in
cloud that says what a test tells it to, and a certificate made for the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import uvicorn

from tests.cloud.server_util import run_in_thread


class AppThread:
    """`app` on 127.0.0.1:`port` (0: a free one); `ssl` = (certfile, keyfile) serves https / wss."""

    def __init__(self, app, port: int = 0, ssl: tuple[Path, Path] | None = None, ws_max_size: int = 1 << 24):
        tls = {"ssl_certfile": str(ssl[0]), "ssl_keyfile": str(ssl[1])} if ssl else {}
        cfg = uvicorn.Config(app, ws="websockets-sansio", log_level="warning", ws_max_size=ws_max_size, **tls)
        self.server, self.thread, self.port = run_in_thread(cfg, port)

    def url(self, scheme: str = "ws", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key -> (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "costeer test cloud")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path
