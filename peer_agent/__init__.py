"""The peer agent: serves ACME challenge tokens on this node, generates and
keeps this node's private keys, and answers the coordinator over mTLS gRPC."""
