"""Benchmark: wall time of `sign` (3 names, 3 peers) through the gRPC API.

Runs the product's local cluster (real etcd, pebble with PEBBLE_VA_NOSLEEP=1,
challtestsrv DNS, a coordinator and 3 agents as processes), then times
``CoordinatorService.Sign(wait=true)`` for fresh names each round (so the CA
cannot reuse authorizations). The CSR is created before the clock starts.

For scale it also times a baseline against the same pebble: one process
driving the `acme` library directly (one HTTP-01 responder, 50 ms polling),
and prints the ratio of the medians.

    python -m bench.sign_latency [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import josepy as jose
from acme import challenges, client, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc

PEERS = 3
NAMES_PER_CERT = 3
BASELINE_ADDRESS = "127.0.0.99"  # not a peer: the baseline's own responder


def _stats(label: str, samples: list[float]) -> float:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    print(f"{label:34} median {median * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   "
          f"min {ordered[0] * 1000:7.1f} ms   (n={len(ordered)})")
    return median


def bench_product(cluster: LocalCluster, rounds: int, warmup: int) -> list[float]:
    cluster.ctl("provider", "add", "pebble", "--directory", cluster.directory_url, "--ca-bundle", str(cluster.ca_bundle))
    cluster.ctl("account", "register", "--provider", "pebble", "--email", "bench@bench.example", "--agree-tos")
    cluster.ctl("peer", "enable", "peer1")
    pki = cluster.pki_dir
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "operator-admin.key").read_bytes(),
                                         (pki / "operator-admin.pem").read_bytes())
    samples = []
    with grpc.secure_channel(cluster.coordinator_endpoint, creds) as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        for i in range(warmup + rounds):
            names = [f"n{j}-r{i}.product.bench.example" for j in range(NAMES_PER_CERT)]
            for name in names:
                cluster.set_dns(name, range(1, PEERS + 1))
            stub.CreateCSR(pb.CreateCSRRequest(peer_id="peer1", common_name=names[0], sans=names[1:], key_type=1),
                           timeout=30)
            started = time.perf_counter()
            order = stub.Sign(pb.SignRequest(peer_id="peer1", wait=True), timeout=120)
            elapsed = time.perf_counter() - started
            if not order.succeeded:
                raise SystemExit(f"sign failed: {order.error}")
            stub.DiscardPending(pb.DiscardPendingRequest(peer_id="peer1"), timeout=30)
            if i >= warmup:
                samples.append(elapsed)
    return samples


class _Tokens(http.server.BaseHTTPRequestHandler):
    tokens: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = self.tokens.get(self.path.rsplit("/", 1)[-1])
        self.send_response(200 if body else 404)
        self.end_headers()
        if body:
            self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def bench_baseline(cluster: LocalCluster, rounds: int, warmup: int) -> list[float]:
    """The `acme` library alone: one process, one responder, 50 ms polling."""
    server = http.server.ThreadingHTTPServer((BASELINE_ADDRESS, cluster.front_port), _Tokens)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = ec.generate_private_key(ec.SECP256R1())
    net = client.ClientNetwork(jose.JWKEC(key=key), alg=jose.ES256, verify_ssl=str(cluster.ca_bundle))
    acme = client.ClientV2(client.ClientV2.get_directory(cluster.directory_url, net), net)
    acme.new_account(messages.NewRegistration.from_data(email="base@bench.example", terms_of_service_agreed=True))
    samples = []
    try:
        for i in range(warmup + rounds):
            names = [f"n{j}-r{i}.baseline.bench.example" for j in range(NAMES_PER_CERT)]
            for name in names:
                cluster.infra.challtestsrv.set_a(name, [BASELINE_ADDRESS])  # type: ignore[union-attr]
            cert_key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                   .sign(cert_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
            started = time.perf_counter()
            order = acme.new_order(csr)
            for authz in order.authorizations:
                for challb in authz.body.challenges:
                    if isinstance(challb.chall, challenges.HTTP01):
                        response, validation = challb.response_and_validation(net.key)
                        _Tokens.tokens[challb.chall.encode("token")] = validation
                        acme.answer_challenge(challb, response)
            for authz in order.authorizations:
                while acme.poll(authz)[0].body.status != messages.STATUS_VALID:
                    time.sleep(0.05)
            order = acme.begin_finalization(order)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=60)
            while True:
                body = messages.Order.from_json(acme._post_as_get(order.uri).json())
                if body.status == messages.STATUS_VALID:
                    acme._post_as_get(body.certificate)
                    break
                if datetime.datetime.now() > deadline:
                    raise SystemExit("baseline order did not finish")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            if i >= warmup:
                samples.append(elapsed)
    finally:
        server.shutdown()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clusteracme-bench-") as tmp:
        with LocalCluster(Path(tmp), peers=PEERS, log_level="warning",
                          pebble_env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}) as cluster:
            # NONCEREJECT=0: pebble otherwise rejects 5 % of good nonces at
            # random, which adds retry noise to both sides of the comparison.
            print(f"sign: {NAMES_PER_CERT} names, {PEERS} peers, pebble PEBBLE_VA_NOSLEEP=1 NONCEREJECT=0, "
                  f"{args.rounds} rounds after {args.warmup} warm-up")
            product = _stats("clusteracme Sign(wait) over gRPC", bench_product(cluster, args.rounds, args.warmup))
            baseline = _stats("acme library alone, 50 ms polling", bench_baseline(cluster, args.rounds, args.warmup))
    print(f"ratio clusteracme / acme-alone (medians): {product / baseline:.2f}x; target median < 250 ms: "
          + ("met" if product < 0.25 else "NOT met"))


if __name__ == "__main__":
    main()
