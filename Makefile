# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export GLOG_v ?= 3

.PHONY: venv test demo clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m qwen3moe.demo

clean:
	rm -rf $(VENV) output
