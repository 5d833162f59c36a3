# The two quick-start commands (README.md): `make train` and `make test`.
# Each installs the project into .venv first (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test docs bench-synthetic clean-data

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

train: install  ## the default pipeline on the embedded synthetic data (ARGS='key=value ...' adds overrides)
	$(BIN)/python -m train $(ARGS)

test: install  ## the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

docs: install  ## the documentation site into site/ (warnings fail the build)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-synthetic: install  ## generator throughput (images/s per core)
	$(BIN)/python -m train.bench synthetic

clean-data:
	rm -rf data/synthetic
