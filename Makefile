# qpipe's everyday commands. `make run` and `make test` set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-qpipe

.PHONY: setup run test lint bench clean

# deploy/constraints.txt pins every dependency (the images install from it too), so a new
# release of kombu, celery or redis, whose internals workers/leases.py and the metrics read, never
# reaches a build or CI untested
$(STAMP): pyproject.toml deploy/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c deploy/constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/qpipe run examples/digits.yaml

# Two pytest runs, each with fresh xdist workers: the in-process tests first, then those that
# start servers and worker processes. An xdist worker that has loaded hundreds of models, ONNX
# Runtime sessions and OpenVINO compiled models holds several GB it never hands back; in one run
# those workers and the integration tests' servers and workers together exhausted 24 GB.
# --no-loadscope-reorder (integration run): modules go out in collection order, which
# tests/conftest.py sorts longest first, instead of by their number of tests.
# MALLOC_ARENA_MAX: the runtimes start many threads, and glibc's default of 8 heaps per core
# each keeps its freed memory.
PYTEST := MALLOC_ARENA_MAX=2 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --tb=native -rfs --durations=15

test: $(STAMP)
	$(BIN)/ruff check pipeline workers tests bench
	$(PYTEST) -m "not integration"
	$(PYTEST) --no-loadscope-reorder -m integration

lint: $(STAMP)
	$(BIN)/ruff check pipeline workers tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.int8_vs_fp32
	$(BIN)/python -m bench.overhead

clean:
	rm -rf .qpipe .pytest_cache
