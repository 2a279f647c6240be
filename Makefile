# The two commands of the README. Both work on a fresh machine with only Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean bench

demo: $(STAMP)
	$(VENV)/bin/modelpress compress smollm2-135m --target-bits 3 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q -x -rs tests

install: $(STAMP)

# torch goes first and is pinned, so no other dependency can pull a newer (multi-GB) build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH)"
	touch $(STAMP)

bench: $(STAMP)
	$(PY) bench/uniform.py
	$(PY) bench/search.py
	$(PY) bench/demo.py

clean:
	rm -rf $(VENV) out .pytest_cache
