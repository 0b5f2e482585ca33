"""clusteracme: code shared by the coordinator, the peer agent and acmectl.

The generated gRPC stubs live in ``clusteracme.v1`` (regenerate with
``make proto``); PKI, mutual-TLS and error-mapping helpers live beside them.
"""

__version__ = "0.3.0"
