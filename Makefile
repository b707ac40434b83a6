# Two commands for a newcomer:  `make demo`  and  `make test`.  Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on the developers' and CI's machines; on a GPU box pick your CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf demo_data demo_output .pytest_cache
