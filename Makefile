# Two commands for a newcomer: `make main` (set up, then the study: ann, cnn, transfer and their comparison on the
# real data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist
EXPERIMENT ?= fmnist

.PHONY: setup data postgres main test bench
setup: data $(VENV)/.installed

# Debian's dataset-fashion-mnist package, when the files are missing and apt is usable (root or sudo).
data:
	@if [ ! -d $(DATA) ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: $(DATA) is missing and apt needs root; see README (Data)"; fi; \
	fi

# PostgreSQL server binaries for the shared-study tests, which start their own server on 127.0.0.1.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql-15 \
	    || echo "note: postgresql-15 could not be installed; the PostgreSQL tests will be skipped"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

main: setup
	. $(VENV)/bin/activate && mlflow run . -e main --env-manager local --experiment-name $(EXPERIMENT)

# Two workers, each taking the next tests when free (the slow ones first: tests/conftest.py). By whole files
# instead (--dist loadfile), one worker went on alone with the last long file for a minute or more.
test: setup postgres
	$(PY) -m pytest -n 2 --dist load

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/transfer.py
	$(PY) benchmarks/compare.py
