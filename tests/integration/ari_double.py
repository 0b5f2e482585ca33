"""TEST DOUBLE — an ACME Renewal Information (RFC 9773) responder in front of
pebble 2.4, which has no ARI.

It serves a copy of pebble's directory with a ``renewalInfo`` URL added (all
other URLs still point at pebble itself), and answers
``GET /renewalInfo/<cert-id>`` with the suggested window the test sets. It
records every certificate id asked about. Nothing else of ACME goes through
it. It is not part of the product.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import tempfile
import threading
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_listener(directory: Path, common_name: str, stem: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for a test double's HTTPS listener on 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_server(handler: type[http.server.BaseHTTPRequestHandler], cert_path: Path,
               key_path: Path) -> http.server.ThreadingHTTPServer:
    """A threading HTTPS server on 127.0.0.1 (a free port) for a test double."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


class AriDouble:
    def __init__(self, pebble_directory_url: str, pebble_ca: Path) -> None:
        self._pebble_dir = pebble_directory_url
        self._pebble_ctx = ssl.create_default_context(cafile=str(pebble_ca))
        self._tmp = Path(tempfile.mkdtemp(prefix="ari-double-"))
        self.cert_path, key_path = self_signed_listener(self._tmp, "ARI test double", "ari")
        self.windows: dict[str, tuple[datetime.datetime, datetime.datetime]] = {}
        self.default_window: tuple[datetime.datetime, datetime.datetime] | None = None
        self.asked: list[str] = []
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path == "/dir":
                    with urllib.request.urlopen(double._pebble_dir, context=double._pebble_ctx, timeout=5) as resp:
                        directory = json.load(resp)
                    directory["renewalInfo"] = f"{double.base_url}/renewalInfo"
                    self._json(directory)
                elif self.path.startswith("/renewalInfo/"):
                    cert_id = self.path.removeprefix("/renewalInfo/")
                    double.asked.append(cert_id)
                    window = double.windows.get(cert_id) or double.default_window
                    if window is None:
                        now = datetime.datetime.now(datetime.UTC)
                        window = (now + datetime.timedelta(days=30), now + datetime.timedelta(days=31))
                    start, end = window
                    self._json({"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"),
                                                    "end": end.isoformat().replace("+00:00", "Z")}},
                               retry_after=1)
                else:
                    self.send_error(404)

            def _json(self, data: object, retry_after: int | None = None) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = tls_server(Handler, self.cert_path, key_path)
        self.base_url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/dir"

    def bundle(self, pebble_ca: Path) -> Path:
        """A CA bundle trusting both the double and pebble's listener."""
        path = self._tmp / "bundle.pem"
        path.write_bytes(pebble_ca.read_bytes() + self.cert_path.read_bytes())
        return path

    def __enter__(self) -> AriDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
