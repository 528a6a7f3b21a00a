# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-stamp
# torch and torchvision pinned together: spandrel needs torchvision, and an unpinned
# torch would pull whatever CUDA build is newest.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[gpu,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m worker demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
