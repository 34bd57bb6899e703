# The two commands of the README: `make install` and `make test`.
# torch is pinned by constraints/torch.txt for development and CI machines (a CPU build where one is
# on hand, PyPI's default build elsewhere); a GPU host installing Easel with plain pip keeps its CUDA torch.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/torch.txt -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest
