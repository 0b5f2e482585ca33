"""Generated gRPC/protobuf stubs for the clusteracme.v1 API (``make proto``; do not edit)."""
