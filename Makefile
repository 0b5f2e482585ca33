# clusteracme: `make demo` runs the main job end to end, `make test` runs all
# tests. Both install what is missing first (system packages via apt-get,
# the virtualenv, the Python packages).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/clusteracme/v1/*.proto)

.PHONY: demo demo-ha test test-unit test-integration proto bench deps dist clean

demo: deps $(STAMP)
	$(PY) -m clusteracme.localcluster demo --peers 3

# The same with two coordinator replicas on a 3-member etcd.
demo-ha: deps $(STAMP)
	$(PY) -m clusteracme.localcluster demo --peers 3 --coordinators 2 --etcd-members 3

test: deps $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/contract

test-integration: deps $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: deps $(STAMP)
	$(PY) -m bench.sign_latency
	$(PY) -m bench.sign_latency --peers 30
	$(PY) -m bench.rollout_connections
	$(PY) -m bench.fleet --peers 30 --slots 7
	$(PY) -m bench.failover

deps:
	@deploy/dev-deps.sh

# The sdist and the wheel in dist/, the wheel built from the sdist (nothing
# stale from the tree gets in); a node: deploy/install.sh --wheel dist/*.whl.
dist: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist .

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Regenerate the committed gRPC stubs (tests/unit/test_proto_stubs.py fails
# when they are stale).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	rm -f clusteracme/v1/common_pb2_grpc.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache dist
