"""The agent's copy of the cluster trust store, and the deploy-time check
that a chain validates against it (SPEC R12).

The coordinator hands every agent the trust bundle (the PEM of every CA in
the cluster's trust store) when it registers and whenever the store changes
(``SetTrustBundle``). The agent keeps it in its state directory
(``trust-bundle.pem``), whether or not ``trust_bundle_file`` also publishes
it for other services. While that copy holds certificates, a deploy is
refused unless its chain validates to a root (a self-signed CA) of it:
cryptography's X.509 path validation under its web-PKI server policy, for
one of the leaf's names, with the chain's and the bundle's intermediates, as
``acmectl trust verify`` does. An empty or absent bundle checks nothing (a
cluster without a trust store deploys what its CAs issue).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from clusteracme.peer_agent.errors import StorageError, UntrustedChain
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509 import verification

from clusteracme import certinfo

BUNDLE_FILE = "trust-bundle.pem"
"""The agent's copy of the trust bundle, in its state directory."""


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def read_bundle(path: Path) -> list[x509.Certificate]:
    """The certificates of the bundle at ``path`` ([] when absent or empty).
    A bundle that cannot be read refuses (StorageError): checking nothing
    would let any chain through."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read the trust bundle {path}: {exc.strerror or exc}") from exc
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise StorageError(f"the trust bundle {path} cannot be read ({exc}); the coordinator writes it again when "
                           "the agent registers") from exc


def _subject(leaf: x509.Certificate) -> str | None:
    names = certinfo.cert_names(leaf)
    for name in names:
        if not name.startswith("*."):
            return name
    # A wildcard-only certificate: the verifier takes a host name, not a pattern.
    return "wildcard-check" + names[0][1:] if names else None


def check_chain(bundle: Path, chain_pem: bytes, now: datetime.datetime) -> None:
    """Refuse (UntrustedChain) a chain, leaf first, that does not validate at
    ``now`` to a root of the trust bundle at ``bundle``; no bundle, or an
    empty one, accepts every chain."""
    cas = read_bundle(bundle)
    if not cas:
        return
    chain = x509.load_pem_x509_certificates(chain_pem)
    leaf = chain[0]
    serial = format(leaf.serial_number, "x")
    roots = [c for c in cas if _self_signed(c)]
    where = f"this peer's trust bundle ({len(cas)} CA certificate{'s' if len(cas) != 1 else ''} of the cluster's " \
            "trust store)"
    if not roots:
        raise UntrustedChain(f"certificate {serial} cannot validate against {where}: it holds no root certificate, "
                             "only intermediates; nothing was changed (acmectl trust add the root)")
    subject = _subject(leaf)
    if subject is None:
        raise UntrustedChain(f"certificate {serial} names no DNS name to validate against {where}; nothing was changed")
    intermediates = chain[1:] + [c for c in cas if not _self_signed(c)]
    try:
        verifier = (verification.PolicyBuilder().store(verification.Store(roots)).time(now)
                    .build_server_verifier(x509.DNSName(subject)))
        verifier.verify(leaf, intermediates)
    except (verification.VerificationError, ValueError) as exc:
        reason = str(exc).removeprefix("validation failed: ").split(" (encountered processing")[0]
        if "candidates exhausted" in reason and "no interior errors" in reason:
            reason = "no path from the leaf's issuer to a root certificate of the bundle"
        issuer = leaf.issuer.rfc4514_string()
        raise UntrustedChain(
            f"certificate {serial} (issuer {issuer[:200]}) does not validate against {where}: {reason[:300]}; nothing "
            "was changed (acmectl trust verify shows why; trust the issuing CA's root with acmectl trust add)"
        ) from None
