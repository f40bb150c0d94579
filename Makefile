# Quick start:  make demo   (serve the tiny pipeline, write one PNG)   |   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options, e.g. PIP_OPTIONS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_OPTIONS ?=
TINY_SD := build/tiny-sd

.PHONY: install demo test serve-tiny lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_OPTIONS) -e ".[test,load]"
	touch $@

$(TINY_SD)/model_index.json: $(VENV)/.installed src/stepdiff/tiny.py
	$(PY) -m stepdiff make-tiny sd $(TINY_SD)

demo: $(TINY_SD)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) -m stepdiff demo --pipeline $(TINY_SD) --out outputs

serve-tiny: $(TINY_SD)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) -m stepdiff serve --pipeline $(TINY_SD)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf build outputs .pytest_cache
