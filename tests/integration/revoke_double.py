"""TEST DOUBLE — a strict CA in front of pebble 2.4: account-signed
revocations are allowed only for names the account has just ordered.

Every request is forwarded to pebble as it came (method, path, body,
Content-Type) with the double's own ``Host``, so pebble writes the double's
URLs into the directory, the Location headers and the JWS ``url`` checks,
and every ACME request of a client pointed at ``directory_url`` goes
through here. Pebble's answer (status, headers, body) comes back as is.

While ``strict`` is on, a revokeCert signed by an account (``kid``) is
answered ``403 urn:ietf:params:acme:error:unauthorized`` unless that
account finalized, since ``strict`` was set, an order whose CSR names every
DNS name of the certificate: a CA that refuses authorization-only
revocation and asks for the appliance guide's way (a new order for the same
names, then revoke). A revokeCert signed by the certificate's own key
(``jwk``) is always forwarded. Refusals and forwarded revocations are
recorded. It is not part of the product.
"""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.integration.ari_double import self_signed_listener, tls_server

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dns_names(names: x509.Name, extensions: x509.Extensions) -> set[str]:
    out = {str(a.value).lower() for a in names.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out |= {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        pass
    return out


class RevokeDouble:
    def __init__(self, pebble_directory_url: str, pebble_ca: Path) -> None:
        parts = urlsplit(pebble_directory_url)
        self._pebble = f"{parts.scheme}://{parts.netloc}"
        self._pebble_ca = pebble_ca
        self._pebble_ctx = ssl.create_default_context(cafile=str(pebble_ca))
        self._tmp = Path(tempfile.mkdtemp(prefix="revoke-double-"))
        self.cert_path, key_path = self_signed_listener(self._tmp, "strict CA test double", "double")
        self._lock = threading.Lock()
        self._strict = False
        self._finalized: dict[str, list[set[str]]] = {}  # account URL -> names of each CSR finalized
        self.refused: list[tuple[str, str]] = []     # (account URL, serial hex) refused
        self.forwarded: list[tuple[str, str]] = []   # ("kid" or "jwk", serial hex) revocations sent to pebble
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                double._forward(self, "GET")

            def do_HEAD(self) -> None:  # noqa: N802
                double._forward(self, "HEAD")

            def do_POST(self) -> None:  # noqa: N802
                double._forward(self, "POST")

            def log_message(self, *args: object) -> None:
                pass

        self._server = tls_server(Handler, self.cert_path, key_path)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- what the test sets and reads -------------------------------------------
    @property
    def directory_url(self) -> str:
        return f"https://{self.host}/dir"

    def bundle(self) -> Path:
        """A CA bundle trusting both the double and pebble's listener."""
        path = self._tmp / "bundle.pem"
        path.write_bytes(self._pebble_ca.read_bytes() + self.cert_path.read_bytes())
        return path

    @property
    def strict(self) -> bool:
        return self._strict

    @strict.setter
    def strict(self, on: bool) -> None:
        with self._lock:
            self._strict = on
            self._finalized.clear()

    # --- the proxy ------------------------------------------------------------------
    def _forward(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        jws = self._jws(body) if method == "POST" and body else None
        if jws is not None and handler.path == "/revoke-cert" and self._refuse(handler, jws):
            return
        headers = {"Host": self.host, "User-Agent": handler.headers.get("User-Agent", "revoke-double")}
        if handler.headers.get("Content-Type"):
            headers["Content-Type"] = handler.headers["Content-Type"]
        request = urllib.request.Request(self._pebble + handler.path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=self._pebble_ctx, timeout=30) as resp:
                status, reply_headers, reply = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            status, reply_headers, reply = exc.code, exc.headers, exc.read()
        if jws is not None and status == 200:
            self._note(handler.path, jws)
        handler.send_response(status)
        for name, value in reply_headers.items():
            if name.lower() not in HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(reply)

    @staticmethod
    def _jws(body: bytes) -> tuple[dict[str, object], dict[str, object]] | None:
        """(protected header, payload) of a flattened JWS; None for anything else."""
        try:
            outer = json.loads(body)
            protected = json.loads(_b64(outer["protected"]))
            payload = json.loads(_b64(outer["payload"])) if outer.get("payload") else {}
        except (ValueError, KeyError, TypeError):
            return None
        return protected, payload

    def _note(self, path: str, jws: tuple[dict[str, object], dict[str, object]]) -> None:
        protected, payload = jws
        if path.startswith("/finalize-order/") and protected.get("kid") and payload.get("csr"):
            csr = x509.load_der_x509_csr(_b64(str(payload["csr"])))
            with self._lock:
                self._finalized.setdefault(str(protected["kid"]), []).append(_dns_names(csr.subject, csr.extensions))
        elif path == "/revoke-cert" and payload.get("certificate"):
            cert = x509.load_der_x509_certificate(_b64(str(payload["certificate"])))
            with self._lock:
                self.forwarded.append(("kid" if protected.get("kid") else "jwk", format(cert.serial_number, "x")))

    def _refuse(self, handler: http.server.BaseHTTPRequestHandler,
                jws: tuple[dict[str, object], dict[str, object]]) -> bool:
        protected, payload = jws
        account = str(protected.get("kid") or "")
        if not account or not payload.get("certificate"):
            return False
        cert = x509.load_der_x509_certificate(_b64(str(payload["certificate"])))
        names = {n.lower() for n in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)}
        with self._lock:
            if not self._strict or any(names <= ordered for ordered in self._finalized.get(account, [])):
                return False
            self.refused.append((account, format(cert.serial_number, "x")))
        problem = {"type": "urn:ietf:params:acme:error:unauthorized", "status": 403,
                   "detail": "this CA revokes by account only certificates for names the account has just ordered "
                             "(order a new certificate for the same names first)"}
        reply = json.dumps(problem).encode()
        handler.send_response(403)
        handler.send_header("Content-Type", "application/problem+json")
        handler.send_header("Content-Length", str(len(reply)))
        nonce = self._fresh_nonce()
        if nonce:
            handler.send_header("Replay-Nonce", nonce)
        handler.end_headers()
        handler.wfile.write(reply)
        return True

    def _fresh_nonce(self) -> str:
        """A nonce from pebble for the refusal (RFC 8555 6.5: every error answer carries one)."""
        request = urllib.request.Request(self._pebble + "/nonce-plz", method="HEAD", headers={"Host": self.host})
        try:
            with urllib.request.urlopen(request, context=self._pebble_ctx, timeout=10) as resp:
                return resp.headers.get("Replay-Nonce", "")
        except OSError:
            return ""

    def __enter__(self) -> RevokeDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
