# Two entry points (README): `make run` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build that this machine kind keeps on disk.
TORCH  ?= torch==2.13.0

.PHONY: setup run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/lorakern bench --out out/bench

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
