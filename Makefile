# The two commands of the README: `make install` and `make test`.
# torch is pinned by constraints/torch.txt for development and CI machines (a CPU build where one is
# on hand, PyPI's default build elsewhere); a GPU host installing Easel with plain pip keeps its CUDA torch.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

# System packages the tests drive: Debian's chromium (tests/test_web.py) and PostgreSQL (tests/postgres.py).
# Installed here, as root, never by the tests themselves; a no-op once both are present.
CHROMIUM = /usr/bin/chromium

.PHONY: install system-deps test lint
install: system-deps $(VENV)/.installed

system-deps:
	@missing=""; \
	[ -x $(CHROMIUM) ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "make system-deps: not installing$$missing (that needs root and apt-get); the tests need them:" \
		     "run 'sudo make system-deps' on Debian or Ubuntu, or install them yourself" >&2; \
		exit 0; \
	fi; \
	echo "make system-deps: installing$$missing with apt-get"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q $$missing

$(VENV)/.installed: pyproject.toml constraints/torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/torch.txt -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .

# One pytest-xdist worker per core, each test sent to whichever worker is free (`make test TEST_WORKERS=0`
# runs the suite in one process).
TEST_WORKERS ?= auto

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal
