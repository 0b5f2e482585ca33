"""Local-cluster launcher: etcd, pebble, pebble-challtestsrv, coordinator and agents on loopback."""
