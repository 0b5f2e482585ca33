"""The coordinator: ACME account and orders, peer registry, etcd state, the
operator API (acmectl)."""
