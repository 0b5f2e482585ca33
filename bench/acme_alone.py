"""The benchmarks' baseline: certbot's `acme` library alone driving a CA.

No coordinator, no etcd, no peers: one HTTP-01 responder on an address of
its own, one account, and a plain loop per order (new order, answer every
HTTP-01 challenge, poll the authorizations and the order every 50 ms,
download the chain). What a benchmark of the product compares against, on the
same pebble, so the CA's own share of the time is visible.

Thread-safe: ``order`` may run in many threads at once (one client per
thread, the account shared). Concurrent runs should poll the order, not its
authorizations (``poll_authorizations=False``): pebble 2.4 deadlocks under
concurrent load when authorizations are polled. Its authorization handler
write-locks the authorization and then reads the store, while a new order's
search for a reusable authorization read-locks the store and then each
authorization; a pending store write (an issued certificate) closes the
cycle and every request hangs (seen in a goroutine dump, SIGQUIT, after 77
of 420 orders from 32 threads).
"""

from __future__ import annotations

import http.server
import threading
import time

import josepy as jose
from acme import challenges, client, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

POLL_SECONDS = 0.05
ORDER_TIMEOUT = 120.0


class Responder:
    """An HTTP-01 responder on ``address:port`` serving every token it was given."""

    def __init__(self, address: str, port: int) -> None:
        tokens: dict[str, str] = {}
        self.tokens = tokens

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                body = tokens.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body else 404)
                self.end_headers()
                if body:
                    self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # a burst of validations; the default backlog is 5
            daemon_threads = True

        self._server = Server((address, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="acme-alone-responder", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_csr(names: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


class AcmeAlone:
    """One account at ``directory_url``; ``order`` runs one order to the downloaded chain."""

    def __init__(self, directory_url: str, ca_bundle: str, responder: Responder, email: str, *,
                 poll_authorizations: bool = True) -> None:
        self._poll_authorizations = poll_authorizations
        self._ca_bundle = ca_bundle
        self._responder = responder
        self._key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        net = client.ClientNetwork(self._key, alg=jose.ES256, verify_ssl=ca_bundle)
        self._directory = client.ClientV2.get_directory(directory_url, net)
        self._account = client.ClientV2(self._directory, net).new_account(
            messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True))
        self._local = threading.local()

    def _client(self) -> client.ClientV2:
        acme = getattr(self._local, "client", None)
        if acme is None:
            net = client.ClientNetwork(self._key, account=self._account, alg=jose.ES256, verify_ssl=self._ca_bundle)
            acme = self._local.client = client.ClientV2(self._directory, net)
        return acme

    def order(self, csr_pem: bytes) -> float:
        """Run one order for ``csr_pem`` (its names must resolve to the
        responder); returns its seconds from new-order to downloaded chain."""
        acme = self._client()
        started = time.perf_counter()
        order = acme.new_order(csr_pem)
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # reused by the CA
            for challb in authz.body.challenges:
                if isinstance(challb.chall, challenges.HTTP01):
                    response, validation = challb.response_and_validation(acme.net.key)
                    self._responder.tokens[challb.chall.encode("token")] = validation
                    acme.answer_challenge(challb, response)
        deadline = time.monotonic() + ORDER_TIMEOUT
        if self._poll_authorizations:
            for authz in order.authorizations:
                while (status := acme.poll(authz)[0].body.status) != messages.STATUS_VALID:
                    if status == messages.STATUS_INVALID or time.monotonic() > deadline:
                        raise RuntimeError(f"authorization {authz.uri} ended {status}")
                    time.sleep(POLL_SECONDS)
        else:
            self._poll_order(acme, order.uri, messages.STATUS_READY, deadline)
        order = acme.begin_finalization(order)
        body = self._poll_order(acme, order.uri, messages.STATUS_VALID, deadline)
        acme._post_as_get(body.certificate)
        return time.perf_counter() - started

    @staticmethod
    def _poll_order(acme: client.ClientV2, url: str, until: messages.Status, deadline: float) -> messages.Order:
        """Poll the order every POLL_SECONDS until it reaches ``until`` (or past it)."""
        done = (messages.STATUS_READY, messages.STATUS_PROCESSING, messages.STATUS_VALID)
        while True:
            body = messages.Order.from_json(acme._post_as_get(url).json())
            if body.status == until or (until == messages.STATUS_READY and body.status in done):
                return body
            if body.status == messages.STATUS_INVALID or time.monotonic() > deadline:
                raise RuntimeError(f"order {url} ended {body.status}")
            time.sleep(POLL_SECONDS)
