# Two commands for a newcomer:  `make demo`  and  `make test`.  Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on the developers' and CI's machines; on a GPU box pick your CUDA build.
# requirements.lock is resolved against LOCK_TORCH; TORCH only chooses which build `make setup` installs.
LOCK_TORCH := torch==2.13.0
TORCH ?= $(LOCK_TORCH)
# Exact versions of the installers themselves, so that a fresh setup resolves the same way every time.
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
# pip-tools lives in its own venv (inside .venv, so git ignores it), out of the project's environment.
LOCK_VENV := $(VENV)/lock-tools

.PHONY: setup demo test test-fast lint clean lock

setup: $(VENV)/.installed

# Everything comes from requirements.lock (exact versions); torch is the one package the lock leaves to $(TORCH)
# (unquoted, so that it may carry pip options such as --extra-index-url).
$(VENV)/.installed: requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet $(TORCH) -c requirements.lock
	$(PY) -m pip install --quiet -r requirements.lock
	touch $@

# Regenerate requirements.lock from requirements-dev.txt (which includes requirements.txt). Existing pins are
# kept where the requirements still allow them; `make lock LOCK_ARGS=--upgrade` moves every pin to the newest.
# torch is resolved (its own dependencies are pinned) but left out as a pin: `--unsafe-package torch`.
lock:
	test -x $(LOCK_VENV)/bin/python || python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip==$(PIP_VERSION)" "pip-tools==$(PIP_TOOLS_VERSION)"
	echo "$(LOCK_TORCH)" > $(LOCK_VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_ARGS) \
		--strip-extras --unsafe-package torch --constraint $(LOCK_VENV)/torch-constraint.txt \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		--output-file requirements.lock requirements-dev.txt

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The quick tier for the edit loop: everything but the tests marked slow (see pyproject.toml); CI runs `make test`.
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf demo_data demo_output .pytest_cache
