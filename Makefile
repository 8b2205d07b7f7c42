# `make test` and `make demo` build their own virtual environment on a fresh machine.
# The environment is refreshed whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first and pinned: on the reference machine these two come from local wheels
# (a plain `torch` requirement would otherwise pull a multi-GB build from the index).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dho-pipeline demo --out demo-out

clean:
	rm -rf $(VENV) demo-out .pytest_cache
