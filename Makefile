# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export GLOG_v ?= 3

.PHONY: venv test test-slow demo clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# `make test`: the default suite, including real 2-process runs under msrun (launch + DP
# all-reduce, a failing worker, `generate --use_parallel` dp2 x ep2 and `pretrain --use_parallel`
# tp2, each == one process; launcher signals / timeouts with sleeping workers). Fresh clone on a
# quiet machine, 2026-12-05 (code 80f8359): make test 678 tests in 9m37s, make test-slow 70 in
# 18m13s, `bash .ci/run` 28m44s with the install (bench/RESULTS.md "make test duration").
# `make test-slow`: the tests marked slow (the other multi-process layouts, the larger simulated
# parallel layouts); CI runs both.
test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" --durations=15 tests

test-slow: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -p no:cacheprovider -m slow --durations=15 tests

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m qwen3moe.demo

clean:
	rm -rf $(VENV) output
